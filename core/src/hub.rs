//! The hub: a node's live subscribers, fan-out of log entries to them, and requests
//! waiting for replies.
//!
//! Fan-out never blocks: each subscriber has a bounded queue, and one that is full
//! is cut off (it resumes from its cursor) rather than slowing the others or growing
//! memory. Exact channel names are indexed by a hash map, wildcard patterns by a
//! trie of their segments ([`crate::pattern_index`]): a message costs the
//! subscribers it reaches, not every pattern of every subscriber.
//!
//! # Layout
//! - here: the registry of subscribers and its indexes (exact channels, wildcard
//!   patterns, request routes, owners); registering, replacing and removing;
//!   members.
//! - [`fanout`]: log entries and notices to the matching subscribers, within
//!   each queue's and the node's memory bounds.
//! - [`requests`]: requests handed to local responders and their replies.

mod fanout;
mod replies;
mod requests;

pub use replies::{Arrival, OperationReplies};
pub use requests::{DEADLINE_HEADER, Delivered, LocalAnswer, PendingKey, ReplyRoute};
pub(crate) use requests::{OperationHanding, deadline_ms};
use requests::{Pending, Route, request_routes};

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use ipc_proto::pb::Member;
use parking_lot::{Mutex, RwLock};

use crate::channel::Pattern;
use crate::error::Closed;
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::pattern_index::PatternIndex;
use crate::queue::{Queue, QueueLimits};
use crate::responders;

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

/// A subscriber `id` of `patterns` registered on `hub` with room to spare, for
/// the hub's tests.
#[cfg(test)]
pub(crate) fn test_subscriber(hub: &Arc<Hub>, id: &str, patterns: Vec<Pattern>) -> Subscription {
    let spec = SubscriberSpec {
        id: id.into(),
        app: String::new(),
        role: String::new(),
        tag: String::new(),
        labels: HashMap::new(),
        patterns,
        owner: String::new(),
        verified_owner: false,
        relayed: Vec::new(),
        role_watcher: false,
    };
    let limits = StreamLimits {
        max_streams: 10,
        max_per_owner: 10,
    };
    hub.try_register(spec, limits).expect("registered")
}

/// Limits checked when a subscriber registers.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most subscribers in the hub.
    pub max_streams: usize,
    /// Most subscribers of one owner.
    pub max_per_owner: usize,
}

/// Why a subscriber was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// The hub holds `max_streams` subscribers.
    Streams,
    /// The owner holds `max_per_owner` subscribers.
    PerOwner,
}

