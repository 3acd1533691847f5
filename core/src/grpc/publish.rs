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

use futures::Stream;
use futures::future::BoxFuture;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse};
use prost::Message as _;
use prost::bytes::BufMut;
use tonic::Status;

use crate::auth::Caller;
use crate::bus::Appended;
use crate::error::Closed;
use crate::error::NodeError;
use crate::node::Node;
use crate::publish::{PendingBroadcast, Submission};
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
    mut revocation: RevocationWatch,
) -> impl Stream<Item = Result<Ack, Status>> + Send + 'static
where
    S: Stream<Item = Result<BroadcastRequest, Status>> + Send + Unpin + 'static,
{
    let watched = caller.clone();
    Publishing {
        node,
        caller,
        requests,
        revoked: Box::pin(async move { revocation.revoked(&watched).await }),
        in_flight: VecDeque::new(),
        submitting: None,
        bytes: 0,
        input_done: false,
        ending: None,
        ended: false,
    }
}

/// A Publish stream, polled by hand rather than written as an `async` loop: the
/// state of such a loop is moved at each message it reads and each answer it
/// gives, and those moves were a tenth of a message's cost.
struct Publishing<S> {
    node: Arc<Node>,
    caller: Caller,
    requests: S,
    /// Completes when the caller's token is revoked.
    revoked: BoxFuture<'static, ()>,
    /// The answers to come, oldest first, with the encoded size of each message.
    /// Answered in order, so only the oldest is polled: no per-message task of a
    /// `FuturesOrdered`, and a later answer that is ready waits for it anyway.
    in_flight: VecDeque<(Answer, usize)>,
    /// A message the bus has not taken yet (a Redis writer's queue is full), with
    /// its size: nothing more is read until it is taken, so order is kept.
    submitting: Option<(
        BoxFuture<'static, Result<PendingBroadcast, NodeError>>,
        usize,
    )>,
    bytes: usize,
    input_done: bool,
    /// The status that ends the stream once the answers before it are sent.
    ending: Option<Status>,
    /// The stream has given its last item.
    ended: bool,
}

impl<S> Publishing<S>
where
    S: Stream<Item = Result<BroadcastRequest, Status>> + Send + Unpin + 'static,
{
    fn window_open(&self) -> bool {
        self.in_flight.is_empty()
            || (self.in_flight.len() < PUBLISH_WINDOW && self.bytes < PUBLISH_WINDOW_BYTES)
    }

    /// Submits one message: its answer joins the window, or, when the bus must
    /// wait to take it, it becomes the message being submitted.
    fn submit(&mut self, req: BroadcastRequest) {
        let size = req.encoded_len();
        self.bytes += size;
        let submission = match self.node.admit(&self.caller) {
            Ok(()) => self.node.submit_now(&self.caller, req, size),
            Err(error) => Submission::Done(Err(error)),
        };
        match submission {
            Submission::Done(submitted) => self.in_flight.push_back((answer(submitted), size)),
            Submission::Waiting(submitting) => self.submitting = Some((submitting, size)),
        }
    }
}

impl<S> Stream for Publishing<S>
where
    S: Stream<Item = Result<BroadcastRequest, Status>> + Send + Unpin + 'static,
{
    type Item = Result<Ack, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            // The oldest answer first, then the message the bus has not taken,
            // then a revocation, then the next message: as a biased select would.
            if let Some((oldest, _)) = this.in_flight.front_mut()
                && let Poll::Ready(ack) = Pin::new(oldest).poll(cx)
            {
                if let Some((_, size)) = this.in_flight.pop_front() {
                    this.bytes -= size;
                }
                return Poll::Ready(Some(Ok(ack)));
            }
            if let Some((submitting, size)) = &mut this.submitting {
                let Poll::Ready(submitted) = submitting.as_mut().poll(cx) else {
                    break;
                };
                let size = *size;
                this.submitting = None;
                this.in_flight.push_back((answer(submitted), size));
                continue;
            }
            if this.ending.is_none() && this.revoked.as_mut().poll(cx).is_ready() {
                this.node
                    .metrics()
                    .revoked_streams
                    .fetch_add(1, Ordering::Relaxed);
                this.ending = Some(super::service::closed_status(Closed::Revoked));
            }
            if this.input_done || this.ending.is_some() || !this.window_open() {
                break;
            }
            match Pin::new(&mut this.requests).poll_next(cx) {
                Poll::Ready(None) => this.input_done = true,
                Poll::Ready(Some(Err(status))) => this.ending = Some(status),
                Poll::Ready(Some(Ok(req))) => this.submit(req),
                Poll::Pending => break,
            }
        }
        if this.in_flight.is_empty()
            && this.submitting.is_none()
            && (this.input_done || this.ending.is_some())
        {
            this.ended = true;
            return Poll::Ready(this.ending.take().map(Err));
        }
        Poll::Pending
    }
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

/// The answer to a message the bus took (or refused).
fn answer(submitted: Result<PendingBroadcast, NodeError>) -> Answer {
    match submitted {
        Ok(pending) => Answer::Submitted(pending),
        Err(error) => Answer::Refused(Some(error)),
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
