//! The sidecar on a real control plane: a private redis-server and two `ipc-server`
//! replicas on it. The replica the pod uses dies and comes back (or another one takes
//! over); the pod's subscribers keep their streams and miss nothing.

mod common;

use common::*;
use ipc_proto::pb::{MembersRequest, Msg, SubscribeRequest};
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::{RedisServer, free_port};
use serde_json::json;
use tonic::Streaming;

fn replica(redis: &RedisServer, node: &str, port: Option<u16>) -> ServerProcess {
    let url = redis.url();
    server_on(
        port,
        &[
            "--redis",
            &url,
            "--redis-prefix",
            "sidecar",
            "--node",
            node,
            "--presence-ttl-ms",
            "1500",
            "--redis-timeout-ms",
            "1000",
        ],
    )
}

async fn publish(replica: &ServerProcess, range: std::ops::Range<u64>) {
    let mut operator = replica.client().await;
    for n in range {
        broadcast(&mut operator, ":news", "n", json!(n))
            .await
            .unwrap();
    }
}

/// The next `count` numbers on the stream; any other message (an `ipc:gap`) fails.
async fn numbers(stream: &mut Streaming<Msg>, count: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let msg = next(stream).await;
        assert_eq!(msg.op, "n", "unexpected {msg:?}");
        seen.push(data(&msg).as_u64().unwrap());
    }
    seen
}

#[tokio::test]
async fn the_replica_of_the_pod_restarts_and_its_subscribers_miss_nothing() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut a = replica(&redis, "a", Some(port));
    let b = replica(&redis, "b", None);
    let sidecar = SidecarProcess::start(&a.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;

    publish(&b, 0..10).await;
    assert_eq!(numbers(&mut stream, 10).await, (0..10).collect::<Vec<_>>());

    a.kill();
    sidecar.wait_upstream(false).await;
    publish(&b, 10..30).await;
    let _a = replica(&redis, "a", Some(port));
    sidecar.wait_upstream(true).await;
    publish(&b, 30..40).await;
    assert_eq!(numbers(&mut stream, 30).await, (10..40).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_pod_moves_to_the_next_replica_and_is_reachable_through_any() {
    let redis = RedisServer::start();
    let mut a = replica(&redis, "a", None);
    let b = replica(&redis, "b", None);
    let upstreams = format!("{},{}", a.url(), b.url());
    let sidecar = SidecarProcess::start(&upstreams, &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;
    let request = SubscribeRequest {
        id: "w1".into(),
        role: "worker".into(),
        ..Default::default()
    };
    let (mut requests, _) = subscribe(&mut local, request).await;

    a.kill();
    publish(&b, 0..20).await;
    assert_eq!(numbers(&mut stream, 20).await, (0..20).collect::<Vec<_>>());
    sidecar.wait_upstream(true).await;

    // A request through the surviving replica reaches the pod's subscriber.
    let mut operator = b.client().await;
    let asking = {
        let mut operator = operator.clone();
        tokio::spawn(async move { send(&mut operator, "w1", "stats:get", 10_000).await })
    };
    let msg = loop {
        let msg = next(&mut requests).await;
        if !msg.reply_to.is_empty() {
            break msg;
        }
    };
    reply(&mut local, &msg, "stats", json!({"ok": true})).await;
    assert_eq!(data(&asking.await.unwrap().unwrap()), json!({"ok": true}));

    let members = operator
        .members(with_app(MembersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .members;
    let pod = members
        .iter()
        .find(|m| m.id == POD_ID)
        .expect("the pod in the fleet's members");
    assert_eq!(pod.labels.get("pod").map(String::as_str), Some("web-1"));
}

#[tokio::test]
async fn a_subscriber_that_joins_during_an_outage_gets_what_was_published_meanwhile() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut a = replica(&redis, "a", Some(port));
    let b = replica(&redis, "b", None);
    let sidecar = SidecarProcess::start(&a.url(), &[]);
    sidecar.wait_upstream(true).await;

    a.kill();
    sidecar.wait_upstream(false).await;
    // Answered at once: the pod was connected before and resumes from where it stood.
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;
    publish(&b, 0..5).await;
    let _a = replica(&redis, "a", Some(port));
    sidecar.wait_upstream(true).await;
    publish(&b, 5..10).await;
    assert_eq!(numbers(&mut stream, 10).await, (0..10).collect::<Vec<_>>());
}
