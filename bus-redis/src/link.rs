//! The command connection shared by the writer, presence, replay and routing, with
//! reconnection and the bus's health.
//!
//! Calls never wait for a reconnect: while the link is down they fail at once with
//! [`BusError::Unavailable`], so a broadcast is refused quickly rather than hanging.
//! A supervisor task reconnects with jittered exponential backoff and pings the
//! server.
//!
//! [`Health`] is the bus's health: `true` only while every part works — this link
//! (its last ping answered), the log tail, the inbox, and presence written on the
//! current connection — so SERVING means broadcasts, deliveries, requests and
//! members all work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipc_core::bus::BusError;
use ipc_proto::backoff::{Attempts, Backoff, Jitter};
use parking_lot::Mutex;
use redis::aio::{MultiplexedConnection, PubSub};
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::endpoint::Endpoint;
use crate::metrics::RedisMetrics;

/// How often a healthy link is pinged.
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// First and largest wait between reconnection attempts.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The parts the bus's health is made of.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    Link = 0,
    Tail = 1,
    Inbox = 2,
    Presence = 3,
}

/// `true` while every [`Part`] reports itself working.
pub(crate) struct Health {
    parts: Mutex<[bool; 4]>,
    all: watch::Sender<bool>,
}

impl Health {
    pub fn new() -> Self {
        Self {
            parts: Mutex::new([false; 4]),
            all: watch::Sender::new(false),
        }
    }

    pub fn set(&self, part: Part, ok: bool) {
        let mut parts = self.parts.lock();
        if parts[part as usize] != ok {
            tracing::debug!(?part, ok, "bus health part changed");
        }
        parts[part as usize] = ok;
        let all = parts.iter().all(|p| *p);
        self.all
            .send_if_modified(|h| std::mem::replace(h, all) != all);
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.all.subscribe()
    }
}

/// A connection handed out by the link, tagged with the generation it belongs to so
/// that a failure on an old connection does not drop a newer one, and with the
/// primary it reaches, so that it is replaced when the primary moves.
#[derive(Clone)]
pub(crate) struct Conn {
    pub generation: u64,
    pub primary: u64,
    pub conn: MultiplexedConnection,
}

pub(crate) struct Link {
    endpoint: Arc<Endpoint>,
    config: AsyncConnectionConfig,
    timeout: Duration,
    current: Mutex<Option<Conn>>,
    generation: AtomicU64,
    lost: Notify,
    health: Arc<Health>,
    /// The generation of the newest connection: presence is rewritten on each.
    connected: watch::Sender<u64>,
    /// The bus's metrics, counted wherever the link is used.
    metrics: Arc<RedisMetrics>,
    replication: Replication,
}

impl Link {
    pub fn new(
        endpoint: Arc<Endpoint>,
        timeout: Duration,
        replication: Replication,
        health: Arc<Health>,
    ) -> Self {
        Self {
            endpoint,
            replication,
            config: crate::endpoint::connect_config(timeout),
            timeout,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            lost: Notify::new(),
            health,
            connected: watch::Sender::new(0),
            metrics: Arc::default(),
        }
    }

    pub fn metrics(&self) -> &Arc<RedisMetrics> {
        &self.metrics
    }

    /// What the scrape reads of the link itself.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        crate::metrics::Snapshot {
            connected: self.current.lock().is_some(),
            command_reconnects: self.generation.load(Ordering::Relaxed).saturating_sub(1),
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// A connection of its own to the current primary (the tail's, the writer's),
    /// with `config`; returns it with the primary's generation.
    pub async fn open(
        &self,
        config: &AsyncConnectionConfig,
    ) -> Result<(MultiplexedConnection, u64), RedisError> {
        let primary = self.endpoint.current()?;
        let opened = primary
            .client
            .get_multiplexed_async_connection_with_config(config)
            .await;
        self.endpoint.report(opened.as_ref().err());
        Ok((opened?, primary.generation))
    }

    /// A subscriber connection to the current primary subscribed to `channel`,
    /// with the primary's generation.
    pub async fn subscribe(&self, channel: &str) -> Result<(PubSub, u64), RedisError> {
        let primary = self.endpoint.current()?;
        let subscribed = async {
            let mut pubsub = primary.client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok(pubsub)
        }
        .await;
        self.endpoint.report(subscribed.as_ref().err());
        Ok((subscribed?, primary.generation))
    }

