//! The bus conformance suite: the rules of docs/design.md that every bus must keep,
//! written once and run in-process against each bus — the memory bus, the Redis
//! bus, the sidecar's upstream bus.
//!
//! A bus's test file makes a [`Fleet`] (nodes sharing one bus, with whatever must
//! live as long as they do: a `redis-server`, a control plane) and hands the
//! function that makes it to [`bus_conformance!`](crate::bus_conformance), which
//! writes one test per rule:
//!
//! - **order**: per channel, a subscriber sees messages in log order, each once;
//! - **resume**: subscribing again with a cursor replays what was missed, then
//!   continues live, with no gap and no duplicate;
//! - **gap**: a cursor that fell out of the log's retention gets `ipc:gap`
//!   `{cursor, reason}` first, then what the log still holds;
//! - **requests**: a request reaches one responder, on another node too, and its
//!   reply comes back; no responder at all is "no responders", not a timeout; no
//!   reply in time is a deadline exceeded; a reply after that is NOT_FOUND.
//!
//! Messages are published on one node and received on another (the last one), so
//! a bus with several nodes is tested across them; a bus of one node alone (the
//! memory bus) is a fleet of one.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::cursor::Cursor;
use ipc_core::node::{DEADLINE_HEADER, SubscribeStream};
use ipc_core::notice::{self, Gap};
use ipc_core::{Caller, Node, NodeError};
use ipc_proto::json::{from_optional, to_value};
use ipc_proto::pb::{
    BroadcastRequest, MembersRequest, Msg, ReplyRequest, SendMsgRequest, SubscribeRequest,
};

pub use crate::stream::PATIENCE;
use crate::stream::next;

/// What a fleet under test is made with.
#[derive(Debug, Clone, Copy)]
pub struct FleetSpec {
    /// Entries the log keeps for resume (about: Redis trims whole stream nodes).
    pub retention: usize,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self { retention: 10_000 }
    }
}

/// The retention of the fleet the gap rule runs on; it then publishes
/// [`PUBLISHED_PAST_RETENTION`] entries, enough for any bus to drop the first.
pub const SMALL_RETENTION: usize = 10;

/// Entries published after a cursor to push it out of [`SMALL_RETENTION`] (Redis
/// trims in stream nodes of 100 entries).
pub const PUBLISHED_PAST_RETENTION: u64 = 300;

/// Nodes sharing one bus, and what must outlive them.
pub struct Fleet {
    nodes: Vec<Arc<Node>>,
    _keep: Box<dyn Any + Send + Sync>,
}

impl Fleet {
    /// A fleet of `nodes` (at least one), keeping `keep` alive as long as it is.
    pub fn new(nodes: Vec<Arc<Node>>, keep: impl Any + Send + Sync) -> Self {
        assert!(!nodes.is_empty(), "a fleet has at least one node");
        Self {
            nodes,
            _keep: Box::new(keep),
        }
    }

    /// The node that publishes and asks.
    pub fn near(&self) -> &Arc<Node> {
        &self.nodes[0]
    }

    /// The node that subscribes and answers: another one when there are several.
    pub fn far(&self) -> &Arc<Node> {
        self.nodes.last().expect("a fleet has at least one node")
    }
}

/// Waits until `node`'s bus is healthy (connected, following its log), failing
/// the test after [`PATIENCE`]: a fleet's nodes are ready before the rules run.
pub async fn serving(node: &Node) {
    let mut health = node.bus().health();
    patiently(
        &format!("{} becoming healthy", node.name()),
        health.wait_for(|serving| *serving),
    )
    .await
    .expect("the bus keeps its health while the node lives");
}

