//! The tonic `ipc.v1.Ipc` service over a [`Node`]: works out the caller with an
//! [`Identify`] (request metadata, peer address, mTLS client certificate), maps
//! [`NodeError`] to status codes. No logic of its own.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ipc_proto::code_name;
use ipc_proto::pb::ipc_server::Ipc;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, GatherRequest, Ledger, LimitRequest, LimitResponse,
    LockRequest, LockResponse, MembersRequest, MembersResponse, Msg, ReplyRequest, ReplyResponse,
    RolloutEvent, RolloutRequest, SendMsgRequest, SendMsgResponse, SendMsgsRequest,
    SendMsgsResponse, ServeRequest, SubscribeRequest, UnlockRequest, UnlockResponse, serve_request,
};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::identify::{Identify, MetadataIdentity, Peer};
use crate::admission::AdmittedCaller;
use crate::auth::Caller;
use crate::error::Closed;
use crate::error::NodeError;
use crate::metrics::Refusal;
use crate::node::Node;
use crate::outbound::Outbound;

pub struct IpcService {
    node: Arc<Node>,
    identity: Arc<dyn Identify>,
}

impl IpcService {
    pub fn new(node: Arc<Node>) -> Self {
        Self::with_identity(node, Arc::new(MetadataIdentity))
    }

    pub fn with_identity(node: Arc<Node>, identity: Arc<dyn Identify>) -> Self {
        Self { node, identity }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Who is calling, once authenticated and within its rate limit.
    fn caller<T>(&self, request: &mut Request<T>) -> Result<Caller, Status> {
        let mut caller = match request.extensions_mut().remove::<AdmittedCaller>() {
            Some(AdmittedCaller(caller)) => caller,
            None => self.identify(request)?,
        };
        self.node.admit(&caller).map_err(status)?;
        caller.trace = crate::telemetry::TraceContext::from_metadata(request.metadata());
        Ok(caller)
    }

    /// The caller of a request that did not come through [`crate::admission`].
    fn identify<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let peer = Peer::of(request.extensions());
        if let Some(process) = &peer.process {
            tracing::debug!(pid = ?process.pid, uid = process.uid, gid = process.gid, "local request");
        }
        self.identity
            .identify(request.metadata(), &peer)
            .inspect_err(|status| {
                if status.code() == tonic::Code::Unauthenticated {
                    self.node.metrics().refuse(Refusal::Unauthenticated);
                }
            })
    }

    /// Opens a Subscribe stream whose messages are the node's shared `Arc<Msg>`s:
    /// [`super::server::IpcServer`] sends them without copying them per subscriber.
    pub async fn subscribe_shared(
        &self,
        mut request: Request<SubscribeRequest>,
    ) -> Result<SharedMsgStream, Status> {
        let caller = self.caller(&mut request)?;
        let stream = self
            .node
            .subscribe_outbound(&caller, request.into_inner())
            .await
            .map_err(status)?;
        Ok(Box::pin(stream.map(|item| item.map_err(closed_status))))
    }

    /// Opens a Publish stream whose answers are written from the stored messages
    /// ([`super::publish::Ack`]); the generated `publish` maps them to messages.
    pub async fn publish_acks(
        &self,
        mut request: Request<tonic::Streaming<BroadcastRequest>>,
    ) -> Result<AckStream, Status> {
        // Taken before the caller is authenticated: see crate::revocation.
        let revocation = self.node.revocations().watch();
        let caller = self.caller(&mut request)?;
        let requests = request.into_inner();
        Ok(Box::pin(super::publish::publish_stream(
            self.node.clone(),
            caller,
            requests,
            revocation,
        )))
    }

    /// The leases and buckets in use that the caller's grants cover, for the admin
    /// console: no RPC lists them, but the caller is identified, rate-limited and
    /// answered with the status codes of the calls.
    pub async fn in_use(&self, mut request: Request<()>) -> Result<crate::coord::InUse, Status> {
        let caller = self.caller(&mut request)?;
        self.node.in_use(&caller).await.map_err(status)
    }

    /// Opens a Serve stream: [`IpcService::subscribe_shared`] for its first message,
    /// then every later message's reply delivered as Reply would be; a reply that
    /// cannot be delivered comes back on the stream as `ipc:reply-error`.
    pub async fn serve_shared(
        &self,
        mut request: Request<tonic::Streaming<ServeRequest>>,
    ) -> Result<SharedMsgStream, Status> {
        let caller = self.caller(&mut request)?;
        let mut requests = request.into_inner();
        let subscribe = match requests.message().await? {
            Some(ServeRequest {
                kind: Some(serve_request::Kind::Subscribe(subscribe)),
            }) => subscribe,
            None => {
                return Err(Status::invalid_argument(
                    "Serve: the stream ended before its first message, which must carry `subscribe`",
                ));
            }
            Some(_) => {
                return Err(Status::invalid_argument(
                    "Serve: the first message must carry `subscribe`; replies come after it",
                ));
            }
        };
        let messages = self
            .node
            .subscribe_outbound(&caller, subscribe)
            .await
            .map_err(status)?
            .map(|item| Some(item.map_err(closed_status)));
        let (notices, notices_rx) = tokio::sync::mpsc::channel(SERVE_NOTICES);
        // The stream's own trace context is the subscription's; each reply is part
        // of the request it answers.
        let replier = Caller {
            trace: None,
            ..caller
        };
        tokio::spawn(relay_replies(self.node.clone(), replier, requests, notices));
        // The stream lasts as long as the subscription: the replies' side may end
        // first (a client that only subscribes closes its side).
        let messages = messages.chain(futures::stream::once(async { None }));
        let notices = tokio_stream::wrappers::ReceiverStream::new(notices_rx).map(Some);
        let merged = futures::stream::select(messages, notices)
            .take_while(|item| std::future::ready(item.is_some()))
            .filter_map(std::future::ready);
        Ok(Box::pin(merged))
    }
}

