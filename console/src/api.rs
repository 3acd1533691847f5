//! The JSON API of the page: log in and out, who the session is, members, health,
//! which operations this server has, the Broadcast, SendMsg and Gather forms, and
//! the locks and limits in use.
//! Every operation is a call to the `ipc.v1.Ipc` service as the session's caller.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use ipc_proto::json::to_value;
use ipc_proto::pb::ipc_server::Ipc;
use ipc_proto::pb::{
    BroadcastRequest, GatherRequest, LimitRequest, LockRequest, MembersRequest, RolloutRequest,
    SendMsgRequest,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::HashMap;

use crate::convert::{ApiError, in_use_json, ledger_json, member_json, msg_json};
use crate::{Authed, Console, grants_json, session};

type ApiResult = Result<Response, ApiError>;

/// Parses a JSON body; the page always sends `Content-Type: application/json`,
/// which a cross-site HTML form cannot.
pub(crate) fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "INVALID_ARGUMENT",
            "send the request as application/json",
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("request body: {e}")))
}

fn session_json(console: &Console, authed: &Authed) -> Value {
    json!({
        "logged_in": true,
        "requires_token": console.requires_token,
        "node": console.node.name(),
        "sender": authed.caller.sender,
        "app": authed.caller.app.clone().or_else(|| console.node.config().default_app.clone()),
        "authenticated": authed.caller.is_authenticated(),
        "grants": grants_json(authed.caller.grants.as_deref()),
        "csrf": authed.session.csrf,
    })
}

/// `GET /api/session`: who is logged in, with the CSRF token for actions.
pub async fn session(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match console.authenticate(&headers, false) {
        Ok(authed) => Json(session_json(&console, &authed)).into_response(),
        Err(_) => Json(json!({
            "logged_in": false,
            "requires_token": console.requires_token,
        }))
        .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Login {
    #[serde(default)]
    token: String,
}

/// `POST /api/login {"token": …}`: checks the token with the node's identity and
/// opens a session; the answer sets the session cookie.
pub async fn login(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    crate::check_origin(&headers)?;
    let login: Login = parse(&headers, &body)?;
    let secret = Some(login.token.trim().to_string()).filter(|t| !t.is_empty());
    if console.requires_token && secret.is_none() {
        return Err(ApiError::unauthenticated(
            "this server has a tokens file: log in with a token",
        ));
    }
    let (caller, metadata) = console.identify(secret.as_deref())?;
    if let Some(old) = session::cookie_id(&headers) {
        console.sessions.close(&old);
    }
    let id = console.sessions.open(secret);
    let session = console
        .sessions
        .get(&id)
        .ok_or_else(|| ApiError::unauthenticated("the session could not be opened"))?;
    tracing::info!(sender = %caller.sender, "console login");
    let authed = Authed {
        session,
        caller,
        metadata,
    };
    let mut response = Json(session_json(&console, &authed)).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(&id, console.https)
            .parse()
            .expect("a valid cookie"),
    );
    Ok(response)
}

/// `POST /api/logout`: ends the session.
pub async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> ApiResult {
    console.authenticate(&headers, true)?;
    if let Some(id) = session::cookie_id(&headers) {
        console.sessions.close(&id);
    }
    let mut response = Json(json!({"logged_in": false})).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session::clear_cookie(console.https)
            .parse()
            .expect("a valid cookie"),
    );
    Ok(response)
}

