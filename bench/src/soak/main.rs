//! `ipc-soak`: a chaos soak of fleet-ipc with real processes on loopback.
//!
//! It starts a `redis-server` (AOF, `appendfsync always`), `ipc-server` replicas on
//! it, `ipc-sidecar`s upstream of all replicas, subscribers of both kinds (direct
//! ones that resume on the next replica with their cursor, and pod processes behind
//! the sidecars), and a publisher that retries each broadcast with an idempotency
//! key until it is acknowledged. Meanwhile it injects faults from a seed — single
//! ones (SIGKILL/SIGTERM/SIGSTOP of a replica, SIGKILL of Redis, SIGKILL/SIGTERM of
//! a sidecar) and overlapping ones (a replica or a sidecar restarted during a Redis
//! outage, Redis restarted while a replica is paused). At the end it reads the log
//! back from Redis and judges every subscriber: silent loss, announced loss and
//! whether it was justified, duplicates, order, hung streams; and the recovery time
//! after each fault. It exits non-zero on any silent loss, unjustified gap,
//! duplicate, reorder or hung stream.
//!
//! ```text
//! cargo build -p ipc-server -p ipc-sidecar -p ipc-bench
//! target/debug/ipc-soak --seed 7 --duration 60     # the short run of scripts/test
//! scripts/soak --duration 600 --rate 300           # a long one (release build)
//! ```
//!
//! # Layout
//! - `cluster`: the processes, on fixed ports and socket paths.
//! - `actors`: the publisher and the subscribers, recording what they see.
//! - `faults`: the faults, drawn from the seed.
//! - `verdict`: judging the records.

mod actors;
mod cluster;
mod faults;
mod verdict;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::actors::{Pos, Published, Seen, SubscriberLog, Upstream};
use crate::cluster::{Redis, Replica, Sidecar};
use crate::faults::{Rng, Targets};

