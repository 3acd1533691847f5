//! Where the Redis primary is, and how to reach it (address, ACL user and password,
//! TLS). Every connection of the bus — the command link, the writer, the tail, the
//! inbox, the release notices — asks the [`Endpoint`] for the current primary when
//! it connects, and reconnects when the endpoint says the primary moved.

use std::path::Path;
use std::time::Duration;

use parking_lot::Mutex;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo as _};
use redis::{RedisError, TlsCertificates};
use tokio::sync::watch;

use crate::bus::ConfigError;
use crate::config::{RedisBusConfig, Target, TlsFiles};

/// The primary every connection should use now.
#[derive(Clone)]
pub(crate) struct Primary {
    pub client: redis::Client,
    /// Grows each time the primary changes; connections remember theirs.
    pub generation: u64,
    /// `host:port`, for logs.
    pub addr: String,
}

pub(crate) struct Endpoint {
    current: watch::Sender<Option<Primary>>,
    /// Why the last connection attempt failed, said plainly; cleared on success.
    trouble: Mutex<Option<String>>,
}

impl Endpoint {
    /// The endpoint of `config`, checking what can be checked before connecting:
    /// the URL, the TLS files and that they fit the URL.
    pub fn new(config: &RedisBusConfig) -> Result<Self, ConfigError> {
        let tls = read_tls(&config.tls)?;
        let primary = match &config.target {
            Target::Url(url) => {
                let mut info = url.as_str().into_connection_info()?;
                if let Some(password) = &config.password {
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_password(password.expose());
                    info = info.set_redis_settings(settings);
                }
                Some(fixed(info, tls, url)?)
            }
        };
        Ok(Self {
            current: watch::Sender::new(primary),
            trouble: Mutex::new(None),
        })
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

    /// Why the last connection attempt failed, if it did.
    pub fn trouble(&self) -> Option<String> {
        self.trouble.lock().clone()
    }
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
    } else if text.contains("WRONGPASS") || text.contains("NOAUTH") || text.contains("NOPERM") {
        "Redis refused the credentials (the ACL user and password of the URL or --redis-password-file)"
    } else if text.contains("InvalidContentType") || text.contains("corrupt message") {
        "TLS: the server does not speak TLS on that port (use redis:// for plain TCP)"
    } else {
        return text;
    };
    format!("{hint}: {text}")
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
mod tests {
    use super::*;

    #[test]
    fn urls_are_logged_without_passwords() {
        assert_eq!(
            redacted("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(
            redacted("redis://app:s3cret@redis:6379/0"),
            "redis://app:***@redis:6379/0"
        );
        assert_eq!(redacted("redis://:s3cret@redis/"), "redis://:***@redis/");
        assert!(!redacted("redis://u:p@ss@h/").contains("p@ss"));
        assert_eq!(
            redacted("rediss://app:pw@redis:6380/"),
            "rediss://app:***@redis:6380/"
        );
    }

    #[test]
    fn tls_files_need_a_tls_url_and_come_in_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RedisBusConfig::new("redis://127.0.0.1/");
        config.tls.cert = Some(dir.path().join("cert.pem"));
        let error = Endpoint::new(&config).err().unwrap().to_string();
        assert!(error.contains("go together"), "{error}");

        config.tls = TlsFiles {
            ca: Some(dir.path().join("missing.pem")),
            ..TlsFiles::default()
        };
        let error = Endpoint::new(&config).err().unwrap().to_string();
        assert!(error.contains("cannot read --redis-ca"), "{error}");

        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        config.tls.ca = Some(ca.clone());
        let error = Endpoint::new(&config).err().unwrap().to_string();
        assert!(error.contains("holds no PEM CERTIFICATE"), "{error}");
    }
}
