//! Broadcast and Publish: validating a broadcast, taking its place in the log order,
//! idempotency keys, and the Publish stream — many broadcasts on one stream,
//! answered in order, with a bounded window of messages in flight.
//!
//! A broadcast is *submitted* (validated, given its place in the log order) before it
//! is *stored*; Publish submits the next messages while earlier ones wait for the bus
//! (the Redis writer puts them in one pipeline), and answers each once stored, in
//! the order received. A refused message is answered with `error` and `code`; the
//! stream goes on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, Stream, StreamExt as _};
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse, Msg};
use prost::Message as _;
use tonic::Status;

use crate::auth::Caller;
use crate::bus::{Appended, IdempotencyKey};
use crate::channel;
use crate::error::NodeError;
use crate::hub::Closed;
use crate::node::{Node, check_op};
use crate::revocation::RevocationWatch;
use crate::telemetry::{Hop, Kind, TraceContext};
use opentelemetry::KeyValue;
use tracing::Instrument as _;

/// Most messages of one Publish stream submitted and not yet answered. Enough for
/// the Redis writer to fill pipelines; the stream reads no further until the
/// oldest is answered, so a fast publisher waits instead of growing the node.
pub const PUBLISH_WINDOW: usize = 256;
/// Most bytes of messages of one Publish stream in flight (at least one message).
pub const PUBLISH_WINDOW_BYTES: usize = 8 << 20;
/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// A broadcast that has its place in the log order; completes once stored.
pub type PendingBroadcast = BoxFuture<'static, Result<BroadcastResponse, NodeError>>;

