//! Broadcast: validating a broadcast, taking its place in the log order, and
//! idempotency keys.
//!
//! A broadcast is *submitted* (validated, given its place in the log order) before it
//! is *stored*; the Publish stream ([`crate::grpc::publish`]) submits the next
//! messages while earlier ones wait for the bus (the Redis writer puts them in one
//! pipeline), and answers each once stored, in the order received.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse, Msg};
use prost::Message as _;

use crate::auth::Caller;
use crate::bus::{Appended, IdempotencyKey, PendingAppend, TrySubmit};
use crate::channel;
use crate::error::BusError;
use crate::error::NodeError;
use crate::metrics::Metrics;
use crate::node::{Node, check_op};
use crate::telemetry::{Hop, Kind, TraceContext};
use opentelemetry::KeyValue;
use tracing::Instrument as _;

/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// A broadcast that has its place in the log order; completes once stored.
///
/// A named future rather than a boxed one: a Publish stream holds one per message
/// in flight, and for the memory bus it is ready at once.
pub struct PendingBroadcast {
    appended: PendingAppend,
    /// The `Broadcast` hop and its `store` hop, ended (and failed, if it failed)
    /// once the bus answers.
    hops: Option<(Hop, Hop)>,
    metrics: Arc<Metrics>,
}

impl Future for PendingBroadcast {
    type Output = Result<Appended, NodeError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let appended = ready!(Pin::new(&mut self.appended).poll(cx));
        if let Some((mut accepted, mut store)) = self.hops.take()
            && let Err(error) = &appended
        {
            store.fail(|| error.to_string());
            accepted.fail(|| error.to_string());
        }
        if let Ok(Appended::Stored(_)) = &appended {
            self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(appended.map_err(NodeError::from))
    }
}

/// A broadcast's answer as a message.
pub fn response(appended: Appended) -> BroadcastResponse {
    match appended {
        Appended::Stored(stored) => BroadcastResponse {
            id: stored.id.clone(),
            channel: stored.channel.clone(),
            cursor: stored.cursor.clone(),
            ..BroadcastResponse::default()
        },
        Appended::Duplicate {
            id,
            channel,
            cursor,
        } => BroadcastResponse {
            id,
            channel,
            cursor,
            duplicate: true,
            ..BroadcastResponse::default()
        },
    }
}

/// A broadcast given to the bus, or the future that gives it.
pub(crate) enum Submission {
    Done(Result<PendingBroadcast, NodeError>),
    Waiting(BoxFuture<'static, Result<PendingBroadcast, NodeError>>),
}

/// What the bus answered a submission, as the broadcast's pending answer.
fn pending_broadcast(
    submitted: Result<PendingAppend, BusError>,
    (accepted, mut store): (Hop, Hop),
    metrics: &Arc<Metrics>,
) -> Result<PendingBroadcast, NodeError> {
    match submitted {
        Ok(appended) => Ok(PendingBroadcast {
            appended,
            hops: Some((accepted, store)),
            metrics: metrics.clone(),
        }),
        Err(error) => {
            store.fail(|| error.to_string());
            Err(error.into())
        }
    }
}

/// A broadcast checked and built, ready for the bus.
struct Prepared {
    msg: Msg,
    key: Option<IdempotencyKey>,
    accepted: Hop,
    store: Hop,
}

impl Node {
    /// Validates a broadcast and submits it to the bus. Broadcasts submitted one
    /// after the other are stored in that order; the returned future completes
    /// once this one is stored (or found a duplicate of its key).
    pub async fn submit_broadcast(
        &self,
        caller: &Caller,
        req: BroadcastRequest,
    ) -> Result<PendingBroadcast, NodeError> {
        let size = req.encoded_len();
        self.submit_sized_broadcast(caller, req, size).await
    }

    /// [`Node::submit_broadcast`] of a request whose encoded size is known.
    pub(crate) async fn submit_sized_broadcast(
        &self,
        caller: &Caller,
        req: BroadcastRequest,
        size: usize,
    ) -> Result<PendingBroadcast, NodeError> {
        match self.submit_now(caller, req, size) {
            Submission::Done(submitted) => submitted,
            Submission::Waiting(submitting) => submitting.await,
        }
    }

