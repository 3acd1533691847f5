//! `ipc-server`, the fleet-ipc control plane, as a library: the binary only parses
//! flags, starts a [`Server`] and waits for a signal, so tests start real servers on
//! `127.0.0.1:0` exactly as production does.
//!
//! # Layout
//! - [`Config`]: flags and `IPC_*` environment variables; the node's flags the
//!   sidecar takes too are `ipc_core::node::args::NodeArgs`, flattened in.
//! - [`Server`]: the node on its bus, bound listeners; [`Server::serve`] runs the
//!   core's [`Mount`] (`ipc.v1.Ipc`, health, reflection v1 and v1alpha, as every node
//!   serves them) on TCP and `/metrics` until shutdown.
//! - [`security`]: tokens, TLS/mTLS, the loopback-unless-authenticated rule, limits.
//! - [`transport`]: connection caps and deadlines, request-body limits, HTTP/2 bounds.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ipc_core::memory::{MemoryBus, Retention};
use ipc_core::mount::{Listener, Mount, MountOptions};
use ipc_core::node::args::NodeArgs;
use ipc_core::{Bus, Node, NodeConfig};
use tokio::net::TcpListener;

pub mod security;
pub mod transport;

/// This binary, as its metrics describe it.
const BINARY: ipc_core::metrics::Binary = ipc_core::metrics::Binary {
    role: ipc_core::metrics::Role::Server,
    version: ipc_build_info::VERSION,
    commit: ipc_build_info::COMMIT,
};

