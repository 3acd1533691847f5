//! The upstream bus: the control plane as the sidecar's bus.
//!
//! One Serve stream to a control-plane replica carries the pod's identity (its
//! id, `app:role`, `app:role:tag`) and the union of the local subscriptions; what
//! arrives is handed to the hub in log order, and requests among it are answered in
//! the pod, the answers going back on the same stream ([`replies`]). The pod's
//! broadcasts go up on one Publish stream ([`publish`]). SendMsg to other pods and
//! Members are unary calls on the same connection.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipc_core::bus::{
    Appended, Bus, BusError, IdempotencyKey, PendingAppend, Replay, ReplyError, RequestError,
};
use ipc_core::channel::Pattern;
use ipc_core::coord::{
    InUse, LimitAnswer, LimitSpec, LockAnswer, LockSpec, MemoryCoord, UnlockSpec,
};
use ipc_core::cursor::Cursor;
use ipc_core::fleetops::OP_ID_HEADER;
use ipc_core::hub::Hub;
use ipc_core::metrics::Exposition;
use ipc_core::node::{BUILTIN_OPS, DEADLINE_HEADER};
use ipc_core::notice::{self, Gap, Subscribed};
use ipc_core::responders;
use ipc_core::telemetry::{self, Hop, Kind, TraceContext};
use ipc_core::{Caller, Node, NodeError};
use ipc_proto::backoff::{Attempts, Backoff};
use ipc_proto::json;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, Member, MembersRequest, Msg, ReplyRequest, SendMsgRequest,
    SubscribeRequest,
};
use opentelemetry::KeyValue;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::Instrument as _;

use crate::config::PodIdentity;
use crate::grants::PodGrants;
use crate::hooks::Hooks;
use crate::ring::{Ring, RingLimits, is_at_or_before};

mod publish;
mod replies;

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

/// The control plane's unary calls, for modules that relay to it (leases).
#[derive(Clone)]
pub(crate) struct Upstream(Arc<Inner>);

impl Upstream {
    /// The client and a request carrying the pod's metadata, bounded by `timeout`.
    pub(crate) fn call<T>(
        &self,
        body: T,
        timeout: Duration,
    ) -> Result<(IpcClient<Channel>, tonic::Request<T>), BusError> {
        let link = self
            .0
            .link_or_unavailable()
            .map_err(BusError::Unavailable)?;
        Ok((link.client, self.0.request(body, "", Some(timeout))))
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        self.0.config.call_timeout
    }
}

/// `ipc-app` and `ipc-sender` of the pod's own calls.
struct PodMetadata {
    app: Option<tonic::metadata::AsciiMetadataValue>,
    sender: Option<tonic::metadata::AsciiMetadataValue>,
}

#[derive(Clone)]
struct Link {
    client: IpcClient<Channel>,
    address: String,
}

