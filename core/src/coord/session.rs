//! The lifetime of a caller's connection, for leases tied to it.
//!
//! A server that tracks its connections (the sidecar on the pod socket) makes a
//! [`SessionGuard`] per accepted connection and keeps it with the connection's IO:
//! when the connection ends — the process closed it, exited or crashed — the guard
//! is dropped and every clone of its [`Session`] sees [`Session::ended`]. The
//! session reaches the service as the connection's [`LocalConnection`] info.

use tokio::sync::watch;

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
/// [`crate::service::IpcService`] reads either.
#[derive(Debug, Clone)]
pub struct LocalConnection {
    pub uds: tonic::transport::server::UdsConnectInfo,
    pub session: Session,
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
