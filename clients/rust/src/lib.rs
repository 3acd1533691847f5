//! The Rust client of fleet-ipc, the control-plane message bus, and the `ipcctl` CLI
//! built on it.
//!
//! A [`Client`] talks to a node — the control-plane server over TCP, or the pod's
//! sidecar over a Unix socket — with JSON payloads (`serde_json::Value`) and typed
//! errors ([`Error`]): broadcast to a channel, ask one subscriber and wait for its
//! reply, answer requests, list members, ask a whole fleet (`gather`) or roll
//! through it in waves (`rollout`). [`Client::subscribe`] returns a stream that
//! reconnects and resumes from its cursor by itself, and [`Handlers`] dispatches what
//! it receives to functions registered by op, answering requests with their result.
//!
//! ```no_run
//! use futures::StreamExt;
//! use ipc_client::{Client, SubscribeOptions};
//! use serde_json::json;
//!
//! # async fn demo() -> Result<(), ipc_client::Error> {
//! let client = Client::builder("http://127.0.0.1:7700").app("shop").connect().await?;
//! let mut messages = client.subscribe(SubscribeOptions::new().role("worker"));
//! client.broadcast(":worker", "worker:restart", json!({})).await?;
//! while let Some(msg) = messages.next().await {
//!     let msg = msg?;
//!     println!("{} on {}: {}", msg.op, msg.channel, msg.data);
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`addr`]: the address forms (`http://host:port`, socket path, `unix:PATH`).
//! - `client`: [`Client`], its builder, and the calls (`broadcast`, `send_msg`,
//!   `reply`, `members`) with their metadata (`ipc-app`, bearer token) and deadlines.
//! - `subscribe`: [`Subscription`], the self-healing Subscribe stream, with
//!   [`SubscribeOptions`] and [`Backoff`].
//! - `coord`: [`Lease`] and [`LimitAnswer`]: `lock`, `renew`, `unlock`, `limit`.
//! - `fleetops`: `gather` and `rollout` ([`Operation`]), their [`Ledger`],
//!   [`Outcome`]s and [`RolloutEvents`].
//! - `handlers`: [`Handlers`], dispatch by op (`on`, `emit`, `run`).
//! - `msg`: [`Msg`], [`Member`], [`Broadcasted`]: the values callers see, JSON-friendly.
//! - `error`: [`Error`], one variant per outcome a caller handles differently.
//! - `trace_context`: the caller's trace context (`tracing` span or OpenTelemetry
//!   context) sent as W3C `traceparent` metadata on every call (feature
//!   `opentelemetry`, on by default).
//! - `src/bin/ipcctl/`: the operator's CLI (feature `cli`, on by default), a module per
//!   job (see its `main.rs`).

pub mod addr;
mod client;
mod coord;
mod error;
mod fleetops;
mod handlers;
mod msg;
mod publish;
mod subscribe;
mod trace_context;

pub use addr::Address;
pub use client::{
    BROADCAST_ATTEMPTS, Broadcast, Client, ClientBuilder, DEFAULT_TIMEOUT, MembersFilter, Reply,
    SendMsg,
};
pub use coord::{Lease, LimitAnswer};
pub use error::{Error, code_name};
pub use fleetops::{
    Gather, GatherKind, Ledger, LedgerState, Operation, Outcome, OutcomeStatus, Rollout,
    RolloutEvent, RolloutEvents, RolloutKind,
};
pub use handlers::{HandlerResult, Handlers};
pub use ipc_proto::backoff::{Backoff, Jitter};
pub use msg::{Broadcasted, Member, Msg, OP_GAP, OP_REPLY_ERROR, OP_SUBSCRIBED};
pub use publish::Publication;
pub use subscribe::{SubscribeOptions, Subscription};
