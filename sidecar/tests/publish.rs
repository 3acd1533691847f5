//! Publish and idempotency keys through the sidecar: a pod's Publish stream is
//! answered in order, and a keyed broadcast repeated in the pod, or on the control
//! plane, is stored once (the sidecar passes the key upstream).

mod common;

use common::*;
use futures::StreamExt;
use ipc_proto::pb::BroadcastRequest;
use serde_json::json;

fn keyed(key: &str, n: i64) -> BroadcastRequest {
    job(key, json!(n))
}

#[tokio::test]
async fn a_pods_publish_stream_and_keyed_broadcasts_reach_the_fleet_once() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut remote = server.client().await;
    let mut local = sidecar.client().await;
    let mut remote_stream = subscribe_to(&mut remote, &[":jobs"]).await;

    let first = local
        .broadcast(with_app(keyed("k1", 1)))
        .await
        .unwrap()
        .into_inner();
    let again = local
        .broadcast(with_app(keyed("k1", 2)))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate && again.duplicate, "{again:?}");
    assert_eq!((&again.id, &again.cursor), (&first.id, &first.cursor));
    // The same key sent straight to the control plane by the pod's app is a repeat too.
    let direct = remote
        .broadcast(with_app(keyed("k1", 3)))
        .await
        .unwrap()
        .into_inner();
    assert!(direct.duplicate && direct.id == first.id);

    let messages = vec![keyed("", 4), keyed("k1", 5), keyed("k2", 6)];
    let answers: Vec<_> = local
        .publish(with_app(futures::stream::iter(messages)))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert_eq!(answers.len(), 3);
    assert!(!answers[0].duplicate && answers[1].duplicate && !answers[2].duplicate);

    let seen: Vec<_> = [
        next(&mut remote_stream).await,
        next(&mut remote_stream).await,
        next(&mut remote_stream).await,
    ]
    .iter()
    .map(data)
    .collect();
    assert_eq!(
        seen,
        [json!(1), json!(4), json!(6)],
        "each key delivered once"
    );
}
