//! `--listen-tcp`: the pod's API also on a loopback TCP port, for gRPC clients that
//! cannot dial a Unix socket. The same node answers on both: a subscriber on the
//! TCP port gets what is broadcast on the socket, a request from the TCP port reaches
//! a responder on the socket, bad input gets the same status, and grpcurl works on
//! it as it is. An address outside loopback is refused at start.

mod common;

use common::*;
use ipc_proto::pb::{BroadcastRequest, SubscribeRequest, ipc_client::IpcClient};
use tonic::Code;

async fn tcp_client(sidecar: &SidecarProcess) -> Client {
    let addr = sidecar
        .tcp
        .expect("the readiness line names the TCP address");
    assert!(addr.ip().is_loopback(), "{addr}");
    IpcClient::connect(format!("http://{addr}"))
        .await
        .expect("connecting over TCP")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_port_serves_the_same_node_as_the_socket() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &["--listen-tcp", "127.0.0.1:0"]);
    let mut over_socket = sidecar.client().await;
    let mut over_tcp = tcp_client(&sidecar).await;

    // A subscriber on TCP gets a broadcast made on the socket.
    let mut news = subscribe_to(&mut over_tcp, &[":news"]).await;
    broadcast(&mut over_socket, ":news", "hello", serde_json::json!(1))
        .await
        .expect("broadcast on the socket");
    let got = next(&mut news).await;
    assert_eq!(
        (got.op.as_str(), data(&got)),
        ("hello", serde_json::json!(1))
    );

    // A request from TCP reaches a responder on the socket and comes back.
    let (mut requests, _) = subscribe(
        &mut over_socket,
        with_app(SubscribeRequest {
            id: "worker-1".into(),
            ..Default::default()
        }),
    )
    .await;
    let mut responder = sidecar.client().await;
    let answering = tokio::spawn(async move {
        let request = next(&mut requests).await;
        reply(
            &mut responder,
            &request,
            "pong",
            serde_json::json!("from the socket"),
        )
        .await;
    });
    let answer = send(&mut over_tcp, "worker-1", "ping", 10_000)
        .await
        .expect("a reply over TCP");
    answering.await.unwrap();
    assert_eq!(
        (answer.op.as_str(), data(&answer)),
        ("pong", serde_json::json!("from the socket"))
    );

    // Bad input: the same status as on the socket.
    let bad = || BroadcastRequest {
        channel: "not a channel".into(),
        op: "x".into(),
        ..Default::default()
    };
    let on_tcp = over_tcp.broadcast(with_app(bad())).await.unwrap_err();
    let on_socket = over_socket.broadcast(with_app(bad())).await.unwrap_err();
    assert_eq!(on_tcp.code(), Code::InvalidArgument);
    assert_eq!(on_tcp.code(), on_socket.code());
    assert_eq!(on_tcp.message(), on_socket.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_works_on_the_tcp_port_as_it_is() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &["--listen-tcp", "127.0.0.1:0"]);
    let addr = sidecar.tcp.expect("tcp address").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        run_grpcurl(&[
            "-plaintext",
            "-H",
            "ipc-app: shop",
            "-d",
            r#"{"channel":":news","op":"hello"}"#,
            &addr,
            "ipc.v1.Ipc/Broadcast",
        ])
    })
    .await
    .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON from grpcurl");
    assert!(
        answer["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{answer}"
    );
}

#[test]
fn an_address_outside_loopback_is_refused_at_start() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let mut args = pod_args();
    args.extend(["--listen-tcp".to_string(), "0.0.0.0:0".to_string()]);
    let refused = SidecarProcess::start_at(&dir.path().join("ipc.sock"), &server.url(), &args)
        .err()
        .expect("the sidecar refuses to start");
    assert!(
        refused.contains("not a loopback address"),
        "the error says why: {refused}"
    );
}
