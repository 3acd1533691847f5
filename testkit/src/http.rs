//! Plain HTTP/1.1 against a process's side ports (`/metrics`, `/healthz`, the
//! console): one request on a fresh connection, Prometheus samples read from the
//! answer, and a JSON POST over HTTPS with curl (the webhook, the console's login).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::ServerProcess;
use crate::stream::PATIENCE;

/// One `GET path` on a fresh connection: the whole answer (status line, headers
/// and body) as text.
pub async fn http_answer(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let request = format!("GET {path} HTTP/1.1\r\nHost: ipc\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.expect("writing");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.expect("reading");
        answer
    };
    tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| panic!("no HTTP answer from {addr}{path} within {PATIENCE:?}"))
}

/// One `GET path`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let answer = http_answer(addr, path).await;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample in Prometheus text, e.g.
/// `ipc_refusals_total{reason="rate"}`; `None` when it is not there.
pub fn sample(text: &str, sample: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
}

/// The value of one sample of a server's `/metrics`; panics when it is not there.
pub async fn metric(server: &ServerProcess, name: &str) -> u64 {
    let (_, text) = http_get(server.metrics, "/metrics").await;
    sample(&text, name).unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// Polls a server's metric until `done` holds; bounded by [`PATIENCE`].
pub async fn wait_for_metric(server: &ServerProcess, name: &str, done: impl Fn(u64) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = metric(server, name).await;
        if done(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs `body` as JSON with curl to `https://localhost:PORT{path}` (localhost
/// resolved to 127.0.0.1), trusting only the CA in `ca_file`, with `extra` curl
/// flags (`-D - -o /dev/null`: the headers instead of the body). Returns curl's
/// stdout; fails the test if curl fails.
pub fn curl_post_json(
    ca_file: &Path,
    port: u16,
    path: &str,
    body: &str,
    extra: &[&str],
) -> Vec<u8> {
    use std::io::Write;
    let out = Command::new("curl")
        .args(["-sS", "--fail"])
        .args(extra)
        .arg("--cacert")
        .arg(ca_file)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-H", "content-type: application/json"])
        .args(["--data-binary", "@-"])
        .arg(format!("https://localhost:{port}{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(body.as_bytes())?;
            child.wait_with_output()
        })
        .expect("running curl (apt-get install -y curl)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
