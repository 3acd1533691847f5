//! The Redis bus: any number of `ipc-server` replicas sharing one Redis behave as
//! one control plane.
//!
//! - **The log** is a Redis Stream. A broadcast is acknowledged once its `XADD`
//!   succeeded; concurrent appends are batched into one pipeline per round trip by a
//!   single writer task. Every replica tails the stream with `XREAD BLOCK` and hands
//!   entries to its node in stream order — a replica's own broadcasts reach its
//!   subscribers that way too, so all replicas see one order.
//! - **Cursors** are `EPOCH.MS-LO`: an entry holds the messages of one write round
//!   trip, and `MS-LO` names the entry (`MS-SEQ`) and the index in it (`LO = SEQ ×
//!   1024 + index`); the random epoch kept in Redis changes when Redis lost its
//!   data, so stale cursors get `ipc:gap`.
//! - **Presence**: each replica keeps its subscribers and their channel patterns in
//!   Redis hashes that expire unless heartbeated; `Members` and request routing read
//!   them fleet-wide in one script call.
//! - **Requests** cross replicas through per-replica pub/sub inboxes, carrying the
//!   remaining deadline, and are answered by the node's own request path;
//!   replies and their acknowledgements come back the same way.
//! - **Coordination**: leases with fencing numbers and token buckets live in Redis,
//!   each decision one script; releases are announced on pub/sub to wake waiters.
//! - **Health** is SERVING only while the command link, the tail, the inbox and the
//!   presence all work; every connection reconnects by itself with backoff.
//!
//! # Layout
//! - [`config`]: [`RedisBusConfig`], what the server's flags set.
//! - `keys`: names of everything stored in Redis under the prefix.
//! - `endpoint`: where the primary is and how to reach it (TLS, credentials);
//!   every connection asks it, and moves when the primary does.
//! - `link`: the shared command connection, reconnection with backoff, the bus's
//!   health made of its parts.
//! - `log`: entry ids and encoding, the epoch; `log::writer` the batching writer,
//!   `log::tail` the tail and losses at failover, `log::replay` replay.
//! - `dedup`: idempotency keys, checked and recorded with the append in one script.
//! - `metrics`: the bus's families in the replica's `/metrics`.
//! - `presence`: publishing this replica's subscribers; fleet-wide members and routes.
//! - `inbox`: the wire format between replicas and the inbox listener.
//! - `coord`: Lock, Unlock and Limit as Redis scripts; release notices.
//! - [`bus`]: [`RedisBus`], the [`ipc_core::Bus`] tying them together, and
//!   [`bus::ConfigError`].

pub mod bus;
pub mod config;
mod coord;
mod dedup;
mod endpoint;
mod inbox;
mod keys;
mod link;
mod log;
mod metrics;
mod presence;

pub use bus::RedisBus;
pub use config::{RedisBusConfig, Secret, SentinelAuth, Target, TlsFiles};
pub use coord::LIMIT_SCRIPT;
pub use log::entry_messages;
