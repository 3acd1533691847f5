//! The fleet view: each local subscriber of a pod is a member of the control plane,
//! with the pod's identity, for as long as it is connected — on a single server and
//! on any replica of a Redis-backed control plane.

mod common;

use common::*;
use ipc_proto::pb::{Member, MembersRequest, SubscribeRequest};
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::RedisServer;

fn worker(id: &str) -> SubscribeRequest {
    SubscribeRequest {
        id: id.into(),
        role: "worker".into(),
        labels: [("version".to_string(), "7".to_string())].into(),
        ..Default::default()
    }
}

/// The pod's identity on a member relayed by the test pod's sidecar.
fn assert_pod_identity(member: &Member) {
    assert_eq!(
        (member.app.as_str(), member.role.as_str()),
        ("shop", "worker")
    );
    for (key, value) in [
        ("version", "7"),
        ("pod", "web-1"),
        ("namespace", "prod"),
        ("node", "n1"),
        ("zone", "eu-1"),
        ("pod-id", POD_ID),
    ] {
        assert_eq!(
            member.labels.get(key).map(String::as_str),
            Some(value),
            "label {key} of {member:?}"
        );
    }
    // Where it is connected: the sidecar, whose node name is the pod id by default.
    assert_eq!(member.node, POD_ID);
    assert!(
        member.channels.iter().any(|c| c == "shop:worker"),
        "{member:?}"
    );
    assert!(member.connected_ms > 0);
}

#[tokio::test]
async fn a_local_subscriber_is_a_member_of_the_control_plane_while_connected() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &["--label", "zone=eu-1"]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let (w1, _) = subscribe(&mut local, with_app(worker("w1"))).await;
    let mut other = sidecar.client().await;
    let (_w2, _) = subscribe(&mut other, with_app(worker("w2"))).await;

    let members = wait_members(&server, "w1 and w2 listed", |members| {
        ["w1", "w2"]
            .iter()
            .all(|id| members.iter().any(|m| m.id == *id))
    })
    .await;
    for id in ["w1", "w2"] {
        let member = members.iter().find(|m| m.id == id).unwrap();
        assert_pod_identity(member);
    }
    let pod = members.iter().find(|m| m.id == POD_ID).expect("the pod");
    assert_ne!(pod.node, POD_ID, "the pod itself is on the server's node");
    // Filters apply to relayed members like to any other.
    let mut operator = server.client().await;
    let filtered = operator
        .members(with_app(MembersRequest {
            labels: [("namespace".to_string(), "prod".to_string())].into(),
            role: "worker".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .members;
    let mut ids: Vec<&str> = filtered.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["w1", "w2"]);

    // w1 disconnects: it leaves the fleet's members; w2 and the pod stay.
    drop(w1);
    drop(local);
    let members = wait_members(&server, "w1 gone", |members| {
        !members.iter().any(|m| m.id == "w1")
    })
    .await;
    assert!(members.iter().any(|m| m.id == "w2"), "{members:?}");
    assert!(members.iter().any(|m| m.id == POD_ID), "{members:?}");

    // Asked of the sidecar, each local subscriber is listed once.
    let mut asked_locally = sidecar.client().await;
    let members = asked_locally
        .members(with_app(MembersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(
        members.iter().filter(|m| m.id == "w2").count(),
        1,
        "{members:?}"
    );
    assert!(!members.iter().any(|m| m.id == "w1"), "{members:?}");
}

fn replica(redis: &RedisServer, node: &str) -> ServerProcess {
    ServerProcess::replica(
        &redis.url(),
        "members",
        node,
        &["--presence-ttl-ms", "1500"],
    )
}

#[tokio::test]
async fn another_replica_lists_the_local_subscribers_of_a_pod() {
    let redis = RedisServer::start();
    let a = replica(&redis, "a");
    let b = replica(&redis, "b");
    let sidecar = SidecarProcess::start(&a.url(), &["--label", "zone=eu-1"]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let (w1, _) = subscribe(&mut local, with_app(worker("w1"))).await;

    for (name, replica) in [("a", &a), ("b", &b)] {
        let members = wait_members(replica, &format!("w1 listed on replica {name}"), |m| {
            m.iter().any(|m| m.id == "w1")
        })
        .await;
        let listed: Vec<&Member> = members.iter().filter(|m| m.id == "w1").collect();
        assert_eq!(listed.len(), 1, "once on replica {name}: {members:?}");
        assert_pod_identity(listed[0]);
        let pod = members.iter().find(|m| m.id == POD_ID).expect("the pod");
        assert_eq!(pod.node, "a");
    }

    drop(w1);
    drop(local);
    for (name, replica) in [("a", &a), ("b", &b)] {
        wait_members(replica, &format!("w1 gone from replica {name}"), |m| {
            !m.iter().any(|m| m.id == "w1") && m.iter().any(|m| m.id == POD_ID)
        })
        .await;
    }
}

/// The ids of the members a broadcast on `channel` would reach, asked of `client`.
async fn reached(client: &mut Client, channel: &str) -> Vec<String> {
    ipc_testkit::reached(client, Some(APP), channel).await
}

#[tokio::test]
async fn members_of_a_channel_asked_through_the_sidecar_name_the_pods_processes_and_the_fleet() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let (_w1, _) = subscribe(&mut local, with_app(worker("w1"))).await;
    let mut local_tail = sidecar.client().await;
    let _tail = subscribe(
        &mut local_tail,
        with_app(SubscribeRequest {
            id: "ltail".into(),
            channels: vec!["shop:worker:*".into()],
            ..Default::default()
        }),
    )
    .await;
    let mut direct = server.client().await;
    let (_w9, _) = subscribe(&mut direct, with_app(worker("w9"))).await;
    let mut orders = server.client().await;
    let _orders = subscribe_to(&mut orders, &["shop:orders"]).await;
    wait_members(&server, "w1 and ltail relayed", |members| {
        ["w1", "ltail"]
            .iter()
            .all(|id| members.iter().any(|m| m.id == *id))
    })
    .await;

    // The pod's own upstream subscription receives what its processes subscribe
    // to, so it is reached too; the orders subscriber is not.
    let mut asked_locally = sidecar.client().await;
    assert_eq!(
        reached(&mut asked_locally, ":worker").await,
        ["pod-prod-web-1", "w1", "w9"]
    );
    assert_eq!(
        reached(&mut asked_locally, "shop:worker:eu").await,
        ["ltail", "pod-prod-web-1"]
    );
    assert_eq!(
        reached(&mut direct, ":worker").await,
        ["pod-prod-web-1", "w1", "w9"]
    );
    let refused = asked_locally
        .members(with_app(MembersRequest {
            channel: "shop:>".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
}
