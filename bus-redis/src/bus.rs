//! [`RedisBus`]: the [`Bus`] of control-plane replicas sharing one Redis.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use ipc_core::bus::{
    Bus, BusError, IdempotencyKey, PendingAppend, Replay, Replica, ReplyError, RequestError,
    TrySubmit,
};
use ipc_core::channel::Pattern;
use ipc_core::coord::{
    InUse, LimitAnswer, LimitSpec, LockAnswer, LockSpec, MemoryCoord, UnlockSpec,
};
use ipc_core::cursor::Cursor;
use ipc_core::hub::Hub;
use ipc_core::local::Local;
use ipc_core::telemetry::{Hop, Kind};
use ipc_proto::pb::{Member, Msg};
use opentelemetry::KeyValue;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::RedisBusConfig;
use crate::coord::Coordination;
use crate::dedup::Keyed;
use crate::endpoint::Endpoint;
use crate::inbox::{Asked, Body, Exchange, RemoteRequest, outcome};
use crate::keys::Keys;
use crate::link::{Dedicated, Health, Link, Replication};
use crate::log::{self, Append, SharedOwnEntries, SharedPosition};
use crate::presence::{self, Directory, PresenceSignals};

/// Appends waiting for the writer; a full queue makes broadcasters wait (bounded
/// by the call timeout) rather than grow memory.
const APPEND_QUEUE: usize = 8192;

/// Why a Redis bus could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid Redis URL: {0}")]
    Url(#[from] redis::RedisError),
    #[error("{0}")]
    Invalid(String),
}

/// The bus of control-plane replicas sharing one Redis.
pub struct RedisBus {
    inner: Arc<Inner>,
    cancel: CancellationToken,
}

struct Inner {
    config: RedisBusConfig,
    keys: Keys,
    link: Arc<Link>,
    directory: Directory,
    signals: Arc<PresenceSignals>,
    appends: mpsc::Sender<Append>,
    /// Taken by `attach`, which starts the writer.
    appends_rx: Mutex<Option<mpsc::Receiver<Append>>>,
    /// Where the tail is. Read at connect, so that nothing appended after the
    /// server reported ready is missed; `None` = the log's end once connected.
    tail: SharedPosition,
    /// Entries this replica wrote, for its tail to hand on without decoding.
    own: SharedOwnEntries,
    local: OnceLock<Local>,
    exchange: OnceLock<Arc<Exchange>>,
    round_robin: AtomicUsize,
    coordination: Arc<Coordination>,
}

impl RedisBus {
    /// Builds the bus and tries to connect for at most `command_timeout`. If Redis
    /// is unreachable the bus still starts — unhealthy, refusing broadcasts — and
    /// keeps reconnecting in the background. Background work starts at `attach`.
    pub async fn connect(config: RedisBusConfig) -> Result<Self, ConfigError> {
        if config.prefix.is_empty() {
            return Err(ConfigError::Invalid("the Redis key prefix is empty".into()));
        }
        if config.presence_ttl.as_millis() < 30 {
            return Err(ConfigError::Invalid(format!(
                "presence TTL {:?} is too short (at least 30 ms)",
                config.presence_ttl
            )));
        }
        let endpoint = Arc::new(Endpoint::new(&config)?);
        // With Sentinel, learn where the primary is before the first connection.
        let _ = endpoint.ask_sentinels().await;
        let keys = Keys::new(&config.prefix);
        let health = Arc::new(Health::new());
        let replication = Replication::new(config.min_replicas, config.command_timeout);
        let link = Arc::new(Link::new(
            endpoint,
            config.command_timeout,
            replication,
            health,
        ));
        let mut tail_start = None;
        match tokio::time::timeout(config.command_timeout, link.connect()).await {
            Ok(Ok(())) => match link.get() {
                Ok(mut conn) => match log::current_position(&mut conn.conn, &keys).await {
                    Ok(position) => tail_start = Some(position),
                    Err(error) => tracing::warn!(%error, "could not read the log's position"),
                },
                Err(error) => tracing::warn!(%error, "Redis connection lost at start"),
            },
            // The endpoint logged why.
            Ok(Err(_)) => {}
            Err(_) => tracing::warn!("Redis did not answer at start; will keep trying"),
        }
        let (appends, appends_rx) = mpsc::channel(APPEND_QUEUE);
        Ok(Self {
            inner: Arc::new(Inner {
                keys,
                link,
                directory: Directory::new(),
                signals: Arc::new(PresenceSignals::new()),
                appends,
                appends_rx: Mutex::new(Some(appends_rx)),
                tail: Arc::new(Mutex::new(tail_start)),
                own: SharedOwnEntries::default(),
                local: OnceLock::new(),
                exchange: OnceLock::new(),
                round_robin: AtomicUsize::new(0),
                coordination: Arc::new(Coordination::new()),
                config,
            }),
            cancel: CancellationToken::new(),
        })
    }

