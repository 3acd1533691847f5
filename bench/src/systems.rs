//! The systems a run starts (the servers and sidecar it measures, NATS, Redis) and
//! the pub/sub peers built on them.

use crate::args::Args;
use crate::fleet::{Fleet, Target};
use crate::peer::PubSub;
use crate::procs::{self, Binary, IpcServer, NatsServer, RedisServer};
use crate::report::peers;
use crate::{nats, redis_peers};

/// The systems this run could start, or why not.
pub struct Systems {
    pub server: Result<Binary, String>,
    pub sidecar: Result<Binary, String>,
    pub nats: Result<NatsServer, String>,
    pub redis: Result<RedisServer, String>,
    /// `--peers`: empty for all.
    pub peers: Vec<String>,
    /// `--trace`: where the binaries send their spans.
    pub trace_sink: Option<ipc_testkit::otlp::OtlpReceiver>,
}

impl Systems {
    pub fn start(args: &Args) -> Self {
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

    /// Whether `--peers` asks for `key` (an empty list asks for all).
    pub fn wants(&self, key: &str) -> bool {
        self.peers.is_empty() || self.peers.iter().any(|p| p == key)
    }

    /// The NATS server as a pub/sub peer.
    pub fn nats_peer(&self) -> Available<Box<dyn PubSub>> {
        self.nats
            .as_ref()
            .map(|n| {
                Box::new(nats::Nats {
                    url: n.url(),
                    pid: n.process.pid(),
                }) as Box<dyn PubSub>
            })
            .map_err(Clone::clone)
    }

    /// A fresh embedded `ipc-server`.
    pub fn embedded(&self) -> Result<IpcServer, String> {
        let binary = self.server.as_ref().map_err(Clone::clone)?;
        IpcServer::start(binary, &self.server_limits()).map_err(|e| format!("{e:#}"))
    }

    /// Flags lifting the server's stream limit (10,000 by default), which the
    /// 10,000-subscriber workloads plus their warm-up stream would hit.
    pub fn server_limits(&self) -> Vec<&'static str> {
        match &self.server {
            Ok(binary) if procs::server_has_flag(binary, "--max-streams") => {
                vec!["--max-streams", "1000000"]
            }
            _ => Vec::new(),
        }
    }

    /// Two `ipc-server` replicas on the run's Redis.
    pub fn replicas(&self) -> Result<[IpcServer; 2], String> {
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

pub fn fleet_on(server: &IpcServer) -> Fleet {
    Fleet {
        subscribe_to: vec![Target::Tcp(server.grpc)],
        publish_to: Target::Tcp(server.grpc),
        pids: vec![server.process.pid()],
        publish_stream: false,
    }
}

/// A system under test, or why it is not there.
pub type Available<T> = Result<T, String>;

/// The pub/sub peers of workloads 1 and 2, in table order: each a system or the
/// reason it is not there. Processes live as long as the returned guard.
pub struct PubSubPeers {
    pub peers: Vec<(String, Available<Box<dyn PubSub>>)>,
    pub _servers: Vec<IpcServer>,
}

pub fn pubsub_peers(systems: &Systems, with_streams: bool) -> PubSubPeers {
    let mut peers_out: Vec<(String, Available<Box<dyn PubSub>>)> = Vec::new();
    let mut servers = Vec::new();
    let wanted = |key: &str| systems.wants(key);
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
    peers_out.push((peers::NATS.into(), systems.nats_peer()));
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
