//! The processes a run starts and owns: `ipc-server` (embedded or on Redis),
//! `ipc-sidecar`, `nats-server`, `redis-server`. Each is ready when it says so
//! (a readiness line, or an answer on its port), is killed when dropped, and is
//! found or reported missing with a reason the table can print. The readiness
//! line is read by `ipc_testkit`'s spawner, as in the tests (the bench already
//! depends on the testkit for its test CA, so this adds no dependency).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ipc_testkit::find_program;
use ipc_testkit::process::{READY_PREFIX, ready_field, spawn_ready};

/// How long a process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A workspace binary and the profile it was built with.
#[derive(Debug, Clone)]
pub struct Binary {
    pub path: PathBuf,
    pub profile: &'static str,
    /// Flags given to every process of this binary the run starts (`--trace`
    /// adds `--otlp-endpoint`).
    pub extra: Vec<String>,
}

impl Binary {
    /// A binary named on the command line; its profile read from its path
    /// (`…/debug/…` or `…/release/…`).
    pub fn given(path: &Path) -> Result<Self, String> {
        if !path.is_file() {
            return Err(format!("{} not found", path.display()));
        }
        let profile = if path.components().any(|c| c.as_os_str() == "debug") {
            "debug"
        } else if path.components().any(|c| c.as_os_str() == "release") {
            "release"
        } else {
            "unknown profile"
        };
        Ok(Self {
            path: path.to_path_buf(),
            profile,
            extra: Vec::new(),
        })
    }
}

/// The workspace's target directory (`CARGO_TARGET_DIR`, else `<workspace>/target`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Finds `target/release/NAME`, else `target/debug/NAME`; `Err` says how to build it.
pub fn find_binary(name: &str, package: &str) -> Result<Binary, String> {
    let target = target_dir();
    for profile in ["release", "debug"] {
        let path = target.join(profile).join(name);
        if path.is_file() {
            return Ok(Binary {
                path,
                profile,
                extra: Vec::new(),
            });
        }
    }
    Err(format!(
        "{name} not built (cargo build --release -p {package})"
    ))
}

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed on drop.
pub struct Process {
    child: Child,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system, all threads) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 14th and 15th fields of the line.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks_per_second())
}

/// `CLK_TCK`, the unit of /proc CPU times (from `getconf`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line in /proc/PID/status")
}

/// Spawns `command` and waits for its readiness line (`listening …`), with the
/// test harness's spawner; returns the process and that line. On failure, the
/// error carries the last lines of its stderr.
fn spawn_until_line(mut command: Command, name: &str) -> anyhow::Result<(Process, String)> {
    command.stderr(Stdio::piped());
    let (err_tx, err_rx) = mpsc::channel::<String>();
    // Drain stderr for the life of the process so it never blocks on a full pipe;
    // keep its lines to explain a failure.
    let drain_stderr = |child: &mut Child| {
        let Some(stderr) = child.stderr.take() else {
            return;
        };
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if err_tx.send(line).is_err() {
                    // Nobody listens any more: keep draining.
                }
            }
        });
    };
    match spawn_ready(&mut command, READY_PREFIX, READY_TIMEOUT, drain_stderr) {
        Ok((child, line)) => Ok((Process { child }, line)),
        Err(why) => {
            let tail: Vec<String> = err_rx.try_iter().collect();
            let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
            bail!("{name} {why}; stderr: {tail}")
        }
    }
}

/// A running `ipc-server`.
pub struct IpcServer {
    pub process: Process,
    pub grpc: SocketAddr,
}

impl IpcServer {
    /// Starts `ipc-server` on free loopback ports with `extra` flags.
    pub fn start(binary: &Binary, extra: &[&str]) -> anyhow::Result<Self> {
        let mut command = Command::new(&binary.path);
        command
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .args(&binary.extra)
            .env("RUST_LOG", "error");
        let (process, line) = spawn_until_line(command, "ipc-server")?;
        let grpc = field(&line, "grpc=")?;
        Ok(Self { process, grpc })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// Whether this `ipc-server` accepts a flag (from its `--help`).
pub fn server_has_flag(binary: &Binary, flag: &str) -> bool {
    Command::new(&binary.path)
        .arg("--help")
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
                .any(|word| word == flag)
        })
}

/// A running `ipc-sidecar` serving on a Unix socket.
pub struct Sidecar {
    pub _process: Process,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts `ipc-sidecar --socket DIR/ipc.sock --upstream URL` and waits for its
    /// `listening socket=...` line.
    pub fn start(binary: &Binary, upstream: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("ipc.sock");
        let mut command = Command::new(&binary.path);
        command
            .arg("--socket")
            .arg(&socket)
            .args(["--upstream", upstream])
            .args(&binary.extra)
            .env("RUST_LOG", "error");
        let (process, _line) = spawn_until_line(command, "ipc-sidecar")?;
        Ok(Self {
            _process: process,
            socket,
            _dir: dir,
        })
    }
}

/// A private `nats-server` on a free loopback port.
pub struct NatsServer {
    pub process: Process,
    pub port: u16,
}

impl NatsServer {
    pub fn start() -> anyhow::Result<Self> {
        let Some(program) = find_program("nats-server") else {
            bail!("nats-server not installed (apt-get install nats-server)");
        };
        let port = free_port()?;
        let mut command = Command::new(program);
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Process {
            child: command.spawn().context("starting nats-server")?,
        };
        wait_for_greeting(port, b"INFO", "nats-server", None)?;
        Ok(Self { process, port })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A private `redis-server` on a free loopback port, in memory only (no RDB, no
/// AOF): the same server serves fleet-ipc's Redis bus and the raw Redis peers, so
/// the ratios compare like with like.
pub struct RedisServer {
    pub process: Process,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> anyhow::Result<Self> {
        let Some(program) = find_program("redis-server") else {
            bail!("redis-server not installed (apt-get install redis-server)");
        };
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut command = Command::new(program);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Process {
            child: command.spawn().context("starting redis-server")?,
        };
        wait_for_greeting(port, b"+PONG", "redis-server", Some(b"PING\r\n"))?;
        Ok(Self {
            process,
            port,
            _dir: dir,
        })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// Polls a port until the server answers with `expect` (after sending `probe`).
fn wait_for_greeting(
    port: u16,
    expect: &[u8],
    name: &str,
    probe: Option<&[u8]>,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            conn.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut buf = [0u8; 256];
            let probed = probe.is_none_or(|p| conn.write_all(p).is_ok());
            if probed
                && conn
                    .read(&mut buf)
                    .is_ok_and(|n| buf[..n].starts_with(expect))
            {
                return Ok(());
            }
        }
        // Polling a port that is not open yet: there is no signal to wait on.
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{name} on port {port} did not answer within {READY_TIMEOUT:?}")
}

/// `key=VALUE` from a readiness line.
fn field(line: &str, key: &str) -> anyhow::Result<SocketAddr> {
    ready_field(line, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("readiness line without {key}: {line:?}"))
}
