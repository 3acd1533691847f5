//! Coordination: fleet-wide leases with fencing numbers (`Lock`, `Unlock`) and
//! shared token buckets (`Limit`), transport-free.
//!
//! The rules live here once; buses only store the state:
//! - [`LockSpec`], [`UnlockSpec`], [`LimitSpec`]: a request once validated
//!   ([`lock_spec`], [`unlock_spec`], [`limit_spec`]), the name expanded with the
//!   caller's app and checked with the channel-name rules.
//! - [`MemoryCoord`]: the in-node implementation, the default of
//!   [`crate::Bus::lock`], [`crate::Bus::unlock`] and [`crate::Bus::limit`]. The
//!   Redis bus keeps the same state in Redis with scripts that follow the same rules.
//! - [`InUse`]: the leases and buckets in use, listed for people (the admin
//!   console; no RPC lists them), filtered by the caller's grants in [`Node::in_use`].
//! - [`Session`]: the lifetime of a caller's connection, for a node that ties leases
//!   to it (the sidecar releases a lock once the local process that took it is gone).
//!
//! # The lease rules
//! - A free (or expired) name is granted with a new fence, larger than every fence
//!   granted for that name before; the lease lasts `ttl`.
//! - A request carrying the fence of the live lease renews it: same fence, new
//!   expiry. When the caller is authenticated, it must also be the holder.
//! - Anything else is refused (`acquired: false`, with the holder and its expiry
//!   but never its fence) or, with a wait, retried when the lease is released or
//!   expires.
//! - Unlock frees the lease only for the live lease's fence (and holder, as above).
//!
//! Fences are at least the grant's time in microseconds and one more than the last
//! one given, so they keep growing even where the counter itself was lost.

mod bucket;
mod in_use;
mod memory;
mod ops;
mod session;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipc_proto::pb::{LimitRequest, LockRequest, UnlockRequest};

use crate::channel;
use crate::error::NodeError;
use crate::metrics::Metrics;
#[cfg(doc)]
use crate::node::Node;

pub use bucket::{Bucket, BucketAnswer};
pub use in_use::{BucketInfo, InUse, LeaseInfo, MAX_LISTED};
pub use memory::MemoryCoord;
pub use session::{LocalConnection, Session, SessionGuard, SessionStream, session_incoming};

/// The longest lease accepted (`ttl_ms`): one hour. Longer work renews.
pub const MAX_TTL_MS: u32 = 3_600_000;
/// Limit interval when `interval_ms` is 0.
pub const DEFAULT_INTERVAL_MS: u32 = 1000;
/// The longest limit interval accepted: one day.
pub const MAX_INTERVAL_MS: u32 = 86_400_000;

/// A validated Lock request.
#[derive(Clone)]
pub struct LockSpec {
    /// The lock's name, expanded (`:x` → `app:x`).
    pub name: String,
    pub ttl_ms: u32,
    /// The fence of the lease held, to renew it; 0 for a fresh attempt.
    pub fence: u64,
    /// Who asks: the caller's identity (`Msg.sender`).
    pub holder: String,
    /// Whether `holder` is proven (token or certificate): renewing then also needs
    /// the same holder, not only the fence.
    pub proven: bool,
    /// Until when to wait for the lock; `None`: answer at once.
    pub wait_until: Option<Instant>,
    /// The caller's connection, when the node tracks it.
    pub session: Option<Session>,
    /// Where a waiting call is counted (`ipc_lock_waiters`).
    pub metrics: Option<Arc<Metrics>>,
}

impl LockSpec {
    /// Counts this call in `ipc_lock_waiters` until the guard is dropped: a bus
    /// calls it once the lease was refused and the call goes to sleep.
    pub fn count_waiting(&self) -> Option<impl Drop + use<>> {
        struct Counted(Arc<Metrics>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.lock_waiters.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let metrics = self.metrics.clone()?;
        metrics.lock_waiters.fetch_add(1, Ordering::Relaxed);
        Some(Counted(metrics))
    }
}

/// A validated Unlock request.
#[derive(Debug, Clone)]
pub struct UnlockSpec {
    pub name: String,
    pub fence: u64,
    pub holder: String,
    pub proven: bool,
}

/// A validated Limit request, defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSpec {
    pub rate: u32,
    pub interval_ms: u32,
    pub burst: u32,
    pub cost: u32,
}

/// Whether a limit call was allowed, the whole tokens left, and when to retry.
pub use ipc_proto::pb::LimitResponse as LimitAnswer;
/// What a lock call decided: whether the lease is the caller's (then `fence` is
/// its fence), who holds it and until when (ms since the epoch).
pub use ipc_proto::pb::LockResponse as LockAnswer;

/// Validates a Lock request. `app` expands a leading `:`; `wait_until` is the
/// caller's wait already bounded by its gRPC deadline.
pub fn lock_spec(
    req: &LockRequest,
    app: Option<&str>,
    holder: &str,
    proven: bool,
    wait_until: Option<Instant>,
) -> Result<LockSpec, NodeError> {
    let name = name(&req.name)?;
    let name = channel::parse_name(&name, app).map_err(|e| invalid("name", e))?;
    check_ttl(req.ttl_ms)?;
    Ok(LockSpec {
        name,
        ttl_ms: req.ttl_ms,
        fence: req.fence,
        holder: holder.to_string(),
        proven,
        wait_until,
        session: None,
        metrics: None,
    })
}

