//! The Publish stream: many broadcasts on one gRPC stream, answered in order, with
//! a bounded window of messages in flight. Each message is submitted as Broadcast
//! is ([`crate::publish`]); a refused message is answered with `error` and `code`
//! and the stream goes on.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt as _};
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse};
use prost::Message as _;
use prost::bytes::BufMut;
use tonic::Status;

use crate::auth::Caller;
use crate::bus::Appended;
use crate::error::Closed;
use crate::error::NodeError;
use crate::node::Node;
use crate::publish::PendingBroadcast;
use crate::revocation::RevocationWatch;

/// Most messages of one Publish stream submitted and not yet answered. Enough for
/// the Redis writer to fill pipelines; the stream reads no further until the
/// oldest is answered, so a fast publisher waits instead of growing the node.
pub const PUBLISH_WINDOW: usize = 256;
/// Most bytes of messages of one Publish stream in flight (at least one message).
pub const PUBLISH_WINDOW_BYTES: usize = 8 << 20;
/// The answer to a message Publish refused: Broadcast's status as `code` and
/// `error`, no cursor.
pub fn refused(error: NodeError) -> BroadcastResponse {
    let status = super::service::status(error);
    BroadcastResponse {
        error: status.message().to_string(),
        code: status.code() as i32,
        ..BroadcastResponse::default()
    }
}

/// One answer of a Publish stream, as it goes on the wire: a `BroadcastResponse`,
/// written straight from the stored message rather than built from copies of its
/// id, channel and cursor.
#[derive(Debug)]
pub enum Ack {
    /// Stored (or a duplicate of its key).
    Appended(Appended),
    /// Refused: the answer naming why.
    Refused(BroadcastResponse),
}

/// Field numbers of `ipc.v1.BroadcastResponse` written for a stored message.
const ID_FIELD: u32 = 1;
const CHANNEL_FIELD: u32 = 2;
const CURSOR_FIELD: u32 = 3;
const DUPLICATE_FIELD: u32 = 4;

impl Ack {
    /// The answer as a message.
    pub fn into_response(self) -> BroadcastResponse {
        match self {
            Ack::Appended(appended) => crate::publish::response(appended),
            Ack::Refused(response) => response,
        }
    }

    /// Writes the answer encoded as the `BroadcastResponse` it stands for.
    pub fn encode(&self, dst: &mut impl BufMut) {
        use prost::encoding::{bool, string};
        let (id, channel, cursor, duplicate) = match self {
            Ack::Refused(response) => return response.encode_raw(dst),
            Ack::Appended(Appended::Stored(msg)) => (&msg.id, &msg.channel, &msg.cursor, false),
            Ack::Appended(Appended::Duplicate {
                id,
                channel,
                cursor,
            }) => (id, channel, cursor, true),
        };
        // As the generated code does: fields in number order, defaults left out.
        for (field, text) in [
            (ID_FIELD, id),
            (CHANNEL_FIELD, channel),
            (CURSOR_FIELD, cursor),
        ] {
            if !text.is_empty() {
                string::encode(field, text, dst);
            }
        }
        if duplicate {
            bool::encode(DUPLICATE_FIELD, &duplicate, dst);
        }
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
) -> impl Stream<Item = Result<Ack, Status>> + Send + 'static
where
    S: Stream<Item = Result<BroadcastRequest, Status>> + Send + Unpin + 'static,
{
    let state = Publishing {
        node,
        caller,
        requests,
        revocation,
        in_flight: VecDeque::new(),
        bytes: 0,
        input_done: false,
        ending: None,
    };
    // Boxed: the state (the window, the request stream) would otherwise be moved
    // into and out of the future built for each answer.
    futures::stream::unfold(Box::new(state), |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    })
}

struct Publishing<S> {
    node: Arc<Node>,
    caller: Caller,
    requests: S,
    revocation: RevocationWatch,
    /// The answers to come, oldest first, with the encoded size of each message.
    /// Answered in order, so only the oldest is polled: no per-message task of a
    /// `FuturesOrdered`, and a later answer that is ready waits for it anyway.
    in_flight: VecDeque<(Answer, usize)>,
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

