//! Broadcast: validating a broadcast, taking its place in the log order, and
//! idempotency keys.
//!
//! A broadcast is *submitted* (validated, given its place in the log order) before it
//! is *stored*; the Publish stream ([`crate::grpc::publish`]) submits the next
//! messages while earlier ones wait for the bus (the Redis writer puts them in one
//! pipeline), and answers each once stored, in the order received.

use std::sync::atomic::Ordering;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse, Msg};
use prost::Message as _;

use crate::auth::Caller;
use crate::bus::{Appended, IdempotencyKey};
use crate::channel;
use crate::error::NodeError;
use crate::node::{Node, check_op};
use crate::telemetry::{Hop, Kind, TraceContext};
use opentelemetry::KeyValue;
use tracing::Instrument as _;

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