/// Validates an Unlock request.
pub fn unlock_spec(
    req: &UnlockRequest,
    app: Option<&str>,
    holder: &str,
    proven: bool,
) -> Result<UnlockSpec, NodeError> {
    let name = name(&req.name)?;
    let name = channel::parse_name(&name, app).map_err(|e| invalid("name", e))?;
    if req.fence == 0 {
        return Err(NodeError::InvalidArgument(
            "fence is 0: give the fence Lock answered".into(),
        ));
    }
    Ok(UnlockSpec {
        name,
        fence: req.fence,
        holder: holder.to_string(),
        proven,
    })
}

/// Validates a Limit request and applies its defaults; returns the expanded name.
pub fn limit_spec(req: &LimitRequest, app: Option<&str>) -> Result<(String, LimitSpec), NodeError> {
    let name = name(&req.name)?;
    let name = channel::parse_name(&name, app).map_err(|e| invalid("name", e))?;
    if req.rate == 0 {
        return Err(NodeError::InvalidArgument(
            "rate is 0: give how many calls are allowed per interval_ms".into(),
        ));
    }
    let interval_ms = match req.interval_ms {
        0 => DEFAULT_INTERVAL_MS,
        ms if ms > MAX_INTERVAL_MS => {
            return Err(NodeError::InvalidArgument(format!(
                "interval_ms {ms} is above the largest accepted, {MAX_INTERVAL_MS} ms (a day)"
            )));
        }
        ms => ms,
    };
    let burst = if req.burst == 0 { req.rate } else { req.burst };
    let cost = req.cost.max(1);
    if cost > burst {
        return Err(NodeError::InvalidArgument(format!(
            "cost {cost} is above burst {burst}: such a call could never be allowed"
        )));
    }
    Ok((
        name,
        LimitSpec {
            rate: req.rate,
            interval_ms,
            burst,
            cost,
        },
    ))
}

/// The raw name, refused early when empty so the message names the field.
fn name(raw: &str) -> Result<String, NodeError> {
    if raw.is_empty() {
        return Err(NodeError::InvalidArgument(
            "name is empty: name the lock or limit, like \"shop:db-migrate\"".into(),
        ));
    }
    Ok(raw.to_string())
}

fn invalid(field: &str, error: channel::ChannelError) -> NodeError {
    NodeError::InvalidArgument(format!("{field}: {error}"))
}

fn check_ttl(ttl_ms: u32) -> Result<(), NodeError> {
    if ttl_ms == 0 {
        return Err(NodeError::InvalidArgument(
            "ttl_ms is 0: give how long the lease lasts unless renewed".into(),
        ));
    }
    if ttl_ms > MAX_TTL_MS {
        return Err(NodeError::InvalidArgument(format!(
            "ttl_ms {ttl_ms} is above the largest accepted, {MAX_TTL_MS} ms (an hour); renew instead"
        )));
    }
    Ok(())
}

/// The smallest fence a grant made now may carry: the time in microseconds, so
/// that fences keep growing even after their counter was lost (a node restart,
/// a Redis that lost its data).
pub fn fence_floor() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// How long a waiting Lock sleeps at most between two attempts when no release
/// was announced (a lost notification, a lease that expired): the bound of the
/// re-check.
pub const RECHECK: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(name: &str, ttl_ms: u32) -> Result<String, NodeError> {
        lock_spec(
            &LockRequest {
                name: name.into(),
                ttl_ms,
                ..LockRequest::default()
            },
            Some("shop"),
            "me",
            false,
            None,
        )
        .map(|spec| spec.name)
    }

    fn message(result: Result<impl std::fmt::Debug, NodeError>) -> String {
        match result {
            Err(NodeError::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn lock_names_follow_channel_rules_and_expand_the_app() {
        assert_eq!(lock(":db-migrate", 1000).unwrap(), "shop:db-migrate");
        assert!(message(lock("", 1000)).starts_with("name is empty"));
        assert!(message(lock("shop:*", 1000)).starts_with("name: "));
        assert!(message(lock("a b", 1000)).starts_with("name: "));
    }

    #[test]
    fn ttl_must_be_set_and_bounded() {
        assert!(message(lock("x", 0)).starts_with("ttl_ms is 0"));
        assert!(message(lock("x", MAX_TTL_MS + 1)).starts_with("ttl_ms "));
        assert!(lock("x", MAX_TTL_MS).is_ok());
    }

    #[test]
    fn unlock_needs_a_fence() {
        let req = UnlockRequest {
            name: "x".into(),
            fence: 0,
        };
        assert!(message(unlock_spec(&req, None, "me", false)).starts_with("fence is 0"));
    }

    #[test]
    fn limit_defaults_and_refusals() {
        let req = |rate, interval_ms, burst, cost| LimitRequest {
            name: "mail".into(),
            rate,
            interval_ms,
            burst,
            cost,
        };
        let (_, spec) = limit_spec(&req(100, 0, 0, 0), None).unwrap();
        assert_eq!(
            spec,
            LimitSpec {
                rate: 100,
                interval_ms: 1000,
                burst: 100,
                cost: 1
            }
        );
        assert!(message(limit_spec(&req(0, 0, 0, 0), None)).starts_with("rate is 0"));
        assert!(
            message(limit_spec(&req(1, MAX_INTERVAL_MS + 1, 0, 0), None))
                .starts_with("interval_ms")
        );
        assert!(message(limit_spec(&req(10, 0, 5, 6), None)).starts_with("cost 6"));
    }
}