/// A registered subscriber. Small on purpose: the registry's table holds one per
/// subscriber (10,000 on a busy node) and its spec is shared with the
/// [`Subscription`], not copied; its request routes are recomputed from the spec
/// when it leaves rather than kept.
struct Subscriber {
    spec: Arc<SubscriberSpec>,
    connected_ms: i64,
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Registry {
    subs: HashMap<u64, Subscriber, BuildHasherDefault<KeyHasher>>,
    by_id: HashMap<String, u64>,
    /// Looked up per published message: foldhash (seeded per map, as hashbrown's
    /// default) hashes a channel name in a quarter of SipHash's instructions.
    exact: HashMap<String, Vec<u64>, foldhash::fast::RandomState>,
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

    /// Whether [`Registry::matching`] would find a subscriber, without collecting
    /// the keys.
    fn matches_any(&self, channel: &str) -> bool {
        self.exact.get(channel).is_some_and(|keys| !keys.is_empty())
            || self.wildcard.matches_any(channel)
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

/// Adds the members `sub` relays (sorted by id) to `members`, each `(id, node)`
/// once among the calls sharing `seen`: the first relay of it wins.
fn push_relayed<'r>(
    members: &mut Vec<Member>,
    sub: &'r Subscriber,
    seen: &mut std::collections::HashSet<(&'r str, &'r str)>,
) {
    let mut relayed: Vec<&Member> = sub.spec.relayed.iter().collect();
    relayed.sort_by(|a, b| a.id.cmp(&b.id));
    for member in relayed {
        if seen.insert((member.id.as_str(), member.node.as_str())) {
            members.push(member.clone());
        }
    }
}

fn sorted_subscribers(reg: &Registry) -> Vec<&Subscriber> {
    let mut subs: Vec<&Subscriber> = reg.subs.values().collect();
    subs.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
    subs
}

/// 2^64 / φ: multiplying by it spreads consecutive keys over high and low bits.
const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;

/// The live subscribers of one node.
pub struct Hub {
    node: String,
    queue_limits: QueueLimits,
    /// Bytes of memory held by all subscriber queues, each message once.
    queued_bytes: Arc<AtomicUsize>,
    registry: RwLock<Registry>,
    /// Requests waiting for their reply, by the counter of their `reply_to`.
    pending: Mutex<HashMap<u64, Pending, BuildHasherDefault<KeyHasher>>>,
    next_key: AtomicU64,
    next_request: AtomicU64,
    round_robin: AtomicUsize,
    metrics: Arc<Metrics>,
    on_change: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

/// The receiving end of a subscription. Dropping it unsubscribes.
pub struct Subscription {
    pub key: u64,
    spec: Arc<SubscriberSpec>,
    queue: Arc<Queue>,
    hub: Weak<Hub>,
}

impl Subscription {
    /// The subscriber's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// What it listens to (channels expanded, its own id channel included).
    pub fn patterns(&self) -> &[Pattern] {
        &self.spec.patterns
    }

    /// The next message; `Err` when the node ended the stream, `Ok(None)` when the
    /// subscription was removed without a reason.
    pub async fn recv(&mut self) -> Result<Option<Outbound>, Closed> {
        self.queue.recv().await
    }

    /// [`Subscription::recv`] for a hand-written stream: the task of the last call
    /// is woken when a message arrives or the subscription ends.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<Outbound>, Closed>> {
        self.queue.poll_recv(cx)
    }

    /// Whether this subscription receives messages of `channel`.
    pub fn matches(&self, channel: &str) -> bool {
        self.spec.patterns.iter().any(|p| p.matches(channel))
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

    /// Adds a subscriber within `limits`, checked and applied atomically. One with
    /// the same id is replaced (its stream ends); replacing a subscriber of the same
    /// id and owner (a reconnect) counts as no new one.
    pub fn try_register(
        self: &Arc<Self>,
        spec: SubscriberSpec,
        limits: StreamLimits,
    ) -> Result<Subscription, RegisterError> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(Queue::new(self.queue_limits));
        let spec = Arc::new(spec);
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
                    // Most exact channels (a subscriber's own id channel) have one
                    // subscriber: room for one, not the four a first push makes.
                    let keys = reg
                        .exact
                        .entry(pattern.as_str().to_string())
                        .or_insert_with(|| Vec::with_capacity(1));
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
                    .or_insert_with(|| Vec::with_capacity(1))
                    .push(Route {
                        key,
                        member: member.clone(),
                    });
            }
            reg.subs.insert(
                key,
                Subscriber {
                    spec: spec.clone(),
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
            spec,
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
            for (channel, _) in request_routes(&sub.spec) {
                if let Some(routes) = reg.responders.get_mut(&channel) {
                    routes.retain(|r| r.key != key);
                    if routes.is_empty() {
                        reg.responders.remove(&channel);
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

    /// The node's metrics, for buses that count what they do to the hub.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
            push_relayed(&mut members, sub, &mut seen);
        }
        members
    }

    /// What a request to `target` may reach among [`Hub::members`]: the subscribers
    /// that take it, then every relayed member as `members` lists it — a bus tells
    /// fresher local copies of relayed members by them ([`crate::Bus::members`]),
    /// and a relayed member's labels may be the bus's to add. Builds no member for
    /// the subscribers of other targets.
    ///
    /// A subscriber is listed with what resolving a request's responders reads of
    /// it: id, node, the request channels it takes `target` on (its id, or
    /// `target` among its roles), and its labels if `with_labels`; not its
    /// channels, app, role or tag (a member per responder of an operation).
    pub fn members_for_request(&self, target: &str, with_labels: bool) -> Vec<Member> {
        let reg = self.registry.read();
        let mut members: Vec<Member> = reg.responders.get(target).map_or_else(Vec::new, |routes| {
            routes
                .iter()
                .filter_map(|route| {
                    let sub = reg.subs.get(&route.key)?;
                    (*route.member == *sub.spec.id).then(|| Member {
                        id: sub.spec.id.clone(),
                        node: self.node.clone(),
                        roles: if sub.spec.id == target {
                            Vec::new()
                        } else {
                            vec![target.to_string()]
                        },
                        responder: true,
                        labels: if with_labels {
                            sub.spec.labels.clone()
                        } else {
                            HashMap::new()
                        },
                        connected_ms: sub.connected_ms,
                        ..Member::default()
                    })
                })
                .collect()
        });
        let mut relaying: Vec<&Subscriber> = reg
            .subs
            .values()
            .filter(|sub| !sub.spec.relayed.is_empty())
            .collect();
        relaying.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
        let mut seen = std::collections::HashSet::new();
        for sub in relaying {
            push_relayed(&mut members, sub, &mut seen);
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
