//! The lifetime of a caller's connection, for leases tied to it.
//!
//! A server that tracks its connections (the sidecar on the pod socket) makes a
//! [`SessionGuard`] per accepted connection and keeps it with the connection's IO:
//! when the connection ends — the process closed it, exited or crashed — the guard
//! is dropped and every clone of its [`Session`] sees [`Session::ended`]. The
//! session reaches the service as the connection's [`LocalConnection`] info.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::{Stream, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::transport::server::Connected;

/// Ends the session when dropped; owned by the connection's IO.
#[derive(Debug)]
pub struct SessionGuard {
    _alive: watch::Sender<()>,
}

/// A handle on one connection's lifetime; cheap to clone.
#[derive(Debug, Clone)]
pub struct Session {
    id: u64,
    alive: watch::Receiver<()>,
}

impl Session {
    /// A new session and the guard that ends it. `id` names the connection in logs.
    pub fn new(id: u64) -> (SessionGuard, Session) {
        let (tx, rx) = watch::channel(());
        (SessionGuard { _alive: tx }, Session { id, alive: rx })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether the connection is gone.
    pub fn is_ended(&self) -> bool {
        self.alive.has_changed().is_err()
    }

    /// Returns once the connection is gone.
    pub async fn ended(&self) {
        let mut alive = self.alive.clone();
        while alive.changed().await.is_ok() {}
    }
}

/// The connect info of a tracked Unix-socket connection: what tonic's own
/// `UdsConnectInfo` says (the peer's credentials), and the connection's session.
/// [`crate::grpc::service::IpcService`] reads either.
#[derive(Debug, Clone)]
pub struct LocalConnection {
    pub uds: tonic::transport::server::UdsConnectInfo,
    pub session: Session,
}

/// A Unix-socket connection with a session: ends the session when dropped, which
/// hyper does once the connection is over.
pub struct SessionStream {
    stream: UnixStream,
    info: LocalConnection,
    _guard: SessionGuard,
}

impl Connected for SessionStream {
    type ConnectInfo = LocalConnection;

    fn connect_info(&self) -> LocalConnection {
        self.info.clone()
    }
}

impl AsyncRead for SessionStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SessionStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections a Unix listener accepts, each with its own session.
pub fn session_incoming(
    listener: UnixListener,
) -> impl Stream<Item = std::io::Result<SessionStream>> + Send + 'static {
    let next_id = AtomicU64::new(1);
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(move |accepted| {
        let stream = accepted?;
        let uds = stream.connect_info();
        let (guard, session) = Session::new(next_id.fetch_add(1, Ordering::Relaxed));
        Ok(SessionStream {
            stream,
            info: LocalConnection { uds, session },
            _guard: guard,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_ends_when_its_guard_is_dropped() {
        let (guard, session) = Session::new(7);
        let copy = session.clone();
        assert!(!copy.is_ended());
        let waiting = tokio::spawn(async move { copy.ended().await });
        drop(guard);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the session ended")
            .unwrap();
        assert!(session.is_ended());
        assert_eq!(session.id(), 7);
    }
}
