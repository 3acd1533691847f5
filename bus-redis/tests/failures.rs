//! Replicas when Redis fails: unreachable, restarted with or without its data, or
//! slow. Nothing acknowledged is lost or reordered, loss is reported, and health
//! follows Redis.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use ipc_proto::pb::SubscribeRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_broadcasts_are_refused_and_streams_stay_open_then_all_resumes() {
    let mut redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut open = subscribe(&mut ca, channels("steady", &["news"])).await.0;
    let mut worker = subscribe(&mut ca, channels("worker", &[])).await.0;
    let before = broadcast(&mut cb, "news", "before")
        .await
        .expect("broadcast");
    assert_eq!(texts(&mut open, 1).await, ["before"]);

    redis.stop();
    for client in [&mut ca, &mut cb] {
        assert_code(
            broadcast(client, "news", "lost?").await,
            Code::Unavailable,
            "",
        );
    }
    a.wait_health(ServingStatus::NotServing).await;
    b.wait_health(ServingStatus::NotServing).await;
    // Still refused, not acknowledged, while it lasts.
    assert_code(
        broadcast(&mut ca, "news", "lost?").await,
        Code::Unavailable,
        "Redis",
    );

    redis.restart();
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;
    // SERVING means everything works again: broadcasts, requests across replicas.
    let after = broadcast(&mut cb, "news", "after")
        .await
        .expect("broadcast after the outage");
    let mut asker = cb.clone();
    let asked = tokio::spawn(async move { send(&mut asker, "worker", "status", 10_000).await });
    let request = next(&mut worker).await;
    reply(&mut cb, &request.reply_to, "back")
        .await
        .expect("reply through B");
    assert_eq!(text_of(&asked.await.unwrap().expect("reply")), "back");
    // The stream opened before the outage continues, without what was refused.
    assert_eq!(texts(&mut open, 1).await, ["after"]);

    // Nothing acknowledged was lost: resume from before everything, on B.
    let mut resumed = subscribe(
        &mut cb,
        SubscribeRequest {
            cursor: before.cursor.clone(),
            ..channels("late", &["news"])
        },
    )
    .await
    .0;
    let msg = next(&mut resumed).await;
    assert_eq!(
        (text_of(&msg), msg.cursor),
        ("after".to_string(), after.cursor)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_lost_its_data_resuming_subscribers_and_live_ones_are_told_of_the_gap() {
    let mut redis = redis();
    let a = replica(&redis.url(), "a");
    let mut ca = a.client().await;
    let mut live = subscribe(&mut ca, channels("live", &["news"])).await.0;
    let old = broadcast(&mut ca, "news", "old").await.expect("broadcast");
    assert_eq!(texts(&mut live, 1).await, ["old"]);

    redis.restart_empty();
    a.wait_health(ServingStatus::Serving).await;
    // The replica may learn that its connection broke from this very broadcast
    // (UNAVAILABLE, never a false acknowledgement): a client retries.
    eventually("a broadcast accepted by the empty Redis", || {
        let mut ca = ca.clone();
        async move { broadcast(&mut ca, "news", "new").await.ok() }
    })
    .await;

    // The live stream learns its log was lost, then continues on the new one.
    let gap = next(&mut live).await;
    assert_eq!(gap.op, "ipc:gap", "{gap:?}");
    // The same payload as every node's: the last position before the loss, and why.
    let data = ipc_proto::json::from_optional(gap.data.as_ref());
    assert_eq!(data["cursor"], old.cursor.as_str(), "{data}");
    assert!(
        data["reason"].as_str().is_some_and(|r| r.contains("lost")),
        "{data}"
    );
    assert_eq!(texts(&mut live, 1).await, ["new"]);

    // A subscriber resuming with a cursor of the lost log gets ipc:gap first.
    let mut resumed = subscribe(
        &mut ca,
        SubscribeRequest {
            cursor: old.cursor.clone(),
            ..channels("resumer", &["news"])
        },
    )
    .await
    .0;
    let gap = next(&mut resumed).await;
    assert_eq!(gap.op, "ipc:gap", "{gap:?}");
    let data = ipc_proto::json::from_optional(gap.data.as_ref());
    assert_eq!(data["cursor"], old.cursor.as_str(), "{data}");
    assert_eq!(texts(&mut resumed, 1).await, ["new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_slows_broadcasts_but_loses_and_reorders_nothing() {
    let redis = redis();
    let proxy = LatencyProxy::start(redis.port(), Duration::from_millis(15)).await;
    let slow = replica(&proxy.url(), "slow");
    let fast = replica(&redis.url(), "fast");
    let (mut c_slow, mut c_fast) = (slow.client().await, fast.client().await);
    let mut on_slow = subscribe(&mut c_slow, channels("s", &["ticks"])).await.0;
    let mut on_fast = subscribe(&mut c_fast, channels("f", &["ticks"])).await.0;

    const PUBLISHERS: usize = 4;
    const EACH: usize = 25;
    let publishers = (0..PUBLISHERS).map(|p| {
        let mut client = c_slow.clone();
        async move {
            for n in 0..EACH {
                broadcast(&mut client, "ticks", &format!("{p}:{n}"))
                    .await
                    .expect("broadcast");
            }
        }
    });
    join_all(publishers).await;

    let seen_slow = texts(&mut on_slow, PUBLISHERS * EACH).await;
    let seen_fast = texts(&mut on_fast, PUBLISHERS * EACH).await;
    assert_eq!(
        seen_slow, seen_fast,
        "the two replicas disagree on the order"
    );
    for p in 0..PUBLISHERS {
        let own: Vec<String> = seen_fast
            .iter()
            .filter(|t| t.starts_with(&format!("{p}:")))
            .cloned()
            .collect();
        let expected: Vec<String> = (0..EACH).map(|n| format!("{p}:{n}")).collect();
        assert_eq!(own, expected, "publisher {p}'s messages lost or reordered");
    }
    assert!(
        proxy.forwarded() > 0,
        "the slow replica did not go through the proxy"
    );
}

/// Issue 14: a replica that cannot reach Redis when it starts has no position in the
/// log. It must not serve a subscription from an unknown position: either it refuses
/// (UNAVAILABLE, retryable) or every entry acknowledged after `ipc:subscribed`
/// reaches the subscriber. Redis stays up for the rest of the fleet, so entries are
/// appended (through B) while A is still cut off: today's tail started at "the end
/// of the stream" when it first got through, and those entries were lost silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_never_reached_redis_serves_no_subscription_from_an_unknown_position() {
    let redis = redis();
    let b = replica(&redis.url(), "b");
    let mut cb = b.client().await;
    // A reaches Redis only through a proxy that does not listen yet.
    let gate = ipc_testkit::redis::free_port();
    let a = replica(&format!("redis://127.0.0.1:{gate}/"), "a");
    a.wait_health(ServingStatus::NotServing).await;
    let mut ca = a.client().await;

    let early = ca.subscribe(channels("early", &["news"])).await;
    let mut early = match early {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            assert_eq!(next(&mut stream).await.op, "ipc:subscribed");
            Some(stream)
        }
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status}");
            None
        }
    };
    let mut sent = Vec::new();
    for n in 0..5 {
        let body = format!("while A is cut off {n}");
        broadcast(&mut cb, "news", &body).await.expect("broadcast");
        sent.push(body);
    }
    let _proxy = LatencyProxy::start_on(gate, redis.port(), Duration::ZERO).await;
    a.wait_health(ServingStatus::Serving).await;
    broadcast(&mut cb, "news", "after")
        .await
        .expect("broadcast");
    sent.push("after".into());
    if let Some(stream) = early.as_mut() {
        let mut seen = Vec::new();
        while seen.last().is_none_or(|last| last != "after") {
            seen.push(text_of(&next(stream).await));
        }
        assert_eq!(
            seen, sent,
            "acknowledged entries lost by a stream served from an unknown position"
        );
    }
    // Once A knows where the log stands, it serves, and misses nothing either (its
    // tail may not have passed "after" yet: then that comes too, as its cursor says).
    let mut late = subscribe(&mut ca, channels("late", &["news"])).await.0;
    broadcast(&mut cb, "news", "later")
        .await
        .expect("broadcast");
    let first = text_of(&next(&mut late).await);
    if first == "after" {
        assert_eq!(texts(&mut late, 1).await, ["later"]);
    } else {
        assert_eq!(first, "later");
    }
}