    async fn next(&mut self) -> Option<Result<Ack, Status>> {
        loop {
            let reading = !self.input_done && self.ending.is_none() && self.window_open();
            if !reading && self.in_flight.is_empty() {
                return self.ending.take().map(Err);
            }
            tokio::select! {
                biased;
                ack = std::future::poll_fn(|cx| poll_oldest(&mut self.in_flight, &mut self.bytes, cx)), if !self.in_flight.is_empty() => {
                    return Some(Ok(ack));
                }
                () = self.revocation.revoked(&self.caller), if self.ending.is_none() => {
                    self.node.metrics().revoked_streams.fetch_add(1, Ordering::Relaxed);
                    self.ending = Some(super::service::closed_status(Closed::Revoked));
                }
                next = self.requests.next(), if reading => match next {
                    None => self.input_done = true,
                    Some(Err(status)) => self.ending = Some(status),
                    Some(Ok(req)) => {
                        let size = req.encoded_len();
                        let answer = submit(&self.node, &self.caller, req, size).await;
                        self.bytes += size;
                        self.in_flight.push_back((answer, size));
                    }
                },
            }
        }
    }
}

/// The oldest answer of the window, once it is ready.
fn poll_oldest(
    in_flight: &mut VecDeque<(Answer, usize)>,
    bytes: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<Ack> {
    let Some((oldest, _)) = in_flight.front_mut() else {
        return Poll::Pending;
    };
    let ack = std::task::ready!(Pin::new(oldest).poll(cx));
    if let Some((_, size)) = in_flight.pop_front() {
        *bytes -= size;
    }
    Poll::Ready(ack)
}

/// The answer to one message of a Publish stream: once stored, or at once if
/// refused.
enum Answer {
    Submitted(PendingBroadcast),
    Refused(Option<NodeError>),
}

impl Future for Answer {
    type Output = Ack;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ack> {
        match &mut *self {
            Answer::Submitted(pending) => Pin::new(pending).poll(cx).map(|stored| match stored {
                Ok(appended) => Ack::Appended(appended),
                Err(error) => Ack::Refused(refused(error)),
            }),
            Answer::Refused(error) => Poll::Ready(Ack::Refused(refused(
                error
                    .take()
                    .expect("an answer is not polled after it completed"),
            ))),
        }
    }
}

/// Submits one message (of `size` bytes encoded) of a Publish stream.
async fn submit(node: &Node, caller: &Caller, req: BroadcastRequest, size: usize) -> Answer {
    let submitted = match node.admit(caller) {
        Ok(()) => node.submit_sized_broadcast(caller, req, size).await,
        Err(e) => Err(e),
    };
    match submitted {
        Ok(pending) => Answer::Submitted(pending),
        Err(e) => Answer::Refused(Some(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_proto::pb::Msg;

    fn stored() -> Arc<Msg> {
        Arc::new(Msg {
            id: "n1-17".into(),
            channel: "shop:worker".into(),
            cursor: "3f2a.17-0".into(),
            op: "worker:restart".into(),
            ..Msg::default()
        })
    }

    /// The answer written from the stored message is the very `BroadcastResponse`
    /// a client decodes: the same bytes as the message built field by field.
    #[test]
    fn an_ack_encodes_as_its_broadcast_response() {
        let duplicate = Appended::Duplicate {
            id: "n1-3".into(),
            channel: "shop:worker".into(),
            cursor: "3f2a.3-0".into(),
        };
        let refusal = refused(NodeError::InvalidArgument("op is empty".into()));
        for ack in [
            Ack::Appended(Appended::Stored(stored())),
            Ack::Appended(duplicate),
            Ack::Refused(refusal),
        ] {
            let mut written = Vec::new();
            ack.encode(&mut written);
            let response = ack.into_response();
            assert_eq!(written, response.encode_to_vec(), "{response:?}");
            assert_eq!(BroadcastResponse::decode(&written[..]).unwrap(), response);
        }
    }
}
