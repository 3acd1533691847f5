//! The SendMsgs stream: many SendMsg on one gRPC stream, each answered with the
//! caller's number as soon as its reply (or failure) is known, in any order. A relay
//! such as the sidecar sends its requests on it instead of one unary call each:
//! no HTTP/2 stream, HEADERS and trailers per request on either side.
//!
//! Each request goes through [`Node::send_msg`] exactly as a unary SendMsg does
//! (rules, rate limit, routing, metrics, trace); only its bound differs: its own
//! `timeout_ms` (or the node's default), as there is no per-request gRPC deadline.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, Stream, StreamExt as _};
use ipc_proto::pb::{SendMsgsRequest, SendMsgsResponse};
use tonic::Status;

use crate::auth::Caller;
use crate::error::Closed;
use crate::node::Node;
use crate::revocation::RevocationWatch;

/// Most requests of one SendMsgs stream waiting for their replies; the stream
/// reads no further until one is answered, so a caller cannot grow the node
/// without bound.
pub const SEND_MSGS_WINDOW: usize = 1024;

/// The SendMsgs stream of `caller` over `requests`: one answer per request, as
/// soon as it is known. A request that could not be decoded (an `Err` of
/// `requests`) ends the stream with its status once the requests before it are
/// answered; so does the revocation of the caller's token (UNAUTHENTICATED).
pub fn send_msgs_stream<S>(
    node: Arc<Node>,
    caller: Caller,
    requests: S,
    revocation: RevocationWatch,
) -> impl Stream<Item = Result<SendMsgsResponse, Status>> + Send + 'static
where
    S: Stream<Item = Result<SendMsgsRequest, Status>> + Send + Unpin + 'static,
{
    let state = Sending {
        node,
        caller: Arc::new(caller),
        requests,
        revocation,
        in_flight: FuturesUnordered::new(),
        input_done: false,
        ending: None,
    };
    futures::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    })
}

struct Sending<S> {
    node: Arc<Node>,
    caller: Arc<Caller>,
    requests: S,
    revocation: RevocationWatch,
    in_flight: FuturesUnordered<BoxFuture<'static, SendMsgsResponse>>,
    input_done: bool,
    /// The status that ends the stream once the requests before it are answered.
    ending: Option<Status>,
}

impl<S> Sending<S>
where
    S: Stream<Item = Result<SendMsgsRequest, Status>> + Send + Unpin + 'static,
{
    async fn next(&mut self) -> Option<Result<SendMsgsResponse, Status>> {
        loop {
            let reading = !self.input_done
                && self.ending.is_none()
                && self.in_flight.len() < SEND_MSGS_WINDOW;
            if !reading && self.in_flight.is_empty() {
                return self.ending.take().map(Err);
            }
            tokio::select! {
                biased;
                Some(answer) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    return Some(Ok(answer));
                }
                () = self.revocation.revoked(&self.caller), if self.ending.is_none() => {
                    self.node.metrics().revoked_streams.fetch_add(1, Ordering::Relaxed);
                    self.ending = Some(super::service::closed_status(Closed::Revoked));
                }
                next = self.requests.next(), if reading => match next {
                    None => self.input_done = true,
                    Some(Err(status)) => self.ending = Some(status),
                    Some(Ok(SendMsgsRequest { seq, request })) => {
                        let answer = ask(self.node.clone(), self.caller.clone(), seq, request);
                        self.in_flight.push(answer);
                    }
                },
            }
        }
    }
}

/// One request of a SendMsgs stream, answered as the unary SendMsg would be.
fn ask(
    node: Arc<Node>,
    caller: Arc<Caller>,
    seq: u64,
    request: Option<ipc_proto::pb::SendMsgRequest>,
) -> BoxFuture<'static, SendMsgsResponse> {
    async move {
        let result = match (node.admit(&caller), request) {
            (Err(error), _) => Err(error),
            (Ok(()), None) => Err(crate::error::NodeError::InvalidArgument(
                "SendMsgs: a message without `request`".into(),
            )),
            (Ok(()), Some(request)) => node.send_msg(&caller, request, None).await,
        };
        match result {
            Ok(reply) => SendMsgsResponse {
                seq,
                reply: Some(reply),
                ..SendMsgsResponse::default()
            },
            Err(error) => {
                let status = super::service::status(error);
                SendMsgsResponse {
                    seq,
                    reply: None,
                    code: status.code() as i32,
                    error: status.message().to_string(),
                }
            }
        }
    }
    .boxed()
}
