//! The fleet-ipc contract: code generated from `ipc/v1/ipc.proto` (package `ipc.v1`)
//! and the few helpers every part needs around it.
//!
//! # Layout
//! - [`pb`]: the generated messages, the `Ipc` client and server.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, served by gRPC reflection.
//! - [`json`]: conversions between `google.protobuf.Value` and `serde_json::Value`,
//!   for CLIs, hooks and logs that speak JSON.
//! - [`code_name`]: a status code as gRPC spells it (`NOT_FOUND`), for every place
//!   that shows one to people or to JSON.
//! - [`backoff`]: the pauses between reconnection attempts of every client of the
//!   contract (the Rust client, the sidecar's upstream, the Redis bus).
//! - [`duration`]: durations as every command line writes them (`500ms`, `1.5s`, `10m`).
//! - [`names`]: the characters of names (channel segments, app ids, roles, tokens).
//! - [`token`]: bearer secrets and tokens-file entries as `ipcctl token new` makes
//!   them and the server checks them.

/// Generated code for package `ipc.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("ipc.v1");
}

/// The encoded `FileDescriptorSet` of the contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ipc_descriptor.bin"));

pub mod backoff;
pub mod duration;
pub mod json;
pub mod names;
pub mod token;

pub use prost_types;

/// A gRPC status code's name as the gRPC spec (and grpcurl) spells it, e.g.
/// `NOT_FOUND`: how operators search for it, in errors, JSON and metric labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::code_name;

    #[test]
    fn code_names_as_grpc_spells_them() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
    }
}
