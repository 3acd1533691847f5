//! Where the Redis primary is, and how to reach it (address, ACL user and password,
//! TLS). Every connection of the bus — the command link, the writer, the tail, the
//! inbox, the release notices — asks the [`Endpoint`] for the current primary when
//! it connects, and reconnects when the endpoint says the primary moved.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use parking_lot::Mutex;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo as _, RedisConnectionInfo};
use redis::{RedisError, TlsCertificates};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::bus::ConfigError;
use crate::config::{RedisBusConfig, SentinelAuth, Target, TlsFiles};
use crate::link::reconnect_backoff;

/// The primary every connection should use now.
#[derive(Clone)]
pub(crate) struct Primary {
    pub client: redis::Client,
    /// Grows each time the primary changes; connections remember theirs.
    pub generation: u64,
    /// `host:port`, for logs.
    pub addr: String,
}

/// How to make a client for an address: ACL user, password, db and TLS.
#[derive(Clone)]
struct Shape {
    settings: RedisConnectionInfo,
    tls: Option<TlsCertificates>,
}

impl Shape {
    fn client(&self, host: &str, port: u16) -> Result<redis::Client, RedisError> {
        let addr = match self.tls {
            Some(_) => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: false,
                tls_params: None,
            },
            None => ConnectionAddr::Tcp(host.to_string(), port),
        };
        let info = addr
            .into_connection_info()?
            .set_redis_settings(self.settings.clone());
        match &self.tls {
            Some(tls) => redis::Client::build_with_tls(info, tls.clone()),
            None => redis::Client::open(info),
        }
    }
}

/// Sentinel: who to ask, and how to reach what it names.
struct Sentinels {
    /// `(host, port)` of each Sentinel, asked in order.
    addrs: Vec<(String, u16)>,
    master: String,
    /// Towards the Sentinels: TLS as for the primary, their own credentials.
    to_sentinel: Shape,
    to_primary: Shape,
}

pub(crate) struct Endpoint {
    current: watch::Sender<Option<Primary>>,
    /// Why the last connection attempt failed, said plainly; cleared on success.
    trouble: Mutex<Option<String>>,
    sentinels: Option<Sentinels>,
    /// A connection failed: ask Sentinel now rather than at the next check.
    suspect: Notify,
    timeout: Duration,
}

/// How often Sentinel is asked where the primary is, besides following its
/// `+switch-master` announcements (one may be missed while reconnecting).
const RECHECK: Duration = Duration::from_secs(1);

impl Endpoint {
    /// The endpoint of `config`, checking what can be checked before connecting:
    /// the URL, the TLS files and that they fit the URL.
    pub fn new(config: &RedisBusConfig) -> Result<Self, ConfigError> {
        let tls = read_tls(&config.tls)?;
        let primary = match &config.target {
            Target::Url(url) => {
                let info = url.as_str().into_connection_info()?;
                let settings = primary_settings(info.redis_settings().clone(), config)?;
                let info = info.set_redis_settings(settings);
                Some(fixed(info, tls.clone(), url)?)
            }
            Target::Sentinel { .. } => None,
        };
        let sentinels = match &config.target {
            Target::Url(_) if config.sentinel_auth != SentinelAuth::default() => {
                return Err(ConfigError::Invalid(
                    "--redis-sentinel-username and --redis-sentinel-password-file need --redis-sentinel (with --redis the URL and --redis-password-file give the credentials)".into(),
                ));
            }
            Target::Url(_) => None,
            Target::Sentinel { sentinels, master } => {
                Some(sentinel_settings(sentinels, master, tls, config)?)
            }
        };
        Ok(Self {
            current: watch::Sender::new(primary),
            trouble: Mutex::new(None),
            sentinels,
            suspect: Notify::new(),
            timeout: config.command_timeout,
        })
    }

