//! Bearer tokens as a tokens file holds them: a secret is [`SECRET_PREFIX`] and 64
//! random hex digits, the file keeps only its SHA-256 ([`hash_secret`]) under a
//! readable name ([`check_name`]). [`new_token`] makes a secret and its entry; it
//! lives here, with the contract, so that `ipcctl token new` needs no node.

use sha2::{Digest, Sha256};

/// Prefix of secrets made by [`new_token`], so that secret scanners can spot them.
pub const SECRET_PREFIX: &str = "ipct_";

/// A token name: it becomes the `sender` of messages, so it is kept readable.
pub fn check_name(name: &str) -> Result<(), String> {
    crate::names::check_segment("token name", name)
}

/// The SHA-256 of a secret in hex, as the tokens file stores it.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random secret for a token named `name`, and the tokens-file entry that
/// accepts it (granting nothing until its lists are filled in). Backs
/// `ipcctl token new NAME`: print the secret once, append the entry to the file.
pub fn new_token(name: &str) -> Result<(String, String), String> {
    check_name(name)?;
    let secret = format!("{SECRET_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
    let entry = format!(
        r#"[[token]]
name = "{name}"
sha256 = "{hash}"
# app = "shop"          # default app id for channels written ":x"
broadcast = []          # channels it may Broadcast to, e.g. ["shop:>"]
send = []               # targets it may SendMsg to, e.g. ["shop:>"]
subscribe = []          # patterns it may Subscribe to, e.g. ["shop:>"]
members = false         # whether it may list members
lock = []               # lock names it may Lock and Unlock, e.g. ["shop:jobs:>"]
limit = []              # rate-limit buckets it may use, e.g. ["shop:>"]
"#,
        hash = hash_secret(&secret),
    );
    Ok((secret, entry))
}
