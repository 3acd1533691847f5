//! Authentication and authorization: who is calling ([`Caller`]) and what it may
//! do ([`Grants`]), the tokens file, and [`TokenIdentity`], the table of that file
//! in force (reloaded whole). Free of any transport: how a gRPC request's bearer
//! secret or client certificate becomes a [`Caller`] is
//! [`crate::grpc::identify`]'s.
//!
//! # The tokens file (TOML)
//!
//! ```toml
//! [[token]]
//! name = "ops"             # the `sender` of its messages; unique
//! app = "shop"             # default app id for channels written ":x" (optional)
//! sha256 = "9f86d08…"      # SHA-256 of the secret, 64 hex digits
//! cert_name = "ops.shop"   # or/and: the CN or a DNS SAN of an mTLS client certificate
//! broadcast = ["shop:>"]   # channels it may Broadcast to
//! send = [":>"]            # targets it may SendMsg to (":" expands with `app`)
//! subscribe = ["shop:>"]   # patterns it may Subscribe to, its own id and role channels included
//! members = true           # may call Members and the `members` built-in
//! lock = ["shop:jobs:>"]   # lock names it may Lock and Unlock
//! limit = ["shop:>"]       # token buckets it may draw from with Limit
//! ```
//!
//! Grants are patterns as in subscriptions (`*` one segment, `>` the rest). A
//! missing list grants nothing. Secrets are never stored: only their SHA-256. A
//! request names its token with `authorization: Bearer <secret>`; a wrong or
//! missing secret is UNAUTHENTICATED, a request its grants do not cover is
//! PERMISSION_DENIED. [`ipc_proto::token::new_token`] makes a secret and its entry.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::channel::{self, Pattern};

/// A tokens file or a secret that cannot be used; the text says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(pub(crate) String);

/// What an authenticated caller may do. [`Caller::grants`] is `None` for
/// unauthenticated callers (loopback or `--insecure`), who may do everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Channels it may Broadcast to.
    pub broadcast: Vec<Pattern>,
    /// Targets it may SendMsg to.
    pub send: Vec<Pattern>,
    /// Patterns it may Subscribe to; each requested pattern must be included in one.
    pub subscribe: Vec<Pattern>,
    /// Whether it may list members.
    pub members: bool,
    /// Lock names it may Lock, renew and Unlock.
    pub lock: Vec<Pattern>,
    /// Bucket names it may call Limit on.
    pub limit: Vec<Pattern>,
}

impl Grants {
    /// Every grant: for callers authenticated by a client certificate when no
    /// tokens file restricts them.
    pub fn all() -> Self {
        let everything = vec![Pattern::parse(">").expect("'>' is a valid pattern")];
        Self {
            broadcast: everything.clone(),
            send: everything.clone(),
            subscribe: everything.clone(),
            members: true,
            lock: everything.clone(),
            limit: everything,
        }
    }

    pub fn may_lock(&self, name: &str) -> bool {
        self.lock.iter().any(|p| p.matches(name))
    }

    pub fn may_limit(&self, name: &str) -> bool {
        self.limit.iter().any(|p| p.matches(name))
    }

    pub fn may_broadcast(&self, channel: &str) -> bool {
        self.broadcast.iter().any(|p| p.matches(channel))
    }

    pub fn may_send(&self, target: &str) -> bool {
        self.send.iter().any(|p| p.matches(target))
    }

    /// Whether every channel `pattern` matches is granted by one subscribe pattern.
    pub fn may_subscribe(&self, pattern: &Pattern) -> bool {
        self.subscribe.iter().any(|g| g.includes(pattern))
    }

    /// Whether a relaying subscriber (id `relayer`, app `app`) with these grants
    /// may list `member`: see [`relayed_claims`].
    pub fn may_relay(&self, member: &ipc_proto::pb::Member, app: &str, relayer: &str) -> bool {
        let node = if member.node.is_empty() {
            relayer
        } else {
            member.node.as_str()
        };
        (member.app.is_empty() || member.app == app)
            && std::iter::once(member.id.clone())
                .chain(relayed_claims(member, app, relayer, node))
                .all(|c| Pattern::parse(&c).is_ok_and(|p| self.may_subscribe(&p)))
    }

    /// The grants as JSON (the `grants` built-in op): patterns as text.
    pub fn to_json(&self) -> serde_json::Value {
        let list = |patterns: &[Pattern]| -> Vec<String> {
            patterns.iter().map(|p| p.as_str().to_string()).collect()
        };
        serde_json::json!({
            "broadcast": list(&self.broadcast),
            "send": list(&self.send),
            "subscribe": list(&self.subscribe),
            "members": self.members,
            "lock": list(&self.lock),
            "limit": list(&self.limit),
        })
    }

    /// Grants from [`Grants::to_json`]; patterns that do not parse are left out.
    pub fn from_json(json: &serde_json::Value) -> Self {
        let list = |key: &str| -> Vec<Pattern> {
            json[key]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|p| Pattern::parse(p.as_str()?).ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            broadcast: list("broadcast"),
            send: list("send"),
            subscribe: list("subscribe"),
            members: json["members"].as_bool().unwrap_or(false),
            lock: list("lock"),
            limit: list("limit"),
        }
    }
}

