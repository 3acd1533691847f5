//! Revoked tokens: a tokens-file reload that removes or changes a token ends every
//! stream that token opened. Subscribe and Serve streams are subscribers, ended
//! through the hub ([`crate::hub::Hub::close_owner`]); streams that keep acting
//! for their caller without being subscribers (Publish) watch [`Revocations`].
//!
//! A stream takes its [`RevocationWatch`] *before* its caller is authenticated, so
//! a reload that lands in between is never missed; the price is that a stream
//! opened with the new secret during the reload may be ended too, and reconnects.

use std::collections::HashMap;

use tokio::sync::watch;

use crate::auth::Caller;

/// The revocations of one node: which token names were revoked, and when.
pub struct Revocations {
    log: watch::Sender<RevocationLog>,
}

#[derive(Debug, Default)]
struct RevocationLog {
    /// Bumped by every revocation.
    generation: u64,
    /// The generation at which each name was last revoked.
    revoked_at: HashMap<String, u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            log: watch::Sender::new(RevocationLog::default()),
        }
    }
}

impl Revocations {
    /// Records that `names` were revoked: watches taken before now whose caller is
    /// one of them complete.
    pub fn revoke(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        self.log.send_modify(|log| {
            log.generation += 1;
            for name in names {
                log.revoked_at.insert(name.clone(), log.generation);
            }
        });
    }

    /// A watch for a caller not yet authenticated: see the module docs.
    pub fn watch(&self) -> RevocationWatch {
        let log = self.log.subscribe();
        let since = log.borrow().generation;
        RevocationWatch { log, since }
    }
}

/// Completes when the token of a stream's caller is revoked after the watch was taken.
pub struct RevocationWatch {
    log: watch::Receiver<RevocationLog>,
    since: u64,
}

impl RevocationWatch {
    /// Completes once `caller`'s token is revoked; never for an unauthenticated
    /// caller (it has no token to revoke).
    pub async fn revoked(&mut self, caller: &Caller) {
        if !caller.is_authenticated() {
            return std::future::pending().await;
        }
        loop {
            let revoked = self
                .log
                .borrow_and_update()
                .revoked_at
                .get(&caller.sender)
                .is_some_and(|at| *at > self.since);
            if revoked {
                return;
            }
            if self.log.changed().await.is_err() {
                // The node is gone: nothing will be revoked any more.
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt as _;
    use std::sync::Arc;

    fn caller(name: &str) -> Caller {
        Caller {
            app: None,
            sender: name.into(),
            grants: Some(Arc::default()),
            ..Caller::default()
        }
    }

    /// Whether the watch has completed for `caller` (the log is read at once).
    fn completes(watch: &mut RevocationWatch, caller: &Caller) -> bool {
        watch.revoked(caller).now_or_never().is_some()
    }

    #[test]
    fn only_the_revoked_token_and_only_watches_taken_before() {
        let revocations = Revocations::default();
        let mut before = revocations.watch();
        revocations.revoke(&["ops".into()]);
        let mut after = revocations.watch();
        assert!(completes(&mut before, &caller("ops")));
        assert!(!completes(&mut before, &caller("other")));
        assert!(!completes(&mut after, &caller("ops")));
        let unauthenticated = Caller {
            grants: None,
            ..caller("ops")
        };
        assert!(!completes(&mut revocations.watch(), &unauthenticated));
    }
}