/// `GET /api/members`: every member fleet-wide (Members, as the session's caller).
pub async fn members(State(console): State<Arc<Console>>, headers: HeaderMap) -> ApiResult {
    let authed = console.authenticate(&headers, false)?;
    let request = console.request(&authed, MembersRequest::default());
    let answer = console.service.members(request).await?.into_inner();
    Ok(Json(json!({
        "node": console.node.name(),
        "truncated": answer.truncated,
        "members": answer.members.iter().map(member_json).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /api/health`: this replica, its bus, and every replica the bus knows.
pub async fn health(State(console): State<Arc<Console>>, headers: HeaderMap) -> ApiResult {
    console.authenticate(&headers, false)?;
    let node = &console.node;
    let bus_healthy = *node.bus().health().borrow();
    // The replicas sharing the bus, from their presence (Redis): each one listed
    // heartbeats, whatever replica serves this page.
    let (replicas, replicas_error) = match node.bus().replicas().await {
        Ok(replicas) => (replicas, None),
        Err(error) => (Vec::new(), Some(error.to_string())),
    };
    let replicas: Vec<Value> = replicas
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "members": r.members,
                "heartbeat_age_ms": r.heartbeat_age_ms,
            })
        })
        .collect();
    Ok(Json(json!({
        "node": node.name(),
        "version": env!("CARGO_PKG_VERSION"),
        "bus": console.bus,
        "bus_healthy": bus_healthy,
        "subscribers": node.hub().len(),
        "replicas": replicas,
        "replicas_error": replicas_error,
    }))
    .into_response())
}

/// `GET /api/capabilities`: which of Gather, Rollout, Lock and Limit this server
/// implements (a server from before they existed answers UNIMPLEMENTED).
pub async fn capabilities(State(console): State<Arc<Console>>, headers: HeaderMap) -> ApiResult {
    let authed = console.authenticate(&headers, false)?;
    let mut found = serde_json::Map::new();
    for name in ["gather", "rollout", "lock", "limit"] {
        found.insert(name.into(), probe(&console, &authed, name).await.into());
    }
    Ok(Json(Value::Object(found)).into_response())
}

/// Whether the service implements `operation`, asked once with a request that does
/// nothing (empty, dry run) and remembered.
async fn probe(console: &Console, authed: &Authed, operation: &'static str) -> bool {
    if let Some(known) = console.probed.lock().get(operation) {
        return *known;
    }
    let service = &console.service;
    let status = match operation {
        "gather" => {
            let request = GatherRequest {
                dry_run: true,
                ..GatherRequest::default()
            };
            service.gather(console.request(authed, request)).await.err()
        }
        "rollout" => {
            let request = RolloutRequest {
                dry_run: true,
                ..RolloutRequest::default()
            };
            service
                .rollout(console.request(authed, request))
                .await
                .err()
        }
        "lock" => service
            .lock(console.request(authed, LockRequest::default()))
            .await
            .err(),
        _ => service
            .limit(console.request(authed, LimitRequest::default()))
            .await
            .err(),
    };
    let code = status.map(|s| s.code());
    let available = code != Some(tonic::Code::Unimplemented);
    // Refused before reaching the operation: ask again next time.
    if !matches!(
        code,
        Some(tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted)
    ) {
        console.probed.lock().insert(operation, available);
    }
    available
}

/// Refuses a form that sets a field `operation` does not have (one of another
/// form sharing its struct): `given` is each such field and whether it was set.
fn not_fields_of(operation: &str, given: &[(&str, bool)]) -> Result<(), ApiError> {
    match given.iter().find(|(_, set)| *set) {
        Some((field, _)) => Err(ApiError::invalid(format!(
            "{field} is not a field of {operation}"
        ))),
        None => Ok(()),
    }
}

/// The Broadcast and SendMsg forms: the message, and where it goes (a channel,
/// or a target and how long to wait for its reply).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct MessageForm {
    channel: String,
    key: String,
    target: String,
    timeout_ms: u32,
    op: String,
    data: Option<Value>,
    headers: HashMap<String, String>,
}

impl MessageForm {
    fn broadcast(self) -> Result<BroadcastRequest, ApiError> {
        not_fields_of(
            "Broadcast",
            &[
                ("target", !self.target.is_empty()),
                ("timeout_ms", self.timeout_ms != 0),
            ],
        )?;
        Ok(BroadcastRequest {
            channel: self.channel,
            op: self.op,
            data: self.data.as_ref().map(to_value),
            headers: self.headers,
            key: self.key,
        })
    }

    fn send(self) -> Result<SendMsgRequest, ApiError> {
        not_fields_of(
            "SendMsg",
            &[
                ("channel", !self.channel.is_empty()),
                ("key", !self.key.is_empty()),
            ],
        )?;
        Ok(SendMsgRequest {
            target: self.target,
            op: self.op,
            data: self.data.as_ref().map(to_value),
            headers: self.headers,
            timeout_ms: self.timeout_ms,
        })
    }
}

/// `POST /api/broadcast`: Broadcast as the session's caller.
pub async fn broadcast(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let request = console.action(&headers, &body, MessageForm::broadcast)?;
    let answer = console.service.broadcast(request).await?.into_inner();
    Ok(Json(json!({
        "id": answer.id,
        "channel": answer.channel,
        "cursor": answer.cursor,
        "duplicate": answer.duplicate,
    }))
    .into_response())
}

/// `POST /api/send`: SendMsg as the session's caller; answers the reply.
pub async fn send(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let request = console.action(&headers, &body, MessageForm::send)?;
    let answer = console.service.send_msg(request).await?.into_inner();
    Ok(Json(json!({"reply": answer.reply.as_ref().map(msg_json)})).into_response())
}

/// The Gather and Rollout forms: the fields of both, and those of Rollout alone.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct OperationForm {
    target: String,
    op: String,
    data: Option<Value>,
    headers: HashMap<String, String>,
    labels: HashMap<String, String>,
    timeout_ms: u32,
    dry_run: bool,
    key: String,
    wave_size: Option<u32>,
    max_failures: Option<u32>,
    ready_timeout_ms: Option<u32>,
}

impl OperationForm {
    pub(crate) fn gather(self) -> Result<GatherRequest, ApiError> {
        not_fields_of(
            "Gather",
            &[
                ("wave_size", self.wave_size.is_some()),
                ("max_failures", self.max_failures.is_some()),
                ("ready_timeout_ms", self.ready_timeout_ms.is_some()),
            ],
        )?;
        Ok(GatherRequest {
            target: self.target,
            op: self.op,
            data: self.data.as_ref().map(to_value),
            headers: self.headers,
            timeout_ms: self.timeout_ms,
            labels: self.labels,
            dry_run: self.dry_run,
            key: self.key,
        })
    }

    pub(crate) fn rollout(self) -> RolloutRequest {
        RolloutRequest {
            target: self.target,
            op: self.op,
            data: self.data.as_ref().map(to_value),
            headers: self.headers,
            timeout_ms: self.timeout_ms,
            labels: self.labels,
            dry_run: self.dry_run,
            key: self.key,
            wave_size: self.wave_size.unwrap_or_default(),
            max_failures: self.max_failures.unwrap_or_default(),
            ready_timeout_ms: self.ready_timeout_ms.unwrap_or_default(),
        }
    }
}

/// `POST /api/gather`: Gather (or its dry run) as the session's caller; answers
/// the ledger.
pub async fn gather(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let request = console.action(&headers, &body, OperationForm::gather)?;
    let ledger = console.service.gather(request).await?.into_inner();
    Ok(Json(ledger_json(&ledger)).into_response())
}

/// `GET /api/locks`: the leases and token buckets in use fleet-wide that the
/// session's token may see (its `lock` and `limit` grants). No RPC lists them: the
/// node does, for the console only, as the session's caller.
pub async fn locks(State(console): State<Arc<Console>>, headers: HeaderMap) -> ApiResult {
    let authed = console.authenticate(&headers, false)?;
    let in_use = console.service.in_use(console.request(&authed, ())).await?;
    Ok(Json(in_use_json(&in_use)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_refuses_the_fields_of_the_other_operation() {
        let message = |body: Value| serde_json::from_value::<MessageForm>(body).unwrap();
        let error = message(json!({"channel": ":worker", "op": "x", "timeout_ms": 5}))
            .broadcast()
            .unwrap_err();
        assert_eq!(error.message, "timeout_ms is not a field of Broadcast");
        assert!(
            message(json!({"target": ":worker", "op": "x"}))
                .send()
                .is_ok()
        );
        let operation = || {
            serde_json::from_value::<OperationForm>(
                json!({"target": ":worker", "op": "x", "wave_size": 2}),
            )
            .unwrap()
        };
        let error = operation().gather().unwrap_err();
        assert_eq!(error.message, "wave_size is not a field of Gather");
        assert_eq!(operation().rollout().wave_size, 2);
    }
}