/// A chaos soak of fleet-ipc: faults, single and overlapping, under load.
#[derive(Debug, Parser)]
#[command(name = "ipc-soak")]
struct Args {
    /// Seed of the fault plan and timings (a seed replays the same plan).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of fault injection (every kind of fault comes once first).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value_t = 2)]
    sidecars: usize,
    /// Direct subscribers (on the replicas, resuming on the next one).
    #[arg(long, default_value_t = 6)]
    direct: usize,
    /// Subscribers behind the sidecars (spread over the pods).
    #[arg(long, default_value_t = 4)]
    local: usize,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Where `ipc-server` and `ipc-sidecar` are [default: next to this binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn find_redis() -> anyhow::Result<PathBuf> {
    ipc_testkit::find_program("redis-server")
        .context("redis-server is not installed (apt-get install -y redis-server)")
}

/// Polls `done` every 100 ms until true or `limit` passed; whether it became true.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

/// One `XRANGE` page: entry ids and their field/value pairs.
type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// The log as Redis holds it at the end: position → number.
async fn read_log(url: &str) -> anyhow::Result<BTreeMap<Pos, u64>> {
    let client = redis::Client::open(url)?;
    // Generous bounds: the machine may be loaded, and the log is read in big pages.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(60)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting to Redis to read the log back")?;
    let epoch: Option<String> = redis::cmd("GET")
        .arg("soak:epoch")
        .query_async(&mut conn)
        .await?;
    let epoch = epoch.context("no epoch in Redis")?;
    let epoch = u64::from_str_radix(&epoch, 16).context("the epoch in Redis is not hex")?;
    let mut log = BTreeMap::new();
    let mut from = "-".to_string();
    loop {
        let page: Entries = redis::cmd("XRANGE")
            .arg("soak:log")
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .context("reading the log back from Redis")?;
        let Some((last, _)) = page.last() else { break };
        from = format!("({last}");
        for (id, fields) in page {
            for msg in ipc_bus_redis::entry_messages(epoch, &id, fields) {
                let Some(pos) = Pos::parse(&msg.cursor) else {
                    continue;
                };
                if let Some(prost_types::value::Kind::NumberValue(n)) =
                    msg.data.as_ref().and_then(|d| d.kind.as_ref())
                {
                    log.insert(pos, *n as u64);
                }
            }
        }
    }
    Ok(log)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the soak binary's directory")?
            .to_path_buf(),
    };
    let (server_bin, sidecar_bin) = (bin_dir.join("ipc-server"), bin_dir.join("ipc-sidecar"));
    for bin in [&server_bin, &sidecar_bin] {
        if !bin.is_file() {
            bail!(
                "{} not found: cargo build -p ipc-server -p ipc-sidecar",
                bin.display()
            );
        }
    }
    let mut redis = Redis::start(&find_redis()?)?;
    let mut replicas = (0..args.replicas.max(2))
        .map(|i| Replica::new(&server_bin, &format!("r{i}"), &redis.url()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for replica in &mut replicas {
        replica.launch()?;
    }
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    let sockets = tempfile::tempdir()?;
    let mut sidecars: Vec<Sidecar> = (0..args.sidecars.max(1))
        .map(|i| {
            Sidecar::new(
                &sidecar_bin,
                &format!("pod{i}"),
                sockets.path(),
                &urls.join(","),
            )
        })
        .collect();
    for sidecar in &mut sidecars {
        sidecar.launch()?;
    }

    let (stop_tx, stop) = watch::channel(false);
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..args.direct + args.local {
        let direct = i < args.direct;
        let log = Arc::new(SubscriberLog {
            name: format!("{}{i}", if direct { "direct" } else { "local" }),
            kind: if direct { "direct" } else { "sidecar" },
            seen: Mutex::new(Vec::new()),
        });
        let upstream = if direct {
            let mut order = urls.clone();
            order.rotate_left(i % urls.len());
            Upstream::Replicas(order)
        } else {
            Upstream::Socket(sidecars[i % sidecars.len()].socket.clone())
        };
        tasks.push(tokio::spawn(actors::subscriber(
            log.clone(),
            upstream,
            stop.clone(),
        )));
        logs.push(log);
    }
    let all_subscribed = wait_until(Duration::from_secs(60), || {
        logs.iter().all(|l| {
            l.seen
                .lock()
                .iter()
                .any(|s| matches!(s, Seen::Subscribed { .. }))
        })
    })
    .await;
    if !all_subscribed {
        bail!("not every subscriber could subscribe within 60 s");
    }
    let published = Arc::new(Mutex::new(Published::default()));
    let (pub_stop_tx, pub_stop) = watch::channel(false);
    let publishing = tokio::spawn(actors::publisher(
        urls.clone(),
        args.rate,
        published.clone(),
        pub_stop,
    ));

    let mut rng = Rng::new(args.seed);
    let plan = faults::plan(&mut rng, 10_000);
    let began = Instant::now();
    let mut injected = Vec::new();
    for fault in plan {
        if began.elapsed() >= Duration::from_secs(args.duration) {
            break;
        }
        tokio::time::sleep(rng.millis(1000, 3000)).await;
        let mut targets = Targets {
            redis: &mut redis,
            replicas: &mut replicas,
            sidecars: &mut sidecars,
        };
        let done = faults::inject(fault, &mut targets, &mut rng).await?;
        println!(
            "fault {:>3}: {:<45} {:>6} ms",
            injected.len() + 1,
            fault.name(),
            done.healed.duration_since(done.started).as_millis()
        );
        injected.push(done);
    }
    debug_assert!(redis.is_up() && replicas.iter().all(Replica::is_up));
    debug_assert!(sidecars.iter().all(Sidecar::is_up));
    // Settle: a few more seconds of traffic with everything up, then the last one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = pub_stop_tx.send(true);
    let _ = publishing.await;
    let published = std::mem::take(&mut *published.lock());
    let last = published
        .acks
        .last()
        .map(|a| a.number)
        .context("nothing acknowledged")?;
    wait_until(Duration::from_secs(30), || {
        logs.iter().all(|l| {
            l.seen
                .lock()
                .iter()
                .any(|s| matches!(s, Seen::Message { number, .. } if *number == last))
        })
    })
    .await;
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }

    let log = read_log(&redis.url()).await?;
    let in_redis: HashSet<Pos> = log.keys().copied().collect();
    // The audit judges gaps by what Redis still holds: a log read back wrong (a
    // format it does not know) would excuse every gap, so it must find the last
    // acknowledged message, published after every fault.
    let acked_in_log = published
        .acks
        .iter()
        .filter(|a| log.get(&a.pos) == Some(&a.number))
        .count();
    let last_in_log = published
        .acks
        .iter()
        .any(|a| a.number == last && log.get(&a.pos) == Some(&a.number));
    anyhow::ensure!(
        last_in_log,
        "the log read back from Redis ({} messages) lacks the last acknowledged message {last}: \
         the audit cannot judge gaps",
        log.len()
    );
    let verdicts: Vec<verdict::Verdict> = logs
        .iter()
        .map(|l| verdict::judge(l, &published.acks, &in_redis, last))
        .collect();
    let refs: Vec<&SubscriberLog> = logs.iter().map(|l| l.as_ref()).collect();
    let recoveries = verdict::recoveries(&injected, &published.acks, &refs);
    let stored_twice = verdict::stored_twice(&log);
    println!(
        "the log read back from Redis: {} messages, {acked_in_log} of the {} acknowledged",
        log.len(),
        published.acks.len()
    );
    let keys_honoured = published.acks.iter().any(|a| a.duplicate);

    println!();
    println!(
        "{:<10} {:<8} {:>8} {:>8} {:>7} {:>9} {:>5} {:>11} {:>5} {:>7} {:>5} {:>8}",
        "subscriber",
        "kind",
        "expected",
        "received",
        "silent",
        "announced",
        "gaps",
        "unjustified",
        "dups",
        "reorder",
        "hung",
        "reconn"
    );
    for v in &verdicts {
        println!(
            "{:<10} {:<8} {:>8} {:>8} {:>7} {:>9} {:>5} {:>11} {:>5} {:>7} {:>5} {:>8}",
            v.name,
            v.kind,
            v.expected,
            v.received,
            v.silent_loss,
            v.announced_loss,
            v.gaps,
            v.unjustified_gaps,
            v.duplicates,
            v.reordered,
            v.hung,
            v.reconnects
        );
        for reason in &v.gap_reasons {
            println!("           gap: {reason}");
        }
        if v.hung {
            println!("           last error: {}", v.last_error);
        }
    }
    let overlapping = injected.iter().filter(|f| f.fault.overlapping()).count();
    let p = |q| verdict::percentile(&recoveries, q).as_millis();
    println!();
    println!(
        "seed {} · {} faults ({} overlapping) in {:.0} s · {} acknowledged, {} retries, {} abandoned",
        args.seed,
        injected.len(),
        overlapping,
        began.elapsed().as_secs_f64(),
        published.acks.len(),
        published.retries,
        published.abandoned
    );
    println!(
        "entries stored twice by retries: {stored_twice} (idempotency keys {})",
        if keys_honoured {
            "honoured"
        } else {
            "not seen honoured in this run"
        }
    );
    println!(
        "recovery after a fault (first message acknowledged after it, per subscriber): p50 {} ms, p99 {} ms, max {} ms",
        p(50.0),
        p(99.0),
        recoveries.last().map_or(0, |d| d.as_millis())
    );
    if let Some(path) = &args.json {
        let counts: BTreeMap<&str, usize> = faults::ALL
            .iter()
            .map(|f| (f.name(), injected.iter().filter(|i| i.fault == *f).count()))
            .collect();
        let json = serde_json::json!({
            "seed": args.seed,
            "faults": counts,
            "acknowledged": published.acks.len(),
            "retries": published.retries,
            "stored_twice": stored_twice,
            "recovery_ms": {"p50": p(50.0), "p99": p(99.0)},
            "subscribers": verdicts,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    let failed: Vec<&str> = verdicts
        .iter()
        .filter(|v| v.failed())
        .map(|v| v.name.as_str())
        .collect();
    let unkeyed_duplicates = keys_honoured && stored_twice > 0;
    if !failed.is_empty() || unkeyed_duplicates {
        println!("FAILED: {}", failed.join(", "));
        std::process::exit(1);
    }
    println!("OK: no silent loss, no unjustified gap, no duplicate, no reorder, no hung stream");
    Ok(())
}
