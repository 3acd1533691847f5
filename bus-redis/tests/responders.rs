//! Requests go to responders, never to watchers, across replicas: a tail of
//! `shop:>` on each replica takes no request meant for the workers, and Members
//! tells which is which.

mod common;

use std::sync::Arc;

use common::*;
use ipc_proto::pb::SubscribeRequest;
use parking_lot::Mutex;
use tonic::Streaming;

/// Answers every request with its own id; returns the task.
fn answer_all(mut client: Client, mut stream: Streaming<ipc_proto::pb::Msg>, id: &'static str) {
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            if !msg.reply_to.is_empty() {
                let _ = reply(&mut client, &msg.reply_to, id).await;
            }
        }
    });
}

/// Records every request a watcher is handed (there should be none).
fn record_requests(mut stream: Streaming<ipc_proto::pb::Msg>, seen: Arc<Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            if !msg.reply_to.is_empty() {
                seen.lock().push(msg.channel.clone());
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_on_every_replica_takes_no_request_and_every_request_is_answered_by_a_worker() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let worker = |id: &str| SubscribeRequest {
        app: "shop".into(),
        role: "worker".into(),
        ..channels(id, &[])
    };
    let tail = |id: &str| SubscribeRequest {
        app: "shop".into(),
        ..channels(id, &["shop:>", "shop:worker"])
    };
    let taken = Arc::new(Mutex::new(Vec::new()));
    // Tails first: a tail subscribed before the workers must not be preferred.
    record_requests(subscribe(&mut ca, tail("tail-a")).await.0, taken.clone());
    record_requests(subscribe(&mut cb, tail("tail-b")).await.0, taken.clone());
    answer_all(ca.clone(), subscribe(&mut ca, worker("w-a")).await.0, "w-a");
    answer_all(cb.clone(), subscribe(&mut cb, worker("w-b")).await.0, "w-b");

    let mut answered_by = Vec::new();
    for i in 0..24 {
        let client = if i % 2 == 0 { &mut ca } else { &mut cb };
        let reply = send(client, "shop:worker", "status", 10_000)
            .await
            .unwrap_or_else(|e| panic!("request {i} not answered: {e}"));
        answered_by.push(text_of(&reply));
    }
    assert!(
        answered_by.iter().all(|w| w == "w-a" || w == "w-b"),
        "{answered_by:?}"
    );
    assert!(answered_by.iter().any(|w| w == "w-a") && answered_by.iter().any(|w| w == "w-b"));
    assert!(
        taken.lock().is_empty(),
        "watchers were handed requests: {:?}",
        taken.lock()
    );

    // Members says who responds, and for which roles, on either replica.
    for client in [&mut ca, &mut cb] {
        let members = members(client).await;
        let by_id = |id: &str| members.iter().find(|m| m.id == id).unwrap().clone();
        assert!(by_id("w-a").responder && by_id("w-b").responder);
        assert_eq!(by_id("w-b").roles, ["shop:worker"]);
        assert!(!by_id("tail-a").responder && by_id("tail-a").roles.is_empty());
        assert!(!by_id("tail-b").responder);
    }

    // A role only tails match (through `shop:>`) has no responder fleet-wide.
    assert_code(
        send(&mut ca, "shop:billing", "status", 10_000).await,
        tonic::Code::Unavailable,
        "no responders",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_gather_is_kept_in_redis_and_its_repeat_on_another_replica_returns_it() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let worker = SubscribeRequest {
        app: "shop".into(),
        role: "worker".into(),
        ..channels("w-a", &[])
    };
    answer_all(ca.clone(), subscribe(&mut ca, worker).await.0, "w-a");
    let request = ipc_proto::pb::GatherRequest {
        target: ":worker".into(),
        op: "status".into(),
        key: "k-1".into(),
        timeout_ms: 5_000,
        ..Default::default()
    };
    let first = cb
        .gather(request.clone())
        .await
        .expect("gather")
        .into_inner();
    assert_eq!((first.expected, first.ok), (1, 1));
    let again = ca.gather(request).await.expect("repeat").into_inner();
    assert_eq!(
        again.id, first.id,
        "the stored ledger, from the other replica"
    );
}
