//! Requests between replicas: each replica listens on its own pub/sub inbox
//! (`P:inbox:NODE`). A request carries its remaining time; the answering replica's
//! node answers it (`Local::request`, the node's one request path) and the outcome
//! goes back to the asking replica's inbox. A reply given on a replica other than
//! the one that delivered the
//! request travels the same way and is acknowledged, so the replier learns
//! NOT_FOUND for a late reply wherever it replied.
//!
//! `PUBLISH` returns how many listeners got the message: zero means the target
//! replica is not listening (dead, its presence not yet expired), known at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use ipc_core::bus::{BusError, RequestError};
use ipc_core::fleetops::OP_ID_HEADER;
use ipc_core::local::Local;
use ipc_core::telemetry::{self, Hop, Kind, TraceContext};
use ipc_proto::pb::Msg;
use opentelemetry::KeyValue;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::keys::Keys;
use crate::link::{Link, Part, reconnect_backoff};

/// What one replica sends another.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Envelope {
    /// The sender's node name: where answers go.
    #[prost(string, tag = "1")]
    pub from: String,
    /// Chosen by the sender; an answer carries the id of what it answers.
    #[prost(uint64, tag = "2")]
    pub id: u64,
    #[prost(oneof = "Body", tags = "3, 4, 5, 6")]
    pub body: Option<Body>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub(crate) enum Body {
    #[prost(message, tag = "3")]
    Request(RemoteRequest),
    #[prost(message, tag = "4")]
    Response(RemoteResponse),
    /// A reply to a request the receiving replica delivered.
    #[prost(message, tag = "5")]
    Reply(Msg),
    #[prost(message, tag = "6")]
    ReplyAck(ReplyAck),
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RemoteRequest {
    #[prost(string, tag = "1")]
    pub target: String,
    #[prost(message, optional, tag = "2")]
    pub msg: Option<Msg>,
    /// Time left of the caller's deadline when sent.
    #[prost(uint64, tag = "3")]
    pub timeout_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RemoteResponse {
    /// One of [`outcome`].
    #[prost(int32, tag = "1")]
    pub outcome: i32,
    #[prost(message, optional, tag = "2")]
    pub reply: Option<Msg>,
    #[prost(string, tag = "3")]
    pub detail: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ReplyAck {
    /// One of [`outcome`].
    #[prost(int32, tag = "1")]
    pub outcome: i32,
}

/// Outcomes of a remote request or a forwarded reply.
pub(crate) mod outcome {
    pub const OK: i32 = 0;
    pub const NO_RESPONDERS: i32 = 1;
    pub const DEADLINE: i32 = 2;
    pub const UNAVAILABLE: i32 = 3;
    pub const NOT_FOUND: i32 = 4;

    /// An outcome in words, for spans.
    pub fn name(outcome: i32) -> &'static str {
        match outcome {
            OK => "ok",
            NO_RESPONDERS => "no responders",
            DEADLINE => "deadline exceeded",
            UNAVAILABLE => "unavailable",
            NOT_FOUND => "not found",
            _ => "unknown",
        }
    }
}

/// What became of a message sent with [`Exchange::ask`].
// Lives briefly on one task's stack: boxing the answer would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Asked {
    Answered(Body),
    /// Nobody listens on that replica's inbox.
    NoListener,
    /// No answer before the deadline.
    TimedOut,
}

impl Asked {
    /// What became of the ask, in words, for spans.
    pub fn describe(&self) -> &'static str {
        match self {
            Asked::Answered(Body::Response(r)) => outcome::name(r.outcome),
            Asked::Answered(Body::ReplyAck(a)) => outcome::name(a.outcome),
            Asked::Answered(_) => "unexpected answer",
            Asked::NoListener => "no listener",
            Asked::TimedOut => "timed out",
        }
    }
}

/// One replica's end of the inbox protocol.
pub(crate) struct Exchange {
    link: Arc<Link>,
    keys: Keys,
    local: Local,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Body>>>,
    next_id: AtomicU64,
}

/// Forgets a waiting ask when its caller stops waiting, however it stops.
struct Waiting<'a> {
    exchange: &'a Exchange,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.exchange.waiting.lock().remove(&self.id);
    }
}

impl Exchange {
    pub fn new(link: Arc<Link>, keys: Keys, local: Local) -> Self {
        Self {
            link,
            keys,
            local,
            waiting: Mutex::default(),
            next_id: AtomicU64::new(1),
        }
    }

    fn node(&self) -> &str {
        self.local.node_name()
    }

