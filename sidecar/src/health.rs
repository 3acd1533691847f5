//! The health endpoint, on TCP for Kubernetes probes: gRPC health (`grpc.health.v1`,
//! services `""` and `ipc.v1.Ipc`, SERVING while the upstream subscription is
//! established), and over plain HTTP `/healthz` (the sidecar is up), `/readyz` (200
//! while connected upstream, else 503 with the reason) and `/metrics`.

use std::future::Future;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use ipc_core::{Bus, Node};
use tokio::net::TcpListener;

use crate::upstream::UpstreamBus;

/// This binary, as its metrics describe it.
const BINARY: ipc_core::metrics::Binary = ipc_core::metrics::Binary {
    role: ipc_core::metrics::Role::Sidecar,
    version: ipc_build_info::VERSION,
    commit: ipc_build_info::COMMIT,
};

pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    bus: Arc<UpstreamBus>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let health_service = ipc_core::mount::health_service(&node);
    let ready_bus = bus.clone();
    let metrics_node = node.clone();
    let router = tonic::service::Routes::new(health_service)
        .into_axum_router()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let bus = ready_bus.clone();
                async move {
                    match bus.connected_to() {
                        Some(upstream) if *bus.health().borrow() => (
                            StatusCode::OK,
                            format!("subscribed upstream at {upstream}\n"),
                        ),
                        _ => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not subscribed upstream: {}\n", bus.last_error()),
                        ),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let node = metrics_node.clone();
                async move { ipc_core::metrics::scrape(&node, &BINARY) }
            }),
        );
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
