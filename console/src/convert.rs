//! What the console's JSON API says: messages, members, ledgers and the locks and
//! limits in use as JSON for the page, and gRPC statuses as HTTP errors with the
//! status's own message.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use ipc_core::coord::InUse;
use ipc_proto::pb::{Ledger, Member, Msg, Outcome, RolloutEvent, ledger, outcome};
use ipc_proto::{code_name, json};
use serde_json::{Value, json};

/// A message as the page shows it; `data` is JSON, never HTML.
pub fn msg_json(msg: &Msg) -> Value {
    json!({
        "op": msg.op,
        "data": json::from_optional(msg.data.as_ref()),
        "headers": msg.headers,
        "id": msg.id,
        "channel": msg.channel,
        "sender": msg.sender,
        "ts_ms": msg.ts_ms,
        "cursor": msg.cursor,
        "reply_to": msg.reply_to,
        "error": msg.error,
    })
}

pub fn member_json(m: &Member) -> Value {
    json!({
        "id": m.id,
        "app": m.app,
        "role": m.role,
        "tag": m.tag,
        "labels": m.labels,
        "channels": m.channels,
        "node": m.node,
        "connected_ms": m.connected_ms,
        "responder": m.responder,
        "roles": m.roles,
    })
}

fn outcome_json(o: &Outcome) -> Value {
    let status = outcome::Status::try_from(o.status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    json!({
        "member": o.member,
        "node": o.node,
        "status": status,
        "reply": o.reply.as_ref().map(msg_json),
        "wave": o.wave,
        "duration_ms": o.duration_ms,
        "detail": o.detail,
    })
}

pub fn ledger_json(l: &Ledger) -> Value {
    let state = ledger::State::try_from(l.state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    json!({
        "id": l.id,
        "target": l.target,
        "op": l.op,
        "state": state,
        "expected": l.expected,
        "ok": l.ok,
        "failed": l.failed,
        "no_reply": l.no_reply,
        "not_ready": l.not_ready,
        "skipped": l.skipped,
        "waves": l.waves,
        "outcomes": l.outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
    })
}

pub fn rollout_event_json(e: &RolloutEvent) -> Value {
    json!({
        "wave": e.wave,
        "outcome": e.outcome.as_ref().map(outcome_json),
        "ledger": e.ledger.as_ref().map(ledger_json),
    })
}

/// The leases and buckets in use, as the Locks & limits view shows them.
pub fn in_use_json(in_use: &InUse) -> Value {
    let locks: Vec<Value> = in_use
        .locks
        .iter()
        .map(|l| {
            json!({
                "name": l.name,
                "holder": l.holder,
                "fence": l.fence.to_string(),
                "expires_ms": l.expires_ms,
            })
        })
        .collect();
    let limits: Vec<Value> = in_use
        .limits
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "tokens": b.tokens,
                "burst": b.burst,
                "rate": b.rate,
                "interval_ms": b.interval_ms,
                "full_in_ms": b.full_in_ms,
            })
        })
        .collect();
    json!({"locks": locks, "limits": limits, "truncated": in_use.truncated})
}

/// An error answer of the JSON API: `{"code": "PERMISSION_DENIED", "message": …}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "PERMISSION_DENIED", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message)
    }

    pub fn json(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let http = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status: http,
            code: code_name(status.code()),
            message: status.message().to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.json())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_keep_their_code_and_message() {
        let e = ApiError::from(tonic::Status::permission_denied("ops may not broadcast"));
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.json()["code"], "PERMISSION_DENIED");
        assert_eq!(e.json()["message"], "ops may not broadcast");
        let e = ApiError::from(tonic::Status::unimplemented(
            "Gather is not implemented yet",
        ));
        assert_eq!(e.status, StatusCode::NOT_IMPLEMENTED);
    }

    #[test]
    fn a_ledger_names_its_state_and_outcomes() {
        let ledger = Ledger {
            state: ledger::State::Done as i32,
            outcomes: vec![Outcome {
                member: "w1".into(),
                status: outcome::Status::Failed as i32,
                ..Outcome::default()
            }],
            ..Ledger::default()
        };
        let j = ledger_json(&ledger);
        assert_eq!(j["state"], "DONE");
        assert_eq!(j["outcomes"][0]["status"], "FAILED");
    }
}