/// Who is calling, as the transport established it.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// App id from `ipc-app` metadata or the caller's identity.
    pub app: Option<String>,
    /// Name stamped as `sender` on what the caller sends; also the identity that
    /// per-identity limits count.
    pub sender: String,
    /// What an authenticated caller may do; `None` for an unauthenticated caller
    /// (loopback, a pod's socket, `--insecure`), who may do everything.
    pub grants: Option<Arc<Grants>>,
    /// The trace context of the call (`traceparent` metadata): what the operation's
    /// spans and messages are part of. Without it, a message's own `traceparent`
    /// header is used.
    pub trace: Option<crate::telemetry::TraceContext>,
}

impl Caller {
    /// Whether the transport proved who this is (token or certificate), so that
    /// `sender` cannot be spoofed.
    pub fn is_authenticated(&self) -> bool {
        self.grants.is_some()
    }
}

/// The channels a relayed member claims besides its id, each of which its relay
/// must be granted to subscribe to: its role and tag channels (in `app`), its
/// channels, and its node when that is not the relayer's own id.
pub fn relayed_claims(
    member: &ipc_proto::pb::Member,
    app: &str,
    relayer: &str,
    node: &str,
) -> Vec<String> {
    let mut claimed = Vec::new();
    if !member.role.is_empty() {
        claimed.push(format!("{app}:{}", member.role));
        if !member.tag.is_empty() {
            claimed.push(format!("{app}:{}:{}", member.role, member.tag));
        }
    }
    claimed.extend(member.channels.iter().cloned());
    if node != relayer {
        claimed.push(node.to_string());
    }
    claimed
}

/// One entry of the tokens file.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub name: String,
    pub app: Option<String>,
    sha256: Option<[u8; 32]>,
    pub cert_name: Option<String>,
    pub grants: Arc<Grants>,
}

/// The parsed tokens file.
#[derive(Debug, Clone, Default)]
pub struct TokenTable {
    entries: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    token: Vec<EntryFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFormat {
    name: String,
    app: Option<String>,
    sha256: Option<String>,
    cert_name: Option<String>,
    #[serde(default)]
    broadcast: Vec<String>,
    #[serde(default)]
    send: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    members: bool,
    #[serde(default)]
    lock: Vec<String>,
    #[serde(default)]
    limit: Vec<String>,
}

impl TokenTable {
    /// Parses the TOML text of a tokens file; every mistake is refused with the
    /// entry it is in.
    pub fn parse(text: &str) -> Result<Self, AuthError> {
        let file: FileFormat =
            toml::from_str(text).map_err(|e| AuthError(format!("tokens file: {e}")))?;
        let mut entries: Vec<TokenEntry> = Vec::with_capacity(file.token.len());
        for raw in file.token {
            let entry = parse_entry(raw)?;
            if entries.iter().any(|e| e.name == entry.name) {
                return Err(AuthError(format!(
                    "tokens file: two entries are named {:?}; names must be unique (they become the sender)",
                    entry.name
                )));
            }
            if let Some(hash) = entry.sha256
                && entries.iter().any(|e| e.sha256 == Some(hash))
            {
                return Err(AuthError(format!(
                    "tokens file: entry {:?} has the same sha256 as another entry",
                    entry.name
                )));
            }
            if let Some(cert) = &entry.cert_name
                && entries.iter().any(|e| e.cert_name.as_ref() == Some(cert))
            {
                return Err(AuthError(format!(
                    "tokens file: entry {:?} has the same cert_name {cert:?} as another entry",
                    entry.name
                )));
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }

    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AuthError(format!("reading tokens file {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|AuthError(m)| AuthError(format!("{}: {m}", path.display())))
    }

    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry whose hash is the secret's. Compares against every entry in
    /// constant time, so timing tells nothing about which bytes were right.
    pub fn by_secret(&self, secret: &str) -> Option<&TokenEntry> {
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let mut found = None;
        for entry in &self.entries {
            if let Some(expected) = &entry.sha256
                && constant_time_eq(expected, &hash)
                && found.is_none()
            {
                found = Some(entry);
            }
        }
        found
    }

    /// Names of this table's entries that `next` removes or changes (secret,
    /// certificate name, app or grants): their open streams must end.
    pub fn revoked_by(&self, next: &TokenTable) -> Vec<String> {
        self.entries
            .iter()
            .filter(|old| {
                !next.entries.iter().any(|new| {
                    new.name == old.name
                        && new.sha256 == old.sha256
                        && new.cert_name == old.cert_name
                        && new.app == old.app
                        && new.grants == old.grants
                })
            })
            .map(|old| old.name.clone())
            .collect()
    }

    /// The entry mapped to one of a verified client certificate's names.
    pub fn by_certificate(&self, names: &[String]) -> Option<&TokenEntry> {
        names.iter().find_map(|name| {
            self.entries
                .iter()
                .find(|e| e.cert_name.as_deref() == Some(name.as_str()))
        })
    }
}

fn parse_entry(raw: EntryFormat) -> Result<TokenEntry, AuthError> {
    let name = raw.name;
    let context = |m: String| AuthError(format!("tokens file, entry {name:?}: {m}"));
    ipc_proto::token::check_name(&name).map_err(context)?;
    if let Some(app) = &raw.app {
        channel::check_segment("app", app).map_err(context)?;
    }
    let sha256 = raw
        .sha256
        .as_deref()
        .map(parse_hash)
        .transpose()
        .map_err(context)?;
    let cert_name = raw.cert_name.filter(|c| !c.is_empty());
    if sha256.is_none() && cert_name.is_none() {
        return Err(context(
            "has neither sha256 nor cert_name, so nothing can authenticate as it".into(),
        ));
    }
    let expand = |verb: &str, list: &[String]| -> Result<Vec<Pattern>, AuthError> {
        list.iter()
            .map(|p| {
                channel::parse_pattern(p, raw.app.as_deref())
                    .map_err(|e| context(format!("{verb} grant: {e}")))
            })
            .collect()
    };
    let grants = Grants {
        broadcast: expand("broadcast", &raw.broadcast)?,
        send: expand("send", &raw.send)?,
        subscribe: expand("subscribe", &raw.subscribe)?,
        members: raw.members,
        lock: expand("lock", &raw.lock)?,
        limit: expand("limit", &raw.limit)?,
    };
    Ok(TokenEntry {
        app: raw.app.clone(),
        name,
        sha256,
        cert_name,
        grants: Arc::new(grants),
    })
}

fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("sha256 {text:?} is not hex: {e}"))?;
    bytes.try_into().map_err(|bytes: Vec<u8>| {
        format!(
            "sha256 is {} bytes; a SHA-256 is 32 bytes (64 hex digits)",
            bytes.len()
        )
    })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Reads a secret from a file (a mounted Kubernetes Secret, say): surrounding
/// whitespace is dropped, an empty file is refused. For clients such as the
/// sidecar's upstream connection.
pub fn read_secret_file(path: &Path) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuthError(format!("reading secret file {}: {e}", path.display())))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(AuthError(format!(
            "secret file {} is empty",
            path.display()
        )));
    }
    Ok(secret.to_string())
}