impl Node {
    /// Validates a broadcast and submits it to the bus. Broadcasts submitted one
    /// after the other are stored in that order; the returned future completes
    /// once this one is stored (or found a duplicate of its key).
    pub async fn submit_broadcast(
        &self,
        caller: &Caller,
        req: BroadcastRequest,
    ) -> Result<PendingBroadcast, NodeError> {
        let result = self.submit_inner(caller, req).await;
        if matches!(
            result,
            Err(NodeError::InvalidArgument(_) | NodeError::TooLarge(_))
        ) {
            self.metrics().rejected.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// The input rules of a broadcast; its channel, resolved, when it passes.
    fn check_broadcast(
        &self,
        caller: &Caller,
        req: &BroadcastRequest,
    ) -> Result<String, NodeError> {
        self.check_size(req.encoded_len())?;
        check_op(&req.op)?;
        self.check_headers(&req.headers)?;
        check_key(&req.key)?;
        let channel = channel::parse_name(&req.channel, self.app(caller))?;
        self.authorize(caller, "broadcast to", &channel, |g| {
            g.may_broadcast(&channel)
        })?;
        Ok(channel)
    }

    async fn submit_inner(
        &self,
        caller: &Caller,
        req: BroadcastRequest,
    ) -> Result<PendingBroadcast, NodeError> {
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
        let channel = self
            .check_broadcast(caller, &req)
            .inspect_err(|error| accepted.fail(|| error.to_string()))?;
        let key = (!req.key.is_empty()).then(|| IdempotencyKey {
            scoped: format!("{}:{}", self.app(caller).unwrap_or_default(), req.key),
            key: req.key,
            window: self.config().dedup_window,
        });
        let mut msg = Msg {
            op: req.op,
            data: req.data,
            headers: req.headers,
            id: self.new_id(),
            channel,
            sender: caller.sender.clone(),
            ts_ms: crate::now_ms(),
            ..Msg::default()
        };
        accepted.set(|| {
            vec![
                KeyValue::new("ipc.msg_id", msg.id.clone()),
                KeyValue::new("ipc.channel", msg.channel.clone()),
            ]
        });
        // Stored with the store hop's context: every replica's fan-out and every
        // subscriber's work nest under it.
        let mut store = accepted.under("store", Kind::Internal, Vec::new);
        store.stamp(&mut msg.headers);
        let pending = match self
            .bus()
            .submit(msg, key)
            .instrument(accepted.log_span(None))
            .await
        {
            Ok(pending) => pending,
            Err(error) => {
                store.fail(|| error.to_string());
                return Err(error.into());
            }
        };
        let metrics = self.metrics().clone();
        Ok(pending
            .map(move |appended| {
                let mut hops = (accepted, store);
                if let Err(error) = &appended {
                    hops.1.fail(|| error.to_string());
                    hops.0.fail(|| error.to_string());
                }
                appended
            })
            .map(move |appended| match appended? {
                Appended::Stored(stored) => {
                    metrics.accepted.fetch_add(1, Ordering::Relaxed);
                    Ok(BroadcastResponse {
                        id: stored.id.clone(),
                        channel: stored.channel.clone(),
                        cursor: stored.cursor.clone(),
                        ..BroadcastResponse::default()
                    })
                }
                Appended::Duplicate {
                    id,
                    channel,
                    cursor,
                } => Ok(BroadcastResponse {
                    id,
                    channel,
                    cursor,
                    duplicate: true,
                    ..BroadcastResponse::default()
                }),
            })
            .boxed())
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
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10m, 600s or 500ms"))?;
    let ms = match unit.trim() {
        "ms" => Some(value),
        "" | "s" => value.checked_mul(1_000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    }
    .ok_or_else(|| format!("{text:?} is too long"))?;
    if ms == 0 {
        return Err("the window must be at least 1 ms".into());
    }
    Ok(std::time::Duration::from_millis(ms))
}

/// The answer to a message Publish refused: Broadcast's status as `code` and
/// `error`, no cursor.
pub fn refused(error: NodeError) -> BroadcastResponse {
    let status = crate::grpc::service::status(error);
    BroadcastResponse {
        error: status.message().to_string(),
        code: status.code() as i32,
        ..BroadcastResponse::default()
    }
}

/// The Publish stream of `caller` over `requests`: one answer per message, in
/// order. Each message counts against the caller's rate limit. A request that
/// could not be decoded (an `Err` of `requests`) ends the stream with its status,
/// after the answers to the messages before it; so does the revocation of the
/// caller's token (UNAUTHENTICATED, as its subscriptions end).
pub fn publish_stream<S>(
    node: Arc<Node>,
    caller: Caller,
    requests: S,
    revocation: RevocationWatch,
) -> impl Stream<Item = Result<BroadcastResponse, Status>> + Send + 'static
where
    S: Stream<Item = Result<BroadcastRequest, Status>> + Send + Unpin + 'static,
{
    let state = Publishing {
        node,
        caller,
        requests,
        revocation,
        in_flight: FuturesOrdered::new(),
        sizes: VecDeque::new(),
        bytes: 0,
        input_done: false,
        ending: None,
    };
    futures::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    })
}

struct Publishing<S> {
    node: Arc<Node>,
    caller: Caller,
    requests: S,
    revocation: RevocationWatch,
    in_flight: FuturesOrdered<BoxFuture<'static, BroadcastResponse>>,
    /// Encoded sizes of the messages in flight, oldest first.
    sizes: VecDeque<usize>,
    bytes: usize,
    input_done: bool,
    /// The status that ends the stream once the answers before it are sent.
    ending: Option<Status>,
}

impl<S> Publishing<S>
where
    S: Stream<Item = Result<BroadcastRequest, Status>> + Send + Unpin + 'static,
{
    fn window_open(&self) -> bool {
        self.in_flight.is_empty()
            || (self.in_flight.len() < PUBLISH_WINDOW && self.bytes < PUBLISH_WINDOW_BYTES)
    }

    async fn next(&mut self) -> Option<Result<BroadcastResponse, Status>> {
        loop {
            let reading = !self.input_done && self.ending.is_none() && self.window_open();
            if !reading && self.in_flight.is_empty() {
                return self.ending.take().map(Err);
            }
            tokio::select! {
                biased;
                Some(answer) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if let Some(size) = self.sizes.pop_front() {
                        self.bytes -= size;
                    }
                    return Some(Ok(answer));
                }
                () = self.revocation.revoked(&self.caller), if self.ending.is_none() => {
                    self.node.metrics().revoked_streams.fetch_add(1, Ordering::Relaxed);
                    self.ending = Some(crate::grpc::service::closed_status(Closed::Revoked));
                }
                next = self.requests.next(), if reading => match next {
                    None => self.input_done = true,
                    Some(Err(status)) => self.ending = Some(status),
                    Some(Ok(req)) => {
                        let size = req.encoded_len();
                        let answer = submit(&self.node, &self.caller, req).await;
                        self.sizes.push_back(size);
                        self.bytes += size;
                        self.in_flight.push_back(answer);
                    }
                },
            }
        }
    }
}

/// Submits one message of a Publish stream: its answer, once stored (or at once
/// if refused).
async fn submit(
    node: &Node,
    caller: &Caller,
    req: BroadcastRequest,
) -> BoxFuture<'static, BroadcastResponse> {
    let submitted = match node.admit(caller) {
        Ok(()) => node.submit_broadcast(caller, req).await,
        Err(e) => Err(e),
    };
    match submitted {
        Ok(pending) => pending.map(|r| r.unwrap_or_else(refused)).boxed(),
        Err(e) => futures::future::ready(refused(e)).boxed(),
    }
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
