//! The workloads of issue 8, each generic over the system under test. Every loop is
//! bounded by a message count and a deadline; a run that times out reports what it
//! measured and says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::payload::{age_ns, now_ns, stamped};
use crate::peer::{Deliveries, PubSub, Requester, SubscriberConnection};

/// Latencies in nanoseconds, 3 significant digits, up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// A percentile of a nanosecond histogram, in microseconds.
pub fn percentile_us(h: &Histogram<u64>, percentile: f64) -> f64 {
    h.value_at_quantile(percentile / 100.0) as f64 / 1000.0
}

/// Publishes in flight at once in the throughput workload (one publisher
/// connection; requests are pipelined or multiplexed on it).
pub const PUBLISH_WINDOW: usize = 64;
/// How far (in messages) the publisher may run ahead of the slowest subscriber:
/// below fleet-ipc's per-subscriber queue (4096), so the node never cuts a
/// subscriber off, and the same for every peer.
pub const MAX_AHEAD: u64 = 2048;
/// Subscribers wake a waiting publisher every this many messages.
const PROGRESS_EVERY: u64 = 128;

#[derive(Debug)]
pub struct Throughput {
    pub deliveries_per_s: f64,
    pub publishes_per_s: f64,
    /// CPU time the system's server processes spent per delivery, in µs: what the
    /// system costs, less sensitive than rates to a busy machine.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Set when not every subscriber got every message before the deadline.
    pub incomplete: Option<String>,
}

/// One publisher with [`PUBLISH_WINDOW`] publishes in flight sends `messages`
/// 128-byte payloads to `subscribers` subscribers (each on its own connection);
/// the clock runs from the first publish to the last delivery.
pub async fn throughput(
    peer: &dyn PubSub,
    subject: &str,
    subscribers: usize,
    messages: usize,
    deadline: Duration,
) -> anyhow::Result<Throughput> {
    let deadline = Instant::now() + deadline;
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    let progress = Arc::new(Notify::new());
    let last_delivery = Arc::new(AtomicU64::new(0));
    let mut readers = JoinSet::new();
    for index in 0..subscribers {
        let connection = peer.connect(index).await?;
        let mut deliveries = connection.subscribe(subject).await?;
        let (received, progress, last_delivery) =
            (received.clone(), progress.clone(), last_delivery.clone());
        readers.spawn(async move {
            let _connection = connection;
            let mut count = 0u64;
            while count < messages as u64 {
                match deliveries.next().await {
                    Some(Ok(_)) => count += 1,
                    Some(Err(e)) => return Err(e.context(format!("after {count} messages"))),
                    None => bail!("subscription ended after {count} messages"),
                }
                if count.is_multiple_of(PROGRESS_EVERY) || count == messages as u64 {
                    received[index].store(count, Ordering::Relaxed);
                    progress.notify_waiters();
                }
            }
            last_delivery.fetch_max(now_ns(), Ordering::Relaxed);
            Ok(())
        });
    }

    let publisher = peer.publisher().await?;
    let cpu_before = server_cpu(peer);
    let payload = stamped(0);
    let next = Arc::new(AtomicUsize::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let started = now_ns();
    let mut publishers = JoinSet::new();
    for _ in 0..publisher.in_flight() {
        let (publisher, payload, next, slowest, received, progress, subject) = (
            publisher.clone(),
            payload.clone(),
            next.clone(),
            slowest.clone(),
            received.clone(),
            progress.clone(),
            subject.to_string(),
        );
        publishers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= messages {
                    return Ok(());
                }
                // Flow control: wait while this message would be more than MAX_AHEAD
                // ahead of the slowest subscriber.
                while index as u64 >= slowest.load(Ordering::Relaxed) + MAX_AHEAD {
                    let notified = progress.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let min = received
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .min()
                        .unwrap_or(0);
                    slowest.fetch_max(min, Ordering::Relaxed);
                    if (index as u64) < min + MAX_AHEAD {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("subscribers stopped receiving (at {min} of {messages})");
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(10), notified).await;
                }
                publisher.publish(&subject, payload.clone()).await?;
            }
        });
    }
    let mut failure = None;
    while let Some(done) = publishers.join_next().await {
        if let Err(e) = done.context("publisher task").and_then(|r| r) {
            failure.get_or_insert(format!("publisher: {e:#}"));
        }
    }
    publisher.flush().await?;
    let published_ns = now_ns() - started;
    let remaining = deadline.saturating_duration_since(Instant::now());
    let all_received = tokio::time::timeout(remaining, async {
        while let Some(done) = readers.join_next().await {
            if let Err(e) = done.context("subscriber task").and_then(|r| r) {
                failure.get_or_insert(format!("subscriber: {e:#}"));
            }
        }
    })
    .await
    .is_ok();
    readers.abort_all();
    let delivered: u64 = received.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    let cpu = cpu_before
        .zip(server_cpu(peer))
        .map(|(before, after)| (after - before) * 1e6 / delivered.max(1) as f64);
    let expected = (messages * subscribers) as u64;
    if !all_received {
        failure.get_or_insert(format!(
            "deadline passed with {delivered} of {expected} delivered"
        ));
    }
    let end = if failure.is_none() {
        last_delivery.load(Ordering::Relaxed)
    } else {
        now_ns()
    };
    let seconds = (end.saturating_sub(started)).max(1) as f64 / 1e9;
    Ok(Throughput {
        deliveries_per_s: delivered as f64 / seconds,
        publishes_per_s: messages as f64 / (published_ns.max(1) as f64 / 1e9),
        server_cpu_us_per_delivery: cpu,
        incomplete: failure,
    })
}

