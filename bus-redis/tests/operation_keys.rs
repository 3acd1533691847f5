//! Keyed Rollouts across replicas: the key is claimed fleet-wide, so a second run
//! on another replica is refused while the first is alive, and resumes once the
//! replica coordinating the first died (its claim expired).

mod common;

use common::*;
use futures::StreamExt;
use ipc_proto::pb::ledger::State;
use ipc_proto::pb::outcome::Status as OutcomeStatus;
use ipc_proto::pb::{RolloutEvent, RolloutRequest, SubscribeRequest};
use tokio::sync::mpsc;
use tonic::Code;

/// Reads a Rollout stream to its end.
async fn ledger_of(client: &mut Client, request: RolloutRequest) -> ipc_proto::pb::Ledger {
    let mut stream = client
        .rollout(request)
        .await
        .unwrap_or_else(|e| panic!("rollout refused: {e}"))
        .into_inner();
    let mut last = None;
    while let Some(event) = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("a rollout event in time")
    {
        let event: RolloutEvent = event.expect("rollout event");
        last = event.ledger.or(last);
    }
    last.expect("the last event carries the ledger")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_rollout_runs_once_fleet_wide_and_resumes_after_its_coordinator_died() {
    let redis = redis();
    let mut a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // w1 on replica b: silent the first time it is asked, answers every later time.
    let mut requests = subscribe(
        &mut cb,
        SubscribeRequest {
            id: "w1".into(),
            role: "worker".into(),
            ..SubscribeRequest::default()
        },
    )
    .await
    .0;
    let (asked_tx, mut asked) = mpsc::unbounded_channel();
    let mut answering = cb.clone();
    tokio::spawn(async move {
        let mut count = 0;
        while let Ok(Some(msg)) = requests.message().await {
            if msg.reply_to.is_empty() {
                continue;
            }
            count += 1;
            let _ = asked_tx.send(msg.headers.get("ipc-op-id").cloned().unwrap_or_default());
            if count > 1 {
                let _ = reply(&mut answering, &msg.reply_to, "restarted").await;
            }
        }
    });
    eventually("w1 listed on replica a", || {
        let mut ca = ca.clone();
        async move {
            members(&mut ca)
                .await
                .iter()
                .any(|m| m.id == "w1")
                .then_some(())
        }
    })
    .await;

    let request = RolloutRequest {
        target: ":worker".into(),
        op: "restart".into(),
        timeout_ms: 60_000,
        key: "restart-7".into(),
        ..RolloutRequest::default()
    };
    let _first = ca.rollout(request.clone()).await.expect("first run");
    let first_id = tokio::time::timeout(PATIENCE, asked.recv())
        .await
        .expect("w1 asked by the first run")
        .expect("the worker is running");

    // The same key on the other replica while the first run is alive: refused.
    let refused = cb.rollout(request.clone()).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("coordinated by node \"a\""),
        "{}",
        refused.message()
    );
    assert!(asked.try_recv().is_err(), "the refused run asked nobody");

    // The coordinator dies mid-rollout: the rerun on b waits out its claim, then
    // asks w1 again under the same operation id.
    a.kill();
    let ledger = ledger_of(&mut cb, request).await;
    assert_eq!(ledger.state(), State::Done);
    assert_eq!(ledger.id, first_id);
    assert_eq!(ledger.outcomes[0].status(), OutcomeStatus::Ok);
    let again = asked.recv().await.expect("w1 asked by the rerun");
    assert_eq!(again, first_id);
}