/// Notices (`ipc:reply-error`) a Serve stream may have waiting to be sent; a
/// responder whose replies keep failing faster than it reads waits.
const SERVE_NOTICES: usize = 64;

/// Delivers the replies of a Serve stream; reports each failure on the stream.
/// A message that cannot be decoded ends the stream with its status.
///
/// Replies are read until the client ends its side, also after the subscription
/// ended: a responder that answers and then leaves (a worker restarting under its
/// id, which replaces this subscription) has its answer delivered, not dropped with
/// the stream; only the notice of a failure can no longer be sent then.
async fn relay_replies(
    node: Arc<Node>,
    caller: Caller,
    mut requests: tonic::Streaming<ServeRequest>,
    notices: tokio::sync::mpsc::Sender<Result<Outbound, Status>>,
) {
    loop {
        let next = requests.message().await;
        let reply = match next {
            Ok(None) => return,
            Err(status) => {
                let _ = notices.send(Err(status)).await;
                return;
            }
            Ok(Some(ServeRequest {
                kind: Some(serve_request::Kind::Reply(reply)),
            })) => reply,
            Ok(Some(_)) => {
                let error = NodeError::InvalidArgument(
                    "Serve: after the first message, every message must carry `reply`".into(),
                );
                let _ = notices.send(Ok(reply_error(&node, "", error))).await;
                continue;
            }
        };
        let reply_to = reply.reply_to.clone();
        let delivered = match node.admit(&caller) {
            Ok(()) => node.reply(&caller, reply).await,
            Err(e) => Err(e),
        };
        if let Err(error) = delivered
            && notices
                .send(Ok(reply_error(&node, &reply_to, error)))
                .await
                .is_err()
        {
            tracing::debug!(%reply_to, "a reply on an ended Serve stream was not delivered");
        }
    }
}

/// `ipc:reply-error`: `{"reply_to", "code", "error"}`, the status the unary Reply
/// would have answered (`code` as its name, e.g. `NOT_FOUND`).
fn reply_error(node: &Node, reply_to: &str, error: NodeError) -> Outbound {
    let status = status(error);
    Outbound::Msg(Arc::new(node.system_msg(
        REPLY_ERROR_OP,
        serde_json::json!({
            "reply_to": reply_to,
            "code": code_name(status.code()),
            "error": status.message(),
        }),
    )))
}

/// The op of a Serve stream's notice that a reply was not delivered.
pub const REPLY_ERROR_OP: &str = "ipc:reply-error";

/// Maps a node error to the status a client sees.
pub fn status(error: NodeError) -> Status {
    match error {
        NodeError::InvalidArgument(m) => Status::invalid_argument(m),
        NodeError::TooLarge(m) => Status::resource_exhausted(m),
        NodeError::PermissionDenied(m) => Status::permission_denied(m),
        NodeError::NotFound(m) => Status::not_found(m),
        NodeError::NoResponders(m) => Status::unavailable(m),
        NodeError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        NodeError::Unavailable(m) => Status::unavailable(m),
        NodeError::FailedPrecondition(m) => Status::failed_precondition(m),
        NodeError::Aborted(m) => Status::aborted(m),
        NodeError::Internal(m) => Status::internal(m),
    }
}

/// The status that ends a stream the node closed.
pub fn closed_status(reason: Closed) -> Status {
    match reason {
        Closed::SlowConsumer => Status::resource_exhausted(
            "subscriber too slow: its queue is full; resubscribe with the cursor of the last message received",
        ),
        Closed::Replaced => Status::aborted("replaced by a newer subscription with the same id"),
        Closed::Revoked => Status::unauthenticated(
            "the token of this stream was removed from the tokens file (or changed); reconnect with valid credentials",
        ),
        Closed::Shutdown => Status::unavailable(
            "node shutting down; reconnect (to another replica) with your cursor",
        ),
    }
}

