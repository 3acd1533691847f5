//! The fleet-ipc admin console: a web page for people, served by `ipc-server
//! --admin-listen ADDR` — members fleet-wide, a live tail, forms to Broadcast,
//! SendMsg, Gather and Rollout, rollouts as they run, the locks and limits in use,
//! and the health of the replicas and of the bus.
//!
//! The console is a client of the node, not a second implementation: every call
//! goes through the same `ipc.v1.Ipc` service the gRPC port serves (identity, rate
//! limit, grants, validation, status codes), in process, with the token of the
//! person's session as its `authorization` metadata. A token without a grant is
//! refused here exactly as over gRPC.
//!
//! # Layout
//! - [`session`]: the session cookie, the server-side store of tokens, CSRF tokens.
//! - [`api`]: the JSON API the page calls (session, members, health, the forms,
//!   locks and limits in use).
//! - [`live`]: the streams: the live tail (Server-Sent Events from Subscribe) and a
//!   Rollout's progress (one JSON line per event).
//! - [`assets`]: the page itself (HTML, CSS, JavaScript compiled into the binary)
//!   and the security headers on every answer (strict Content-Security-Policy).
//! - [`convert`]: messages, members and ledgers as JSON; statuses as HTTP errors.

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use http::HeaderMap;
use ipc_core::Node;
use ipc_core::auth::{Caller, Grants};
use ipc_core::grpc::identify::{AUTHORIZATION_METADATA, Identify, Peer, SENDER_METADATA, bearer};
use ipc_core::grpc::service::IpcService;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;

pub mod api;
pub mod assets;
pub mod convert;
pub mod live;
pub mod session;

use convert::ApiError;
use session::{CSRF_HEADER, Session, Sessions};

/// The sender name of console calls on a server without tokens (where the caller's
/// `ipc-sender` is trusted); with tokens the sender is the token's name.
pub const CONSOLE_SENDER: &str = "console";

/// How the console is set up by its server.
pub struct ConsoleOptions {
    /// How callers are identified: the same identity as the gRPC port.
    pub identity: Arc<dyn Identify>,
    /// Whether a login must give a token (the server has a tokens file).
    pub requires_token: bool,
    /// What carries messages between replicas ("memory", "redis"), for the health view.
    pub bus: &'static str,
    /// Served over HTTPS: the session cookie is marked `Secure`.
    pub https: bool,
}

/// One console: the node it is a client of, and its sessions.
pub struct Console {
    node: Arc<Node>,
    service: IpcService,
    identity: Arc<dyn Identify>,
    sessions: Sessions,
    requires_token: bool,
    bus: &'static str,
    https: bool,
    closing: watch::Sender<bool>,
    /// Which optional operations the service implements, once asked (see `api`).
    probed: parking_lot::Mutex<std::collections::HashMap<&'static str, bool>>,
}

/// A request from a logged-in browser: who it is for the node, and the metadata
/// that makes the same caller for the service.
pub struct Authed {
    pub session: Session,
    pub caller: Caller,
    pub metadata: MetadataMap,
}

