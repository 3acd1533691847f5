//! How a Redis bus connects and behaves.

use std::time::Duration;

/// Settings of a [`crate::RedisBus`]; the server fills them from its flags.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// Entries kept in the stream for resume (`XADD MAXLEN ~`).
    pub retention: usize,
    /// How long a replica's presence outlives its last heartbeat; the members of a
    /// replica that died vanish within this time. Heartbeats go every third of it.
    pub presence_ttl: Duration,
    /// Bound on one Redis call: a broadcast while Redis is unreachable fails within
    /// about this time instead of hanging.
    pub command_timeout: Duration,
}

impl RedisBusConfig {
    /// A configuration with the defaults of the server's flags.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "ipc".into(),
            retention: 10_000,
            presence_ttl: Duration::from_secs(15),
            command_timeout: Duration::from_secs(2),
        }
    }
}
