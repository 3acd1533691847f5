//! The upstream bus: the control plane as the sidecar's bus.
//!
//! One Serve stream to a control-plane replica carries the pod's identity (its
//! id, `app:role`, `app:role:tag`) and the union of the local subscriptions; what
//! arrives is handed to the node ([`Local`]) in log order, and requests among it are
//! answered in the pod, the answers going back on the same stream ([`replies`]). The pod's
//! broadcasts go up on one Publish stream ([`publish`]), its requests to other pods
//! on one SendMsgs stream ([`send_msgs`]). Members and the rest are unary calls on
//! the same connection.
//!
//! Nothing is lost across a change of the union or a reconnect: the sidecar keeps the
//! cursor of the last entry it handled and opens the new stream after it. The new
//! stream's head (the entries it replays, counted by `replayed` in `ipc:subscribed`)
//! is delivered only for patterns the pod was already subscribed to, or had promised
//! to a local subscriber while the upstream could not be asked; entries of a pattern
//! that is new are delivered from the head's end (the `cursor` of `ipc:subscribed`),
//! which is before the local subscriber is told `ipc:subscribed` ([`Bus::cover`]).
//! A local subscriber therefore never sees entries from before it subscribed, and
//! sees every entry after. While a new stream opens, the old one is still read for
//! requests; the control plane hands the old stream's pending requests to the new
//! subscription of the same id.
//!
//! When the upstream log was lost (`ipc:gap` from upstream), every local subscriber
//! gets an `ipc:gap` notice.
//!
//! # Layout
//! - here: [`UpstreamConfig`], [`UpstreamBus`] and its [`Bus`] methods, the state
//!   the parts below share.
//! - [`session`]: keeping the subscription — reconnecting with backoff, opening
//!   and switching streams, handling what arrives in log order, `ipc:gap`, and
//!   fetching what the ring lacks for a local resume.
//! - [`coverage`]: the union of the local subscriptions the pod asks for, the local
//!   members it relays, and when a local subscriber's patterns are covered.
//! - [`requests`]: requests from upstream handed to the node (which answers them
//!   in its one order: hooks, local responders, built-ins) and their replies sent
//!   back; the pod's requests the node cannot answer sent upstream
//!   ([`send_msgs`]: on one stream).
//! - [`calls`]: the connection and the metadata, token and error mapping of every
//!   call to the control plane.
//! - [`replies`]: the pod's answers on the Serve stream; [`publish`]: the pod's
//!   broadcasts on one Publish stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipc_core::NodeError;
use ipc_core::bus::{
    Appended, Bus, BusError, IdempotencyKey, PendingAppend, Replay, ReplyError, RequestError,
};
use ipc_core::channel::Pattern;
use ipc_core::coord::{
    InUse, LimitAnswer, LimitSpec, LockAnswer, LockSpec, MemoryCoord, UnlockSpec,
};
use ipc_core::cursor::Cursor;
use ipc_core::local::Local;
use ipc_core::metrics::Exposition;
use ipc_core::node::OwnMember;
use ipc_core::telemetry::{Hop, Kind};
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, Member, MembersRequest, Msg, ReplyRequest,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::config::PodIdentity;
use crate::grants::PodGrants;
use crate::hooks::{Hooks, PodHooks};
use crate::ring::{Ring, RingLimits};

mod calls;
mod coverage;
mod publish;
mod replies;
mod requests;
mod send_msgs;
mod session;

use calls::{Link, PodMetadata, describe};
pub(crate) use calls::{Upstream, bus_error};
use session::OpenError;

/// How the sidecar reaches and uses the control plane.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http(s)://host:port`, tried in turn.
    pub addresses: Vec<String>,
    pub identity: PodIdentity,
    /// This sidecar's node name, on the notices it makes.
    pub node_name: String,
    pub connect_timeout: Duration,
    /// Bound of a unary call (Broadcast, Reply, Members) and of opening a stream.
    pub call_timeout: Duration,
    /// HTTP/2 PING period on the upstream connection; three periods unanswered
    /// end it, so a hung replica is left within seconds.
    pub keepalive: Duration,
    pub reconnect_max: Duration,
    /// How long a local Subscribe waits for the upstream to cover its channels.
    pub cover_wait: Duration,
    pub buffer: RingLimits,
    pub token_file: Option<std::path::PathBuf>,
    /// TLS for `https://` addresses.
    pub tls: tonic::transport::ClientTlsConfig,
    pub max_frame: usize,
    /// Wait for a request from upstream that carries no `ipc-deadline-ms`.
    pub default_request_wait: Duration,
}

