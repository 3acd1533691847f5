//! The console's streams.
//!
//! - `GET /api/tail?pattern=P`: Server-Sent Events from a Subscribe stream of the
//!   session's caller (a watcher: it never takes requests). Each message is an
//!   event `msg` whose id is the message's cursor, so a browser that reconnects
//!   (`Last-Event-ID`) resumes where it stopped, through the node's own resume; an
//!   error (a pattern not granted, the node shutting down) is an event `ipc-error`.
//! - `POST /api/rollout`: a Rollout's events as they happen, one JSON object per
//!   line (`{"event": …}`, or `{"error": …}` if the stream fails). Closing the page
//!   cancels the Rollout before its next wave, as a gRPC client's cancel would; a
//!   rerun with the same key resumes it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use http::{HeaderMap, header};
use ipc_core::outbound::Outbound;
use ipc_proto::pb::SubscribeRequest;
use ipc_proto::pb::ipc_server::Ipc;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Console;
use crate::api::OperationForm;
use crate::convert::{ApiError, msg_json, rollout_event_json};
use ipc_proto::code_name;

/// Label of the console's tail subscriptions, so Members shows them for what they are.
pub const TAIL_LABEL: (&str, &str) = ("ipc-console", "tail");

#[derive(Deserialize)]
pub struct TailQuery {
    /// Channel names or patterns, separated by spaces or commas.
    #[serde(default)]
    pattern: String,
}

fn error_event(error: &ApiError) -> Event {
    Event::default()
        .event("ipc-error")
        .data(error.json().to_string())
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;

/// `GET /api/tail`: the live tail of a channel pattern.
pub async fn tail(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    Query(query): Query<TailQuery>,
) -> Response {
    let events: Events = match open_tail(&console, &headers, &query).await {
        Ok(events) => events,
        Err(error) => Box::pin(futures::stream::iter([Ok(error_event(&error))])),
    };
    let events = events.take_until(console.closed());
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn open_tail(
    console: &Console,
    headers: &HeaderMap,
    query: &TailQuery,
) -> Result<Events, ApiError> {
    let authed = console.authenticate(headers, false)?;
    let channels: Vec<String> = query
        .pattern
        .split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if channels.is_empty() {
        return Err(ApiError::invalid(
            "give a channel or pattern to tail, e.g. shop:>",
        ));
    }
    // A browser reconnecting after a cut names the last message it had.
    let cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let request = SubscribeRequest {
        channels,
        cursor,
        labels: HashMap::from([(TAIL_LABEL.0.to_string(), TAIL_LABEL.1.to_string())]),
        ..SubscribeRequest::default()
    };
    let stream = console
        .service()
        .subscribe_shared(console.request(&authed, request))
        .await?;
    Ok(Box::pin(stream.map(|item| {
        Ok(match item.map(Outbound::into_shared) {
            Ok(msg) => {
                let event = Event::default()
                    .event("msg")
                    .data(msg_json(&msg).to_string());
                if msg.cursor.is_empty() {
                    event
                } else {
                    event.id(msg.cursor.clone())
                }
            }
            Err(status) => error_event(&ApiError::from(status)),
        })
    })))
}

fn line(value: Value) -> Result<Bytes, Infallible> {
    let mut text = value.to_string();
    text.push('\n');
    Ok(Bytes::from(text))
}

/// `POST /api/rollout`: runs a Rollout (or its dry run) as the session's caller and
/// streams its events.
pub async fn rollout(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request = console.action(&headers, &body, |form: OperationForm| Ok(form.rollout()))?;
    let events = console.service().rollout(request).await?.into_inner();
    let lines = events
        .map(|item| match item {
            Ok(event) => line(json!({"event": rollout_event_json(&event)})),
            Err(status) => line(json!({"error": {
                "code": code_name(status.code()),
                "message": status.message(),
            }})),
        })
        .take_until(console.closed());
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}