impl Console {
    pub fn new(node: Arc<Node>, options: ConsoleOptions) -> Arc<Self> {
        Arc::new(Self {
            service: IpcService::with_identity(node.clone(), options.identity.clone()),
            node,
            identity: options.identity,
            sessions: Sessions::default(),
            requires_token: options.requires_token,
            bus: options.bus,
            https: options.https,
            closing: watch::Sender::new(false),
            probed: parking_lot::Mutex::default(),
        })
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Ends every live stream (tail, rollout progress), so that the HTTP server can
    /// stop; called at shutdown.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Completes once [`Console::close`] was called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closed| *closed).await;
        }
    }

    /// The metadata a gRPC client with this secret would send.
    fn metadata(&self, secret: Option<&str>) -> Result<MetadataMap, ApiError> {
        let mut metadata = MetadataMap::new();
        metadata.insert(
            SENDER_METADATA,
            CONSOLE_SENDER.parse().expect("a valid metadata value"),
        );
        if let Some(secret) = secret {
            let value = bearer(secret).map_err(|e| ApiError::unauthenticated(e.to_string()))?;
            metadata.insert(AUTHORIZATION_METADATA, value);
        }
        Ok(metadata)
    }

    /// Who a secret is, by the node's identity (as the gRPC port would decide).
    fn identify(&self, secret: Option<&str>) -> Result<(Caller, MetadataMap), ApiError> {
        let metadata = self.metadata(secret)?;
        let caller = self
            .identity
            .identify(&metadata, &Peer::default())
            .map_err(ApiError::from)?;
        Ok((caller, metadata))
    }

    /// The logged-in session of a request. `action`: a request that changes
    /// something, which must also carry the session's CSRF token and no foreign
    /// `Origin`.
    pub fn authenticate(&self, headers: &HeaderMap, action: bool) -> Result<Authed, ApiError> {
        if action {
            check_origin(headers)?;
        }
        let id = session::cookie_id(headers)
            .ok_or_else(|| ApiError::unauthenticated("not logged in"))?;
        let session = self
            .sessions
            .get(&id)
            .ok_or_else(|| ApiError::unauthenticated("the session ended; log in again"))?;
        if action {
            let given = headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !session::csrf_matches(&session.csrf, given) {
                return Err(ApiError::forbidden(
                    "missing or wrong CSRF token: reload the console",
                ));
            }
        }
        let (caller, metadata) = match self.identify(session.secret.as_deref()) {
            Ok(found) => found,
            Err(error) => {
                // The token was removed from the tokens file since the login.
                self.sessions.close(&id);
                return Err(error);
            }
        };
        Ok(Authed {
            session,
            caller,
            metadata,
        })
    }

    /// An action (a POST) as a request to the service: the logged-in session,
    /// checked for CSRF and origin, as the caller, and its JSON body, read as a
    /// form `F` and made into the request by `into`.
    pub fn action<F, R>(
        &self,
        headers: &HeaderMap,
        body: &axum::body::Bytes,
        into: impl FnOnce(F) -> Result<R, ApiError>,
    ) -> Result<tonic::Request<R>, ApiError>
    where
        F: serde::de::DeserializeOwned,
    {
        let authed = self.authenticate(headers, true)?;
        let form = api::parse(headers, body)?;
        Ok(self.request(&authed, into(form)?))
    }

    /// A request to the service as the session's caller.
    pub fn request<T>(&self, authed: &Authed, message: T) -> tonic::Request<T> {
        tonic::Request::from_parts(
            authed.metadata.clone(),
            http::Extensions::default(),
            message,
        )
    }

    pub fn service(&self) -> &IpcService {
        &self.service
    }
}

/// Refuses a request whose `Origin` is another site (the cookie is SameSite=Strict
/// already; this also covers browsers that ignore it).
fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return Ok(());
    };
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    if host.is_empty() || origin_host != host {
        return Err(ApiError::forbidden(
            "request from another origin refused (cross-site request)",
        ));
    }
    Ok(())
}

/// Grants as the page shows them; `None`: an unauthenticated caller, who may do
/// everything.
pub fn grants_json(grants: Option<&Grants>) -> serde_json::Value {
    match grants {
        None => serde_json::Value::Null,
        Some(g) => {
            let list = |p: &[ipc_core::channel::Pattern]| {
                p.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>()
            };
            serde_json::json!({
                "broadcast": list(&g.broadcast),
                "send": list(&g.send),
                "subscribe": list(&g.subscribe),
                "members": g.members,
                "lock": list(&g.lock),
                "limit": list(&g.limit),
            })
        }
    }
}

/// The console's routes: the page, its assets, the JSON API and the streams.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/app.css", get(assets::style))
        .route("/api/session", get(api::session))
        .route("/api/login", post(api::login))
        .route("/api/logout", post(api::logout))
        .route("/api/members", get(api::members))
        .route("/api/health", get(api::health))
        .route("/api/capabilities", get(api::capabilities))
        .route("/api/locks", get(api::locks))
        .route("/api/broadcast", post(api::broadcast))
        .route("/api/send", post(api::send))
        .route("/api/gather", post(api::gather))
        .route("/api/rollout", post(live::rollout))
        .route("/api/tail", get(live::tail))
        .fallback(assets::not_found)
        .layer(axum::middleware::map_response(assets::security_headers))
        .with_state(console)
}
