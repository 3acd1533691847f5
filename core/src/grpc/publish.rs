//! The Publish stream: many broadcasts on one gRPC stream, answered in order, with
//! a bounded window of messages in flight. Each message is submitted as Broadcast
//! is ([`crate::publish`]); a refused message is answered with `error` and `code`
//! and the stream goes on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::future::{Either, Map, Ready};
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, Stream, StreamExt as _};
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse};
use prost::Message as _;
use tonic::Status;

use crate::auth::Caller;
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
    in_flight: FuturesOrdered<Answer>,
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
                    self.ending = Some(super::service::closed_status(Closed::Revoked));
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

/// The answer to one message of a Publish stream: once stored, or at once if
/// refused. Not boxed again: it is one allocation per message less.
type Answer =
    Either<Map<PendingBroadcast, fn(Stored) -> BroadcastResponse>, Ready<BroadcastResponse>>;
type Stored = Result<BroadcastResponse, NodeError>;

/// Submits one message of a Publish stream: its answer, once stored (or at once
/// if refused).
async fn submit(node: &Node, caller: &Caller, req: BroadcastRequest) -> Answer {
    let submitted = match node.admit(caller) {
        Ok(()) => node.submit_broadcast(caller, req).await,
        Err(e) => Err(e),
    };
    match submitted {
        Ok(pending) => Either::Left(pending.map(answer as fn(Stored) -> BroadcastResponse)),
        Err(e) => Either::Right(futures::future::ready(refused(e))),
    }
}

fn answer(stored: Stored) -> BroadcastResponse {
    stored.unwrap_or_else(refused)
}