/// The fleet-ipc control plane: one gRPC API to broadcast to a channel, ask one
/// process and wait for its reply, and subscribe.
#[derive(Debug, Clone, Parser)]
#[command(name = "ipc-server", version)]
pub struct Config {
    /// Address for gRPC (ipc.v1.Ipc, health, reflection).
    #[arg(long, env = "IPC_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Address for Prometheus metrics at /metrics.
    #[arg(long, env = "IPC_METRICS_LISTEN", default_value = "127.0.0.1:9700")]
    pub metrics_listen: SocketAddr,
    /// Address of the admin console, a web page (off when absent). Beyond loopback it
    /// needs --tokens (people log in with a token) or --insecure; HTTPS with --tls-cert.
    #[arg(long, env = "IPC_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Default app id, for channels with a leading ':' from callers that send no `ipc-app` metadata.
    #[arg(long, env = "IPC_APP", default_value = "app")]
    pub app: String,
    /// This node's name (in `ipc:subscribed`, Members, logs); default: hostname plus a random suffix.
    #[arg(long, env = "IPC_NODE")]
    pub node: Option<String>,
    /// Messages kept in the log for subscribers that resume with a cursor. With
    /// --redis: the Redis log's entries, each the messages of one write round trip
    /// (so at least this many messages).
    #[arg(long, env = "IPC_RETENTION", default_value_t = 10_000)]
    pub retention: usize,
    /// Bytes of memory the memory log keeps at most (the oldest messages go first);
    /// a message counts what it takes in memory, not its encoded size.
    #[arg(long, env = "IPC_RETENTION_BYTES", default_value_t = 64 << 20)]
    pub retention_bytes: usize,
    /// `--max-msg-bytes`, `--subscriber-queue`, `--max-timeout-ms`, `--grace-ms`: as
    /// the sidecar takes them.
    #[command(flatten)]
    pub node_args: NodeArgs,
    /// Bytes of memory queued per subscriber before it is cut off as too slow (it can resume).
    #[arg(long, env = "IPC_SUBSCRIBER_QUEUE_BYTES", default_value_t = NodeConfig::default().subscriber_queue_bytes)]
    pub subscriber_queue_bytes: usize,
    /// Bytes of memory all subscriber queues may hold together (each message once);
    /// over it the subscriber holding the most is cut off.
    #[arg(long, env = "IPC_MAX_QUEUED_BYTES", default_value_t = NodeConfig::default().max_queued_bytes)]
    pub max_queued_bytes: usize,
    /// How long a Broadcast's idempotency `key` is remembered (fleet-wide with Redis, per app): `600s`, `10m`, `1h`, `500ms`.
    #[arg(long, env = "IPC_DEDUP_WINDOW", default_value = ipc_core::node::args::default_dedup_window(), value_parser = ipc_core::publish::parse_window)]
    pub dedup_window: Duration,
    #[command(flatten)]
    pub security: security::SecurityConfig,
    #[command(flatten)]
    pub limits: security::LimitConfig,
    #[command(flatten)]
    pub transport: transport::TransportConfig,
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long, env = "IPC_LOG_JSON")]
    pub log_json: bool,
    /// OTLP/gRPC collector to export trace spans to (`http://HOST:4317`); off when
    /// absent. The W3C `traceparent` of callers is passed on either way.
    #[arg(long, env = "IPC_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Redis shared by the replicas (`redis://[user:password@]host:port[/db]`, or
    /// `rediss://…` for TLS); without it the server runs alone on the memory bus.
    #[arg(long, env = "IPC_REDIS", group = "redis_target")]
    pub redis: Option<String>,
    /// Redis through Sentinel instead of --redis: `HOST:PORT[,HOST:PORT…]` of the
    /// Sentinels, asked for the primary of --redis-master; every connection follows
    /// a failover. The TLS flags apply to the Sentinels and the primary alike.
    #[arg(
        long,
        env = "IPC_REDIS_SENTINEL",
        group = "redis_target",
        value_delimiter = ',',
        requires = "redis_master"
    )]
    pub redis_sentinel: Vec<String>,
    /// The name Sentinel knows the primary by (its `sentinel monitor NAME …`).
    #[arg(long, env = "IPC_REDIS_MASTER", requires = "redis_sentinel")]
    pub redis_master: Option<String>,
    /// ACL user of the Redis primary (with --redis-sentinel, where there is no URL;
    /// with --redis, instead of a user in the URL — a URL naming another user is an
    /// error). Its password: --redis-password-file. Default: Redis's default user.
    #[arg(long, env = "IPC_REDIS_USERNAME", requires = "redis_target")]
    pub redis_username: Option<String>,
    /// File holding the Redis password (of the ACL user, or `requirepass`), read
    /// once at start, trailing newline ignored; it wins over a password in the URL.
    /// Never logged.
    #[arg(long, env = "IPC_REDIS_PASSWORD_FILE", requires = "redis_target")]
    pub redis_password_file: Option<std::path::PathBuf>,
    /// File holding the Sentinels' own password (their `requirepass`, or the password
    /// of --redis-sentinel-username), read once at start, trailing newline ignored.
    /// Never logged. The primary's credentials are --redis-username/--redis-password-file.
    #[arg(
        long,
        env = "IPC_REDIS_SENTINEL_PASSWORD_FILE",
        requires = "redis_sentinel"
    )]
    pub redis_sentinel_password_file: Option<std::path::PathBuf>,
    /// ACL user of the Sentinels (its password: --redis-sentinel-password-file);
    /// default: the Sentinels' default user.
    #[arg(
        long,
        env = "IPC_REDIS_SENTINEL_USERNAME",
        requires_all = ["redis_sentinel", "redis_sentinel_password_file"]
    )]
    pub redis_sentinel_username: Option<String>,
    /// PEM certificate authority that signed Redis's certificate (TLS); the system's
    /// roots when absent.
    #[arg(long, env = "IPC_REDIS_CA", requires = "redis_target")]
    pub redis_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for Redis with `tls-auth-clients yes` (mutual TLS);
    /// with --redis-key.
    #[arg(long, env = "IPC_REDIS_CERT", requires_all = ["redis_target", "redis_key"])]
    pub redis_cert: Option<std::path::PathBuf>,
    /// PEM private key of --redis-cert.
    #[arg(long, env = "IPC_REDIS_KEY", requires_all = ["redis_target", "redis_cert"])]
    pub redis_key: Option<std::path::PathBuf>,
    /// Redis replicas that must hold a broadcast (and a lock, an operation's ledger)
    /// before it is acknowledged (`WAIT N`), so a Redis failover loses nothing
    /// acknowledged; falling short answers UNAVAILABLE. 0: the primary's word is enough.
    #[arg(long, env = "IPC_REDIS_MIN_REPLICAS", default_value_t = 0)]
    pub redis_min_replicas: u32,
    /// Prefix of every Redis key and channel, so several deployments can share one Redis.
    #[arg(long, env = "IPC_REDIS_PREFIX", default_value = "ipc")]
    pub redis_prefix: String,
    /// Bound on one Redis call, in milliseconds: a broadcast while Redis is unreachable fails within it.
    #[arg(long, env = "IPC_REDIS_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_timeout_ms: u64,
    /// How long a replica's members outlive its last heartbeat in Redis, in milliseconds.
    #[arg(long, env = "IPC_PRESENCE_TTL_MS", default_value_t = 15_000)]
    pub presence_ttl_ms: u64,
    #[command(flatten)]
    pub injector: InjectorConfig,
}