/// The names a client certificate (DER) can be known by: its subject's common
/// names, then its DNS subject alternative names. Empty when it cannot be parsed.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_string)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    names.retain(|n| !n.is_empty());
    names.dedup();
    names
}

/// The [`Identify`] of a server with credentials: bearer secrets from a tokens
/// file and, with mTLS, verified client certificates. The table is swapped whole
/// on [`TokenIdentity::reload`], so open streams keep going and each request sees
/// either the old file or the new one.
pub struct TokenIdentity {
    path: Option<PathBuf>,
    table: RwLock<Arc<TokenTable>>,
    trust_any_certificate: bool,
}

impl TokenIdentity {
    /// Callers authenticate with a secret of, or a certificate mapped by, the
    /// tokens file at `path`.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, AuthError> {
        let path = path.into();
        let table = TokenTable::load(&path)?;
        Ok(Self {
            path: Some(path),
            table: RwLock::new(Arc::new(table)),
            trust_any_certificate: false,
        })
    }

    /// A fixed table (tests, embedding).
    pub fn from_table(table: TokenTable) -> Self {
        Self {
            path: None,
            table: RwLock::new(Arc::new(table)),
            trust_any_certificate: false,
        }
    }

    /// mTLS without a tokens file: any certificate the client CA verified is a
    /// caller named after the certificate, with every grant.
    pub fn certificates_only() -> Self {
        Self {
            path: None,
            table: RwLock::default(),
            trust_any_certificate: true,
        }
    }

    /// Re-reads the tokens file. On error the previous table stays in force.
    /// Returns the number of entries now in force.
    pub fn reload(&self) -> Result<usize, AuthError> {
        self.reload_revoking().map(|(entries, _)| entries)
    }

    /// As [`Self::reload`], and names the tokens the new file removed or changed
    /// (see [`TokenTable::revoked_by`]).
    pub fn reload_revoking(&self) -> Result<(usize, Vec<String>), AuthError> {
        let Some(path) = &self.path else {
            return Ok((self.table.read().len(), Vec::new()));
        };
        let table = TokenTable::load(path)?;
        let entries = table.len();
        let previous = std::mem::replace(&mut *self.table.write(), Arc::new(table));
        let revoked = previous.revoked_by(&self.table());
        Ok((entries, revoked))
    }

    /// The file reloads read, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The table in force.
    pub fn table(&self) -> Arc<TokenTable> {
        self.table.read().clone()
    }

    /// Whether a verified client certificate that no entry maps is a caller named
    /// after it, with every grant ([`Self::certificates_only`]).
    pub fn trusts_any_certificate(&self) -> bool {
        self.trust_any_certificate
    }
}

#[cfg(test)]
mod tests;