/// The control plane as a [`Bus`].
pub struct UpstreamBus {
    inner: Arc<Inner>,
    leases: crate::leases::Leases,
    publish: publish::PublishRelay,
}

struct Inner {
    config: UpstreamConfig,
    /// The pod's own channels, exact: its hooks run for broadcasts on these.
    pod_channels: HashSet<String>,
    identity_patterns: Vec<Pattern>,
    hooks: Arc<Hooks>,
    /// The node this bus delivers to.
    local: OnceLock<Local>,
    /// The connection unary calls use; `None` while disconnected.
    link: watch::Sender<Option<Link>>,
    /// Whether the upstream subscription is established.
    health: watch::Sender<bool>,
    /// Bumped whenever the local subscribers change.
    wanted: watch::Sender<u64>,
    /// The union the upstream subscription has acknowledged, head handled.
    acked: watch::Sender<Arc<Vec<Pattern>>>,
    /// Patterns whose local subscribers were told `ipc:subscribed` while the upstream
    /// could not cover them: delivered from where the pod stood, once it can.
    promised: Mutex<HashMap<String, Pattern>>,
    ring: Mutex<Ring>,
    ever_connected: AtomicBool,
    /// Sessions (subscriptions on a new connection) established upstream, for
    /// the reconnects in `/metrics`.
    sessions: AtomicU64,
    /// `ipc:gap` notices received from upstream (`/metrics`).
    upstream_gaps: AtomicU64,
    last_error: Mutex<String>,
    token: RwLock<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>>,
    /// The pod's app and id as metadata, made once rather than on every call.
    pod_metadata: PodMetadata,
    /// Where the pod's replies go: the current subscription's Serve stream.
    serve_replies: replies::ServeReplies,
    /// Where the pod's requests go: one SendMsgs stream per connection.
    request_streams: send_msgs::RequestStreams,
    /// The pod token's grants, once the control plane told them.
    grants: RwLock<Option<Arc<PodGrants>>>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl UpstreamBus {
    pub fn new(config: UpstreamConfig, hooks: Arc<Hooks>) -> Self {
        let pod_channels: HashSet<String> = config.identity.channels().into_iter().collect();
        let identity_patterns = config
            .identity
            .channels()
            .iter()
            .filter_map(|c| Pattern::parse(c).ok())
            .collect();
        let ring = Ring::new(config.buffer);
        let pod_metadata = PodMetadata {
            app: config.identity.app.parse().ok(),
            sender: config.identity.id.parse().ok(),
        };
        Self {
            inner: Arc::new(Inner {
                config,
                pod_channels,
                identity_patterns,
                hooks,
                local: OnceLock::new(),
                link: watch::Sender::new(None),
                health: watch::Sender::new(false),
                wanted: watch::Sender::new(0),
                acked: watch::Sender::new(Arc::new(Vec::new())),
                promised: Mutex::new(HashMap::new()),
                ring: Mutex::new(ring),
                ever_connected: AtomicBool::new(false),
                sessions: AtomicU64::new(0),
                upstream_gaps: AtomicU64::new(0),
                last_error: Mutex::new("not connected yet".into()),
                token: RwLock::new(None),
                pod_metadata,
                serve_replies: replies::ServeReplies::default(),
                request_streams: send_msgs::RequestStreams::default(),
                grants: RwLock::new(None),
                stop: CancellationToken::new(),
                task: Mutex::new(None),
            }),
            leases: crate::leases::Leases::default(),
            publish: publish::PublishRelay::default(),
        }
    }

    /// The pod as the node's own member, for `Node::with_own_member`: its id and
    /// channels, where the node runs the pod's hooks and answers built-in ops.
    pub fn pod(&self) -> OwnMember {
        let identity = &self.inner.config.identity;
        OwnMember {
            id: identity.id.clone(),
            channels: self.inner.pod_channels.clone(),
            hooks: Arc::new(PodHooks {
                hooks: self.inner.hooks.clone(),
                pod: identity.id.clone(),
            }),
        }
    }

    /// The address of the replica in use, if connected.
    pub fn connected_to(&self) -> Option<String> {
        self.inner.link.borrow().as_ref().map(|l| l.address.clone())
    }

    /// Why the last connection or subscription failed.
    pub fn last_error(&self) -> String {
        self.inner.last_error.lock().clone()
    }
}

#[async_trait]
impl Bus for UpstreamBus {
    /// Starts keeping the upstream subscription and the pod's Publish stream.
    fn attach(&self, local: Local) {
        if self.inner.local.set(local).is_err() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("upstream bus attached outside a Tokio runtime: it will not run");
            return;
        };
        let task = runtime.spawn(self.inner.clone().run());
        *self.inner.task.lock() = Some(task);
        self.publish.start(&self.inner);
    }

