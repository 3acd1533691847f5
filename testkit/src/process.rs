//! The workspace's binaries as real processes: found under the target directory,
//! started on free loopback ports, ready once they print their readiness line
//! (`listening grpc=… metrics=…` for `ipc-server`, `listening socket=… health=…`
//! for `ipc-sidecar`; no sleeping), and killed when dropped.
//!
//! [`spawn_ready`] is the one place that reads a readiness line; the bench starts
//! its processes with it too.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ipc_proto::pb::ipc_client::IpcClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::stream::{PATIENCE, wait_health};

/// How long a process may take to become ready before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What every readiness line of the workspace's binaries starts with.
pub const READY_PREFIX: &str = "listening ";

/// Path of a binary built from this workspace: next to the running test's
/// executable (`<target>/<profile>/NAME`), else `target/debug/NAME` or
/// `target/release/NAME`. Panics with the command to run when it has not been built.
pub fn binary(name: &str) -> PathBuf {
    // Test executables live in `<target>/<profile>/deps/`; binaries one level up.
    let beside_test = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(name)));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    beside_test
        .into_iter()
        .chain(["debug", "release"].map(|profile| target.join(profile).join(name)))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "binary {name} not found under {}: run `cargo build --workspace --bins` first (scripts/test does)",
                target.display()
            )
        })
}

/// Why a process gave no readiness line.
#[derive(Debug)]
pub enum NotReady {
    /// It could not be started.
    Spawn(std::io::Error),
    /// It exited (or closed its stdout) first.
    Exited(ExitStatus),
    /// It said nothing within the timeout; it has been killed.
    Silent(Duration),
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spawn(error) => write!(f, "could not be started: {error}"),
            Self::Exited(status) => write!(f, "exited with {status} before its readiness line"),
            Self::Silent(timeout) => write!(f, "printed no readiness line within {timeout:?}"),
        }
    }
}

/// Spawns `command` with stdin closed and stdout piped, and waits up to `timeout`
/// for its first stdout line starting with `prefix` ([`READY_PREFIX`] for the
/// workspace's binaries; `""` for any line); returns the child and that line.
/// Stdout is drained for the life of the process, so it never blocks on a full
/// pipe. `with_child` runs right after the spawn (to take a piped stderr and drain
/// it). The caller sets stderr and the environment.
pub fn spawn_ready(
    command: &mut Command,
    prefix: &str,
    timeout: Duration,
    with_child: impl FnOnce(&mut Child),
) -> Result<(Child, String), NotReady> {
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = command.spawn().map_err(NotReady::Spawn)?;
    with_child(&mut child);
    let stdout = child.stdout.take().expect("piped stdout");
    let (ready_tx, ready_rx) = mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        let mut ready_tx = Some(ready_tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = ready_tx.take_if(|_| line.starts_with(&prefix)) {
                let _ = tx.send(line);
            }
        }
    });
    match ready_rx.recv_timeout(timeout) {
        Ok(line) => Ok((child, line)),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().expect("waiting for the process");
            Err(NotReady::Exited(status))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(NotReady::Silent(timeout))
        }
    }
}

/// The value of `key` (e.g. `grpc=`) in a readiness line.
pub fn ready_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(key))
}

/// A socket address from a readiness line; panics naming the line.
fn address(line: &str, key: &str) -> SocketAddr {
    ready_field(line, key)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("readiness line without {key}: {line:?}"))
}

/// Removes the test's own `IPC_*` variables: they would reconfigure the process.
fn without_ipc_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("IPC_") {
            command.env_remove(key);
        }
    }
}

