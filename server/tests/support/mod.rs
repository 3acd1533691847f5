//! What only the server's tests need: `ipc-server` from this crate's build, tokens
//! files and bearer requests, a TLS client, resident memory. The helpers every
//! crate's tests share (processes, streams, health, metrics, the test CA, the
//! request builders of the bad-input campaign) are in `ipc_testkit`, re-exported
//! here for the tests' `use support::*`.
#![allow(dead_code, unused_imports)] // each test file uses its own subset

use std::path::{Path, PathBuf};

use ipc_proto::pb::ipc_client::IpcClient;
use ipc_testkit::ServerProcess;
use tonic::Request;
use tonic::transport::Channel;

pub fn server(args: &[&str]) -> ServerProcess {
    ServerProcess::start_binary(Path::new(env!("CARGO_BIN_EXE_ipc-server")), args)
}

/// [`server`] with environment variables `env` set in its process.
pub fn server_with_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    ServerProcess::start_binary_with_env(Path::new(env!("CARGO_BIN_EXE_ipc-server")), args, env)
}

/// A tokens file in a temporary directory; `entries` are the `[[token]]` tables.
pub struct TokensFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TokensFile {
    pub fn new(entries: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, entries).unwrap();
        Self { dir, path }
    }

    pub fn rewrite(&self, entries: &str) {
        // Write then rename: the server never reads a half-written file.
        let staging = self.dir.path().join("tokens.toml.new");
        std::fs::write(&staging, entries).unwrap();
        std::fs::rename(&staging, &self.path).unwrap();
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// A `[[token]]` entry with a fresh secret; returns (secret, entry).
pub fn token(name: &str, app: &str, grants: &str) -> (String, String) {
    let (secret, _) = ipc_proto::token::new_token(name).unwrap();
    let entry = format!(
        "[[token]]\nname = \"{name}\"\napp = \"{app}\"\nsha256 = \"{}\"\n{grants}\n",
        ipc_proto::token::hash_secret(&secret)
    );
    (secret, entry)
}

/// A request carrying `authorization: Bearer <secret>`.
pub fn authed<T>(message: T, secret: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        ipc_core::grpc::identify::bearer(secret).unwrap(),
    );
    request
}

pub use ipc_testkit::bad_input::{RawCodec, broadcast, subscription};
pub use ipc_testkit::tls::{CertFiles, TestCa};
pub use ipc_testkit::{
    PATIENCE, end_status, grpcurl, http_answer, http_get, metric, next, subscribe, subscriber_id,
    wait_for_metric,
};

/// A TLS client of `server` trusting `ca`, optionally presenting `identity`.
pub async fn tls_client(
    server: &ServerProcess,
    ca: &TestCa,
    identity: Option<&CertFiles>,
) -> Result<IpcClient<Channel>, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ));
    }
    let channel = Channel::from_shared(format!("https://{}", server.grpc))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IpcClient::new(channel))
}

/// The resident memory of a process, in bytes (Linux).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

/// A worker `id` of `role` on a Serve stream of `client`, once `ipc:subscribed`
/// has arrived: where its replies go, and the stream its requests come on.
pub async fn serve_worker(
    client: &mut IpcClient<Channel>,
    id: &str,
    role: &str,
) -> (
    tokio::sync::mpsc::Sender<ipc_proto::pb::ServeRequest>,
    tonic::Streaming<ipc_proto::pb::Msg>,
) {
    use ipc_proto::pb::{ServeRequest, SubscribeRequest, serve_request};
    let (to_node, outgoing) = tokio::sync::mpsc::channel(8);
    to_node
        .send(ServeRequest {
            kind: Some(serve_request::Kind::Subscribe(SubscribeRequest {
                id: id.into(),
                role: role.into(),
                ..SubscribeRequest::default()
            })),
        })
        .await
        .unwrap();
    let mut stream = client
        .serve(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .expect("serve opens")
        .into_inner();
    assert_eq!(next(&mut stream).await.op, "ipc:subscribed");
    (to_node, stream)
}
