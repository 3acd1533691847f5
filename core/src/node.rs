//! The node: the five operations of `ipc.v1.Ipc` over a hub and a bus, with the
//! input rules of docs/design.md. Transport-free: the gRPC service maps its errors to
//! status codes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use ipc_proto::json;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, Member, MembersRequest, Msg, ReplyRequest, SendMsgRequest,
    SubscribeRequest,
};
use prost::Message as _;

use crate::auth::Grants;
use crate::bus::{Bus, BusError, ReplyError, RequestError};
use crate::channel::{self, Pattern};
use crate::cursor::Cursor;
use crate::hub::{Closed, Hub, RegisterError, StreamLimits, SubscriberSpec, Subscription};
use crate::limits::RateLimiter;
use crate::metrics::{Metrics, Refusal, SendOutcome};
use crate::telemetry::{self, Hop, TraceContext};
use opentelemetry::KeyValue;
use tracing::Instrument as _;

/// How a node behaves; every field has a default fit for tests and small fleets.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name: in `ipc:subscribed`, `Member.node` and `reply_to`.
    pub name: String,
    /// App id for callers that give none (`--app`).
    pub default_app: Option<String>,
    /// Largest accepted message (op, data and headers encoded), in bytes.
    pub max_msg_bytes: usize,
    /// Messages queued per subscriber before it is cut off as too slow.
    pub subscriber_queue: usize,
    /// Bytes of memory queued per subscriber before it is cut off as too slow.
    pub subscriber_queue_bytes: usize,
    /// Bytes of memory all subscriber queues may hold together; over it the
    /// subscriber holding the most is cut off.
    pub max_queued_bytes: usize,
    /// SendMsg wait when the caller gives no `timeout_ms`.
    pub default_timeout: Duration,
    /// Largest `timeout_ms` accepted.
    pub max_timeout: Duration,
    /// Most channels in one SubscribeRequest.
    pub max_channels: usize,
    /// Most headers in one message (and labels in one subscription).
    pub max_headers: usize,
    /// Largest total of header (or label) names and values in one message, in bytes.
    pub max_header_bytes: usize,
    /// Most live subscriber streams on this node.
    pub max_streams: usize,
    /// Most live subscriber streams of one identity (token, certificate, or
    /// unauthenticated sender) on this node.
    pub max_subscriptions_per_identity: usize,
    /// Requests per second per identity (token bucket); `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// How long a Broadcast's idempotency `key` is remembered (`--dedup-window`).
    pub dedup_window: Duration,
}

/// A token bucket per identity: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: default_node_name(),
            default_app: None,
            max_msg_bytes: 1 << 20,
            subscriber_queue: 4096,
            subscriber_queue_bytes: crate::queue::QueueLimits::DEFAULT_BYTES,
            max_queued_bytes: crate::queue::QueueLimits::DEFAULT_TOTAL_BYTES,
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(300),
            max_channels: 256,
            max_headers: 64,
            max_header_bytes: 64 << 10,
            max_streams: 10_000,
            max_subscriptions_per_identity: 1_000,
            rate_limit: None,
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// `<hostname>-<4 hex>`: readable, and unique among replicas sharing a host name.
pub fn default_node_name() -> String {
    format!("{}-{:04x}", hostname(), rand::random::<u16>())
}

/// This machine's host name, reduced to characters valid in a channel segment
/// (`local` if it cannot be read).
pub fn hostname() -> String {
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if host.is_empty() {
        "local".into()
    } else {
        host
    }
}

/// Who is calling, as the transport established it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// App id from `ipc-app` metadata or the caller's identity.
    pub app: Option<String>,
    /// Name stamped as `sender` on what the caller sends; also the identity that
    /// per-identity limits count.
    pub sender: String,
    /// What an authenticated caller may do; `None` for an unauthenticated caller
    /// (loopback, a pod's socket, `--insecure`), who may do everything.
    pub grants: Option<Arc<Grants>>,
    /// The trace context of the call (`traceparent` metadata): what the operation's
    /// spans and messages are part of. Without it, a message's own `traceparent`
    /// header is used.
    pub trace: Option<crate::telemetry::TraceContext>,
}

impl Caller {
    /// Whether the transport proved who this is (token or certificate), so that
    /// `sender` cannot be spoofed.
    pub fn is_authenticated(&self) -> bool {
        self.grants.is_some()
    }
}