/// The test's `RUST_LOG`, else warnings.
fn test_log_level() -> String {
    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// A running `ipc-server`.
pub struct ServerProcess {
    child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The whole readiness line, for optional listeners (`injector=ADDR`).
    pub ready_line: String,
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
        Self::launch(&binary("ipc-server"), args, &[], Some(log))
    }

    /// Starts a given server binary and waits for its readiness line.
    pub fn start_binary(path: &Path, args: &[&str]) -> Self {
        Self::launch(path, args, &[], None)
    }

    /// [`ServerProcess::start_binary`] with environment variables `env` set in the
    /// process (switches read from the environment, such as the vendored h2's
    /// `H2_COALESCE_WRITES`); they win over the test's `RUST_LOG`.
    pub fn start_binary_with_env(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(path, args, env, None)
    }

    /// An `ipc-server` replica of app [`crate::TEST_APP`] on the Redis of
    /// `redis_url`, under key prefix `prefix`, as node `node`, with `extra` flags.
    pub fn replica(redis_url: &str, prefix: &str, node: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--redis",
            redis_url,
            "--redis-prefix",
            prefix,
            "--node",
            node,
            "--app",
            crate::TEST_APP,
        ];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    fn launch(
        path: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<tempfile::NamedTempFile>,
    ) -> Self {
        let mut command = Command::new(path);
        without_ipc_env(&mut command);
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
            None => (test_log_level(), Stdio::inherit()),
        };
        command.args(args).env("RUST_LOG", level).stderr(stderr);
        command.envs(env.iter().copied());
        let (child, line) = spawn_ready(&mut command, READY_PREFIX, READY_TIMEOUT, |_| {})
            .unwrap_or_else(|why| panic!("{}: {why}", path.display()));
        Self {
            grpc: address(&line, "grpc="),
            metrics: address(&line, "metrics="),
            ready_line: line,
            child,
            log,
        }
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

    /// `http://127.0.0.1:PORT`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A connected `ipc.v1.Ipc` client.
    pub async fn client(&self) -> IpcClient<Channel> {
        IpcClient::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url()))
    }

    /// Waits, on the gRPC health Watch stream, until the server reports `want`.
    pub async fn wait_health(&self, want: ServingStatus) {
        wait_health(&self.url(), want).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status. Blocks the thread: in an async
    /// test, first drop or finish what the server waits for, or use
    /// [`ServerProcess::send_sigterm`] and [`ServerProcess::wait`].
    pub fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait()
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
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

/// The member id of the usual test pod ([`pod_args`]).
pub const POD_ID: &str = "pod-prod-web-1";

/// The usual identity of a test pod: `pod-prod-web-1` of app [`crate::TEST_APP`],
/// role `web`, on node `n1`.
pub fn pod_args() -> Vec<String> {
    [
        "--app",
        crate::TEST_APP,
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

impl SidecarProcess {
    /// Starts a sidecar of the usual test pod ([`pod_args`]) on a socket in a new
    /// temporary directory, with `extra` flags.
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
        let mut command = Command::new(binary("ipc-sidecar"));
        without_ipc_env(&mut command);
        command
            .arg("--socket")
            .arg(socket)
            .args(["--upstream", upstream])
            .args(args)
            .env("RUST_LOG", test_log_level())
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("NODE_NAME")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped());
        // Relay the sidecar's logs to the test's stderr, keeping them for errors.
        let (log_tx, log_rx) = mpsc::channel();
        let relay_logs = |child: &mut Child| {
            let mut stderr = child.stderr.take().expect("piped stderr");
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                eprint!("{text}");
                let _ = log_tx.send(text);
            });
        };
        match spawn_ready(&mut command, READY_PREFIX, READY_TIMEOUT, relay_logs) {
            Ok((child, line)) => Ok(Self {
                child,
                socket: PathBuf::from(
                    ready_field(&line, "socket=")
                        .unwrap_or_else(|| panic!("readiness line without socket=: {line:?}")),
                ),
                health: address(&line, "health="),
                tcp: ready_field(&line, "tcp=").map(|addr| addr.parse().expect("tcp address")),
                logs: log_rx,
                _dir: None,
            }),
            Err(NotReady::Exited(status)) => {
                let logs = log_rx.recv_timeout(PATIENCE).unwrap_or_default();
                Err(format!("ipc-sidecar exited with {status}: {logs}"))
            }
            Err(why) => panic!("ipc-sidecar {why}"),
        }
    }

    /// A client over the Unix socket.
    pub async fn client(&self) -> IpcClient<Channel> {
        uds_client(&self.socket).await
    }

    /// Waits until the sidecar reports its upstream subscription as `serving` (its
    /// health follows the upstream).
    pub async fn wait_upstream(&self, serving: bool) {
        let want = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        wait_health(&format!("http://{}", self.health), want).await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
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

/// A gRPC channel over a Unix socket.
pub async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::try_from("http://sidecar.local")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connecting over the Unix socket")
}

/// An `ipc.v1.Ipc` client over a Unix socket.
pub async fn uds_client(path: &Path) -> IpcClient<Channel> {
    IpcClient::new(uds_channel(path).await)
}

/// A system program on PATH or in the usual system directories (`/usr/sbin` is
/// often not on a test's PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `grpcurl` from the workspace's `.venv/bin` (scripts/test installs it there) or
/// PATH.
pub fn grpcurl() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/grpcurl");
    if venv.exists() {
        return venv;
    }
    find_program("grpcurl").expect(
        "grpcurl not found in .venv/bin or PATH: run scripts/test (it installs grpcurl into .venv)",
    )
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
