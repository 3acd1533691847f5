//! The hub: a node's live subscribers, fan-out of log entries to them, and requests
//! waiting for replies.
//!
//! Fan-out never blocks: each subscriber has a bounded queue, and one that is full
//! is cut off (it resumes from its cursor) rather than slowing the others or growing
//! memory. Exact channel names are indexed by a hash map, wildcard patterns by a
//! trie of their segments ([`crate::pattern_index`]): a message costs the
//! subscribers it reaches, not every pattern of every subscriber.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use ipc_proto::pb::{Member, Msg};
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::bus::{ReplyError, RequestError};
use crate::channel::Pattern;
use crate::metrics::Metrics;
use crate::pattern_index::PatternIndex;
use crate::queue::{Charge, Delivery, PushError, Queue, QueueLimits};
use crate::responders;
use crate::telemetry::{Hop, Kind, TraceContext};
use opentelemetry::KeyValue;

/// Why the node ended a subscriber's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Its queue was full: it did not keep up.
    SlowConsumer,
    /// A newer subscription with the same id took over.
    Replaced,
    /// The node is shutting down.
    Shutdown,
    /// The token that opened it was removed from (or changed in) the tokens file.
    Revoked,
}

/// Who a subscriber is and what it listens to (channels already expanded,
/// including the automatic role, tag and id channels).
#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    pub id: String,
    pub app: String,
    pub role: String,
    pub tag: String,
    pub labels: HashMap<String, String>,
    pub patterns: Vec<Pattern>,
    /// The identity that opened it (the caller's sender): per-identity limits
    /// count by it.
    pub owner: String,
    /// Whether `owner` was authenticated: then only that identity may answer the
    /// requests handed to this subscriber.
    pub verified_owner: bool,
    /// Members this subscriber relays (a sidecar's local subscribers, validated by
    /// the node, `roles` filled): listed by [`Hub::members`] after it while its
    /// stream lasts. Requests to their ids and roles go to this subscriber.
    pub relayed: Vec<Member>,
    /// Takes no requests for its role and tag channels (still receives their
    /// broadcasts): `SubscribeRequest.role_watcher`.
    pub role_watcher: bool,
}

/// Limits checked when a subscriber registers.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most subscribers in the hub.
    pub max_streams: usize,
    /// Most subscribers of one owner.
    pub max_per_owner: usize,
}

impl StreamLimits {
    pub const NONE: StreamLimits = StreamLimits {
        max_streams: usize::MAX,
        max_per_owner: usize::MAX,
    };
}

/// Why a subscriber was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// The hub holds `max_streams` subscribers.
    Streams,
    /// The owner holds `max_per_owner` subscribers.
    PerOwner,
}

struct Subscriber {
    spec: SubscriberSpec,
    /// The request channels indexed for it in `Registry::responders`.
    routes: Vec<String>,
    connected_ms: i64,
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Registry {
    subs: HashMap<u64, Subscriber, BuildHasherDefault<KeyHasher>>,
    by_id: HashMap<String, u64>,
    exact: HashMap<String, Vec<u64>>,
    wildcard: PatternIndex,
    /// Request routes (see [`crate::responders`]): channel → the subscribers that
    /// take requests on it, each with the member it addresses (itself, or a member
    /// it relays).
    responders: HashMap<String, Vec<Route>>,
    /// Live subscribers per owner.
    owners: HashMap<String, usize>,
}

impl Registry {
    /// Keys of the subscribers whose patterns match `channel`, each once. Borrows
    /// the exact-channel index when no wildcard matches (the usual case), so a
    /// fan-out to many subscribers copies no key list.
    fn matching(&self, channel: &str) -> Cow<'_, [u64]> {
        let exact: &[u64] = self.exact.get(channel).map_or(&[], Vec::as_slice);
        let mut keys = Vec::new();
        self.wildcard.matching(channel, &mut keys);
        if keys.is_empty() {
            return Cow::Borrowed(exact);
        }
        keys.extend_from_slice(exact);
        keys.sort_unstable();
        keys.dedup();
        Cow::Owned(keys)
    }
}

/// Hashes the hub's subscriber keys (its own counter, never client input) with one
/// multiplication. Fan-out looks a key up per subscriber per message, and the
/// default SipHash was a tenth of the fan-out path's instructions.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(FIBONACCI);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(FIBONACCI);
    }
}