/// Why an operation failed, as the caller should learn it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    /// A size or rate limit (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    TooLarge(String),
    /// The caller's grants do not cover the request.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NoResponders(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request conflicts with state kept for it (a key used differently).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another call holds what this one needs (a keyed operation still running).
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Internal(String),
}

impl From<channel::ChannelError> for NodeError {
    fn from(e: channel::ChannelError) -> Self {
        NodeError::InvalidArgument(e.to_string())
    }
}

impl From<BusError> for NodeError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Unavailable(m) => NodeError::Unavailable(m),
            BusError::BadCursor(m) => NodeError::InvalidArgument(m),
            BusError::Internal(m) => NodeError::Internal(m),
            BusError::Refused(e) => e,
        }
    }
}

impl From<RequestError> for NodeError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::NoResponders(_) => NodeError::NoResponders(e.to_string()),
            RequestError::DeadlineExceeded(_) => NodeError::DeadlineExceeded(e.to_string()),
            RequestError::Unavailable(m) => NodeError::Unavailable(m),
        }
    }
}

impl From<ReplyError> for NodeError {
    fn from(e: ReplyError) -> Self {
        match e {
            ReplyError::NotFound(_) => NodeError::NotFound(e.to_string()),
            ReplyError::Unavailable(m) => NodeError::Unavailable(m),
        }
    }
}

/// An item of a subscriber's stream: a message, or the reason the node ended it.
pub type SubscribeStream = Pin<Box<dyn Stream<Item = Result<Arc<Msg>, Closed>> + Send>>;

/// Header set on every request handed to a subscriber: its deadline, in ms since
/// the epoch. A node that relays the request (the sidecar) waits no longer.
pub const DEADLINE_HEADER: &str = "ipc-deadline-ms";

/// Ops the node answers itself (SendMsg with an empty target).
pub const BUILTIN_OPS: [&str; 4] = ["ping", "members", "info", "grants"];

pub struct Node {
    config: NodeConfig,
    hub: Arc<Hub>,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    id_prefix: String,
    next_id: AtomicU64,
    started_ms: i64,
    closing: AtomicBool,
    rate: Option<RateLimiter>,
    revocations: crate::revocation::Revocations,
    /// Leases and buckets when the bus keeps none of its own.
    pub(crate) coord: crate::coord::MemoryCoord,
}