    /// With Sentinel: asks where the primary is until cancelled — at once when a
    /// connection failed, every [`RECHECK`] anyway — and follows each Sentinel's
    /// `+switch-master`, so every connection moves to a new primary as soon as one
    /// Sentinel announces it (redis-rs's own Sentinel client only looks the primary
    /// up for new connections: redis-rs#1438). Without Sentinel there is nothing to do.
    pub async fn follow(self: Arc<Self>, cancel: CancellationToken) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        for (host, port) in &sentinels.addrs {
            let endpoint = self.clone();
            let (host, port) = (host.clone(), *port);
            tokio::spawn(endpoint.listen_switches(host, port, cancel.clone()));
        }
        let mut backoff = reconnect_backoff();
        loop {
            let wait = match self.ask_sentinels().await {
                Ok(()) => {
                    backoff.reset();
                    RECHECK
                }
                Err(()) => backoff.next_pause().min(RECHECK),
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.suspect.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Asks the Sentinels in order; the first that names a primary that says it is
    /// one wins. Records why when none does.
    pub async fn ask_sentinels(&self) -> Result<(), ()> {
        let Some(sentinels) = &self.sentinels else {
            return Ok(());
        };
        let mut why = Vec::new();
        for (host, port) in &sentinels.addrs {
            let named = tokio::time::timeout(self.timeout, async {
                let client = sentinels.to_sentinel.client(host, port.to_owned())?;
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&connect_config(self.timeout))
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&sentinels.master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            })
            .await;
            let (primary_host, primary_port) = match named {
                Ok(Ok(Some(addr))) => addr,
                Ok(Ok(None)) => {
                    why.push(format!(
                        "Sentinel {host}:{port} knows no master {:?}",
                        sentinels.master
                    ));
                    continue;
                }
                Ok(Err(error)) => {
                    why.push(format!(
                        "Sentinel {host}:{port}: {}",
                        describe_sentinel(&error)
                    ));
                    continue;
                }
                Err(_) => {
                    why.push(format!("Sentinel {host}:{port} did not answer in time"));
                    continue;
                }
            };
            let addr = format!("{primary_host}:{primary_port}");
            if self
                .current
                .borrow()
                .as_ref()
                .is_some_and(|p| p.addr == addr)
            {
                return Ok(());
            }
            // A Sentinel cut off from the others may name a former primary.
            match self
                .is_primary(&sentinels.to_primary, &primary_host, primary_port)
                .await
            {
                Ok(true) => {
                    self.adopt(&primary_host, primary_port, "asked Sentinel");
                    return Ok(());
                }
                Ok(false) => why.push(format!(
                    "Sentinel {host}:{port} names {addr}, which is not a primary (yet)"
                )),
                Err(error) => why.push(format!("primary {addr}: {}", describe(&error))),
            }
        }
        let why = why.join("; ");
        let mut trouble = self.trouble.lock();
        if trouble.as_deref() != Some(why.as_str()) {
            tracing::warn!(reason = %why, "no Redis primary found through Sentinel; will keep asking");
            *trouble = Some(why);
        }
        Err(())
    }

    async fn is_primary(&self, shape: &Shape, host: &str, port: u16) -> Result<bool, RedisError> {
        let role = tokio::time::timeout(self.timeout, async {
            let client = shape.client(host, port)?;
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&connect_config(self.timeout))
                .await?;
            redis::cmd("ROLE")
                .query_async::<redis::Value>(&mut conn)
                .await
        })
        .await
        .map_err(|_| RedisError::from((redis::ErrorKind::Io, "ROLE timed out")))??;
        Ok(matches!(role, redis::Value::Array(parts)
            if matches!(parts.first(), Some(redis::Value::BulkString(r)) if r == b"master")))
    }

