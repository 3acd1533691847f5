//! `ipc-sidecar`, the per-pod sidecar of fleet-ipc, as a library: the pod's processes
//! get the same `ipc.v1.Ipc` API on a Unix socket, and the sidecar keeps the pod on
//! the control plane — one upstream subscription for the whole pod, reconnected and
//! resumed without loss; requests between the pod's own processes never leave it.
//!
//! The sidecar is the core node on another bus: [`upstream::UpstreamBus`] makes the
//! control plane its bus. The binary only parses flags, starts a [`Sidecar`] and
//! waits for a signal, so tests start real sidecars as production does.
//!
//! # Layout
//! - [`config`]: flags and `IPC_*` variables (the node's flags the server takes too
//!   are `ipc_core::node::args::NodeArgs`, flattened in); the pod's identity.
//! - [`socket`]: the Unix socket (stale replaced, live refused, file mode).
//! - [`upstream`]: the upstream bus — its session (a Serve stream that carries the
//!   pod's replies back, reconnected and resumed), the coverage of the union of
//!   local subscriptions, requests both ways, the plumbing of upstream calls;
//!   `upstream::publish`: the pod's broadcasts on one Publish stream, resent with
//!   their keys after a loss.
//! - [`grants`]: what the pod's token may do upstream; local subscriptions beyond it refused.
//! - [`ring`]: the recent upstream entries, for local subscribers that resume.
//! - [`hooks`]: shell commands run for ops; the node runs them for requests to the
//!   pod (`ipc_core::node::answer`, one order with local responders and built-ins).
//! - `leases`: Lock, Unlock, Limit relayed upstream; locks of a local process
//!   renewed while its connection lives, released when it ends.
//! - [`health`]: gRPC health and `/healthz`, `/readyz`, `/metrics` on TCP.
//!
//! The socket serves the core's [`Mount`]: the routes, limits, status mapping and
//! drain of the control plane's port.

pub mod config;
pub mod grants;
pub mod health;
pub mod hooks;
mod leases;
pub mod ring;
pub mod socket;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ipc_core::mount::{Listener, Mount, MountOptions};
use ipc_core::{Bus, Node};
use tokio::net::{TcpListener, UnixListener};

pub use config::{Config, PodIdentity};

use crate::hooks::Hooks;
use crate::ring::RingLimits;
use crate::upstream::{UpstreamBus, UpstreamConfig};

pub use ipc_core::logging::init as init_logging;

/// A started sidecar: the node on the upstream bus, its socket and health port bound.
pub struct Sidecar {
    node: Arc<Node>,
    bus: Arc<UpstreamBus>,
    identity: PodIdentity,
    listener: UnixListener,
    /// `--listen-tcp`: the same API on a loopback TCP address.
    tcp: Option<TcpListener>,
    socket: socket::BoundSocket,
    health: TcpListener,
    grace: Duration,
    /// Span export (`--otlp-endpoint`); flushed when serving ends.
    telemetry: Option<ipc_core::telemetry::ExportGuard>,
}

