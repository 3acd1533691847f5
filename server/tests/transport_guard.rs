//! What a connection can cost the node before and around its calls, against a real
//! `ipc-server` over raw TCP and raw HTTP/2 (the `h2` crate), as an attacker would
//! talk to it: credentials are checked from the headers before any body is read, a
//! body that never finishes is cut off, connections that never start a call (no
//! preface) or stay idle are closed, and connections are capped per peer address
//! and in total with a refusal that says so.

mod support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GRANTS: &str = "broadcast = [\">\"]\nsubscribe = [\">\"]\nsend = [\">\"]\n";

/// An HTTP/2 client on a fresh connection; the connection task is returned so a
/// test can see when the server closes it.
async fn h2_client(
    addr: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    (client, tokio::spawn(connection))
}

/// Starts a gRPC call whose body announces a large message and sends only part of
/// it, never ending the stream: what a client holding server memory would do.
async fn start_unfinished_call(
    client: &h2::client::SendRequest<Bytes>,
    authorization: Option<&str>,
) -> h2::client::ResponseFuture {
    let mut request = http::Request::post("/ipc.v1.Ipc/Broadcast")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(secret) = authorization {
        request = request.header("authorization", format!("Bearer {secret}"));
    }
    let mut ready = client.clone().ready().await.unwrap();
    let (response, mut body) = ready
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(1_000_000u32).to_be_bytes());
    frame.extend_from_slice(&[0u8; 1000]);
    body.send_data(Bytes::from(frame), false).unwrap();
    // The body stream is leaked on purpose: it must stay open (never end).
    std::mem::forget(body);
    response
}

/// The `grpc-status` of a trailers-only response, or of its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> (u32, String) {
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("no response within the patience bound")
        .expect("response");
    let header = |map: &http::HeaderMap, key: &str| {
        map.get(key)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    if let Some(code) = response.headers().get("grpc-status") {
        let code = code.to_str().unwrap().parse().unwrap();
        return (code, header(response.headers(), "grpc-message"));
    }
    let mut body = response.into_body();
    while let Some(chunk) = tokio::time::timeout(PATIENCE, body.data())
        .await
        .expect("body stalled")
    {
        chunk.unwrap();
    }
    let trailers = tokio::time::timeout(PATIENCE, body.trailers())
        .await
        .expect("no trailers")
        .unwrap()
        .unwrap_or_default();
    (
        header(&trailers, "grpc-status").parse().unwrap(),
        header(&trailers, "grpc-message"),
    )
}

#[tokio::test]
async fn credentials_are_checked_before_any_body_is_read() {
    let (_, entry) = token("ops", "shop", GRANTS);
    let tokens = TokensFile::new(&entry);
    let server = server(&["--tokens", tokens.arg()]);
    let (client, _connection) = h2_client(server.grpc).await;
    // Many unauthenticated calls with unfinished bodies: each is refused at once.
    let mut responses = Vec::new();
    for _ in 0..20 {
        responses.push(start_unfinished_call(&client, None).await);
    }
    for response in responses {
        let (code, message) = grpc_status(response).await;
        assert_eq!(code, tonic::Code::Unauthenticated as u32, "{message}");
        assert!(message.contains("credentials"), "{message}");
    }
    let (_, wrong) = start_call_with(&client, "ipct_wrong").await;
    assert_eq!(wrong, tonic::Code::Unauthenticated as u32);
    wait_for_metric(
        &server,
        "ipc_refusals_total{reason=\"unauthenticated\"}",
        |n| n >= 21,
    )
    .await;
}

async fn start_call_with(client: &h2::client::SendRequest<Bytes>, secret: &str) -> (String, u32) {
    let response = start_unfinished_call(client, Some(secret)).await;
    let (code, message) = grpc_status(response).await;
    (message, code)
}

