//! What one connection may cost the server before and around its calls: the
//! connection caps and deadlines ([`ipc_core::connections`]), the request-body
//! deadline and budget ([`ipc_core::admission`]), and the HTTP/2 settings that
//! bound each connection's memory. Every default is listed in docs/security.md.

use std::time::Duration;

use ipc_core::connections::ConnectionLimits;
use ipc_core::mount::MountOptions;
use ipc_core::node::args::millis;

/// The HTTP/2 bounds of every node's listeners (the sidecar's socket too).
pub use ipc_core::mount::{CONNECTION_WINDOW_BYTES, MAX_HEADER_LIST_BYTES, STREAM_WINDOW_BYTES};

/// Connection and request-body limits; their defaults are the mount's
/// ([`MountOptions::default`]), which the sidecar's socket keeps.
#[derive(Debug, Clone, clap::Args)]
pub struct TransportConfig {
    /// Most open client connections (TCP) on this server; over it a new connection
    /// is refused (an HTTP/2 GOAWAY naming this flag). Clamped below the process's
    /// open-file limit.
    #[arg(long, env = "IPC_MAX_CONNECTIONS", default_value_t = MountOptions::default().connections.max_total)]
    pub max_connections: usize,
    /// Most open connections from one IP address.
    #[arg(long, env = "IPC_MAX_CONNECTIONS_PER_PEER", default_value_t = MountOptions::default().connections.max_per_peer)]
    pub max_connections_per_peer: usize,
    /// Time a new connection has to start its first call (HTTP/2 preface, TLS
    /// handshake and headers included), in milliseconds.
    #[arg(long, env = "IPC_HANDSHAKE_TIMEOUT_MS", default_value_t = millis(MountOptions::default().connections.handshake_timeout))]
    pub handshake_timeout_ms: u64,
    /// Time a connection with no call in progress stays open, in milliseconds.
    #[arg(long, env = "IPC_IDLE_TIMEOUT_MS", default_value_t = millis(MountOptions::default().connections.idle_timeout))]
    pub idle_timeout_ms: u64,
    /// Time a call has to send its whole request message, in milliseconds.
    #[arg(long, env = "IPC_BODY_TIMEOUT_MS", default_value_t = millis(MountOptions::default().body_timeout))]
    pub body_timeout_ms: u64,
    /// Most bytes of request messages being received at once, all calls together.
    #[arg(long, env = "IPC_MAX_REQUEST_BUFFER_BYTES", default_value_t = MountOptions::default().max_request_buffer_bytes)]
    pub max_request_buffer_bytes: usize,
}

impl TransportConfig {
    /// The connection limits, `--max-connections` clamped to leave file handles for
    /// the node itself (Redis, metrics, logs) under the open-file limit.
    pub fn connection_limits(&self) -> ConnectionLimits {
        let files = raise_file_limit();
        let mut max_total = self.max_connections.max(1);
        if let Some(files) = files {
            let room = files.saturating_sub(64).max(1) as usize;
            if max_total > room {
                tracing::warn!(
                    max_connections = max_total,
                    open_file_limit = files,
                    "--max-connections is above what the open-file limit allows; using {room}"
                );
                max_total = room;
            }
        }
        ConnectionLimits {
            max_total,
            max_per_peer: self.max_connections_per_peer.max(1),
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms.max(1)),
        }
    }
}

/// Raises the soft open-file limit to the hard one (the default soft limit, often
/// 1024, is far below what a busy control plane needs); returns the soft limit in
/// force afterwards.
pub fn raise_file_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}
