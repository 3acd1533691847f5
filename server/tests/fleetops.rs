//! Gather and Rollout on a single server with workers that answer OK, with an
//! error, or never; a watcher is never asked; waves never overlap; keys.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::ledger::State;
use ipc_proto::pb::outcome::Status;
use ipc_proto::pb::{
    GatherRequest, Ledger, Msg, ReplyRequest, RolloutEvent, RolloutRequest, SubscribeRequest,
};
use std::sync::Mutex as StdMutex;
use support::*;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    Error,
    Silent,
}

/// What the workers saw: requests per member, and the most in flight at once.
#[derive(Default)]
struct Record {
    asked: HashMap<String, Vec<Msg>>,
    in_flight: usize,
    most_in_flight: usize,
}

/// A worker of role `worker` (app shop) with id `id`, answering as told. It
/// records every request it gets, and how many workers are busy at once (it holds
/// each request 50 ms before answering, so that overlapping waves would show).
async fn worker(
    client: &IpcClient<Channel>,
    id: &str,
    behaviour: Behaviour,
    record: Arc<StdMutex<Record>>,
) {
    let mut client = client.clone();
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeRequest {
            id: id.into(),
            app: "shop".into(),
            role: "worker".into(),
            ..SubscribeRequest::default()
        },
    )
    .await;
    let id = id.to_string();
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            if msg.reply_to.is_empty() {
                continue;
            }
            {
                let mut r = record.lock().unwrap();
                r.asked.entry(id.clone()).or_default().push(msg.clone());
                r.in_flight += 1;
                r.most_in_flight = r.most_in_flight.max(r.in_flight);
            }
            let mut client = client.clone();
            let record = record.clone();
            tokio::spawn(async move {
                // Busy for a moment: a worker doing its job.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                record.lock().unwrap().in_flight -= 1;
                let error = match behaviour {
                    Behaviour::Ok => String::new(),
                    Behaviour::Error => "restart failed".into(),
                    Behaviour::Silent => return,
                };
                let _ = client
                    .reply(ReplyRequest {
                        reply_to: msg.reply_to,
                        op: msg.op,
                        error,
                        ..ReplyRequest::default()
                    })
                    .await;
            });
        }
    });
}

fn statuses(ledger: &Ledger) -> Vec<(String, Status)> {
    ledger
        .outcomes
        .iter()
        .map(|o| (o.member.clone(), o.status()))
        .collect()
}