    /// Relays the broadcast on the pod's Publish stream, with its key (the
    /// control plane de-duplicates); a broadcast whose sender is not the pod goes
    /// as a unary call that names it.
    async fn submit(
        &self,
        msg: Msg,
        key: Option<IdempotencyKey>,
    ) -> Result<PendingAppend, BusError> {
        let mut hop = Hop::child("upstream Broadcast", Kind::Client, &msg.headers, || {
            self.inner.upstream_attributes()
        });
        let mut request = BroadcastRequest {
            channel: msg.channel.clone(),
            op: msg.op.clone(),
            data: msg.data.clone(),
            headers: msg.headers.clone(),
            key: key.map(|k| k.key).unwrap_or_default(),
        };
        // On the stream the message's own header is its context upstream.
        hop.stamp(&mut request.headers);
        if self.inner.upstream_sender(&msg.sender) != self.inner.config.identity.id {
            let response = self
                .inner
                .broadcast_unary(request, &msg.sender)
                .await
                .inspect_err(|error| hop.fail(|| error.to_string()))?;
            return Ok(PendingAppend::done(Ok(appended(msg, response))));
        }
        let answer = self
            .publish
            .submit(&self.inner, request)
            .await
            .inspect_err(|error| hop.fail(|| error.to_string()))?;
        Ok(PendingAppend::waiting(async move {
            let response = answer
                .await
                .inspect_err(|error| hop.fail(|| error.to_string()))?;
            drop(hop);
            Ok(appended(msg, response))
        }))
    }

    async fn replay(&self, after: &Cursor, patterns: &[Pattern]) -> Result<Replay, BusError> {
        if let Some(messages) = self.inner.ring.lock().replay(after, patterns) {
            return Ok(Replay {
                messages,
                gap: None,
            });
        }
        // What the buffer lacks may well still be in the control plane's log: a
        // failure to ask it now is no loss, so the resume is refused (retryable)
        // rather than answered with `ipc:gap` and newer messages. A gap comes only
        // from the control plane itself, when the log no longer has the entries.
        self.inner
            .fetch(after, patterns)
            .await
            .map_err(|failure| match failure {
                // The control plane refuses the cursor itself (ahead of its log): the
                // local caller gets the answer its port gives.
                OpenError::Refused(status) if status.code() == Code::InvalidArgument => {
                    BusError::BadCursor(format!("control plane: {}", status.message()))
                }
                failure => BusError::Unavailable(format!(
                    "the sidecar cannot fetch what was published after cursor {after} yet \
                     ({}); nothing was skipped: subscribe again with the same cursor",
                    String::from(failure)
                )),
            })
    }

    async fn head(&self) -> Result<Option<Cursor>, BusError> {
        Ok(self.inner.ring.lock().last)
    }

    async fn cover(&self, patterns: &[Pattern]) {
        self.inner.cover(patterns).await;
    }

    /// What the pod cannot answer itself (the node tried its hooks, local
    /// responders and built-ins first) goes to the control plane.
    async fn request(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        self.inner.request_upstream(target, request, deadline).await
    }

    async fn forward_reply(&self, reply: Msg) -> Result<(), ReplyError> {
        let link = self
            .inner
            .link_or_unavailable()
            .map_err(ReplyError::Unavailable)?;
        let hop = Hop::child("upstream Reply", Kind::Client, &reply.headers, || {
            self.inner.upstream_attributes()
        });
        let request = ReplyRequest {
            reply_to: reply.reply_to.clone(),
            op: reply.op,
            data: reply.data,
            headers: reply.headers,
            error: reply.error,
        };
        let mut request =
            self.inner
                .request(request, &reply.sender, Some(self.inner.config.call_timeout));
        hop.stamp_metadata(request.metadata_mut());
        match link.client.clone().reply(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::NotFound => {
                Err(ReplyError::NotFound(reply.reply_to))
            }
            Err(status) => Err(ReplyError::Unavailable(describe("reply", &status))),
        }
    }