impl Node {
    pub fn new(config: NodeConfig, bus: Arc<dyn Bus>) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::with_queue_limits(
            config.name.clone(),
            crate::queue::QueueLimits {
                messages: config.subscriber_queue,
                bytes: config.subscriber_queue_bytes,
                total_bytes: config.max_queued_bytes,
            },
            metrics.clone(),
        );
        bus.attach(hub.clone());
        let presence = Arc::downgrade(&bus);
        hub.on_change(move || {
            if let Some(bus) = presence.upgrade() {
                bus.subscribers_changed();
            }
        });
        Arc::new(Self {
            id_prefix: format!("{:08x}", rand::random::<u32>()),
            rate: config
                .rate_limit
                .map(|r| RateLimiter::new(r.per_second, r.burst)),
            config,
            hub,
            bus,
            metrics,
            next_id: AtomicU64::new(1),
            started_ms: crate::now_ms(),
            closing: AtomicBool::new(false),
            revocations: crate::revocation::Revocations::default(),
            coord: crate::coord::MemoryCoord::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The token names revoked so far, for streams that must end with their token.
    pub fn revocations(&self) -> &crate::revocation::Revocations {
        &self.revocations
    }

    /// Ends every stream the tokens `names` opened (they were removed from the
    /// tokens file, or changed): subscribers at once, Publish streams once their
    /// answers so far are sent, all with UNAUTHENTICATED. Returns how many
    /// subscribers were ended.
    pub fn revoke(&self, names: &[String]) -> usize {
        self.revocations.revoke(names);
        names
            .iter()
            .map(|name| self.hub.close_owner(name, crate::hub::Closed::Revoked))
            .sum()
    }

    /// A new message id, unique across nodes (random node prefix + counter).
    pub fn new_id(&self) -> String {
        format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Admits one request of `caller` under the per-identity rate limit.
    pub fn admit(&self, caller: &Caller) -> Result<(), NodeError> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check(&caller.sender, Instant::now()).map_err(|wait| {
            self.metrics.refuse(Refusal::Rate);
            NodeError::TooLarge(format!(
                "rate limit: {} exceeds {} requests per second (--rate-limit); retry in {} ms",
                caller.sender,
                rate.per_second(),
                wait.as_millis().max(1)
            ))
        })
    }

    /// Refuses what an authenticated caller's grants do not cover.
    pub(crate) fn authorize(
        &self,
        caller: &Caller,
        verb: &str,
        what: &str,
        allowed: impl FnOnce(&Grants) -> bool,
    ) -> Result<(), NodeError> {
        match &caller.grants {
            Some(grants) if !allowed(grants) => {
                self.metrics.refuse(Refusal::PermissionDenied);
                Err(NodeError::PermissionDenied(format!(
                    "{} may not {verb} {what:?}: not in its grants",
                    caller.sender
                )))
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn app<'a>(&'a self, caller: &'a Caller) -> Option<&'a str> {
        caller
            .app
            .as_deref()
            .filter(|a| !a.is_empty())
            .or(self.config.default_app.as_deref())
    }

    /// Stores a message in the log; every matching subscriber fleet-wide gets it.
    /// With a `key` seen within the dedup window, stores nothing and answers the
    /// first message's id and cursor with `duplicate` set.
    pub async fn broadcast(
        &self,
        caller: &Caller,
        req: BroadcastRequest,
    ) -> Result<BroadcastResponse, NodeError> {
        self.submit_broadcast(caller, req).await?.await
    }

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
            return self.builtin(caller, &req).await;
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
        let local = self.hub.has_responder(&target);
        let mut route = accepted.under("route", telemetry::Kind::Internal, || {
            vec![
                KeyValue::new("ipc.msg_id", request.id.clone()),
                KeyValue::new("ipc.channel", target.clone()),
                KeyValue::new("ipc.local_responder", local),
            ]
        });
        route.stamp(&mut request.headers);
        let result = self.route_request(&target, request, deadline, local).await;
        if let Err(error) = &result {
            route.fail(|| error.to_string());
        }
        Ok(result?)
    }

    /// A request to a local responder when there is one, else through the bus.
    async fn route_request(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
        local: bool,
    ) -> Result<Msg, RequestError> {
        if local {
            match self.request_local(target, request.clone(), deadline).await {
                Err(RequestError::NoResponders(_)) => {}
                other => return other,
            }
        }
        self.bus.request(target, request, deadline).await
    }

    /// How long a request may wait: `timeout_ms` (the default when 0), bounded by
    /// what is left of the gRPC deadline, minus a margin so that the caller sees
    /// our answer rather than tonic's own cancel at the deadline itself.
    pub(crate) fn request_timeout(
        &self,
        timeout_ms: u32,
        grpc_timeout: Option<Duration>,
    ) -> Result<Duration, NodeError> {
        let requested = Duration::from_millis(u64::from(timeout_ms));
        if requested > self.config.max_timeout {
            self.metrics.refuse(Refusal::Timeout);
            return Err(NodeError::InvalidArgument(format!(
                "timeout_ms {timeout_ms} is above the largest accepted, {} ms",
                self.config.max_timeout.as_millis()
            )));
        }
        let mut timeout = if timeout_ms == 0 {
            self.config.default_timeout
        } else {
            requested
        };
        if let Some(grpc) = grpc_timeout {
            timeout = timeout.min(before_grpc_deadline(grpc));
        }
        Ok(timeout)
    }

    /// Hands a request to a local subscriber of `target` and waits until `deadline`.
    /// Buses call this for requests routed here from other nodes.
    pub async fn request_local(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        self.hub.request(target, request, deadline).await
    }

    async fn builtin(&self, caller: &Caller, req: &SendMsgRequest) -> Result<Msg, NodeError> {
        let data = match req.op.as_str() {
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
            op: if req.op == "ping" {
                "pong".into()
            } else {
                req.op.clone()
            },
            data: Some(json::to_value(&data)),
            id: self.new_id(),
            sender: self.config.name.clone(),
            ts_ms: crate::now_ms(),
            ..Msg::default()
        })
    }

    /// Opens a subscriber stream: `ipc:subscribed`, then (with a cursor) what was
    /// missed, then live messages — without a gap or a duplicate.
    ///
    /// `ipc:subscribed` carries `{"id", "node", "replayed", "cursor"}`: `replayed`
    /// is the number of messages (`ipc:gap` and replayed entries) before the live
    /// ones; `cursor`, when the bus knows it, is the log position after which every
    /// matching entry comes live — a resume point before any message arrived.
    pub async fn subscribe(
        &self,
        caller: &Caller,
        req: SubscribeRequest,
    ) -> Result<SubscribeStream, NodeError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(NodeError::Unavailable(
                "node shutting down; subscribe to another replica".into(),
            ));
        }
        let spec = self.subscriber_spec(caller, &req)?;
        self.bus
            .check_local_subscription(&spec.patterns, &spec.id)?;
        let resume_from = match req.cursor.as_str() {
            "" => None,
            text => Some(
                text.parse::<Cursor>()
                    .map_err(|e| NodeError::InvalidArgument(e.to_string()))?,
            ),
        };
        // Register before reading the log: whatever is appended meanwhile is in the
        // queue, whatever was appended before is in the replay; duplicates are
        // skipped by position below.
        let limits = StreamLimits {
            max_streams: self.config.max_streams,
            max_per_owner: self.config.max_subscriptions_per_identity,
        };
        let subscription = self.hub.try_register(spec, limits).map_err(|e| {
            let (reason, flag) = match e {
                RegisterError::Streams => (Refusal::Streams, "--max-streams"),
                RegisterError::PerOwner => (
                    Refusal::Subscriptions,
                    "--max-subscriptions-per-identity",
                ),
            };
            self.metrics.refuse(reason);
            NodeError::TooLarge(match e {
                RegisterError::Streams => format!(
                    "this node has {} live subscriber streams, its limit ({flag}); try another replica or later",
                    self.config.max_streams
                ),
                RegisterError::PerOwner => format!(
                    "{} has {} live subscriptions on this node, its limit ({flag}); close some first",
                    caller.sender, self.config.max_subscriptions_per_identity
                ),
            })
        })?;
        self.bus.cover(&subscription.patterns).await;
        // A bus that cannot tell where its log stands (a replica that has not reached
        // Redis yet) could only serve this stream from an unknown position, losing
        // whatever lies between: refuse (UNAVAILABLE), the client retries.
        let log_head = self.bus.head().await?;
        let mut head = Vec::new();
        let mut floor = None;
        // Where the stream stands in the log once the head is sent: every matching
        // entry after it comes live. Told to the subscriber as a resume point.
        let mut position = None;
        if let Some(cursor) = resume_from {
            let replay = self.bus.replay_for(&cursor, &subscription.patterns).await?;
            if let Some(reason) = replay.gap {
                self.metrics.gaps.fetch_add(1, Ordering::Relaxed);
                let gap = crate::notice::Gap::new(Some(cursor), reason);
                head.push(Arc::new(gap.to_msg(self.new_id(), &self.config.name)));
            } else {
                floor = Some(cursor);
                position = Some(cursor);
            }
            for msg in replay.messages {
                if let Ok(c) = msg.cursor.parse::<Cursor>() {
                    floor = Some(c);
                    position = Some(c);
                }
                if subscription.matches(&msg.channel) {
                    head.push(msg);
                }
            }
        }
        if position.is_none() {
            position = log_head;
        }
        // `replayed` tells a client where the head ends (a sidecar relies on it).
        let subscribed = crate::notice::Subscribed {
            id: subscription.id.clone(),
            node: self.config.name.clone(),
            replayed: head.len(),
            cursor: position.map(|p| p.to_string()),
        };
        let subscribed = subscribed.to_msg(self.new_id(), &self.config.name);
        head.insert(0, Arc::new(subscribed));
        Ok(Box::pin(live_stream(head, subscription, floor)))
    }

    fn subscriber_spec(
        &self,
        caller: &Caller,
        req: &SubscribeRequest,
    ) -> Result<SubscriberSpec, NodeError> {
        let invalid = NodeError::InvalidArgument;
        self.check_size(req.encoded_len())?;
        if req.channels.len() > self.config.max_channels {
            self.metrics.refuse(Refusal::Channels);
            return Err(NodeError::TooLarge(format!(
                "{} channels in one subscription; at most {}",
                req.channels.len(),
                self.config.max_channels
            )));
        }
        self.check_map("labels", &req.labels)?;
        let app = match req.app.as_str() {
            "" => self.app(caller).unwrap_or_default().to_string(),
            app => {
                channel::check_segment("app", app).map_err(invalid)?;
                app.to_string()
            }
        };
        let app_ref = (!app.is_empty()).then_some(app.as_str());
        // A chosen id is a channel the subscriber receives requests on (and takes
        // over from an earlier subscriber with that id), so it needs a grant; a
        // generated one is unique and needs none.
        let chosen_id = !req.id.is_empty();
        let id = match req.id.as_str() {
            "" => format!("sub-{:012x}", rand::random::<u64>() >> 16),
            id => channel::parse_name(id, None)
                .map_err(|e| NodeError::InvalidArgument(format!("subscriber id: {e}")))?,
        };
        let mut patterns = Vec::new();
        for raw in &req.channels {
            patterns.push(channel::parse_pattern(raw, app_ref)?);
        }
        if !req.role.is_empty() {
            channel::check_segment("role", &req.role).map_err(invalid)?;
            let app = app_ref.ok_or_else(|| {
                NodeError::InvalidArgument(
                    "role given but no app id is known (set `app`, `ipc-app` metadata or the server's --app)".into(),
                )
            })?;
            patterns.push(Pattern::parse(&format!("{app}:{}", req.role))?);
            if !req.tag.is_empty() {
                channel::check_segment("tag", &req.tag).map_err(invalid)?;
                patterns.push(Pattern::parse(&format!("{app}:{}:{}", req.role, req.tag))?);
            }
        } else if !req.tag.is_empty() {
            return Err(invalid(
                "tag given without a role; the tag channel is app:role:tag".into(),
            ));
        }
        for pattern in &patterns {
            self.authorize(caller, "subscribe to", pattern.as_str(), |g| {
                g.may_subscribe(pattern)
            })?;
        }
        let id_pattern = Pattern::parse(&id)?;
        if chosen_id {
            self.authorize(caller, "subscribe with id", &id, |g| {
                g.may_subscribe(&id_pattern)
            })?;
        }
        patterns.push(id_pattern);
        let mut seen = std::collections::HashSet::new();
        patterns.retain(|p| seen.insert(p.as_str().to_string()));
        let relayed = self.relayed_members(caller, &id, &req.members)?;
        Ok(SubscriberSpec {
            id,
            app,
            role: req.role.clone(),
            tag: req.tag.clone(),
            labels: req.labels.clone(),
            patterns,
            owner: caller.sender.clone(),
            verified_owner: caller.is_authenticated(),
            relayed,
            role_watcher: req.role_watcher,
        })
    }

    /// Checks the members a subscriber relays (a sidecar's local subscribers). Each
    /// is listed fleet-wide under its id, so it needs what a subscriber choosing that
    /// id needs: a valid channel name and, for an authenticated caller, a grant to
    /// subscribe to it. `node` defaults to the relaying subscriber's id.
    fn relayed_members(
        &self,
        caller: &Caller,
        relayer: &str,
        members: &[Member],
    ) -> Result<Vec<Member>, NodeError> {
        if members.len() > self.config.max_channels {
            self.metrics.refuse(Refusal::Channels);
            return Err(NodeError::TooLarge(format!(
                "{} relayed members in one subscription; at most {}",
                members.len(),
                self.config.max_channels
            )));
        }
        let mut ids = std::collections::HashSet::new();
        let mut relayed = Vec::with_capacity(members.len());
        for member in members {
            let bad = |what: String| {
                let shown: String = member.id.chars().take(64).collect();
                NodeError::InvalidArgument(format!("relayed member {shown:?}: {what}"))
            };
            let id = channel::parse_name(&member.id, None).map_err(|e| bad(format!("id: {e}")))?;
            let node = match member.node.as_str() {
                "" => relayer.to_string(),
                node if node == self.config.name => {
                    return Err(bad(format!(
                        "node {node:?} is this node's name; give the relaying node's"
                    )));
                }
                node => channel::parse_name(node, None).map_err(|e| bad(format!("node: {e}")))?,
            };
            if !ids.insert((id.clone(), node.clone())) {
                return Err(bad(format!("listed twice for node {node:?}")));
            }
            for (what, value) in [
                ("app", &member.app),
                ("role", &member.role),
                ("tag", &member.tag),
            ] {
                if !value.is_empty() {
                    channel::check_segment(what, value).map_err(|e| bad(e.to_string()))?;
                }
            }
            self.check_map("labels", &member.labels)
                .map_err(|e| bad(e.to_string()))?;
            if member.channels.len() > self.config.max_channels {
                return Err(bad(format!(
                    "{} channels; at most {}",
                    member.channels.len(),
                    self.config.max_channels
                )));
            }
            for raw in &member.channels {
                Pattern::parse(raw).map_err(|e| bad(format!("channel: {e}")))?;
            }
            let id_pattern = Pattern::parse(&id).map_err(|e| bad(format!("id: {e}")))?;
            self.authorize(caller, "relay a member with id", &id, |g| {
                g.may_subscribe(&id_pattern)
            })?;
            self.authorize_relayed(caller, relayer, member, &node)
                .map_err(|e| match e {
                    NodeError::PermissionDenied(m) => {
                        NodeError::PermissionDenied(format!("relayed member {:?}: {m}", id))
                    }
                    other => other,
                })?;
            let member = crate::responders::with_roles(Member {
                id,
                node,
                connected_ms: if member.connected_ms > 0 {
                    member.connected_ms
                } else {
                    crate::now_ms()
                },
                ..member.clone()
            });
            relayed.push(member);
        }
        Ok(relayed)
    }

    /// What a relayed member claims must be within the relaying token's grants:
    /// its app is the caller's, its role and tag channels, its channels, and a
    /// node other than the relayer's own id are ones the token may subscribe to.
    /// Unauthenticated relayers (a pod's socket, loopback) are trusted.
    fn authorize_relayed(
        &self,
        caller: &Caller,
        relayer: &str,
        member: &Member,
        node: &str,
    ) -> Result<(), NodeError> {
        if !caller.is_authenticated() {
            return Ok(());
        }
        let caller_app = self.app(caller).unwrap_or_default();
        if !member.app.is_empty() && member.app != caller_app {
            self.metrics.refuse(Refusal::PermissionDenied);
            return Err(NodeError::PermissionDenied(format!(
                "{} may only relay members of its own app {caller_app:?}, not {:?}",
                caller.sender, member.app
            )));
        }
        for channel in crate::auth::relayed_claims(member, caller_app, relayer, node) {
            let pattern = Pattern::parse(&channel)?;
            self.authorize(caller, "relay a member of", &channel, |g| {
                g.may_subscribe(&pattern)
            })?;
        }
        Ok(())
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
        if Hub::reply_to_node(&req.reply_to).is_none() {
            return Err(NodeError::NotFound(format!(
                "no pending request {:?}: not a reply_to this fleet issued",
                crate::text::shorten(&req.reply_to, 128)
            )));
        }
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
        let owned = self.hub.owns_reply_to(&reply.reply_to);
        // A replier rarely sends a trace context of its own: the reply is part of
        // the request it answers.
        let parent = caller
            .trace
            .clone()
            .or_else(|| TraceContext::from_headers(&reply.headers))
            .or_else(|| {
                owned
                    .then(|| self.hub.request_trace(&reply.reply_to))
                    .flatten()
            });
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
            self.hub.complete_request(reply).map_err(NodeError::from)
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

    /// Fleet-wide members matching the filter. With `channel`, only those a
    /// broadcast on it would reach (a dry run of a broadcast: nothing is sent).
    pub async fn members(
        &self,
        caller: &Caller,
        req: MembersRequest,
    ) -> Result<Vec<Member>, NodeError> {
        self.authorize(caller, "list", "members", |g| g.members)?;
        let channel = match req.channel.as_str() {
            "" => None,
            raw => Some(
                channel::parse_name(raw, self.app(caller))
                    .map_err(|e| NodeError::InvalidArgument(format!("channel: {e}")))?,
            ),
        };
        let all = self.bus.members(self.hub.members()).await?;
        Ok(all
            .into_iter()
            .filter(|m| req.app.is_empty() || m.app == req.app)
            .filter(|m| req.role.is_empty() || m.role == req.role)
            .filter(|m| req.labels.iter().all(|(k, v)| m.labels.get(k) == Some(v)))
            .filter(|m| {
                channel
                    .as_deref()
                    .is_none_or(|c| crate::members::receives(m, c))
            })
            .collect())
    }

    /// Ends every stream with UNAVAILABLE so clients reconnect elsewhere.
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.hub.close_all(Closed::Shutdown);
    }

    pub(crate) fn system_msg(&self, op: &str, data: serde_json::Value) -> Msg {
        Msg {
            op: op.to_string(),
            data: Some(json::to_value(&data)),
            id: self.new_id(),
            sender: self.config.name.clone(),
            ts_ms: crate::now_ms(),
            ..Msg::default()
        }
    }

    pub(crate) fn check_size(&self, size: usize) -> Result<(), NodeError> {
        if size > self.config.max_msg_bytes {
            self.metrics.refuse(Refusal::MsgBytes);
            return Err(NodeError::TooLarge(format!(
                "message is {size} bytes; the limit is {} bytes (--max-msg-bytes)",
                self.config.max_msg_bytes
            )));
        }
        Ok(())
    }

    pub(crate) fn check_headers(&self, headers: &HashMap<String, String>) -> Result<(), NodeError> {
        self.check_map("headers", headers)
    }

    /// Headers of a message or labels of a subscriber: count, total size, names.
    pub(crate) fn check_map(
        &self,
        what: &str,
        map: &HashMap<String, String>,
    ) -> Result<(), NodeError> {
        if map.len() > self.config.max_headers {
            self.metrics.refuse(Refusal::Headers);
            return Err(NodeError::TooLarge(format!(
                "{} {what}; at most {} (--max-headers)",
                map.len(),
                self.config.max_headers
            )));
        }
        let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > self.config.max_header_bytes {
            self.metrics.refuse(Refusal::HeaderBytes);
            return Err(NodeError::TooLarge(format!(
                "{what} total {bytes} bytes; at most {} (--max-header-bytes)",
                self.config.max_header_bytes
            )));
        }
        for (key, value) in map {
            let shown = crate::text::shorten(key, 40);
            crate::text::check_text(&format!("{what} name {shown:?}"), key)
                .and_then(|()| crate::text::check_text(&format!("{what} {shown:?} value"), value))
                .map_err(NodeError::InvalidArgument)?;
        }
        if let Some(key) = map.keys().find(|k| k.is_empty() || k.len() > 128) {
            let shown: String = key.chars().take(40).collect();
            return Err(NodeError::InvalidArgument(format!(
                "{what}: name {shown:?} must be 1 to 128 bytes"
            )));
        }
        Ok(())
    }
}

/// How long a call may wait given what is left of its gRPC deadline: a little
/// less, because at the deadline itself tonic cancels the call (CANCELLED) and the
/// caller should see the node's own answer instead.
pub fn before_grpc_deadline(grpc: Duration) -> Duration {
    let margin = (grpc / 5).min(Duration::from_millis(100));
    grpc.saturating_sub(margin)
}

pub(crate) fn check_op(op: &str) -> Result<(), NodeError> {
    if op.is_empty() {
        return Err(NodeError::InvalidArgument(
            "op is empty: every message needs an op, like \"worker:restart\"".into(),
        ));
    }
    if op.len() > 256 {
        return Err(NodeError::InvalidArgument(format!(
            "op is {} bytes; at most 256",
            op.len()
        )));
    }
    crate::text::check_text("op", op).map_err(NodeError::InvalidArgument)?;
    Ok(())
}

/// A member as JSON, for the `members` built-in op and CLIs.
pub fn member_json(m: &Member) -> serde_json::Value {
    serde_json::json!({
        "id": m.id, "app": m.app, "role": m.role, "tag": m.tag, "labels": m.labels,
        "channels": m.channels, "node": m.node, "connected_ms": m.connected_ms,
    })
}

/// The head (subscribed, gap, replay) followed by live messages, skipping live
/// entries at or before `floor` (already replayed), then the close reason.
fn live_stream(
    head: Vec<Arc<Msg>>,
    subscription: Subscription,
    floor: Option<Cursor>,
) -> impl Stream<Item = Result<Arc<Msg>, Closed>> + Send {
    let head = futures::stream::iter(head.into_iter().map(Ok));
    let live = futures::stream::unfold(
        (subscription, floor, false),
        |(mut sub, mut floor, finished)| async move {
            if finished {
                return None;
            }
            loop {
                match sub.recv().await {
                    Ok(Some(msg)) => {
                        if let Some(f) = floor {
                            match msg.cursor.parse::<Cursor>() {
                                Ok(c) if c.epoch == f.epoch && c.position() <= f.position() => {
                                    continue;
                                }
                                Ok(_) => floor = None,
                                Err(_) => {} // a request: not in the log
                            }
                        }
                        return Some((Ok(msg), (sub, floor, false)));
                    }
                    Ok(None) => return None,
                    Err(reason) => return Some((Err(reason), (sub, floor, true))),
                }
            }
        },
    );
    futures::StreamExt::chain(head, live)
}