async fn events(mut stream: Streaming<RolloutEvent>) -> Vec<RolloutEvent> {
    let mut all = Vec::new();
    while let Some(event) = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("a rollout event in time")
    {
        all.push(event.expect("rollout event"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gather_names_every_responder_and_never_asks_a_watcher() {
    let server = server(&["--app", "shop"]);
    let client = server.client().await;
    let record = Arc::new(StdMutex::new(Record::default()));
    worker(&client, "w1", Behaviour::Ok, record.clone()).await;
    worker(&client, "w2", Behaviour::Error, record.clone()).await;
    worker(&client, "w3", Behaviour::Silent, record.clone()).await;
    let mut tail_client = client.clone();
    let (mut tail, _) = subscribe(
        &mut tail_client,
        SubscribeRequest {
            id: "tail".into(),
            channels: vec!["shop:>".into()],
            ..SubscribeRequest::default()
        },
    )
    .await;

    let mut operator = client.clone();
    let dry = operator
        .gather(GatherRequest {
            target: ":worker".into(),
            op: "status".into(),
            dry_run: true,
            ..GatherRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.state(), State::DryRun);
    assert_eq!(dry.expected, 3);
    assert!(
        record.lock().unwrap().asked.is_empty(),
        "a dry run sends nothing"
    );

    let ledger = operator
        .gather(GatherRequest {
            target: ":worker".into(),
            op: "status".into(),
            timeout_ms: 1_000,
            key: "g-1".into(),
            ..GatherRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ledger.state(), State::Done);
    assert_eq!(
        statuses(&ledger),
        [
            ("w1".to_string(), Status::Ok),
            ("w2".into(), Status::Failed),
            ("w3".into(), Status::NoReply)
        ]
    );
    assert_eq!((ledger.ok, ledger.failed, ledger.no_reply), (1, 1, 1));
    assert_eq!(
        ledger.outcomes[1].detail,
        "replied with error: restart failed"
    );
    assert_eq!(ledger.outcomes[2].detail, "no answer within 1000 ms");
    {
        let record = record.lock().unwrap();
        let asked = &record.asked["w1"][0];
        assert_eq!(asked.headers["ipc-op-id"], ledger.id);
        assert_eq!(asked.headers["ipc-op-key"], "g-1");
        assert_eq!(asked.channel, "shop:worker");
    }
    // The tail saw none of it: its next message is this broadcast.
    operator
        .broadcast(broadcast("shop:news", "note", serde_json::json!(1)))
        .await
        .unwrap();
    assert_eq!(next(&mut tail).await.op, "note");

    // The same key: the same ledger, nothing asked again.
    let again = operator
        .gather(GatherRequest {
            target: ":worker".into(),
            op: "status".into(),
            timeout_ms: 1_000,
            key: "g-1".into(),
            ..GatherRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, ledger.id);
    assert_eq!(record.lock().unwrap().asked["w1"].len(), 1);
    // The key for another op, or for a rollout: refused.
    let other = operator
        .gather(GatherRequest {
            target: ":worker".into(),
            op: "reload".into(),
            key: "g-1".into(),
            ..GatherRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    let rollout = operator
        .rollout(RolloutRequest {
            target: ":worker".into(),
            op: "status".into(),
            key: "g-1".into(),
            ..RolloutRequest::default()
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(rollout.code(), Code::FailedPrecondition, "{rollout:?}");

    // Nobody: UNAVAILABLE, except for a dry run.
    let nobody = operator
        .gather(GatherRequest {
            target: ":nobody".into(),
            op: "status".into(),
            ..GatherRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::Unavailable);
    // With a label selector: only those with the label.
    let labelled = operator
        .gather(GatherRequest {
            target: ":worker".into(),
            op: "status".into(),
            labels: [("zone".to_string(), "eu".to_string())].into(),
            dry_run: true,
            ..GatherRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((labelled.state(), labelled.expected), (State::DryRun, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_goes_in_waves_stops_past_the_budget_and_resumes_by_key() {
    let server = server(&["--app", "shop"]);
    let client = server.client().await;
    let record = Arc::new(StdMutex::new(Record::default()));
    for id in ["a1", "a2", "a3", "a4"] {
        worker(&client, id, Behaviour::Ok, record.clone()).await;
    }
    worker(&client, "b1", Behaviour::Error, record.clone()).await;
    for id in ["c1", "c2"] {
        worker(&client, id, Behaviour::Ok, record.clone()).await;
    }
    let mut operator = client.clone();
    let request = RolloutRequest {
        target: ":worker".into(),
        op: "restart".into(),
        wave_size: 2,
        max_failures: 0,
        timeout_ms: 2_000,
        key: "r-1".into(),
        ..RolloutRequest::default()
    };
    let plan = events(
        operator
            .rollout(RolloutRequest {
                dry_run: true,
                ..request.clone()
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let plan = plan.last().unwrap().ledger.clone().unwrap();
    assert_eq!((plan.state(), plan.waves), (State::DryRun, 4));
    assert!(record.lock().unwrap().asked.is_empty());

    let run = events(
        operator
            .rollout(request.clone())
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let ledger = run.last().unwrap().ledger.clone().unwrap();
    // Waves: [a1 a2] [a3 a4] [b1 c1] — b1 fails, so [c2] never starts.
    assert_eq!(ledger.state(), State::Stopped);
    assert_eq!(
        statuses(&ledger),
        [
            ("a1".to_string(), Status::Ok),
            ("a2".into(), Status::Ok),
            ("a3".into(), Status::Ok),
            ("a4".into(), Status::Ok),
            ("b1".into(), Status::Failed),
            ("c1".into(), Status::Ok),
            ("c2".into(), Status::Pending),
        ]
    );
    assert_eq!(run.len(), 7, "one event per outcome, then the ledger");
    {
        let record = record.lock().unwrap();
        assert!(
            !record.asked.contains_key("c2"),
            "a member past the stop is never asked"
        );
        assert!(
            record.most_in_flight <= 2,
            "at most wave_size in flight: {}",
            record.most_in_flight
        );
        assert_eq!(record.asked["a3"][0].headers["ipc-op-wave"], "2");
    }

    // Rerun with the key and a larger budget: OK members SKIPPED, the rest asked.
    let rerun = events(
        operator
            .rollout(RolloutRequest {
                max_failures: 1,
                ..request.clone()
            })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let resumed = rerun.last().unwrap().ledger.clone().unwrap();
    assert_eq!(resumed.id, ledger.id, "the same ledger id");
    assert_eq!(resumed.state(), State::Done);
    assert_eq!(resumed.skipped, 5);
    assert_eq!(resumed.failed, 1);
    let record = record.lock().unwrap();
    assert_eq!(
        record.asked["a1"].len(),
        1,
        "an OK member is never asked again"
    );
    assert_eq!(record.asked["b1"].len(), 2);
    assert_eq!(record.asked["c2"].len(), 1);
}

/// Two calls with the same key at the same time never both ask the members: a
/// second Gather waits for the first and answers its ledger; a second Rollout,
/// while the first is alive, is refused with ABORTED naming the coordinating node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_at_the_same_time_asks_the_members_once() {
    let server = server(&["--app", "shop", "--node", "cp-1"]);
    let client = server.client().await;
    let record = Arc::new(StdMutex::new(Record::default()));
    worker(&client, "g1", Behaviour::Ok, record.clone()).await;
    worker(&client, "g2", Behaviour::Ok, record.clone()).await;

    let gather = GatherRequest {
        target: ":worker".into(),
        op: "status".into(),
        timeout_ms: 5_000,
        key: "same-gather".into(),
        ..GatherRequest::default()
    };
    let (mut one, mut two) = (client.clone(), client.clone());
    let (first, second) = tokio::join!(one.gather(gather.clone()), two.gather(gather));
    let (first, second) = (first.unwrap().into_inner(), second.unwrap().into_inner());
    assert_eq!(first.id, second.id, "one ledger for both calls");
    assert_eq!((first.state(), first.ok), (State::Done, 2));
    {
        let record = record.lock().unwrap();
        assert_eq!(record.asked["g1"].len(), 1, "asked once");
        assert_eq!(record.asked["g2"].len(), 1, "asked once");
    }

    // A rollout held up by a silent member, and a second one with its key.
    worker(&client, "h1", Behaviour::Silent, record.clone()).await;
    let rollout = RolloutRequest {
        target: "h1".into(),
        op: "restart".into(),
        timeout_ms: 30_000,
        key: "same-rollout".into(),
        ..RolloutRequest::default()
    };
    let mut operator = client.clone();
    let running = operator
        .rollout(rollout.clone())
        .await
        .unwrap()
        .into_inner();
    let give_up = tokio::time::Instant::now() + PATIENCE;
    while !record.lock().unwrap().asked.contains_key("h1") {
        assert!(tokio::time::Instant::now() < give_up, "h1 never asked");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let refused = operator.rollout(rollout).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(
        refused.message().contains("key \"same-rollout\" is in use")
            && refused.message().contains("\"cp-1\""),
        "{}",
        refused.message()
    );
    assert_eq!(record.lock().unwrap().asked["h1"].len(), 1, "asked once");
    drop(running);
}
