//! `ipc-bench`: fleet-ipc side by side with NATS and Redis, on loopback, in one run.
//!
//! It starts everything itself on free loopback ports — the workspace's
//! `ipc-server` (embedded bus; and two replicas on a private `redis-server` when the
//! server has `--redis`), an `ipc-sidecar` when built, a private `nats-server` and
//! `redis-server` — runs the workloads of issue 8 against each, prints one table
//! with absolute figures and ratios to fleet-ipc measured in the same run, checks
//! the targets, and writes the results as JSON. A peer that cannot run is a row
//! that says why, never a silent gap.
//!
//! ```text
//! cargo build --release -p ipc-server -p ipc-bench
//! target/release/ipc-bench            # full run (a few minutes)
//! target/release/ipc-bench --quick    # under a minute: the smoke test
//! ```
//!
//! # Layout
//! - [`args`]: the flags, and the counts and durations of a run they make.
//! - [`systems`]: the systems a run starts (servers, sidecar, NATS, Redis) and the
//!   pub/sub peers built on them.
//! - [`runs`]: each workload group run against every system, rows into the
//!   report: [`runs::pubsub`] (1, 2, 4, 5), [`runs::requests`] (3, 6, 7),
//!   [`runs::durability`] (8, 9), [`runs::fleet_operations`] (10).
//! - [`procs`]: the processes a run starts (found, ready, killed on drop).
//! - [`peer`]: what a workload needs from a system; [`fleet`], [`nats`],
//!   [`redis_peers`]: the systems.
//! - [`payload`]: 128-byte payloads stamped with their send time.
//! - [`workloads`]: throughput, latency, round trips, fan-out, idle memory.
//! - [`bare`]: a bare tonic server in a process of its own, the floor of a unary call.
//! - [`floor`]: a bare broker and relay of `ipc.v1.Ipc`, the floors of issue 18's targets.
//! - [`coord`]: Lock+Unlock and Limit through a replica vs directly on Redis.
//! - [`fleetops`]: Gather across many responders vs NATS scatter-gather, and a
//!   Rollout's own overhead per wave.
//! - [`durable`]: a TLS Redis with a replica, for broadcasts with and without
//!   `--redis-min-replicas 1` vs `XADD` and `XADD`+`WAIT` over TLS.
//! - [`failover`]: a killed Redis primary under Sentinel, the time until the next
//!   acknowledged broadcast beside Sentinel's own failover time.
//! - [`report`]: rows, the table, the targets, JSON.
//! - here: the run — the workloads asked for, in order, then the table and the JSON.

mod args;
mod bare;
mod coord;
mod durable;
mod failover;
mod fleet;
mod fleetops;
mod floor;
mod nats;
mod payload;
mod peer;
mod procs;
mod redis_peers;
mod report;
mod runs;
mod streams;
mod systems;
mod workloads;

use std::path::PathBuf;

use clap::Parser;

use crate::args::{Args, Sizes};
use crate::report::Report;
use crate::runs::{durability, fleet_operations, pubsub, requests};
use crate::systems::Systems;

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |kib| format!("{:.1} GiB", kib as f64 / 1048576.0),
        );
    format!("{cores} cores ({cpu}), {memory} RAM")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os(bare::SERVE_ENV).is_some() {
        return bare::serve().await;
    }
    if std::env::var_os(floor::BROKER_ENV).is_some() {
        return floor::serve_broker().await;
    }
    if let Ok(upstream) = std::env::var(floor::RELAY_ENV) {
        return floor::serve_relay(&upstream).await;
    }
    let args = Args::parse();
    let sizes = Sizes::new(&args);
    let wants = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let started = std::time::Instant::now();
    payload::now_ns();

    let systems = Systems::start(&args);
    let mut report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick: args.quick,
        machine: machine(),
        server_binary: match &systems.server {
            Ok(b) => format!("{} ({})", b.path.display(), b.profile),
            Err(e) => e.clone(),
        },
        sidecar_binary: match &systems.sidecar {
            Ok(b) => format!("{} ({})", b.path.display(), b.profile),
            Err(e) => e.clone(),
        },
        ..Report::default()
    };
    if wants("throughput") {
        pubsub::run_throughput(&mut report, &systems, &sizes).await;
    }
    if wants("latency") {
        pubsub::run_latency(&mut report, &systems, &sizes).await;
    }
    if wants("request") {
        requests::run_requests(&mut report, &systems, &sizes).await;
    }
    if wants("fanout") {
        pubsub::run_fanout(&mut report, &systems, &sizes).await;
    }
    if wants("memory") {
        pubsub::run_memory(&mut report, &systems, &sizes).await;
    }
    if wants("sidecar") {
        requests::run_sidecar(&mut report, &systems, &sizes).await;
    }
    if wants("coord") {
        requests::run_coordination(&mut report, &systems, &sizes).await;
    }
    if wants("durable") {
        durability::run_durable(&mut report, &systems, &sizes).await;
    }
    if wants("failover") {
        durability::run_failover(&mut report, &systems, &sizes).await;
    }
    if wants("gather") {
        fleet_operations::run_fleet_operations(&mut report, &systems, &sizes).await;
    }
    report.check_targets();

    println!(
        "ipc-bench{}{}: {}\nipc-server: {}\nipc-sidecar: {}",
        if args.quick { " --quick" } else { "" },
        if args.trace { " --trace" } else { "" },
        report.machine,
        report.server_binary,
        report.sidecar_binary
    );
    if let Some(sink) = &systems.trace_sink {
        println!(
            "tracing on: every ipc-server and ipc-sidecar exported its spans; the bench's OTLP receiver counted {} (so far: a batch may still be on its way)",
            sink.count()
        );
    }
    println!(
        "1 publisher with {} publishes in flight ({} on a Publish stream), at most {} messages ahead of the slowest subscriber; payloads of {} bytes; ratios are fleet-ipc's figure ÷ the peer's, same run.\n",
        workloads::PUBLISH_WINDOW,
        streams::STREAM_IN_FLIGHT,
        workloads::MAX_AHEAD,
        payload::PAYLOAD_BYTES
    );
    println!("{}", report.table());
    println!("{}", report.targets_table());
    println!("finished in {:.0} s", started.elapsed().as_secs_f64());

    let path = args
        .json
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results/latest.json"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("ipc-bench: results written to {}", path.display());
    if !report.failures.is_empty() {
        anyhow::bail!(
            "fleet-ipc answered wrongly (not a matter of speed):\n{}",
            report.failures.join("\n")
        );
    }
    Ok(())
}
