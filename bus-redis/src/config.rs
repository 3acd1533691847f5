//! How a Redis bus connects and behaves.

use std::path::PathBuf;
use std::time::Duration;

/// Settings of a [`crate::RedisBus`]; the server fills them from its flags.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// Which Redis: one server by URL, or the primary a Sentinel names.
    pub target: Target,
    /// The ACL user of the primary, when not in the URL (and with Sentinel, where
    /// there is no URL); `None`: Redis's default user. A URL naming another user
    /// is refused. It needs a password ([`RedisBusConfig::password`] or the URL's).
    pub username: Option<String>,
    /// The password of the ACL user (or of `requirepass`), when not in the URL:
    /// it wins over a password in the URL. Never logged.
    pub password: Option<Secret>,
    /// How the Sentinels are reached (with [`Target::Sentinel`] only): their
    /// `requirepass`, or an ACL user of theirs and its password.
    pub sentinel_auth: SentinelAuth,
    /// Certificates for TLS (with `rediss://`, or towards Sentinel and its primary).
    pub tls: TlsFiles,
    /// Redis replicas that must hold a write before it is acknowledged (`WAIT`);
    /// 0 acknowledges once the primary has it.
    pub min_replicas: u32,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// Entries kept in the stream for resume (`XADD MAXLEN ~`), each the messages of
    /// one write round trip: at least this many messages.
    pub retention: usize,
    /// How long a replica's presence outlives its last heartbeat; the members of a
    /// replica that died vanish within this time. Heartbeats go every third of it.
    pub presence_ttl: Duration,
    /// Bound on one Redis call: a broadcast while Redis is unreachable fails within
    /// about this time instead of hanging.
    pub command_timeout: Duration,
}

/// Where the bus finds its Redis.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS.
    Url(String),
    /// The primary that Sentinel names `master`, asked of the first of `sentinels`
    /// (`host:port`) that answers, and followed across failovers. TLS (towards
    /// both) when any TLS file is given.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => write!(f, "Url({})", crate::endpoint::redacted(url)),
            Self::Sentinel { sentinels, master } => {
                write!(f, "Sentinel({master} from {})", sentinels.join(","))
            }
        }
    }
}

/// Credentials towards the Sentinels themselves (not the primary they name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentinelAuth {
    /// An ACL user of the Sentinels; `None`: their default user. Needs `password`.
    pub username: Option<String>,
    /// The Sentinels' `requirepass`, or the password of `username`; `None`: the
    /// Sentinels ask for none. Never logged.
    pub password: Option<Secret>,
}

/// PEM files for TLS to Redis (and to Sentinel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate authority that signed Redis's certificate; the system's roots
    /// when absent.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, for Redis with `tls-auth-clients yes`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any TLS setting was given.
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

impl RedisBusConfig {
    /// A configuration with the defaults of the server's flags.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            target: Target::Url(url.into()),
            username: None,
            password: None,
            sentinel_auth: SentinelAuth::default(),
            tls: TlsFiles::default(),
            min_replicas: 0,
            prefix: "ipc".into(),
            retention: 10_000,
            presence_ttl: Duration::from_secs(15),
            command_timeout: Duration::from_secs(2),
        }
    }
}

/// A credential: its `Debug` shows `***`, so a configuration can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_not_shown_by_debug() {
        let mut config = RedisBusConfig::new("redis://127.0.0.1/");
        config.password = Some(Secret::new("s3cret"));
        config.sentinel_auth.password = Some(Secret::new("s3ntinel"));
        config.target = Target::Url("redis://app:s3cret@redis/".into());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("s3ntinel") && shown.contains("***"),
            "{shown}"
        );
    }
}
