//! Test harness for fleet-ipc: starts real processes on free loopback ports and
//! stops them on drop, so integration tests exercise the real binaries over real
//! sockets.
//!
//! # Layout
//! - [`binary`]: locates a workspace binary (`target/debug/NAME`).
//! - [`ServerProcess`]: an `ipc-server` process, ready once it printed its
//!   `listening grpc=… metrics=…` line (no sleeping).
//! - [`redis`]: a private `redis-server` on a free port that can be stopped and
//!   restarted.
//! - [`tls`]: a test certificate authority and the certificates it signs.
//! - [`bad_input`]: the bad-input campaign's requests and the codes they get.
//! - [`otlp`]: an OTLP/gRPC trace receiver that keeps the spans it is sent.
//! - [`proxy`]: a TCP proxy that holds back a server's answers and cuts connections.
//! - [`conformance`]: the rules every bus must keep, written once, run in-process
//!   against each bus through [`bus_conformance!`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod bad_input;
pub mod conformance;
pub mod otlp;
pub mod proxy;
pub mod redis;
pub mod tls;

/// How long a process may take to become ready before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of a binary built from this workspace (`target/<profile>/NAME`). Panics with
/// the command to run when it has not been built.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for profile in ["debug", "release"] {
        let path = target.join(profile).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!(
        "binary {name} not found under {}: run `cargo build --workspace --bins` first (scripts/test does)",
        target.display()
    );
}

/// A running `ipc-server`.
pub struct ServerProcess {
    child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The whole readiness line, for optional listeners (`injector=ADDR`).
    pub ready_line: String,
    /// Lines the server printed on stdout after the readiness line.
    _stdout: std::thread::JoinHandle<()>,
    /// Where its stderr (its log) goes, when captured.
    log: Option<tempfile::NamedTempFile>,
}

impl ServerProcess {
    /// Starts the workspace's `ipc-server` on free loopback ports with extra `args`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_binary(&binary("ipc-server"), args)
    }

    /// [`ServerProcess::start`] with its log (stderr, at level `info`) kept for
    /// [`ServerProcess::log`] instead of shown.
    pub fn start_logged(args: &[&str]) -> Self {
        let log = tempfile::NamedTempFile::new().expect("log file");
        Self::launch(&binary("ipc-server"), args, Some(log))
    }

    /// Everything the server logged so far (with [`ServerProcess::start_logged`]).
    pub fn log(&self) -> String {
        let path = self.log.as_ref().expect("started with start_logged").path();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Whether the process still runs (it did not exit or crash).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Starts a given server binary and waits for its readiness line.
    pub fn start_binary(path: &Path, args: &[&str]) -> Self {
        Self::launch(path, args, None)
    }

    fn launch(path: &Path, args: &[&str], log: Option<tempfile::NamedTempFile>) -> Self {
        let mut command = Command::new(path);
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--metrics-listen") {
            command.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        let (level, stderr) = match &log {
            Some(file) => (
                "info".to_string(),
                Stdio::from(file.reopen().expect("reopening the log file")),
            ),
            None => (
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                Stdio::inherit(),
            ),
        };
        command
            .args(args)
            .env("RUST_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = ready_tx.take_if(|_| line.starts_with("listening ")) {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "{} did not print its readiness line within {READY_TIMEOUT:?}",
                    path.display()
                );
            }
        };
        let field = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("readiness line without {key}: {line:?}"))
        };
        Self {
            grpc: field("grpc="),
            metrics: field("metrics="),
            ready_line: line.clone(),
            child,
            _stdout: reader,
            log,
        }
    }

    /// `http://127.0.0.1:PORT`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A connected `ipc.v1.Ipc` client.
    pub async fn client(&self) -> ipc_proto::pb::ipc_client::IpcClient<tonic::transport::Channel> {
        ipc_proto::pb::ipc_client::IpcClient::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status. Blocks the thread: in an async
    /// test, first drop or finish what the server waits for, or use
    /// [`ServerProcess::send_sigterm`] and [`ServerProcess::wait`].
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.wait()
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("waiting for the server")
    }

    /// Kills the process with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The ids of every member a broadcast on `channel` would reach (Members with
/// `channel`), sorted; `app` goes as `ipc-app` metadata when given. Panics with the
/// status when the node refuses.
pub async fn reached(
    client: &mut ipc_proto::pb::ipc_client::IpcClient<tonic::transport::Channel>,
    app: Option<&str>,
    channel: &str,
) -> Vec<String> {
    let mut request = tonic::Request::new(ipc_proto::pb::MembersRequest {
        channel: channel.into(),
        ..Default::default()
    });
    if let Some(app) = app {
        request
            .metadata_mut()
            .insert("ipc-app", app.parse().expect("an app id"));
    }
    let mut reached: Vec<String> = client
        .members(request)
        .await
        .unwrap_or_else(|e| panic!("members of {channel}: {e}"))
        .into_inner()
        .members
        .into_iter()
        .map(|m| m.id)
        .collect();
    reached.sort();
    reached
}