/// The `grpc-timeout` header (what is left of the caller's deadline).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;
/// A Subscribe stream of shared messages (and members' requests written from
/// shared parts), or the status that ended it.
pub type SharedMsgStream = Pin<Box<dyn Stream<Item = Result<Outbound, Status>> + Send>>;
/// A Publish stream's answers, encoded by the server from the stored messages.
pub type AckStream = Pin<Box<dyn Stream<Item = Result<super::publish::Ack, Status>> + Send>>;

#[tonic::async_trait]
impl Ipc for IpcService {
    async fn broadcast(
        &self,
        mut request: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        let caller = self.caller(&mut request)?;
        let response = self
            .node
            .broadcast(&caller, request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    async fn send_msg(
        &self,
        mut request: Request<SendMsgRequest>,
    ) -> Result<Response<SendMsgResponse>, Status> {
        let caller = self.caller(&mut request)?;
        let deadline = grpc_timeout(request.metadata());
        let reply = self
            .node
            .send_msg(&caller, request.into_inner(), deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(SendMsgResponse { reply: Some(reply) }))
    }

    type SubscribeStream = MsgStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<MsgStream>, Status> {
        let stream = self.subscribe_shared(request).await?;
        let stream = stream.map(|item| item.map(Outbound::into_msg));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn reply(
        &self,
        mut request: Request<ReplyRequest>,
    ) -> Result<Response<ReplyResponse>, Status> {
        let caller = self.caller(&mut request)?;
        self.node
            .reply(&caller, request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(ReplyResponse {}))
    }

    async fn members(
        &self,
        mut request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let caller = self.caller(&mut request)?;
        let members = self
            .node
            .members(&caller, request.into_inner())
            .await
            .map_err(status)?;
        let budget = crate::members::max_frame_bytes(self.node.config().max_msg_bytes);
        let (members, truncated) = crate::members::cap(members, budget);
        Ok(Response::new(MembersResponse { members, truncated }))
    }

    type PublishStream = Pin<Box<dyn Stream<Item = Result<BroadcastResponse, Status>> + Send>>;

    async fn publish(
        &self,
        request: Request<tonic::Streaming<BroadcastRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let acks = self.publish_acks(request).await?;
        Ok(Response::new(Box::pin(
            acks.map(|ack| ack.map(super::publish::Ack::into_response)),
        )))
    }

    async fn gather(
        &self,
        mut request: Request<GatherRequest>,
    ) -> Result<Response<Ledger>, Status> {
        let caller = self.caller(&mut request)?;
        let deadline = grpc_timeout(request.metadata());
        let ledger = self
            .node
            .gather(&caller, request.into_inner(), deadline)
            .await
            .map_err(status)?;
        Ok(Response::new(ledger))
    }

    type RolloutStream = Pin<Box<dyn Stream<Item = Result<RolloutEvent, Status>> + Send>>;

    async fn rollout(
        &self,
        mut request: Request<RolloutRequest>,
    ) -> Result<Response<Self::RolloutStream>, Status> {
        let caller = self.caller(&mut request)?;
        let events = self
            .node
            .rollout(&caller, request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(Box::pin(events.map(|e| e.map_err(status)))))
    }

    async fn lock(
        &self,
        mut request: Request<LockRequest>,
    ) -> Result<Response<LockResponse>, Status> {
        let caller = self.caller(&mut request)?;
        let deadline = grpc_timeout(request.metadata());
        let session = request
            .extensions()
            .get::<crate::coord::LocalConnection>()
            .map(|c| c.session.clone());
        let response = self
            .node
            .lock(&caller, request.into_inner(), deadline, session)
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    async fn unlock(
        &self,
        mut request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let caller = self.caller(&mut request)?;
        let response = self
            .node
            .unlock(&caller, request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    async fn limit(
        &self,
        mut request: Request<LimitRequest>,
    ) -> Result<Response<LimitResponse>, Status> {
        let caller = self.caller(&mut request)?;
        let response = self
            .node
            .limit(&caller, request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(response))
    }

    type SendMsgsStream = Pin<Box<dyn Stream<Item = Result<SendMsgsResponse, Status>> + Send>>;

    async fn send_msgs(
        &self,
        mut request: Request<tonic::Streaming<SendMsgsRequest>>,
    ) -> Result<Response<Self::SendMsgsStream>, Status> {
        // Taken before the caller is authenticated: see crate::revocation.
        let revocation = self.node.revocations().watch();
        let caller = self.caller(&mut request)?;
        let requests = request.into_inner();
        Ok(Response::new(Box::pin(super::send_msgs::send_msgs_stream(
            self.node.clone(),
            caller,
            requests,
            revocation,
        ))))
    }

    type ServeStream = MsgStream;

    async fn serve(
        &self,
        request: Request<tonic::Streaming<ServeRequest>>,
    ) -> Result<Response<MsgStream>, Status> {
        let stream = self.serve_shared(request).await?;
        let stream = stream.map(|item| item.map(Outbound::into_msg));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout_units() {
        let mut md = MetadataMap::new();
        md.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&md), Some(Duration::from_millis(250)));
        md.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&md), Some(Duration::from_secs(3)));
        md.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
    }
}
