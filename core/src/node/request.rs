//! SendMsg — answered in this node ([`super::answer`]) or through the bus, or by
//! the node's built-in ops for an empty target — and Reply, delivered to the
//! request it answers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipc_proto::json;
use ipc_proto::pb::{MembersRequest, Msg, ReplyRequest, SendMsgRequest};
use opentelemetry::KeyValue;
use prost::Message as _;
use tracing::Instrument as _;

use super::{BUILTIN_OPS, Caller, Node, NodeError, check_op, member_json};
use crate::channel;
use crate::hub::ReplyRoute;
use crate::metrics::SendOutcome;
use crate::telemetry::{self, Hop, TraceContext};

impl Node {
    /// Asks one subscriber of `target` (or the node itself) and waits for the reply.
    /// `grpc_timeout` is what is left of the caller's gRPC deadline.
    pub async fn send_msg(
        &self,
        caller: &Caller,
        req: SendMsgRequest,
        grpc_timeout: Option<Duration>,
    ) -> Result<Msg, NodeError> {
        let started = Instant::now();
        let parent = caller
            .trace
            .clone()
            .or_else(|| TraceContext::from_headers(&req.headers));
        let mut hop = Hop::accept("SendMsg", parent, || {
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", "SendMsg"),
                KeyValue::new("ipc.node", self.config.name.clone()),
                KeyValue::new("ipc.target", req.target.clone()),
                KeyValue::new("ipc.op", req.op.clone()),
            ]
        });
        let log = hop.log_span(None);
        let mut result = self
            .send_msg_inner(caller, req, grpc_timeout, &hop)
            .instrument(log)
            .await;
        match &mut result {
            // The reply goes back with the trace: the replier's hop, or this one.
            Ok(reply) if !reply.headers.contains_key(telemetry::TRACEPARENT) => {
                hop.stamp(&mut reply.headers);
            }
            Ok(_) => {}
            Err(error) => hop.fail(|| error.to_string()),
        }
        let outcome = match &result {
            Ok(_) => SendOutcome::Replied,
            Err(NodeError::NoResponders(_)) => SendOutcome::NoResponders,
            Err(NodeError::DeadlineExceeded(_)) => SendOutcome::DeadlineExceeded,
            Err(NodeError::InvalidArgument(_) | NodeError::TooLarge(_)) => {
                self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                SendOutcome::Failed
            }
            Err(_) => SendOutcome::Failed,
        };
        self.metrics.record_send(outcome, started.elapsed());
        result
    }

    async fn send_msg_inner(
        &self,
        caller: &Caller,
        req: SendMsgRequest,
        grpc_timeout: Option<Duration>,
        accepted: &Hop,
    ) -> Result<Msg, NodeError> {
        self.check_size(req.encoded_len())?;
        check_op(&req.op)?;
        self.check_headers(&req.headers)?;
        let timeout = self.request_timeout(req.timeout_ms, grpc_timeout)?;
        let deadline = Instant::now() + timeout;
        if req.target.is_empty() {
            return self.builtin(caller, &req.op).await;
        }
        let target = channel::parse_name(&req.target, self.app(caller))?;
        self.authorize(caller, "send to", &target, |g| g.may_send(&target))?;
        let mut request = Msg {
            op: req.op,
            data: req.data,
            headers: req.headers,
            id: self.new_id(),
            channel: target.clone(),
            sender: caller.sender.clone(),
            ts_ms: crate::now_ms(),
            ..Msg::default()
        };
        let local = self.answers_here(&target, &request.op);
        let mut route = accepted.under("route", telemetry::Kind::Internal, || {
            vec![
                KeyValue::new("ipc.msg_id", request.id.clone()),
                KeyValue::new("ipc.channel", target.clone()),
                KeyValue::new("ipc.local_responder", local),
            ]
        });
        route.stamp(&mut request.headers);
        let result = self.route_request(caller, &target, request, deadline).await;
        if let Err(error) = &result {
            route.fail(|| error.to_string());
        }
        Ok(result?)
    }

    /// A built-in op answered by the node itself.
    pub(super) async fn builtin(&self, caller: &Caller, op: &str) -> Result<Msg, NodeError> {
        let data = match op {
            "ping" => serde_json::json!({"node": self.config.name, "ts_ms": crate::now_ms()}),
            "members" => {
                let members = self.members(caller, MembersRequest::default()).await?;
                let budget = crate::members::max_frame_bytes(self.config.max_msg_bytes) / 2;
                let (members, _) = crate::members::cap(members, budget);
                serde_json::Value::Array(members.iter().map(member_json).collect())
            }
            // The caller's own grants (a sidecar learns what its pod may do).
            "grants" => match &caller.grants {
                Some(grants) => {
                    let mut json = grants.to_json();
                    json["authenticated"] = true.into();
                    json["name"] = caller.sender.clone().into();
                    json["app"] = self.app(caller).unwrap_or_default().into();
                    json
                }
                None => serde_json::json!({"authenticated": false, "name": caller.sender}),
            },
            "info" => {
                self.authorize(caller, "call", "info", |g| g.members)?;
                serde_json::json!({
                "node": self.config.name,
                "version": env!("CARGO_PKG_VERSION"),
                "started_ms": self.started_ms,
                "subscribers": self.hub.len(),
                })
            }
            other => {
                return Err(NodeError::InvalidArgument(format!(
                    "unknown built-in op {other:?} for an empty target; the node answers {}",
                    BUILTIN_OPS.join(", ")
                )));
            }
        };
        Ok(Msg {
            op: if op == "ping" {
                "pong".into()
            } else {
                op.to_string()
            },
            data: Some(json::to_value(&data)),
            id: self.new_id(),
            sender: self.config.name.clone(),
            ts_ms: crate::now_ms(),
            ..Msg::default()
        })
    }

    /// Delivers a reply to the request it answers, here or on its node.
    pub async fn reply(&self, caller: &Caller, req: ReplyRequest) -> Result<(), NodeError> {
        if req.reply_to.is_empty() {
            return Err(NodeError::InvalidArgument(
                "reply_to is empty: copy it from the request's `reply_to`".into(),
            ));
        }
        self.check_size(req.encoded_len())?;
        self.check_headers(&req.headers)?;
        // Read once: where it goes, and (here) its pending request's key.
        let Some(route) = self.hub.reply_route(&req.reply_to) else {
            return Err(NodeError::NotFound(format!(
                "no pending request {:?}: not a reply_to this fleet issued",
                crate::text::shorten(&req.reply_to, 128)
            )));
        };
        let mut reply = Msg {
            op: req.op,
            data: req.data,
            headers: req.headers,
            id: self.new_id(),
            sender: caller.sender.clone(),
            ts_ms: crate::now_ms(),
            reply_to: req.reply_to,
            error: req.error,
            ..Msg::default()
        };
        let here = match route {
            ReplyRoute::Here(key) => Some(key),
            ReplyRoute::Elsewhere => None,
        };
        let owned = here.is_some();
        // A replier rarely sends a trace context of its own: the reply is part of
        // the request it answers. While spans are recorded its hop is a child of
        // the request's context; otherwise that context is only written into the
        // reply, when the request is completed (no lookup of its own per reply).
        let parent = caller
            .trace
            .clone()
            .or_else(|| TraceContext::from_headers(&reply.headers));
        let in_request_trace = parent.is_none() && owned;
        let parent = if in_request_trace && telemetry::enabled() {
            self.hub.request_trace(&reply.reply_to)
        } else {
            parent
        };
        let mut hop = Hop::accept("Reply", parent, || {
            vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.method", "Reply"),
                KeyValue::new("ipc.node", self.config.name.clone()),
                KeyValue::new("ipc.op", reply.op.clone()),
                KeyValue::new("ipc.sender", reply.sender.clone()),
                KeyValue::new("ipc.replied_with_error", !reply.error.is_empty()),
            ]
        });
        hop.stamp(&mut reply.headers);
        let delivered = if owned {
            let stamp_request_trace = in_request_trace && !telemetry::enabled();
            self.hub
                .complete_pending(reply, here, stamp_request_trace)
                .map_err(NodeError::from)
        } else {
            self.bus
                .forward_reply(reply)
                .instrument(hop.log_span(None))
                .await
                .map_err(NodeError::from)
        };
        if let Err(error) = &delivered {
            hop.fail(|| error.to_string());
        }
        delivered
    }
}
