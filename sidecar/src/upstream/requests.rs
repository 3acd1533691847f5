//! Requests both ways: a request from upstream answered in the pod by the node (in
//! its one order: a hook, a local responder, a built-in op on the pod's id), its
//! reply sent back; and a request the pod cannot answer itself sent upstream with
//! what is left of its deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::bus::RequestError;
use ipc_core::fleetops::OP_ID_HEADER;
use ipc_core::node::DEADLINE_HEADER;
use ipc_core::responders;
use ipc_core::telemetry::{self, Hop, Kind, TraceContext};
use ipc_proto::pb::{Msg, SendMsgRequest};
use opentelemetry::KeyValue;
use tonic::{Code, Status};
use tracing::Instrument as _;

use super::Inner;
use super::calls::describe;

impl Inner {
    pub(super) fn spawn_request(self: &Arc<Self>, mut msg: Msg) {
        let inner = self.clone();
        // The sidecar's hop of a request from the fleet: answered in the pod, the
        // reply sent back upstream.
        let mut hop = Hop::child("sidecar request", Kind::Server, &msg.headers, || {
            vec![
                KeyValue::new("ipc.node", self.config.node_name.clone()),
                KeyValue::new("ipc.channel", msg.channel.clone()),
                KeyValue::new("ipc.op", msg.op.clone()),
                KeyValue::new("ipc.msg_id", msg.id.clone()),
            ]
        });
        hop.stamp(&mut msg.headers);
        let log = telemetry::log_span(
            TraceContext::from_headers(&msg.headers).as_ref(),
            msg.headers.get(OP_ID_HEADER).map(String::as_str),
        );
        tokio::spawn(
            async move {
                let deadline = request_deadline(&msg, inner.config.default_request_wait);
                let reply_to = msg.reply_to.clone();
                let Some(mut reply) = inner.answer(msg, deadline).await else {
                    hop.fail(|| "no answer before the deadline".into());
                    return;
                };
                // The reply's header is its context upstream (it goes on the Serve
                // stream, where a message has no metadata of its own).
                let upstream = hop.under("upstream Reply", Kind::Client, || {
                    inner.upstream_attributes()
                });
                upstream.stamp(&mut reply.headers);
                inner.send_reply(reply_to, reply).await;
            }
            .instrument(log),
        );
    }

    /// Answers a request that came from upstream in the pod, through the node's one
    /// request path (its hooks, local responders, built-ins). `None` when the
    /// deadline passed (the caller already knows).
    async fn answer(&self, mut msg: Msg, deadline: Instant) -> Option<Msg> {
        let pod = self.config.identity.id.as_str();
        // A request for one member (Gather, Rollout) goes to that process; the pod
        // itself is a member too (its hooks and built-ins, on the request's channel).
        let target = match msg.headers.remove(responders::MEMBER_HEADER) {
            Some(member) if member != pod => member,
            _ => msg.channel.clone(),
        };
        let local = self.local()?;
        match local.request(&target, msg.clone(), deadline).await {
            Ok(reply) => Some(reply),
            Err(RequestError::DeadlineExceeded(_)) => None,
            // Not answerable here after all (the local responder left, or no hook
            // for this op): the control plane asks another responder within the
            // deadline.
            Err(RequestError::NoResponders(_)) => {
                let mut reply = error_reply(
                    &msg,
                    format!(
                        "no responders for {target:?} in pod {pod} (op {:?})",
                        msg.op
                    ),
                );
                reply
                    .headers
                    .insert(responders::CANNOT_ANSWER_HEADER.into(), pod.to_string());
                Some(reply)
            }
            Err(error) => Some(error_reply(&msg, error.to_string())),
        }
    }

    /// SendMsg to the control plane with what is left of the deadline.
    pub(super) async fn request_upstream(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        let link = self
            .link_or_unavailable()
            .map_err(RequestError::Unavailable)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::DeadlineExceeded(target.to_string()));
        }
        let mut headers = request.headers;
        headers.remove(DEADLINE_HEADER);
        let mut hop = Hop::child("upstream SendMsg", Kind::Client, &headers, || {
            self.upstream_attributes()
        });
        hop.stamp(&mut headers);
        let body = SendMsgRequest {
            target: target.to_string(),
            op: request.op,
            data: request.data,
            headers,
            timeout_ms: left.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
        };
        // The wait a little longer than timeout_ms, so that the control plane's
        // DEADLINE_EXCEEDED (with its reason) arrives before the sidecar gives up.
        let wait = left + (left / 10).min(Duration::from_millis(50));
        // The pod's own requests go on its SendMsgs stream (the message's header
        // is its trace context upstream); a sender that named itself, or a control
        // plane without the stream, gets a unary call.
        let on_stream = self.upstream_sender(&request.sender) == self.config.identity.id;
        let body = if on_stream {
            self.send_on_stream(&link, body, wait).await
        } else {
            Err(body)
        };
        let answered = match body {
            Ok(answered) => answered,
            Err(body) => {
                let mut call = self.request(body, &request.sender, Some(wait));
                hop.stamp_metadata(call.metadata_mut());
                link.client
                    .clone()
                    .send_msg(call)
                    .await
                    .and_then(|response| {
                        response.into_inner().reply.ok_or_else(|| {
                            Status::unavailable("the control plane sent an empty reply")
                        })
                    })
            }
        };
        match answered {
            Ok(reply) => Ok(reply),
            Err(status) => {
                hop.fail(|| describe("send_msg", &status));
                Err(match status.code() {
                    Code::DeadlineExceeded | Code::Cancelled if Instant::now() >= deadline => {
                        RequestError::DeadlineExceeded(target.to_string())
                    }
                    Code::DeadlineExceeded => RequestError::DeadlineExceeded(target.to_string()),
                    Code::Unavailable if status.message().starts_with("no responders") => {
                        RequestError::NoResponders(target.to_string())
                    }
                    _ => RequestError::Unavailable(describe("send_msg", &status)),
                })
            }
        }
    }
}

/// The deadline a request from upstream carries in `ipc-deadline-ms`, or `default`.
fn request_deadline(msg: &Msg, default: Duration) -> Instant {
    let now = Instant::now();
    match msg
        .headers
        .get(DEADLINE_HEADER)
        .and_then(|v| v.parse::<i64>().ok())
    {
        Some(epoch_ms) => {
            let left = (epoch_ms - ipc_core::now_ms()).max(0) as u64;
            now + Duration::from_millis(left).min(default)
        }
        None => now + default,
    }
}

fn error_reply(request: &Msg, error: String) -> Msg {
    Msg {
        op: request.op.clone(),
        error,
        ts_ms: ipc_core::now_ms(),
        ..Msg::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_no_longer_than_its_deadline_header() {
        let mut msg = Msg::default();
        let default = Duration::from_secs(300);
        msg.headers.insert(
            DEADLINE_HEADER.into(),
            (ipc_core::now_ms() + 2_000).to_string(),
        );
        let left = request_deadline(&msg, default) - Instant::now();
        assert!(left <= Duration::from_secs(2));
        msg.headers.insert(DEADLINE_HEADER.into(), "garbage".into());
        assert!(request_deadline(&msg, default) > Instant::now() + Duration::from_secs(200));
    }
}