#[tokio::test]
async fn an_unfinished_body_is_cut_off_after_the_body_timeout() {
    let (secret, entry) = token("ops", "shop", GRANTS);
    let tokens = TokensFile::new(&entry);
    let server = server(&["--tokens", tokens.arg(), "--body-timeout-ms", "300"]);
    let (client, _connection) = h2_client(server.grpc).await;
    let (message, code) = start_call_with(&client, &secret).await;
    assert_eq!(code, tonic::Code::DeadlineExceeded as u32, "{message}");
    assert!(message.contains("--body-timeout-ms"), "{message}");
    wait_for_metric(
        &server,
        "ipc_refusals_total{reason=\"body_timeout\"}",
        |n| n >= 1,
    )
    .await;
    // A whole request on the same connection is served.
    let mut grpc = server.client().await;
    grpc.broadcast(authed(broadcast("shop:a", "x", json!(1)), &secret))
        .await
        .unwrap();
}

/// Waits until the server closes a raw TCP connection (EOF or reset).
async fn closed_by_server(conn: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, conn.read(&mut buf))
            .await
            .expect("the server kept the connection open")
        {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn connections_that_never_send_the_preface_are_closed() {
    let server = server(&["--handshake-timeout-ms", "300"]);
    // Twice the total cap of silent connections: each is closed by its deadline,
    // so the node keeps room for real clients.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(server.grpc).await.unwrap());
    }
    for conn in &mut silent {
        closed_by_server(conn).await;
    }
    let mut client = server.client().await;
    client
        .broadcast(broadcast("app:a", "x", json!(1)))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_not_one_with_an_open_stream() {
    let server = server(&["--idle-timeout-ms", "400"]);
    // A connection with a live Subscribe stream stays...
    let mut subscriber = server.client().await;
    let (mut stream, _) = subscribe(&mut subscriber, subscription(&["app:a"])).await;
    // ...while one whose call finished is closed once idle.
    let (mut idle, connection) = h2_client(server.grpc).await;
    let request = http::Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    idle = idle.ready().await.unwrap();
    let (response, mut body) = idle.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let (code, message) = grpc_status(response).await;
    assert_eq!(code, 0, "{message}");
    tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the idle connection stayed open")
        .unwrap()
        .ok();
    // The subscriber's connection, idle as long but with its stream open, still delivers.
    let mut publisher = server.client().await;
    publisher
        .broadcast(broadcast("app:a", "still-here", json!(1)))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.op, "still-here");
}

#[tokio::test]
async fn connections_are_capped_per_peer_and_in_total_with_a_clear_refusal() {
    let server = server(&["--max-connections-per-peer", "3", "--max-connections", "5"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(h2_client(server.grpc).await);
    }
    // The fourth from the same address is told why, then closed.
    let mut refused = TcpStream::connect(server.grpc).await.unwrap();
    let said = closed_by_server(&mut refused).await;
    let said = String::from_utf8_lossy(&said);
    assert!(said.contains("--max-connections-per-peer"), "{said:?}");
    wait_for_metric(
        &server,
        "ipc_refusals_total{reason=\"connections_per_peer\"}",
        |n| n >= 1,
    )
    .await;
    // Once one is closed, a new client is served.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let served = match ipc_proto::pb::ipc_client::IpcClient::connect(server.url()).await {
            Ok(mut client) => client
                .broadcast(broadcast("app:a", "x", json!(1)))
                .await
                .is_ok(),
            Err(_) => false,
        };
        if served {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_total_connection_cap_refuses_with_its_flag_named() {
    let server = server(&["--max-connections", "2"]);
    let _held = [h2_client(server.grpc).await, h2_client(server.grpc).await];
    let mut refused = TcpStream::connect(server.grpc).await.unwrap();
    refused
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .ok();
    let said = closed_by_server(&mut refused).await;
    let said = String::from_utf8_lossy(&said);
    assert!(said.contains("--max-connections"), "{said:?}");
    wait_for_metric(&server, "ipc_refusals_total{reason=\"connections\"}", |n| {
        n >= 1
    })
    .await;
}
