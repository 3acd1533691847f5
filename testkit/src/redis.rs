//! A private `redis-server` for a test: on a free loopback port, in a temporary
//! directory, stopped on drop. It can be stopped and restarted on the same port
//! (with or without its data) to test failures.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::find_program;
use crate::tls::{CertFiles, TestCa};

/// A running (or stopped) private redis-server.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra `redis-server` arguments, kept across restarts.
    extra: Vec<String>,
    /// With TLS only (no plain port): how the readiness check connects.
    tls: Option<TlsFiles>,
}

/// Files a TLS redis-server and its readiness check use.
#[derive(Clone)]
struct TlsFiles {
    ca: PathBuf,
    client: CertFiles,
}

impl RedisServer {
    /// Starts redis-server on a free port, with append-only persistence so a
    /// restart keeps the data.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`RedisServer::start`] with extra `redis-server` arguments (e.g.
    /// `--requirepass`), kept when it restarts.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory for redis");
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            tls: None,
        };
        server.launch();
        server
    }

    /// Starts redis-server speaking only TLS (`--port 0 --tls-port P`) with a
    /// certificate from `ca` for localhost and 127.0.0.1; with `clients_need_certs`
    /// it also asks clients for a certificate of `ca` (`tls-auth-clients yes`).
    pub fn start_tls(ca: &TestCa, clients_need_certs: bool, extra: &[&str]) -> Self {
        let server_cert = ca.server_cert();
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            server_cert.cert.display().to_string(),
            "--tls-key-file".into(),
            server_cert.key.display().to_string(),
            "--tls-ca-cert-file".into(),
            ca.cert_path().display().to_string(),
            "--tls-auth-clients".into(),
            if clients_need_certs { "yes" } else { "no" }.into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut server = Self {
            port,
            dir: tempfile::tempdir().expect("temporary directory for redis"),
            child: None,
            extra: args,
            tls: Some(TlsFiles {
                ca: ca.cert_path(),
                client: ca.client_cert("redis-ready-check", &["localhost"]),
            }),
        };
        server.launch();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The running redis-server's process id (for CPU accounting).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// `redis://127.0.0.1:PORT/`, or `rediss://…` when it speaks TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// Stops the server (SIGKILL: as a crash, nothing more is written).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, keeping what it had persisted.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Starts it again on the same port with its data wiped (a lost log).
    pub fn restart_empty(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
        self.launch();
    }

    fn launch(&mut self) {
        let binary = find_program("redis-server").unwrap_or_else(|| {
            panic!("redis-server is not installed: `apt-get install -y redis-server` (scripts/test does this)")
        });
        let mut command = Command::new(binary);
        if self.tls.is_none() {
            command.args(["--port", &self.port.to_string()]);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls with PING until the server answers: readiness, not a fixed sleep.
    fn wait_ready(&self) {
        let deadline = Instant::now() + super::READY_TIMEOUT;
        match &self.tls {
            Some(tls) => wait_ready_tls(self.port, tls, deadline),
            None => wait_ready_plain(self.port, deadline),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private `redis-sentinel` watching one primary as `master`, on a free port,
/// quick to act (`down-after-milliseconds` 1000), stopped on drop.
pub struct SentinelServer {
    port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl SentinelServer {
    pub fn start(master: &str, primary_port: u16) -> Self {
        Self::start_with(master, primary_port, &[])
    }

    /// [`SentinelServer::start`] with extra lines of `sentinel.conf` after the
    /// defaults (e.g. `requirepass PW`, `sentinel auth-user MASTER USER`,
    /// `sentinel auth-pass MASTER PW` for a primary with an ACL user).
    pub fn start_with(master: &str, primary_port: u16, extra_config: &[&str]) -> Self {
        let binary = find_program("redis-sentinel").unwrap_or_else(|| {
            panic!("redis-sentinel is not installed: `apt-get install -y redis-sentinel` (scripts/test does this)")
        });
        let dir = tempfile::tempdir().expect("temporary directory for sentinel");
        let port = free_port();
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {master} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {master} 1000\n\
                 sentinel failover-timeout {master} 3000\n\
                 sentinel parallel-syncs {master} 1\n{extra}",
                dir = dir.path().display(),
                extra = extra_config
                    .iter()
                    .map(|line| format!("{line}\n"))
                    .collect::<String>()
            ),
        )
        .expect("writing sentinel.conf");
        let child = Command::new(binary)
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting redis-sentinel");
        let sentinel = Self {
            port,
            _dir: dir,
            child,
        };
        wait_ready_plain(port, Instant::now() + super::READY_TIMEOUT);
        sentinel
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, as `--redis-sentinel` takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `HOST:PORT,HOST:PORT…` of `sentinels`, as `--redis-sentinel` takes them.
    pub fn list(sentinels: &[SentinelServer]) -> String {
        sentinels
            .iter()
            .map(SentinelServer::addr)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `redis-cli --tls … PING` until the server answers.
fn wait_ready_tls(port: u16, tls: &TlsFiles, deadline: Instant) {
    let cli = find_program("redis-cli").unwrap_or_else(|| {
        panic!(
            "redis-cli is not installed: `apt-get install -y redis-tools` (scripts/test does this)"
        )
    });
    while Instant::now() < deadline {
        let answer = Command::new(&cli)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--tls",
                "--cacert",
            ])
            .arg(&tls.ca)
            .arg("--cert")
            .arg(&tls.client.cert)
            .arg("--key")
            .arg(&tls.client.key)
            .arg("PING")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        if answer.is_ok_and(|out| {
            let text = String::from_utf8_lossy(&out.stdout);
            text.contains("PONG") || text.contains("NOAUTH")
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis-server on TLS port {port} did not answer PING");
}

/// Polls with PING over plain TCP until the server answers.
fn wait_ready_plain(port: u16, deadline: Instant) {
    use std::io::{Read, Write};
    while Instant::now() < deadline {
        if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
            let mut buf = [0u8; 64];
            if conn.write_all(b"PING\r\n").is_ok()
                && conn
                    .read(&mut buf)
                    // A server with a password answers, refusing: ready too.
                    .is_ok_and(|n| {
                        buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH")
                    })
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("redis on port {port} did not answer PING");
}

/// A port that was free a moment ago (bind to 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}
