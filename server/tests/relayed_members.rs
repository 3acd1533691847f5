//! Members relayed by a subscriber (`SubscribeRequest.members`, what a sidecar sends
//! for its local subscribers): listed by Members while the stream lasts, and checked
//! at the edge like any other input.

mod support;

use std::time::Duration;

use ipc_proto::pb::{Member, MembersRequest, SubscribeRequest};
use support::*;
use tonic::Code;

fn relaying(members: Vec<Member>) -> SubscribeRequest {
    SubscribeRequest {
        id: "pod-a".into(),
        app: "shop".into(),
        role: "web".into(),
        members,
        ..Default::default()
    }
}

fn member(id: &str) -> Member {
    Member {
        id: id.into(),
        app: "shop".into(),
        role: "worker".into(),
        labels: [("pod".to_string(), "a".to_string())].into(),
        channels: vec!["shop:worker".into(), id.into()],
        node: "sidecar-a".into(),
        ..Default::default()
    }
}

async fn members(
    client: &mut ipc_proto::pb::ipc_client::IpcClient<tonic::transport::Channel>,
) -> Vec<Member> {
    client
        .members(MembersRequest::default())
        .await
        .expect("members")
        .into_inner()
        .members
}

#[tokio::test]
async fn relayed_members_are_listed_while_the_stream_lasts() {
    let server = server(&["--node", "cp-1"]);
    let mut client = server.client().await;
    let unnamed = Member {
        node: String::new(),
        connected_ms: 0,
        ..member("w2")
    };
    let (stream, _) = subscribe(&mut client, relaying(vec![member("w1"), unnamed])).await;

    let listed = members(&mut client).await;
    let ids: Vec<(&str, &str)> = listed
        .iter()
        .map(|m| (m.id.as_str(), m.node.as_str()))
        .collect();
    // The subscriber itself, then what it relays; an unnamed node is the relayer's id.
    assert_eq!(
        ids,
        [("pod-a", "cp-1"), ("w1", "sidecar-a"), ("w2", "pod-a")]
    );
    let w1 = &listed[1];
    assert_eq!((w1.app.as_str(), w1.role.as_str()), ("shop", "worker"));
    assert_eq!(w1.labels.get("pod").map(String::as_str), Some("a"));
    assert!(listed[2].connected_ms > 0, "{:?}", listed[2]);
    let workers = client
        .members(MembersRequest {
            role: "worker".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(workers.len(), 2, "{workers:?}");

    drop(stream);
    let give_up = tokio::time::Instant::now() + PATIENCE;
    loop {
        let listed = members(&mut client).await;
        if listed.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "still listed after the stream ended: {listed:?}"
        );
        // Polling: the server learns of the closed stream on its own time.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn bad_relayed_members_are_refused_with_a_clear_message() {
    let server = server(&["--node", "cp-1"]);
    let mut client = server.client().await;
    let with = |f: fn(&mut Member)| {
        let mut m = member("w1");
        f(&mut m);
        m
    };
    let cases: Vec<(&str, Vec<Member>, Code, &str)> = vec![
        (
            "empty id",
            vec![with(|m| m.id.clear())],
            Code::InvalidArgument,
            "id",
        ),
        (
            "pattern as id",
            vec![with(|m| m.id = "shop:*".into())],
            Code::InvalidArgument,
            "id",
        ),
        (
            "bad role",
            vec![with(|m| m.role = "a b".into())],
            Code::InvalidArgument,
            "role",
        ),
        (
            "bad channel",
            vec![with(|m| m.channels = vec!["a::b".into()])],
            Code::InvalidArgument,
            "channel",
        ),
        (
            "the server's own node",
            vec![with(|m| m.node = "cp-1".into())],
            Code::InvalidArgument,
            "this node's name",
        ),
        (
            "listed twice",
            vec![member("w1"), member("w1")],
            Code::InvalidArgument,
            "twice",
        ),
        (
            "empty label name",
            vec![with(|m| {
                m.labels.insert(String::new(), "x".into());
            })],
            Code::InvalidArgument,
            "labels",
        ),
        (
            "too many",
            (0..300).map(|i| member(&format!("w{i}"))).collect(),
            Code::ResourceExhausted,
            "relayed members",
        ),
    ];
    for (what, relayed, code, mentions) in cases {
        let status = client.subscribe(relaying(relayed)).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(mentions),
            "{what}: {mentions:?} in {:?}",
            status.message()
        );
    }
    // Nothing of the refused subscriptions is listed.
    assert!(members(&mut client).await.is_empty());
}
