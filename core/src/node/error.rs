//! Why an operation failed, as the caller should learn it, and how channel and bus
//! errors become one.

use crate::bus::{BusError, ReplyError, RequestError};
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