    /// Makes `host:port` the primary of every connection, unless it is already.
    fn adopt(&self, host: &str, port: u16, how: &str) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        let client = match sentinels.to_primary.client(host, port) {
            Ok(client) => client,
            Err(error) => {
                tracing::warn!(%error, host, port, "cannot use the primary Sentinel named");
                return;
            }
        };
        let addr = format!("{host}:{port}");
        let changed = self.current.send_if_modified(|current| {
            if current.as_ref().is_some_and(|p| p.addr == addr) {
                return false;
            }
            let generation = current.as_ref().map_or(1, |p| p.generation + 1);
            *current = Some(Primary {
                client,
                generation,
                addr: addr.clone(),
            });
            true
        });
        if changed {
            tracing::warn!(primary = %addr, how, "Redis primary is now {addr}: moving every connection");
        }
    }

    /// Follows one Sentinel's `+switch-master` announcements until cancelled.
    async fn listen_switches(self: Arc<Self>, host: String, port: u16, cancel: CancellationToken) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        let mut backoff = reconnect_backoff();
        loop {
            let subscribed = tokio::time::timeout(self.timeout, async {
                let client = sentinels.to_sentinel.client(&host, port)?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, RedisError>(pubsub)
            });
            let subscribed = tokio::select! {
                () = cancel.cancelled() => return,
                s = subscribed => s,
            };
            if let Ok(Ok(pubsub)) = subscribed {
                backoff.reset();
                let mut announcements = pubsub.into_on_message();
                loop {
                    let announcement = tokio::select! {
                        () = cancel.cancelled() => return,
                        a = announcements.next() => a,
                    };
                    let Some(announcement) = announcement else {
                        break;
                    };
                    // "<master name> <old ip> <old port> <new ip> <new port>"
                    let text =
                        String::from_utf8_lossy(announcement.get_payload_bytes()).to_string();
                    let parts: Vec<&str> = text.split_whitespace().collect();
                    if let [name, _, _, new_host, new_port] = parts[..]
                        && name == sentinels.master
                        && let Ok(new_port) = new_port.parse()
                    {
                        self.adopt(new_host, new_port, "Sentinel announced +switch-master");
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff.next_pause()) => {}
            }
        }
    }

    /// The primary to connect to now, or why none is known.
    pub fn current(&self) -> Result<Primary, RedisError> {
        self.current.borrow().clone().ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::Io,
                "no Redis primary is known",
                self.trouble().unwrap_or_default(),
            ))
        })
    }

    /// The generation of the primary known now, if any: taken before a connection
    /// attempt, for [`Endpoint::changed_from`] while waiting to retry.
    pub fn generation(&self) -> Option<u64> {
        self.current.borrow().as_ref().map(|p| p.generation)
    }

    /// Resolves once the primary is another than `generation` (one is found where
    /// none was known, or Sentinel named a new one). A connection waiting out its
    /// backoff after a failure retries at once then: after a failover the backoff
    /// has grown to seconds, and waiting it out would keep the replica down well
    /// after Sentinel promoted a replica.
    pub async fn changed_from(&self, generation: Option<u64>) {
        let mut primaries = self.current.subscribe();
        let _ = primaries
            .wait_for(|p| p.as_ref().map(|p| p.generation) != generation)
            .await;
    }

    /// Resolves once the primary is no longer the one of `generation`.
    pub async fn moved(&self, generation: u64) {
        let mut primaries = self.current.subscribe();
        let _ = primaries
            .wait_for(|p| p.as_ref().is_some_and(|p| p.generation != generation))
            .await;
    }

    /// Records why connecting failed, and logs it once per new reason. `None`
    /// after a success.
    pub fn report(&self, error: Option<&RedisError>) {
        if error.is_some() {
            self.suspect();
        }
        let said = error.map(describe);
        let mut trouble = self.trouble.lock();
        if *trouble != said {
            match &said {
                Some(reason) => tracing::warn!(%reason, "cannot use Redis; will keep trying"),
                None if trouble.is_some() => tracing::info!("Redis reachable again"),
                None => {}
            }
            *trouble = said;
        }
    }

    /// A connection to the primary failed: with Sentinel, ask where it is now.
    pub fn suspect(&self) {
        self.suspect.notify_one();
    }

    /// Why the last connection attempt failed, if it did.
    pub fn trouble(&self) -> Option<String> {
        self.trouble.lock().clone()
    }
}

