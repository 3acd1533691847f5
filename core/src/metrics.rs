//! Counters of a node, rendered in the Prometheus text format.
//!
//! Plain atomics: the fan-out path adds once per message, not per delivery, and
//! nothing here allocates or locks on that path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the SendMsg latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0,
];

/// How a SendMsg ended.
#[derive(Debug, Clone, Copy)]
pub enum SendOutcome {
    Replied,
    NoResponders,
    DeadlineExceeded,
    Failed,
}

/// Why a request was refused by a limit or by authorization: the `reason` label of
/// `ipc_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A message above `--max-msg-bytes`.
    MsgBytes,
    /// More headers (or labels) than `--max-headers`.
    Headers,
    /// Headers (or labels) larger in total than `--max-header-bytes`.
    HeaderBytes,
    /// More channels in one subscription than `--max-channels`.
    Channels,
    /// More live subscriptions for one identity than `--max-subscriptions-per-identity`.
    Subscriptions,
    /// More live subscriber streams on the node than `--max-streams`.
    Streams,
    /// More requests per second from one identity than `--rate-limit`.
    Rate,
    /// A `timeout_ms` above `--max-timeout-ms`.
    Timeout,
    /// No credentials, or wrong ones.
    Unauthenticated,
    /// Authenticated, but the token's grants do not cover the request.
    PermissionDenied,
    /// A connection over `--max-connections`.
    Connections,
    /// A connection over `--max-connections-per-peer`.
    ConnectionsPerPeer,
    /// A request body not received within `--body-timeout-ms`.
    BodyTimeout,
    /// Request bodies being received over `--max-request-buffer-bytes`.
    RequestBuffer,
}

impl Refusal {
    pub const ALL: [Refusal; 14] = [
        Refusal::MsgBytes,
        Refusal::Headers,
        Refusal::HeaderBytes,
        Refusal::Channels,
        Refusal::Subscriptions,
        Refusal::Streams,
        Refusal::Rate,
        Refusal::Timeout,
        Refusal::Unauthenticated,
        Refusal::PermissionDenied,
        Refusal::Connections,
        Refusal::ConnectionsPerPeer,
        Refusal::BodyTimeout,
        Refusal::RequestBuffer,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MsgBytes => "msg_bytes",
            Refusal::Headers => "headers",
            Refusal::HeaderBytes => "header_bytes",
            Refusal::Channels => "channels",
            Refusal::Subscriptions => "subscriptions_per_identity",
            Refusal::Streams => "streams",
            Refusal::Rate => "rate",
            Refusal::Timeout => "timeout",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::PermissionDenied => "permission_denied",
            Refusal::Connections => "connections",
            Refusal::ConnectionsPerPeer => "connections_per_peer",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::RequestBuffer => "request_buffer",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub subscribers: AtomicI64,
    pub slow_cutoffs: AtomicU64,
    pub rejected: AtomicU64,
    send_replied: AtomicU64,
    send_no_responders: AtomicU64,
    send_deadline: AtomicU64,
    send_failed: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    /// Tokens-file reloads that took effect.
    pub token_reloads: AtomicU64,
    /// Tokens-file reloads refused (the previous file stays in force).
    pub token_reload_failures: AtomicU64,
    /// Open client connections (TCP listeners guarded by [`crate::connections`]).
    pub connections: AtomicI64,
    /// Connections closed because they were idle past their deadline.
    pub idle_closes: AtomicU64,
    /// Streams ended because their token was removed or changed (SIGHUP).
    pub revoked_streams: AtomicU64,
    /// Lock calls on this node waiting for a lease now.
    pub lock_waiters: AtomicI64,
}

impl Metrics {
    /// Counts a request refused for `reason`.
    pub fn refuse(&self, reason: Refusal) {
        self.refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests were refused for `reason`.
    pub fn refusals(&self, reason: Refusal) -> u64 {
        self.refusals[reason as usize].load(Ordering::Relaxed)
    }

    pub fn record_send(&self, outcome: SendOutcome, elapsed: Duration) {
        let counter = match outcome {
            SendOutcome::Replied => &self.send_replied,
            SendOutcome::NoResponders => &self.send_no_responders,
            SendOutcome::DeadlineExceeded => &self.send_deadline,
            SendOutcome::Failed => &self.send_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "ipc_messages_accepted_total",
            "Broadcasts stored in the bus log by this node.",
            get(&self.accepted),
        );
        counter(
            "ipc_messages_delivered_total",
            "Messages handed to local subscriber streams.",
            get(&self.delivered),
        );
        counter(
            "ipc_slow_subscriber_cutoffs_total",
            "Subscribers cut off because their queue was full.",
            get(&self.slow_cutoffs),
        );
        counter(
            "ipc_requests_rejected_total",
            "Requests refused for bad input or limits.",
            get(&self.rejected),
        );
        counter(
            "ipc_idle_connections_closed_total",
            "Connections closed with no call in progress past --handshake-timeout-ms or --idle-timeout-ms.",
            get(&self.idle_closes),
        );
        counter(
            "ipc_revoked_streams_total",
            "Streams ended because their token was removed or changed in the tokens file.",
            get(&self.revoked_streams),
        );
        let _ = writeln!(
            out,
            "# HELP ipc_refusals_total Requests refused by a limit or by authorization, by reason.\n# TYPE ipc_refusals_total counter"
        );
        for reason in Refusal::ALL {
            let _ = writeln!(
                out,
                "ipc_refusals_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.refusals(reason)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ipc_token_reloads_total Tokens-file reloads (SIGHUP) by result.\n# TYPE ipc_token_reloads_total counter\nipc_token_reloads_total{{result=\"ok\"}} {}\nipc_token_reloads_total{{result=\"error\"}} {}",
            get(&self.token_reloads),
            get(&self.token_reload_failures)
        );
        let _ = writeln!(
            out,
            "# HELP ipc_connections Open client connections.\n# TYPE ipc_connections gauge\nipc_connections {}",
            self.connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ipc_subscribers Live subscriber streams on this node.\n# TYPE ipc_subscribers gauge\nipc_subscribers {}",
            self.subscribers.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ipc_sendmsg_total SendMsg calls by outcome.\n# TYPE ipc_sendmsg_total counter"
        );
        for (outcome, c) in [
            ("replied", &self.send_replied),
            ("no_responders", &self.send_no_responders),
            ("deadline_exceeded", &self.send_deadline),
            ("failed", &self.send_failed),
        ] {
            let _ = writeln!(out, "ipc_sendmsg_total{{outcome=\"{outcome}\"}} {}", get(c));
        }
        let _ = writeln!(
            out,
            "# HELP ipc_sendmsg_duration_seconds SendMsg latency.\n# TYPE ipc_sendmsg_duration_seconds histogram"
        );
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                out,
                "ipc_sendmsg_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                get(bucket)
            );
        }
        let count = get(&self.latency_count);
        let _ = writeln!(
            out,
            "ipc_sendmsg_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "ipc_sendmsg_duration_seconds_sum {}\nipc_sendmsg_duration_seconds_count {count}",
            get(&self.latency_sum_micros) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP ipc_lock_waiters Lock calls waiting for a lease on this node.\n# TYPE ipc_lock_waiters gauge\nipc_lock_waiters {}",
            self.lock_waiters.load(Ordering::Relaxed)
        );
        out
    }
}
