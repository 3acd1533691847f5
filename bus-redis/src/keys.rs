//! Names of what the bus stores in Redis, all under one prefix `P`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:log` | stream | the log: field `m` = an encoded `ipc.v1.Msg` (without cursor) |
//! | `P:epoch` | string | the log's epoch (hex), set once with `SET NX` |
//! | `P:nodes` | set | names of replicas that published presence |
//! | `P:node:N:alive` | string, expires | present while replica N heartbeats |
//! | `P:node:N:members` | hash, expires | subscriber id → encoded `ipc.v1.Member` |
//! | `P:node:N:exact` | hash, expires | exact channel → number of N's subscribers on it |
//! | `P:node:N:wild` | hash, expires | wildcard pattern → number of N's subscribers on it |
//! | `P:inbox:N` | pub/sub channel | requests, replies and acks for replica N |
//! | `P:op:APP/KEY` | string, expires (1 h) | the ledger of a keyed Gather or Rollout (`StoredOperation`) |
//! | `P:dedup:APP:KEY` | string, expires | a Broadcast key seen: the first message's id, channel, entry, epoch |
//! | `P:lock:NAME` | hash, expires with the lease | the live lease of lock NAME: `fence`, `holder` |
//! | `P:fence` | string, never expires | the last fence granted (all lock names) |
//! | `P:limit:NAME` | hash, expires once full again | token bucket NAME: `tokens`, `ts` (ms, Redis time), and `rate`, `interval`, `burst` for listing |
//! | `P:released` | pub/sub channel | names of locks just released, to wake waiters |
//! | `P:tail:N` | string, expires (60 s) | with `--redis-min-replicas`: the last entry replica N's tail had confirmed on the Redis replicas (written so that `WAIT` covers the entries before it) |

/// Key and channel names for one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    pub log: String,
    pub epoch: String,
    pub nodes: String,
    pub fence: String,
    pub released: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            log: format!("{prefix}:log"),
            epoch: format!("{prefix}:epoch"),
            nodes: format!("{prefix}:nodes"),
            fence: format!("{prefix}:fence"),
            released: format!("{prefix}:released"),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn node_alive(&self, node: &str) -> String {
        format!("{}:node:{node}:alive", self.prefix)
    }

    pub fn node_members(&self, node: &str) -> String {
        format!("{}:node:{node}:members", self.prefix)
    }

    pub fn node_exact(&self, node: &str) -> String {
        format!("{}:node:{node}:exact", self.prefix)
    }

    pub fn node_wild(&self, node: &str) -> String {
        format!("{}:node:{node}:wild", self.prefix)
    }

    /// `scoped` is `app:key`.
    pub fn dedup(&self, scoped: &str) -> String {
        format!("{}:dedup:{scoped}", self.prefix)
    }

    pub fn lock(&self, name: &str) -> String {
        format!("{}:lock:{name}", self.prefix)
    }

    pub fn limit(&self, name: &str) -> String {
        format!("{}:limit:{name}", self.prefix)
    }

    pub fn tail_mark(&self, node: &str) -> String {
        format!("{}:tail:{node}", self.prefix)
    }

    pub fn inbox(&self, node: &str) -> String {
        format!("{}:inbox:{node}", self.prefix)
    }
}
