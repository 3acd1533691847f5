//! A sidecar takes requests for a role only while its pod can answer them: a
//! role-only sidecar whose app is not running takes none of them away from a live
//! worker elsewhere, and a worker behind a sidecar answers requests to its role.

mod common;

use common::*;
use ipc_proto::pb::{Msg, SubscribeRequest};
use tonic::Streaming;

/// Answers every request with `name`.
fn answer_all(mut client: Client, mut stream: Streaming<Msg>, name: &'static str) {
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            if !msg.reply_to.is_empty() {
                reply(&mut client, &msg, "answer", serde_json::json!(name)).await;
            }
        }
    });
}

fn worker(id: &str) -> SubscribeRequest {
    SubscribeRequest {
        id: id.into(),
        role: "web".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_only_sidecar_without_its_app_takes_no_request_from_a_live_worker() {
    let server = server();
    // A pod of role `web` whose app has not started: no hook, no local subscriber.
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut direct = server.client().await;
    let (stream, _) = subscribe(&mut direct, with_app(worker("w-live"))).await;
    answer_all(direct.clone(), stream, "w-live");
    let members = wait_members(&server, "the pod listed", |m| {
        m.iter().any(|m| m.id == POD_ID)
    })
    .await;
    let pod = members.iter().find(|m| m.id == POD_ID).unwrap();
    assert_eq!(pod.role, "web");
    assert!(
        !pod.responder && pod.roles.is_empty(),
        "a pod that cannot answer is no responder: {pod:?}"
    );

    for i in 0..12 {
        let answer = send(&mut direct, ":web", "status", 10_000)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(data(&answer), "w-live");
    }
    // Asked from inside the pod as well.
    let mut in_pod = sidecar.client().await;
    for i in 0..4 {
        let answer = send(&mut in_pod, ":web", "status", 10_000)
            .await
            .unwrap_or_else(|e| panic!("request {i} from the pod: {e}"));
        assert_eq!(data(&answer), "w-live");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_behind_a_sidecar_answers_requests_to_its_role_and_a_tail_takes_none() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut in_pod = sidecar.client().await;
    let (stream, _) = subscribe(&mut in_pod, with_app(worker("w-pod"))).await;
    answer_all(in_pod.clone(), stream, "w-pod");
    // A tail of everything, also in the pod: a watcher.
    let mut tail = subscribe_to(&mut in_pod, &["shop:>"]).await;
    let members = wait_members(&server, "w-pod listed as a responder", |m| {
        m.iter().any(|m| m.id == "w-pod" && m.responder)
    })
    .await;
    let relayed = members.iter().find(|m| m.id == "w-pod").unwrap();
    assert_eq!(relayed.roles, ["shop:web"]);

    let mut operator = server.client().await;
    for i in 0..8 {
        let answer = send(&mut operator, ":web", "status", 10_000)
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(data(&answer), "w-pod");
    }
    // The tail saw none of those requests: its next message is this broadcast.
    broadcast(
        &mut operator,
        "shop:news",
        "note",
        serde_json::json!("after"),
    )
    .await
    .expect("broadcast");
    let seen = next(&mut tail).await;
    assert_eq!((seen.op.as_str(), seen.reply_to.as_str()), ("note", ""));
}
