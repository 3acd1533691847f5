//! The pod's traffic to the control plane rides on streams (issue 18): its
//! broadcasts on one Publish stream, its answers to the fleet's requests on the
//! upstream subscription's Serve stream, its requests on one SendMsgs stream.
//! Counted from outside, by the control plane's own per-RPC metrics: no unary
//! Broadcast, Reply or SendMsg reaches it from the pod, and a request between two
//! processes of the pod never reaches it at all.
//! A broadcast whose acknowledgement is lost with the connection is sent again
//! with its key and stored once.

mod common;

use std::net::SocketAddr;

use common::*;
use futures::StreamExt;
use ipc_proto::pb::SubscribeRequest;
use ipc_testkit::proxy::HoldingProxy;
use serde_json::json;

/// How many calls of `method` the server's `/metrics` counts as OK (0 when it has
/// not served one: the family lists only what happened).
async fn calls(metrics: SocketAddr, method: &str) -> f64 {
    let (status, text) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    let series = format!("ipc_rpc_requests_total{{method=\"{method}\",code=\"OK\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0.0, |value| value.parse().expect("a number"))
}

#[tokio::test]
async fn the_pod_publishes_and_answers_on_streams_and_keeps_its_own_requests() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut remote = server.client().await;
    let mut jobs = subscribe_to(&mut remote, &[":jobs"]).await;

    // A worker of the pod, and another process of the pod that asks it.
    let mut worker = sidecar.client().await;
    let (mut requests, _) = subscribe(
        &mut worker,
        with_app(SubscribeRequest {
            id: "worker-1".into(),
            ..Default::default()
        }),
    )
    .await;
    let answering = tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            if !request.reply_to.is_empty() {
                let n = data(&request);
                reply(&mut worker, &request, "echo", n).await;
            }
        }
    });
    let mut local = sidecar.client().await;

    const UNARY: i64 = 20;
    const STREAMED: i64 = 20;
    for n in 0..UNARY {
        broadcast(&mut local, ":jobs", "job:run", json!(n))
            .await
            .expect("broadcast");
    }
    let answers: Vec<_> = local
        .publish(with_app(futures::stream::iter(
            (UNARY..UNARY + STREAMED).map(|n| job("", json!(n))),
        )))
        .await
        .expect("publish")
        .into_inner()
        .collect()
        .await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|a| a.error.is_empty()))
    );
    for n in 0..UNARY + STREAMED {
        assert_eq!(data(&next(&mut jobs).await), json!(n), "order or loss");
    }

    const ASKED: usize = 10;
    for n in 0..ASKED {
        let answer = send_with(&mut remote, "worker-1", json!(n)).await;
        assert_eq!(data(&answer), json!(n));
    }
    let metrics = server.metrics;
    // The pod's own requests: the server sees none of them.
    let before = calls(metrics, "SendMsg").await;
    assert!(before >= ASKED as f64);
    for n in 0..5 {
        let answer = send_with(&mut local, "worker-1", json!(n)).await;
        assert_eq!(data(&answer), json!(n));
    }
    assert_eq!(
        calls(metrics, "SendMsg").await,
        before,
        "a request between two processes of the pod left the pod"
    );
    assert_eq!(
        calls(metrics, "Broadcast").await,
        0.0,
        "the pod's broadcasts came as unary Broadcast calls"
    );
    assert_eq!(
        calls(metrics, "Reply").await,
        0.0,
        "the pod's answers came as unary Reply calls"
    );
    assert_eq!(
        calls(metrics, "Publish").await,
        1.0,
        "one Publish stream carries all the pod's broadcasts"
    );
    assert!(calls(metrics, "Serve").await >= 1.0, "no Serve stream");
    answering.abort();
}

