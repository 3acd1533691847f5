//! The processes of a soak, on fixed loopback ports and socket paths so that each
//! can be killed, stopped (SIGSTOP) and started again where clients expect it:
//! a `redis-server` with AOF (`appendfsync always`), `ipc-server` replicas on it,
//! and `ipc-sidecar`s upstream of all replicas.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a process may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A process that can be signalled, killed and started again.
struct Running {
    child: Option<Child>,
}

impl Running {
    fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// SIGKILL (first SIGCONT, so that a stopped process dies too) and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    fn terminate(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `command` and waits until its stdout has a line starting with `prefix`
/// (with the test harness's spawner; `""`: any line).
fn spawn_ready(mut command: Command, name: &str, prefix: &str) -> anyhow::Result<Child> {
    command.stderr(Stdio::null());
    ipc_testkit::spawn_ready(&mut command, prefix, READY_TIMEOUT, |_| {})
        .map(|(child, _line)| child)
        .map_err(|why| anyhow::anyhow!("{name} gave no `{prefix}` line: {why}"))
}

/// The private Redis: AOF with `appendfsync always`, so a restart loses nothing.
pub struct Redis {
    pub port: u16,
    binary: PathBuf,
    dir: tempfile::TempDir,
    process: Running,
}

impl Redis {
    pub fn start(binary: &Path) -> anyhow::Result<Self> {
        let mut redis = Self {
            port: free_port()?,
            binary: binary.to_path_buf(),
            dir: tempfile::tempdir()?,
            process: Running { child: None },
        };
        redis.launch()?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn is_up(&self) -> bool {
        self.process.child.is_some()
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn launch(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path());
        self.process.child = Some(spawn_ready(command, "redis-server", "")?);
        // Ready once it answers PING (it loads the AOF first).
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if ping(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server on port {} did not answer PING", self.port)
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 16];
    conn.write_all(b"PING\r\n").is_ok()
        && conn
            .read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// An `ipc-server` replica on a fixed port.
pub struct Replica {
    pub name: String,
    pub port: u16,
    binary: PathBuf,
    redis_url: String,
    process: Running,
    pub stopped: bool,
}

impl Replica {
    pub fn new(binary: &Path, name: &str, redis_url: &str) -> anyhow::Result<Self> {
        Ok(Self {
            name: name.into(),
            port: free_port()?,
            binary: binary.to_path_buf(),
            redis_url: redis_url.into(),
            process: Running { child: None },
            stopped: false,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn is_up(&self) -> bool {
        self.process.child.is_some()
    }

    pub fn launch(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--redis", &self.redis_url, "--redis-prefix", "soak"])
            .args(["--node", &self.name, "--app", "soak"])
            .args(["--retention", "10000000", "--presence-ttl-ms", "3000"])
            .args(["--redis-timeout-ms", "1000", "--grace-ms", "1000"])
            .env("RUST_LOG", "error");
        self.process.child = Some(spawn_ready(command, &self.name, "listening ")?);
        self.stopped = false;
        Ok(())
    }

    pub fn kill(&mut self) {
        self.process.kill();
        self.stopped = false;
    }

    pub fn terminate(&mut self) {
        self.process.terminate(Duration::from_secs(5));
        self.stopped = false;
    }

    pub fn pause(&mut self) {
        self.process.signal(Signal::SIGSTOP);
        self.stopped = true;
    }

    pub fn resume(&mut self) {
        self.process.signal(Signal::SIGCONT);
        self.stopped = false;
    }
}

/// An `ipc-sidecar` on a fixed socket path, upstream of every replica.
pub struct Sidecar {
    pub name: String,
    pub socket: PathBuf,
    binary: PathBuf,
    upstream: String,
    process: Running,
}

impl Sidecar {
    pub fn new(binary: &Path, name: &str, dir: &Path, upstream: &str) -> Self {
        Self {
            name: name.into(),
            socket: dir.join(format!("{name}.sock")),
            binary: binary.to_path_buf(),
            upstream: upstream.into(),
            process: Running { child: None },
        }
    }

    pub fn is_up(&self) -> bool {
        self.process.child.is_some()
    }

    pub fn launch(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--socket")
            .arg(&self.socket)
            .args([
                "--upstream",
                &self.upstream,
                "--app",
                "soak",
                "--role",
                "web",
            ])
            .args([
                "--pod",
                &self.name,
                "--namespace",
                "soak",
                "--node-name",
                "n1",
            ])
            .args(["--health-listen", "127.0.0.1:0", "--grace-ms", "1000"])
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("NODE_NAME")
            .env("RUST_LOG", "error");
        self.process.child = Some(spawn_ready(command, &self.name, "listening ")?);
        Ok(())
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn terminate(&mut self) {
        self.process.terminate(Duration::from_secs(5));
    }
}
