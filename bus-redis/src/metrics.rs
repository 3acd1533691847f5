//! Metrics of the Redis bus, added to the replica's `/metrics`: how appends are
//! batched and how long their `XADD` takes, how far the tail is behind the log, and
//! how often the connections to Redis were lost.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use ipc_core::metrics::{Exposition, Histogram, Kind};

/// Counted by the writer, the tail and the inbox; read at scrape time.
#[derive(Debug)]
pub(crate) struct RedisMetrics {
    /// Broadcasts per pipeline the writer sent.
    pub append_batch: Histogram,
    /// Round trip of one pipeline of `XADD`s.
    pub xadd_latency: Histogram,
    /// Pipelines of appends that failed (every broadcast in it was refused).
    pub append_failures: AtomicU64,
    /// Milliseconds between an entry's id (its time of `XADD`) and its dispatch to
    /// the hub, for the newest entry the tail dispatched.
    pub tail_lag_ms: AtomicI64,
    /// Times the tail's connection was opened again after it was lost.
    pub tail_reconnects: AtomicU64,
    /// Times the inbox subscription was opened again after it was lost.
    pub inbox_reconnects: AtomicU64,
    /// Times the log was found lost (Redis lost its data; a new epoch began).
    pub log_losses: AtomicU64,
}

impl Default for RedisMetrics {
    fn default() -> Self {
        Self {
            append_batch: Histogram::batch_sizes(),
            xadd_latency: Histogram::latency(),
            append_failures: AtomicU64::new(0),
            tail_lag_ms: AtomicI64::new(0),
            tail_reconnects: AtomicU64::new(0),
            inbox_reconnects: AtomicU64::new(0),
            log_losses: AtomicU64::new(0),
        }
    }
}

/// What the scrape reads from elsewhere in the bus.
pub(crate) struct Snapshot {
    /// Whether the command connection is up now.
    pub connected: bool,
    /// Connections the command link opened after its first one.
    pub command_reconnects: u64,
}

impl RedisMetrics {
    pub fn write(&self, out: &mut Exposition, now: Snapshot) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.gauge(
            "ipc_redis_connected",
            "1 while this replica's command connection to Redis is up (broadcasts are refused while it is 0).",
            u8::from(now.connected),
        );
        out.family(
            "ipc_redis_reconnects_total",
            Kind::Counter,
            "Connections of this replica to Redis opened again after one was lost, by connection (command, tail, inbox).",
        );
        for (connection, value) in [
            ("command", now.command_reconnects),
            ("tail", get(&self.tail_reconnects)),
            ("inbox", get(&self.inbox_reconnects)),
        ] {
            out.sample(
                "ipc_redis_reconnects_total",
                &[("connection", connection)],
                value,
            );
        }
        out.family(
            "ipc_redis_append_batch_size",
            Kind::Histogram,
            "Broadcasts this replica wrote to the Redis log in one pipeline of XADDs.",
        );
        out.histogram("ipc_redis_append_batch_size", &[], &self.append_batch);
        out.family(
            "ipc_redis_xadd_duration_seconds",
            Kind::Histogram,
            "Round trip of one pipeline of XADDs from this replica to Redis (a broadcast is acknowledged after it).",
        );
        out.histogram("ipc_redis_xadd_duration_seconds", &[], &self.xadd_latency);
        out.counter(
            "ipc_redis_append_failures_total",
            "Pipelines of XADDs from this replica that failed; their broadcasts were refused with UNAVAILABLE.",
            get(&self.append_failures),
        );
        out.gauge(
            "ipc_redis_tail_lag_seconds",
            "For the newest log entry this replica's tail delivered: seconds between its XADD and its delivery to local subscribers.",
            self.tail_lag_ms.load(Ordering::Relaxed).max(0) as f64 / 1000.0,
        );
        out.counter(
            "ipc_redis_log_losses_total",
            "Times this replica found the Redis log lost (Redis restarted without its data); subscribers were sent ipc:gap.",
            get(&self.log_losses),
        );
    }
}
