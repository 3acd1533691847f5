//! [`Subscription`]: a Subscribe stream that survives node restarts, dropped
//! connections and slow-consumer cut-offs, so that callers never write reconnect code.
//!
//! Each (re)connection sends the same subscriber id (the one the node assigned on the
//! first connection, unless the caller chose one) and the cursor of the last message
//! delivered, so the node replays what was missed. Messages whose cursor was already
//! delivered are dropped. When the node cannot replay (`ipc:gap`), the gap is passed
//! on: loss is reported, never hidden.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use futures::stream::BoxStream;
use ipc_proto::backoff::Backoff;
use ipc_proto::pb;
use tracing::{debug, warn};

use crate::msg::{OP_GAP, OP_SUBSCRIBED};
use crate::{Client, Error, Msg};

/// How many recent cursors are remembered to drop redelivered messages. Replays start
/// right after the resume cursor, so duplicates can only be recent ones.
const SEEN_CURSORS: usize = 4096;

/// What to subscribe to. Empty fields are not sent.
///
/// ```
/// use ipc_client::SubscribeOptions;
/// let options = SubscribeOptions::new().role("worker").tag("eu").channel("shop:deploys");
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeOptions {
    /// Channel names or patterns (`*` one segment, `>` the rest); `:x` is `<app>:x`.
    pub channels: Vec<String>,
    /// Subscriber id; the node generates one when empty. Kept across reconnects.
    pub id: String,
    /// Role: also subscribes to `<app>:<role>`.
    pub role: String,
    /// Tag within the role: also subscribes to `<app>:<role>:<tag>`.
    pub tag: String,
    /// Labels, shown by `members` and usable as its filter.
    pub labels: BTreeMap<String, String>,
    /// Start after this cursor (replaying what came after it) instead of live.
    pub cursor: String,
    /// Delays between reconnection attempts.
    pub backoff: Backoff,
}

impl SubscribeOptions {
    /// No channels, no role: only requests addressed to the subscriber's own id.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a channel or pattern.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channels.push(channel.into());
        self
    }

    /// Sets the subscriber id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the role.
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.role = role.into();
        self
    }

    /// Sets the tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Resumes after `cursor`.
    pub fn cursor(mut self, cursor: impl Into<String>) -> Self {
        self.cursor = cursor.into();
        self
    }
}

/// A self-healing subscription: a stream of the messages of its channels and of the
/// requests addressed to it.
///
/// - The first message of each connection is `ipc:subscribed` (data `{"id", "node"}`);
///   a second one means the stream reconnected.
/// - After a failure (node unreachable or shutting down, connection lost, cut off as a
///   slow consumer) it reconnects with [`Backoff`] and resumes from the last cursor.
/// - `ipc:gap` is passed on when the node could not replay everything.
/// - It yields `Err` only for a failure that retrying cannot fix (bad channel,
///   permission denied), and then ends.
///
/// Dropping it closes the stream.
pub struct Subscription {
    inner: BoxStream<'static, Result<Msg, Error>>,
}

impl Subscription {
    pub(crate) fn new(client: Client, options: SubscribeOptions) -> Subscription {
        Self::resuming(Resumer::new(client, options, None))
    }

    /// The same subscription on Serve streams: requests are answered on the stream
    /// they came on, through the returned [`ServeReplies`].
    pub(crate) fn serving(
        client: Client,
        options: SubscribeOptions,
    ) -> (Subscription, ServeReplies) {
        let replies = ServeReplies::default();
        let state = Resumer::new(client, options, Some(replies.clone()));
        (Self::resuming(state), replies)
    }

    fn resuming(state: Resumer) -> Subscription {
        let inner = futures::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        });
        Subscription {
            inner: Box::pin(inner),
        }
    }
}