/// CPU seconds used so far by the peer's server processes.
fn server_cpu(peer: &dyn PubSub) -> Option<f64> {
    let pids = peer.processes();
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|pid| crate::procs::cpu_seconds(*pid).ok())
        .sum()
}

#[derive(Debug)]
pub struct Latency {
    pub histogram: Histogram<u64>,
    pub incomplete: Option<String>,
}

/// Publishes at a fixed `rate` for `duration` to one subscriber; each payload
/// carries its send time, the subscriber records its age on arrival. Publishes
/// are issued on schedule whether or not earlier ones were acknowledged (up to
/// 1024 in flight), so a slow acknowledgement delays nothing that follows.
pub async fn latency(
    peer: &dyn PubSub,
    subject: &str,
    rate: u64,
    duration: Duration,
    deadline: Duration,
) -> anyhow::Result<Latency> {
    let deadline = Instant::now() + deadline;
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let connection = peer.connect(0).await?;
    let mut deliveries = connection.subscribe(subject).await?;
    let reader = tokio::spawn(async move {
        let _connection = connection;
        let mut histogram = histogram();
        let mut count = 0;
        while count < total {
            match deliveries.next().await {
                Some(Ok(payload)) => {
                    count += 1;
                    if let Some(age) = age_ns(&payload) {
                        histogram.saturating_record(age.max(1));
                    }
                }
                Some(Err(e)) => return (histogram, Some(format!("after {count}: {e:#}"))),
                None => return (histogram, Some(format!("ended after {count}"))),
            }
        }
        (histogram, None)
    });
    let publisher = peer.publisher().await?;
    let in_flight = Arc::new(Semaphore::new(1024));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while sent < due {
            let permit = in_flight.clone().acquire_owned().await?;
            let (publisher, failures, subject) =
                (publisher.clone(), failures.clone(), subject.to_string());
            let payload = stamped(now_ns());
            tokio::spawn(async move {
                if publisher.publish(&subject, payload).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
            sent += 1;
        }
        if Instant::now() > deadline {
            bail!("publisher could not keep the schedule");
        }
        // The pacing tick (the timer's resolution is 1 ms: at 10k/s, ~10 per tick).
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    publisher.flush().await?;
    let remaining = deadline.saturating_duration_since(Instant::now());
    let (histogram, mut incomplete) = match tokio::time::timeout(remaining, reader).await {
        Ok(joined) => joined.context("subscriber task")?,
        Err(_) => (
            histogram(),
            Some("deadline passed before every message arrived".into()),
        ),
    };
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        incomplete.get_or_insert(format!("{failed} publishes failed"));
    }
    Ok(Latency {
        histogram,
        incomplete,
    })
}

#[derive(Debug)]
pub struct RoundTrips {
    pub histogram: Histogram<u64>,
    pub per_second: f64,
}

/// `total` requests, `in_flight` at a time (each of `in_flight` tasks sends its
/// share one after another), after 100 unrecorded warm-up requests.
pub async fn round_trips(
    requester: Arc<dyn Requester>,
    total: usize,
    in_flight: usize,
    deadline: Duration,
) -> anyhow::Result<RoundTrips> {
    let deadline = Instant::now() + deadline;
    for _ in 0..100 {
        requester.request(stamped(now_ns())).await?;
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for task in 0..in_flight {
        let share = total / in_flight + usize::from(task < total % in_flight);
        let requester = requester.clone();
        tasks.spawn(async move {
            let mut histogram = histogram();
            for _ in 0..share {
                if Instant::now() > deadline {
                    bail!("deadline passed");
                }
                let sent = Instant::now();
                requester.request(stamped(now_ns())).await?;
                histogram.saturating_record((sent.elapsed().as_nanos() as u64).max(1));
            }
            Ok(histogram)
        });
    }
    let mut histogram = histogram();
    while let Some(done) = tasks.join_next().await {
        histogram.add(done.context("requester task")??)?;
    }
    Ok(RoundTrips {
        per_second: total as f64 / started.elapsed().as_secs_f64(),
        histogram,
    })
}

/// Opens `count` subscriptions, `per_connection` on each connection, at most 256
/// being opened at a time.
pub async fn open_subscriptions(
    peer: &dyn PubSub,
    subject: &str,
    first_connection: usize,
    count: usize,
    per_connection: usize,
) -> anyhow::Result<(Vec<Arc<dyn SubscriberConnection>>, Vec<Deliveries>)> {
    let connections_needed = count.div_ceil(per_connection);
    let connections: Vec<Arc<dyn SubscriberConnection>> =
        futures::stream::iter(0..connections_needed)
            .map(|i| peer.connect(first_connection + i))
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
    let subscriptions = futures::stream::iter(0..count)
        .map(|i| {
            let connection = connections[i / per_connection].clone();
            async move { connection.subscribe(subject).await }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((connections, subscriptions))
}

#[derive(Debug)]
pub struct Fanout {
    /// Time from the publish call to each subscriber's receipt, all rounds.
    pub histogram: Histogram<u64>,
    pub open_seconds: f64,
    /// CPU time of the server processes per round, in µs: the server's share of the
    /// time until all have it (the rest is the subscribers' clients, on the same
    /// cores).
    pub server_cpu_us_per_round: Option<f64>,
    pub incomplete: Option<String>,
}

/// `subscribers` subscriptions, `per_connection` per connection; `rounds` times,
/// one stamped message is published and the time until each subscriber has it is
/// recorded.
pub async fn fanout(
    peer: &dyn PubSub,
    subject: &str,
    subscribers: usize,
    per_connection: usize,
    rounds: usize,
    deadline: Duration,
) -> anyhow::Result<Fanout> {
    let deadline = Instant::now() + deadline;
    let opening = Instant::now();
    let (_connections, subscriptions) =
        open_subscriptions(peer, subject, 0, subscribers, per_connection).await?;
    let open_seconds = opening.elapsed().as_secs_f64();
    let (ages_tx, mut ages_rx) = mpsc::unbounded_channel();
    let mut readers = JoinSet::new();
    for mut deliveries in subscriptions {
        let ages_tx = ages_tx.clone();
        readers.spawn(async move {
            while let Some(Ok(payload)) = deliveries.next().await {
                let age = age_ns(&payload).unwrap_or(0);
                if ages_tx.send(age).is_err() {
                    return;
                }
            }
        });
    }
    drop(ages_tx);
    let publisher = peer.publisher().await?;
    let mut histogram = histogram();
    let mut incomplete = None;
    let cpu_before = server_cpu(peer);
    let mut completed = 0;
    'rounds: for round in 0..rounds {
        publisher.publish(subject, stamped(now_ns())).await?;
        publisher.flush().await?;
        for received in 0..subscribers {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, ages_rx.recv()).await {
                Ok(Some(age)) => histogram.saturating_record(age.max(1)),
                _ => {
                    incomplete = Some(format!(
                        "round {round}: {received} of {subscribers} received before the deadline"
                    ));
                    break 'rounds;
                }
            }
        }
        completed += 1;
    }
    let server_cpu_us_per_round = cpu_before
        .zip(server_cpu(peer))
        .filter(|_| completed > 0)
        .map(|(before, after)| (after - before) * 1e6 / completed as f64);
    readers.abort_all();
    Ok(Fanout {
        histogram,
        open_seconds,
        server_cpu_us_per_round,
        incomplete,
    })
}

/// Resident memory of `pid` after opening idle subscriptions, per subscription:
/// for each count in `counts` (ascending), `(count, KiB per subscription, total
/// KiB growth)` measured from a baseline with one warm subscription. A failure
/// part-way keeps the points measured before it, with the reason.
pub async fn idle_memory(
    peer: &dyn PubSub,
    pid: u32,
    subject: &str,
    counts: &[usize],
    per_connection: usize,
) -> (Vec<(usize, f64, f64)>, Option<String>) {
    let mut out = Vec::new();
    let failure = idle_memory_points(peer, pid, subject, counts, per_connection, &mut out)
        .await
        .err()
        .map(|e| format!("{e:#}"));
    (out, failure)
}

async fn idle_memory_points(
    peer: &dyn PubSub,
    pid: u32,
    subject: &str,
    counts: &[usize],
    per_connection: usize,
    out: &mut Vec<(usize, f64, f64)>,
) -> anyhow::Result<()> {
    // Warm the server's lazily allocated parts (runtime, first connection, one
    // delivery) so the baseline is a serving server.
    let warm = peer.connect(usize::MAX / 2).await?;
    let mut warm_deliveries = warm.subscribe(subject).await?;
    let publisher = peer.publisher().await?;
    publisher.publish(subject, stamped(now_ns())).await?;
    publisher.flush().await?;
    tokio::time::timeout(Duration::from_secs(10), warm_deliveries.next())
        .await
        .context("warm-up message did not arrive")?;
    let baseline = settled_rss(pid).await?;
    let mut held = Vec::new();
    let mut opened = 0;
    for &count in counts {
        let more = count.saturating_sub(opened);
        let (connections, subscriptions) =
            open_subscriptions(peer, subject, opened / per_connection, more, per_connection)
                .await
                .with_context(|| format!("opening subscriptions {opened}..{count}"))?;
        opened = count;
        held.push((connections, subscriptions));
        let grown = settled_rss(pid).await?.saturating_sub(baseline) as f64;
        out.push((count, grown / count as f64, grown));
    }
    Ok(())
}

/// RSS once the process has had a moment to finish what the last requests started
/// (read until two readings 200 ms apart agree within 1%).
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let mut last = crate::procs::rss_kib(pid)?;
    for _ in 0..10 {
        // A benchmark reading memory, not a test waiting on an event: there is
        // nothing to wait on but time.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = crate::procs::rss_kib(pid)?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}
