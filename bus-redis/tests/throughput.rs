//! A quick throughput and latency check to run by hand (not part of the suite;
//! `bench/` measures properly):
//!
//! ```text
//! cargo build --release -p ipc-server
//! cargo test -p ipc-bus-redis --release --test throughput -- --ignored --nocapture
//! ```
//!
//! Prints raw pipelined `XADD` throughput, Broadcast throughput through one replica
//! on the same Redis, and cross-replica publish→deliver latency at 1,000 msg/s.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures::future::join_all;
use ipc_testkit::ServerProcess;

const RAW_MESSAGES: usize = 200_000;
const BROADCASTS: usize = 100_000;
const PUBLISHERS: usize = 128;
const LATENCY_SAMPLES: usize = 2_000;

fn server(redis_url: &str, node: &str) -> ServerProcess {
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ipc-server");
    let args = [
        "--redis",
        redis_url,
        "--node",
        node,
        "--retention",
        "100000",
    ];
    if release.exists() {
        ServerProcess::start_binary(&release, &args)
    } else {
        eprintln!("(target/release/ipc-server not built: measuring the debug build)");
        ServerProcess::start(&args)
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement to run by hand"]
async fn throughput_against_raw_redis() {
    let redis = redis();
    let payload = vec![b'x'; 200];

    // Raw Redis: pipelined XADD, 1,000 per round trip, like a tuned client would.
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let started = Instant::now();
    for _ in 0..RAW_MESSAGES / 1000 {
        let mut pipe = redis::pipe();
        for _ in 0..1000 {
            pipe.cmd("XADD")
                .arg("raw:log")
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("m")
                .arg(&payload)
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("xadd");
    }
    let raw = RAW_MESSAGES as f64 / started.elapsed().as_secs_f64();
    println!("raw pipelined XADD:            {raw:>10.0} msg/s");

    // Broadcast through one replica, many concurrent callers.
    let a = server(&redis.url(), "a");
    let b = server(&redis.url(), "b");
    let client = a.client().await;
    let body = "x".repeat(200);
    let started = Instant::now();
    let publishers = (0..PUBLISHERS).map(|_| {
        let mut client = client.clone();
        let body = body.clone();
        async move {
            for _ in 0..BROADCASTS / PUBLISHERS {
                broadcast(&mut client, "bench", &body)
                    .await
                    .expect("broadcast");
            }
        }
    });
    join_all(publishers).await;
    let through = (BROADCASTS / PUBLISHERS * PUBLISHERS) as f64 / started.elapsed().as_secs_f64();
    println!(
        "Broadcast via one replica:     {through:>10.0} msg/s ({:.0}% of raw XADD, {PUBLISHERS} callers)",
        100.0 * through / raw
    );

    // Cross-replica latency: publish on B at 1,000 msg/s, receive on A.
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let mut stream = subscribe(&mut ca, channels("lat", &["lat"])).await;
    let epoch = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(LATENCY_SAMPLES);
        for _ in 0..LATENCY_SAMPLES {
            let msg = next(&mut stream).await;
            let sent: u64 = text_of(&msg).parse().expect("send time");
            let now = epoch.elapsed().as_micros() as u64;
            latencies.push(now.saturating_sub(sent));
        }
        latencies
    });
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..LATENCY_SAMPLES {
        tick.tick().await;
        let sent = epoch.elapsed().as_micros().to_string();
        broadcast(&mut cb, "lat", &sent).await.expect("broadcast");
    }
    let mut latencies = receiver.await.expect("receiver");
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "cross-replica publish→deliver: p50 {} µs, p99 {} µs, max {} µs (1,000 msg/s)",
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    );
}
