//! The JSON API of the page: log in and out, who the session is, members, health,
//! which operations this server has, and the Broadcast, SendMsg and Gather forms.
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

use crate::convert::{ApiError, ledger_json, member_json, msg_json};
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BroadcastForm {
    channel: String,
    op: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    key: String,
}

/// `POST /api/broadcast`: Broadcast as the session's caller.
pub async fn broadcast(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let authed = console.authenticate(&headers, true)?;
    let form: BroadcastForm = parse(&headers, &body)?;
    let request = BroadcastRequest {
        channel: form.channel,
        op: form.op,
        data: form.data.as_ref().map(to_value),
        headers: form.headers,
        key: form.key,
    };
    let answer = console
        .service
        .broadcast(console.request(&authed, request))
        .await?
        .into_inner();
    Ok(Json(json!({
        "id": answer.id,
        "channel": answer.channel,
        "cursor": answer.cursor,
        "duplicate": answer.duplicate,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendForm {
    #[serde(default)]
    target: String,
    op: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    timeout_ms: u32,
}

/// `POST /api/send`: SendMsg as the session's caller; answers the reply.
pub async fn send(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let authed = console.authenticate(&headers, true)?;
    let form: SendForm = parse(&headers, &body)?;
    let request = SendMsgRequest {
        target: form.target,
        op: form.op,
        data: form.data.as_ref().map(to_value),
        headers: form.headers,
        timeout_ms: form.timeout_ms,
    };
    let answer = console
        .service
        .send_msg(console.request(&authed, request))
        .await?
        .into_inner();
    Ok(Json(json!({"reply": answer.reply.as_ref().map(msg_json)})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GatherForm {
    target: String,
    #[serde(default)]
    op: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    headers: HashMap<String, String>,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    timeout_ms: u32,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    key: String,
}

/// `POST /api/gather`: Gather (or its dry run) as the session's caller; answers
/// the ledger.
pub async fn gather(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let authed = console.authenticate(&headers, true)?;
    let form: GatherForm = parse(&headers, &body)?;
    let request = GatherRequest {
        target: form.target,
        op: form.op,
        data: form.data.as_ref().map(to_value),
        headers: form.headers,
        timeout_ms: form.timeout_ms,
        labels: form.labels,
        dry_run: form.dry_run,
        key: form.key,
    };
    let ledger = console
        .service
        .gather(console.request(&authed, request))
        .await?
        .into_inner();
    Ok(Json(ledger_json(&ledger)).into_response())
}
