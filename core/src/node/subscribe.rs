//! Subscribe: a stream that opens with `ipc:subscribed`, replays what a cursor
//! missed (or says `ipc:gap`), then carries live messages with no gap and no
//! duplicate between the replay and the live part.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt as _};
use ipc_proto::pb::{Msg, SubscribeRequest};

use super::{Caller, Node, NodeError, OutboundStream, SubscribeStream};
use crate::cursor::Cursor;
use crate::error::Closed;
use crate::hub::{RegisterError, StreamLimits, Subscription};
use crate::metrics::Refusal;
use crate::outbound::Outbound;

impl Node {
    /// Opens a subscriber stream: `ipc:subscribed`, then (with a cursor) what was
    /// missed, then live messages — without a gap or a duplicate.
    ///
    /// `ipc:subscribed` carries `{"id", "node", "replayed", "cursor"}`: `replayed`
    /// is the number of messages (`ipc:gap` and replayed entries) before the live
    /// ones; `cursor`, when the bus knows it, is the log position after which every
    /// matching entry comes live — a resume point before any message arrived.
    pub async fn subscribe(
        &self,
        caller: &Caller,
        req: SubscribeRequest,
    ) -> Result<SubscribeStream, NodeError> {
        let stream = self.subscribe_outbound(caller, req).await?;
        Ok(Box::pin(stream.map(|item| item.map(Outbound::into_shared))))
    }

    /// [`Node::subscribe`] for a stream that encodes what it sends: an operation's
    /// request to a member comes as the parts its encoding is written from.
    pub async fn subscribe_outbound(
        &self,
        caller: &Caller,
        req: SubscribeRequest,
    ) -> Result<OutboundStream, NodeError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(NodeError::Unavailable(
                "node shutting down; subscribe to another replica".into(),
            ));
        }
        let spec = self.subscriber_spec(caller, &req)?;
        self.bus
            .check_local_subscription(&spec.patterns, &spec.id)?;
        let resume_from = match req.cursor.as_str() {
            "" => None,
            text => Some(
                text.parse::<Cursor>()
                    .map_err(|e| NodeError::InvalidArgument(e.to_string()))?,
            ),
        };
        // Register before reading the log: whatever is appended meanwhile is in the
        // queue, whatever was appended before is in the replay; duplicates are
        // skipped by position below.
        let limits = StreamLimits {
            max_streams: self.config.max_streams,
            max_per_owner: self.config.max_subscriptions_per_identity,
        };
        let subscription = self.hub.try_register(spec, limits).map_err(|e| {
            let (reason, flag) = match e {
                RegisterError::Streams => (Refusal::Streams, "--max-streams"),
                RegisterError::PerOwner => (
                    Refusal::Subscriptions,
                    "--max-subscriptions-per-identity",
                ),
            };
            self.metrics.refuse(reason);
            NodeError::TooLarge(match e {
                RegisterError::Streams => format!(
                    "this node has {} live subscriber streams, its limit ({flag}); try another replica or later",
                    self.config.max_streams
                ),
                RegisterError::PerOwner => format!(
                    "{} has {} live subscriptions on this node, its limit ({flag}); close some first",
                    caller.sender, self.config.max_subscriptions_per_identity
                ),
            })
        })?;
        self.bus.cover(subscription.patterns()).await;
        // A bus that cannot tell where its log stands (a replica that has not reached
        // Redis yet) could only serve this stream from an unknown position, losing
        // whatever lies between: refuse (UNAVAILABLE), the client retries.
        let log_head = self.bus.head().await?;
        let mut head = Vec::new();
        let mut floor = None;
        // Where the stream stands in the log once the head is sent: every matching
        // entry after it comes live. Told to the subscriber as a resume point.
        let mut position = None;
        if let Some(cursor) = resume_from {
            let replay = self.bus.replay(&cursor, subscription.patterns()).await?;
            if let Some(reason) = replay.gap {
                self.metrics.gaps.fetch_add(1, Ordering::Relaxed);
                let gap = crate::notice::Gap::new(Some(cursor), reason);
                head.push(Arc::new(gap.to_msg(self.new_id(), &self.config.name)));
            } else {
                floor = Some(cursor);
                position = Some(cursor);
            }
            for msg in replay.messages {
                if let Ok(c) = msg.cursor.parse::<Cursor>() {
                    floor = Some(c);
                    position = Some(c);
                }
                if subscription.matches(&msg.channel) {
                    head.push(msg);
                }
            }
        }
        if position.is_none() {
            position = log_head;
        }
        // `replayed` tells a client where the head ends (a sidecar relies on it).
        let subscribed = crate::notice::Subscribed {
            id: subscription.id().to_string(),
            node: self.config.name.clone(),
            replayed: head.len(),
            cursor: position.map(|p| p.to_string()),
        };
        let subscribed = subscribed.to_msg(self.new_id(), &self.config.name);
        head.insert(0, Arc::new(subscribed));
        Ok(Box::pin(live_stream(head, subscription, floor)))
    }
}

/// The head (subscribed, gap, replay) followed by live messages, skipping live
/// entries at or before `floor` (already replayed), then the close reason.
///
/// Written by hand rather than as a chain of stream combinators around an async
/// block: every idle subscriber holds one of these for its stream's life, and the
/// combinators kept the waiting future, a copy of their state and the spent head
/// inline (216 bytes by heaptrack; this is 104).
struct LiveStream {
    /// The head, front first; emptied (and its allocation freed) once sent.
    head: std::vec::IntoIter<Arc<Msg>>,
    subscription: Subscription,
    floor: Option<Cursor>,
    finished: bool,
}

fn live_stream(
    head: Vec<Arc<Msg>>,
    subscription: Subscription,
    floor: Option<Cursor>,
) -> impl Stream<Item = Result<Outbound, Closed>> + Send {
    LiveStream {
        head: head.into_iter(),
        subscription,
        floor,
        finished: false,
    }
}

impl Stream for LiveStream {
    type Item = Result<Outbound, Closed>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(msg) = this.head.next() {
            if this.head.len() == 0 {
                this.head = Vec::new().into_iter();
            }
            return Poll::Ready(Some(Ok(Outbound::Msg(msg))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            match std::task::ready!(this.subscription.poll_recv(cx)) {
                Ok(Some(msg)) => {
                    if let Some(f) = this.floor {
                        match msg.cursor().parse::<Cursor>() {
                            Ok(c) if c.epoch == f.epoch && c.position() <= f.position() => {
                                continue;
                            }
                            Ok(_) => this.floor = None,
                            Err(_) => {} // a request: not in the log
                        }
                    }
                    return Poll::Ready(Some(Ok(msg)));
                }
                Ok(None) => {
                    this.finished = true;
                    return Poll::Ready(None);
                }
                Err(reason) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(reason)));
                }
            }
        }
    }
}