/// How to reach Sentinel and the primaries it names.
fn sentinel_settings(
    sentinels: &[String],
    master: &str,
    tls: Option<TlsCertificates>,
    config: &RedisBusConfig,
) -> Result<Sentinels, ConfigError> {
    if master.is_empty() {
        return Err(ConfigError::Invalid("--redis-master is empty".into()));
    }
    let addrs = sentinels
        .iter()
        .map(|entry| {
            entry
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)))
                .filter(|(host, _)| !host.is_empty())
                .ok_or_else(|| {
                    ConfigError::Invalid(format!("--redis-sentinel {entry:?} is not HOST:PORT"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(ConfigError::Invalid(
            "--redis-sentinel names no Sentinel".into(),
        ));
    }
    let to_primary = primary_settings(RedisConnectionInfo::default(), config)?;
    let SentinelAuth { username, password } = &config.sentinel_auth;
    let mut to_sentinel = RedisConnectionInfo::default();
    match (username, password) {
        (Some(user), None) => {
            return Err(ConfigError::Invalid(format!(
                "--redis-sentinel-username {user:?} needs --redis-sentinel-password-file (its password)"
            )));
        }
        (username, Some(password)) => {
            to_sentinel = to_sentinel.set_password(password.expose());
            if let Some(user) = username {
                to_sentinel = to_sentinel.set_username(user);
            }
        }
        (None, None) => {}
    }
    Ok(Sentinels {
        addrs,
        master: master.to_string(),
        to_sentinel: Shape {
            settings: to_sentinel,
            tls: tls.clone(),
        },
        to_primary: Shape {
            settings: to_primary,
            tls,
        },
    })
}

/// The primary's ACL user and password on top of `settings` (a URL's, or none
/// with Sentinel): `--redis-username` where the URL names no user (naming another
/// one is an error), `--redis-password-file` over the URL's password.
fn primary_settings(
    mut settings: RedisConnectionInfo,
    config: &RedisBusConfig,
) -> Result<RedisConnectionInfo, ConfigError> {
    if let Some(user) = &config.username {
        if user.is_empty() {
            return Err(ConfigError::Invalid("--redis-username is empty".into()));
        }
        if let Some(in_url) = settings.username()
            && in_url != user.as_str()
        {
            return Err(ConfigError::Invalid(format!(
                "--redis-username {user:?} and the user {in_url:?} of the --redis URL differ: name the ACL user once"
            )));
        }
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    if let Some(user) = &config.username
        && settings.password().is_none()
    {
        // Without a password the client sends no AUTH: the user would be ignored.
        return Err(ConfigError::Invalid(format!(
            "--redis-username {user:?} needs a password: --redis-password-file (or one in the --redis URL)"
        )));
    }
    Ok(settings)
}

/// The one primary of a `redis://` or `rediss://` URL.
fn fixed(
    info: ConnectionInfo,
    tls: Option<TlsCertificates>,
    url: &str,
) -> Result<Primary, ConfigError> {
    let addr = match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "redis".to_string(),
    };
    let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    let client = match tls {
        Some(tls) if is_tls => redis::Client::build_with_tls(info, tls)?,
        Some(_) => {
            return Err(ConfigError::Invalid(format!(
                "--redis-ca, --redis-cert and --redis-key need a rediss:// URL (TLS); got {}",
                redacted(url)
            )));
        }
        None => redis::Client::open(info)?,
    };
    Ok(Primary {
        client,
        generation: 1,
        addr,
    })
}

/// The TLS files' contents, or `None` without TLS files.
fn read_tls(files: &TlsFiles) -> Result<Option<TlsCertificates>, ConfigError> {
    if !files.any() {
        return Ok(None);
    }
    // The process's TLS provider, unless something installed one already.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    // A file without the PEM block expected would pass the parser as "nothing":
    // every connection would then fail on an empty trust store.
    let read = |flag: &str, path: &Path, block: &str| {
        let pem = std::fs::read(path).map_err(|e| {
            ConfigError::Invalid(format!("cannot read {flag} {}: {e}", path.display()))
        })?;
        if !String::from_utf8_lossy(&pem).contains(block) {
            return Err(ConfigError::Invalid(format!(
                "{flag} {} holds no PEM {block}",
                path.display()
            )));
        }
        Ok(pem)
    };
    let root_cert = files
        .ca
        .as_deref()
        .map(|path| read("--redis-ca", path, "CERTIFICATE"))
        .transpose()?;
    let client_tls = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("--redis-cert", cert, "CERTIFICATE")?,
            client_key: read("--redis-key", key, "PRIVATE KEY")?,
        }),
        (None, None) => None,
        _ => {
            return Err(ConfigError::Invalid(
                "--redis-cert and --redis-key go together (mutual TLS needs both)".into(),
            ));
        }
    };
    let certificates = TlsCertificates {
        client_tls,
        root_cert,
    };
    // Parse now, so that a bad PEM stops the start with its name rather than failing
    // every connection later.
    redis::Client::build_with_tls("rediss://localhost/", certificates.clone()).map_err(|e| {
        ConfigError::Invalid(format!(
            "the TLS files (--redis-ca, --redis-cert, --redis-key) are not usable PEM: {e}"
        ))
    })?;
    Ok(Some(certificates))
}

