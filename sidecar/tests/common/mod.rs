//! Harness of the sidecar tests: real `ipc-server` and `ipc-sidecar` processes, and
//! clients over the sidecar's Unix socket. Every wait is bounded by [`PATIENCE`] and
//! waits on a real signal: a readiness line, a stream message, a health change.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures::StreamExt;
use ipc_proto::json::{from_optional, to_value};
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, Msg, ReplyRequest, SendMsgRequest, SubscribeRequest,
};
use ipc_testkit::ServerProcess;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest wait for anything expected to happen: a test fails rather than hangs.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub type Client = IpcClient<Channel>;

/// The app id of every test fleet.
pub const APP: &str = "shop";

/// A running `ipc-sidecar`.
pub struct SidecarProcess {
    child: Child,
    pub socket: PathBuf,
    pub health: SocketAddr,
    /// The loopback TCP address of `--listen-tcp`, when given.
    pub tcp: Option<SocketAddr>,
    /// Everything the sidecar wrote on stderr, sent once it exits.
    logs: mpsc::Receiver<String>,
    _dir: Option<tempfile::TempDir>,
}

/// The usual identity of a test pod: `pod-prod-web-1`, role `web`, on node `n1`.
pub const POD_ID: &str = "pod-prod-web-1";

pub fn pod_args() -> Vec<String> {
    [
        "--app",
        APP,
        "--role",
        "web",
        "--pod",
        "web-1",
        "--namespace",
        "prod",
        "--node-name",
        "n1",
    ]
    .map(String::from)
    .to_vec()
}

impl SidecarProcess {
    /// Starts a sidecar of the usual test pod on a socket in a new temporary
    /// directory, with `extra` flags.
    pub fn start(upstream: &str, extra: &[&str]) -> Self {
        Self::start_logging(upstream, extra, None)
    }

    /// [`SidecarProcess::start`] logging what `rust_log` selects (else `RUST_LOG`
    /// of the test, else warnings).
    pub fn start_logging(upstream: &str, extra: &[&str], rust_log: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("run").join("ipc.sock");
        let mut args = pod_args();
        args.extend(extra.iter().map(|a| a.to_string()));
        let env: Vec<(String, String)> = rust_log
            .map(|filter| ("RUST_LOG".to_string(), filter.to_string()))
            .into_iter()
            .collect();
        let mut sidecar =
            Self::start_with_env(&socket, upstream, &args, &env).unwrap_or_else(|e| panic!("{e}"));
        sidecar._dir = Some(dir);
        sidecar
    }

    /// Starts a sidecar on `socket`; `Err` with its stderr if it exits instead of
    /// printing its readiness line.
    pub fn start_at(socket: &Path, upstream: &str, args: &[String]) -> Result<Self, String> {
        Self::start_with_env(socket, upstream, args, &[])
    }

