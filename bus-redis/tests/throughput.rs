//! A quick throughput and latency check to run by hand (not part of the suite;
//! `bench/` measures properly):
//!
//! ```text
//! cargo build --release -p ipc-server
//! cargo test -p ipc-bus-redis --release --test throughput -- --ignored --nocapture
//! ```
//!
//! Prints raw pipelined `XADD` throughput, Broadcast throughput of a server alone
//! (memory bus) and through one replica on the same Redis, and cross-replica
//! publish→deliver latency at 1,000 msg/s. Redis runs without persistence here, so
//! the numbers show the bus, not the disk (with `appendfsync always` every round trip
//! waits for an fsync).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures::future::join_all;
use ipc_testkit::ServerProcess;

const RAW_MESSAGES: usize = 200_000;
const BROADCASTS: usize = 100_000;
const PUBLISHERS: usize = 128;
const APPENDERS: usize = 1000;
const LATENCY_SAMPLES: usize = 2_000;

/// A replica on `redis_url`, or alone on the memory bus when `None`.
fn server(redis_url: Option<&str>, node: &str) -> ServerProcess {
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/ipc-server");
    let mut args = vec!["--node", node, "--retention", "100000"];
    if let Some(url) = redis_url {
        args.extend(["--redis", url]);
    }
    if release.exists() {
        ServerProcess::start_binary(&release, &args)
    } else {
        eprintln!("(target/release/ipc-server not built: measuring the debug build)");
        ServerProcess::start(&args)
    }
}

/// Broadcasts per second through `server` from [`PUBLISHERS`] concurrent callers.
async fn broadcast_rate(server: &ServerProcess) -> f64 {
    let client = server.client().await;
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
    (BROADCASTS / PUBLISHERS * PUBLISHERS) as f64 / started.elapsed().as_secs_f64()
}

/// A redis-server without persistence on a free port, killed on drop.
struct VolatileRedis {
    child: std::process::Child,
    port: u16,
}

impl VolatileRedis {
    fn start() -> Self {
        let port = ipc_testkit::redis::free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let redis = Self { child, port };
        // Ready once it answers PING.
        let client = redis::Client::open(redis.url()).expect("redis url");
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer PING");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for VolatileRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement to run by hand"]
async fn throughput_against_raw_redis() {
    let redis = VolatileRedis::start();
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

    // The bus itself, in process, without gRPC: concurrent appends batched by the writer.
    let bus = ipc_bus_redis::RedisBus::connect(ipc_bus_redis::RedisBusConfig {
        retention: 100_000,
        ..ipc_bus_redis::RedisBusConfig::new(redis.url())
    })
    .await
    .expect("redis bus");
    let bus: std::sync::Arc<dyn ipc_core::Bus> = std::sync::Arc::new(bus);
    let node = ipc_core::Node::new(
        ipc_core::NodeConfig {
            name: "inproc".into(),
            subscriber_queue: 16,
            ..Default::default()
        },
        bus.clone(),
    );
    let started = Instant::now();
    let appenders = (0..APPENDERS).map(|_| {
        let bus = bus.clone();
        let payload = payload.clone();
        async move {
            for _ in 0..RAW_MESSAGES / APPENDERS {
                let msg = ipc_proto::pb::Msg {
                    op: "note".into(),
                    channel: "bench".into(),
                    headers: [(
                        "p".to_string(),
                        String::from_utf8_lossy(&payload).into_owned(),
                    )]
                    .into(),
                    ..Default::default()
                };
                ipc_core::Bus::append(&*bus, msg).await.expect("append");
            }
        }
    });
    join_all(appenders).await;
    let appended = (RAW_MESSAGES / APPENDERS * APPENDERS) as f64 / started.elapsed().as_secs_f64();
    println!(
        "RedisBus::append in process:   {appended:>10.0} msg/s ({:.0}% of raw XADD, {APPENDERS} tasks)",
        100.0 * appended / raw
    );
    drop((node, bus));

    // The same load on a server alone (memory bus): the cost of gRPC and the node.
    let alone = broadcast_rate(&server(None, "alone")).await;
    println!("Broadcast, memory bus:         {alone:>10.0} msg/s ({PUBLISHERS} callers)");

    // Broadcast through one replica, many concurrent callers.
    let a = server(Some(&redis.url()), "a");
    let b = server(Some(&redis.url()), "b");
    let through = broadcast_rate(&a).await;
    println!(
        "Broadcast via one replica:     {through:>10.0} msg/s ({:.0}% of raw XADD, {:.0}% of the memory bus)",
        100.0 * through / raw,
        100.0 * through / alone
    );

    // Cross-replica latency: publish on B at 1,000 msg/s, receive on A.
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let mut stream = subscribe(&mut ca, channels("lat", &["lat"])).await.0;
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
