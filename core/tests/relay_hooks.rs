//! What a relaying node (the sidecar) relies on: `ipc:subscribed` tells where the
//! head ends (`replayed`) and a resume point (`cursor`) even before any message, and
//! every request handed to a subscriber carries its deadline. Calls the node directly.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipc_core::memory::{MemoryBus, Retention};
use ipc_core::node::{DEADLINE_HEADER, SubscribeStream};
use ipc_core::{Caller, Node, NodeConfig};
use ipc_proto::json::from_optional;
use ipc_proto::pb::{BroadcastRequest, Msg, ReplyRequest, SendMsgRequest, SubscribeRequest};

fn node() -> Arc<Node> {
    Node::new(
        NodeConfig::default(),
        Arc::new(MemoryBus::new(Retention::default())),
    )
}

async fn open(node: &Node, cursor: &str) -> (SubscribeStream, serde_json::Value) {
    let request = SubscribeRequest {
        channels: vec!["news".into()],
        id: "reader".into(),
        cursor: cursor.into(),
        ..Default::default()
    };
    let mut stream = node.subscribe(&Caller::default(), request).await.unwrap();
    let hello = next(&mut stream).await;
    assert_eq!(hello.op, "ipc:subscribed");
    (stream, from_optional(hello.data.as_ref()))
}

async fn next(stream: &mut SubscribeStream) -> Arc<Msg> {
    stream
        .next()
        .await
        .expect("stream ended")
        .expect("stream closed")
}

async fn publish(node: &Node, op: &str) -> String {
    let request = BroadcastRequest {
        channel: "news".into(),
        op: op.into(),
        ..Default::default()
    };
    node.broadcast(&Caller::default(), request)
        .await
        .unwrap()
        .cursor
}

#[tokio::test]
async fn a_fresh_subscription_gets_a_resume_point_before_any_message() {
    let node = node();
    publish(&node, "before").await;
    let (stream, hello) = open(&node, "").await;
    assert_eq!(hello["replayed"], 0);
    let cursor = hello["cursor"].as_str().expect("cursor in ipc:subscribed");
    drop(stream);

    publish(&node, "missed").await;
    let (mut stream, hello) = open(&node, cursor).await;
    assert_eq!(hello["replayed"], 1, "{hello}");
    assert_eq!(next(&mut stream).await.op, "missed");
}

#[tokio::test]
async fn replayed_counts_the_gap_notice_and_the_entries() {
    let node = node();
    let (_, hello) = open(&node, "").await;
    let cursor = hello["cursor"].as_str().unwrap().to_string();
    let last = publish(&node, "one").await;
    publish(&node, "two").await;
    let (mut stream, hello) = open(&node, &cursor).await;
    assert_eq!(hello["replayed"], 2);
    assert_eq!(next(&mut stream).await.op, "one");
    assert_eq!(next(&mut stream).await.op, "two");
    assert_ne!(hello["cursor"], serde_json::Value::from(last));

    // A cursor of another run of the log: the gap notice is part of the head.
    let (mut stream, hello) = open(&node, "ffff.1-0").await;
    assert_eq!(hello["replayed"], 3);
    assert_eq!(next(&mut stream).await.op, "ipc:gap");
}

#[tokio::test]
async fn a_request_carries_its_deadline() {
    let node = node();
    let request = SubscribeRequest {
        id: "answerer".into(),
        ..Default::default()
    };
    let mut stream = node.subscribe(&Caller::default(), request).await.unwrap();
    assert_eq!(next(&mut stream).await.op, "ipc:subscribed");
    let asking = {
        let node = node.clone();
        tokio::spawn(async move {
            let request = SendMsgRequest {
                target: "answerer".into(),
                op: "q".into(),
                timeout_ms: 60_000,
                ..Default::default()
            };
            node.send_msg(&Caller::default(), request, Some(Duration::from_secs(30)))
                .await
        })
    };
    let request = next(&mut stream).await;
    let deadline: i64 = request.headers[DEADLINE_HEADER].parse().unwrap();
    let left = deadline - ipc_core::now_ms();
    assert!(left > 0 && left <= 30_000, "deadline {left} ms away");
    let reply = ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: "a".into(),
        ..Default::default()
    };
    node.reply(&Caller::default(), reply).await.unwrap();
    assert_eq!(asking.await.unwrap().unwrap().op, "a");
}

#[tokio::test]
async fn a_request_stays_answerable_when_its_subscriber_is_replaced_by_the_same_id() {
    let node = node();
    let open_answerer = || async {
        let request = SubscribeRequest {
            id: "pod-a".into(),
            ..Default::default()
        };
        let mut stream = node.subscribe(&Caller::default(), request).await.unwrap();
        assert_eq!(next(&mut stream).await.op, "ipc:subscribed");
        stream
    };
    let mut old = open_answerer().await;
    let asking = {
        let node = node.clone();
        tokio::spawn(async move {
            let request = SendMsgRequest {
                target: "pod-a".into(),
                op: "q".into(),
                ..Default::default()
            };
            node.send_msg(&Caller::default(), request, None).await
        })
    };
    let request = next(&mut old).await;
    let _new = open_answerer().await;
    let reply = ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: "a".into(),
        ..Default::default()
    };
    node.reply(&Caller::default(), reply).await.unwrap();
    assert_eq!(asking.await.unwrap().unwrap().op, "a");
}
