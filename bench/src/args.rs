//! What a run takes: the flags, and the counts and durations they make.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// fleet-ipc benchmarks against NATS and Redis, all on loopback.
#[derive(Debug, Parser)]
#[command(name = "ipc-bench")]
pub struct Args {
    /// Smaller counts and shorter runs (under a minute): the smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the results as JSON [default: bench/results/latest.json].
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only these workloads (comma separated): throughput, latency, request,
    /// fanout, memory, sidecar, coord, durable, failover, gather (Gather and Rollout).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Subscribers in the fan-out workload [default: 10000, or 1000 with --quick].
    #[arg(long)]
    pub fanout: Option<usize>,
    /// Responders in the gather workload, each a case [default: 1000,10000, or 100
    /// with --quick].
    #[arg(long, value_delimiter = ',')]
    pub responders: Vec<usize>,
    /// Only these subscriber counts in the throughput workload (of 1, 10, 100).
    #[arg(long, value_delimiter = ',')]
    pub subscribers: Vec<usize>,
    /// The ipc-server binary to measure [default: target/release/ipc-server, else
    /// target/debug/ipc-server]. scripts/test sets IPC_SERVER_BIN to the debug build
    /// it just made, so the smoke run never measures a stale release binary.
    #[arg(long, env = "IPC_SERVER_BIN")]
    pub server: Option<PathBuf>,
    /// The ipc-sidecar binary [default: target/release/ipc-sidecar, else debug].
    #[arg(long, env = "IPC_SIDECAR_BIN")]
    pub sidecar: Option<PathBuf>,
    /// Only these pub/sub peers in workloads 1 and 2 (comma separated): fleet,
    /// fleet-publish, fleet-redis, fleet-redis-publish, nats, redis-pubsub,
    /// redis-xadd; `floor` for the bare gRPC broker's rows in workloads 1, 3, 4,
    /// 6 and 10 (left out when the list does not name it). For profiling one system.
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Multiplies message counts and durations (e.g. 5 to profile a longer run).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Tracing on: every ipc-server and ipc-sidecar the run starts exports all its
    /// spans (100% sampling) with --otlp-endpoint to an OTLP/gRPC receiver the bench
    /// runs, which counts them. Compare with a run without it (same binaries).
    #[arg(long)]
    pub trace: bool,
}

/// Counts and durations of one run.
pub struct Sizes {
    pub throughput_messages: [(usize, usize); 3],
    pub latency_rates: [u64; 2],
    pub latency_duration: Duration,
    pub sequential_requests: usize,
    pub concurrent_requests: usize,
    pub fanout_subscribers: usize,
    pub fanout_rounds: usize,
    pub memory_counts: Vec<usize>,
    pub deadline: Duration,
    pub throughput_only: Vec<usize>,
    /// Workload 8's broadcasts per throughput run (an XADD+WAIT waits for a replica).
    pub durable_messages: usize,
    /// Workload 9's killed primaries, each with a fresh cluster.
    pub failover_rounds: usize,
    /// Workload 10: responders per Gather case, and timed rounds of each.
    pub gather_responders: Vec<usize>,
    pub gather_rounds: usize,
    /// Workload 10: Rollouts as (members, wave_size), and timed rounds of each.
    pub rollout_cases: Vec<(usize, usize)>,
    pub rollout_rounds: usize,
}

impl Sizes {
    pub fn new(args: &Args) -> Self {
        let mut sizes = Self::unscaled(args);
        let scale = |n: usize| ((n as f64 * args.scale) as usize).max(1);
        for (_, messages) in &mut sizes.throughput_messages {
            *messages = scale(*messages);
        }
        sizes.latency_duration = sizes.latency_duration.mul_f64(args.scale);
        sizes.sequential_requests = scale(sizes.sequential_requests);
        sizes.concurrent_requests = scale(sizes.concurrent_requests);
        sizes.durable_messages = scale(sizes.durable_messages);
        sizes.gather_rounds = scale(sizes.gather_rounds);
        sizes.rollout_rounds = scale(sizes.rollout_rounds);
        sizes.deadline = sizes.deadline.mul_f64(args.scale.max(1.0));
        sizes
    }

    pub fn unscaled(args: &Args) -> Self {
        let responders_or = |default: Vec<usize>| {
            if args.responders.is_empty() {
                default
            } else {
                args.responders.clone()
            }
        };
        if args.quick {
            Self {
                throughput_messages: [(1, 10_000), (10, 3_000), (100, 500)],
                latency_rates: [1_000, 10_000],
                latency_duration: Duration::from_millis(600),
                sequential_requests: 500,
                concurrent_requests: 3_000,
                fanout_subscribers: args.fanout.unwrap_or(1_000),
                fanout_rounds: 3,
                memory_counts: vec![1_000],
                deadline: Duration::from_secs(15),
                throughput_only: args.subscribers.clone(),
                durable_messages: 300,
                failover_rounds: 1,
                gather_responders: responders_or(vec![100]),
                gather_rounds: 3,
                rollout_cases: vec![(100, 10), (20, 1)],
                rollout_rounds: 2,
            }
        } else {
            Self {
                throughput_messages: [(1, 200_000), (10, 50_000), (100, 10_000)],
                latency_rates: [1_000, 10_000],
                latency_duration: Duration::from_secs(5),
                sequential_requests: 5_000,
                concurrent_requests: 50_000,
                fanout_subscribers: args.fanout.unwrap_or(10_000),
                fanout_rounds: 10,
                memory_counts: vec![1_000, 10_000],
                deadline: Duration::from_secs(90),
                throughput_only: args.subscribers.clone(),
                durable_messages: 50_000,
                failover_rounds: 3,
                gather_responders: responders_or(vec![1_000, 10_000]),
                gather_rounds: 20,
                rollout_cases: vec![(100, 10), (20, 1)],
                rollout_rounds: 10,
            }
        }
    }
}

/// Subscriptions per HTTP/2 connection (or NATS connection) for fan-out and memory.
pub const STREAMS_PER_CONNECTION: usize = 100;
