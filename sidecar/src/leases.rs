//! Lock, Unlock and Limit through the pod socket: relayed to the control plane,
//! so leases and buckets are fleet-wide (the holder upstream is the pod's id).
//!
//! A lease a local process took is tied to that process's connection (its
//! [`Session`]): the sidecar renews it upstream every third of its TTL while the
//! connection lives, and releases it as soon as the connection ends — a process
//! that crashed frees its lock at once, not only after the TTL. A lease the process
//! released itself, or that was lost (a renewal refused), is forgotten.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_core::bus::BusError;
use ipc_core::coord::{LimitAnswer, LimitSpec, LockAnswer, LockSpec, Session, UnlockSpec};
use ipc_proto::pb::{LimitRequest, LockRequest, UnlockRequest};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::upstream::{Upstream, bus_error};

/// A lease renewed for a local connection.
struct Held {
    ttl_ms: u32,
    /// Stops the renewal without releasing (the process released it itself).
    stop: CancellationToken,
}

/// The leases the pod's processes hold, by (name, fence).
#[derive(Default)]
pub(crate) struct Leases {
    held: Arc<Mutex<HashMap<(String, u64), Held>>>,
}

impl Leases {
    pub async fn lock(&self, upstream: &Upstream, spec: LockSpec) -> Result<LockAnswer, BusError> {
        let wait = spec.wait_until.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        });
        let request = LockRequest {
            name: spec.name.clone(),
            ttl_ms: spec.ttl_ms,
            wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            fence: spec.fence,
        };
        // The control plane answers a wait that ran out with acquired: false before
        // this deadline; the margin covers the trip.
        let timeout = wait + upstream.call_timeout();
        let (mut client, call) = upstream.call(request, timeout)?;
        let answer = client
            .lock(call)
            .await
            .map_err(|status| bus_error("lock", &status))?
            .into_inner();
        if answer.acquired
            && let Some(session) = spec.session
        {
            self.keep(upstream, &spec.name, answer.fence, spec.ttl_ms, session);
        }
        Ok(answer)
    }

    pub async fn unlock(&self, upstream: &Upstream, spec: UnlockSpec) -> Result<bool, BusError> {
        if let Some(held) = self.held.lock().remove(&(spec.name.clone(), spec.fence)) {
            held.stop.cancel();
        }
        release(upstream, &spec.name, spec.fence).await
    }

    pub async fn limit(
        &self,
        upstream: &Upstream,
        name: &str,
        spec: LimitSpec,
    ) -> Result<LimitAnswer, BusError> {
        let request = LimitRequest {
            name: name.to_string(),
            rate: spec.rate,
            interval_ms: spec.interval_ms,
            burst: spec.burst,
            cost: spec.cost,
        };
        let (mut client, call) = upstream.call(request, upstream.call_timeout())?;
        Ok(client
            .limit(call)
            .await
            .map_err(|status| bus_error("limit", &status))?
            .into_inner())
    }

    /// Renews (name, fence) while `session` lives, then releases it. A renewal by
    /// the process itself only updates the TTL.
    fn keep(&self, upstream: &Upstream, name: &str, fence: u64, ttl_ms: u32, session: Session) {
        let key = (name.to_string(), fence);
        let stop = {
            let mut held = self.held.lock();
            if let Some(existing) = held.get_mut(&key) {
                existing.ttl_ms = ttl_ms;
                return;
            }
            let stop = CancellationToken::new();
            held.insert(
                key.clone(),
                Held {
                    ttl_ms,
                    stop: stop.clone(),
                },
            );
            stop
        };
        let held = self.held.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let (name, fence) = &key;
            loop {
                let ttl_ms = match held.lock().get(&key) {
                    Some(h) => h.ttl_ms,
                    None => return,
                };
                let period = Duration::from_millis(u64::from(ttl_ms / 3).max(1));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = session.ended() => {
                        held.lock().remove(&key);
                        match release(&upstream, name, *fence).await {
                            Ok(released) => tracing::info!(lock = %name, fence, released, session = session.id(), "local connection ended; lock released"),
                            Err(error) => tracing::warn!(lock = %name, fence, %error, "local connection ended; releasing the lock failed, it ends with its TTL"),
                        }
                        return;
                    }
                    () = tokio::time::sleep(period) => {}
                }
                match renew(&upstream, name, *fence, ttl_ms).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(lock = %name, fence, "lease lost: the control plane refused its renewal");
                        held.lock().remove(&key);
                        return;
                    }
                    // Try again next period: the lease lasts ttl, renewals come every third.
                    Err(error) => {
                        tracing::warn!(lock = %name, fence, %error, "renewing a lease failed; retrying")
                    }
                }
            }
        });
    }
}

async fn renew(upstream: &Upstream, name: &str, fence: u64, ttl_ms: u32) -> Result<bool, BusError> {
    let request = LockRequest {
        name: name.to_string(),
        ttl_ms,
        wait_ms: 0,
        fence,
    };
    let (mut client, call) = upstream.call(request, upstream.call_timeout())?;
    let answer = client
        .lock(call)
        .await
        .map_err(|status| bus_error("lock", &status))?
        .into_inner();
    Ok(answer.acquired && answer.fence == fence)
}

async fn release(upstream: &Upstream, name: &str, fence: u64) -> Result<bool, BusError> {
    let request = UnlockRequest {
        name: name.to_string(),
        fence,
    };
    let (mut client, call) = upstream.call(request, upstream.call_timeout())?;
    Ok(client
        .unlock(call)
        .await
        .map_err(|status| bus_error("unlock", &status))?
        .into_inner()
        .released)
}
