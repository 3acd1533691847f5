//! The bus: what carries messages between nodes.
//!
//! The node (hub, service) is the same everywhere; a bus adapts it to one transport:
//! [`crate::memory::MemoryBus`] for a node alone, the Redis bus for control-plane
//! replicas, the upstream bus for a sidecar. A bus owns the log (what `Broadcast`
//! appends to and `Subscribe` resumes from), delivers every appended entry to the
//! node in log order, and routes requests and replies to other nodes. What a bus
//! does to its node goes through [`Local`], the handle it is attached with: the
//! rules (who answers a request, in which order) stay in the node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use ipc_proto::pb::{Member, Msg};
use tokio::sync::watch;

use crate::channel::Pattern;
use crate::coord::{InUse, LimitAnswer, LimitSpec, LockAnswer, LockSpec, MemoryCoord, UnlockSpec};
use crate::cursor::Cursor;
use crate::error::NodeError;
use crate::local::Local;

// The errors of the trait's methods, where a bus's implementer looks for them.
pub use crate::error::{BusError, ReplyError, RequestError};

/// A Broadcast's idempotency key as a bus stores it: `scoped` is the app id and the
/// caller's key (`app:key`, keys are per app), remembered for `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The key as given by the caller (a relay passes this one on).
    pub key: String,
    /// `app:key`: what the bus de-duplicates on.
    pub scoped: String,
    pub window: Duration,
}

/// What became of an append.
#[derive(Debug, Clone)]
pub enum Appended {
    /// Stored now, with its cursor.
    Stored(Arc<Msg>),
    /// Its key was seen within the window: nothing was stored; these are the first
    /// message's id, channel and cursor.
    Duplicate {
        id: String,
        channel: String,
        cursor: String,
    },
}

/// An append that has its place in the log order and completes once stored: at
/// once for a bus that stores as it submits (memory, which then allocates
/// nothing for it), later for one that confirms (Redis).
pub struct PendingAppend(Pending);

enum Pending {
    Done(Option<Result<Appended, BusError>>),
    Waiting(BoxFuture<'static, Result<Appended, BusError>>),
}

impl PendingAppend {
    /// Stored (or refused) already.
    pub fn done(result: Result<Appended, BusError>) -> Self {
        Self(Pending::Done(Some(result)))
    }

    /// Stored once `confirmed` completes.
    pub fn waiting(
        confirmed: impl Future<Output = Result<Appended, BusError>> + Send + 'static,
    ) -> Self {
        Self(Pending::Waiting(Box::pin(confirmed)))
    }
}

impl Future for PendingAppend {
    type Output = Result<Appended, BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Pending::Done(result) => Poll::Ready(
                result
                    .take()
                    .expect("a PendingAppend is not polled after it completed"),
            ),
            Pending::Waiting(confirmed) => confirmed.as_mut().poll(cx),
        }
    }
}

/// What [`Bus::try_submit`] did.
// Returned once per message and matched at once: boxing the message given back
// would cost an allocation per message on every bus that waits.
#[allow(clippy::large_enum_variant)]
pub enum TrySubmit {
    /// Submitted (or refused) at once.
    Done(Result<PendingAppend, BusError>),
    /// This bus may wait to take a message: here it is back, for [`Bus::submit`].
    WouldWait(Msg, Option<IdempotencyKey>),
}

/// What a subscriber missed since its cursor.
#[derive(Debug, Default)]
pub struct Replay {
    /// Entries after the cursor (all retained entries when `gap` is set), in log
    /// order. The caller filters them by its subscriptions.
    pub messages: Vec<Arc<Msg>>,
    /// Set when entries between the cursor and `messages` were lost (retention
    /// passed them, or the log itself was lost): the reason, for `ipc:gap`.
    pub gap: Option<String>,
}

/// A control-plane replica sharing the bus, as its presence shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Its node name.
    pub name: String,
    /// Members it publishes: its subscribers and those they relay.
    pub members: u64,
    /// Milliseconds since its last heartbeat (as far as the bus can tell).
    pub heartbeat_age_ms: u64,
}