    /// The bound on one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Changes to the generation of the newest connection.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connected.subscribe()
    }

    /// The current connection, or `Unavailable` at once while reconnecting.
    pub fn get(&self) -> Result<Conn, BusError> {
        self.current.lock().clone().ok_or_else(|| {
            BusError::Unavailable(match self.endpoint.trouble() {
                Some(trouble) => format!("Redis is unreachable ({trouble}); reconnecting"),
                None => "Redis is unreachable; reconnecting".into(),
            })
        })
    }

    /// Records a failed call: a broken connection is dropped (the supervisor
    /// reconnects) and health turns false at once.
    pub fn failed(&self, conn: &Conn, error: &RedisError) {
        if !is_connection_error(error) {
            return;
        }
        let mut current = self.current.lock();
        if current
            .as_ref()
            .is_some_and(|c| c.generation == conn.generation)
        {
            tracing::warn!(%error, "Redis connection lost");
            self.endpoint.suspect();
            *current = None;
            drop(current);
            self.health.set(Part::Link, false);
            self.lost.notify_one();
        }
    }

    /// Asks the supervisor to check the connection now: another connection to the
    /// same Redis just broke, so this one probably did too, and calls should learn
    /// it from a ping rather than from a failed broadcast.
    pub fn probe(&self) {
        self.lost.notify_one();
    }

    /// One connection attempt; on success it becomes the current connection.
    pub async fn connect(&self) -> Result<(), RedisError> {
        let (conn, primary) = self.open(&self.config).await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock() = Some(Conn {
            generation,
            primary,
            conn,
        });
        // Presence is not known to be in this Redis until written on it.
        self.health.set(Part::Presence, false);
        self.health.set(Part::Link, true);
        self.connected.send_replace(generation);
        let addr = self.endpoint.current().map(|p| p.addr).unwrap_or_default();
        tracing::info!(generation, primary = %addr, "connected to Redis");
        Ok(())
    }

    /// Keeps the link up until cancelled: reconnects with backoff, pings.
    pub async fn supervise(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = reconnect_backoff();
        loop {
            let current = self.current.lock().clone();
            let primary = current.as_ref().map(|c| c.primary);
            let tried = self.endpoint.generation();
            let wait = match current {
                None => match self.connect().await {
                    Ok(()) => {
                        backoff.reset();
                        PING_INTERVAL
                    }
                    Err(error) => {
                        tracing::debug!(%error, "Redis still unreachable");
                        backoff.next_pause()
                    }
                },
                Some(mut conn) => {
                    let ping = redis::cmd("PING");
                    let ping = ping.query_async::<()>(&mut conn.conn);
                    match tokio::time::timeout(self.timeout, ping).await {
                        Ok(Ok(())) => self.health.set(Part::Link, true),
                        Ok(Err(error)) => {
                            // Also server-side refusals (e.g. LOADING after a restart).
                            self.health.set(Part::Link, false);
                            self.failed(&conn, &error);
                        }
                        Err(_) => {
                            let error = RedisError::from(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "PING timed out",
                            ));
                            self.failed(&conn, &error);
                        }
                    }
                    PING_INTERVAL
                }
            };
            // Connected: the primary moving replaces the connection. Not connected:
            // a new primary is tried at once rather than after the backoff.
            let moved = async {
                match primary {
                    Some(primary) => {
                        self.endpoint.moved(primary).await;
                        true
                    }
                    None => {
                        self.endpoint.changed_from(tried).await;
                        false
                    }
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.lost.notified() => {}
                () = tokio::time::sleep(wait) => {}
                connected = moved => if connected {
                    self.drop_connection("the Redis primary moved");
                },
            }
        }
    }

    /// Forgets the current connection (the supervisor opens another at once).
    fn drop_connection(&self, why: &str) {
        if self.current.lock().take().is_some() {
            tracing::info!(why, "Redis connection replaced");
            self.health.set(Part::Link, false);
        }
    }

    /// Runs `call` on the current connection within the call timeout, recording a
    /// broken connection.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, BusError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let conn = self.get()?;
        bounded(self.timeout, call(conn.conn.clone()))
            .await
            .map_err(|error| {
                self.failed(&conn, &error);
                unavailable(&error)
            })
    }

    /// [`Link::call`] for a write that must survive a failover: with
    /// `--redis-min-replicas N` it is acknowledged only once `WAIT` says N Redis
    /// replicas have it (`WAIT` counts the writes of this connection so far).
    pub async fn call_replicated<T, F, Fut>(&self, call: F) -> Result<T, BusError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let replication = self.replication;
        if replication.min_replicas == 0 {
            return self.call(call).await;
        }
        let (value, confirmed) = self
            .call(|conn| async move {
                let mut waiter = conn.clone();
                let value = call(conn).await?;
                let confirmed = replication.wait().query_async(&mut waiter).await?;
                Ok((value, confirmed))
            })
            .await?;
        replication.check(confirmed)?;
        Ok(value)
    }

    /// How writes are confirmed.
    pub fn replication(&self) -> Replication {
        self.replication
    }
}

