//! Every limit of `ipc-server`, against a real process over real gRPC: the status a
//! client gets (with the flag to raise named), the metric that counts it, and that
//! the limit stops only whom it should.

mod support;

use std::collections::HashMap;

use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{SendMsgRequest, SubscribeRequest};
use serde_json::json;
use support::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn as_sender<T>(message: T, sender: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("ipc-sender", sender.parse().unwrap());
    request
}

fn ping() -> SendMsgRequest {
    SendMsgRequest {
        op: "ping".into(),
        ..Default::default()
    }
}

fn assert_exhausted(status: &tonic::Status, flag: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(flag), "{flag} not in {status:?}");
}

#[tokio::test]
async fn message_size_headers_and_header_bytes() {
    let server = server(&[
        "--max-msg-bytes",
        "2048",
        "--max-headers",
        "4",
        "--max-header-bytes",
        "100",
    ]);
    let mut client = server.client().await;
    let status = client
        .broadcast(broadcast("a", "x", json!("y".repeat(4000))))
        .await
        .unwrap_err();
    assert_exhausted(&status, "--max-msg-bytes");

    let mut many = broadcast("a", "x", json!(null));
    many.headers = (0..5).map(|i| (format!("h{i}"), "v".into())).collect();
    let status = client.broadcast(many).await.unwrap_err();
    assert_exhausted(&status, "--max-headers");

    let mut large = broadcast("a", "x", json!(null));
    large.headers = HashMap::from([("h".to_string(), "v".repeat(200))]);
    let status = client.broadcast(large).await.unwrap_err();
    assert_exhausted(&status, "--max-header-bytes");

    // Labels of a subscriber are held to the same bounds.
    let status = client
        .subscribe(SubscribeRequest {
            labels: HashMap::from([("zone".to_string(), "z".repeat(200))]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_exhausted(&status, "--max-header-bytes");

    // Within the limits, all is well.
    let mut fine = broadcast("a", "x", json!("y".repeat(1000)));
    fine.headers = (0..4).map(|i| (format!("h{i}"), "v".into())).collect();
    client.broadcast(fine).await.unwrap();

    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"msg_bytes\"}").await,
        1
    );
    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"headers\"}").await,
        1
    );
    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"header_bytes\"}").await,
        2
    );
}

#[tokio::test]
async fn channels_per_subscription_and_the_largest_timeout() {
    let server = server(&["--max-channels", "3", "--max-timeout-ms", "1000"]);
    let mut client = server.client().await;
    let status = client
        .subscribe(subscription(&["a", "b", "c", "d"]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("at most 3"), "{status:?}");
    subscribe(&mut client, subscription(&["a", "b", "c"])).await;

    let status = client
        .send_msg(SendMsgRequest {
            target: "a".into(),
            op: "x".into(),
            timeout_ms: 5_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("1000 ms"), "{status:?}");

    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"channels\"}").await,
        1
    );
    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"timeout\"}").await,
        1
    );
}

#[tokio::test]
async fn subscriptions_per_identity_count_live_streams_of_that_identity_only() {
    let server = server(&["--max-subscriptions-per-identity", "2"]);
    let mut client = server.client().await;
    let named = |id: &str| SubscribeRequest {
        id: id.into(),
        ..Default::default()
    };
    let (first, _) = subscribe(&mut client, as_sender(named("a1"), "alice")).await;
    let (_second, _) = subscribe(&mut client, as_sender(named("a2"), "alice")).await;
    let status = client
        .subscribe(as_sender(named("a3"), "alice"))
        .await
        .unwrap_err();
    assert_exhausted(&status, "--max-subscriptions-per-identity");
    assert!(status.message().contains("alice"), "{status:?}");

    // Reconnecting under an id alice already holds replaces it: no new slot needed.
    let (_again, _) = subscribe(&mut client, as_sender(named("a2"), "alice")).await;
    // Others are not affected.
    let (_bob, _) = subscribe(&mut client, as_sender(named("b1"), "bob")).await;

    // A closed stream frees its slot (the server learns of it asynchronously):
    // a1, the new a2 and b1 are live, then a2 and b1.
    drop(first);
    wait_for_metric(&server, "ipc_subscribers", |n| n == 2).await;
    subscribe(&mut client, as_sender(named("a3"), "alice")).await;
    assert_eq!(
        metric(
            &server,
            "ipc_refusals_total{reason=\"subscriptions_per_identity\"}"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn streams_per_node() {
    let server = server(&["--max-streams", "3"]);
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for sender in ["a", "b", "c"] {
        streams.push(subscribe(&mut client, as_sender(subscription(&["x"]), sender)).await);
    }
    let status = client
        .subscribe(as_sender(subscription(&["x"]), "d"))
        .await
        .unwrap_err();
    assert_exhausted(&status, "--max-streams");
    // Unary calls still work: only streams are limited.
    client.send_msg(ping()).await.unwrap();
    streams.pop();
    wait_for_metric(&server, "ipc_subscribers", |n| n == 2).await;
    subscribe(&mut client, as_sender(subscription(&["x"]), "d")).await;
    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"streams\"}").await,
        1
    );
}

/// Calls until the first refusal; returns how many were admitted before it.
async fn admitted_before_refusal(client: &mut IpcClient<Channel>, sender: &str) -> usize {
    for admitted in 0..1000 {
        match client.send_msg(as_sender(ping(), sender)).await {
            Ok(_) => continue,
            Err(status) => {
                assert_exhausted(&status, "--rate-limit");
                assert!(status.message().contains(sender), "{status:?}");
                return admitted;
            }
        }
    }
    panic!("{sender} was never rate limited");
}

#[tokio::test]
async fn requests_per_second_per_identity() {
    // One per second with a burst of 5: whatever the machine's speed, a caller gets
    // its burst (and at most what refilled meanwhile) and then a refusal.
    let server = server(&["--rate-limit", "1", "--rate-burst", "5"]);
    let mut client = server.client().await;
    let admitted = admitted_before_refusal(&mut client, "hasty").await;
    assert!(admitted >= 5, "admitted {admitted}");
    // Another identity has its own bucket.
    client.send_msg(as_sender(ping(), "patient")).await.unwrap();
    // Every RPC counts, streams included.
    let status = client
        .subscribe(as_sender(subscription(&["x"]), "hasty"))
        .await
        .unwrap_err();
    assert_exhausted(&status, "--rate-limit");
    assert!(metric(&server, "ipc_refusals_total{reason=\"rate\"}").await >= 2);
}

#[tokio::test]
async fn rate_limits_follow_the_token_not_the_connection() {
    let (ops, ops_entry) = token("ops", "shop", "send = [\":>\"]");
    let file = TokensFile::new(&ops_entry);
    let server = server(&[
        "--tokens",
        file.arg(),
        "--rate-limit",
        "1",
        "--rate-burst",
        "3",
    ]);
    // Two connections, one token: one bucket.
    let mut first = server.client().await;
    let mut second = server.client().await;
    for _ in 0..3 {
        first.send_msg(authed(ping(), &ops)).await.unwrap();
    }
    let mut refused = false;
    for _ in 0..1000 {
        if let Err(status) = second.send_msg(authed(ping(), &ops)).await {
            assert_exhausted(&status, "--rate-limit");
            assert!(status.message().contains("ops"), "{status:?}");
            refused = true;
            break;
        }
    }
    assert!(refused);
}