#[tokio::test]
async fn the_pods_requests_go_upstream_on_one_stream() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    // A responder in another pod (on the control plane), answering with a unary
    // Reply what it was asked, a little later for the lower numbers: answers
    // come back out of order.
    let mut remote = server.client().await;
    let (mut requests, _) = subscribe(
        &mut remote,
        with_app(SubscribeRequest {
            id: "elsewhere-1".into(),
            ..Default::default()
        }),
    )
    .await;
    let answering = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok(Some(request)) = requests.message().await {
            if request.reply_to.is_empty() {
                continue;
            }
            held.push(request);
            // Answers the requests of a batch of four newest first.
            if held.len() == 4 {
                for request in held.drain(..).rev() {
                    let n = data(&request);
                    reply(&mut remote, &request, "echo", n).await;
                }
            }
        }
    });
    let metrics = server.metrics;
    let unary_before = calls(metrics, "SendMsg").await;
    let local = sidecar.client().await;
    let asking = (0..8).map(|n| {
        let mut local = local.clone();
        async move { (n, send_with(&mut local, "elsewhere-1", json!(n)).await) }
    });
    for (n, answer) in futures::future::join_all(asking).await {
        assert_eq!(data(&answer), json!(n), "an answer went to another request");
    }
    // A request nothing answers is refused as the unary call would refuse it.
    let refused = local
        .clone()
        .send_msg(with_app(ipc_proto::pb::SendMsgRequest {
            target: "nobody-here".into(),
            op: "ask".into(),
            timeout_ms: 20_000,
            ..Default::default()
        }))
        .await
        .expect_err("no responder");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(refused.message().contains("no responders"), "{refused}");
    assert_eq!(
        calls(metrics, "SendMsg").await,
        unary_before,
        "the pod's requests came as unary SendMsg calls"
    );
    assert_eq!(
        calls(metrics, "SendMsgs").await,
        1.0,
        "one SendMsgs stream carries all the pod's requests"
    );
    answering.abort();
}

async fn send_with(
    client: &mut Client,
    target: &str,
    value: serde_json::Value,
) -> ipc_proto::pb::Msg {
    let request = ipc_proto::pb::SendMsgRequest {
        target: target.into(),
        op: "ask".into(),
        data: json(value),
        timeout_ms: 20_000,
        ..Default::default()
    };
    client
        .send_msg(with_app(request))
        .await
        .expect("send_msg")
        .into_inner()
        .reply
        .expect("a reply")
}

#[tokio::test]
async fn a_broadcast_whose_acknowledgement_was_lost_is_stored_once() {
    let server = server();
    let proxy = HoldingProxy::start(server.grpc).await;
    let sidecar = SidecarProcess::start(&format!("http://{}", proxy.addr), &[]);
    sidecar.wait_upstream(true).await;
    let mut remote = server.client().await;
    let mut jobs = subscribe_to(&mut remote, &[":jobs"]).await;
    let mut local = sidecar.client().await;
    // The pod's Publish stream is open and answering.
    broadcast(&mut local, ":jobs", "job:run", json!("before"))
        .await
        .expect("broadcast");
    assert_eq!(data(&next(&mut jobs).await), json!("before"));

    // The control plane stores the broadcast, but its answer never reaches the pod
    // before the connection is lost.
    proxy.hold_answers(true);
    let sending =
        tokio::spawn(async move { broadcast(&mut local, ":jobs", "job:run", json!("once")).await });
    let stored = next(&mut jobs).await;
    assert_eq!(data(&stored), json!("once"));
    proxy.cut();
    proxy.hold_answers(false);

    let answer = tokio::time::timeout(PATIENCE, sending)
        .await
        .expect("no answer after the reconnect")
        .expect("the broadcasting task")
        .expect("the broadcast is acknowledged once the sidecar is back");
    assert_eq!(
        (answer.id.as_str(), answer.cursor.as_str(), answer.duplicate),
        (stored.id.as_str(), stored.cursor.as_str(), false),
        "acknowledged as the message that was stored"
    );
    // The sidecar may still be reconnecting its subscription: retried with a key,
    // as clients do.
    let mut local = sidecar.client().await;
    let after = job("after", json!("after"));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(status) = local.broadcast(with_app(after.clone())).await {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        sidecar.wait_upstream(true).await;
    }
    assert_eq!(
        data(&next(&mut jobs).await),
        json!("after"),
        "the broadcast was delivered twice"
    );
}
