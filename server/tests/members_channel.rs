//! `Members` with `channel`: who a broadcast on that channel would reach — role and
//! tag subscribers, watchers through their patterns, a subscriber by its id — and
//! nothing is sent.

mod support;

use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{MembersRequest, SubscribeRequest};
use support::*;
use tonic::Code;
use tonic::transport::Channel;

fn subscriber(id: &str, role: &str, tag: &str, channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        id: id.into(),
        app: "shop".into(),
        role: role.into(),
        tag: tag.into(),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..SubscribeRequest::default()
    }
}

/// The ids of the members a broadcast on `channel` would reach, sorted.
async fn reached(client: &mut IpcClient<Channel>, channel: &str) -> Vec<String> {
    ipc_testkit::reached(client, None, channel).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_channel_are_who_a_broadcast_would_reach_and_nothing_is_sent() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for request in [
        subscriber("w1", "worker", "", &[]),
        subscriber("w2", "worker", "eu", &[]),
        subscriber("o1", "orders", "", &[]),
        // Watchers: everything of the app, one level of it, another app's channels.
        subscriber("tail", "", "", &["shop:>"]),
        subscriber("level", "", "", &["shop:*"]),
        SubscribeRequest {
            app: "billing".into(),
            ..subscriber("bill", "", "", &["billing:>"])
        },
    ] {
        let (stream, _) = subscribe(&mut client, request).await;
        streams.push(stream);
    }

    // `:` expands to the caller's app, as in Broadcast.
    assert_eq!(
        reached(&mut client, ":worker").await,
        ["level", "tail", "w1", "w2"]
    );
    assert_eq!(reached(&mut client, "shop:worker:eu").await, ["tail", "w2"]);
    assert_eq!(reached(&mut client, "o1").await, ["o1"]);
    assert_eq!(reached(&mut client, "billing:invoices").await, ["bill"]);
    assert!(reached(&mut client, "other:worker").await.is_empty());
    // The other filters still apply.
    let workers_only = client
        .members(MembersRequest {
            channel: ":worker".into(),
            role: "worker".into(),
            ..MembersRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(workers_only.len(), 2);

    // Nothing was sent: the tail's next message is this broadcast.
    client
        .broadcast(broadcast("shop:news", "note", serde_json::json!(1)))
        .await
        .unwrap();
    let tail = &mut streams[3];
    assert_eq!(next(tail).await.op, "note");

    // A broadcast goes to a channel, not a pattern: INVALID_ARGUMENT saying so.
    let refused = client
        .members(MembersRequest {
            channel: "shop:>".into(),
            ..MembersRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().starts_with("channel: ") && refused.message().contains("pattern"),
        "{}",
        refused.message()
    );
}