/// The Kubernetes sidecar-injection webhook (`POST /inject` over HTTPS), off unless
/// `--injector-listen` is given.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectorConfig {
    /// Address of the HTTPS admission webhook (e.g. 0.0.0.0:8443); off when absent.
    #[arg(long, env = "IPC_INJECTOR_LISTEN", requires_all = ["injector_cert", "injector_key"])]
    pub injector_listen: Option<SocketAddr>,
    /// PEM certificate (chain) of the webhook; re-read when it changes.
    #[arg(long, env = "IPC_INJECTOR_CERT")]
    pub injector_cert: Option<std::path::PathBuf>,
    /// PEM private key of the webhook.
    #[arg(long, env = "IPC_INJECTOR_KEY")]
    pub injector_key: Option<std::path::PathBuf>,
    /// What the injected sidecar looks like.
    #[command(flatten)]
    pub sidecar: ipc_inject::InjectConfig,
}

/// The admin console's listener and how it serves, once bound.
struct Admin {
    listener: TcpListener,
    /// Certificate and key with --tls-cert: the console is served over HTTPS.
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    requires_token: bool,
    bus: &'static str,
}

/// The injector's listener and what it serves, once bound.
struct Injector {
    listener: TcpListener,
    config: InjectorConfig,
}

/// The bus under the node: Redis with `--redis`, else the memory bus.
async fn build_bus(config: &Config) -> anyhow::Result<Arc<dyn Bus>> {
    let target = match (&config.redis, &config.redis_master) {
        (Some(url), _) => ipc_bus_redis::Target::Url(url.clone()),
        (None, Some(master)) => ipc_bus_redis::Target::Sentinel {
            sentinels: config.redis_sentinel.clone(),
            master: master.clone(),
        },
        (None, None) => {
            return Ok(Arc::new(MemoryBus::new(Retention {
                messages: config.retention.max(1),
                bytes: config.retention_bytes,
            })));
        }
    };
    let password = read_secret(
        "--redis-password-file",
        config.redis_password_file.as_deref(),
    )?;
    let sentinel_password = read_secret(
        "--redis-sentinel-password-file",
        config.redis_sentinel_password_file.as_deref(),
    )?;
    let bus = ipc_bus_redis::RedisBus::connect(ipc_bus_redis::RedisBusConfig {
        target,
        username: config.redis_username.clone(),
        password,
        sentinel_auth: ipc_bus_redis::SentinelAuth {
            username: config.redis_sentinel_username.clone(),
            password: sentinel_password,
        },
        tls: ipc_bus_redis::TlsFiles {
            ca: config.redis_ca.clone(),
            cert: config.redis_cert.clone(),
            key: config.redis_key.clone(),
        },
        min_replicas: config.redis_min_replicas,
        prefix: config.redis_prefix.clone(),
        retention: config.retention.max(1),
        presence_ttl: Duration::from_millis(config.presence_ttl_ms),
        command_timeout: Duration::from_millis(config.redis_timeout_ms.max(1)),
    })
    .await
    .context("--redis")?;
    Ok(Arc::new(bus))
}

/// A password from the file a flag names: read once, trailing newline ignored, never
/// empty.
fn read_secret(
    flag: &str,
    path: Option<&std::path::Path>,
) -> anyhow::Result<Option<ipc_bus_redis::Secret>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {flag} {}", path.display()))?;
    let password = text.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(!password.is_empty(), "{flag} {} is empty", path.display());
    Ok(Some(ipc_bus_redis::Secret::new(password)))
}