struct Inner {
    config: UpstreamConfig,
    /// The pod's own channels, exact: hooks and built-in ops serve these.
    pod_channels: HashSet<String>,
    identity_patterns: Vec<Pattern>,
    hooks: Arc<Hooks>,
    hub: OnceLock<Arc<Hub>>,
    node: OnceLock<Weak<Node>>,
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
    /// The pod token's grants, once the control plane told them.
    grants: RwLock<Option<Arc<PodGrants>>>,
    notice_prefix: String,
    next_notice: AtomicU64,
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
                hub: OnceLock::new(),
                node: OnceLock::new(),
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
                grants: RwLock::new(None),
                notice_prefix: format!("{:08x}", rand::random::<u32>()),
                next_notice: AtomicU64::new(1),
                stop: CancellationToken::new(),
                task: Mutex::new(None),
            }),
            leases: crate::leases::Leases::default(),
            publish: publish::PublishRelay::default(),
        }
    }

    /// Starts keeping the upstream subscription, for `node` (built on this bus).
    pub fn start(&self, node: &Arc<Node>) {
        let _ = self.inner.node.set(Arc::downgrade(node));
        let task = tokio::spawn(self.inner.clone().run());
        *self.inner.task.lock() = Some(task);
        self.publish.start(&self.inner);
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
    fn attach(&self, hub: Arc<Hub>) {
        let _ = self.inner.hub.set(hub);
    }

    async fn append(&self, msg: Msg) -> Result<Arc<Msg>, BusError> {
        match self.submit(msg, None).await?.await? {
            Appended::Stored(stored) => Ok(stored),
            Appended::Duplicate { .. } => Err(BusError::Internal(
                "the control plane took a broadcast without a key for a repeat".into(),
            )),
        }
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
            return Ok(Box::pin(std::future::ready(Ok(appended(msg, response)))));
        }
        let answer = self
            .publish
            .submit(&self.inner, request)
            .await
            .inspect_err(|error| hop.fail(|| error.to_string()))?;
        Ok(Box::pin(async move {
            let response = answer
                .await
                .inspect_err(|error| hop.fail(|| error.to_string()))?;
            drop(hop);
            Ok(appended(msg, response))
        }))
    }

    async fn replay(&self, after: &Cursor) -> Result<Replay, BusError> {
        let patterns = self.inner.acked.borrow().clone();
        self.replay_for(after, &patterns).await
    }

    async fn replay_for(&self, after: &Cursor, patterns: &[Pattern]) -> Result<Replay, BusError> {
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

    async fn request(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        // The pod's own channels: a hook or a built-in answers without leaving the pod.
        if self.inner.pod_channels.contains(target)
            && (self.inner.hooks.has(&request.op)
                || (target == self.inner.config.identity.id
                    && BUILTIN_OPS.contains(&request.op.as_str())))
        {
            let Some(reply) = self.inner.answer_pod(&request, deadline).await else {
                return Err(RequestError::DeadlineExceeded(target.to_string()));
            };
            return Ok(reply);
        }
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

/// A stream being read, and what its head means.
struct Active {
    stream: Streaming<Msg>,
    union: Vec<Pattern>,
    /// The local members the stream relays to the control plane's Members.
    relayed: Vec<Member>,
    /// Messages of the head still to come.
    head_left: usize,
    /// The union acknowledged when the stream was opened: head entries of these
    /// patterns are delivered.
    acked_at_open: Vec<Pattern>,
    /// The cursor the stream resumed after.
    resumed_from: Option<Cursor>,
    /// Where the upstream stands after the head.
    position: Option<Cursor>,
    acknowledged: bool,
    /// Local subscribers were already told of a loss on this stream.
    gap_notified: bool,
}

/// What `ipc:subscribed` of an upstream stream said.
struct Opened {
    stream: Streaming<Msg>,
    replayed: usize,
    position: Option<Cursor>,
    /// Where replies go, on a Serve stream.
    replies: Option<tokio::sync::mpsc::Sender<ipc_proto::pb::ServeRequest>>,
}

/// Why an upstream stream could not be opened.
enum OpenError {
    /// The control plane answered with this refusal.
    Refused(Status),
    /// It could not be asked or did not answer as it should (unreachable, timed
    /// out, ended early, a first message other than `ipc:subscribed`).
    Failed(String),
}

impl From<OpenError> for String {
    fn from(error: OpenError) -> String {
        match error {
            OpenError::Refused(status) => describe("subscribe", &status),
            OpenError::Failed(reason) => reason,
        }
    }
}

/// How a session with one replica ended.
struct SessionEnd {
    acknowledged: bool,
    error: Option<String>,
}

impl Inner {
    fn hub(&self) -> Option<&Arc<Hub>> {
        self.hub.get()
    }

    fn node(&self) -> Option<Arc<Node>> {
        self.node.get().and_then(Weak::upgrade)
    }

    fn link_or_unavailable(&self) -> Result<Link, String> {
        self.link.borrow().clone().ok_or_else(|| {
            format!(
                "the control plane is unreachable ({}); retry",
                self.last_error.lock()
            )
        })
    }

    /// Who a local sender is upstream: the fleet knows the pod, not the pid of one
    /// of its processes; a local process that names itself keeps its name.
    fn upstream_sender<'a>(&'a self, sender: &'a str) -> &'a str {
        if sender.is_empty()
            || sender == "anonymous"
            || ipc_core::service::LocalProcess::is_sender(sender)
        {
            self.config.identity.id.as_str()
        } else {
            sender
        }
    }

    /// A unary Broadcast upstream in the name of `sender`.
    async fn broadcast_unary(
        &self,
        request: BroadcastRequest,
        sender: &str,
    ) -> Result<BroadcastResponse, BusError> {
        let link = self.link_or_unavailable().map_err(BusError::Unavailable)?;
        let request = self.request(request, sender, Some(self.config.call_timeout));
        Ok(link
            .client
            .clone()
            .broadcast(request)
            .await
            .map_err(|status| bus_error("broadcast", &status))?
            .into_inner())
    }

    /// What a span of a call to the control plane says about it.
    fn upstream_attributes(&self) -> Vec<KeyValue> {
        let mut attributes = vec![
            KeyValue::new("ipc.node", self.config.node_name.clone()),
            KeyValue::new("rpc.system", "grpc"),
        ];
        if let Some(link) = self.link.borrow().as_ref() {
            attributes.push(KeyValue::new("ipc.upstream", link.address.clone()));
        }
        attributes
    }

    /// A request with the metadata every upstream call carries.
    fn request<T>(&self, body: T, sender: &str, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        let sender = self.upstream_sender(sender);
        let metadata = request.metadata_mut();
        if let Some(app) = &self.pod_metadata.app {
            metadata.insert(ipc_core::service::APP_METADATA, app.clone());
        }
        let sender = match &self.pod_metadata.sender {
            Some(pod) if sender == self.config.identity.id => Some(pod.clone()),
            _ => sender.parse().ok(),
        };
        if let Some(sender) = sender {
            metadata.insert(ipc_core::service::SENDER_METADATA, sender);
        }
        if let Some(token) = self.token.read().clone() {
            metadata.insert("authorization", token);
        }
        request
    }

    /// Every pattern of the local subscribers, as text.
    fn local_patterns(&self) -> HashSet<String> {
        self.hub()
            .map(|hub| {
                hub.subscribers()
                    .into_iter()
                    .flat_map(|m| m.channels)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The local members (subscribers, and what they relay) with the pod's labels:
    /// the upstream subscription relays them, so that the fleet's Members lists
    /// each of the pod's processes. Every local subscriber's id is in the union, so
    /// a local subscriber coming or going re-opens the stream with the new list.
    fn relayed(&self) -> Vec<Member> {
        let grants = self.grants.read().clone();
        let relayer = &self.config.identity.id;
        self.hub()
            .map(|hub| {
                hub.members()
                    .into_iter()
                    .filter(|m| grants.as_ref().is_none_or(|g| g.may_relay(m, relayer)))
                    .map(|m| self.with_pod_labels(m))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A local member with the pod's labels (`pod`, `namespace`, `node`, `--label`s,
    /// `pod-id`) added; its own labels win.
    fn with_pod_labels(&self, mut member: Member) -> Member {
        for (key, value) in &self.config.identity.labels {
            member
                .labels
                .entry(key.clone())
                .or_insert_with(|| value.clone());
        }
        member
            .labels
            .entry("pod-id".into())
            .or_insert_with(|| self.config.identity.id.clone());
        member
    }

    /// The pod's identity channels plus every local subscriber's patterns; exact
    /// names that a wildcard of the union already matches are left out.
    fn union(&self) -> Vec<Pattern> {
        let mut all: BTreeMap<String, Pattern> = self
            .identity_patterns
            .iter()
            .map(|p| (p.as_str().to_string(), p.clone()))
            .collect();
        let grants = self.grants.read().clone();
        if let Some(hub) = self.hub() {
            for member in hub.subscribers() {
                for channel in member.channels {
                    if let Ok(pattern) = Pattern::parse(&channel) {
                        // What the token cannot cover stays local: asking for it
                        // would get the whole pod's subscription refused.
                        if grants.as_ref().is_none_or(|g| g.covers(&pattern)) {
                            all.entry(channel).or_insert(pattern);
                        }
                    }
                }
            }
        }
        let wildcards: Vec<Pattern> = all.values().filter(|p| !p.is_exact()).cloned().collect();
        all.retain(|_, p| {
            !p.is_exact()
                || self.pod_channels.contains(p.as_str())
                || !wildcards.iter().any(|w| w.matches(p.as_str()))
        });
        all.into_values().collect()
    }

    async fn cover(&self, patterns: &[Pattern]) {
        // What the token cannot cover stays local (see `union`): nothing to wait for.
        let grants = self.grants.read().clone();
        let patterns: Vec<Pattern> = patterns
            .iter()
            .filter(|p| grants.as_ref().is_none_or(|g| g.covers(p)))
            .cloned()
            .collect();
        let patterns = patterns.as_slice();
        let mut acked = self.acked.subscribe();
        let mut health = self.health.subscribe();
        let deadline = tokio::time::Instant::now() + self.config.cover_wait;
        loop {
            if covers(&acked.borrow_and_update(), patterns) {
                return;
            }
            // During an outage the subscriber is answered at once; messages of its
            // patterns come from where the pod stood, once reconnected.
            if !*health.borrow_and_update() && self.ever_connected.load(Ordering::Acquire) {
                break;
            }
            tokio::select! {
                changed = acked.changed() => if changed.is_err() { break },
                changed = health.changed() => if changed.is_err() { break },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        tracing::debug!("local subscriber answered before the upstream covers its channels");
        let mut promised = self.promised.lock();
        for pattern in patterns {
            promised.insert(pattern.as_str().to_string(), pattern.clone());
        }
    }

    async fn run(self: Arc<Self>) {
        let mut wanted = self.wanted.subscribe();
        let mut backoff = reconnect_backoff(&self.config);
        let mut index = 0usize;
        loop {
            let address = self.config.addresses[index % self.config.addresses.len()].clone();
            let attempt = async {
                match self.connect(&address).await {
                    Ok(link) => self.session(link, &mut wanted).await,
                    Err(error) => SessionEnd {
                        acknowledged: false,
                        error: Some(error),
                    },
                }
            };
            // Stopping does not wait for a connection attempt or a subscribe to time out.
            let end = tokio::select! {
                () = self.stop.cancelled() => SessionEnd { acknowledged: false, error: None },
                end = attempt => end,
            };
            self.link.send_replace(None);
            self.serve_replies.set(None);
            self.health.send_replace(false);
            if self.stop.is_cancelled() {
                return;
            }
            let Some(error) = end.error else { return };
            let error = format!("{address}: {error}");
            // Once per distinct failure, not at every attempt of a long outage.
            if end.acknowledged || *self.last_error.lock() != error {
                tracing::warn!(%error, "upstream unavailable; reconnecting");
            } else {
                tracing::debug!(%error, "upstream still unavailable");
            }
            *self.last_error.lock() = error;
            if end.acknowledged {
                backoff.reset();
            }
            index = index.wrapping_add(1);
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_pause()) => {}
            }
        }
    }

    async fn connect(&self, address: &str) -> Result<Link, String> {
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| format!("bad address: {e}"))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keepalive)
            .keep_alive_timeout(self.config.keepalive * 3)
            .keep_alive_while_idle(true);
        let endpoint = if address.starts_with("https://") {
            endpoint
                .tls_config(self.config.tls.clone())
                .map_err(|e| format!("TLS: {e}"))?
        } else {
            endpoint
        };
        let channel = tokio::time::timeout(self.config.connect_timeout, endpoint.connect())
            .await
            .map_err(|_| "connection timed out".to_string())?
            .map_err(|e| format!("cannot connect: {}", error_chain(&e)))?;
        self.refresh_token();
        let client = IpcClient::new(channel)
            .max_decoding_message_size(self.config.max_frame)
            .max_encoding_message_size(self.config.max_frame);
        Ok(Link {
            client,
            address: address.to_string(),
        })
    }

    fn refresh_token(&self) {
        let Some(path) = &self.config.token_file else {
            return;
        };
        match std::fs::read_to_string(path) {
            Ok(token) => match format!("Bearer {}", token.trim()).parse() {
                Ok(value) => *self.token.write() = Some(value),
                Err(_) => {
                    tracing::warn!(file = %path.display(), "token file holds characters not allowed in metadata")
                }
            },
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read the token file")
            }
        }
    }

    /// Keeps the subscription on one replica until it breaks or the sidecar stops.
    async fn session(
        self: &Arc<Self>,
        link: Link,
        wanted: &mut watch::Receiver<u64>,
    ) -> SessionEnd {
        wanted.borrow_and_update();
        let mut client = link.client.clone();
        // Learn what the token may do before asking for anything it could be refused.
        let grants = PodGrants::fetch(
            &mut client,
            self.request(PodGrants::request(), "", Some(self.config.call_timeout)),
            self.config.call_timeout,
        )
        .await;
        *self.grants.write() = grants.map(Arc::new);
        let mut active = match self.open_subscription(&mut client, self.union()).await {
            Ok(active) => active,
            Err(error) => {
                return SessionEnd {
                    acknowledged: false,
                    error: Some(error),
                };
            }
        };
        self.link.send_replace(Some(link.clone()));
        self.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(upstream = %link.address, id = %self.config.identity.id, "subscribed upstream");
        let mut acknowledged = false;
        loop {
            if active.head_left == 0 && !active.acknowledged {
                self.acknowledge(&mut active);
                acknowledged = true;
            }
            tokio::select! {
                () = self.stop.cancelled() => return SessionEnd { acknowledged, error: None },
                item = active.stream.message() => match item {
                    Ok(Some(msg)) => self.handle(&mut active, msg),
                    Ok(None) => return SessionEnd {
                        acknowledged,
                        error: Some("the control plane ended the stream".into()),
                    },
                    Err(status) => return SessionEnd {
                        acknowledged,
                        error: Some(describe("subscription", &status)),
                    },
                },
                changed = wanted.changed() => {
                    if changed.is_err() {
                        return SessionEnd { acknowledged, error: None };
                    }
                    let union = self.union();
                    if union == active.union && self.relayed() == active.relayed {
                        continue;
                    }
                    match self.switch(&mut client, active, union).await {
                        Ok(next) => active = next,
                        Err(error) => return SessionEnd { acknowledged, error: Some(error) },
                    }
                }
            }
        }
    }

    /// Opens a stream for `union` after the last handled cursor.
    async fn open_subscription(
        &self,
        client: &mut IpcClient<Channel>,
        union: Vec<Pattern>,
    ) -> Result<Active, String> {
        let resumed_from = self.ring.lock().last;
        let acked_at_open = self.acked.borrow().as_ref().clone();
        let identity = &self.config.identity;
        let relayed = self.relayed();
        // The pod itself takes requests for its role only when a hook can answer
        // them; otherwise it is a watcher of its role, and requests for a role reach
        // it only through a local responder of that role (relayed below), while
        // there is one.
        let request = SubscribeRequest {
            channels: union.iter().map(|p| p.as_str().to_string()).collect(),
            id: identity.id.clone(),
            app: identity.app.clone(),
            role: identity.role.clone().unwrap_or_default(),
            tag: identity.tag.clone().unwrap_or_default(),
            role_watcher: !self.hooks.any(),
            labels: identity.labels.clone(),
            cursor: resumed_from.map(|c| c.to_string()).unwrap_or_default(),
            members: relayed.clone(),
        };
        let opened = self.open(client, request, true).await?;
        self.serve_replies.set(opened.replies);
        Ok(Active {
            stream: opened.stream,
            union,
            relayed,
            head_left: opened.replayed,
            acked_at_open,
            resumed_from,
            position: opened.position,
            acknowledged: false,
            gap_notified: false,
        })
    }

    /// Subscribes and reads `ipc:subscribed`: on a Serve stream (replies go back
    /// on it) when `serve`, else on a Subscribe stream.
    async fn open(
        &self,
        client: &mut IpcClient<Channel>,
        request: SubscribeRequest,
        serve: bool,
    ) -> Result<Opened, OpenError> {
        let mut replies = None;
        let opening = async {
            let opened = if serve {
                let (sender, outgoing) = replies::open_serve(request);
                replies = Some(sender);
                client.serve(self.request(outgoing, "", None)).await
            } else {
                client.subscribe(self.request(request, "", None)).await
            };
            let mut stream = opened.map_err(OpenError::Refused)?.into_inner();
            let hello = stream
                .message()
                .await
                .map_err(OpenError::Refused)?
                .ok_or_else(|| {
                    OpenError::Failed("the stream ended before ipc:subscribed".into())
                })?;
            let Some(subscribed) = Subscribed::from_msg(&hello) else {
                return Err(OpenError::Failed(format!(
                    "expected ipc:subscribed first, got op {:?}",
                    hello.op
                )));
            };
            Ok((
                stream,
                subscribed.replayed,
                subscribed.cursor.and_then(|c| c.parse().ok()),
            ))
        };
        let (stream, replayed, position) = tokio::time::timeout(self.config.call_timeout, opening)
            .await
            .map_err(|_| OpenError::Failed("subscribe timed out".into()))??;
        Ok(Opened {
            stream,
            replayed,
            position,
            replies,
        })
    }

    /// Replaces the stream with one for `union`, resuming after the last handled
    /// entry. Meanwhile the old stream is read for requests only: its entries after
    /// that cursor come again on the new stream.
    async fn switch(
        self: &Arc<Self>,
        client: &mut IpcClient<Channel>,
        old: Active,
        union: Vec<Pattern>,
    ) -> Result<Active, String> {
        tracing::debug!(channels = union.len(), "updating the upstream subscription");
        let mut old = Some(old.stream);
        let mut new_client = client.clone();
        let opening = self.open_subscription(&mut new_client, union);
        tokio::pin!(opening);
        let active = loop {
            tokio::select! {
                opened = &mut opening => break opened?,
                item = next_message(&mut old) => match item {
                    Ok(Some(msg)) if !msg.reply_to.is_empty() => self.spawn_request(msg),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => old = None,
                },
            }
        };
        // The control plane ends the old stream (replaced by the new subscription of
        // the same id) once it has sent what it held: requests among it are served.
        if let Some(mut stream) = old {
            let inner = self.clone();
            tokio::spawn(async move {
                let drain = async {
                    while let Ok(Some(msg)) = stream.message().await {
                        if !msg.reply_to.is_empty() {
                            inner.spawn_request(msg);
                        }
                    }
                };
                let _ = tokio::time::timeout(inner.config.call_timeout, drain).await;
            });
        }
        Ok(active)
    }

    /// The stream's head has been handled: its union is now what the pod receives.
    fn acknowledge(&self, active: &mut Active) {
        let continued: HashSet<String> = {
            let promised = self.promised.lock();
            active
                .acked_at_open
                .iter()
                .map(|p| p.as_str().to_string())
                .chain(promised.keys().cloned())
                .collect()
        };
        {
            let mut ring = self.ring.lock();
            if let Some(position) = active.position {
                ring.advance(position);
            }
            let now = ring.last;
            ring.cover(&active.union, &continued, active.resumed_from, now);
        }
        let local = self.local_patterns();
        let settled = {
            let mut promised = self.promised.lock();
            let mut settled = false;
            // Kept: what this stream does not cover yet and a local subscriber still
            // wants (the next stream will); dropped: what nobody wants any more.
            promised.retain(|key, p| {
                if !local.contains(key) {
                    return false;
                }
                let covered = covers(&active.union, std::slice::from_ref(p));
                settled |= covered;
                !covered
            });
            settled
        };
        if settled && active.resumed_from.is_none() && !active.gap_notified {
            // Subscribers were answered while the pod had no position in the log to
            // resume from: what was published before now may be missing for them.
            self.notify_gap(
                None,
                "the sidecar was not connected to the control plane when you subscribed; messages published before it connected are not delivered",
            );
        }
        self.acked.send_replace(Arc::new(active.union.clone()));
        self.ever_connected.store(true, Ordering::Release);
        self.health.send_replace(true);
        active.acknowledged = true;
    }

    fn handle(self: &Arc<Self>, active: &mut Active, msg: Msg) {
        if !msg.reply_to.is_empty() {
            self.spawn_request(msg);
            return;
        }
        let in_head = active.head_left > 0;
        if in_head {
            active.head_left -= 1;
        }
        if msg.cursor.is_empty() {
            match msg.op.as_str() {
                notice::GAP => {
                    let reason = Gap::from_msg(&msg)
                        .map(|gap| gap.reason)
                        .filter(|reason| !reason.is_empty())
                        .unwrap_or_else(|| "the control plane lost messages".into());
                    let last = {
                        let mut ring = self.ring.lock();
                        let last = ring.last;
                        ring.reset();
                        last
                    };
                    // Nothing carries over from the lost log: coverage starts anew.
                    active.resumed_from = None;
                    active.gap_notified = true;
                    self.upstream_gaps.fetch_add(1, Ordering::Relaxed);
                    self.notify_gap(last, &format!("upstream: {reason}"));
                }
                notice::SUBSCRIBED => {}
                ipc_core::service::REPLY_ERROR_OP => self.reply_not_delivered(&msg),
                _ => {
                    if let Some(hub) = self.hub() {
                        hub.dispatch(&Arc::new(msg));
                    }
                }
            }
            return;
        }
        let Ok(cursor) = msg.cursor.parse::<Cursor>() else {
            tracing::warn!(cursor = %msg.cursor, "entry with a malformed cursor from upstream; delivered as is");
            if let Some(hub) = self.hub() {
                hub.dispatch(&Arc::new(msg));
            }
            return;
        };
        if in_head {
            let wanted = active.acked_at_open.iter().any(|p| p.matches(&msg.channel))
                || self
                    .promised
                    .lock()
                    .values()
                    .any(|p| p.matches(&msg.channel));
            if !wanted {
                return;
            }
        }
        let msg = Arc::new(msg);
        {
            let mut ring = self.ring.lock();
            if ring
                .last
                .is_some_and(|last| is_at_or_before(&cursor, &last))
            {
                return;
            }
            ring.push(cursor, msg.clone());
        }
        // The hook is started (or queued, or skipped) before local subscribers can see
        // the message: whoever saw it can count on the hook's decision being made.
        if self.pod_channels.contains(&msg.channel) && self.hooks.has(&msg.op) {
            self.hooks.on_broadcast(msg.clone());
        }
        if let Some(hub) = self.hub() {
            hub.dispatch(&msg);
        }
    }

    fn notify_gap(&self, last: Option<Cursor>, reason: &str) {
        let Some(hub) = self.hub() else { return };
        let id = format!(
            "{}-n{}",
            self.notice_prefix,
            self.next_notice.fetch_add(1, Ordering::Relaxed)
        );
        let notice = Gap::new(last, reason).to_msg(id, &self.config.node_name);
        let reached = hub.notify_all(&Arc::new(notice));
        hub.metrics()
            .gaps
            .fetch_add(reached as u64, Ordering::Relaxed);
        tracing::warn!(reached, reason, "ipc:gap sent to local subscribers");
    }

    fn spawn_request(self: &Arc<Self>, mut msg: Msg) {
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

    /// Answers a request that came from upstream: a hook or a built-in of the pod, or
    /// a local subscriber. `None` when the deadline passed (the caller already knows).
    async fn answer(&self, msg: Msg, deadline: Instant) -> Option<Msg> {
        let channel = msg.channel.clone();
        let pod = self.config.identity.id.as_str();
        // A request for one member (Gather, Rollout) goes to that process; the pod
        // itself is a member too (its hooks and built-ins).
        let member = msg
            .headers
            .get(responders::MEMBER_HEADER)
            .filter(|m| m.as_str() != pod)
            .cloned();
        if member.is_none() && self.pod_channels.contains(&channel) && self.hooks.has(&msg.op) {
            return self.answer_pod(&msg, deadline).await;
        }
        let hub = self.hub()?;
        let local = member.as_deref().unwrap_or(&channel);
        if hub.has_responder(local) {
            let node = self.node()?;
            let mut request = msg.clone();
            request.reply_to.clear();
            request.headers.remove(responders::MEMBER_HEADER);
            match node.request_local(local, request, deadline).await {
                Ok(reply) => return Some(reply),
                Err(RequestError::DeadlineExceeded(_)) => return None,
                Err(RequestError::NoResponders(_)) => {}
                Err(error) => return Some(error_reply(&msg, error.to_string())),
            }
        }
        if member.is_none() && channel == pod && BUILTIN_OPS.contains(&msg.op.as_str()) {
            return self.answer_pod(&msg, deadline).await;
        }
        // Not answerable here after all (the local responder left, or no hook for
        // this op): the control plane asks another responder within the deadline.
        let mut reply = error_reply(
            &msg,
            format!("no responders for {local:?} in pod {pod} (op {:?})", msg.op),
        );
        reply
            .headers
            .insert(responders::CANNOT_ANSWER_HEADER.into(), pod.to_string());
        Some(reply)
    }

    /// A request to the pod itself: its hook, else a built-in op of the sidecar.
    async fn answer_pod(&self, msg: &Msg, deadline: Instant) -> Option<Msg> {
        if self.hooks.has(&msg.op) {
            let outcome = self.hooks.on_request(msg, deadline.into()).await;
            return Some(Msg {
                op: msg.op.clone(),
                data: Some(json::to_value(&outcome.data())),
                error: outcome.error.unwrap_or_default(),
                sender: self.config.identity.id.clone(),
                ts_ms: ipc_core::now_ms(),
                ..Msg::default()
            });
        }
        let node = self.node()?;
        let left = deadline.saturating_duration_since(Instant::now());
        let request = SendMsgRequest {
            target: String::new(),
            op: msg.op.clone(),
            data: msg.data.clone(),
            headers: msg.headers.clone(),
            timeout_ms: left.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
        };
        let caller = Caller {
            sender: msg.sender.clone(),
            ..Caller::default()
        };
        match node.send_msg(&caller, request, Some(left)).await {
            Ok(reply) => Some(reply),
            Err(NodeError::DeadlineExceeded(_)) => None,
            Err(error) => Some(error_reply(msg, error.to_string())),
        }
    }

    /// SendMsg to the control plane with what is left of the deadline.
    async fn request_upstream(
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
        // The gRPC deadline a little later than timeout_ms, so that the control
        // plane's DEADLINE_EXCEEDED (with its reason) arrives before tonic cancels.
        let grpc_timeout = left + (left / 10).min(Duration::from_millis(50));
        let mut call = self.request(body, &request.sender, Some(grpc_timeout));
        hop.stamp_metadata(call.metadata_mut());
        match link.client.clone().send_msg(call).await {
            Ok(response) => response.into_inner().reply.ok_or_else(|| {
                RequestError::Unavailable("the control plane sent an empty reply".into())
            }),
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

    /// Reads what the control plane still has after `after` for `patterns`, on a
    /// short-lived stream of its own.
    async fn fetch(
        self: &Arc<Self>,
        after: &Cursor,
        patterns: &[Pattern],
    ) -> Result<Replay, OpenError> {
        let link = self.link_or_unavailable().map_err(OpenError::Failed)?;
        let identity = &self.config.identity;
        let request = SubscribeRequest {
            channels: patterns.iter().map(|p| p.as_str().to_string()).collect(),
            id: format!("{}.replay-{:08x}", identity.id, rand::random::<u32>()),
            app: identity.app.clone(),
            labels: HashMap::from([("ipc-replay-for".to_string(), identity.id.clone())]),
            cursor: after.to_string(),
            ..SubscribeRequest::default()
        };
        let mut client = link.client.clone();
        let Opened {
            mut stream,
            replayed,
            ..
        } = self.open(&mut client, request, false).await?;
        let reading = async {
            let mut replay = Replay::default();
            let mut left = replayed;
            while left > 0 {
                let msg = stream
                    .message()
                    .await
                    .map_err(|status| describe("replay", &status))?
                    .ok_or("the replay stream ended early")?;
                if !msg.reply_to.is_empty() {
                    // Routed here because the patterns include role channels.
                    self.spawn_request(msg);
                    continue;
                }
                left -= 1;
                if let Some(gap) = Gap::from_msg(&msg) {
                    let reason = Some(gap.reason).filter(|r| !r.is_empty());
                    replay.gap = Some(format!(
                        "upstream: {}",
                        reason.as_deref().unwrap_or("messages were lost")
                    ));
                } else {
                    replay.messages.push(Arc::new(msg));
                }
            }
            Ok::<_, String>(replay)
        };
        tokio::time::timeout(self.config.call_timeout, reading)
            .await
            .map_err(|_| "reading the replay timed out".to_string())
            .and_then(|read| read)
            .map_err(OpenError::Failed)
    }
}

/// Whether every pattern is included in the acknowledged union.
fn covers(acked: &[Pattern], patterns: &[Pattern]) -> bool {
    patterns.iter().all(|q| {
        acked
            .iter()
            .any(|p| p == q || (q.is_exact() && p.matches(q.as_str())))
    })
}

async fn next_message(stream: &mut Option<Streaming<Msg>>) -> Result<Option<Msg>, Status> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
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

fn describe(call: &str, status: &Status) -> String {
    format!("{call}: {:?}: {}", status.code(), status.message())
}

/// A failure of an upstream call as the local caller should see it: unavailable
/// when the control plane cannot be reached, else its refusal.
pub(crate) fn bus_error(call: &str, status: &Status) -> BusError {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Aborted => {
            BusError::Unavailable(format!("control plane {}", describe(call, status)))
        }
        // The pod's own credentials were refused: the sidecar's problem, not the caller's.
        Code::Unauthenticated => BusError::Unavailable(format!(
            "the control plane did not accept the sidecar's token (--token-file): {}",
            describe(call, status)
        )),
        code => {
            let refusal = format!("control plane refused {call}: {}", status.message());
            BusError::Refused(match code {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                    NodeError::InvalidArgument(refusal)
                }
                Code::PermissionDenied => NodeError::PermissionDenied(refusal),
                Code::ResourceExhausted => NodeError::TooLarge(refusal),
                Code::NotFound => NodeError::NotFound(refusal),
                _ => NodeError::Internal(refusal),
            })
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The pauses between attempts to reach the control plane: 100 ms doubling up to
/// `reconnect_max` (never below 100 ms), equal jitter.
fn reconnect_backoff(config: &UpstreamConfig) -> Attempts {
    let first = Duration::from_millis(100);
    Backoff::new(first, config.reconnect_max.max(first)).attempts()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_counts_wildcards_for_exact_names() {
        let p = |t: &str| Pattern::parse(t).unwrap();
        assert!(covers(&[p("shop:>")], &[p("shop:worker")]));
        assert!(!covers(&[p("shop:>")], &[p("shop:*")]));
        assert!(covers(&[p("a"), p("b")], &[p("b")]));
        assert!(!covers(&[p("a")], &[p("a"), p("c")]));
    }

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