/// A connection error said plainly: what is wrong and which setting to check.
pub(crate) fn describe(error: &RedisError) -> String {
    let text = error.to_string();
    let hint = if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        "TLS: Redis's certificate is not trusted (is --redis-ca the authority that signed it, and does it name the host?)"
    } else if text.contains("CertificateRequired") || text.contains("certificate required") {
        "TLS: Redis asks for a client certificate (--redis-cert, --redis-key)"
    } else if is_refused_credentials(error) {
        "Redis refused the credentials (the ACL user and password: of the URL, or --redis-username and --redis-password-file)"
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        "TLS: the server does not speak TLS on that port (use redis:// for plain TCP)"
    } else {
        return text;
    };
    format!("{hint}: {text}")
}

/// An error of a connection to a Sentinel said plainly: authentication is the
/// Sentinel's own (`requirepass` or its ACL users), not the primary's.
fn describe_sentinel(error: &RedisError) -> String {
    let text = error.to_string();
    let hint = if error.kind() == redis::ErrorKind::AuthenticationFailed {
        "authentication failed: the Sentinel refused the password (or has none) (--redis-sentinel-password-file, --redis-sentinel-username)"
    } else if text.contains("NOAUTH") {
        "authentication required: the Sentinel asks for a password (--redis-sentinel-password-file)"
    } else if text.contains("WRONGPASS") {
        "authentication failed: the Sentinel refused the user and password (--redis-sentinel-username, --redis-sentinel-password-file)"
    } else if text.contains("NOPERM") {
        "the Sentinel's ACL user (--redis-sentinel-username) may not run SENTINEL GET-MASTER-ADDR-BY-NAME or subscribe to +switch-master"
    } else {
        return describe(error);
    };
    format!("{hint}: {text}")
}

/// Whether Redis refused who the client said it is.
fn is_refused_credentials(error: &RedisError) -> bool {
    let text = error.to_string();
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        || text.contains("NOPERM")
}

/// `url` without its password, for logs.
pub(crate) fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(at)) if at > scheme.len() => {
            let host = &url[at + 1..];
            let user = rest.split_once('@').map_or("", |(info, _)| info);
            let user = user.split_once(':').map_or(user, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_string(),
    }
}

/// How long a connection attempt may take, for callers that bound it themselves.
pub(crate) fn connect_config(timeout: Duration) -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

#[cfg(test)]
mod tests;
