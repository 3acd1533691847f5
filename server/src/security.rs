//! Who may connect and what they may send: the `--tokens`, `--tls-*` and
//! `--insecure` flags (secure by default: no credentials, loopback only), and the
//! limit flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use ipc_core::NodeConfig;
use ipc_core::auth::TokenIdentity;
use ipc_core::grpc::identify::{Identify, MetadataIdentity};
use ipc_core::mount::MountOptions;
use ipc_core::node::RateLimit;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Authentication and transport security flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SecurityConfig {
    /// Tokens file (TOML, see docs/security.md): callers must send
    /// `authorization: Bearer <secret>` and get the grants of its entry. Reloaded on SIGHUP.
    #[arg(long, env = "IPC_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Also reload the tokens file when its contents change, checked this often
    /// (`10s`, `500ms`): for a file that changes without a signal, such as a
    /// Kubernetes Secret mounted as a volume. Without it, reload with SIGHUP.
    #[arg(long, env = "IPC_TOKENS_WATCH", requires = "tokens", value_parser = ipc_core::publish::parse_window)]
    pub tokens_watch: Option<Duration>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "IPC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "IPC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mTLS. A certificate's CN or
    /// DNS name maps to the tokens-file entry with that `cert_name`; without --tokens any
    /// verified certificate may do everything.
    #[arg(long, env = "IPC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Accept unauthenticated clients on a non-loopback --listen address. Without it the
    /// server refuses to start there unless --tokens or --tls-client-ca is given.
    #[arg(long, env = "IPC_INSECURE")]
    pub insecure: bool,
}

/// Limits on what one request or one identity may use; their defaults are the
/// node's ([`NodeConfig::default`]) and the mount's ([`MountOptions::default`]).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitConfig {
    /// Most headers in one message (and labels in one subscription).
    #[arg(long, env = "IPC_MAX_HEADERS", default_value_t = NodeConfig::default().max_headers)]
    pub max_headers: usize,
    /// Largest total size of a message's header names and values, in bytes.
    #[arg(long, env = "IPC_MAX_HEADER_BYTES", default_value_t = NodeConfig::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Most channels in one Subscribe request.
    #[arg(long, env = "IPC_MAX_CHANNELS", default_value_t = NodeConfig::default().max_channels)]
    pub max_channels: usize,
    /// Most live Subscribe streams on this node.
    #[arg(long, env = "IPC_MAX_STREAMS", default_value_t = NodeConfig::default().max_streams)]
    pub max_streams: usize,
    /// Most live Subscribe streams of one identity (token, certificate or sender) on this node.
    #[arg(
        long,
        env = "IPC_MAX_SUBSCRIPTIONS_PER_IDENTITY",
        default_value_t = NodeConfig::default().max_subscriptions_per_identity
    )]
    pub max_subscriptions_per_identity: usize,
    /// Requests per second per identity (token bucket; 0: no limit). Over it: RESOURCE_EXHAUSTED.
    #[arg(long, env = "IPC_RATE_LIMIT", default_value_t = NodeConfig::default().rate_limit.map_or(0, |limit| limit.per_second))]
    pub rate_limit: u32,
    /// Requests one identity may make at once before --rate-limit applies (default: --rate-limit).
    #[arg(long, env = "IPC_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Most concurrent calls (HTTP/2 streams) on one connection.
    #[arg(long, env = "IPC_MAX_CONNECTION_STREAMS", default_value_t = MountOptions::default().max_connection_streams)]
    pub max_connection_streams: u32,
}

impl LimitConfig {
    /// Copies the limits into a node's configuration.
    pub fn apply(&self, node: &mut NodeConfig) {
        node.max_headers = self.max_headers;
        node.max_header_bytes = self.max_header_bytes;
        node.max_channels = self.max_channels;
        node.max_streams = self.max_streams;
        node.max_subscriptions_per_identity = self.max_subscriptions_per_identity;
        node.rate_limit = (self.rate_limit > 0).then(|| RateLimit {
            per_second: self.rate_limit,
            burst: self.rate_burst.unwrap_or(self.rate_limit).max(1),
        });
    }
}

/// How the server authenticates callers and secures its transport, ready to serve.
#[derive(Clone)]
pub struct Security {
    pub identity: Arc<dyn Identify>,
    /// The tokens file's identity, to reload on SIGHUP.
    pub tokens: Option<Arc<TokenIdentity>>,
    /// How often to check the tokens file for changes (`--tokens-watch`).
    pub tokens_watch: Option<Duration>,
    pub tls: Option<ServerTlsConfig>,
}

