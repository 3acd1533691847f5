//! The admission webhook over HTTPS: an axum router and a rustls listener.
//!
//! The API server only calls webhooks over TLS, with the CA from the
//! MutatingWebhookConfiguration's `caBundle`. The certificate and key are read from
//! files (a mounted Secret) and read again when they change, so a rotated Secret is
//! picked up without a restart.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::InjectConfig;
use crate::admission::{HEALTHZ_PATH, INJECT_PATH, review};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open requests may take to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many connections at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;

/// `POST /inject` (AdmissionReview v1) and `GET /healthz`.
pub fn router(config: InjectConfig) -> Router {
    Router::new()
        .route(INJECT_PATH, post(inject))
        .route(HEALTHZ_PATH, get(|| async { "ok\n" }))
        .with_state(Arc::new(config))
}

async fn inject(State(config): State<Arc<InjectConfig>>, body: Bytes) -> Response {
    match review(&config, &body) {
        Ok(review) => axum::Json(review).into_response(),
        Err(error) => {
            tracing::warn!(%error, "bad admission request");
            (StatusCode::BAD_REQUEST, axum::Json(error.to_review())).into_response()
        }
    }
}

/// Why the webhook listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("webhook TLS certificate {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("webhook TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Serves `router` over HTTPS (HTTP/1.1 and HTTP/2) on `listener` until `shutdown`
/// completes, then lets open requests finish (bounded) and returns.
///
/// The certificate chain and key are PEM files (`tls.crt`/`tls.key` of a
/// `kubernetes.io/tls` Secret). They are loaded before serving, so a missing or bad
/// file is an error here rather than failed handshakes later; afterwards they are
/// re-read on each handshake and a changed, valid pair replaces the old one.
pub async fn serve_https(
    listener: TcpListener,
    router: Router,
    cert_path: impl AsRef<Path>,
    key_path: impl AsRef<Path>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::load(cert_path.as_ref(), key_path.as_ref(), provider.clone())?;
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("webhook connections still open after the drain timeout; closing them");
    }
    Ok(())
}

/// The serving certificate, re-read from its files when they change.
///
/// Reading two small files per handshake is cheap at a webhook's request rate, and
/// comparing contents (not mtimes) cannot miss a change. A pair read half-way
/// through a Secret update (new certificate, old key) does not match and is ignored
/// until the next handshake.
#[derive(Debug)]
struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<LoadedCert>,
}

#[derive(Debug)]
struct LoadedCert {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    certified: Arc<CertifiedKey>,
}

impl ReloadingCert {
    fn load(
        cert_path: &Path,
        key_path: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ServeError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let certified = parse_pair(&cert_pem, &key_pem, &provider).map_err(|(which, reason)| {
            ServeError::Certificate {
                path: if which == Which::Cert {
                    cert_path
                } else {
                    key_path
                }
                .to_owned(),
                reason,
            }
        })?;
        Ok(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: Mutex::new(LoadedCert {
                cert_pem,
                key_pem,
                certified: Arc::new(certified),
            }),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (Ok(cert_pem), Ok(key_pem)) = (read(&self.cert_path), read(&self.key_path)) else {
            // Files briefly missing during an update: keep serving the last good pair.
            return Some(current.certified.clone());
        };
        if cert_pem != current.cert_pem || key_pem != current.key_pem {
            match parse_pair(&cert_pem, &key_pem, &self.provider) {
                Ok(certified) => {
                    tracing::info!(cert = %self.cert_path.display(), "webhook certificate reloaded");
                    *current = LoadedCert {
                        cert_pem,
                        key_pem,
                        certified: Arc::new(certified),
                    };
                }
                Err((_, reason)) => {
                    tracing::debug!(%reason, "webhook certificate files changed but are not a usable pair yet");
                }
            }
        }
        Some(current.certified.clone())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Which {
    Cert,
    Key,
}

fn read(path: &Path) -> Result<Vec<u8>, ServeError> {
    std::fs::read(path).map_err(|e| ServeError::Certificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn parse_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, (Which, String)> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (Which::Cert, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err((Which::Cert, "no CERTIFICATE block".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| (Which::Key, format!("no usable private key: {e}")))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| (Which::Key, format!("does not match the certificate: {e}")))
}
