//! The pod's answers to requests from upstream, sent back on the upstream
//! subscription's `Serve` stream instead of one unary Reply each.
//!
//! The subscription is a Serve stream: its first message subscribes, every later
//! one carries a reply. A reply the control plane cannot deliver (the caller gave
//! up) comes back on the stream as `ipc:reply-error`, logged here. Between two
//! streams (a reconnect), and for a reply whose sender is not the pod (a local
//! process that names itself with `ipc-sender`, which the unary call keeps), the
//! unary Reply is used.

use ipc_proto::json;
use ipc_proto::pb::{Msg, ReplyRequest, ServeRequest, serve_request};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::Code;

use super::Inner;
use super::calls::describe;

/// Replies waiting to be written on the Serve stream; a responder answering
/// faster than the connection takes them waits.
pub(super) const SERVE_QUEUE: usize = 1024;

/// The sending side of the current upstream Serve stream.
#[derive(Default)]
pub(super) struct ServeReplies {
    current: Mutex<Option<mpsc::Sender<ServeRequest>>>,
}

impl ServeReplies {
    /// The stream replies now go on; `None` between streams. Dropping the previous
    /// sender ends that stream's side of replies (the control plane keeps its
    /// subscription until it is replaced).
    pub(super) fn set(&self, sender: Option<mpsc::Sender<ServeRequest>>) {
        *self.current.lock() = sender;
    }

    fn current(&self) -> Option<mpsc::Sender<ServeRequest>> {
        self.current.lock().clone()
    }
}

/// The first message of a Serve stream, and the channel its replies go on.
pub(super) fn open_serve(
    subscribe: ipc_proto::pb::SubscribeRequest,
) -> (
    mpsc::Sender<ServeRequest>,
    tokio_stream::wrappers::ReceiverStream<ServeRequest>,
) {
    let (sender, outgoing) = mpsc::channel(SERVE_QUEUE);
    sender
        .try_send(ServeRequest {
            kind: Some(serve_request::Kind::Subscribe(subscribe)),
        })
        .expect("a new channel has room for its first message");
    (
        sender,
        tokio_stream::wrappers::ReceiverStream::new(outgoing),
    )
}

impl Inner {
    /// Sends the pod's answer to the request `reply_to` upstream.
    pub(super) async fn send_reply(&self, reply_to: String, reply: Msg) {
        let request = ReplyRequest {
            reply_to,
            op: reply.op,
            data: reply.data,
            headers: reply.headers,
            error: reply.error,
        };
        let request = if self.upstream_sender(&reply.sender) == self.config.identity.id
            && let Some(stream) = self.serve_replies.current()
        {
            let reply = ServeRequest {
                kind: Some(serve_request::Kind::Reply(request)),
            };
            match stream.send(reply).await {
                Ok(()) => return,
                // The stream ended meanwhile: the unary call may still get through.
                Err(mpsc::error::SendError(ServeRequest {
                    kind: Some(serve_request::Kind::Reply(request)),
                })) => request,
                Err(_) => return,
            }
        } else {
            request
        };
        let reply_to = request.reply_to.clone();
        let Ok(link) = self.link_or_unavailable() else {
            tracing::warn!(%reply_to, "reply lost: the control plane is unreachable");
            return;
        };
        let request = self.request(request, &reply.sender, Some(self.config.call_timeout));
        match link.client.clone().reply(request).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {
                tracing::debug!(%reply_to, "reply came after the caller gave up")
            }
            Err(status) => {
                tracing::warn!(%reply_to, error = %describe("reply", &status), "reply not delivered")
            }
        }
    }

    /// `ipc:reply-error` on the Serve stream: a reply of the pod was not delivered.
    pub(super) fn reply_not_delivered(&self, notice: &Msg) {
        let data = json::from_optional(notice.data.as_ref());
        let text = |key: &str| data[key].as_str().unwrap_or_default().to_string();
        let (reply_to, code, error) = (text("reply_to"), text("code"), text("error"));
        if code == ipc_proto::code_name(Code::NotFound) {
            tracing::debug!(%reply_to, "reply came after the caller gave up");
        } else {
            tracing::warn!(%reply_to, %code, %error, "reply not delivered");
        }
    }
}
