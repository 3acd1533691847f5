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
//! - [`procs`]: the processes a run starts (found, ready, killed on drop).
//! - [`peer`]: what a workload needs from a system; [`fleet`], [`nats`],
//!   [`redis_peers`]: the systems.
//! - [`payload`]: 128-byte payloads stamped with their send time.
//! - [`workloads`]: throughput, latency, round trips, fan-out, idle memory.
//! - [`coord`]: Lock+Unlock and Limit through a replica vs directly on Redis.
//! - [`fleetops`]: Gather across many responders vs NATS scatter-gather, and a
//!   Rollout's own overhead per wave.
//! - [`durable`]: a TLS Redis with a replica, for broadcasts with and without
//!   `--redis-min-replicas 1` vs `XADD` and `XADD`+`WAIT` over TLS.
//! - [`failover`]: a killed Redis primary under Sentinel, the time until the next
//!   acknowledged broadcast beside Sentinel's own failover time.
//! - [`report`]: rows, the table, the targets, JSON.

mod coord;
mod durable;
mod failover;
mod fleet;
mod fleetops;
mod nats;
mod payload;
mod peer;
mod procs;
mod redis_peers;
mod report;
mod streams;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::fleet::{Fleet, FleetRequests, Target};
use crate::peer::{PubSub, RequestReply};
use crate::procs::{Binary, IpcServer, NatsServer, RedisServer, Sidecar};
use crate::report::{Report, peers, workloads as names};
use crate::workloads::percentile_us;

/// fleet-ipc benchmarks against NATS and Redis, all on loopback.
#[derive(Debug, Parser)]
#[command(name = "ipc-bench")]
struct Args {
    /// Smaller counts and shorter runs (under a minute): the smoke test.
    #[arg(long)]
    quick: bool,
    /// Where to write the results as JSON [default: bench/results/latest.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these workloads (comma separated): throughput, latency, request,
    /// fanout, memory, sidecar, coord, durable, failover, gather (Gather and Rollout).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Subscribers in the fan-out workload [default: 10000, or 1000 with --quick].
    #[arg(long)]
    fanout: Option<usize>,
    /// Responders in the gather workload, each a case [default: 1000,10000, or 100
    /// with --quick].
    #[arg(long, value_delimiter = ',')]
    responders: Vec<usize>,
    /// Only these subscriber counts in the throughput workload (of 1, 10, 100).
    #[arg(long, value_delimiter = ',')]
    subscribers: Vec<usize>,
    /// The ipc-server binary to measure [default: target/release/ipc-server, else
    /// target/debug/ipc-server]. scripts/test sets IPC_SERVER_BIN to the debug build
    /// it just made, so the smoke run never measures a stale release binary.
    #[arg(long, env = "IPC_SERVER_BIN")]
    server: Option<PathBuf>,
    /// The ipc-sidecar binary [default: target/release/ipc-sidecar, else debug].
    #[arg(long, env = "IPC_SIDECAR_BIN")]
    sidecar: Option<PathBuf>,
    /// Only these pub/sub peers in workloads 1 and 2 (comma separated): fleet,
    /// fleet-publish, fleet-redis, fleet-redis-publish, nats, redis-pubsub,
    /// redis-xadd. For profiling one system.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Multiplies message counts and durations (e.g. 5 to profile a longer run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Tracing on: every ipc-server and ipc-sidecar the run starts exports all its
    /// spans (100% sampling) with --otlp-endpoint to an OTLP/gRPC receiver the bench
    /// runs, which counts them. Compare with a run without it (same binaries).
    #[arg(long)]
    trace: bool,
}

/// Counts and durations of one run.
struct Sizes {
    throughput_messages: [(usize, usize); 3],
    latency_rates: [u64; 2],
    latency_duration: Duration,
    sequential_requests: usize,
    concurrent_requests: usize,
    fanout_subscribers: usize,
    fanout_rounds: usize,
    memory_counts: Vec<usize>,
    deadline: Duration,
    throughput_only: Vec<usize>,
    /// Workload 8's broadcasts per throughput run (an XADD+WAIT waits for a replica).
    durable_messages: usize,
    /// Workload 9's killed primaries, each with a fresh cluster.
    failover_rounds: usize,
    /// Workload 10: responders per Gather case, and timed rounds of each.
    gather_responders: Vec<usize>,
    gather_rounds: usize,
    /// Workload 10: Rollouts as (members, wave_size), and timed rounds of each.
    rollout_cases: Vec<(usize, usize)>,
    rollout_rounds: usize,
}

