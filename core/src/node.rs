//! The node: the five operations of `ipc.v1.Ipc` over a hub and a bus, with the
//! input rules of docs/design.md. Transport-free: the gRPC service maps its errors to
//! status codes.
//!
//! # Layout
//! - [`config`]: [`NodeConfig`], its defaults and the node's name; `args` (with
//!   the `clap` feature): the node's flags both binaries take, defaulting to it.
//! - [`rules`]: the input rules every operation checks before acting — sizes,
//!   headers and labels, ops, timeouts, grants, the rate limit, subscriptions and
//!   the members a sidecar relays.
//! - [`answer`]: requests answered in this node — hooks of its own member, local
//!   responders, built-ins — in one order, for local callers and other nodes alike.
//! - [`request`]: SendMsg (answered here, through the bus, or by the node's
//!   built-in ops) and Reply.
//! - [`subscribe`]: Subscribe: `ipc:subscribed`, the replay from a cursor, then live
//!   messages without a gap or a duplicate.
//! - here: the [`Node`] itself, Broadcast (its submission is in
//!   [`crate::publish`]), Members and shutdown.

pub mod answer;
#[cfg(feature = "clap")]
pub mod args;
mod config;
mod request;
mod rules;
mod subscribe;

pub use answer::{Hooks, OwnMember};
pub use config::{NodeConfig, RateLimit, default_node_name, hostname};
pub use rules::before_grpc_deadline;
pub(crate) use rules::check_op;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::Stream;
use ipc_proto::json;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse, Member, MembersRequest, Msg};

use crate::auth::Caller;
use crate::bus::Bus;
use crate::channel;
use crate::error::{Closed, NodeError};
// Stamped by the hub on the requests it hands out; read here and by relays.
pub use crate::hub::DEADLINE_HEADER;
use crate::hub::Hub;
use crate::limits::RateLimiter;
use crate::local::Local;
use crate::metrics::Metrics;

/// An item of a subscriber's stream: a message, or the reason the node ended it.
pub type SubscribeStream = Pin<Box<dyn Stream<Item = Result<Arc<Msg>, Closed>> + Send>>;
/// [`SubscribeStream`] as a stream that encodes what it sends takes it
/// ([`Node::subscribe_outbound`]).
pub type OutboundStream =
    Pin<Box<dyn Stream<Item = Result<crate::outbound::Outbound, Closed>> + Send>>;

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
    /// What the node answers as a member itself (a sidecar's pod), if anything.
    own: Option<OwnMember>,
}

impl Node {
    pub fn new(config: NodeConfig, bus: Arc<dyn Bus>) -> Arc<Self> {
        Self::build(config, bus, None)
    }

    /// A node that is also a member itself, answering built-in ops sent to its id
    /// and running its hooks for requests to its channels (a sidecar's pod).
    pub fn with_own_member(config: NodeConfig, bus: Arc<dyn Bus>, own: OwnMember) -> Arc<Self> {
        Self::build(config, bus, Some(own))
    }

    fn build(config: NodeConfig, bus: Arc<dyn Bus>, own: Option<OwnMember>) -> Arc<Self> {
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
        let presence = Arc::downgrade(&bus);
        hub.on_change(move || {
            if let Some(bus) = presence.upgrade() {
                bus.subscribers_changed();
            }
        });
        Arc::new_cyclic(|node| {
            bus.attach(Local::new(hub.clone(), node.clone()));
            Self {
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
                own,
            }
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
            .map(|name| self.hub.close_owner(name, Closed::Revoked))
            .sum()
    }

    /// A new message id, unique across nodes (random node prefix + counter).
    pub fn new_id(&self) -> String {
        // Written directly: every message and request gets an id.
        let mut counter = itoa::Buffer::new();
        let counter = counter.format(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut id = String::with_capacity(self.id_prefix.len() + 1 + counter.len());
        id.push_str(&self.id_prefix);
        id.push('-');
        id.push_str(counter);
        id
    }

    /// Stores a message in the log; every matching subscriber fleet-wide gets it.
    /// With a `key` seen within the dedup window, stores nothing and answers the
    /// first message's id and cursor with `duplicate` set.
    pub async fn broadcast(
        &self,
        caller: &Caller,
        req: BroadcastRequest,
    ) -> Result<BroadcastResponse, NodeError> {
        let appended = self.submit_broadcast(caller, req).await?.await?;
        Ok(crate::publish::response(appended))
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
}

/// A member as JSON, for the `members` built-in op and CLIs.
pub fn member_json(m: &Member) -> serde_json::Value {
    serde_json::json!({
        "id": m.id, "app": m.app, "role": m.role, "tag": m.tag, "labels": m.labels,
        "channels": m.channels, "node": m.node, "connected_ms": m.connected_ms,
    })
}