impl Stream for Subscription {
    type Item = Result<Msg, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

/// Where the replies of a serving [`Subscription`] go: its Serve stream open now.
#[derive(Clone, Default)]
pub(crate) struct ServeReplies {
    current: Arc<Mutex<Option<tokio::sync::mpsc::Sender<pb::ServeRequest>>>>,
}

impl ServeReplies {
    /// Sends `reply` on the current Serve stream; gives it back when there is none
    /// (reconnecting, or the node has no Serve) for the unary Reply.
    pub(crate) async fn send(&self, reply: pb::ReplyRequest) -> Result<(), pb::ReplyRequest> {
        let current = self.current.lock().expect("not poisoned").clone();
        let Some(stream) = current else {
            return Err(reply);
        };
        let request = pb::ServeRequest {
            kind: Some(pb::serve_request::Kind::Reply(reply)),
        };
        stream
            .send(request)
            .await
            .map_err(|back| match back.0.kind {
                Some(pb::serve_request::Kind::Reply(reply)) => reply,
                _ => unreachable!("only replies are sent"),
            })
    }

    fn set(&self, stream: Option<tokio::sync::mpsc::Sender<pb::ServeRequest>>) {
        *self.current.lock().expect("not poisoned") = stream;
    }
}

/// The state behind [`Subscription`].
struct Resumer {
    client: Client,
    /// What the next (re)connection sends: id and cursor are updated as messages arrive.
    request: pb::SubscribeRequest,
    backoff: Backoff,
    /// Consecutive failures since the last message received; drives the backoff.
    failures: u32,
    stream: Option<tonic::Streaming<pb::Msg>>,
    seen: SeenCursors,
    finished: bool,
    /// Serving: each connection is a Serve stream whose sender goes here.
    serve: Option<ServeReplies>,
}

impl Resumer {
    fn new(client: Client, options: SubscribeOptions, serve: Option<ServeReplies>) -> Resumer {
        let SubscribeOptions {
            channels,
            id,
            role,
            tag,
            labels,
            cursor,
            backoff,
        } = options;
        Resumer {
            client,
            request: pb::SubscribeRequest {
                channels,
                id,
                app: String::new(),
                role,
                tag,
                labels: labels.into_iter().collect(),
                cursor,
                members: Vec::new(),
                role_watcher: false,
            },
            backoff,
            failures: 0,
            stream: None,
            seen: SeenCursors::default(),
            finished: false,
            serve,
        }
    }

    async fn next(&mut self) -> Option<Result<Msg, Error>> {
        loop {
            if self.finished {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                if self.failures > 0 {
                    tokio::time::sleep(self.backoff.delay(self.failures - 1)).await;
                }
                match self.open().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(err) => {
                        if let Some(fatal) = self.fail(err) {
                            return Some(Err(fatal));
                        }
                    }
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(msg)) => {
                    self.failures = 0;
                    if let Some(msg) = self.accept(Msg::from(msg)) {
                        return Some(Ok(msg));
                    }
                }
                Ok(None) => {
                    // A node ends streams with a status; a bare end is a lost connection.
                    self.lost();
                    if let Some(fatal) = self.fail(Error::Unreachable("stream ended".into())) {
                        return Some(Err(fatal));
                    }
                }
                Err(status) => {
                    self.lost();
                    if let Some(fatal) = self.fail(Error::from_status(status, "")) {
                        return Some(Err(fatal));
                    }
                }
            }
        }
    }

    /// Opens the next stream: Serve when serving (a node without Serve, older than
    /// it, gets Subscribe and unary replies from then on), else Subscribe.
    async fn open(&mut self) -> Result<tonic::Streaming<pb::Msg>, Error> {
        let Some(serve) = &self.serve else {
            return self.client.open_subscription(self.request.clone()).await;
        };
        match self.client.open_serve(self.request.clone()).await {
            Ok((stream, replies)) => {
                serve.set(Some(replies));
                Ok(stream)
            }
            Err(err) if err.code() == tonic::Code::Unimplemented => {
                debug!("the node has no Serve: subscribing, replies as unary calls");
                self.serve = None;
                self.client.open_subscription(self.request.clone()).await
            }
            Err(err) => Err(err),
        }
    }

    /// The stream is gone: replies wait for the next one (or go as unary calls).
    fn lost(&mut self) {
        self.stream = None;
        if let Some(serve) = &self.serve {
            serve.set(None);
        }
    }

    /// Records a failure: `None` to retry, or the error that ends the subscription.
    fn fail(&mut self, err: Error) -> Option<Error> {
        if err.is_transient() {
            self.failures = self.failures.saturating_add(1);
            warn!(error = %err, failures = self.failures, cursor = %self.request.cursor,
                "subscription interrupted; reconnecting");
            None
        } else {
            self.finished = true;
            Some(err)
        }
    }