fn sorted_subscribers(reg: &Registry) -> Vec<&Subscriber> {
    let mut subs: Vec<&Subscriber> = reg.subs.values().collect();
    subs.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
    subs
}

/// 2^64 / φ: multiplying by it spreads consecutive keys over high and low bits.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

/// One way to hand a request to a member: through subscriber `key`.
#[derive(Debug, Clone)]
struct Route {
    key: u64,
    member: Arc<str>,
}

/// The request channels of a subscriber and of the members it relays, each with
/// the member it reaches.
fn request_routes(spec: &SubscriberSpec) -> Vec<(String, Arc<str>)> {
    let own: Arc<str> = Arc::from(spec.id.as_str());
    let mut routes: Vec<(String, Arc<str>)> = vec![(spec.id.clone(), own.clone())];
    if !spec.role_watcher {
        for channel in responders::role_channels(&spec.app, &spec.role, &spec.tag) {
            routes.push((channel, own.clone()));
        }
    }
    for member in &spec.relayed {
        let id: Arc<str> = Arc::from(member.id.as_str());
        for channel in responders::request_channels(member) {
            routes.push((channel.to_string(), id.clone()));
        }
    }
    routes
}

/// A request handed to a subscriber: where its reply will arrive.
pub struct Delivered {
    /// The subscriber it went to.
    pub key: u64,
    /// The member it is for (the subscriber, or a member it relays).
    pub member: Arc<str>,
    pub reply_to: String,
    pub reply: oneshot::Receiver<Msg>,
}

struct Pending {
    tx: oneshot::Sender<Msg>,
    /// The subscriber the request went to: if it leaves, the caller learns at once.
    subscriber: u64,
    /// The authenticated identity of that subscriber: only it may reply.
    owner: Option<String>,
    /// The trace the request is part of: its reply's parent.
    trace: Option<TraceContext>,
}

/// The live subscribers of one node.
pub struct Hub {
    node: String,
    queue_limits: QueueLimits,
    /// Bytes of memory held by all subscriber queues, each message once.
    queued_bytes: Arc<AtomicUsize>,
    registry: RwLock<Registry>,
    pending: Mutex<HashMap<String, Pending>>,
    next_key: AtomicU64,
    next_request: AtomicU64,
    round_robin: AtomicUsize,
    metrics: Arc<Metrics>,
    on_change: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

/// The receiving end of a subscription. Dropping it unsubscribes.
pub struct Subscription {
    pub key: u64,
    pub id: String,
    pub patterns: Vec<Pattern>,
    queue: Arc<Queue>,
    hub: Weak<Hub>,
}

impl Subscription {
    /// The next message; `Err` when the node ended the stream, `Ok(None)` when the
    /// subscription was removed without a reason.
    pub async fn recv(&mut self) -> Result<Option<Arc<Msg>>, Closed> {
        self.queue.recv().await
    }

    /// Whether this subscription receives messages of `channel`.
    pub fn matches(&self, channel: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(channel))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.remove(self.key, None);
        }
    }
}

impl Hub {
    /// A hub whose subscriber queues hold `queue_capacity` messages and the
    /// default byte bounds.
    pub fn new(node: String, queue_capacity: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Self::with_queue_limits(node, QueueLimits::messages(queue_capacity), metrics)
    }