/// The transport under a node.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Connects the bus to the node it delivers to. Called once, while the node is
    /// built and before any other call.
    fn attach(&self, local: Local);

    /// Appends a message (id, ts, channel set) to the log. Returns once the entry is
    /// durable in the bus, with `cursor` set. The entry reaches every node's hub,
    /// this one included, through the bus.
    ///
    /// The default submits it without a key and waits until it is stored.
    async fn append(&self, msg: Msg) -> Result<Arc<Msg>, BusError> {
        match self.submit(msg, None).await?.await? {
            Appended::Stored(stored) => Ok(stored),
            Appended::Duplicate { .. } => Err(BusError::Internal(
                "an append without a key was taken for a repeat".into(),
            )),
        }
    }

    /// Takes a message's place in the log order and returns a future that completes
    /// once it is stored, so that a caller may submit the next one before the first
    /// is confirmed (Publish): entries submitted one after the other are stored in
    /// that order. With `key`, a key seen within its window stores nothing and
    /// answers [`Appended::Duplicate`]; the check and the append are one atomic step.
    async fn submit(
        &self,
        msg: Msg,
        key: Option<IdempotencyKey>,
    ) -> Result<PendingAppend, BusError>;

    /// [`Bus::submit`] done at once, by a bus that never waits to take a message
    /// (the memory bus stores it as it submits it): no future to build and poll
    /// per message. The default gives the message back, to be submitted.
    fn try_submit(&self, msg: Msg, key: Option<IdempotencyKey>) -> TrySubmit {
        TrySubmit::WouldWait(msg, key)
    }

    /// Entries after `cursor`, up to the current end of the log, for a subscriber
    /// of `patterns`. A bus that holds only part of the log (the sidecar's buffer of
    /// what its upstream sent) needs the patterns to tell whether it can answer; the
    /// others return every entry and the caller filters.
    async fn replay(&self, after: &Cursor, patterns: &[Pattern]) -> Result<Replay, BusError>;

    /// The position of the newest entry of the log, if the bus can tell. A fresh
    /// subscriber is told it in `ipc:subscribed` (`cursor`), so that it can resume
    /// without loss even before it received a message.
    ///
    /// `Err(Unavailable)` when the bus does not know yet from where it would deliver
    /// (a Redis replica that has not reached Redis since it started): the node then
    /// refuses subscriptions rather than serve them from an unknown position.
    async fn head(&self) -> Result<Option<Cursor>, BusError> {
        Ok(None)
    }

    /// Called once a subscriber of `patterns` is registered in the hub and before
    /// it is told `ipc:subscribed`: returns when messages of those patterns reach the
    /// hub. Only a bus that fetches by subscription (the sidecar's upstream) waits,
    /// and never without a bound.
    async fn cover(&self, patterns: &[Pattern]) {
        let _ = patterns;
    }

    /// Routes a request to a subscriber of `target` on another node and waits for
    /// the reply until `deadline`. Called only when nothing in this node answers it.
    async fn request(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError>;

    /// Delivers a reply whose `reply_to` names another node.
    async fn forward_reply(&self, reply: Msg) -> Result<(), ReplyError>;

    /// Members of the whole fleet, given this node's own.
    async fn members(&self, local: Vec<Member>) -> Result<Vec<Member>, BusError>;

    /// Every live replica sharing this bus, this one included; empty when the bus
    /// knows of no other node (the memory bus, a sidecar's upstream).
    async fn replicas(&self) -> Result<Vec<Replica>, BusError> {
        Ok(Vec::new())
    }

    /// Grants, renews or refuses a lease (waiting as `lock.wait_until` says); see
    /// [`crate::coord`] for the rules. The default keeps leases in the node
    /// (`in_node`); a bus shared by several nodes keeps them where all see them.
    async fn lock(&self, lock: LockSpec, in_node: &MemoryCoord) -> Result<LockAnswer, BusError> {
        Ok(in_node.lock(&lock).await)
    }

    /// Frees a lease if `unlock` carries its fence; `false` frees nothing.
    async fn unlock(&self, unlock: UnlockSpec, in_node: &MemoryCoord) -> Result<bool, BusError> {
        Ok(in_node.unlock(&unlock))
    }

    /// One call on the token bucket `name`.
    async fn limit(
        &self,
        name: &str,
        limit: LimitSpec,
        in_node: &MemoryCoord,
    ) -> Result<LimitAnswer, BusError> {
        Ok(in_node.limit(name, &limit))
    }

    /// The live leases and the buckets not full, at most `max` of each (more:
    /// `truncated`), wherever [`Bus::lock`] and [`Bus::limit`] keep them.
    async fn in_use(&self, in_node: &MemoryCoord, max: usize) -> Result<InUse, BusError> {
        Ok(in_node.in_use(max))
    }

    /// Refuses a local subscription the bus could not carry (a sidecar whose
    /// upstream token does not grant a pattern): `id` is the subscriber's own id
    /// channel, which stays local when not granted rather than being refused.
    fn check_local_subscription(&self, _patterns: &[Pattern], _id: &str) -> Result<(), NodeError> {
        Ok(())
    }

    /// Keeps the record of a keyed operation (Gather, Rollout) under `key` for
    /// `ttl`: fleet-wide where the bus can (Redis), else in this node.
    async fn store_operation(
        &self,
        key: &str,
        record: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let _ = (key, record, ttl);
        Err(BusError::Unavailable(
            "this node keeps no operation records; run keyed operations on the control plane"
                .into(),
        ))
    }

    /// Claims a keyed operation for one run (see [`crate::fleetops::claim`]): a
    /// lease with the rules of [`Bus::lock`], kept where the operation records are
    /// — in Redis for every replica, else in this node (`in_node`), also on a bus
    /// whose locks live elsewhere (a sidecar keeps no records).
    async fn claim_operation(
        &self,
        claim: LockSpec,
        in_node: &MemoryCoord,
    ) -> Result<LockAnswer, BusError> {
        Ok(in_node.lock(&claim).await)
    }

    /// Releases a claim taken with [`Bus::claim_operation`].
    async fn release_operation(
        &self,
        claim: UnlockSpec,
        in_node: &MemoryCoord,
    ) -> Result<bool, BusError> {
        Ok(in_node.unlock(&claim))
    }

    /// The record stored under `key`, if any and not expired.
    async fn load_operation(&self, key: &str) -> Result<Option<Vec<u8>>, BusError> {
        let _ = key;
        Ok(None)
    }

    /// The node's subscribers changed (presence may need an update).
    fn subscribers_changed(&self) {}

    /// `true` while the bus can do its work; health checks follow it.
    fn health(&self) -> watch::Receiver<bool>;

    /// Stops background work; called once at shutdown.
    async fn shutdown(&self) {}

    /// Writes the bus's own metric families into the node's `/metrics` scrape.
    fn write_metrics(&self, out: &mut crate::metrics::Exposition) {
        let _ = out;
    }
}