    /// Sends `body` to `node` and waits for its answer until `deadline`.
    pub async fn ask(&self, node: &str, body: Body, deadline: Instant) -> Result<Asked, BusError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id, tx);
        let _waiting = Waiting { exchange: self, id };
        let envelope = Envelope {
            from: self.node().to_string(),
            id,
            body: Some(body),
        };
        let sent = tokio::time::timeout_at(deadline.into(), self.publish(node, &envelope)).await;
        match sent {
            Err(_) => return Ok(Asked::TimedOut),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok(Asked::NoListener),
            Ok(Ok(_)) => {}
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(body)) => Ok(Asked::Answered(body)),
            Ok(Err(_)) | Err(_) => Ok(Asked::TimedOut),
        }
    }

    /// Publishes to `node`'s inbox; returns how many listeners received it.
    async fn publish(&self, node: &str, envelope: &Envelope) -> Result<i64, BusError> {
        let channel = self.keys.inbox(node);
        let payload = envelope.encode_to_vec();
        self.link
            .call(|mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async(&mut conn)
                    .await
            })
            .await
    }

    /// Answers `to` (best effort: if it is gone, its caller times out).
    async fn answer(&self, to: &str, id: u64, body: Body) {
        let envelope = Envelope {
            from: self.node().to_string(),
            id,
            body: Some(body),
        };
        if let Err(error) = self.publish(to, &envelope).await {
            tracing::debug!(%error, to, "could not answer a remote replica");
        }
    }

    fn handle(self: &Arc<Self>, payload: &[u8]) {
        let envelope = match Envelope::decode(payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(%error, "ignoring an undecodable inbox message");
                return;
            }
        };
        let Envelope { from, id, body } = envelope;
        match body {
            Some(Body::Request(mut request)) => {
                let exchange = self.clone();
                let headers = request.msg.as_ref().map(|m| &m.headers);
                let mut hop = headers.map_or(Hop::NONE, |headers| {
                    Hop::child("redis inbox serve", Kind::Server, headers, || {
                        vec![
                            KeyValue::new("ipc.node", self.node().to_string()),
                            KeyValue::new("ipc.from_replica", from.clone()),
                            KeyValue::new("ipc.target", request.target.clone()),
                        ]
                    })
                });
                if let Some(msg) = &mut request.msg {
                    hop.stamp(&mut msg.headers);
                }
                let op_id = request
                    .msg
                    .as_ref()
                    .and_then(|m| m.headers.get(OP_ID_HEADER).cloned());
                let log = telemetry::log_span(
                    request
                        .msg
                        .as_ref()
                        .and_then(|m| TraceContext::from_headers(&m.headers))
                        .as_ref(),
                    op_id.as_deref(),
                );
                tokio::spawn(
                    async move {
                        let response = exchange.serve_request(request).await;
                        if response.outcome != outcome::OK {
                            hop.fail(|| {
                                format!("{} {}", outcome::name(response.outcome), response.detail)
                            });
                        }
                        exchange.answer(&from, id, Body::Response(response)).await;
                    }
                    .instrument(log),
                );
            }
            Some(Body::Reply(reply)) => {
                let outcome = match self.local.complete(reply) {
                    Ok(()) => outcome::OK,
                    Err(_) => outcome::NOT_FOUND,
                };
                let exchange = self.clone();
                tokio::spawn(async move {
                    exchange
                        .answer(&from, id, Body::ReplyAck(ReplyAck { outcome }))
                        .await;
                });
            }
            Some(answer @ (Body::Response(_) | Body::ReplyAck(_))) => {
                if let Some(waiting) = self.waiting.lock().remove(&id) {
                    let _ = waiting.send(answer);
                }
            }
            None => tracing::warn!(from, "ignoring an empty inbox message"),
        }
    }

    /// Answers a request from another replica in this node (its one request path)
    /// and waits for the reply.
    async fn serve_request(&self, request: RemoteRequest) -> RemoteResponse {
        let RemoteRequest {
            target,
            msg,
            timeout_ms,
        } = request;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let respond = |outcome, reply, detail: String| RemoteResponse {
            outcome,
            reply,
            detail,
        };
        match self
            .local
            .request(&target, msg.unwrap_or_default(), deadline)
            .await
        {
            Ok(reply) => respond(outcome::OK, Some(reply), String::new()),
            Err(RequestError::NoResponders(_)) => respond(outcome::NO_RESPONDERS, None, target),
            Err(RequestError::DeadlineExceeded(_)) => respond(outcome::DEADLINE, None, target),
            Err(RequestError::Unavailable(detail)) => respond(outcome::UNAVAILABLE, None, detail),
        }
    }

    /// Listens on this replica's inbox until cancelled, reconnecting with backoff.
    pub async fn listen(self: Arc<Self>, cancel: CancellationToken) {
        let channel = self.keys.inbox(self.node());
        let mut backoff = reconnect_backoff();
        let mut ever_subscribed = false;
        loop {
            let tried = self.link.endpoint().generation();
            let subscribed = tokio::select! {
                () = cancel.cancelled() => return,
                s = tokio::time::timeout(self.link.timeout(), self.link.subscribe(&channel)) => s,
            };
            match subscribed {
                Ok(Ok((pubsub, primary))) => {
                    if std::mem::replace(&mut ever_subscribed, true) {
                        let reconnects = &self.link.metrics().inbox_reconnects;
                        reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    backoff.reset();
                    self.link.health().set(Part::Inbox, true);
                    let mut messages = pubsub.into_on_message();
                    let moved = self.link.endpoint().moved(primary);
                    tokio::pin!(moved);
                    loop {
                        let message = tokio::select! {
                            () = cancel.cancelled() => return,
                            () = &mut moved => None,
                            m = messages.next() => m,
                        };
                        match message {
                            Some(message) => self.handle(message.get_payload_bytes()),
                            None => break,
                        }
                    }
                    self.link.health().set(Part::Inbox, false);
                    self.link.probe();
                    tracing::debug!(channel, "inbox connection closed; reconnecting");
                }
                Ok(Err(error)) => tracing::debug!(%error, "inbox not subscribed; retrying"),
                Err(_) => tracing::debug!("inbox subscription timed out; retrying"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff.next_pause()) => {}
                () = self.link.endpoint().changed_from(tried) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let envelope = Envelope {
            from: "a".into(),
            id: 7,
            body: Some(Body::Request(RemoteRequest {
                target: "shop:worker".into(),
                msg: Some(Msg {
                    op: "ping".into(),
                    ..Msg::default()
                }),
                timeout_ms: 1500,
            })),
        };
        let decoded = Envelope::decode(envelope.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, envelope);
        assert!(Envelope::decode(&[0xff, 0x01][..]).is_err());
    }
}