/// A TCP proxy to a local port that delays every chunk by a fixed latency in each
/// direction, keeping the byte order.
struct LatencyProxy {
    port: u16,
    forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyProxy {
    async fn start(upstream: u16, latency: Duration) -> Self {
        Self::start_on(0, upstream, latency).await
    }

    /// A proxy listening on `port` (0: any free port).
    async fn start_on(port: u16, upstream: u16, latency: Duration) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy listener");
        let port = listener.local_addr().expect("proxy address").port();
        let forwarded = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = forwarded.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(delayed_copy(
                    client_read,
                    server_write,
                    latency,
                    counter.clone(),
                ));
                tokio::spawn(delayed_copy(
                    server_read,
                    client_write,
                    latency,
                    counter.clone(),
                ));
            }
        });
        Self {
            port,
            forwarded,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn forwarded(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each chunk leaving `latency` after it arrived.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    latency: Duration,
    forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            forwarded.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((tokio::time::Instant::now() + latency, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_down_serves_once_redis_is_up() {
    let mut redis = redis();
    redis.stop();
    let a = replica(&redis.url(), "a");
    a.wait_health(ServingStatus::NotServing).await;
    let mut ca = a.client().await;
    assert_code(
        broadcast(&mut ca, "news", "too early").await,
        Code::Unavailable,
        "",
    );

    redis.restart();
    a.wait_health(ServingStatus::Serving).await;
    let mut stream = subscribe(&mut ca, channels("s", &["news"])).await.0;
    broadcast(&mut ca, "news", "hello")
        .await
        .expect("broadcast");
    assert_eq!(texts(&mut stream, 1).await, ["hello"]);
}