impl Sizes {
    fn new(args: &Args) -> Self {
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

    fn unscaled(args: &Args) -> Self {
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
const STREAMS_PER_CONNECTION: usize = 100;

/// The systems this run could start, or why not.
struct Systems {
    server: Result<Binary, String>,
    sidecar: Result<Binary, String>,
    nats: Result<NatsServer, String>,
    redis: Result<RedisServer, String>,
    /// `--peers`: empty for all.
    peers: Vec<String>,
    /// `--trace`: where the binaries send their spans.
    trace_sink: Option<ipc_testkit::otlp::OtlpReceiver>,
}

impl Systems {
    fn start(args: &Args) -> Self {
        let trace_sink = args
            .trace
            .then(ipc_testkit::otlp::OtlpReceiver::start_counting);
        let traced = |binary: Result<Binary, String>| {
            binary.map(|mut binary| {
                if let Some(sink) = &trace_sink {
                    binary.extra = vec!["--otlp-endpoint".into(), sink.endpoint()];
                }
                binary
            })
        };
        let server = traced(match &args.server {
            Some(path) => Binary::given(path),
            None => procs::find_binary("ipc-server", "ipc-server"),
        });
        match &server {
            Ok(b) if b.profile == "debug" => eprintln!(
                "ipc-bench: WARNING: using a DEBUG ipc-server ({}): its numbers mean nothing; \
                 build with `cargo build --release -p ipc-server -p ipc-bench`",
                b.path.display()
            ),
            Ok(b) => eprintln!(
                "ipc-bench: ipc-server: {} ({})",
                b.path.display(),
                b.profile
            ),
            Err(e) => eprintln!("ipc-bench: {e}"),
        }
        let sidecar = traced(match &args.sidecar {
            Some(path) => Binary::given(path),
            None => procs::find_binary("ipc-sidecar", "ipc-sidecar"),
        });
        if let Ok(b) = &sidecar
            && b.profile == "debug"
        {
            eprintln!(
                "ipc-bench: WARNING: using a DEBUG ipc-sidecar ({}): build it with `cargo build --release -p ipc-sidecar`",
                b.path.display()
            );
        }
        Self {
            server,
            sidecar,
            peers: args.peers.clone(),
            trace_sink,
            nats: NatsServer::start().map_err(|e| format!("{e:#}")),
            redis: RedisServer::start().map_err(|e| format!("{e:#}")),
        }
    }

    /// A fresh embedded `ipc-server`.
    fn embedded(&self) -> Result<IpcServer, String> {
        let binary = self.server.as_ref().map_err(Clone::clone)?;
        IpcServer::start(binary, &self.server_limits()).map_err(|e| format!("{e:#}"))
    }

    /// Flags lifting the server's stream limit (10,000 by default), which the
    /// 10,000-subscriber workloads plus their warm-up stream would hit.
    fn server_limits(&self) -> Vec<&'static str> {
        match &self.server {
            Ok(binary) if procs::server_has_flag(binary, "--max-streams") => {
                vec!["--max-streams", "1000000"]
            }
            _ => Vec::new(),
        }
    }

    /// Two `ipc-server` replicas on the run's Redis.
    fn replicas(&self) -> Result<[IpcServer; 2], String> {
        let binary = self.server.as_ref().map_err(Clone::clone)?;
        let redis = self
            .redis
            .as_ref()
            .map_err(|e| format!("no redis-server: {e}"))?;
        if !procs::server_has_flag(binary, "--redis") {
            return Err("ipc-server has no --redis flag yet (Redis bus not wired)".into());
        }
        let url = redis.url();
        let limits = self.server_limits();
        let start = |node: &str| {
            let mut args = vec!["--redis", &url, "--node", node];
            args.extend(&limits);
            IpcServer::start(binary, &args).map_err(|e| format!("{e:#}"))
        };
        Ok([start("bench-a")?, start("bench-b")?])
    }
}

fn fleet_on(server: &IpcServer) -> Fleet {
    Fleet {
        subscribe_to: vec![Target::Tcp(server.grpc)],
        publish_to: Target::Tcp(server.grpc),
        pids: vec![server.process.pid()],
        publish_stream: false,
    }
}

/// A system under test, or why it is not there.
type Available<T> = Result<T, String>;

/// The pub/sub peers of workloads 1 and 2, in table order: each a system or the
/// reason it is not there. Processes live as long as the returned guard.
struct PubSubPeers {
    peers: Vec<(String, Available<Box<dyn PubSub>>)>,
    _servers: Vec<IpcServer>,
}

fn pubsub_peers(systems: &Systems, with_streams: bool) -> PubSubPeers {
    let mut peers_out: Vec<(String, Available<Box<dyn PubSub>>)> = Vec::new();
    let mut servers = Vec::new();
    let wanted = |key: &str| systems.peers.is_empty() || systems.peers.iter().any(|p| p == key);
    let any_of = |keys: &[&str]| keys.iter().any(|k| wanted(k));
    match any_of(&["fleet", "fleet-publish"]).then(|| systems.embedded()) {
        None => {}
        Some(Ok(server)) => {
            peers_out.push((peers::FLEET.into(), Ok(Box::new(fleet_on(&server)))));
            peers_out.push((
                peers::FLEET_PUBLISH.into(),
                Ok(Box::new(Fleet {
                    publish_stream: true,
                    ..fleet_on(&server)
                })),
            ));
            servers.push(server);
        }
        Some(Err(e)) => {
            peers_out.push((peers::FLEET_PUBLISH.into(), Err(e.clone())));
            peers_out.push((peers::FLEET.into(), Err(e)));
        }
    }
    match any_of(&["fleet-redis", "fleet-redis-publish"]).then(|| systems.replicas()) {
        None => {}
        Some(Ok([a, b])) => {
            // The publisher on replica a; subscribers alternate between a and b, so
            // half of the deliveries cross Redis to the other replica.
            let on_replicas = |publish_stream| Fleet {
                subscribe_to: vec![Target::Tcp(a.grpc), Target::Tcp(b.grpc)],
                publish_to: Target::Tcp(a.grpc),
                // The replicas and the Redis they share.
                pids: [a.process.pid(), b.process.pid()]
                    .into_iter()
                    .chain(systems.redis.as_ref().map(|r| r.process.pid()))
                    .collect(),
                publish_stream,
            };
            peers_out.push((peers::FLEET_REDIS.into(), Ok(Box::new(on_replicas(false)))));
            peers_out.push((
                peers::FLEET_REDIS_PUBLISH.into(),
                Ok(Box::new(on_replicas(true))),
            ));
            servers.extend([a, b]);
        }
        Some(Err(e)) => {
            peers_out.push((peers::FLEET_REDIS_PUBLISH.into(), Err(e.clone())));
            peers_out.push((peers::FLEET_REDIS.into(), Err(e)));
        }
    }
    peers_out.push((
        peers::NATS.into(),
        systems
            .nats
            .as_ref()
            .map(|n| {
                Box::new(nats::Nats {
                    url: n.url(),
                    pid: n.process.pid(),
                }) as Box<dyn PubSub>
            })
            .map_err(Clone::clone),
    ));
    let redis_client = || -> Result<(redis::Client, u32), String> {
        let server = systems.redis.as_ref().map_err(Clone::clone)?;
        let client = redis::Client::open(server.url()).map_err(|e| e.to_string())?;
        Ok((client, server.process.pid()))
    };
    peers_out.push((
        peers::REDIS_PUBSUB.into(),
        redis_client().map(|(client, pid)| {
            Box::new(redis_peers::RedisPubSub { client, pid }) as Box<dyn PubSub>
        }),
    ));
    if with_streams {
        peers_out.push((
            peers::REDIS_XADD.into(),
            redis_client().map(|(client, pid)| {
                Box::new(redis_peers::RedisStream {
                    client,
                    pid,
                    wait_replicas: 0,
                }) as Box<dyn PubSub>
            }),
        ));
    }
    let keys = [
        (peers::FLEET, "fleet"),
        (peers::FLEET_PUBLISH, "fleet-publish"),
        (peers::FLEET_REDIS, "fleet-redis"),
        (peers::FLEET_REDIS_PUBLISH, "fleet-redis-publish"),
        (peers::NATS, "nats"),
        (peers::REDIS_PUBSUB, "redis-pubsub"),
        (peers::REDIS_XADD, "redis-xadd"),
    ];
    peers_out.retain(|(name, _)| keys.iter().any(|(n, key)| n == name && wanted(key)));
    PubSubPeers {
        peers: peers_out,
        _servers: servers,
    }
}

/// A fresh subject per run, so runs never see each other's messages.
fn subject(kind: &str) -> String {
    format!("bench:{kind}{}", payload::now_ns())
}

fn note(incomplete: &Option<String>) -> Option<String> {
    incomplete.as_ref().map(|e| format!("INCOMPLETE: {e}"))
}

async fn run_throughput(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let peers_now = pubsub_peers(systems, true);
    for (subscribers, messages) in sizes.throughput_messages {
        if !sizes.throughput_only.is_empty() && !sizes.throughput_only.contains(&subscribers) {
            continue;
        }
        let case = if subscribers == 1 {
            "1 subscriber".to_string()
        } else {
            format!("{subscribers} subscribers")
        };
        for (name, peer) in &peers_now.peers {
            let peer = match peer {
                Ok(peer) => peer,
                Err(reason) => {
                    report.skip(names::THROUGHPUT, &case, name, reason.clone());
                    continue;
                }
            };
            eprintln!("ipc-bench: throughput {case}, {name}: {messages} messages");
            match workloads::throughput(
                peer.as_ref(),
                &subject("tp"),
                subscribers,
                messages,
                sizes.deadline,
            )
            .await
            {
                Ok(t) => {
                    let mut figures = vec![
                        ("deliveries/s", t.deliveries_per_s, "/s"),
                        ("publishes/s", t.publishes_per_s, "/s"),
                    ];
                    if let Some(cpu) = t.server_cpu_us_per_delivery {
                        figures.push(("server CPU/delivery", cpu, "µs"));
                    }
                    report.add(names::THROUGHPUT, &case, name, figures, note(&t.incomplete))
                }
                Err(e) => report.skip(names::THROUGHPUT, &case, name, format!("failed: {e:#}")),
            }
        }
    }
}

fn latency_figures(h: &hdrhistogram::Histogram<u64>) -> Vec<(&'static str, f64, &'static str)> {
    vec![
        ("p50", percentile_us(h, 50.0), "µs"),
        ("p99", percentile_us(h, 99.0), "µs"),
        ("p99.9", percentile_us(h, 99.9), "µs"),
    ]
}

async fn run_latency(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let peers_now = pubsub_peers(systems, false);
    for rate in sizes.latency_rates {
        let case = format!("{}k msg/s, 1 subscriber", rate / 1000);
        for (name, peer) in &peers_now.peers {
            let peer = match peer {
                Ok(peer) => peer,
                Err(reason) => {
                    report.skip(names::LATENCY, &case, name, reason.clone());
                    continue;
                }
            };
            eprintln!("ipc-bench: latency {case}, {name}");
            match workloads::latency(
                peer.as_ref(),
                &subject("lat"),
                rate,
                sizes.latency_duration,
                sizes.deadline,
            )
            .await
            {
                Ok(l) => report.add(
                    names::LATENCY,
                    &case,
                    name,
                    latency_figures(&l.histogram),
                    note(&l.incomplete),
                ),
                Err(e) => report.skip(names::LATENCY, &case, name, format!("failed: {e:#}")),
            }
        }
    }
}

/// Round trips sequentially and with 64 in flight, reported under `workload`.
async fn request_cases(
    report: &mut Report,
    workload: &str,
    case_prefix: &str,
    name: &str,
    system: Result<&dyn RequestReply, String>,
    sizes: &Sizes,
) {
    let cases = [
        ("sequential", 1, sizes.sequential_requests),
        ("64 in flight", 64, sizes.concurrent_requests),
    ];
    let requester = match system {
        Ok(system) => system.start().await.map_err(|e| format!("failed: {e:#}")),
        Err(reason) => Err(reason),
    };
    for (label, in_flight, total) in cases {
        let case = format!("{case_prefix}{label}");
        let requester = match &requester {
            Ok(r) => r.clone(),
            Err(reason) => {
                report.skip(workload, &case, name, reason.clone());
                continue;
            }
        };
        eprintln!("ipc-bench: requests {case}, {name}: {total}");
        match workloads::round_trips(requester, total, in_flight, sizes.deadline).await {
            Ok(r) => report.add(
                workload,
                &case,
                name,
                vec![
                    ("p50", percentile_us(&r.histogram, 50.0), "µs"),
                    ("p99", percentile_us(&r.histogram, 99.0), "µs"),
                    ("requests/s", r.per_second, "/s"),
                ],
                None,
            ),
            Err(e) => report.skip(workload, &case, name, format!("failed: {e:#}")),
        }
    }
}

async fn run_requests(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    match systems.embedded() {
        Ok(server) => {
            let system = FleetRequests {
                request_from: Target::Tcp(server.grpc),
                respond_on: Target::Tcp(server.grpc),
                serve: false,
            };
            request_cases(report, names::REQUEST, "", peers::FLEET, Ok(&system), sizes).await;
            let serve = FleetRequests {
                serve: true,
                ..system
            };
            let name = peers::FLEET_SERVE;
            request_cases(report, names::REQUEST, "", name, Ok(&serve), sizes).await;
            let ping = fleet::FleetPing {
                target: Target::Tcp(server.grpc),
            };
            request_cases(
                report,
                names::REQUEST,
                "",
                peers::FLEET_PING,
                Ok(&ping),
                sizes,
            )
            .await;
        }
        Err(e) => {
            for name in [peers::FLEET, peers::FLEET_SERVE, peers::FLEET_PING] {
                request_cases(report, names::REQUEST, "", name, Err(e.clone()), sizes).await;
            }
        }
    }
    match systems.replicas() {
        Ok([a, b]) => {
            let system = FleetRequests {
                request_from: Target::Tcp(a.grpc),
                respond_on: Target::Tcp(b.grpc),
                serve: false,
            };
            let name = "fleet-ipc+Redis (across replicas)";
            request_cases(report, names::REQUEST, "", name, Ok(&system), sizes).await;
        }
        Err(e) => {
            let name = "fleet-ipc+Redis (across replicas)";
            request_cases(report, names::REQUEST, "", name, Err(e), sizes).await;
        }
    }
    let nats_system = systems
        .nats
        .as_ref()
        .map(|n| nats::NatsRequests { url: n.url() });
    let system = nats_system
        .as_ref()
        .map(|s| s as &dyn RequestReply)
        .map_err(|e| (*e).clone());
    request_cases(
        report,
        names::REQUEST,
        "",
        peers::NATS_REQUEST,
        system,
        sizes,
    )
    .await;
}

async fn run_fanout(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let case = format!(
        "{} subscribers, {} per connection",
        thousands(sizes.fanout_subscribers),
        STREAMS_PER_CONNECTION
    );
    let fleet_server = systems.embedded();
    let fleet_peer = fleet_server
        .as_ref()
        .map(|s| Box::new(fleet_on(s)) as Box<dyn PubSub>)
        .map_err(Clone::clone);
    let nats_peer = systems
        .nats
        .as_ref()
        .map(|n| {
            Box::new(nats::Nats {
                url: n.url(),
                pid: n.process.pid(),
            }) as Box<dyn PubSub>
        })
        .map_err(Clone::clone);
    for (name, peer) in [(peers::FLEET, fleet_peer), (peers::NATS, nats_peer)] {
        let peer = match peer {
            Ok(peer) => peer,
            Err(reason) => {
                report.skip(names::FANOUT, &case, name, reason);
                continue;
            }
        };
        eprintln!("ipc-bench: fan-out {case}, {name}");
        match workloads::fanout(
            peer.as_ref(),
            &subject("fan"),
            sizes.fanout_subscribers,
            STREAMS_PER_CONNECTION,
            sizes.fanout_rounds,
            sizes.deadline,
        )
        .await
        {
            Ok(f) => {
                let mut text = format!(
                    "{} rounds; subscribing took {:.1} s",
                    sizes.fanout_rounds, f.open_seconds
                );
                if let Some(e) = &f.incomplete {
                    text = format!("INCOMPLETE: {e}; {text}");
                }
                let mut figures = vec![
                    ("p50", percentile_us(&f.histogram, 50.0), "µs"),
                    ("p99", percentile_us(&f.histogram, 99.0), "µs"),
                    ("max", f.histogram.max() as f64 / 1000.0, "µs"),
                ];
                if let Some(cpu) = f.server_cpu_us_per_round {
                    figures.push(("server CPU/fan-out", cpu, "µs"));
                }
                report.add(names::FANOUT, &case, name, figures, Some(text));
            }
            Err(e) => report.skip(names::FANOUT, &case, name, format!("failed: {e:#}")),
        }
    }
}

async fn run_memory(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let cases: Vec<String> = sizes
        .memory_counts
        .iter()
        .map(|n| format!("{} subscribers", thousands(*n)))
        .collect();
    // A fresh process per system, so the growth is the subscribers' alone.
    let fleet = systems.embedded();
    let nats_server = NatsServer::start().map_err(|e| format!("{e:#}"));
    // Each system with the pid whose memory is read.
    type Measured = Available<(Box<dyn PubSub>, u32)>;
    let runs: [(&str, Measured); 2] = [
        (
            peers::FLEET,
            fleet
                .as_ref()
                .map(|s| (Box::new(fleet_on(s)) as Box<dyn PubSub>, s.process.pid()))
                .map_err(Clone::clone),
        ),
        (
            peers::NATS,
            nats_server
                .as_ref()
                .map(|n| {
                    (
                        Box::new(nats::Nats {
                            url: n.url(),
                            pid: n.process.pid(),
                        }) as Box<dyn PubSub>,
                        n.process.pid(),
                    )
                })
                .map_err(Clone::clone),
        ),
    ];
    for (name, run) in runs {
        let (peer, pid) = match run {
            Ok(run) => run,
            Err(reason) => {
                for case in &cases {
                    report.skip(names::MEMORY, case, name, reason.clone());
                }
                continue;
            }
        };
        eprintln!("ipc-bench: idle memory, {name}");
        let (points, failure) = workloads::idle_memory(
            peer.as_ref(),
            pid,
            &subject("idle"),
            &sizes.memory_counts,
            STREAMS_PER_CONNECTION,
        )
        .await;
        let measured = points.len();
        for ((count, per, total), case) in points.into_iter().zip(&cases) {
            report.add(
                names::MEMORY,
                case,
                name,
                vec![
                    ("per subscriber", per, "KiB"),
                    ("total growth", total / 1024.0, "MiB"),
                ],
                Some(format!(
                    "RSS growth over {} connections",
                    count.div_ceil(STREAMS_PER_CONNECTION)
                )),
            );
        }
        if let Some(e) = failure {
            for case in &cases[measured..] {
                report.skip(names::MEMORY, case, name, format!("failed: {e}"));
            }
        }
    }
}

async fn run_sidecar(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let request_case = "request, ";
    let latency_case = "broadcast latency 1k msg/s";
    let skip_all = |report: &mut Report, name: &str, reason: &str| {
        for case in [
            format!("{request_case}sequential"),
            format!("{request_case}64 in flight"),
            latency_case.to_string(),
        ] {
            report.skip(names::SIDECAR_HOP, &case, name, reason.to_string());
        }
    };
    let server = match systems.embedded() {
        Ok(server) => server,
        Err(e) => {
            skip_all(report, peers::DIRECT, &e);
            skip_all(report, peers::SIDECAR, &e);
            return;
        }
    };
    let sidecar = match &systems.sidecar {
        Ok(binary) => Sidecar::start(binary, &server.url()).map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("sidecar: {e}")),
    };
    let direct = Target::Tcp(server.grpc);
    let variants = [
        (peers::DIRECT, Ok(direct.clone())),
        (
            peers::SIDECAR,
            sidecar
                .as_ref()
                .map(|s| Target::Unix(s.socket.clone()))
                .map_err(Clone::clone),
        ),
    ];
    for (name, target) in variants {
        let target = match target {
            Ok(target) => target,
            Err(reason) => {
                skip_all(report, name, &reason);
                continue;
            }
        };
        // The requester (or subscriber) goes through `target`; the other side is
        // connected directly to the server, as a process in another pod would be.
        let system = FleetRequests {
            request_from: target.clone(),
            respond_on: direct.clone(),
            serve: false,
        };
        request_cases(
            report,
            names::SIDECAR_HOP,
            request_case,
            name,
            Ok(&system),
            sizes,
        )
        .await;
        let peer = Fleet {
            subscribe_to: vec![target],
            publish_to: direct.clone(),
            pids: vec![server.process.pid()],
            publish_stream: false,
        };
        eprintln!("ipc-bench: sidecar {latency_case}, {name}");
        match workloads::latency(
            &peer,
            &subject("side"),
            1_000,
            sizes.latency_duration,
            sizes.deadline,
        )
        .await
        {
            Ok(l) => report.add(
                names::SIDECAR_HOP,
                latency_case,
                name,
                latency_figures(&l.histogram),
                note(&l.incomplete),
            ),
            Err(e) => report.skip(
                names::SIDECAR_HOP,
                latency_case,
                name,
                format!("failed: {e:#}"),
            ),
        }
    }
}

/// Workload 7: Lock+Unlock and Limit through one Redis-backed replica vs the same
/// operations directly on its Redis.
async fn run_coordination(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let replica = systems.replicas().map(|[a, _b]| a);
    let redis = systems
        .redis
        .as_ref()
        .map_err(|e| format!("no redis-server: {e}"))
        .and_then(|r| redis::Client::open(r.url()).map_err(|e| e.to_string()));
    for (prefix, operation) in [
        ("Lock+Unlock, ", coord::Operation::LockUnlock),
        ("Limit, ", coord::Operation::Limit),
    ] {
        let fleet = replica.as_ref().map(|server| coord::FleetCoord {
            target: Target::Tcp(server.grpc),
            operation,
        });
        let system = fleet
            .as_ref()
            .map(|s| s as &dyn RequestReply)
            .map_err(|e| (*e).clone());
        let name = peers::FLEET_REDIS_REPLICA;
        request_cases(report, names::COORD, prefix, name, system, sizes).await;
        let direct = redis.as_ref().map(|client| coord::RedisCoord {
            client: client.clone(),
            operation,
        });
        let system = direct
            .as_ref()
            .map(|s| s as &dyn RequestReply)
            .map_err(|e| (*e).clone());
        let name = peers::REDIS_DIRECT;
        request_cases(report, names::COORD, prefix, name, system, sizes).await;
    }
}

/// Workload 8: broadcast throughput (1 subscriber) and latency (1k msg/s) on a TLS
/// Redis with one replica: two replicas without and with `--redis-min-replicas 1`,
/// and `XADD`, `XADD`+`WAIT 1 0` over TLS on the same Redis.
async fn run_durable(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let pair = durable::TlsPair::start()
        .await
        .map_err(|e| format!("TLS Redis pair: {e:#}"));
    let binary = systems.server.as_ref().map_err(Clone::clone);
    let limits = systems.server_limits();
    let mut servers = Vec::new();
    let mut systems_now: Vec<(&str, Available<Box<dyn PubSub>>)> = Vec::new();
    for (name, min_replicas) in [
        (peers::FLEET_REDIS_TLS, 0),
        (peers::FLEET_REDIS_TLS_WAIT, 1),
    ] {
        let started = match (&pair, &binary) {
            (Ok(pair), Ok(binary)) => pair
                .servers(binary, min_replicas, &limits)
                .map_err(|e| format!("{e:#}")),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        systems_now.push((
            name,
            started.map(|[a, b]| {
                let fleet = Fleet {
                    subscribe_to: vec![Target::Tcp(b.grpc)],
                    publish_to: Target::Tcp(a.grpc),
                    pids: [a.process.pid(), b.process.pid()]
                        .into_iter()
                        .chain(pair.as_ref().ok().and_then(|p| p.primary.pid()))
                        .collect(),
                    publish_stream: false,
                };
                servers.extend([a, b]);
                Box::new(fleet) as Box<dyn PubSub>
            }),
        ));
    }
    for (name, wait_replicas) in [(peers::REDIS_XADD_TLS, 0), (peers::REDIS_XADD_WAIT_TLS, 1)] {
        let stream = pair.as_ref().map_err(Clone::clone).and_then(|pair| {
            Ok(Box::new(redis_peers::RedisStream {
                client: pair.client().map_err(|e| format!("{e:#}"))?,
                pid: pair.primary.pid().unwrap_or_default(),
                wait_replicas,
            }) as Box<dyn PubSub>)
        });
        systems_now.push((name, stream));
    }
    let messages = sizes.durable_messages;
    let rate = sizes.latency_rates[0];
    let throughput_case = "throughput, 1 subscriber";
    let latency_case = format!("latency at {}k msg/s, 1 subscriber", rate / 1000);
    for (name, system) in &systems_now {
        let system = match system {
            Ok(system) => system,
            Err(reason) => {
                report.skip(names::DURABLE, throughput_case, name, reason.clone());
                report.skip(names::DURABLE, &latency_case, name, reason.clone());
                continue;
            }
        };
        eprintln!("ipc-bench: durable {throughput_case}, {name}: {messages} messages");
        match workloads::throughput(
            system.as_ref(),
            &subject("tls"),
            1,
            messages,
            sizes.deadline,
        )
        .await
        {
            Ok(t) => report.add(
                names::DURABLE,
                throughput_case,
                name,
                vec![
                    ("deliveries/s", t.deliveries_per_s, "/s"),
                    ("publishes/s", t.publishes_per_s, "/s"),
                ],
                note(&t.incomplete),
            ),
            Err(e) => report.skip(
                names::DURABLE,
                throughput_case,
                name,
                format!("failed: {e:#}"),
            ),
        }
        eprintln!("ipc-bench: durable {latency_case}, {name}");
        match workloads::latency(
            system.as_ref(),
            &subject("tls-lat"),
            rate,
            sizes.latency_duration,
            sizes.deadline,
        )
        .await
        {
            Ok(l) => report.add(
                names::DURABLE,
                &latency_case,
                name,
                latency_figures(&l.histogram),
                note(&l.incomplete),
            ),
            Err(e) => report.skip(
                names::DURABLE,
                &latency_case,
                name,
                format!("failed: {e:#}"),
            ),
        }
    }
    drop(servers);
}

/// Workload 9: a killed Redis primary under Sentinel — the time from the kill to
/// the first acknowledged broadcast, beside Sentinel's `+odown` and
/// `+switch-master`, one fresh cluster per round.
async fn run_failover(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let rounds = sizes.failover_rounds;
    let case = |n: usize| format!("SIGKILL of the primary, round {n} of {rounds}");
    let binary = match &systems.server {
        Ok(binary) if procs::server_has_flag(binary, "--redis-sentinel") => binary,
        Ok(_) => {
            let reason = "ipc-server has no --redis-sentinel flag";
            for n in 1..=rounds {
                report.skip(names::FAILOVER, &case(n), peers::FLEET_SENTINEL, reason);
            }
            return;
        }
        Err(e) => {
            for n in 1..=rounds {
                report.skip(names::FAILOVER, &case(n), peers::FLEET_SENTINEL, e.clone());
            }
            return;
        }
    };
    let limits = systems.server_limits();
    for n in 1..=rounds {
        eprintln!("ipc-bench: failover {}", case(n));
        match failover::round(binary, &limits).await {
            Ok(round) => {
                let micros = |d: Duration| d.as_secs_f64() * 1e6;
                let mut figures = Vec::new();
                if let Some(odown) = round.odown {
                    figures.push(("Sentinel +odown", micros(odown), "µs"));
                }
                figures.extend([
                    ("Sentinel +switch-master", micros(round.switch_master), "µs"),
                    (
                        "first acknowledged broadcast",
                        micros(round.first_ack),
                        "µs",
                    ),
                    (
                        "ack after +switch-master",
                        (round.first_ack.as_secs_f64() - round.switch_master.as_secs_f64()) * 1e3,
                        "ms",
                    ),
                ]);
                report.add(
                    names::FAILOVER,
                    &case(n),
                    peers::FLEET_SENTINEL,
                    figures,
                    Some(format!(
                        "times from the kill; down-after-milliseconds 1000; a refused broadcast is sent again after {} ms",
                        failover::RETRY_PAUSE.as_millis()
                    )),
                );
            }
            Err(e) => report.skip(
                names::FAILOVER,
                &case(n),
                peers::FLEET_SENTINEL,
                format!("failed: {e:#}"),
            ),
        }
    }
}

/// Workload 10 (issue 13): Gather across many responders answering on their Serve
/// streams vs NATS scatter-gather, then a Rollout's own overhead per wave. Each
/// case gets a fresh embedded server. A wrong ledger fails the run.
async fn run_fleet_operations(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let record_failure = |report: &mut Report, case: &str, name: &str, e: anyhow::Error| {
        if let Some(wrong) = e.downcast_ref::<fleetops::WrongLedger>() {
            report.fail(names::FLEET_OPS, case, name, wrong.to_string());
        } else {
            report.skip(names::FLEET_OPS, case, name, format!("failed: {e:#}"));
        }
    };
    let rounds_figures = |r: &fleetops::Rounds| {
        let mut figures = vec![
            ("p50", percentile_us(&r.histogram, 50.0), "µs"),
            ("p99", percentile_us(&r.histogram, 99.0), "µs"),
            ("max", r.histogram.max() as f64 / 1000.0, "µs"),
        ];
        if let Some(cpu) = r.server_cpu_us_per_round {
            figures.push(("server CPU/round", cpu, "µs"));
        }
        figures
    };
    for &responders in &sizes.gather_responders {
        let case = format!(
            "Gather, {} responders, {} per connection",
            thousands(responders),
            STREAMS_PER_CONNECTION
        );
        let rounds = sizes.gather_rounds;
        match systems.embedded() {
            Err(reason) => report.skip(names::FLEET_OPS, &case, peers::FLEET_GATHER, reason),
            Ok(server) => {
                eprintln!("ipc-bench: {case}, {}", peers::FLEET_GATHER);
                match fleetops::fleet_gather(
                    &Target::Tcp(server.grpc),
                    server.process.pid(),
                    responders,
                    STREAMS_PER_CONNECTION,
                    rounds,
                    sizes.deadline,
                )
                .await
                {
                    Ok(r) => report.add(
                        names::FLEET_OPS,
                        &case,
                        peers::FLEET_GATHER,
                        rounds_figures(&r),
                        Some(format!(
                            "{rounds} rounds, every ledger all OK; opening took {:.1} s",
                            r.open_seconds
                        )),
                    ),
                    Err(e) => record_failure(report, &case, peers::FLEET_GATHER, e),
                }
            }
        }
        match &systems.nats {
            Err(reason) => report.skip(names::FLEET_OPS, &case, peers::NATS_SCATTER, reason),
            Ok(nats_server) => {
                eprintln!("ipc-bench: {case}, {}", peers::NATS_SCATTER);
                match fleetops::nats_scatter_gather(
                    &nats_server.url(),
                    nats_server.process.pid(),
                    responders,
                    STREAMS_PER_CONNECTION,
                    rounds,
                    sizes.deadline,
                )
                .await
                {
                    Ok(r) => report.add(
                        names::FLEET_OPS,
                        &case,
                        peers::NATS_SCATTER,
                        rounds_figures(&r),
                        Some(format!(
                            "{rounds} rounds, every reply once; subscribing took {:.1} s",
                            r.open_seconds
                        )),
                    ),
                    Err(e) => report.skip(
                        names::FLEET_OPS,
                        &case,
                        peers::NATS_SCATTER,
                        format!("failed: {e:#}"),
                    ),
                }
            }
        }
    }
    for &(members, wave_size) in &sizes.rollout_cases {
        let waves = members.div_ceil(wave_size);
        let case = format!("Rollout, {members} members, wave_size {wave_size} ({waves} waves)");
        let name = peers::FLEET_ROLLOUT;
        let server = match systems.embedded() {
            Ok(server) => server,
            Err(reason) => {
                report.skip(names::FLEET_OPS, &case, name, reason);
                continue;
            }
        };
        eprintln!("ipc-bench: {case}, {name}");
        match fleetops::fleet_rollout(
            &Target::Tcp(server.grpc),
            members,
            wave_size,
            STREAMS_PER_CONNECTION,
            sizes.rollout_rounds,
            sizes.deadline,
        )
        .await
        {
            Ok(r) => {
                let rollout = percentile_us(&r.rollout, 50.0);
                let per_wave = rollout / f64::from(r.waves.max(1));
                let gather = percentile_us(&r.gather_of_wave, 50.0);
                report.add(
                    names::FLEET_OPS,
                    &case,
                    name,
                    vec![
                        ("Rollout p50", rollout, "µs"),
                        ("per wave", per_wave, "µs"),
                        ("one Gather of a wave p50", gather, "µs"),
                        ("overhead per wave", per_wave - gather, "µs"),
                    ],
                    Some(format!(
                        "{} Rollouts, {} Gathers of {wave_size} members in between; every ledger all OK",
                        sizes.rollout_rounds,
                        r.gather_of_wave.len()
                    )),
                );
            }
            Err(e) => record_failure(report, &case, name, e),
        }
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

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
        run_throughput(&mut report, &systems, &sizes).await;
    }
    if wants("latency") {
        run_latency(&mut report, &systems, &sizes).await;
    }
    if wants("request") {
        run_requests(&mut report, &systems, &sizes).await;
    }
    if wants("fanout") {
        run_fanout(&mut report, &systems, &sizes).await;
    }
    if wants("memory") {
        run_memory(&mut report, &systems, &sizes).await;
    }
    if wants("sidecar") {
        run_sidecar(&mut report, &systems, &sizes).await;
    }
    if wants("coord") {
        run_coordination(&mut report, &systems, &sizes).await;
    }
    if wants("durable") {
        run_durable(&mut report, &systems, &sizes).await;
    }
    if wants("failover") {
        run_failover(&mut report, &systems, &sizes).await;
    }
    if wants("gather") {
        run_fleet_operations(&mut report, &systems, &sizes).await;
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
        "1 publisher with {} publishes in flight, at most {} messages ahead of the slowest subscriber; payloads of {} bytes; ratios are fleet-ipc's figure ÷ the peer's, same run.\n",
        workloads::PUBLISH_WINDOW,
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
