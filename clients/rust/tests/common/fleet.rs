//! Workers for the Gather and Rollout tests: client tasks subscribed as responders
//! of role `worker` (app `shop`) that answer OK, with an error, or never, and
//! record what they were asked and how many were busy at once — so the tests
//! assert what the workers saw, not what timing suggests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc_client::{Client, Handlers, Msg, OP_SUBSCRIBED, SubscribeOptions};
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use ipc_testkit::PATIENCE;

/// How a worker answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// A reply with `error`: "disk full on <id>".
    Error,
    /// Never.
    Silent,
}

/// What the workers of one test saw.
#[derive(Debug, Default)]
pub struct Record {
    /// Requests by member id, in the order received.
    pub asked: BTreeMap<String, Vec<Msg>>,
    busy: usize,
    /// The most workers busy with a request at the same moment.
    pub most_busy: usize,
}

pub type Shared = Arc<Mutex<Record>>;

/// How long a worker works on a request before it answers: long enough that two
/// waves overlapping would show in `most_busy`.
const WORK: Duration = Duration::from_millis(100);

/// Starts a worker `id` on `url` taking requests of `op`; returns once it is
/// subscribed. Aborting the handle disconnects it.
pub async fn worker(
    url: &str,
    id: &str,
    op: &str,
    answer: Answer,
    record: Shared,
) -> JoinHandle<()> {
    worker_with(
        url,
        SubscribeOptions::new().id(id).role("worker"),
        op,
        answer,
        record,
    )
    .await
}

/// [`worker`] with its own subscription options (labels, another role).
pub async fn worker_with(
    url: &str,
    options: SubscribeOptions,
    op: &str,
    answer: Answer,
    record: Shared,
) -> JoinHandle<()> {
    let client = Client::builder(url)
        .app("shop")
        .connect()
        .await
        .expect("worker connects");
    let id = options.id.clone();
    let subscribed = Arc::new(Notify::new());
    let mut handlers = Handlers::new();
    let signal = subscribed.clone();
    handlers
        .on(OP_SUBSCRIBED, move |_| {
            let signal = signal.clone();
            async move {
                signal.notify_one();
                Ok(json!(null))
            }
        })
        .on(op, move |msg: Msg| {
            let (record, id) = (record.clone(), id.clone());
            async move {
                {
                    let mut r = record.lock().unwrap();
                    r.asked.entry(id.clone()).or_default().push(msg);
                    r.busy += 1;
                    r.most_busy = r.most_busy.max(r.busy);
                }
                tokio::time::sleep(WORK).await;
                record.lock().unwrap().busy -= 1;
                match answer {
                    Answer::Ok => Ok(json!({"member": id})),
                    Answer::Error => Err(format!("disk full on {id}")),
                    Answer::Silent => futures::future::pending().await,
                }
            }
        });
    let task = tokio::spawn(async move {
        let _ = handlers.run(&client, options).await;
    });
    tokio::time::timeout(PATIENCE, subscribed.notified())
        .await
        .expect("the worker subscribed");
    task
}

/// How many times each member was asked.
pub fn asked_counts(record: &Shared) -> BTreeMap<String, usize> {
    record
        .lock()
        .unwrap()
        .asked
        .iter()
        .map(|(id, requests)| (id.clone(), requests.len()))
        .collect()
}