/// Writes one `#[tokio::test]` per rule of the suite, each on a fleet made by
/// `$make`, an async function taking a [`FleetSpec`] and returning a [`Fleet`].
#[macro_export]
macro_rules! bus_conformance {
    ($make:ident) => {
        mod bus_conformance {
            use $crate::conformance::{self, FleetSpec};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn each_channel_is_delivered_in_log_order_once() {
                conformance::order_per_channel(super::$make(FleetSpec::default()).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn resume_replays_what_was_missed_without_gap_or_duplicate() {
                conformance::resume_without_gap_or_duplicate(
                    super::$make(FleetSpec::default()).await,
                )
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cursor_out_of_retention_gets_a_gap_first() {
                let spec = FleetSpec {
                    retention: conformance::SMALL_RETENTION,
                };
                conformance::gap_past_retention(super::$make(spec).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_request_reaches_one_responder_and_its_reply_comes_back() {
                conformance::request_and_reply(super::$make(FleetSpec::default()).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn no_responder_is_no_responders_not_a_timeout() {
                conformance::no_responders(super::$make(FleetSpec::default()).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn no_reply_in_time_is_deadline_exceeded_and_a_late_reply_not_found() {
                conformance::deadline_then_late_reply(super::$make(FleetSpec::default()).await)
                    .await;
            }
        }
    };
}

fn caller(name: &str) -> Caller {
    Caller {
        sender: name.to_string(),
        ..Caller::default()
    }
}

/// Waits for `future`, failing the test after [`PATIENCE`].
async fn patiently<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
}

/// Opens a stream and reads its `ipc:subscribed`. A bus that cannot tell where its
/// log stands yet (still connecting) refuses with UNAVAILABLE: asked again until
/// it can.
async fn subscribe(node: &Node, request: SubscribeRequest) -> SubscribeStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match node.subscribe(&caller(&request.id), request.clone()).await {
            Ok(mut stream) => {
                let hello = next(&mut stream).await;
                assert_eq!(
                    hello.op,
                    notice::SUBSCRIBED,
                    "a stream opens with ipc:subscribed"
                );
                return stream;
            }
            Err(NodeError::Unavailable(_)) if Instant::now() < deadline => {
                pause_before_asking_again().await;
            }
            Err(error) => panic!("subscribe {:?}: {error}", request.channels),
        }
    }
}

/// A short pause between two asks of a real answer that is not there yet.
async fn pause_before_asking_again() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn watching(id: &str, channels: &[&str], cursor: &str) -> SubscribeRequest {
    SubscribeRequest {
        id: id.to_string(),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        cursor: cursor.to_string(),
        ..SubscribeRequest::default()
    }
}

/// The number a message of the suite carries.
fn number(msg: &Msg) -> u64 {
    from_optional(msg.data.as_ref())
        .as_f64()
        .unwrap_or_else(|| panic!("message {} ({}) carries no number", msg.id, msg.op)) as u64
}

fn cursor(msg: &Msg) -> Cursor {
    msg.cursor
        .parse()
        .unwrap_or_else(|e| panic!("message {} has no cursor: {e}", msg.op))
}

async fn publish(node: &Node, channel: &str, n: u64) -> String {
    let request = BroadcastRequest {
        channel: channel.to_string(),
        op: "conformance:n".into(),
        data: Some(to_value(&n.into())),
        ..BroadcastRequest::default()
    };
    patiently("broadcast", node.broadcast(&caller("publisher"), request))
        .await
        .unwrap_or_else(|e| panic!("broadcast {n} on {channel}: {e}"))
        .cursor
}

/// Waits until `node` lists member `id` (a bus may learn of another node's
/// subscribers a little later).
async fn wait_for_member(node: &Node, id: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let members = node
            .members(&caller("conformance"), MembersRequest::default())
            .await;
        if let Ok(members) = &members
            && members.iter().any(|m| m.id == id)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never listed responder {id}: {members:?}",
            node.name()
        );
        pause_before_asking_again().await;
    }
}

/// Per channel, a subscriber sees messages in log order, each once, while two
/// publishers publish on two channels at once.
pub async fn order_per_channel(fleet: Fleet) {
    const EACH: u64 = 100;
    let mut stream = subscribe(fleet.far(), watching("conf-order", &["conf:order:*"], "")).await;
    let publishers: Vec<_> = ["conf:order:a", "conf:order:b"]
        .into_iter()
        .map(|channel| {
            let node = fleet.near().clone();
            tokio::spawn(async move {
                for n in 0..EACH {
                    publish(&node, channel, n).await;
                }
            })
        })
        .collect();
    let mut next_of = std::collections::HashMap::from([
        ("conf:order:a".to_string(), 0u64),
        ("conf:order:b".to_string(), 0u64),
    ]);
    let mut last: Option<Cursor> = None;
    for _ in 0..2 * EACH {
        let msg = next(&mut stream).await;
        let expected = next_of
            .get_mut(&msg.channel)
            .unwrap_or_else(|| panic!("a message of {:?}, not subscribed to", msg.channel));
        assert_eq!(number(&msg), *expected, "on {}", msg.channel);
        *expected += 1;
        let here = cursor(&msg);
        if let Some(last) = last {
            assert_eq!(here.epoch, last.epoch, "one log");
            assert!(
                here.position() > last.position(),
                "log order: {last} then {here}"
            );
        }
        last = Some(here);
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    assert!(next_of.values().all(|n| *n == EACH), "{next_of:?}");
}

/// A subscriber that resumes from the cursor of the last message it handled gets
/// exactly what came after it: replayed, then live, nothing twice, no `ipc:gap`.
pub async fn resume_without_gap_or_duplicate(fleet: Fleet) {
    let channel = "conf:resume";
    let mut stream = subscribe(fleet.far(), watching("conf-resume", &[channel], "")).await;
    for n in 0..10 {
        publish(fleet.near(), channel, n).await;
    }
    let mut handled = None;
    for n in 0..4 {
        let msg = next(&mut stream).await;
        assert_eq!(number(&msg), n);
        handled = Some(msg.cursor.clone());
    }
    drop(stream);
    for n in 10..20 {
        publish(fleet.near(), channel, n).await;
    }
    let handled = handled.expect("four messages handled");
    let mut stream = subscribe(fleet.far(), watching("conf-resume", &[channel], &handled)).await;
    for n in 4..20 {
        let msg = next(&mut stream).await;
        assert_ne!(msg.op, notice::GAP, "nothing was lost: {msg:?}");
        assert_eq!(number(&msg), n, "replayed, then live, in order");
    }
    // Nothing more than what was published: the next one is the next one.
    publish(fleet.near(), channel, 20).await;
    assert_eq!(number(&*next(&mut stream).await), 20, "no duplicate");
}

/// A cursor older than what the log retains gets `ipc:gap` `{cursor, reason}`
/// first — loss reported, never hidden — then what the log still holds, in order,
/// up to the newest.
pub async fn gap_past_retention(fleet: Fleet) {
    let channel = "conf:gap";
    let mut stream = subscribe(fleet.far(), watching("conf-gap", &[channel], "")).await;
    publish(fleet.near(), channel, 0).await;
    let first = next(&mut stream).await;
    assert_eq!(number(&first), 0);
    drop(stream);
    for n in 1..=PUBLISHED_PAST_RETENTION {
        publish(fleet.near(), channel, n).await;
    }
    let mut stream = subscribe(fleet.far(), watching("conf-gap", &[channel], &first.cursor)).await;
    let notice = next(&mut stream).await;
    let gap =
        Gap::from_msg(&notice).unwrap_or_else(|| panic!("expected ipc:gap first, got {notice:?}"));
    assert_eq!(
        gap.cursor, first.cursor,
        "the gap names the cursor it follows"
    );
    assert!(!gap.reason.is_empty(), "the gap says why");
    let mut previous = None;
    loop {
        let msg = next(&mut stream).await;
        let n = number(&msg);
        assert!(n > 1, "message {n} was dropped by retention, yet replayed");
        if let Some(previous) = previous {
            assert_eq!(n, previous + 1, "what is kept comes whole, in order");
        }
        if n == PUBLISHED_PAST_RETENTION {
            break;
        }
        previous = Some(n);
    }
}

/// A responder on `fleet.far()` (id `id`, role `conf:worker`), once every node
/// knows it.
async fn responder(fleet: &Fleet, id: &str) -> SubscribeStream {
    let request = SubscribeRequest {
        id: id.to_string(),
        app: "conf".into(),
        role: "worker".into(),
        ..SubscribeRequest::default()
    };
    let stream = subscribe(fleet.far(), request).await;
    wait_for_member(fleet.near(), id).await;
    stream
}

fn ask(target: &str, timeout_ms: u32) -> SendMsgRequest {
    SendMsgRequest {
        target: target.to_string(),
        op: "conformance:ask".into(),
        data: Some(to_value(&7.into())),
        timeout_ms,
        ..SendMsgRequest::default()
    }
}

/// The next request a responder is handed (skipping broadcasts).
async fn next_request(stream: &mut SubscribeStream) -> Arc<Msg> {
    loop {
        let msg = next(stream).await;
        if !msg.reply_to.is_empty() {
            return msg;
        }
    }
}

/// A request reaches a responder (on another node when there is one), by id and
/// by role, and its reply, error included, comes back to the caller.
pub async fn request_and_reply(fleet: Fleet) {
    let mut worker = responder(&fleet, "conf-worker-1").await;
    for (target, error) in [("conf-worker-1", ""), ("conf:worker", "busy")] {
        let asking = {
            let node = fleet.near().clone();
            let request = ask(target, PATIENCE.as_millis() as u32);
            tokio::spawn(async move { node.send_msg(&caller("asker"), request, None).await })
        };
        let request = next_request(&mut worker).await;
        assert_eq!(request.op, "conformance:ask");
        assert_eq!(number(&request), 7);
        let reply = ReplyRequest {
            reply_to: request.reply_to.clone(),
            op: "conformance:answer".into(),
            data: Some(to_value(&8.into())),
            error: error.to_string(),
            ..ReplyRequest::default()
        };
        patiently("reply", fleet.far().reply(&caller("conf-worker-1"), reply))
            .await
            .expect("the reply is delivered");
        let answer = patiently("answer", asking)
            .await
            .expect("asker")
            .unwrap_or_else(|e| panic!("SendMsg to {target}: {e}"));
        assert_eq!(answer.op, "conformance:answer");
        assert_eq!(number(&answer), 8);
        assert_eq!(
            answer.error, error,
            "a reply with an error comes back as a reply"
        );
    }
}

/// Waits until the deadline a request carries (`ipc-deadline-ms`) is well past.
async fn past_deadline_of(request: &Msg) {
    let deadline_ms: i64 = request
        .headers
        .get(DEADLINE_HEADER)
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("a request carries {DEADLINE_HEADER}: {request:?}"));
    let left = Duration::from_millis((deadline_ms - ipc_core::now_ms()).max(0) as u64);
    tokio::time::sleep(left + LATE_MARGIN).await;
}

/// How long after a request's deadline its reply is sent to be certainly late,
/// however loaded the machine running the responder's timer.
const LATE_MARGIN: Duration = Duration::from_secs(1);

/// A request to a target nobody takes requests for is refused as "no responders"
/// — not left to time out, however long the caller would wait.
pub async fn no_responders(fleet: Fleet) {
    // A watcher of the target is no responder.
    let _watcher = subscribe(fleet.far(), watching("conf-watcher", &["conf:idle"], "")).await;
    let asked = patiently(
        "SendMsg to nobody",
        fleet
            .near()
            .send_msg(&caller("asker"), ask("conf:idle", 120_000), None),
    )
    .await;
    match asked {
        Err(NodeError::NoResponders(_)) => {}
        other => panic!("expected no responders, got {other:?}"),
    }
}

/// A responder that does not answer in time: the caller gets DEADLINE_EXCEEDED;
/// the reply that comes after it is NOT_FOUND (nobody waits for it any more).
pub async fn deadline_then_late_reply(fleet: Fleet) {
    let mut worker = responder(&fleet, "conf-worker-2").await;
    let asking = {
        let node = fleet.near().clone();
        tokio::spawn(async move {
            node.send_msg(&caller("asker"), ask("conf-worker-2", 300), None)
                .await
        })
    };
    let request = next_request(&mut worker).await;
    match patiently("SendMsg without a reply", asking)
        .await
        .expect("asker")
    {
        Err(NodeError::DeadlineExceeded(_)) => {}
        other => panic!("expected deadline exceeded, got {other:?}"),
    }
    // The responder's node forgets the request at the deadline it handed over with
    // it, on its own timer, which may fire a little after the caller's (a request
    // crossing nodes carries what was left of the wait): the reply is late once
    // that one passed too.
    past_deadline_of(&request).await;
    let late = ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: "conformance:answer".into(),
        ..ReplyRequest::default()
    };
    match patiently(
        "late reply",
        fleet.far().reply(&caller("conf-worker-2"), late),
    )
    .await
    {
        Err(NodeError::NotFound(_)) => {}
        other => panic!("expected NOT_FOUND for a late reply, got {other:?}"),
    }
}