impl Config {
    fn node_config(&self) -> NodeConfig {
        let mut node = self.node_args.node_config(
            // A replica is named after its host (the sidecar after its pod).
            self.node
                .clone()
                .unwrap_or_else(ipc_core::node::default_node_name),
            Some(self.app.clone()).filter(|a| !a.is_empty()),
        );
        node.subscriber_queue_bytes = self.subscriber_queue_bytes;
        node.max_queued_bytes = self.max_queued_bytes;
        node.dedup_window = self.dedup_window;
        self.limits.apply(&mut node);
        node
    }
}

pub use ipc_core::logging::init as init_logging;

/// A started control-plane node with its listeners bound.
pub struct Server {
    node: Arc<Node>,
    grpc: TcpListener,
    metrics: TcpListener,
    grace: Duration,
    security: security::Security,
    max_connection_streams: u32,
    transport: transport::TransportConfig,
    injector: Option<Injector>,
    admin: Option<Admin>,
    /// Span export (`--otlp-endpoint`); flushed when serving ends.
    telemetry: Option<ipc_core::telemetry::ExportGuard>,
}

impl Server {
    /// Builds the node on its bus and binds the listeners.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let security = security::Security::load(&config.security, config.listen)?;
        let bus = build_bus(&config).await?;
        let node = Node::new(config.node_config(), bus);
        let telemetry = config
            .otlp_endpoint
            .as_deref()
            .map(|endpoint| {
                ipc_core::telemetry::start(
                    endpoint,
                    ipc_core::telemetry::ServiceInfo {
                        name: "ipc-server",
                        instance: node.name().to_string(),
                        version: ipc_build_info::VERSION,
                    },
                )
            })
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding gRPC listener {}", config.listen))?;
        let metrics = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("binding metrics listener {}", config.metrics_listen))?;
        let injector = match config.injector.injector_listen {
            Some(addr) => Some(Injector {
                listener: TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding injector listener {addr}"))?,
                config: config.injector.clone(),
            }),
            None => None,
        };
        let admin = match config.admin_listen {
            Some(addr) => {
                security::check_admin_listen(&config.security, addr)?;
                Some(Admin {
                    listener: TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding admin console listener {addr}"))?,
                    tls: config
                        .security
                        .tls_cert
                        .clone()
                        .zip(config.security.tls_key.clone()),
                    requires_token: config.security.tokens.is_some(),
                    bus: if config.redis.is_some() || config.redis_master.is_some() {
                        "redis"
                    } else {
                        "memory"
                    },
                })
            }
            None => None,
        };
        Ok(Self {
            node,
            grpc,
            metrics,
            grace: config.node_args.grace(),
            security,
            max_connection_streams: config.limits.max_connection_streams,
            transport: config.transport.clone(),
            injector,
            admin,
            telemetry,
        })
    }

    /// The tokens file's identity (with `--tokens`), for reloading it.
    pub fn tokens(&self) -> Option<Arc<ipc_core::auth::TokenIdentity>> {
        self.security.tokens.clone()
    }

    /// How often the tokens file is checked for changes (`--tokens-watch`).
    pub fn tokens_watch(&self) -> Option<Duration> {
        self.security.tokens_watch
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The injector webhook's address, when `--injector-listen` is given.
    pub fn injector_addr(&self) -> Option<SocketAddr> {
        self.injector
            .as_ref()
            .and_then(|i| i.listener.local_addr().ok())
    }

    /// The admin console's address, when `--admin-listen` is given.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|a| a.listener.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting, ends subscriber
    /// streams with UNAVAILABLE (clients reconnect elsewhere with their cursor) and
    /// waits at most the grace period for open calls.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            node,
            grpc,
            metrics,
            grace,
            security,
            max_connection_streams,
            transport,
            injector,
            admin,
            telemetry,
        } = self;
        let console = admin.map(|admin| {
            let console = ipc_console::Console::new(
                node.clone(),
                ipc_console::ConsoleOptions {
                    identity: security.identity.clone(),
                    requires_token: admin.requires_token,
                    bus: admin.bus,
                    https: admin.tls.is_some(),
                },
            );
            let task = tokio::spawn(serve_console(console.clone(), admin));
            (console, task)
        });
        let mount = Mount::new(
            node.clone(),
            MountOptions {
                identity: security.identity,
                tls: security.tls,
                max_connection_streams,
                grace,
                connections: transport.connection_limits(),
                body_timeout: Duration::from_millis(transport.body_timeout_ms),
                max_request_buffer_bytes: transport.max_request_buffer_bytes,
            },
        )?;
        // Stops accepting at `shutdown`, ends the streams and drains open calls.
        let grpc_server = mount.serve(vec![Listener::Tcp(grpc)], shutdown);

        let metrics_node = node.clone();
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let node = metrics_node.clone();
                async move { ipc_core::metrics::scrape(&node, &BINARY) }
            }),
        );
        let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let metrics_server = tokio::spawn(async move {
            axum::serve(metrics, router)
                .with_graceful_shutdown(async {
                    let _ = metrics_stop_rx.await;
                })
                .await
        });

        let (injector_stop_tx, injector_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut injector_server = injector.map(|Injector { listener, config }| {
            let (cert, key) = (
                config.injector_cert.unwrap_or_default(),
                config.injector_key.unwrap_or_default(),
            );
            tokio::spawn(ipc_inject::serve_https(
                listener,
                ipc_inject::router(config.sidecar),
                cert,
                key,
                async {
                    let _ = injector_stop_rx.await;
                },
            ))
        });
        // A webhook that cannot serve (unreadable certificate) stops the server: a
        // silently missing injector would leave pods without their sidecar.
        let injector_failed = async {
            match injector_server.as_mut() {
                Some(task) => match task.await {
                    Ok(Ok(())) => std::future::pending().await,
                    Ok(Err(e)) => anyhow::anyhow!("sidecar injector: {e}"),
                    Err(e) => anyhow::anyhow!("sidecar injector task: {e}"),
                },
                None => std::future::pending().await,
            }
        };

        tokio::select! {
            result = grpc_server => result?,
            error = injector_failed => return Err(error),
        }
        let _ = metrics_stop_tx.send(());
        let _ = injector_stop_tx.send(());
        if let Some((console, task)) = console {
            console.close();
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("admin console did not stop within the grace period");
            }
        }
        let _ = metrics_server.await;
        if let Some(task) = injector_server {
            let _ = task.await;
        }
        node.bus().shutdown().await;
        drop(telemetry);
        Ok(())
    }
}

