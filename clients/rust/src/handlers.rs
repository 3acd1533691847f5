//! [`Handlers`]: dispatch of received messages to functions registered by op, in the
//! spirit of backendjs's `ipc.on(op, fn)` and `emitMsg`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::subscribe::ServeReplies;
use crate::{Client, Error, Msg, OP_REPLY_ERROR, SubscribeOptions, Subscription};

/// What a handler returns: the data of the answer, or the text of a failure.
pub type HandlerResult = Result<serde_json::Value, String>;

type Handler = Arc<dyn Fn(Msg) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// How many handlers run at once in [`Handlers::run`]; beyond that the subscription
/// stops reading, and the node's slow-consumer rule applies rather than this process
/// growing without bound.
const MAX_CONCURRENT_HANDLERS: usize = 64;

/// Functions registered by op.
///
/// ```no_run
/// # async fn demo(client: ipc_client::Client) -> Result<(), ipc_client::Error> {
/// use ipc_client::{Handlers, SubscribeOptions};
/// use serde_json::json;
///
/// let mut handlers = Handlers::new();
/// handlers.on("config:get", |msg| async move {
///     match msg.data["key"].as_str() {
///         Some("db") => Ok(json!("postgres://db")),
///         other => Err(format!("unknown key {other:?}")),
///     }
/// });
/// handlers.run(&client, SubscribeOptions::new().role("worker")).await
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Handlers {
    by_op: HashMap<String, Handler>,
}

impl Handlers {
    /// No handlers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for messages of `op`, replacing any previous one.
    ///
    /// For a request (a message with `reply_to`), `Ok(data)` is sent back as the reply
    /// and `Err(text)` as a reply with `error` set. For a broadcast the result is only
    /// logged when it is an error.
    pub fn on<F, Fut>(&mut self, op: impl Into<String>, handler: F) -> &mut Self
    where
        F: Fn(Msg) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |msg| Box::pin(handler(msg)));
        self.by_op.insert(op.into(), handler);
        self
    }

    /// Whether a handler is registered for `op`.
    pub fn handles(&self, op: &str) -> bool {
        self.by_op.contains_key(op)
    }

    /// Dispatches `msg` in-process, as if it had been received: the handler's result,
    /// or `None` when no handler is registered for its op.
    pub async fn emit(&self, msg: Msg) -> Option<HandlerResult> {
        let handler = self.by_op.get(&msg.op)?.clone();
        Some(handler(msg).await)
    }

    /// Subscribes with `options` and dispatches every message received by op, each in
    /// its own task, answering requests with the handler's result. A request without
    /// a handler is answered with an error at once, so its sender does not wait for
    /// the timeout.
    ///
    /// The subscription is a Serve stream, so answers travel back on it rather than
    /// as one Reply call each (a node without Serve gets Subscribe and Reply calls).
    /// An answer the node could not deliver — its requester gave up — comes back
    /// as an [`OP_REPLY_ERROR`] notice, which is logged.
    ///
    /// Runs until the subscription fails for good (see
    /// [`Subscription`](crate::Subscription)); reconnections are handled inside.
    pub async fn run(&self, client: &Client, options: SubscribeOptions) -> Result<(), Error> {
        let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDLERS));
        let (mut messages, replies) = Subscription::serving(client.clone(), options);
        while let Some(msg) = messages.next().await {
            let msg = msg?;
            if msg.op == OP_REPLY_ERROR && msg.cursor.is_empty() {
                reply_not_delivered(&msg);
                continue;
            }
            let handler = self.by_op.get(&msg.op).cloned();
            if handler.is_none() && !msg.is_request() {
                debug!(op = %msg.op, "no handler; ignored");
                continue;
            }
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let (client, replies) = (client.clone(), replies.clone());
            tokio::spawn(async move {
                let _slot = slot;
                dispatch(&client, &replies, handler, msg).await;
            });
        }
        Ok(())
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ops: Vec<_> = self.by_op.keys().collect();
        ops.sort();
        f.debug_struct("Handlers").field("ops", &ops).finish()
    }
}

/// Runs one handler and, for a request, sends its answer: on the Serve stream, or
/// as a Reply call when there is none now.
async fn dispatch(client: &Client, replies: &ServeReplies, handler: Option<Handler>, msg: Msg) {
    let op = msg.op.clone();
    let reply_to = msg.reply_to.clone();
    let result = match handler {
        Some(handler) => handler(msg).await,
        None => Err(format!("no handler for op {op:?}")),
    };
    if reply_to.is_empty() {
        if let Err(error) = result {
            warn!(op = %op, error = %error, "handler failed");
        }
        return;
    }
    let (data, error) = match result {
        Ok(data) => (data, String::new()),
        Err(error) => (serde_json::Value::Null, error),
    };
    let answer = ipc_proto::pb::ReplyRequest {
        reply_to: reply_to.clone(),
        op: op.clone(),
        data: crate::client::payload(&data),
        headers: Default::default(),
        error,
    };
    let Err(answer) = replies.send(answer).await else {
        return;
    };
    let mut reply = client.reply(&reply_to, &op, data);
    if !answer.error.is_empty() {
        reply = reply.error(answer.error);
    }
    if let Err(err) = reply.await {
        // NOT_FOUND here means the requester gave up before the answer was ready.
        warn!(op = %op, reply_to = %reply_to, error = %err, "reply not delivered");
    }
}

/// An answer the node could not deliver (`ipc:reply-error`).
fn reply_not_delivered(notice: &Msg) {
    let text = |key: &str| notice.data[key].as_str().unwrap_or_default().to_owned();
    let (reply_to, code, error) = (text("reply_to"), text("code"), text("error"));
    if code == crate::code_name(tonic::Code::NotFound) {
        debug!(%reply_to, "answer came after the requester gave up");
    } else {
        warn!(%reply_to, %code, %error, "answer not delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(op: &str, data: serde_json::Value) -> Msg {
        Msg {
            op: op.into(),
            data,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn emit_dispatches_by_op_in_process() {
        let mut handlers = Handlers::new();
        handlers
            .on("math:double", |msg| async move {
                let n = msg.data.as_i64().ok_or("not a number")?;
                Ok(json!(n * 2))
            })
            .on("fail", |_| async { Err("nope".to_owned()) });
        assert_eq!(
            handlers.emit(msg("math:double", json!(21))).await,
            Some(Ok(json!(42)))
        );
        assert_eq!(
            handlers.emit(msg("math:double", json!("x"))).await,
            Some(Err("not a number".to_owned()))
        );
        assert_eq!(
            handlers.emit(msg("fail", json!(null))).await,
            Some(Err("nope".into()))
        );
        assert_eq!(handlers.emit(msg("unknown", json!(null))).await, None);
        assert!(handlers.handles("fail") && !handlers.handles("unknown"));
    }

    #[tokio::test]
    async fn a_later_registration_replaces_the_earlier_one() {
        let mut handlers = Handlers::new();
        handlers.on("op", |_| async { Ok(json!(1)) });
        handlers.on("op", |_| async { Ok(json!(2)) });
        assert_eq!(
            handlers.emit(msg("op", json!(null))).await,
            Some(Ok(json!(2)))
        );
    }
}