impl Security {
    /// Reads the tokens file and TLS material and checks that `listen` is safe to
    /// bind: anything but loopback needs credentials (tokens or mTLS) or `--insecure`.
    pub fn load(config: &SecurityConfig, listen: SocketAddr) -> anyhow::Result<Self> {
        let authenticated = config.tokens.is_some() || config.tls_client_ca.is_some();
        if !listen.ip().is_loopback() && !authenticated && !config.insecure {
            bail!(
                "refusing to listen on {listen} without authentication: anyone who can reach it could \
                 broadcast to the whole fleet. Give --tokens FILE or --tls-client-ca FILE (mTLS), \
                 or --insecure to accept unauthenticated clients anyway, or listen on loopback"
            );
        }
        if config.tokens.is_some() && config.tls_cert.is_none() && !listen.ip().is_loopback() {
            tracing::warn!(%listen, "tokens without --tls-cert: bearer secrets cross the network in clear text");
        }
        let tokens = match &config.tokens {
            Some(path) => Some(Arc::new(TokenIdentity::from_file(path)?)),
            None => None,
        };
        let identity: Arc<dyn Identify> = match (&tokens, &config.tls_client_ca) {
            (Some(tokens), _) => tokens.clone(),
            (None, Some(_)) => Arc::new(TokenIdentity::certificates_only()),
            (None, None) => Arc::new(MetadataIdentity),
        };
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let read = |path: &PathBuf, what: &str| {
                    std::fs::read(path)
                        .with_context(|| format!("reading {what} {}", path.display()))
                };
                let mut tls = ServerTlsConfig::new()
                    .identity(Identity::from_pem(
                        read(cert, "--tls-cert")?,
                        read(key, "--tls-key")?,
                    ))
                    // A client that stalls its handshake does not hold a connection.
                    .timeout(Duration::from_secs(10));
                if let Some(ca) = &config.tls_client_ca {
                    tls = tls
                        .client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?))
                        // With tokens, a client may authenticate by secret over plain TLS.
                        .client_auth_optional(tokens.is_some());
                }
                // Fail at start, not at the first connection.
                tonic::transport::Server::builder()
                    .tls_config(tls.clone())
                    .context("TLS set-up (--tls-cert, --tls-key, --tls-client-ca)")?;
                Some(tls)
            }
            _ => None,
        };
        Ok(Self {
            identity,
            tokens,
            tokens_watch: config.tokens_watch,
            tls,
        })
    }
}

/// The rule of the gRPC port, for the admin console: beyond loopback, people must
/// log in with a token (--tokens), or --insecure says anyone reaching it may act.
/// A client certificate alone cannot log in to the console.
pub fn check_admin_listen(config: &SecurityConfig, admin: SocketAddr) -> anyhow::Result<()> {
    if config.tokens.is_none() && config.tls_client_ca.is_some() {
        bail!(
            "--admin-listen with --tls-client-ca but no --tokens: people log in to the console with \
             a token, so give --tokens FILE as well"
        );
    }
    if !admin.ip().is_loopback() && config.tokens.is_none() && !config.insecure {
        bail!(
            "refusing to serve the admin console on {admin} without authentication: anyone who \
             can reach it could broadcast to the whole fleet. Give --tokens FILE (people log in \
             with a token), or --insecure, or listen on loopback"
        );
    }
    if config.tokens.is_some() && config.tls_cert.is_none() && !admin.ip().is_loopback() {
        tracing::warn!(%admin, "admin console without --tls-cert: tokens and session cookies cross the network in clear text");
    }
    Ok(())
}

/// Re-reads the tokens file on every SIGHUP and, with `watch`, whenever its
/// contents change (checked every `watch`). Streams opened with a token the new
/// file removes or changes end (UNAUTHENTICATED, counted in
/// `ipc_revoked_streams_total`); every other stream and connection stays.
/// A file that does not parse is logged and the previous one stays in force.
/// Each reload is counted in `ipc_token_reloads_total{result}`. Without a tokens
/// file SIGHUP is only logged: it must not stop the server (its default action).
pub fn reload_tokens(
    tokens: Option<Arc<TokenIdentity>>,
    watch: Option<Duration>,
    node: Arc<ipc_core::Node>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        let Some(tokens) = tokens else {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: no --tokens file to reload");
            }
            return;
        };
        let mut ticks = watch.map(tokio::time::interval);
        // The contents last read (at start, just after the table was loaded): a
        // tick reloads only when they change.
        let read = || tokens.path().and_then(|path| std::fs::read(path).ok());
        let mut seen = read();
        loop {
            let signalled = tokio::select! {
                signal = hangup.recv() => {
                    if signal.is_none() {
                        return;
                    }
                    true
                }
                _ = async { ticks.as_mut().expect("guarded").tick().await }, if ticks.is_some() => false,
            };
            let contents = read();
            if !signalled && (contents.is_none() || contents == seen) {
                // Unchanged, or briefly missing while a Secret volume is updated.
                continue;
            }
            seen = contents;
            reload(&tokens, &node);
        }
    });
    Ok(())
}

/// One reload of the tokens file; see [`reload_tokens`].
fn reload(tokens: &TokenIdentity, node: &ipc_core::Node) {
    let metrics = node.metrics();
    match tokens.reload_revoking() {
        Ok((entries, revoked)) => {
            metrics.token_reloads.fetch_add(1, Ordering::Relaxed);
            let ended = node.revoke(&revoked);
            tracing::info!(entries, ?revoked, streams_ended = ended, path = ?tokens.path(), "tokens file reloaded");
        }
        Err(error) => {
            metrics
                .token_reload_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "tokens file not reloaded; the previous one stays in force");
        }
    }
}
