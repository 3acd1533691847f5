//! What a node serves, mounted once for every node: the control plane's TCP port and
//! the sidecar's pod socket serve the same routes with the same limits and answer
//! every input with the same status.
//!
//! [`Mount`] holds `ipc.v1.Ipc` ([`crate::grpc::server::IpcServer`]), `grpc.health.v1`
//! following the bus's health, and reflection v1 and v1alpha; [`Mount::serve`] serves
//! them on any number of listeners (TCP and Unix) behind the [`Admission`] layer,
//! with the frame limit and the HTTP/2 bounds below, maps undecodable and oversized
//! requests to INVALID_ARGUMENT and RESOURCE_EXHAUSTED, and drains on shutdown. TCP
//! listeners also get the [`Connections`] caps and deadlines (by peer address; a
//! Unix socket's peers are the pod's own processes).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::ServerTlsConfig;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::{HealthReporter, HealthService};

use crate::admission::Admission;
use crate::connections::{ConnectionLimits, Connections};
use crate::grpc::identify::{Identify, MetadataIdentity};
use crate::grpc::server::IpcServer;
use crate::grpc::service::IpcService;
use crate::node::Node;

/// Most concurrent calls (HTTP/2 streams) on one connection, unless configured.
pub const DEFAULT_MAX_CONNECTION_STREAMS: u32 = 1024;
/// HTTP/2 pings find clients that vanished without closing their connection (a killed
/// pod, a cut network), so their subscriptions and presence go away.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest header list (all headers of one call) a client may send: gRPC metadata
/// is small, and hyper's default (16 MiB) times the streams of a connection would
/// let one connection pin gigabytes.
pub const MAX_HEADER_LIST_BYTES: u32 = 32 << 10;
/// Per-stream and per-connection HTTP/2 receive windows: what a client may send
/// that the node has not read yet.
pub const STREAM_WINDOW_BYTES: u32 = 1 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 4 << 20;

/// A listener a node serves on.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// How a node's gRPC face is served, beyond its routes.
pub struct MountOptions {
    /// Who the callers are (default: the `ipc-sender`/`ipc-app` metadata, unauthenticated).
    pub identity: Arc<dyn Identify>,
    /// TLS on the TCP listeners (the control plane's `--tls-*`).
    pub tls: Option<ServerTlsConfig>,
    pub max_connection_streams: u32,
    /// Time given to open calls to finish at shutdown.
    pub grace: Duration,
    /// Caps and deadlines of TCP connections.
    pub connections: ConnectionLimits,
    /// Time a call has to send its whole request message.
    pub body_timeout: Duration,
    /// Most bytes of request messages being received at once, all calls together.
    pub max_request_buffer_bytes: usize,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            identity: Arc::new(MetadataIdentity),
            tls: None,
            max_connection_streams: DEFAULT_MAX_CONNECTION_STREAMS,
            grace: Duration::from_secs(5),
            connections: ConnectionLimits::default(),
            body_timeout: Duration::from_secs(10),
            max_request_buffer_bytes: 256 << 20,
        }
    }
}

/// A node's routes, ready to serve.
pub struct Mount {
    node: Arc<Node>,
    routes: Routes,
    options: MountOptions,
    max_frame: usize,
}

/// The largest gRPC frame a node accepts or sends: room for a message of
/// `max_msg_bytes` in its envelope (a request larger than this is refused by the
/// decoder before the node's own size rule sees it).
pub fn max_frame_bytes(max_msg_bytes: usize) -> usize {
    max_msg_bytes.saturating_mul(2).max(4 << 20)
}

impl Mount {
    /// Builds the routes of `node`: `ipc.v1.Ipc`, health and reflection.
    pub fn new(node: Arc<Node>, options: MountOptions) -> Result<Self, MountError> {
        let max_frame = max_frame_bytes(node.config().max_msg_bytes);
        let ipc = IpcServer::new(IpcService::with_identity(
            node.clone(),
            options.identity.clone(),
        ))
        .max_decoding_message_size(max_frame)
        .max_encoding_message_size(max_frame);
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ipc_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let routes = Routes::new(health_service(&node))
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(ipc);
        Ok(Self {
            node,
            routes,
            options,
            max_frame,
        })
    }

