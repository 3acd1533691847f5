//! Plain HTTP/1.1 against a process's side ports (`/metrics`, `/healthz`, the
//! console): one request on a fresh connection, and Prometheus samples read from
//! the answer.

use std::net::SocketAddr;
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