    /// Checks and builds a broadcast and submits it to the bus, at once when the
    /// bus never waits (memory); otherwise the future that submits it.
    ///
    /// Everything up to the bus is plain code rather than an async state machine:
    /// what such a machine holds across `.await` is moved whole at each step, and a
    /// broadcast's request, message and hops were a kilobyte copied several times.
    pub(crate) fn submit_now(
        &self,
        caller: &Caller,
        req: BroadcastRequest,
        size: usize,
    ) -> Submission {
        let Prepared {
            msg,
            key,
            accepted,
            store,
        } = match self.prepare_broadcast(caller, req, size) {
            Ok(prepared) => prepared,
            Err(error) => return Submission::Done(Err(error)),
        };
        let log_span = accepted.log_span(None);
        let submitted = {
            let _in_span = log_span.enter();
            self.bus().try_submit(msg, key)
        };
        let hops = (accepted, store);
        match submitted {
            TrySubmit::Done(submitted) => {
                Submission::Done(pending_broadcast(submitted, hops, self.metrics()))
            }
            TrySubmit::WouldWait(msg, key) => {
                let bus = self.bus().clone();
                let metrics = self.metrics().clone();
                Submission::Waiting(Box::pin(async move {
                    let submitted = bus.submit(msg, key).instrument(log_span).await;
                    pending_broadcast(submitted, hops, &metrics)
                }))
            }
        }
    }

    /// The input rules of a broadcast; its channel (taken from `req`), resolved,
    /// when it passes.
    fn check_broadcast(
        &self,
        caller: &Caller,
        req: &mut BroadcastRequest,
        size: usize,
    ) -> Result<String, NodeError> {
        self.check_size(size)?;
        check_op(&req.op)?;
        self.check_headers(&req.headers)?;
        check_key(&req.key)?;
        let channel =
            channel::parse_owned_name(std::mem::take(&mut req.channel), self.app(caller))?;
        self.authorize(caller, "broadcast to", &channel, |g| {
            g.may_broadcast(&channel)
        })?;
        Ok(channel)
    }

    fn prepare_broadcast(
        &self,
        caller: &Caller,
        mut req: BroadcastRequest,
        size: usize,
    ) -> Result<Prepared, NodeError> {
        // The span starts before the checks, so that a refused broadcast is in
        // the caller's trace too, failed with the reason it was given.
        let parent = caller
            .trace
            .clone()
            .or_else(|| TraceContext::from_headers(&req.headers));
        let mut accepted = Hop::accept("Broadcast", parent, || {
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("ipc.node", self.name().to_string()),
                KeyValue::new("ipc.op", req.op.clone()),
                KeyValue::new("ipc.keyed", !req.key.is_empty()),
            ]
        });
        let checked = self.check_broadcast(caller, &mut req, size);
        if matches!(
            checked,
            Err(NodeError::InvalidArgument(_) | NodeError::TooLarge(_))
        ) {
            self.metrics().rejected.fetch_add(1, Ordering::Relaxed);
        }
        let channel = checked.inspect_err(|error| accepted.fail(|| error.to_string()))?;
        let key = (!req.key.is_empty()).then(|| IdempotencyKey {
            scoped: format!("{}:{}", self.app(caller).unwrap_or_default(), req.key),
            key: req.key,
            window: self.config().dedup_window,
        });
        // Every field named: `..Msg::default()` built a whole message (a map's
        // random state included) only to drop most of it.
        let mut msg = Msg {
            op: req.op,
            data: req.data,
            headers: req.headers,
            id: self.new_id(),
            channel,
            sender: caller.sender.clone(),
            ts_ms: crate::now_ms(),
            cursor: String::new(),
            reply_to: String::new(),
            error: String::new(),
        };
        accepted.set(|| {
            vec![
                KeyValue::new("ipc.msg_id", msg.id.clone()),
                KeyValue::new("ipc.channel", msg.channel.clone()),
            ]
        });
        // Stored with the store hop's context: every replica's fan-out and every
        // subscriber's work nest under it.
        let store = accepted.under("store", Kind::Internal, Vec::new);
        store.stamp(&mut msg.headers);
        Ok(Prepared {
            msg,
            key,
            accepted,
            store,
        })
    }
}

/// An idempotency key: empty (none), or 1 to [`MAX_KEY_BYTES`] bytes without
/// control characters.
pub fn check_key(key: &str) -> Result<(), NodeError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(NodeError::InvalidArgument(format!(
            "key is {} bytes; at most {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(NodeError::InvalidArgument(
            "key has control characters".into(),
        ));
    }
    Ok(())
}

/// A window such as `10m`, `600s`, `500ms` or `1h` (a bare number is seconds);
/// at least 1 ms.
pub fn parse_window(text: &str) -> Result<std::time::Duration, String> {
    ipc_proto::duration::at_least_1ms(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn windows_read_with_their_unit() {
        assert_eq!(parse_window("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_window("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_window("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_window("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_window("0s").is_err());
        assert!(parse_window("ten").is_err());
        assert!(parse_window("5d").is_err());
    }

    #[test]
    fn keys_are_bounded_and_printable() {
        assert!(check_key("").is_ok());
        assert!(check_key("restart-2026-11-26").is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(check_key("a\nb").is_err());
    }
}
