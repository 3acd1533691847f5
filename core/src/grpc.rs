//! The gRPC adapter: `ipc.v1.Ipc` over tonic for a [`crate::node::Node`]. The node
//! and its bus know nothing of tonic; what a request's metadata and connection
//! mean, and which status code a refusal becomes, is decided here.
//!
//! # Layout
//! - [`identify`]: who is calling — the [`identify::Identify`] the service asks,
//!   the connection's [`identify::Peer`], trusted metadata and the tokens file's
//!   bearer secrets and client certificates.
//! - [`service`]: the tonic `Ipc` service over a node, errors mapped to status
//!   codes. No logic of its own.
//! - [`publish`]: the Publish stream, answered in order with a bounded window.
//! - [`decode`]: its requests decoded, the plain ones without prost's general path.
//! - [`send_msgs`]: the SendMsgs stream, each request answered when its reply is in.
//! - [`server`]: that service as servers mount it, Subscribe streams sending each
//!   message encoded once for all subscribers.

pub mod decode;
pub mod identify;
pub mod publish;
pub mod send_msgs;
pub mod server;
pub mod service;
