//! What can go wrong, as callers match on it: one variant per outcome a program
//! reacts to differently, mapped from the gRPC status in one place.

pub use ipc_proto::code_name;
use tonic::{Code, Status};

use crate::Msg;

/// An error from a fleet-ipc call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address, app id or token given to the client is unusable; nothing was sent.
    #[error("{0}")]
    Config(String),
    /// `send_msg`: nobody is subscribed to the target. Returned at once, not after the
    /// timeout.
    #[error("no responders for target {target:?}")]
    NoResponders {
        /// The target as the caller gave it.
        target: String,
    },
    /// The call's deadline passed: for `send_msg`, no reply arrived in time.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// `send_msg`: the responder answered, reporting a failure in `error`. The whole
    /// reply is kept: it may carry data and headers too.
    #[error("reply carried error: {}", .0.error)]
    ReplyError(Box<Msg>),
    /// The node could not be reached, the connection broke, or the node is shutting down.
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// The node rejected the input (bad channel, empty op, …) and said why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The caller is known but not allowed to do this.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The caller did not prove who it is (missing or bad token).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The request conflicts with state the node keeps for it: an operation key
    /// used before for a different operation (another target, op, data or labels,
    /// or the other kind). Use a new key.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Another call holds what this one needs: a Rollout with this key is still
    /// running; or a subscription was replaced by a newer one with the same id.
    #[error("aborted: {0}")]
    Aborted(String),
    /// Any other status from the node (NOT_FOUND for a late reply, RESOURCE_EXHAUSTED
    /// for an oversized message, …).
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Other(Status),
}

impl Error {
    /// Classifies a status returned for a call. `target` is the `send_msg` target, used
    /// for [`Error::NoResponders`].
    pub(crate) fn from_status(status: Status, target: &str) -> Error {
        // Statuses produced locally by the transport (connect refused, broken
        // connection, h2 errors) carry their cause as `source`; statuses sent by a
        // node never do. Whatever their code, they mean the node was not reached.
        if let Some(cause) = std::error::Error::source(&status) {
            return Error::Unreachable(transport_message(&status, cause));
        }
        let message = status.message().to_owned();
        match status.code() {
            Code::Unavailable if message.contains("no responders") => Error::NoResponders {
                target: target.to_owned(),
            },
            Code::Unavailable => Error::Unreachable(if message.is_empty() {
                "unavailable".to_owned()
            } else {
                message
            }),
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::Aborted => Error::Aborted(message),
            _ => Error::Other(status),
        }
    }

    /// The gRPC code this error corresponds to, for logs and for callers that speak
    /// gRPC codes.
    pub fn code(&self) -> Code {
        match self {
            Error::Config(_) | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NoResponders { .. } | Error::Unreachable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::ReplyError(_) => Code::Ok,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::Other(status) => status.code(),
        }
    }

    /// Whether a subscription should reconnect after this error rather than give up:
    /// the node may come back, or the stream was cut for being slow. ABORTED is not:
    /// a node sends it when another subscription took over the same id, and coming
    /// back would take it over in turn, forever.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable(_) | Error::DeadlineExceeded(_) => true,
            Error::Other(status) => matches!(
                status.code(),
                Code::ResourceExhausted | Code::Internal | Code::Unknown | Code::Cancelled
            ),
            _ => false,
        }
    }
}

/// The most specific text of a transport failure: hyper's outer errors say only
/// "transport error", the useful part ("Connection refused") is deeper in the chain.
fn transport_message(status: &Status, cause: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest = cause.to_string();
    let mut next = cause.source();
    while let Some(err) = next {
        deepest = err.to_string();
        next = err.source();
    }
    if status.message().is_empty() || status.message() == deepest {
        deepest
    } else {
        format!("{}: {deepest}", status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_responders_is_told_apart_from_other_unavailable() {
        let err = Error::from_status(Status::unavailable("no responders for \"x\""), "x");
        assert!(matches!(&err, Error::NoResponders { target } if target == "x"));
        assert_eq!(err.to_string(), "no responders for target \"x\"");
        let err = Error::from_status(Status::unavailable("shutting down"), "x");
        assert!(matches!(err, Error::Unreachable(m) if m == "shutting down"));
    }

    #[test]
    fn server_codes_map_to_their_variants() {
        let cases = [
            (Status::deadline_exceeded("late"), Code::DeadlineExceeded),
            (
                Status::invalid_argument("bad channel"),
                Code::InvalidArgument,
            ),
            (Status::permission_denied("no"), Code::PermissionDenied),
            (Status::unauthenticated("who"), Code::Unauthenticated),
            (Status::not_found("unknown reply_to"), Code::NotFound),
            (Status::failed_precondition("key"), Code::FailedPrecondition),
            (Status::aborted("in use"), Code::Aborted),
        ];
        for (status, code) in cases {
            let err = Error::from_status(status, "");
            assert_eq!(err.code(), code, "{err}");
        }
        let err = Error::from_status(Status::not_found("unknown reply_to"), "");
        assert_eq!(err.to_string(), "NOT_FOUND: unknown reply_to");
    }

    #[test]
    fn local_transport_failures_are_unreachable_whatever_their_code() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = Status::from_error(Box::new(refused));
        // io errors without a Status in the chain come back as UNKNOWN with a source.
        let err = Error::from_status(status, "");
        assert!(
            matches!(&err, Error::Unreachable(m) if m.contains("refused")),
            "{err}"
        );
    }

    #[test]
    fn slow_consumer_and_lost_connection_are_transient_bad_input_is_not() {
        assert!(Error::from_status(Status::resource_exhausted("slow"), "").is_transient());
        assert!(Error::from_status(Status::unavailable("bye"), "").is_transient());
        assert!(!Error::from_status(Status::invalid_argument("bad"), "").is_transient());
        assert!(!Error::from_status(Status::permission_denied("no"), "").is_transient());
        assert!(!Error::from_status(Status::aborted("replaced"), "").is_transient());
    }
}
