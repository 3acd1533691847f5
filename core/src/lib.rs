//! The fleet-ipc node: everything the control-plane server and the sidecar share.
//!
//! A node serves `ipc.v1.Ipc` to its local clients. What differs between the server
//! and the sidecar is only the [`bus::Bus`] that carries messages between nodes.
//!
//! # Layout
//! - [`channel`]: channel names, the `:` app prefix, patterns with `*` and `>`.
//! - [`cursor`]: positions in the bus log, handed out for resume.
//! - [`hub`]: live subscribers, fan-out with bounded queues, pending requests;
//!   [`pattern_index`]: the trie that finds the wildcard patterns matching a channel.
//! - [`queue`]: a subscriber's queue, bounded in messages and bytes of memory;
//!   [`msg_size`]: the memory a message really takes.
//! - [`bus`]: the bus trait; [`local`]: the narrow handle a bus delivers through
//!   (fan-out, `ipc:gap`, requests from other nodes, replies, local members);
//!   [`memory`]: the in-memory bus of a node alone.
//! - [`error`]: what a caller learns ([`NodeError`]) and what a bus reports
//!   ([`error::BusError`], [`error::RequestError`], [`error::ReplyError`]); a leaf.
//! - [`node`]: the operations of `ipc.v1.Ipc` over a hub and a bus: its config,
//!   the input rules every operation checks (`node::rules`), requests
//!   answered in the node in one order (`node::answer`: hooks, local responders,
//!   built-ins), SendMsg and Reply, Subscribe with its replay; with the `clap`
//!   feature, the node's flags both binaries take (`node::args`).
//! - [`publish`]: Broadcast's submission and idempotency keys.
//! - [`notice`]: `ipc:subscribed` and `ipc:gap`, built and read in one place.
//! - [`responders`]: who takes requests (responders) and who only watches.
//! - [`grpc`]: the tonic adapter: who is calling (metadata, peer, tokens and
//!   certificates), the `Ipc` service over a node with errors mapped to status
//!   codes, the Publish stream, and that service as servers mount it.
//! - [`mount`]: what every node serves (`ipc.v1.Ipc`, health, reflection), on TCP
//!   and Unix listeners, with the same limits, status mapping and drain.
//! - [`fleetops`]: Gather and Rollout, their ledgers and keys.
//! - [`logging`]: the binaries' `tracing` set-up.
//! - [`telemetry`]: W3C trace context in metadata and headers, spans per hop,
//!   exported over OTLP when an endpoint is set.
//! - [`metrics`]: counters in the Prometheus text format.
//! - [`auth`]: who is calling and what it may do (caller, grants), the tokens file;
//!   [`revocation`]: the streams of a revoked token ended.
//! - [`limits`]: the per-identity request rate limit.
//! - [`text`]: control and direction-override characters refused in client text.
//! - [`members`]: Members answers capped to what a response may hold.
//! - [`connections`]: TCP connections capped per peer and in total, closed when
//!   they start no call in time or stay idle.
//! - [`admission`]: the layer before the service: credentials from the headers
//!   before any body is read, a deadline and a budget for request bodies.
//! - [`coord`]: `Lock`, `Unlock`, `Limit`: leases with fencing numbers and shared
//!   token buckets, their rules and the in-node state.

pub mod admission;
pub mod auth;
pub mod bus;
pub mod channel;
pub mod connections;
pub mod coord;
pub mod cursor;
pub mod error;
pub mod fleetops;
pub mod grpc;
pub mod hub;
pub mod limits;
pub mod local;
pub mod logging;
pub mod members;
pub mod memory;
pub mod metrics;
pub mod mount;
pub mod msg_size;
pub mod node;
pub mod notice;
pub mod outbound;
pub mod pattern_index;
pub mod publish;
pub mod queue;
pub mod responders;
pub mod revocation;
pub mod telemetry;
pub mod text;

pub use auth::Caller;
pub use bus::Bus;
pub use error::NodeError;
pub use node::{Node, NodeConfig};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
