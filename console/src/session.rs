//! Console sessions: a random id in an HttpOnly, SameSite=Strict cookie names a
//! server-side entry holding the token the person logged in with and the CSRF
//! token their page must echo on every action.
//!
//! The token stays on the server: the browser holds only the session id, and the
//! token is presented to the node's identity on every request, so a token removed
//! from the tokens file (SIGHUP) stops working in open sessions too.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Name of the session cookie.
pub const COOKIE: &str = "ipc_console";
/// Header an action must carry, equal to the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A session ends after this long without a request.
const IDLE: Duration = Duration::from_secs(8 * 3600);
/// ...and after this long in any case.
const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Most sessions kept at once; the least recently used goes first.
const MAX_SESSIONS: usize = 1024;

/// What a logged-in browser is.
#[derive(Clone)]
pub struct Session {
    /// The bearer secret given at login; `None` on a server without tokens.
    pub secret: Option<String>,
    /// Echoed by the page in [`CSRF_HEADER`] on every action.
    pub csrf: String,
    created: Instant,
    seen: Instant,
}

impl std::fmt::Debug for Session {
    // The secret never reaches a log, even through a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The sessions of one console (one replica: a load balancer in front of several
/// consoles needs session affinity).
#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Sessions {
    /// Opens a session for `secret`; returns its id (for the cookie).
    pub fn open(&self, secret: Option<String>) -> String {
        let now = Instant::now();
        let id = random_hex();
        let mut sessions = self.by_id.lock();
        sessions.retain(|_, s| live(s, now));
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.seen)
                .map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                secret,
                csrf: random_hex(),
                created: now,
                seen: now,
            },
        );
        id
    }

    /// The live session named by `id`, marked as seen now.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let mut sessions = self.by_id.lock();
        let session = sessions.get_mut(id)?;
        if !live(session, now) {
            sessions.remove(id);
            return None;
        }
        session.seen = now;
        Some(session.clone())
    }

    pub fn close(&self, id: &str) {
        self.by_id.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.by_id.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live(session: &Session, now: Instant) -> bool {
    now.duration_since(session.seen) < IDLE && now.duration_since(session.created) < LIFETIME
}

/// The session id in a request's `Cookie` headers, if any.
pub fn cookie_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value that stores session `id`; `secure` over HTTPS.
pub fn set_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}")
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// Compares a CSRF token in constant time.
pub fn csrf_matches(expected: &str, given: &str) -> bool {
    expected.len() == given.len()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_and_closed() {
        let sessions = Sessions::default();
        let id = sessions.open(Some("ipct_secret".into()));
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            format!("other=1; {COOKIE}={id}").parse().unwrap(),
        );
        let found = cookie_id(&headers).unwrap();
        let session = sessions.get(&found).unwrap();
        assert_eq!(session.secret.as_deref(), Some("ipct_secret"));
        assert!(!format!("{session:?}").contains("ipct_secret"));
        assert!(csrf_matches(&session.csrf, &session.csrf.clone()));
        assert!(!csrf_matches(&session.csrf, "nope"));
        sessions.close(&found);
        assert!(sessions.get(&found).is_none());
        assert!(sessions.get("made-up").is_none());
    }

    #[test]
    fn the_cookie_is_http_only_and_same_site_strict() {
        let cookie = set_cookie("abc", true);
        assert!(cookie.contains("HttpOnly"));
        assert!(cookie.contains("SameSite=Strict"));
        assert!(cookie.contains("Secure"));
        assert!(!set_cookie("abc", false).contains("Secure"));
    }

    #[test]
    fn the_store_stays_bounded() {
        let sessions = Sessions::default();
        for _ in 0..MAX_SESSIONS + 10 {
            sessions.open(None);
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
    }
}