    /// Tracks id and cursor; `None` for a duplicate to drop.
    fn accept(&mut self, msg: Msg) -> Option<Msg> {
        if msg.op == OP_SUBSCRIBED
            && self.request.id.is_empty()
            && let Some(id) = msg.data.get("id").and_then(|id| id.as_str())
        {
            self.request.id = id.to_owned();
        }
        if msg.op == OP_GAP {
            // The log was lost or trimmed: cursors from before may be reused by the new
            // log, so they must not mark new messages as duplicates.
            self.seen.clear();
        }
        if !msg.cursor.is_empty() {
            if !self.seen.insert(&msg.cursor) {
                debug!(cursor = %msg.cursor, op = %msg.op, "dropping a redelivered message");
                return None;
            }
            self.request.cursor.clone_from(&msg.cursor);
        }
        Some(msg)
    }
}

/// The most recent cursors delivered, bounded.
#[derive(Default)]
struct SeenCursors {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl SeenCursors {
    /// `false` when `cursor` was already delivered.
    fn insert(&mut self, cursor: &str) -> bool {
        if self.set.contains(cursor) {
            return false;
        }
        if self.order.len() == SEEN_CURSORS
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.order.push_back(cursor.to_owned());
        self.set.insert(cursor.to_owned());
        true
    }

    fn clear(&mut self) {
        self.order.clear();
        self.set.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn resumer(options: SubscribeOptions) -> Resumer {
        let client = Client::builder("/tmp/unused.sock").connect_lazy().unwrap();
        Resumer::new(client, options, None)
    }

    fn msg(op: &str, cursor: &str) -> Msg {
        Msg {
            op: op.into(),
            cursor: cursor.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn keeps_the_assigned_id_and_the_last_cursor_for_the_next_connection() {
        let mut state = resumer(SubscribeOptions::new().role("worker"));
        let subscribed = Msg {
            op: OP_SUBSCRIBED.into(),
            data: json!({"id": "w-1", "node": "n1"}),
            ..Default::default()
        };
        assert!(state.accept(subscribed).is_some());
        assert!(state.accept(msg("a", "5")).is_some());
        assert_eq!(state.request.id, "w-1");
        assert_eq!(state.request.cursor, "5");
        assert_eq!(state.request.role, "worker");
        // A later `ipc:subscribed` from another node does not change a known id.
        let other = Msg {
            op: OP_SUBSCRIBED.into(),
            data: json!({"id": "other", "node": "n2"}),
            ..Default::default()
        };
        assert!(state.accept(other).is_some());
        assert_eq!(state.request.id, "w-1");
    }

    #[tokio::test]
    async fn drops_redelivered_cursors_until_a_gap_resets_the_log() {
        let mut state = resumer(SubscribeOptions::new());
        assert!(state.accept(msg("a", "1")).is_some());
        assert!(state.accept(msg("a", "1")).is_none());
        assert!(state.accept(msg("system", "")).is_some());
        assert!(state.accept(msg("system", "")).is_some());
        assert!(state.accept(msg(OP_GAP, "")).is_some());
        // A restarted log numbers from the start again; those are new messages.
        assert!(state.accept(msg("a", "1")).is_some());
    }

    #[tokio::test]
    async fn transient_failures_retry_and_bad_input_ends_the_stream() {
        let mut state = resumer(SubscribeOptions::new());
        assert!(state.fail(Error::Unreachable("down".into())).is_none());
        assert!(
            state
                .fail(Error::from_status(
                    tonic::Status::resource_exhausted("slow"),
                    ""
                ))
                .is_none()
        );
        assert_eq!(state.failures, 2);
        assert!(!state.finished);
        let fatal = state.fail(Error::InvalidArgument("bad channel".into()));
        assert!(matches!(fatal, Some(Error::InvalidArgument(_))));
        assert!(state.finished);
        assert!(state.next().await.is_none());
    }

    #[test]
    fn seen_cursors_are_bounded() {
        let mut seen = SeenCursors::default();
        for n in 0..SEEN_CURSORS + 10 {
            assert!(seen.insert(&n.to_string()));
        }
        assert_eq!(seen.set.len(), SEEN_CURSORS);
        assert!(seen.insert("0"), "the oldest cursors are forgotten");
    }
}
