//! The TCP connections of a node's listener, guarded before HTTP/2 sees them.
//!
//! - **Caps**: at most `max_per_peer` connections from one IP address and
//!   `max_total` in all. A connection over a cap is refused at once: on plain TCP
//!   it is told why (an HTTP/2 GOAWAY, `ENHANCE_YOUR_CALM`, whose debug text names
//!   the flag), then closed; it is counted in `ipc_refusals_total`.
//! - **Deadlines**: a connection with no call in progress is closed when its
//!   deadline passes: `handshake_timeout` after it was accepted if it never started
//!   a call (a client that never sends the HTTP/2 preface, stalls its TLS handshake
//!   or its first headers), `idle_timeout` after its last call ended otherwise.
//!   A connection with a call in progress (a Subscribe stream) is never idle.
//!   HTTP/2 pings do not count as calls.
//! - **File handles**: accept errors (`EMFILE`) are logged and retried after a
//!   short pause instead of spinning; with the caps below the process's limit
//!   and the deadlines freeing silent connections, new clients keep getting in.
//!
//! [`crate::admission`] marks calls as started and ended through [`Connections::call_started`].

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use futures::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::{Metrics, Refusal};

/// Bounds on the connections of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most open connections in all.
    pub max_total: usize,
    /// Most open connections from one IP address.
    pub max_per_peer: usize,
    /// Time a new connection has to start its first call.
    pub handshake_timeout: Duration,
    /// Time a connection with no call in progress stays open after its last call.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_total: 4096,
            max_per_peer: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// The open connections of a listener.
pub struct Connections {
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_addr: HashMap<SocketAddr, Arc<ConnState>>,
    per_peer: HashMap<IpAddr, usize>,
}

/// What the deadline of one connection depends on.
struct ConnState {
    accepted: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `accepted` when a call last started or ended.
    last_active_ms: AtomicU64,
    started_a_call: AtomicBool,
    /// The connection's task, woken when a call ends so that it re-arms its
    /// timer to the (maybe earlier) idle deadline.
    waker: AtomicWaker,
}

impl ConnState {
    fn touch(&self) {
        let now = self.accepted.elapsed().as_millis() as u64;
        self.last_active_ms.store(now, Ordering::Relaxed);
    }

    /// When the connection is to be closed; `None` while a call is in progress.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        let timeout = if self.started_a_call.load(Ordering::Relaxed) {
            limits.idle_timeout
        } else {
            limits.handshake_timeout
        };
        Some(self.accepted + last + timeout)
    }
}

/// Marks a call in progress on its connection until dropped.
pub struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.waker.wake();
    }
}