impl Sidecar {
    /// Binds the socket and the health port, builds the node and starts connecting
    /// upstream (serving locally does not wait for the control plane).
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let identity = config.identity()?;
        let Config {
            socket,
            socket_mode,
            socket_owner,
            upstream,
            app,
            role: _,
            tag: _,
            pod: _,
            namespace: _,
            node_name: _,
            id: _,
            node,
            labels: _,
            health_listen,
            listen_tcp,
            hooks,
            hook_timeout,
            token_file,
            upstream_ca,
            upstream_cert,
            upstream_key,
            buffer,
            buffer_bytes,
            connect_timeout,
            upstream_timeout,
            upstream_keepalive,
            reconnect_max,
            cover_wait,
            node_args,
            log_json: _,
            otlp_endpoint,
        } = config;
        anyhow::ensure!(!upstream.is_empty(), "no --upstream address given");
        let node_name = node.unwrap_or_else(|| identity.id.clone());
        anyhow::ensure!(
            !node_name.is_empty() && !node_name.contains('#'),
            "--node {node_name:?}: a node name must be non-empty and without '#'"
        );
        let tls = config::upstream_tls(
            upstream_ca.as_deref(),
            upstream_cert.as_deref(),
            upstream_key.as_deref(),
        )?;
        // gRPC clients on a Unix socket (grpcio, grpcurl, grpc-java) send its path as
        // `:authority`, which plain h2 refuses; the vendored h2 takes it as no authority.
        // Process-wide, and only here: the server binary keeps h2's check unchanged.
        h2::server::accept_socket_path_authority(true);
        let (listener, socket) = socket::bind(&socket, socket_mode, socket_owner)?;
        let health = TcpListener::bind(health_listen)
            .await
            .with_context(|| format!("binding the health listener {health_listen}"))?;
        let tcp = match listen_tcp {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --listen-tcp {addr}"))?,
            ),
            None => None,
        };

        let max_timeout = node_args.max_timeout();
        let max_frame = ipc_core::mount::max_frame_bytes(node_args.max_msg_bytes);
        let hooks = Arc::new(Hooks::new(&hooks, hook_timeout));
        let bus = Arc::new(UpstreamBus::new(
            UpstreamConfig {
                addresses: upstream,
                identity: identity.clone(),
                node_name: node_name.clone(),
                connect_timeout,
                call_timeout: upstream_timeout,
                keepalive: upstream_keepalive.max(Duration::from_millis(100)),
                reconnect_max,
                cover_wait,
                buffer: RingLimits {
                    messages: buffer.max(1),
                    bytes: buffer_bytes,
                },
                token_file,
                tls,
                max_frame,
                default_request_wait: max_timeout,
            },
            hooks,
        ));
        let node = Node::with_own_member(
            // Named after the pod (the server after its host).
            node_args.node_config(node_name, Some(app).filter(|a| !a.is_empty())),
            bus.clone() as Arc<dyn Bus>,
            // The pod is a member itself: the node runs its hooks for requests to
            // the pod's channels and answers built-in ops sent to its id.
            bus.pod(),
        );
        let telemetry = otlp_endpoint
            .as_deref()
            .map(|endpoint| {
                ipc_core::telemetry::start(
                    endpoint,
                    ipc_core::telemetry::ServiceInfo {
                        name: "ipc-sidecar",
                        instance: node.name().to_string(),
                        version: ipc_build_info::VERSION,
                    },
                )
            })
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            node,
            bus,
            identity,
            listener,
            tcp,
            socket,
            health,
            grace: node_args.grace(),
            telemetry,
        })
    }

    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// The loopback TCP address the API is also served on (`--listen-tcp`).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
            .as_ref()
            .map(|tcp| tcp.local_addr().expect("bound listener has an address"))
    }

    pub fn health_addr(&self) -> SocketAddr {
        self.health
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    pub fn identity(&self) -> &PodIdentity {
        &self.identity
    }

    /// Serves the socket and the health port until `shutdown` completes; then stops
    /// accepting, ends local streams with UNAVAILABLE, waits at most the grace period
    /// for open calls, closes the upstream subscription and removes the socket file.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            node,
            bus,
            identity: _,
            listener,
            tcp,
            socket,
            health,
            grace,
            telemetry,
        } = self;
        // The same routes, limits, status mapping and drain as the control plane's port.
        let mount = Mount::new(
            node.clone(),
            MountOptions {
                grace,
                ..MountOptions::default()
            },
        )?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let health = tokio::spawn(health::serve(
            health,
            node.clone(),
            bus.clone(),
            async move {
                let mut stop = stop_rx;
                let _ = stop.wait_for(|stop| *stop).await;
            },
        ));
        let mut listeners = vec![Listener::Unix(listener)];
        listeners.extend(tcp.map(Listener::Tcp));
        let served = mount.serve(listeners, shutdown).await;
        let _ = stop_tx.send(true);
        match health.await {
            Ok(Err(error)) => tracing::warn!(%error, "health endpoint failed"),
            Err(error) => tracing::warn!(%error, "health endpoint panicked"),
            Ok(Ok(())) => {}
        }
        served?;
        bus.shutdown().await;
        drop(socket);
        drop(telemetry);
        Ok(())
    }
}