    pub fn with_queue_limits(
        node: String,
        queue_limits: QueueLimits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            queue_limits: QueueLimits {
                messages: queue_limits.messages.max(1),
                ..queue_limits
            },
            queued_bytes: Arc::default(),
            registry: RwLock::default(),
            pending: Mutex::default(),
            next_key: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            round_robin: AtomicUsize::new(0),
            metrics,
            on_change: Mutex::new(None),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Registers a callback run after every subscribe and unsubscribe (presence).
    pub fn on_change(&self, callback: impl Fn() + Send + Sync + 'static) {
        *self.on_change.lock() = Some(Box::new(callback));
    }

    /// Adds a subscriber. One with the same id is replaced (its stream ends).
    pub fn register(self: &Arc<Self>, spec: SubscriberSpec) -> Subscription {
        match self.try_register(spec, StreamLimits::NONE) {
            Ok(subscription) => subscription,
            Err(_) => unreachable!("no limit to exceed"),
        }
    }

    /// Adds a subscriber within `limits`, checked and applied atomically. Replacing
    /// a subscriber of the same id and owner (a reconnect) counts as no new one.
    pub fn try_register(
        self: &Arc<Self>,
        spec: SubscriberSpec,
        limits: StreamLimits,
    ) -> Result<Subscription, RegisterError> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(Queue::new(self.queue_limits));
        let previous = {
            let mut reg = self.registry.write();
            let replaced = reg
                .by_id
                .get(&spec.id)
                .and_then(|k| reg.subs.get(k))
                .map(|sub| sub.spec.owner.as_str());
            let same_owner = replaced == Some(spec.owner.as_str());
            if replaced.is_none() && reg.subs.len() >= limits.max_streams {
                return Err(RegisterError::Streams);
            }
            if !same_owner
                && reg.owners.get(&spec.owner).copied().unwrap_or(0) >= limits.max_per_owner
            {
                return Err(RegisterError::PerOwner);
            }
            *reg.owners.entry(spec.owner.clone()).or_default() += 1;
            let previous = reg.by_id.insert(spec.id.clone(), key);
            for pattern in &spec.patterns {
                if pattern.is_exact() {
                    let keys = reg.exact.entry(pattern.as_str().to_string()).or_default();
                    if !keys.contains(&key) {
                        keys.push(key);
                    }
                } else {
                    reg.wildcard.insert(pattern, key);
                }
            }
            let routes = request_routes(&spec);
            for (channel, member) in &routes {
                reg.responders
                    .entry(channel.clone())
                    .or_default()
                    .push(Route {
                        key,
                        member: member.clone(),
                    });
            }
            reg.subs.insert(
                key,
                Subscriber {
                    spec: spec.clone(),
                    routes: routes.into_iter().map(|(channel, _)| channel).collect(),
                    connected_ms: crate::now_ms(),
                    queue: queue.clone(),
                },
            );
            previous
        };
        if let Some(previous) = previous {
            // Requests the replaced stream was given stay answerable: the same id took
            // over (a sidecar changing its upstream channels reads the old stream to
            // its end and answers them).
            for pending in self.pending.lock().values_mut() {
                if pending.subscriber == previous {
                    pending.subscriber = key;
                }
            }
            self.remove(previous, Some(Closed::Replaced));
        }
        self.metrics.subscribers.fetch_add(1, Ordering::Relaxed);
        self.changed();
        Ok(Subscription {
            key,
            id: spec.id,
            patterns: spec.patterns,
            queue,
            hub: Arc::downgrade(self),
        })
    }