    /// As [`Self::start_at`], with environment variables (the downward-API ones
    /// are otherwise removed).
    pub fn start_with_env(
        socket: &Path,
        upstream: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Self, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ipc-sidecar"));
        command
            .arg("--socket")
            .arg(socket)
            .args(["--upstream", upstream])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("NODE_NAME")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("starting ipc-sidecar");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.find_map(|l| l.ok().filter(|l| l.starts_with("listening ")));
            let _ = ready_tx.send(first);
            for _ in lines {}
        });
        // Relay the sidecar's logs to the test's stderr, keeping them for errors.
        let (log_tx, log_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            eprint!("{text}");
            let _ = log_tx.send(text);
        });
        match ready_rx.recv_timeout(PATIENCE) {
            Ok(Some(line)) => {
                let field = |key: &str| {
                    line.split_whitespace()
                        .find_map(|part| part.strip_prefix(key))
                        .unwrap_or_else(|| panic!("readiness line without {key}: {line:?}"))
                        .to_string()
                };
                Ok(Self {
                    child,
                    socket: PathBuf::from(field("socket=")),
                    health: field("health=").parse().expect("health address"),
                    tcp: line
                        .split_whitespace()
                        .find_map(|part| part.strip_prefix("tcp="))
                        .map(|addr| addr.parse().expect("tcp address")),
                    logs: log_rx,
                    _dir: None,
                })
            }
            Ok(None) => {
                let status = child.wait().expect("waiting for the sidecar");
                let logs = log_rx.recv_timeout(PATIENCE).unwrap_or_default();
                Err(format!("ipc-sidecar exited with {status}: {logs}"))
            }
            Err(_) => {
                let _ = child.kill();
                panic!("ipc-sidecar did not print its readiness line within {PATIENCE:?}");
            }
        }
    }

    /// A client over the Unix socket.
    pub async fn client(&self) -> Client {
        uds_client(&self.socket).await
    }

    /// Waits until the sidecar reports its upstream subscription as `serving`.
    pub async fn wait_upstream(&self, serving: bool) {
        let want = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let watching = async {
            let channel = Endpoint::from_shared(format!("http://{}", self.health))
                .expect("health address")
                .connect()
                .await
                .expect("connecting to the health port");
            let mut health = HealthClient::new(channel);
            let mut statuses = health
                .watch(HealthCheckRequest {
                    service: "ipc.v1.Ipc".into(),
                })
                .await
                .expect("health watch")
                .into_inner();
            while let Some(status) = statuses.next().await {
                if status.expect("health status").status == want as i32 {
                    return;
                }
            }
            panic!("health stream ended");
        };
        tokio::time::timeout(PATIENCE, watching)
            .await
            .unwrap_or_else(|_| panic!("the sidecar's upstream never became {want:?}"));
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        self.child.wait().expect("waiting for the sidecar")
    }

    /// SIGTERM, then everything the sidecar logged.
    pub fn terminate_for_logs(&mut self) -> String {
        self.terminate();
        self.logs
            .recv_timeout(PATIENCE)
            .expect("the sidecar's stderr closes once it exited")
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tonic client over a Unix socket.
pub async fn uds_client(path: &Path) -> Client {
    let path = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = Endpoint::try_from("http://sidecar.local")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connecting over the Unix socket");
    IpcClient::new(channel)
}

/// A control-plane server (memory bus, app `shop`) on a free port, or on `port`.
pub fn server_on(port: Option<u16>, extra: &[&str]) -> ServerProcess {
    let listen = port.map(|p| format!("127.0.0.1:{p}"));
    let mut args = vec!["--app", APP];
    if let Some(listen) = &listen {
        args.extend(["--listen", listen.as_str()]);
    }
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

pub fn server() -> ServerProcess {
    server_on(None, &[])
}

/// `ipc-app: shop` on a request.
pub fn with_app<T>(body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert("ipc-app", APP.parse().expect("metadata"));
    request
}

/// A `job:run` broadcast on `:jobs` carrying `n`, with idempotency key `key` (none
/// when empty).
pub fn job(key: &str, n: serde_json::Value) -> BroadcastRequest {
    BroadcastRequest {
        channel: ":jobs".into(),
        op: "job:run".into(),
        data: json(n),
        key: key.into(),
        ..Default::default()
    }
}

pub fn json(value: serde_json::Value) -> Option<prost_types::Value> {
    Some(to_value(&value))
}

pub fn data(msg: &Msg) -> serde_json::Value {
    from_optional(msg.data.as_ref())
}

pub async fn broadcast(
    client: &mut Client,
    channel: &str,
    op: &str,
    data: serde_json::Value,
) -> Result<BroadcastResponse, Status> {
    let request = BroadcastRequest {
        channel: channel.into(),
        op: op.into(),
        data: json(data),
        ..Default::default()
    };
    client
        .broadcast(with_app(request))
        .await
        .map(|r| r.into_inner())
}

pub async fn send(
    client: &mut Client,
    target: &str,
    op: &str,
    timeout_ms: u32,
) -> Result<Msg, Status> {
    let request = SendMsgRequest {
        target: target.into(),
        op: op.into(),
        timeout_ms,
        ..Default::default()
    };
    client
        .send_msg(with_app(request))
        .await
        .map(|r| r.into_inner().reply.expect("a reply"))
}

pub async fn reply(client: &mut Client, request: &Msg, op: &str, data: serde_json::Value) {
    let body = ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: op.into(),
        data: json(data),
        ..Default::default()
    };
    client.reply(with_app(body)).await.expect("reply");
}

/// Subscribes and consumes `ipc:subscribed`; returns the stream and its data.
pub async fn subscribe(
    client: &mut Client,
    request: SubscribeRequest,
) -> (Streaming<Msg>, serde_json::Value) {
    let mut stream = client
        .subscribe(with_app(request))
        .await
        .expect("subscribe")
        .into_inner();
    let hello = next(&mut stream).await;
    assert_eq!(hello.op, "ipc:subscribed");
    let hello = data(&hello);
    (stream, hello)
}

pub async fn subscribe_to(client: &mut Client, channels: &[&str]) -> Streaming<Msg> {
    let request = SubscribeRequest {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    };
    subscribe(client, request).await.0
}

/// The next message; fails the test if the stream ends, errs or stays silent.
pub async fn next(stream: &mut Streaming<Msg>) -> Msg {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => panic!("the stream ended"),
        Ok(Err(status)) => panic!("the stream failed: {status}"),
        Err(_) => panic!("no message within {PATIENCE:?}"),
    }
}

/// `grpcurl` from PATH or the workspace's `.venv/bin`.
pub fn grpcurl() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/grpcurl");
    if venv.exists() {
        return venv;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("grpcurl"))
                .find(|candidate| candidate.exists())
        })
        .expect("grpcurl not found: install it (scripts/test does) or put it in PATH")
}

/// Runs grpcurl with `args`; returns stdout, failing the test on a non-zero exit.
pub fn run_grpcurl(args: &[&str]) -> String {
    let output = Command::new(grpcurl())
        .args(args)
        .output()
        .expect("running grpcurl");
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connecting");
        let request = format!("GET {path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("writing");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("reading");
        response
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("no HTTP answer");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
