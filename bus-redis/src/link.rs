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
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

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
/// that a failure on an old connection does not drop a newer one.
#[derive(Clone)]
pub(crate) struct Conn {
    pub generation: u64,
    pub conn: MultiplexedConnection,
}

pub(crate) struct Link {
    client: redis::Client,
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
}

impl Link {
    pub fn new(client: redis::Client, timeout: Duration, health: Arc<Health>) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        Self {
            client,
            config,
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

    pub fn client(&self) -> &redis::Client {
        &self.client
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
        self.current
            .lock()
            .clone()
            .ok_or_else(|| BusError::Unavailable("Redis is unreachable; reconnecting".into()))
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
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock() = Some(Conn { generation, conn });
        // Presence is not known to be in this Redis until written on it.
        self.health.set(Part::Presence, false);
        self.health.set(Part::Link, true);
        self.connected.send_replace(generation);
        tracing::info!(generation, "connected to Redis");
        Ok(())
    }

    /// Keeps the link up until cancelled: reconnects with backoff, pings.
    pub async fn supervise(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let current = self.current.lock().clone();
            let wait = match current {
                None => match self.connect().await {
                    Ok(()) => {
                        backoff.reset();
                        PING_INTERVAL
                    }
                    Err(error) => {
                        tracing::debug!(%error, "Redis still unreachable");
                        backoff.next_delay()
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
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.lost.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
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
        match tokio::time::timeout(self.timeout, call(conn.conn.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                self.failed(&conn, &error);
                Err(unavailable(&error))
            }
            Err(_) => {
                let error = RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "Redis did not answer in time",
                ));
                self.failed(&conn, &error);
                Err(unavailable(&error))
            }
        }
    }
}

/// Whether the connection must be replaced after this error.
pub(crate) fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
}

pub(crate) fn unavailable(error: &RedisError) -> BusError {
    BusError::Unavailable(format!("Redis: {error}"))
}

/// Jittered exponential backoff between [`BACKOFF_MIN`] and [`BACKOFF_MAX`].
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let base = BACKOFF_MIN
            .saturating_mul(1 << self.attempt.min(8))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        // Up to half again, so replicas that lost Redis together do not retry in step.
        base + base.mul_f64(rand::random::<f64>() * 0.5)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN.mul_f64(1.5));
        let later: Vec<Duration> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= BACKOFF_MAX.mul_f64(1.5)));
        assert!(*later.last().unwrap() >= BACKOFF_MAX);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_MIN.mul_f64(1.5));
    }
}