    /// Removes a subscriber; its stream ends with `reason` once drained.
    pub fn remove(&self, key: u64, reason: Option<Closed>) {
        let removed = {
            let mut reg = self.registry.write();
            let Some(sub) = reg.subs.remove(&key) else {
                return;
            };
            if reg.by_id.get(&sub.spec.id) == Some(&key) {
                reg.by_id.remove(&sub.spec.id);
            }
            if let Some(count) = reg.owners.get_mut(&sub.spec.owner) {
                *count -= 1;
                if *count == 0 {
                    reg.owners.remove(&sub.spec.owner);
                }
            }
            for pattern in &sub.spec.patterns {
                if !pattern.is_exact() {
                    reg.wildcard.remove(pattern, key);
                } else if let Some(keys) = reg.exact.get_mut(pattern.as_str()) {
                    keys.retain(|k| *k != key);
                    if keys.is_empty() {
                        reg.exact.remove(pattern.as_str());
                    }
                }
            }
            for channel in &sub.routes {
                if let Some(routes) = reg.responders.get_mut(channel) {
                    routes.retain(|r| r.key != key);
                    if routes.is_empty() {
                        reg.responders.remove(channel);
                    }
                }
            }
            sub
        };
        removed.queue.close(reason);
        match reason {
            Some(Closed::SlowConsumer) => {
                self.metrics.slow_cutoffs.fetch_add(1, Ordering::Relaxed);
            }
            Some(Closed::Revoked) => {
                self.metrics.revoked_streams.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        // Requests waiting on this subscriber fail now rather than at their deadline.
        self.pending.lock().retain(|_, p| p.subscriber != key);
        self.metrics.subscribers.fetch_sub(1, Ordering::Relaxed);
        drop(removed);
        self.changed();
    }

    /// Ends every stream (shutdown).
    pub fn close_all(&self, reason: Closed) {
        let keys: Vec<u64> = self.registry.read().subs.keys().copied().collect();
        for key in keys {
            self.remove(key, Some(reason));
        }
    }

    /// Delivers a log entry to every local subscriber whose patterns match its
    /// channel. Buses call this in log order. Returns the number of deliveries.
    pub fn dispatch(&self, msg: &Arc<Msg>) -> usize {
        let mut fanout = Hop::child("fanout", Kind::Internal, &msg.headers, || {
            vec![
                KeyValue::new("ipc.node", self.node.clone()),
                KeyValue::new("ipc.msg_id", msg.id.clone()),
                KeyValue::new("ipc.channel", msg.channel.clone()),
                KeyValue::new("ipc.cursor", msg.cursor.clone()),
            ]
        });
        let mut delivered = 0;
        let mut slow = Vec::new();
        {
            let reg = self.registry.read();
            let keys = reg.matching(&msg.channel);
            let mut charge = None;
            for &key in keys.iter() {
                let Some(sub) = reg.subs.get(&key) else {
                    continue;
                };
                let charge = charge.get_or_insert_with(|| self.charge(msg));
                match sub.queue.push(Delivery {
                    msg: msg.clone(),
                    charge: Arc::clone(charge),
                }) {
                    Ok(()) => delivered += 1,
                    Err(PushError::Full) => slow.push(key),
                    Err(PushError::Closed) => {}
                }
            }
        }
        for key in slow {
            tracing::warn!(node = %self.node, subscriber = key, channel = %msg.channel, "subscriber too slow, cut off");
            self.remove(key, Some(Closed::SlowConsumer));
        }
        self.enforce_total_bytes();
        self.metrics
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        fanout.set(|| vec![KeyValue::new("ipc.deliveries", delivered as i64)]);
        delivered
    }

    /// Sends a notice that is not a log entry (no cursor), such as `ipc:gap`, to
    /// every subscriber whatever its channels. Returns the number reached.
    /// The node's metrics, for buses that count what they do to the hub.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn notify_all(&self, msg: &Arc<Msg>) -> usize {
        let mut reached = 0;
        let mut slow = Vec::new();
        {
            let reg = self.registry.read();
            let charge = self.charge(msg);
            for (key, sub) in &reg.subs {
                match sub.queue.push(Delivery {
                    msg: msg.clone(),
                    charge: charge.clone(),
                }) {
                    Ok(()) => reached += 1,
                    Err(PushError::Full) => slow.push(*key),
                    Err(PushError::Closed) => {}
                }
            }
        }
        for key in slow {
            self.remove(key, Some(Closed::SlowConsumer));
        }
        reached
    }

    /// What `msg` costs while queued, counted in the node's total.
    fn charge(&self, msg: &Msg) -> Arc<Charge> {
        Charge::new(crate::msg_size::memory_size(msg), &self.queued_bytes)
    }

    /// Bytes of memory held by the subscriber queues now (each message once).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Cuts off the subscribers holding the most bytes until the queues together
    /// hold no more than the node's bound: the slowest readers pay, not the node.
    fn enforce_total_bytes(&self) {
        while self.queued_bytes() > self.queue_limits.total_bytes {
            let largest = {
                let reg = self.registry.read();
                reg.subs
                    .iter()
                    .map(|(key, sub)| (sub.queue.bytes(), *key))
                    .filter(|(bytes, _)| *bytes > 0)
                    .max()
            };
            let Some((bytes, key)) = largest else {
                return;
            };
            tracing::warn!(node = %self.node, subscriber = key, queued_bytes = bytes, "subscriber queues over their node-wide bound; the largest is cut off");
            self.remove(key, Some(Closed::SlowConsumer));
        }
    }

    /// Ends the streams opened by `owner` (a token removed from the tokens file).
    /// Returns how many were ended.
    pub fn close_owner(&self, owner: &str, reason: Closed) -> usize {
        let keys: Vec<u64> = self
            .registry
            .read()
            .subs
            .iter()
            .filter(|(_, sub)| sub.spec.verified_owner && sub.spec.owner == owner)
            .map(|(key, _)| *key)
            .collect();
        for key in &keys {
            self.remove(*key, Some(reason));
        }
        keys.len()
    }

    /// Whether any local subscriber takes requests for `target` (its id or role
    /// channel, or one of a member it relays): watchers do not count.
    pub fn has_responder(&self, target: &str) -> bool {
        self.registry.read().responders.contains_key(target)
    }

    /// Hands a request to one local responder of `target` (round robin), skipping
    /// the subscribers in `tried`; `None` if there is none left. A request for a
    /// relayed member carries its id in [`responders::MEMBER_HEADER`].
    pub fn deliver_request(
        &self,
        target: &str,
        mut request: Msg,
        tried: &[u64],
    ) -> Option<Delivered> {
        let reg = self.registry.read();
        let candidates: Vec<&Route> = reg
            .responders
            .get(target)?
            .iter()
            .filter(|r| !tried.contains(&r.key))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        for i in 0..candidates.len() {
            let route = candidates[(start + i) % candidates.len()];
            let Some(sub) = reg.subs.get(&route.key) else {
                continue;
            };
            let reply_to = self.new_reply_to();
            request.reply_to = reply_to.clone();
            if *route.member != *sub.spec.id {
                request
                    .headers
                    .insert(responders::MEMBER_HEADER.into(), route.member.to_string());
            }
            let (tx, rx) = oneshot::channel();
            // Registered before sending so that even an instant reply finds it.
            self.pending.lock().insert(
                reply_to.clone(),
                Pending {
                    tx,
                    subscriber: route.key,
                    owner: sub.spec.verified_owner.then(|| sub.spec.owner.clone()),
                    trace: TraceContext::from_headers(&request.headers),
                },
            );
            let request = Arc::new(request.clone());
            let charge = self.charge(&request);
            match sub.queue.push(Delivery {
                msg: request,
                charge,
            }) {
                Ok(()) => {
                    return Some(Delivered {
                        key: route.key,
                        member: route.member.clone(),
                        reply_to,
                        reply: rx,
                    });
                }
                Err(_) => {
                    self.pending.lock().remove(&reply_to);
                }
            }
        }
        None
    }

    /// Asks a local responder of `target` and waits for its reply until `deadline`:
    /// the one request path of every bus. The request carries its deadline
    /// ([`crate::node::DEADLINE_HEADER`]); a relay that could not answer after all
    /// ([`responders::cannot_answer`]) is skipped and the next responder asked.
    pub async fn request(
        &self,
        target: &str,
        mut request: Msg,
        deadline: std::time::Instant,
    ) -> Result<Msg, RequestError> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        request.headers.insert(
            crate::node::DEADLINE_HEADER.to_string(),
            (crate::now_ms() + left.as_millis() as i64).to_string(),
        );
        let mut hop = Hop::child("deliver", Kind::Producer, &request.headers, || {
            vec![
                KeyValue::new("ipc.node", self.node.clone()),
                KeyValue::new("ipc.target", target.to_string()),
                KeyValue::new("ipc.msg_id", request.id.clone()),
            ]
        });
        hop.stamp(&mut request.headers);
        let result = self
            .ask_responders(target, request, deadline, &mut hop)
            .await;
        if let Err(error) = &result {
            hop.fail(|| error.to_string());
        }
        result
    }