/// How many Redis replicas must confirm a write before it is acknowledged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Replication {
    pub min_replicas: u32,
    /// `WAIT`'s own timeout: half the call's, so that its answer still comes
    /// within the call's bound.
    pub wait_ms: u64,
}

impl Replication {
    pub fn new(min_replicas: u32, call_timeout: Duration) -> Self {
        Self {
            min_replicas,
            wait_ms: (call_timeout.as_millis() as u64 / 2).max(1),
        }
    }

    /// `WAIT N timeout`.
    pub fn wait(&self) -> redis::Cmd {
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.min_replicas).arg(self.wait_ms);
        wait
    }

    /// `Unavailable` unless `confirmed` replicas are enough. The write is on the
    /// primary, so a retry without an idempotency key may store it twice.
    pub fn check(&self, confirmed: i64) -> Result<(), BusError> {
        if confirmed >= i64::from(self.min_replicas) {
            return Ok(());
        }
        Err(BusError::Unavailable(format!(
            "not acknowledged: only {confirmed} of the {} Redis replicas required \
             (--redis-min-replicas) confirmed the write within {} ms, so a failover could \
             lose it; retry (with an idempotency key the retry is never stored twice)",
            self.min_replicas, self.wait_ms
        )))
    }
}

/// A connection of its own to the current primary, opened on first use and again
/// once it broke, the primary moved, or the command link had to reconnect (so
/// this one probably broke too: SERVING then means it works). The writer's: `WAIT`
/// counts the writes of one connection, and blocks that connection while it waits.
pub(crate) struct Dedicated {
    link: Arc<Link>,
    config: AsyncConnectionConfig,
    /// The connection, and the command link's connection it was opened under.
    current: tokio::sync::Mutex<Option<(Conn, u64)>>,
    /// Connections this one opened, numbering them: the command link's
    /// generation counts only its own (`ipc_redis_reconnects_total{connection="command"}`).
    opened: AtomicU64,
}

impl Dedicated {
    pub fn new(link: Arc<Link>) -> Self {
        Self {
            config: link.config.clone(),
            link,
            current: tokio::sync::Mutex::new(None),
            opened: AtomicU64::new(0),
        }
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// Runs `call` on this connection within the call timeout. Callers that queue
    /// behind one another are served in order (the lock is fair), so calls reach
    /// Redis in the order they were made.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, BusError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let conn = {
            let mut current = self.current.lock().await;
            let primary = self.link.endpoint.current().map(|p| p.generation).ok();
            let under = *self.link.connected.borrow();
            match current.as_ref() {
                Some((conn, opened_under))
                    if Some(conn.primary) == primary && *opened_under == under =>
                {
                    conn.clone()
                }
                _ => {
                    let opened = bounded(self.link.timeout, self.link.open(&self.config))
                        .await
                        .map_err(|error| unavailable(&error))?;
                    let (conn, primary) = opened;
                    let conn = Conn {
                        generation: self.opened.fetch_add(1, Ordering::Relaxed) + 1,
                        primary,
                        conn,
                    };
                    *current = Some((conn.clone(), under));
                    conn
                }
            }
        };
        match bounded(self.link.timeout, call(conn.conn.clone())).await {
            Ok(value) => Ok(value),
            Err(error) => {
                if is_connection_error(&error) {
                    let mut current = self.current.lock().await;
                    if current
                        .as_ref()
                        .is_some_and(|(c, _)| c.generation == conn.generation)
                    {
                        *current = None;
                    }
                    self.link.probe();
                }
                Err(unavailable(&error))
            }
        }
    }
}

/// `call` within `timeout`; running out of time is a timeout error.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "Redis did not answer in time",
        ))),
    }
}

/// Whether the connection must be replaced after this error: it broke, or it
/// reaches a server that is no longer the primary (demoted in a failover).
pub(crate) fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || error.code() == Some("READONLY")
}

pub(crate) fn unavailable(error: &RedisError) -> BusError {
    BusError::Unavailable(format!("Redis: {error}"))
}

/// The pauses between reconnection attempts of every Redis connection: from
/// [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`], each up to half again, so that
/// replicas that lost Redis together do not retry in step.
pub(crate) fn reconnect_backoff() -> Attempts {
    Backoff::new(BACKOFF_MIN, BACKOFF_MAX)
        .with_jitter(Jitter::UpToHalfMore)
        .attempts()
}