impl Connections {
    pub fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            metrics,
            table: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.table.lock().by_addr.len()
    }

    /// Marks a call as started on the connection from `remote` (if it is one of
    /// ours); the call lasts until the guard is dropped.
    pub fn call_started(&self, remote: Option<SocketAddr>) -> Option<CallGuard> {
        let state = self.table.lock().by_addr.get(&remote?)?.clone();
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.started_a_call.store(true, Ordering::Relaxed);
        state.touch();
        Some(CallGuard(state))
    }

    /// Registers an accepted connection, or says which cap it is over.
    fn admit(self: &Arc<Self>, stream: TcpStream) -> Result<GuardedStream, (TcpStream, Refusal)> {
        let Ok(remote) = stream.peer_addr() else {
            // Already gone; nothing to track.
            return Err((stream, Refusal::Connections));
        };
        let mut table = self.table.lock();
        if table.by_addr.len() >= self.limits.max_total {
            return Err((stream, Refusal::Connections));
        }
        let from_peer = table.per_peer.get(&remote.ip()).copied().unwrap_or(0);
        if from_peer >= self.limits.max_per_peer {
            return Err((stream, Refusal::ConnectionsPerPeer));
        }
        let state = Arc::new(ConnState {
            accepted: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            started_a_call: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        table.by_addr.insert(remote, state.clone());
        *table.per_peer.entry(remote.ip()).or_default() += 1;
        drop(table);
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let first_deadline = state.accepted + self.limits.handshake_timeout;
        Ok(GuardedStream {
            inner: stream,
            remote,
            state,
            connections: self.clone(),
            timer: Box::pin(tokio::time::sleep_until(first_deadline.into())),
        })
    }

    fn forget(&self, remote: SocketAddr) {
        let mut table = self.table.lock();
        if table.by_addr.remove(&remote).is_none() {
            return;
        }
        if let Some(count) = table.per_peer.get_mut(&remote.ip()) {
            *count -= 1;
            if *count == 0 {
                table.per_peer.remove(&remote.ip());
            }
        }
        drop(table);
        self.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// The accepted connections of `listener`, those over a cap refused (with a
    /// GOAWAY saying why when `plaintext`, else simply closed).
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        plaintext: bool,
    ) -> impl Stream<Item = io::Result<GuardedStream>> + Send + 'static {
        futures::stream::unfold(
            (self, listener),
            move |(connections, listener)| async move {
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(error) => {
                            // EMFILE and friends: pause instead of spinning on the error.
                            tracing::warn!(%error, "accepting a connection failed; retrying shortly");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    match connections.admit(stream) {
                        Ok(guarded) => return Some((Ok(guarded), (connections, listener))),
                        Err((stream, reason)) => connections.refuse(stream, reason, plaintext),
                    }
                }
            },
        )
    }

    fn refuse(&self, stream: TcpStream, reason: Refusal, plaintext: bool) {
        self.metrics.refuse(reason);
        let peer = stream.peer_addr().ok();
        let why = match reason {
            Refusal::ConnectionsPerPeer => format!(
                "too many connections from this address: at most {} (--max-connections-per-peer)",
                self.limits.max_per_peer
            ),
            _ => format!(
                "the node holds its most connections, {} (--max-connections); try another replica or later",
                self.limits.max_total
            ),
        };
        tracing::debug!(?peer, %why, "connection refused");
        if plaintext {
            // One non-blocking write: a few bytes always fit an empty socket buffer,
            // and a refusal must cost no task nor wait.
            let _ = stream.try_write(&goaway(&why));
        }
    }
}

/// An HTTP/2 server preface (empty SETTINGS) and a GOAWAY with ENHANCE_YOUR_CALM
/// whose debug data is `why`.
fn goaway(why: &str) -> Vec<u8> {
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let frame = |kind: u8, payload: &[u8]| {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    };
    let mut payload = 0u32.to_be_bytes().to_vec();
    payload.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    payload.extend_from_slice(why.as_bytes());
    let mut out = frame(SETTINGS, &[]);
    out.extend(frame(GOAWAY, &payload));
    out
}

/// An accepted connection: reads fail with `TimedOut` once its deadline passes
/// with no call in progress, which ends it. Unregistered when dropped.
pub struct GuardedStream {
    inner: TcpStream,
    remote: SocketAddr,
    state: Arc<ConnState>,
    connections: Arc<Connections>,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl GuardedStream {
    /// Whether the deadline passed; re-arms the timer otherwise.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limits = self.connections.limits;
        self.state.waker.register(cx.waker());
        if let Some(deadline) = self.state.deadline(&limits)
            && deadline < self.timer.deadline().into_std()
        {
            self.timer.as_mut().reset(deadline.into());
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.state.deadline(&limits) {
                Some(deadline) if deadline <= now => return true,
                Some(deadline) => self.timer.as_mut().reset(deadline.into()),
                // A call is in progress: look again one idle period from now.
                None => self
                    .timer
                    .as_mut()
                    .reset((now + limits.idle_timeout.max(limits.handshake_timeout)).into()),
            }
        }
        false
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.connections.forget(self.remote);
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            self.connections
                .metrics
                .idle_closes
                .fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle past its deadline",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_goaway_frame_is_well_formed() {
        let bytes = goaway("why");
        // SETTINGS: 9-byte header, empty.
        assert_eq!(&bytes[..9], &[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let goaway = &bytes[9..];
        assert_eq!(&goaway[..3], &[0, 0, 11]);
        assert_eq!(goaway[3], 7);
        assert_eq!(&goaway[13..17], &[0, 0, 0, 0xb]);
        assert_eq!(&goaway[17..], b"why");
    }
}
