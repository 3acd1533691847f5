//! Fleet-wide coordination calls: leases with fencing tokens ([`Client::lock`],
//! [`Client::renew`], [`Client::unlock`]) and a shared token bucket ([`Client::limit`]).

use std::time::Duration;

use ipc_proto::pb;

use crate::{Client, Error};

/// The answer to [`Client::lock`] or [`Client::renew`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lock's name, as asked (a leading `:` is expanded by the node).
    pub name: String,
    /// Whether the caller holds the lock now. When not, `holder` and `expires_ms`
    /// describe the current holder and `fence` is 0.
    pub acquired: bool,
    /// Grows with every grant of this name: hand it to the resources the lock
    /// protects, which refuse writes carrying an older one.
    pub fence: u64,
    pub holder: String,
    /// When the lease ends unless renewed, in ms since the epoch.
    pub expires_ms: i64,
}

/// The answer to [`Client::limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitAnswer {
    pub allowed: bool,
    /// Tokens left in the bucket after this call.
    pub remaining: u32,
    /// When refused: how long until the cost is available.
    pub retry_after: Duration,
}

/// Milliseconds for a request field; anything too long is sent as `u32::MAX`, which
/// the node refuses with INVALID_ARGUMENT naming the field.
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

impl Client {
    /// Takes the lock `name` for `ttl`, waiting up to `wait` for the current holder
    /// to release it (zero: answer at once). Not being granted the lock is not an
    /// error: check [`Lease::acquired`]. Keep it with [`Client::renew`] before
    /// `expires_ms`; behind the sidecar the lease is also renewed for you while the
    /// connection lives.
    pub async fn lock(
        &self,
        name: impl Into<String>,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, Error> {
        self.lock_call(name.into(), ttl, wait, 0).await
    }

    /// Extends a held lease to `ttl` from now. Answers `acquired: false` if the lease
    /// with this fence is no longer held (it expired and someone else took it).
    pub async fn renew(
        &self,
        name: impl Into<String>,
        fence: u64,
        ttl: Duration,
    ) -> Result<Lease, Error> {
        self.lock_call(name.into(), ttl, Duration::ZERO, fence)
            .await
    }

    async fn lock_call(
        &self,
        name: String,
        ttl: Duration,
        wait: Duration,
        fence: u64,
    ) -> Result<Lease, Error> {
        let request = pb::LockRequest {
            name: name.clone(),
            ttl_ms: millis(ttl),
            wait_ms: millis(wait),
            fence,
        };
        let timeout = self.settings.timeout + wait;
        let mut rpc = self.rpc.clone();
        let response = self
            .unary(timeout, "", rpc.lock(self.request(request, timeout)))
            .await?;
        Ok(Lease {
            name,
            acquired: response.acquired,
            fence: response.fence,
            holder: response.holder,
            expires_ms: response.expires_ms,
        })
    }

    /// Releases the lock held with `fence`. `false` when that lease was no longer
    /// held (expired, or released already): nothing was changed.
    pub async fn unlock(&self, name: impl Into<String>, fence: u64) -> Result<bool, Error> {
        let request = pb::UnlockRequest {
            name: name.into(),
            fence,
        };
        let timeout = self.settings.timeout;
        let mut rpc = self.rpc.clone();
        let response = self
            .unary(timeout, "", rpc.unlock(self.request(request, timeout)))
            .await?;
        Ok(response.released)
    }

    /// Draws `cost` tokens from the fleet-wide bucket `name`, refilled at `rate`
    /// tokens per `interval` up to `burst`. Zero picks the node's default for
    /// `interval` (1 s), `burst` (= rate) and `cost` (1). A refusal is not an error:
    /// check [`LimitAnswer::allowed`].
    pub async fn limit(
        &self,
        name: impl Into<String>,
        rate: u32,
        interval: Duration,
        burst: u32,
        cost: u32,
    ) -> Result<LimitAnswer, Error> {
        let request = pb::LimitRequest {
            name: name.into(),
            rate,
            interval_ms: millis(interval),
            burst,
            cost,
        };
        let timeout = self.settings.timeout;
        let mut rpc = self.rpc.clone();
        let response = self
            .unary(timeout, "", rpc.limit(self.request(request, timeout)))
            .await?;
        Ok(LimitAnswer {
            allowed: response.allowed,
            remaining: response.remaining,
            retry_after: Duration::from_millis(response.retry_after_ms.into()),
        })
    }
}
