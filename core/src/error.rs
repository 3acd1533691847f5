//! The errors of the node and of its bus: what a caller learns ([`NodeError`]) and
//! what the bus reports ([`BusError`], [`RequestError`], [`ReplyError`]), and how
//! they become one; why the node ended a subscriber's stream ([`Closed`]). A leaf: every module may name them, they name none of the
//! node's modules.

use crate::channel;

/// Why an operation failed, as the caller should learn it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    /// A size or rate limit (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    TooLarge(String),
    /// The caller's grants do not cover the request.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NoResponders(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    /// The request conflicts with state kept for it (a key used differently).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another call holds what this one needs (a keyed operation still running).
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Internal(String),
}

impl From<channel::ChannelError> for NodeError {
    fn from(e: channel::ChannelError) -> Self {
        NodeError::InvalidArgument(e.to_string())
    }
}

impl From<BusError> for NodeError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Unavailable(m) => NodeError::Unavailable(m),
            BusError::BadCursor(m) => NodeError::InvalidArgument(m),
            BusError::Internal(m) => NodeError::Internal(m),
            BusError::Refused(e) => e,
        }
    }
}

impl From<RequestError> for NodeError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::NoResponders(_) => NodeError::NoResponders(e.to_string()),
            RequestError::DeadlineExceeded(_) => NodeError::DeadlineExceeded(e.to_string()),
            RequestError::Unavailable(m) => NodeError::Unavailable(m),
        }
    }
}

impl From<ReplyError> for NodeError {
    fn from(e: ReplyError) -> Self {
        match e {
            ReplyError::NotFound(_) => NodeError::NotFound(e.to_string()),
            ReplyError::Unavailable(m) => NodeError::Unavailable(m),
        }
    }
}

/// A failure of the bus itself (not of the caller's input).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The bus cannot reach its backend now; the caller may retry.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The caller's cursor makes no sense for this log.
    #[error("{0}")]
    BadCursor(String),
    #[error("bus error: {0}")]
    Internal(String),
    /// The node behind the bus (a sidecar's control plane) refused the request
    /// itself; the caller sees that refusal, with its status.
    #[error("{0}")]
    Refused(NodeError),
}

/// Why a request could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("no responders for {0:?}")]
    NoResponders(String),
    #[error("no reply from {0:?} before the deadline")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Why a reply could not be delivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReplyError {
    #[error(
        "no pending request {0:?}: the caller gave up (deadline passed), it was answered already, or the id is unknown"
    )]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Why the node ended a subscriber's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Its queue was full: it did not keep up.
    SlowConsumer,
    /// A newer subscription with the same id took over.
    Replaced,
    /// The node is shutting down.
    Shutdown,
    /// The token that opened it was removed from (or changed in) the tokens file.
    Revoked,
}