    fn local(&self) -> Result<&Local, BusError> {
        self.inner
            .local
            .get()
            .ok_or_else(|| BusError::Internal("Redis bus used before attach".into()))
    }

    fn exchange(&self) -> Option<&Arc<Exchange>> {
        self.inner.exchange.get()
    }
}

fn unconfirmed() -> BusError {
    BusError::Unavailable(
        "Redis did not confirm the message in time; it was not acknowledged".into(),
    )
}

fn shutting_down() -> BusError {
    BusError::Unavailable("the Redis bus is shutting down".into())
}

/// The Redis hop of a broadcast: queued for the writer, then its XADD.
fn xadd_hop(msg: &Msg) -> Hop {
    Hop::child("redis XADD", Kind::Client, &msg.headers, || {
        vec![
            KeyValue::new("db.system", "redis"),
            KeyValue::new("ipc.msg_id", msg.id.clone()),
        ]
    })
}

/// Builds the append in its place in the writer's queue, and the wait for
/// Redis's answer (until `deadline`). The message goes into its `Arc` at once:
/// the writer sets its cursor there and answers with it, without moving it.
fn queue(
    place: mpsc::Permit<'_, Append>,
    mut msg: Msg,
    key: Option<IdempotencyKey>,
    mut hop: Hop,
    deadline: Instant,
) -> PendingAppend {
    msg.cursor.clear();
    let (done, stored) = oneshot::channel();
    let keyed = key.map(|key| {
        Box::new(Keyed {
            scoped: key.scoped,
            window_ms: key.window.as_millis() as u64,
            msg_id: msg.id.clone(),
            channel: msg.channel.clone(),
        })
    });
    let payload = msg.encode_length_delimited_to_vec();
    place.send(Append {
        msg: Arc::new(msg),
        payload,
        keyed,
        done,
    });
    PendingAppend::waiting(async move {
        let appended = tokio::time::timeout_at(deadline.into(), stored)
            .await
            .map_err(|_| unconfirmed())
            .and_then(|r| r.map_err(|_| shutting_down()))
            .and_then(|r| r)
            .inspect_err(|error| hop.fail(|| error.to_string()))?;
        drop(hop);
        Ok(appended)
    })
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn attach(&self, local: Local) {
        if self.inner.local.set(local.clone()).is_err() {
            return;
        }
        let inner = &self.inner;
        let exchange = Arc::new(Exchange::new(
            inner.link.clone(),
            inner.keys.clone(),
            local.clone(),
        ));
        let _ = inner.exchange.set(exchange.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!("Redis bus attached outside a Tokio runtime: it will not run");
            return;
        };
        let cancel = &self.cancel;
        runtime.spawn(inner.link.endpoint().clone().follow(cancel.clone()));
        runtime.spawn(inner.link.clone().supervise(cancel.clone()));
        if let Some(pending) = inner.appends_rx.lock().take() {
            runtime.spawn(log::run_writer(
                Dedicated::new(inner.link.clone()),
                inner.keys.clone(),
                inner.config.retention.max(1),
                pending,
                inner.own.clone(),
                cancel.clone(),
            ));
        }
        runtime.spawn(log::run_tail(
            inner.link.clone(),
            inner.keys.clone(),
            local.clone(),
            inner.tail.clone(),
            inner.own.clone(),
            inner.config.command_timeout,
            cancel.clone(),
        ));
        runtime.spawn(presence::run_presence(
            inner.link.clone(),
            inner.keys.clone(),
            local,
            inner.signals.clone(),
            inner.config.presence_ttl,
            cancel.clone(),
        ));
        runtime.spawn(exchange.listen(cancel.clone()));
        runtime.spawn(inner.coordination.clone().listen(
            inner.link.clone(),
            inner.keys.clone(),
            cancel.clone(),
        ));
    }

    /// Queues the append for the writer (its place in the order) and returns the
    /// wait for Redis's answer; both bounded by the command timeout. Only when the
    /// queue is full: [`RedisBus::try_submit`] queues the others without a future.
    async fn submit(
        &self,
        msg: Msg,
        key: Option<IdempotencyKey>,
    ) -> Result<PendingAppend, BusError> {
        let deadline = Instant::now() + self.inner.config.command_timeout;
        // Refuse at once while Redis is known to be unreachable.
        self.inner.link.get()?;
        let hop = xadd_hop(&msg);
        let place = tokio::time::timeout_at(deadline.into(), self.inner.appends.reserve())
            .await
            .map_err(|_| unconfirmed())?
            .map_err(|_| shutting_down())?;
        Ok(queue(place, msg, key, hop, deadline))
    }

    /// [`RedisBus::submit`] without a future while the writer's queue has room:
    /// the async fn moved the ~300-byte message into its state and on into the
    /// queue, a few copies per message of replica a's profile.
    fn try_submit(&self, msg: Msg, key: Option<IdempotencyKey>) -> TrySubmit {
        let deadline = Instant::now() + self.inner.config.command_timeout;
        if let Err(error) = self.inner.link.get() {
            return TrySubmit::Done(Err(error));
        }
        match self.inner.appends.try_reserve() {
            Ok(place) => {
                let hop = xadd_hop(&msg);
                TrySubmit::Done(Ok(queue(place, msg, key, hop, deadline)))
            }
            Err(mpsc::error::TrySendError::Full(())) => TrySubmit::WouldWait(msg, key),
            Err(mpsc::error::TrySendError::Closed(())) => TrySubmit::Done(Err(shutting_down())),
        }
    }

    async fn replay(&self, after: &Cursor, _patterns: &[Pattern]) -> Result<Replay, BusError> {
        log::replay(&self.inner.link, &self.inner.keys, after).await
    }

    /// Where the tail stands. Unknown only until this replica first reached Redis:
    /// a subscription then is refused, because the tail would start wherever the
    /// log's end is when it connects, and a subscriber registered before would
    /// silently miss what other replicas appended in between.
    async fn head(&self) -> Result<Option<Cursor>, BusError> {
        match *self.inner.tail.lock() {
            Some(p) => Ok(Some(p.last.cursor(p.epoch))),
            None => Err(BusError::Unavailable(
                "this replica has not reached Redis since it started, so it cannot tell \
                 where the log stands; subscribe again shortly or to another replica"
                    .into(),
            )),
        }
    }

    /// Waits (bounded) until the new subscriber is in this replica's presence in
    /// Redis, so that a request sent through any replica after `ipc:subscribed`
    /// finds it. While Redis is unreachable it does not wait.
    async fn cover(&self, _patterns: &[Pattern]) {
        if self.inner.link.get().is_err() {
            return;
        }
        if let Err(error) = self
            .inner
            .signals
            .synced(self.inner.config.command_timeout)
            .await
        {
            tracing::warn!(%error, "subscriber not yet visible to the fleet");
        }
    }

    async fn request(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        let (Ok(local), Some(exchange)) = (self.local(), self.exchange()) else {
            return Err(RequestError::Unavailable(
                "Redis bus used before attach".into(),
            ));
        };
        let unavailable = |e: BusError| RequestError::Unavailable(e.to_string());
        let route = self.inner.directory.route(
            &self.inner.link,
            &self.inner.keys,
            local.node_name(),
            target,
        );
        let mut nodes = match tokio::time::timeout_at(deadline.into(), route).await {
            Ok(nodes) => nodes.map_err(unavailable)?,
            Err(_) => return Err(RequestError::DeadlineExceeded(target.to_string())),
        };
        if nodes.is_empty() {
            return Err(RequestError::NoResponders(target.to_string()));
        }
        // Spread requests for a role over the replicas that have its subscribers.
        let start = self.inner.round_robin.fetch_add(1, Ordering::Relaxed) % nodes.len();
        nodes.rotate_left(start);
        for node in nodes {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Err(RequestError::DeadlineExceeded(target.to_string()));
            };
            let mut msg = request.clone();
            let mut hop = Hop::child("redis inbox request", Kind::Client, &msg.headers, || {
                vec![
                    KeyValue::new("ipc.node", local.node_name().to_string()),
                    KeyValue::new("ipc.replica", node.clone()),
                    KeyValue::new("ipc.target", target.to_string()),
                    KeyValue::new("db.system", "redis"),
                ]
            });
            hop.stamp(&mut msg.headers);
            let body = Body::Request(RemoteRequest {
                target: target.to_string(),
                msg: Some(msg),
                timeout_ms: left.as_millis() as u64,
            });
            let asked = exchange.ask(&node, body, deadline).await;
            if let Ok(answer) = &asked {
                hop.set(|| vec![KeyValue::new("ipc.answer", answer.describe())]);
            }
            match asked.map_err(unavailable)? {
                Asked::Answered(Body::Response(response)) => match response.outcome {
                    outcome::OK => return Ok(response.reply.unwrap_or_default()),
                    // Its subscriber left meanwhile: another replica may have one.
                    outcome::NO_RESPONDERS => continue,
                    outcome::DEADLINE => {
                        return Err(RequestError::DeadlineExceeded(target.to_string()));
                    }
                    _ => return Err(RequestError::Unavailable(response.detail)),
                },
                // A replica that died and whose presence has not expired yet.
                Asked::NoListener => continue,
                Asked::TimedOut => return Err(RequestError::DeadlineExceeded(target.to_string())),
                Asked::Answered(other) => {
                    return Err(RequestError::Unavailable(format!(
                        "replica {node} answered a request with {other:?}"
                    )));
                }
            }
        }
        Err(RequestError::NoResponders(target.to_string()))
    }

    async fn forward_reply(&self, reply: Msg) -> Result<(), ReplyError> {
        let Some(exchange) = self.exchange() else {
            return Err(ReplyError::Unavailable(
                "Redis bus used before attach".into(),
            ));
        };
        let reply_to = reply.reply_to.clone();
        let Some(node) = Hub::reply_to_node(&reply_to) else {
            return Err(ReplyError::NotFound(reply_to));
        };
        let deadline = Instant::now() + self.inner.config.command_timeout;
        let mut reply = reply;
        let hop = Hop::child("redis inbox reply", Kind::Client, &reply.headers, || {
            vec![
                KeyValue::new("ipc.replica", node.to_string()),
                KeyValue::new("db.system", "redis"),
            ]
        });
        hop.stamp(&mut reply.headers);
        match exchange.ask(node, Body::Reply(reply), deadline).await {
            Ok(Asked::Answered(Body::ReplyAck(ack))) if ack.outcome == outcome::OK => Ok(()),
            // The request is gone, or so is the replica that delivered it.
            Ok(Asked::Answered(Body::ReplyAck(_)) | Asked::NoListener) => {
                Err(ReplyError::NotFound(reply_to))
            }
            Ok(Asked::TimedOut) => Err(ReplyError::Unavailable(format!(
                "replica {node} did not confirm the reply in time"
            ))),
            Ok(Asked::Answered(other)) => Err(ReplyError::Unavailable(format!(
                "replica {node} answered a reply with {other:?}"
            ))),
            Err(e) => Err(ReplyError::Unavailable(e.to_string())),
        }
    }

    async fn members(&self, local: Vec<Member>) -> Result<Vec<Member>, BusError> {
        let me = self.local()?.node_name().to_string();
        let mut all = self
            .inner
            .directory
            .members(&self.inner.link, &self.inner.keys)
            .await?;
        // This replica's own members, and those its subscribers relay, are fresher
        // locally than in Redis.
        let here: std::collections::HashSet<(&str, &str)> = local
            .iter()
            .map(|m| (m.id.as_str(), m.node.as_str()))
            .collect();
        all.retain(|m| m.node != me && !here.contains(&(m.id.as_str(), m.node.as_str())));
        all.extend(local);
        all.sort_by(|a, b| (&a.id, &a.node).cmp(&(&b.id, &b.node)));
        Ok(all)
    }

    async fn replicas(&self) -> Result<Vec<Replica>, BusError> {
        self.inner
            .directory
            .replicas(
                &self.inner.link,
                &self.inner.keys,
                self.inner.config.presence_ttl,
            )
            .await
    }

    async fn lock(&self, lock: LockSpec, _in_node: &MemoryCoord) -> Result<LockAnswer, BusError> {
        let inner = &self.inner;
        inner
            .coordination
            .lock(&inner.link, &inner.keys, &lock)
            .await
    }

    async fn unlock(&self, unlock: UnlockSpec, _in_node: &MemoryCoord) -> Result<bool, BusError> {
        let inner = &self.inner;
        inner
            .coordination
            .unlock(&inner.link, &inner.keys, &unlock)
            .await
    }

    async fn limit(
        &self,
        name: &str,
        limit: LimitSpec,
        _in_node: &MemoryCoord,
    ) -> Result<LimitAnswer, BusError> {
        let inner = &self.inner;
        inner
            .coordination
            .limit(&inner.link, &inner.keys, name, &limit)
            .await
    }

    async fn claim_operation(
        &self,
        claim: LockSpec,
        in_node: &MemoryCoord,
    ) -> Result<LockAnswer, BusError> {
        // Fleet-wide, like the records: a claim is a Redis lease.
        Bus::lock(self, claim, in_node).await
    }

    async fn release_operation(
        &self,
        claim: UnlockSpec,
        in_node: &MemoryCoord,
    ) -> Result<bool, BusError> {
        Bus::unlock(self, claim, in_node).await
    }

    async fn in_use(&self, _in_node: &MemoryCoord, max: usize) -> Result<InUse, BusError> {
        let inner = &self.inner;
        inner
            .coordination
            .in_use(&inner.link, &inner.keys, max)
            .await
    }

    async fn store_operation(
        &self,
        key: &str,
        record: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<(), BusError> {
        let key = format!("{}:op:{key}", self.inner.keys.prefix());
        let ttl_ms = ttl.as_millis() as u64;
        self.inner
            .link
            .call_replicated(|mut conn| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(record)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    async fn load_operation(&self, key: &str) -> Result<Option<Vec<u8>>, BusError> {
        let key = format!("{}:op:{key}", self.inner.keys.prefix());
        self.inner
            .link
            .call(|mut conn| async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
            })
            .await
    }

    fn subscribers_changed(&self) {
        self.inner.signals.changed();
    }

    fn write_metrics(&self, out: &mut ipc_core::metrics::Exposition) {
        let link = &self.inner.link;
        link.metrics().write(out, link.metrics_snapshot());
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.inner.link.health().subscribe()
    }

    async fn shutdown(&self) {
        // Stop heartbeats first, so that nothing writes the presence back.
        self.cancel.cancel();
        if let Ok(local) = self.local() {
            let node = local.node_name().to_string();
            if let Err(error) = presence::withdraw(&self.inner.link, &self.inner.keys, &node).await
            {
                tracing::warn!(%error, "could not remove this replica's presence from Redis");
            }
        }
    }
}