    async fn ask_responders(
        &self,
        target: &str,
        request: Msg,
        deadline: std::time::Instant,
        hop: &mut Hop,
    ) -> Result<Msg, RequestError> {
        let mut tried = Vec::new();
        loop {
            let Some(delivered) = self.deliver_request(target, request.clone(), &tried) else {
                return Err(RequestError::NoResponders(target.to_string()));
            };
            tracing::debug!(target, member = %delivered.member, node = %self.node, "request handed to a responder");
            hop.set(|| vec![KeyValue::new("ipc.member", delivered.member.to_string())]);
            match tokio::time::timeout_at(deadline.into(), delivered.reply).await {
                Ok(Ok(reply)) if responders::cannot_answer(&reply) => {
                    tracing::debug!(target, node = %self.node, "a relay could not answer; asking another responder");
                    hop.event("relay could not answer");
                    tried.push(delivered.key);
                }
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(_)) => {
                    return Err(RequestError::Unavailable(format!(
                        "the subscriber of {target:?} that had the request disconnected before replying"
                    )));
                }
                Err(_) => {
                    self.cancel_request(&delivered.reply_to);
                    return Err(RequestError::DeadlineExceeded(target.to_string()));
                }
            }
        }
    }

    /// The trace context of a request this node handed out and still waits on.
    pub fn request_trace(&self, reply_to: &str) -> Option<TraceContext> {
        self.pending.lock().get(reply_to)?.trace.clone()
    }

    /// Forgets a request whose caller stopped waiting.
    pub fn cancel_request(&self, reply_to: &str) {
        self.pending.lock().remove(reply_to);
    }

    /// Completes a request that this node handed out. A request handed to an
    /// authenticated subscriber is completed only by a reply from that identity:
    /// to anyone else it does not exist (NOT_FOUND), and it stays pending.
    pub fn complete_request(&self, reply: Msg) -> Result<(), ReplyError> {
        let pending = {
            let mut pending = self.pending.lock();
            match pending.get(&reply.reply_to) {
                Some(p) if p.owner.as_ref().is_some_and(|o| *o != reply.sender) => None,
                Some(_) => pending.remove(&reply.reply_to),
                None => None,
            }
        };
        match pending {
            Some(pending) => {
                let reply_to = reply.reply_to.clone();
                pending
                    .tx
                    .send(reply)
                    .map_err(|_| ReplyError::NotFound(reply_to))
            }
            None => Err(ReplyError::NotFound(reply.reply_to)),
        }
    }

    /// Whether a `reply_to` was issued by this node.
    pub fn owns_reply_to(&self, reply_to: &str) -> bool {
        reply_to
            .rsplit_once('#')
            .is_some_and(|(node, _)| node == self.node)
    }

    /// A new `reply_to`: `<node>#<counter>.<16 hex digits>`. The node routes the
    /// reply; the counter keeps it unique; the 64 random bits make it impossible
    /// to guess, so one process cannot answer a request handed to another one
    /// sharing its token.
    fn new_reply_to(&self) -> String {
        format!(
            "{}#{}.{:016x}",
            self.node,
            self.next_request.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        )
    }

    /// The node of a `reply_to`, if it has the expected shape.
    pub fn reply_to_node(reply_to: &str) -> Option<&str> {
        let (node, rest) = reply_to.rsplit_once('#')?;
        let (counter, secret) = rest.split_once('.')?;
        let well_formed = !node.is_empty()
            && counter.parse::<u64>().is_ok()
            && secret.len() == 16
            && secret.bytes().all(|b| b.is_ascii_hexdigit());
        well_formed.then_some(node)
    }

    /// This node's subscribers as members, each followed by the members it relays
    /// (sorted by id). A relayed member is listed once per `(id, node)`: the first
    /// relay of it wins.
    pub fn members(&self) -> Vec<Member> {
        let reg = self.registry.read();
        let subs = sorted_subscribers(&reg);
        let mut seen = std::collections::HashSet::new();
        let mut members = Vec::with_capacity(subs.len());
        for sub in subs {
            members.push(self.member(sub));
            let mut relayed: Vec<&Member> = sub.spec.relayed.iter().collect();
            relayed.sort_by(|a, b| a.id.cmp(&b.id));
            for member in relayed {
                if seen.insert((member.id.as_str(), member.node.as_str())) {
                    members.push(member.clone());
                }
            }
        }
        members
    }

    /// This node's own subscribers as members, without the members they relay.
    pub fn subscribers(&self) -> Vec<Member> {
        let reg = self.registry.read();
        sorted_subscribers(&reg)
            .into_iter()
            .map(|sub| self.member(sub))
            .collect()
    }

    fn member(&self, sub: &Subscriber) -> Member {
        let member = Member {
            id: sub.spec.id.clone(),
            app: sub.spec.app.clone(),
            role: sub.spec.role.clone(),
            tag: sub.spec.tag.clone(),
            labels: sub.spec.labels.clone(),
            channels: sub.spec.patterns.iter().map(|p| p.to_string()).collect(),
            node: self.node.clone(),
            connected_ms: sub.connected_ms,
            ..Member::default()
        };
        let mut member = responders::with_roles(member);
        if sub.spec.role_watcher {
            member.roles.clear();
            member.responder = false;
        }
        member
    }

    /// Number of live subscribers.
    pub fn len(&self) -> usize {
        self.registry.read().subs.len()
    }

    /// Whether there are no subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn changed(&self) {
        if let Some(callback) = self.on_change.lock().as_ref() {
            callback();
        }
    }
}
