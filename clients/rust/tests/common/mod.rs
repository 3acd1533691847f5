//! Shared by the integration tests: a real `ipc-server` process on a loopback port,
//! and waits bounded by a generous limit so that a broken build fails instead of
//! hanging (the limit is a hang guard, never a speed assertion).

#![allow(dead_code)] // each test binary uses a different part

pub mod fleet;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ipc_client::{Error, Msg};

/// Longest wait for anything a test expects: readiness, a message, a process exit.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// The workspace's `ipc-server`, built by `cargo build -p ipc-server` (scripts/test
/// builds everything first; tests must not run cargo themselves).
pub fn server_binary() -> PathBuf {
    // Test executables live in `<target>/<profile>/deps/`; binaries one level up.
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("ipc-server")));
    let from_env = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("debug/ipc-server");
    from_exe
        .into_iter()
        .chain([from_env])
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("ipc-server binary not found next to the tests or in target/debug: run `cargo build -p ipc-server` first")
        })
}

/// A running `ipc-server`; killed on drop.
pub struct Server {
    child: Child,
    pub grpc: SocketAddr,
    /// Its `/metrics` endpoint.
    pub metrics: SocketAddr,
}

impl Server {
    /// Starts a server on a free port, default app `app`.
    pub fn start() -> Server {
        Server::start_on("127.0.0.1:0")
    }

    /// Starts a server listening on `listen` (to restart one on the same port) and
    /// waits for its readiness line.
    pub fn start_on(listen: &str) -> Server {
        Server::start_with(listen, &[])
    }

    /// Starts a server listening on `listen` with extra flags.
    pub fn start_with(listen: &str, extra: &[&str]) -> Server {
        let mut command = Command::new(server_binary());
        for (key, _) in std::env::vars_os() {
            // The test's own environment must not reconfigure the server.
            if key.to_string_lossy().starts_with("IPC_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
            .args(["--app", "app", "--node", "test-node", "--grace-ms", "1000"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning ipc-server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = ready_tx.send(first);
            // Keep draining so that the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match ready_rx.recv_timeout(HANG_GUARD) {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = child.wait().expect("waiting for ipc-server");
                panic!(
                    "ipc-server exited ({status}) before its readiness line; see its stderr above"
                );
            }
            Err(_) => panic!("ipc-server printed no readiness line within {HANG_GUARD:?}"),
        };
        let address = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(key))
                .and_then(|addr| addr.parse().ok())
                .unwrap_or_else(|| panic!("unexpected readiness line {line:?}"))
        };
        Server {
            grpc: address("grpc="),
            metrics: address("metrics="),
            child,
        }
    }

    /// How many calls of `method` (`Reply`, `Serve`, …) the server answered OK, as
    /// its `/metrics` counts them (0 before the first).
    pub async fn calls(&self, method: &str) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics)
            .await
            .expect("connecting to /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: ipc\r\nConnection: close\r\n\r\n")
            .await
            .expect("asking for /metrics");
        let mut text = String::new();
        tokio::time::timeout(HANG_GUARD, stream.read_to_string(&mut text))
            .await
            .expect("no /metrics answer")
            .expect("reading /metrics");
        let series = format!("ipc_rpc_requests_total{{method=\"{method}\",code=\"OK\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .map_or(0, |value| value.trim().parse().expect("a count"))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Stops the server with SIGTERM (graceful: streams end with UNAVAILABLE) and
    /// waits for it to exit.
    pub fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
        let exit = self.child.wait().expect("waiting for ipc-server");
        assert!(
            exit.success(),
            "ipc-server exited with {exit} after SIGTERM"
        );
    }

    /// Kills the server abruptly (SIGKILL: connections just break) and reaps it.
    pub fn kill(mut self) {
        self.child.kill().expect("killing ipc-server");
        self.child.wait().expect("waiting for ipc-server");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next item of a subscription, failing the test on a hang or an error.
pub async fn next_msg(stream: &mut (impl Stream<Item = Result<Msg, Error>> + Unpin)) -> Msg {
    match tokio::time::timeout(HANG_GUARD, stream.next()).await {
        Ok(Some(Ok(msg))) => msg,
        Ok(Some(Err(err))) => panic!("subscription failed: {err}"),
        Ok(None) => panic!("subscription ended"),
        Err(_) => panic!("no message within {HANG_GUARD:?}"),
    }
}

/// Skips messages until one of op `op` arrives; returns the skipped ones and it.
pub async fn until_op(
    stream: &mut (impl Stream<Item = Result<Msg, Error>> + Unpin),
    op: &str,
) -> (Vec<Msg>, Msg) {
    let mut skipped = Vec::new();
    loop {
        let msg = next_msg(stream).await;
        if msg.op == op {
            return (skipped, msg);
        }
        skipped.push(msg);
    }
}

/// A loopback port nobody listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a probe port");
    listener.local_addr().expect("probe address").port()
}

/// `ipcctl` of this build with `IPC_ADDR` (and `IPC_APP`), none of the caller's
/// `IPC_*` settings; killed when dropped.
pub fn ipcctl_command(addr: &str, app: Option<&str>, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ipcctl"));
    command
        .env("IPC_ADDR", addr)
        .env_remove("IPC_APP")
        .env_remove("IPC_TOKEN")
        .env_remove("RUST_LOG")
        .args(args)
        .kill_on_drop(true);
    if let Some(app) = app {
        command.env("IPC_APP", app);
    }
    command
}

/// Runs ipcctl to completion (asynchronously, so that in-test subscribers keep
/// answering meanwhile).
pub async fn ipcctl(addr: &str, app: Option<&str>, args: &[&str]) -> std::process::Output {
    let run = ipcctl_command(addr, app, args).output();
    tokio::time::timeout(HANG_GUARD, run)
        .await
        .expect("ipcctl finished")
        .expect("running ipcctl")
}
