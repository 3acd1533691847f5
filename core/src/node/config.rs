//! How a node behaves ([`NodeConfig`]) and what it is called.

use std::time::Duration;

/// How a node behaves; every field has a default fit for tests and small fleets.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name: in `ipc:subscribed`, `Member.node` and `reply_to`.
    pub name: String,
    /// App id for callers that give none (`--app`).
    pub default_app: Option<String>,
    /// Largest accepted message (op, data and headers encoded), in bytes.
    pub max_msg_bytes: usize,
    /// Messages queued per subscriber before it is cut off as too slow.
    pub subscriber_queue: usize,
    /// Bytes of memory queued per subscriber before it is cut off as too slow.
    pub subscriber_queue_bytes: usize,
    /// Bytes of memory all subscriber queues may hold together; over it the
    /// subscriber holding the most is cut off.
    pub max_queued_bytes: usize,
    /// SendMsg wait when the caller gives no `timeout_ms`.
    pub default_timeout: Duration,
    /// Largest `timeout_ms` accepted.
    pub max_timeout: Duration,
    /// Most channels in one SubscribeRequest.
    pub max_channels: usize,
    /// Most headers in one message (and labels in one subscription).
    pub max_headers: usize,
    /// Largest total of header (or label) names and values in one message, in bytes.
    pub max_header_bytes: usize,
    /// Most live subscriber streams on this node.
    pub max_streams: usize,
    /// Most live subscriber streams of one identity (token, certificate, or
    /// unauthenticated sender) on this node.
    pub max_subscriptions_per_identity: usize,
    /// Requests per second per identity (token bucket); `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// How long a Broadcast's idempotency `key` is remembered (`--dedup-window`).
    pub dedup_window: Duration,
}

/// A token bucket per identity: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: default_node_name(),
            default_app: None,
            max_msg_bytes: 1 << 20,
            subscriber_queue: 4096,
            subscriber_queue_bytes: crate::queue::QueueLimits::DEFAULT_BYTES,
            max_queued_bytes: crate::queue::QueueLimits::DEFAULT_TOTAL_BYTES,
            default_timeout: Duration::from_secs(5),
            max_timeout: Duration::from_secs(300),
            max_channels: 256,
            max_headers: 64,
            max_header_bytes: 64 << 10,
            max_streams: 10_000,
            max_subscriptions_per_identity: 1_000,
            rate_limit: None,
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// `<hostname>-<4 hex>`: readable, and unique among replicas sharing a host name.
pub fn default_node_name() -> String {
    format!("{}-{:04x}", hostname(), rand::random::<u16>())
}

/// This machine's host name, reduced to characters valid in a channel segment
/// (`local` if it cannot be read).
pub fn hostname() -> String {
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if host.is_empty() {
        "local".into()
    } else {
        host
    }
}
