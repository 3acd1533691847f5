//! The fleet-ipc contract: code generated from `ipc/v1/ipc.proto` (package `ipc.v1`)
//! and the few helpers every part needs around it.
//!
//! # Layout
//! - [`pb`]: the generated messages, the `Ipc` client and server.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC reflection.
//! - [`json`]: conversions between `google.protobuf.Value` and `serde_json::Value`,
//!   for CLIs, hooks and logs that speak JSON.

/// Generated code for package `ipc.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ipc.v1");
}

/// The encoded `FileDescriptorSet` of the contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ipc_descriptor.bin"));

pub mod json;

pub use prost_types;