    async fn members(&self, local: Vec<Member>) -> Result<Vec<Member>, BusError> {
        let link = self
            .inner
            .link_or_unavailable()
            .map_err(BusError::Unavailable)?;
        let request = self.inner.request(
            MembersRequest::default(),
            "",
            Some(self.inner.config.call_timeout),
        );
        let upstream = link
            .client
            .clone()
            .members(request)
            .await
            .map_err(|status| bus_error("members", &status))?
            .into_inner()
            .members;
        // The control plane lists this pod's local subscribers too (relayed by the
        // upstream subscription): the local list is the fresher one.
        let node = self.inner.config.node_name.as_str();
        let mut all: BTreeMap<(String, String), Member> = upstream
            .into_iter()
            .filter(|m| m.node != node)
            .map(|m| ((m.id.clone(), m.node.clone()), m))
            .collect();
        for member in local {
            let member = self.inner.with_pod_labels(member);
            all.insert((member.id.clone(), member.node.clone()), member);
        }
        Ok(all.into_values().collect())
    }

    fn check_local_subscription(&self, patterns: &[Pattern], id: &str) -> Result<(), NodeError> {
        match self.inner.grants.read().as_ref() {
            Some(grants) => grants.check(patterns, id),
            None => Ok(()),
        }
    }

    fn subscribers_changed(&self) {
        self.inner.wanted.send_modify(|generation| *generation += 1);
    }

    fn write_metrics(&self, out: &mut Exposition) {
        let inner = &self.inner;
        out.gauge(
            "ipc_sidecar_upstream_connected",
            "1 while this sidecar's subscription to the control plane is established (the pod receives the fleet's messages); else 0.",
            u8::from(*inner.health.borrow()),
        );
        out.counter(
            "ipc_sidecar_upstream_reconnects_total",
            "Times this sidecar established its upstream subscription again after losing it (resumed from its last cursor).",
            inner.sessions.load(Ordering::Relaxed).saturating_sub(1),
        );
        out.counter(
            "ipc_sidecar_upstream_gaps_total",
            "ipc:gap notices this sidecar received from the control plane on resuming: the fleet's log no longer had what the pod missed.",
            inner.upstream_gaps.load(Ordering::Relaxed),
        );
        inner.hooks.write_metrics(out);
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.inner.health.subscribe()
    }

    async fn lock(&self, lock: LockSpec, _in_node: &MemoryCoord) -> Result<LockAnswer, BusError> {
        let upstream = Upstream(self.inner.clone());
        self.leases.lock(&upstream, lock).await
    }

    async fn unlock(&self, unlock: UnlockSpec, _in_node: &MemoryCoord) -> Result<bool, BusError> {
        let upstream = Upstream(self.inner.clone());
        self.leases.unlock(&upstream, unlock).await
    }

    async fn limit(
        &self,
        name: &str,
        limit: LimitSpec,
        _in_node: &MemoryCoord,
    ) -> Result<LimitAnswer, BusError> {
        let upstream = Upstream(self.inner.clone());
        self.leases.limit(&upstream, name, limit).await
    }

    async fn in_use(&self, _in_node: &MemoryCoord, _max: usize) -> Result<InUse, BusError> {
        Err(BusError::Unavailable(
            "a sidecar keeps no locks or buckets (it relays them to its control plane): \
             list them on the control plane's admin console"
                .into(),
        ))
    }

    async fn shutdown(&self) {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// What became of a broadcast the control plane answered.
fn appended(mut msg: Msg, response: BroadcastResponse) -> Appended {
    if response.duplicate {
        Appended::Duplicate {
            id: response.id,
            channel: response.channel,
            cursor: response.cursor,
        }
    } else {
        msg.id = response.id;
        msg.channel = response.channel;
        msg.cursor = response.cursor;
        Appended::Stored(Arc::new(msg))
    }
}

impl Inner {
    fn local(&self) -> Option<&Local> {
        self.local.get()
    }
}
