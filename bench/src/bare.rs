//! The floor under any unary gRPC call (issue 16): a bare tonic server — the
//! standard health service and nothing else, no layers — in a process of its own,
//! as `ipc-server` is. The bench starts itself again with [`SERVE_ENV`] set; that
//! process binds a loopback port, prints it and serves until its stdin closes.

use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::process::Child;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::peer::{RequestReply, Requester};

/// Set in the environment of the bench's own child: serve, do not benchmark.
pub const SERVE_ENV: &str = "IPC_BENCH_BARE_TONIC";

/// The child's side: a tonic server with the health service only, on the same
/// multi-threaded runtime `ipc-server` runs on.
pub async fn serve() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, crate::floor::stdin_closed())
        .await?;
    Ok(())
}

/// One health `Check` on a bare tonic server in its own process.
pub struct BareTonic;

struct BareChecker {
    client: HealthClient<Channel>,
    /// Killed when the requester goes (its stdin closes too).
    _server: Child,
}

#[async_trait]
impl RequestReply for BareTonic {
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>> {
        let (server, addr) = crate::floor::start_child(SERVE_ENV, "1").await?;
        let addr = addr.as_str();
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to the bare tonic server at {addr}"))?;
        Ok(Arc::new(BareChecker {
            client: HealthClient::new(channel),
            _server: server,
        }))
    }
}

#[async_trait]
impl Requester for BareChecker {
    async fn request(&self, _payload: Bytes) -> anyhow::Result<()> {
        self.client
            .clone()
            .check(HealthCheckRequest::default())
            .await?;
        Ok(())
    }
}