    /// Serves every listener until `shutdown` completes; then stops accepting, ends
    /// the node's subscriber streams with UNAVAILABLE (clients resume elsewhere with
    /// their cursor) and waits at most the grace period for open calls.
    pub async fn serve(
        self,
        listeners: Vec<Listener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let Self {
            node,
            routes,
            options,
            max_frame,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut servers = Vec::new();
        for listener in listeners {
            let connections = matches!(listener, Listener::Tcp(_))
                .then(|| Connections::new(options.connections, node.metrics().clone()));
            let admission = Admission::new(
                options.identity.clone(),
                node.metrics().clone(),
                connections.clone(),
                options.body_timeout.max(Duration::from_millis(1)),
                max_frame.saturating_add(5),
                options.max_request_buffer_bytes,
            );
            servers.push(serve_one(
                listener,
                connections,
                routes.clone(),
                admission,
                &options,
                stopped(stop_rx.clone()),
            )?);
        }
        let all = futures::future::try_join_all(servers);
        tokio::pin!(all);
        tokio::select! {
            result = &mut all => { result?; }
            () = shutdown => {
                tracing::info!(node = %node.name(), "shutting down");
                let _ = stop_tx.send(true);
                node.shutdown();
                let grace = options.grace;
                match tokio::time::timeout(grace, &mut all).await {
                    Ok(result) => { result?; }
                    Err(_) => tracing::warn!(
                        grace_ms = grace.as_millis() as u64,
                        "grace period over; dropping open calls"
                    ),
                }
            }
        }
        Ok(())
    }
}

type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

fn serve_one(
    listener: Listener,
    connections: Option<Arc<Connections>>,
    routes: Routes,
    admission: Admission,
    options: &MountOptions,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<Serving, tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(options.max_connection_streams.max(1))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let (Listener::Tcp(_), Some(tls)) = (&listener, &options.tls) {
        builder = builder.tls_config(tls.clone())?;
    }
    let router = builder
        .layer(admission)
        .layer(tower::util::MapResponseLayer::new(
            map_decode_errors::<tonic::body::Body>,
        ))
        .add_routes(routes);
    Ok(match listener {
        Listener::Tcp(listener) => {
            let connections = connections.expect("TCP listeners have connection limits");
            let incoming = connections.incoming(listener, options.tls.is_none());
            Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
        }
        Listener::Unix(listener) => {
            // Each connection is a session: leases a local process takes end with it.
            let incoming = crate::coord::session_incoming(listener);
            Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
        }
    })
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Why the routes could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building gRPC reflection: {0}")]
pub struct MountError(#[from] tonic_reflection::server::Error);

/// `grpc.health.v1` for `node`: services `""` and `ipc.v1.Ipc` are SERVING while
/// its bus is healthy (the Redis link up, the sidecar subscribed upstream), else
/// NOT_SERVING. Also served on the sidecar's health port for the kubelet's probes.
pub fn health_service(node: &Arc<Node>) -> HealthServer<impl Health> {
    HealthServer::new(health_checks(node))
}

/// The checks behind [`health_service`], with the bus's status already set.
fn health_checks(node: &Arc<Node>) -> HealthService {
    let reporter = HealthReporter::new();
    let checks = HealthService::from_health_reporter(reporter.clone());
    let healthy = node.bus().health();
    // Set before the service is returned, so that a probe arriving right after the
    // port opens gets the bus's status, never "service not registered" (nor the
    // reporter's initial SERVING for ""). Nobody else holds the fresh reporter's
    // lock, so this completes on its first poll; should it not, the task below
    // reports the same status a moment later.
    let _ = report(&reporter, *healthy.borrow()).now_or_never();
    tokio::spawn(follow_bus_health(healthy, reporter));
    checks
}

async fn follow_bus_health(mut healthy: watch::Receiver<bool>, reporter: HealthReporter) {
    loop {
        let serving = *healthy.borrow_and_update();
        report(&reporter, serving).await;
        if healthy.changed().await.is_err() {
            return;
        }
    }
}

async fn report(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(ipc_proto::pb::ipc_server::SERVICE_NAME, status)
        .await;
}

/// A request that does not decode (bad protobuf, nesting beyond prost's recursion
/// limit) is the client's mistake: tonic reports it as INTERNAL, this turns it into
/// INVALID_ARGUMENT so that clients and alerts tell it from a server bug. A request
/// larger than the frame limit is RESOURCE_EXHAUSTED, like any other size limit,
/// rather than tonic's OUT_OF_RANGE.
pub fn map_decode_errors<B>(mut response: http::Response<B>) -> http::Response<B> {
    const DECODE_ERROR: &str = "failed to decode Protobuf message";
    const TOO_LARGE: &str = "Error, decoded message length too large";
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let replacement = match status.code() {
        tonic::Code::Internal if status.message().starts_with(DECODE_ERROR) => {
            tonic::Status::invalid_argument(format!(
                "the request could not be decoded: {}",
                status.message()[DECODE_ERROR.len()..].trim_start_matches(": ")
            ))
        }
        tonic::Code::OutOfRange if status.message().starts_with(TOO_LARGE) => {
            tonic::Status::resource_exhausted(format!(
                "request too large ({}); see --max-msg-bytes",
                status.message()[TOO_LARGE.len()..].trim_start_matches(": ")
            ))
        }
        _ => return response,
    };
    let _ = replacement.add_header(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;

    use super::*;
    use crate::memory::{MemoryBus, Retention};
    use crate::node::NodeConfig;

    /// A probe that arrives before any other task ran (the port just opened) gets
    /// the bus's status, not NOT_FOUND "service not registered".
    #[tokio::test(flavor = "current_thread")]
    async fn health_is_known_before_the_first_probe() {
        let node = Node::new(
            NodeConfig::default(),
            Arc::new(MemoryBus::new(Retention::default())),
        );
        let service = health_checks(&node);
        // No yield to the spawned follower before the checks.
        for name in ["", ipc_proto::pb::ipc_server::SERVICE_NAME] {
            let request = tonic::Request::new(HealthCheckRequest {
                service: name.into(),
            });
            let status = service.check(request).await.map(|r| r.into_inner().status);
            assert_eq!(status.ok(), Some(ServingStatus::Serving as i32), "{name:?}");
        }
    }
}
