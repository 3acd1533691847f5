//! `--admin-listen`, the admin console, against a real `ipc-server`: the rule of
//! the gRPC port (loopback unless people authenticate), the readiness line, the
//! security headers, and a console call refused with the gRPC API's own status.
//! The page itself is tested in a real browser by tests/e2e/test_console.py.

mod support;

use std::process::{Command, Stdio};

use ipc_testkit::ServerProcess;
use ipc_testkit::http::curl_post_json;
use support::*;

fn refused(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_ipc-server"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "started with {args:?}");
    assert!(String::from_utf8_lossy(&output.stdout).is_empty());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn admin_addr(server: &ServerProcess) -> std::net::SocketAddr {
    server
        .ready_line
        .split_whitespace()
        .find_map(|part| part.strip_prefix("admin="))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no admin= in {:?}", server.ready_line))
}

#[tokio::test]
async fn a_console_beyond_loopback_needs_tokens_or_insecure() {
    let stderr = refused(&["--admin-listen", "0.0.0.0:0"]);
    assert!(
        stderr.contains("refusing to serve the admin console on 0.0.0.0:0 without authentication")
            && stderr.contains("--tokens")
            && stderr.contains("--insecure"),
        "{stderr}"
    );
    // A client certificate cannot log in to a web page.
    let ca = TestCa::new("test-ca");
    let cert = ca.server_cert();
    let stderr = refused(&[
        "--admin-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
        "--tls-client-ca",
        ca.cert_path().to_str().unwrap(),
    ]);
    assert!(stderr.contains("give --tokens FILE as well"), "{stderr}");

    let (_, entry) = token("ops", "shop", "members = true");
    let tokens = TokensFile::new(&entry);
    let with_tokens = server(&["--admin-listen", "0.0.0.0:0", "--tokens", tokens.arg()]);
    assert!(admin_addr(&with_tokens).ip().is_unspecified());
    let insecure = server(&["--admin-listen", "0.0.0.0:0", "--insecure"]);
    assert!(admin_addr(&insecure).ip().is_unspecified());
}

#[tokio::test]
async fn the_console_page_is_served_with_a_strict_policy_and_asks_for_a_login() {
    let (_, entry) = token("ops", "shop", "members = true");
    let tokens = TokensFile::new(&entry);
    let server = server(&["--admin-listen", "127.0.0.1:0", "--tokens", tokens.arg()]);
    let addr = admin_addr(&server);
    let page = http_answer(addr, "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let lower = page.to_ascii_lowercase();
    assert!(lower.contains("content-security-policy: default-src 'none'; script-src 'self'"));
    assert!(!lower.contains("unsafe-inline") && !lower.contains("unsafe-eval"));
    assert!(lower.contains("x-frame-options: deny"));
    // The page loads its script from the console itself, never inline.
    assert!(page.contains(r#"<script src="/app.js" defer></script>"#));
    assert!(!page.contains("<script>"));

    let session = http_answer(addr, "/api/session").await;
    assert!(
        session.contains(r#"{"logged_in":false,"requires_token":true}"#),
        "{session}"
    );
    let members = http_answer(addr, "/api/members").await;
    assert!(members.starts_with("HTTP/1.1 401"), "{members}");
    assert!(members.contains(r#""code":"UNAUTHENTICATED""#), "{members}");
}

/// One HTTP/1.1 exchange on a fresh connection: the whole answer as text.
async fn http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    answer
}

/// Logs in to a console without tokens and returns the session cookie.
async fn log_in(addr: std::net::SocketAddr) -> String {
    let body = r#"{"token":""}"#;
    let answer = http(
        addr,
        &format!(
            "POST /api/login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string()
}

#[tokio::test]
async fn the_health_view_lists_every_replica_sharing_redis() {
    let redis = ipc_testkit::redis::RedisServer::start();
    let replica = |node: &str| {
        server(&[
            "--redis",
            &redis.url(),
            "--node",
            node,
            "--admin-listen",
            "127.0.0.1:0",
        ])
    };
    let a = replica("replica-a");
    let b = replica("replica-b");
    let mut on_a = a.client().await;
    // A replica refuses Subscribe (UNAVAILABLE) until it has reached Redis once.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let _worker = loop {
        match on_a.subscribe(subscription(&["news"])).await {
            Ok(stream) => break stream,
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(tokio::time::Instant::now() < deadline, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(status) => panic!("subscribe: {status:?}"),
        }
    };

    let addr = admin_addr(&b);
    let cookie = log_in(addr).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = http(
            addr,
            &format!(
                "GET /api/health HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let health: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let replicas: Vec<(String, u64)> = health["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or_default().to_string(),
                    r["members"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        // replica-a publishes its one subscriber; replica-b serves the page. Its
        // presence can reach Redis a moment before its other legs do, so the page
        // may list both replicas while b's bus is still coming up: wait for both.
        if replicas == [("replica-a".to_string(), 1), ("replica-b".to_string(), 0)]
            && health["bus_healthy"] == true
        {
            assert_eq!(health["bus"], "redis");
            assert_eq!(health["node"], "replica-b");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas never listed: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[test]
fn with_tls_cert_the_console_is_https_and_its_cookie_secure() {
    let ca = TestCa::new("test-ca");
    let cert = ca.server_cert();
    let (secret, entry) = token("ops", "shop", "members = true");
    let tokens = TokensFile::new(&entry);
    let server = server(&[
        "--admin-listen",
        "127.0.0.1:0",
        "--tokens",
        tokens.arg(),
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
    ]);
    let port = admin_addr(&server).port();
    let body = format!(r#"{{"token":"{secret}"}}"#);
    let out = curl_post_json(
        &ca.cert_path(),
        port,
        "/api/login",
        &body,
        &["-D", "-", "-o", "/dev/null"],
    );
    let headers = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let cookie = headers
        .lines()
        .find(|l| l.starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no session cookie in {headers}"));
    assert!(
        cookie.contains("httponly")
            && cookie.contains("samesite=strict")
            && cookie.contains("secure"),
        "{cookie}"
    );
    assert!(!cookie.contains(&secret.to_ascii_lowercase()));
}
