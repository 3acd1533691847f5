//! Who is calling, from a gRPC request: the [`Identify`] trait the service asks,
//! what the transport knows of the connection ([`Peer`]), and the two identities
//! servers use — [`MetadataIdentity`], which trusts `ipc-app`/`ipc-sender` metadata,
//! and [`TokenIdentity`]'s check of bearer secrets and client certificates against
//! the tokens file (the file and its grants are [`crate::auth`]'s).

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::Status;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use crate::auth::{AuthError, Caller, Grants, TokenEntry, TokenIdentity};

/// Metadata naming the caller's app id, used for the `:` prefix.
pub const APP_METADATA: &str = "ipc-app";
/// Metadata naming the sender, stamped on messages when no identity is authenticated.
pub const SENDER_METADATA: &str = "ipc-sender";

/// Metadata carrying the bearer secret.
pub const AUTHORIZATION_METADATA: &str = "authorization";

/// What the transport knows about a caller.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The remote address (TCP), if any.
    pub addr: Option<SocketAddr>,
    /// Names of the client certificate verified by mTLS (see
    /// [`crate::auth::certificate_names`]); empty without one.
    pub cert_names: Vec<String>,
    /// The calling process on a Unix socket (SO_PEERCRED), e.g. in a sidecar's pod.
    pub process: Option<LocalProcess>,
}

impl Peer {
    /// What tonic's transport recorded about the connection of a request (its
    /// request extensions): address, verified client certificate, local process.
    pub fn of(extensions: &http::Extensions) -> Self {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        Self {
            addr: extensions
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
                .or_else(|| tls.and_then(|t| t.get_ref().remote_addr())),
            cert_names: tls
                .and_then(TlsConnectInfo::peer_certs)
                .and_then(|chain| chain.first().map(|c| crate::auth::certificate_names(c)))
                .unwrap_or_default(),
            process: extensions
                .get::<UdsConnectInfo>()
                .or_else(|| {
                    extensions
                        .get::<crate::coord::LocalConnection>()
                        .map(|c| &c.uds)
                })
                .and_then(|info| info.peer_cred)
                .map(|cred| LocalProcess {
                    pid: cred.pid(),
                    uid: cred.uid(),
                    gid: cred.gid(),
                }),
        }
    }
}

/// Credentials of a local process connected over a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalProcess {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

impl LocalProcess {
    /// How a local process's `sender` starts: `local pid 12 uid 1000 gid 1000`.
    pub const SENDER_PREFIX: &str = "local ";

    /// Whether `sender` names a local process (meaningful only on its node: a relay
    /// such as the sidecar replaces it with its own identity upstream).
    pub fn is_sender(sender: &str) -> bool {
        sender.starts_with(Self::SENDER_PREFIX)
    }
}

impl std::fmt::Display for LocalProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::SENDER_PREFIX)?;
        match self.pid {
            Some(pid) => write!(f, "pid {pid} uid {} gid {}", self.uid, self.gid),
            None => write!(f, "uid {} gid {}", self.uid, self.gid),
        }
    }
}

/// Works out who is calling from a request's metadata and transport.
pub trait Identify: Send + Sync + 'static {
    fn identify(&self, metadata: &MetadataMap, peer: &Peer) -> Result<Caller, Status>;
}

fn metadata_text(metadata: &MetadataMap, key: &str) -> Option<String> {
    metadata
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// The app id named by `ipc-app` metadata, validated.
pub fn app_metadata(metadata: &MetadataMap) -> Result<Option<String>, Status> {
    let app = metadata_text(metadata, APP_METADATA);
    if let Some(app) = &app {
        crate::channel::check_segment("ipc-app metadata", app).map_err(Status::invalid_argument)?;
    }
    Ok(app)
}

/// Trusts the `ipc-app` and `ipc-sender` metadata: for loopback, a pod's Unix socket,
/// or networks where every client is trusted. Callers have no grants limit.
pub struct MetadataIdentity;

impl Identify for MetadataIdentity {
    fn identify(&self, metadata: &MetadataMap, peer: &Peer) -> Result<Caller, Status> {
        let app = app_metadata(metadata)?;
        let sender = metadata_text(metadata, SENDER_METADATA)
            .or_else(|| peer.addr.map(|a| a.to_string()))
            .or_else(|| peer.process.map(|p| p.to_string()))
            .unwrap_or_else(|| "anonymous".into());
        Ok(Caller {
            app,
            sender,
            grants: None,
            trace: None,
        })
    }
}

/// The `authorization` metadata value for a secret: `Bearer <secret>`.
pub fn bearer(secret: &str) -> Result<AsciiMetadataValue, AuthError> {
    format!("Bearer {secret}")
        .parse()
        .map_err(|_| AuthError("the secret has characters not allowed in gRPC metadata".into()))
}

fn unauthenticated(message: impl Into<String>) -> Status {
    Status::unauthenticated(message.into())
}

impl Identify for TokenIdentity {
    fn identify(&self, metadata: &MetadataMap, peer: &Peer) -> Result<Caller, Status> {
        let app = app_metadata(metadata)?;
        let table = self.table();
        let caller = |entry: &TokenEntry| Caller {
            app: app.clone().or_else(|| entry.app.clone()),
            sender: entry.name.clone(),
            grants: Some(entry.grants.clone()),
            trace: None,
        };
        if let Some(value) = metadata.get(AUTHORIZATION_METADATA) {
            let text = value
                .to_str()
                .map_err(|_| unauthenticated("authorization metadata is not readable text"))?;
            let secret = match text.split_once(' ') {
                Some((scheme, secret)) if scheme.eq_ignore_ascii_case("bearer") => secret.trim(),
                _ => {
                    return Err(unauthenticated(
                        "authorization metadata must be `Bearer <secret>`",
                    ));
                }
            };
            return match table.by_secret(secret) {
                Some(entry) => Ok(caller(entry)),
                None => Err(unauthenticated(
                    "the bearer secret matches no token: check the secret, or whether the tokens file has its entry",
                )),
            };
        }
        if !peer.cert_names.is_empty() {
            if let Some(entry) = table.by_certificate(&peer.cert_names) {
                return Ok(caller(entry));
            }
            if self.trusts_any_certificate() {
                return Ok(Caller {
                    app,
                    sender: peer.cert_names[0].clone(),
                    grants: Some(Arc::new(Grants::all())),
                    trace: None,
                });
            }
            return Err(unauthenticated(format!(
                "client certificate {:?} matches no cert_name in the tokens file",
                peer.cert_names
            )));
        }
        Err(unauthenticated(
            "no credentials: send `authorization: Bearer <secret>` metadata, or a client certificate over mTLS",
        ))
    }
}

#[cfg(test)]
mod tests;