/// Serves the admin console (HTTPS with --tls-cert) until it is closed.
async fn serve_console(console: Arc<ipc_console::Console>, admin: Admin) {
    let router = ipc_console::router(console.clone());
    let result = match admin.tls {
        Some((cert, key)) => {
            ipc_inject::serve_https(admin.listener, router, cert, key, console.closed())
                .await
                .map_err(anyhow::Error::from)
        }
        None => axum::serve(admin.listener, router)
            .with_graceful_shutdown(console.closed())
            .await
            .map_err(anyhow::Error::from),
    };
    if let Err(error) = result {
        tracing::error!(%error, "admin console stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag left out gives the node's and the mount's own default, so the two
    /// binaries and the core cannot drift apart.
    #[test]
    fn flags_left_out_give_the_node_and_mount_defaults() {
        let config = Config::try_parse_from(["ipc-server"]).unwrap();
        let node = NodeConfig {
            name: String::new(),
            default_app: None,
            ..config.node_config()
        };
        let default = NodeConfig {
            name: String::new(),
            ..NodeConfig::default()
        };
        assert_eq!(format!("{node:?}"), format!("{default:?}"));
        let mount = MountOptions::default();
        assert_eq!(config.node_args.grace(), mount.grace);
        assert_eq!(
            config.limits.max_connection_streams,
            mount.max_connection_streams
        );
        let transport = &config.transport;
        assert_eq!(
            (
                transport.max_connections,
                transport.max_connections_per_peer,
                Duration::from_millis(transport.handshake_timeout_ms),
                Duration::from_millis(transport.idle_timeout_ms),
            ),
            (
                mount.connections.max_total,
                mount.connections.max_per_peer,
                mount.connections.handshake_timeout,
                mount.connections.idle_timeout,
            )
        );
        assert_eq!(
            Duration::from_millis(transport.body_timeout_ms),
            mount.body_timeout
        );
        assert_eq!(
            transport.max_request_buffer_bytes,
            mount.max_request_buffer_bytes
        );
    }
}
