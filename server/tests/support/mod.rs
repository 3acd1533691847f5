//! Helpers shared by the security, limits and bad-input tests: real `ipc-server`
//! processes, tokens files, a test CA, and stream reading with a patience bound.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use ipc_proto::json::{from_optional, to_value};
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{BroadcastRequest, Msg, SubscribeRequest};
use ipc_testkit::ServerProcess;
use tonic::transport::Channel;
use tonic::{Request, Streaming};

/// Upper bound on waiting for something that should happen: a failure guard, not
/// synchronisation.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn server(args: &[&str]) -> ServerProcess {
    ServerProcess::start_binary(Path::new(env!("CARGO_BIN_EXE_ipc-server")), args)
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
    let (secret, _) = ipc_core::auth::new_token(name).unwrap();
    let entry = format!(
        "[[token]]\nname = \"{name}\"\napp = \"{app}\"\nsha256 = \"{}\"\n{grants}\n",
        ipc_core::auth::hash_secret(&secret)
    );
    (secret, entry)
}

/// A request carrying `authorization: Bearer <secret>`.
pub fn authed<T>(message: T, secret: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", ipc_core::auth::bearer(secret).unwrap());
    request
}

pub fn broadcast(channel: &str, op: &str, data: serde_json::Value) -> BroadcastRequest {
    BroadcastRequest {
        channel: channel.into(),
        op: op.into(),
        data: Some(to_value(&data)),
        headers: HashMap::new(),
        ..BroadcastRequest::default()
    }
}

pub fn subscription(channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..SubscribeRequest::default()
    }
}

/// Opens a stream and consumes its `ipc:subscribed` greeting; returns the stream
/// and the subscriber id.
pub async fn subscribe(
    client: &mut IpcClient<Channel>,
    request: impl tonic::IntoRequest<SubscribeRequest>,
) -> (Streaming<Msg>, String) {
    let mut stream = client
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner();
    let hello = next(&mut stream).await;
    assert_eq!(hello.op, "ipc:subscribed");
    let id = from_optional(hello.data.as_ref())["id"]
        .as_str()
        .unwrap()
        .to_string();
    (stream, id)
}

pub async fn next(stream: &mut Streaming<Msg>) -> Msg {
    tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("no message within the patience bound")
        .expect("stream ended")
        .expect("stream failed")
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of one sample in the Prometheus text, e.g.
/// `ipc_refusals_total{reason="rate"}`.
pub async fn metric(server: &ServerProcess, sample: &str) -> u64 {
    let text = http_get(server.metrics, "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

/// Polls a metric until `done` holds; bounded by [`PATIENCE`].
pub async fn wait_for_metric(server: &ServerProcess, sample: &str, done: impl Fn(u64) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = metric(server, sample).await;
        if done(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sample} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub use ipc_testkit::tls::{CertFiles, TestCa};

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

/// Sends and receives raw message bytes, protobuf or not: for what a generated
/// client cannot send.
#[derive(Clone, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
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
