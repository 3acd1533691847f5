//! `Client::gather` and `Client::rollout` against a real server, with workers that
//! answer OK, with an error, or never, and record what they were asked.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::fleet::{Answer, Record, Shared, asked_counts, worker, worker_with};
use common::server;
use futures::StreamExt;
use ipc_client::{Client, Error, LedgerState, OutcomeStatus, SubscribeOptions};
use ipc_testkit::{PATIENCE, ServerProcess};
use serde_json::json;

async fn operator(server: &ServerProcess) -> Client {
    Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .expect("connect")
}

fn statuses(ledger: &ipc_client::Ledger) -> Vec<(String, OutcomeStatus)> {
    ledger
        .outcomes
        .iter()
        .map(|o| (o.member.clone(), o.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gather_names_everyone_with_their_outcome() {
    let server = server();
    let record = Shared::default();
    let url = server.url();
    let _ok = worker(&url, "w-ok", "status", Answer::Ok, record.clone()).await;
    let _err = worker(&url, "w-err", "status", Answer::Error, record.clone()).await;
    let _silent = worker(&url, "w-silent", "status", Answer::Silent, record.clone()).await;
    let eu = SubscribeOptions::new()
        .id("w-eu")
        .role("worker")
        .label("zone", "eu");
    let _eu = worker_with(&url, eu, "status", Answer::Ok, record.clone()).await;
    let client = operator(&server).await;

    let plan = client
        .gather(":worker", "status", json!(null))
        .dry_run(true)
        .await
        .expect("dry run");
    assert_eq!((plan.state, plan.expected), (LedgerState::DryRun, 4));
    assert!(
        record.lock().unwrap().asked.is_empty(),
        "a dry run asks nobody"
    );

    let ledger = client
        .gather(":worker", "status", json!({"verbose": true}))
        .timeout(Duration::from_millis(1500))
        .key("g-1")
        .await
        .expect("gather");
    assert_eq!(ledger.state, LedgerState::Done);
    assert_eq!(ledger.target, "shop:worker");
    assert_eq!(
        statuses(&ledger),
        [
            ("w-err".to_string(), OutcomeStatus::Failed),
            ("w-eu".into(), OutcomeStatus::Ok),
            ("w-ok".into(), OutcomeStatus::Ok),
            ("w-silent".into(), OutcomeStatus::NoReply),
        ]
    );
    assert_eq!(
        (ledger.ok, ledger.failed, ledger.no_reply),
        (2, 1, 1),
        "counts"
    );
    assert_eq!(
        ledger.outcomes[0].detail,
        "replied with error: disk full on w-err"
    );
    assert_eq!(ledger.outcomes[3].detail, "no answer within 1500 ms");
    let reply = ledger.outcomes[2].reply.as_ref().expect("w-ok's answer");
    assert_eq!(reply.data, json!({"member": "w-ok"}));
    assert!(!ledger.all_ok());
    {
        let record = record.lock().unwrap();
        let asked = &record.asked["w-ok"][0];
        assert_eq!(asked.data, json!({"verbose": true}));
        assert_eq!(asked.headers["ipc-op-id"], ledger.id);
        assert_eq!(asked.headers["ipc-op-key"], "g-1");
    }

    // Its key again: the same ledger, nobody asked again.
    let again = client
        .gather(":worker", "status", json!({"verbose": true}))
        .key("g-1")
        .await
        .expect("repeat");
    assert_eq!((again.id.as_str(), again.ok), (ledger.id.as_str(), 2));
    assert!(asked_counts(&record).values().all(|n| *n == 1));
    // The key for something else: refused, typed.
    let reused = client
        .gather(":worker", "reload", json!(null))
        .key("g-1")
        .await
        .expect_err("another op under the key");
    assert!(
        matches!(&reused, Error::FailedPrecondition(m) if m.contains("different operation")),
        "{reused}"
    );

    // A label selects; nobody there is NoResponders.
    let eu_only = client
        .gather(":worker", "status", json!(null))
        .label("zone", "eu")
        .await
        .expect("gather eu");
    assert_eq!(
        statuses(&eu_only),
        [("w-eu".to_string(), OutcomeStatus::Ok)]
    );
    let nobody = client
        .gather(":nobody", "status", json!(null))
        .await
        .expect_err("no responders");
    assert!(
        matches!(&nobody, Error::NoResponders { target } if target == ":nobody"),
        "{nobody}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_streams_each_outcome_in_waves_and_ends_with_the_ledger() {
    let server = server();
    let record = Shared::default();
    let url = server.url();
    let mut workers = Vec::new();
    for id in ["r1", "r2", "r3", "r4", "r5"] {
        workers.push(worker(&url, id, "deploy", Answer::Ok, record.clone()).await);
    }
    let client = operator(&server).await;
    let rollout = || {
        client
            .rollout(":worker", "deploy", json!({"version": 7}))
            .wave_size(2)
            .timeout(Duration::from_secs(5))
    };

    let plan = rollout()
        .dry_run(true)
        .await
        .expect("plan")
        .ledger()
        .await
        .expect("the plan's ledger");
    assert_eq!((plan.state, plan.waves), (LedgerState::DryRun, 3));
    let waves: Vec<u32> = plan.outcomes.iter().map(|o| o.wave).collect();
    assert_eq!(waves, [1, 1, 2, 2, 3]);
    assert!(
        record.lock().unwrap().asked.is_empty(),
        "a plan asks nobody"
    );

    let mut events = rollout().await.expect("rollout");
    let mut seen = Vec::new();
    let mut ledger = None;
    while let Some(event) = tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("an event in time")
    {
        let event = event.expect("event");
        if let Some(outcome) = event.outcome {
            assert_eq!(outcome.wave, event.wave);
            seen.push((outcome.member, outcome.status, event.wave));
        } else {
            ledger = event.ledger;
        }
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("r1".to_string(), OutcomeStatus::Ok, 1),
            ("r2".into(), OutcomeStatus::Ok, 1),
            ("r3".into(), OutcomeStatus::Ok, 2),
            ("r4".into(), OutcomeStatus::Ok, 2),
            ("r5".into(), OutcomeStatus::Ok, 3),
        ]
    );
    let ledger = ledger.expect("the last event carries the ledger");
    assert_eq!(
        (ledger.state, ledger.ok, ledger.waves),
        (LedgerState::Done, 5, 3)
    );
    let record = record.lock().unwrap();
    assert!(
        record.most_busy <= 2,
        "at most wave_size busy at once, the workers saw {}",
        record.most_busy
    );
    assert_eq!(record.asked["r5"][0].headers["ipc-op-wave"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_stops_past_its_budget_and_a_rerun_by_key_resumes() {
    let server = server();
    let record: Shared = Arc::new(std::sync::Mutex::new(Record::default()));
    let url = server.url();
    let _a = worker(&url, "a", "deploy", Answer::Ok, record.clone()).await;
    let b = worker(&url, "b", "deploy", Answer::Error, record.clone()).await;
    let _c = worker(&url, "c", "deploy", Answer::Ok, record.clone()).await;
    let client = operator(&server).await;

    let stopped = client
        .rollout(":worker", "deploy", json!(null))
        .key("deploy-1")
        .await
        .expect("rollout")
        .ledger()
        .await
        .expect("ledger");
    assert_eq!(stopped.state, LedgerState::Stopped);
    assert_eq!(
        statuses(&stopped),
        [
            ("a".to_string(), OutcomeStatus::Ok),
            ("b".into(), OutcomeStatus::Failed),
            ("c".into(), OutcomeStatus::Pending),
        ]
    );
    assert!(
        !record.lock().unwrap().asked.contains_key("c"),
        "c never asked"
    );

    // b is fixed (a new worker of the same id answers OK): the rerun skips a.
    b.abort();
    let _b = worker(&url, "b", "deploy", Answer::Ok, record.clone()).await;
    let resumed = client
        .rollout(":worker", "deploy", json!(null))
        .key("deploy-1")
        .await
        .expect("rerun")
        .ledger()
        .await
        .expect("ledger");
    assert_eq!(
        (resumed.id.as_str(), resumed.state),
        (stopped.id.as_str(), LedgerState::Done)
    );
    assert_eq!(
        statuses(&resumed),
        [
            ("a".to_string(), OutcomeStatus::Skipped),
            ("b".into(), OutcomeStatus::Ok),
            ("c".into(), OutcomeStatus::Ok),
        ]
    );
    assert!(resumed.all_ok());
    assert_eq!(
        asked_counts(&record),
        BTreeMap::from([("a".to_string(), 1), ("b".into(), 2), ("c".into(), 1)])
    );
}
