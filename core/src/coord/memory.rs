//! [`MemoryCoord`]: leases and buckets kept in the node, for a node alone.
//!
//! Waiters sleep on the name's [`Notify`], woken by a release or by the lease's
//! expiry time (a timer set to the expiry the holder has now, not a polling tick).
//! Fences come from one counter for all names, started from the clock, so they
//! only grow per name, across restarts of the node too. Names neither held nor
//! awaited are forgotten; buckets once idle long enough to be full again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::bucket::Bucket;
use super::{
    BucketInfo, InUse, LeaseInfo, LimitAnswer, LimitSpec, LockAnswer, LockSpec, UnlockSpec,
    fence_floor,
};

/// Most buckets kept before idle (full) ones are swept.
const SWEEP_AT: usize = 10_000;

struct Lease {
    fence: u64,
    holder: String,
    expires_ms: i64,
}

#[derive(Default)]
struct Name {
    lease: Option<Lease>,
    released: Arc<Notify>,
    waiters: usize,
}

#[derive(Default)]
struct State {
    names: HashMap<String, Name>,
    last_fence: u64,
    buckets: HashMap<String, (LimitSpec, Bucket)>,
}

/// The in-node coordination state.
pub struct MemoryCoord {
    state: Mutex<State>,
    /// The buckets' clock: monotonic, so a wall-clock step refills nothing.
    started: Instant,
}

impl Default for MemoryCoord {
    fn default() -> Self {
        Self::new()
    }
}

/// Undoes a waiter's registration however its wait ends.
struct Waiting<'a> {
    coord: &'a MemoryCoord,
    name: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.coord.state.lock();
        if let Some(entry) = state.names.get_mut(self.name) {
            entry.waiters -= 1;
            if entry.waiters == 0 && entry.lease.is_none() {
                state.names.remove(self.name);
            }
        }
    }
}

impl MemoryCoord {
    pub fn new() -> Self {
        Self {
            state: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// Grants, renews or refuses at once; with `wait_until`, waits for a release
    /// (or the holder's expiry) until then.
    pub async fn lock(&self, spec: &LockSpec) -> LockAnswer {
        let Some(until) = spec.wait_until else {
            return self.try_lock(spec);
        };
        let (released, _waiting) = {
            let mut state = self.state.lock();
            let entry = state.names.entry(spec.name.clone()).or_default();
            entry.waiters += 1;
            (
                entry.released.clone(),
                Waiting {
                    coord: self,
                    name: &spec.name,
                },
            )
        };
        let mut counted = None;
        loop {
            // Armed before the attempt: a release right after it still wakes us.
            let notified = released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let answer = self.try_lock(spec);
            if answer.acquired || Instant::now() >= until {
                return answer;
            }
            if counted.is_none() {
                counted = Some(spec.count_waiting());
            }
            let expiry = Instant::now()
                + Duration::from_millis((answer.expires_ms - crate::now_ms()).max(0) as u64);
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(until.min(expiry).into()) => {}
            }
        }
    }

    fn try_lock(&self, spec: &LockSpec) -> LockAnswer {
        let now = crate::now_ms();
        let mut state = self.state.lock();
        let state = &mut *state;
        let entry = state.names.entry(spec.name.clone()).or_default();
        if let Some(lease) = entry.lease.as_mut().filter(|l| l.expires_ms > now) {
            if spec.fence != 0
                && spec.fence == lease.fence
                && (!spec.proven || spec.holder == lease.holder)
            {
                lease.expires_ms = now + i64::from(spec.ttl_ms);
                return granted(lease);
            }
            return LockAnswer {
                acquired: false,
                fence: 0,
                holder: lease.holder.clone(),
                expires_ms: lease.expires_ms,
            };
        }
        let fence = (state.last_fence + 1).max(fence_floor());
        state.last_fence = fence;
        let lease = entry.lease.insert(Lease {
            fence,
            holder: spec.holder.clone(),
            expires_ms: now + i64::from(spec.ttl_ms),
        });
        granted(lease)
    }

    /// Frees the lease if `spec` carries its fence (and holder, when proven).
    pub fn unlock(&self, spec: &UnlockSpec) -> bool {
        let now = crate::now_ms();
        let mut state = self.state.lock();
        let Some(entry) = state.names.get_mut(&spec.name) else {
            return false;
        };
        let ours = entry.lease.as_ref().is_some_and(|l| {
            l.expires_ms > now && l.fence == spec.fence && (!spec.proven || l.holder == spec.holder)
        });
        if !ours {
            return false;
        }
        entry.lease = None;
        entry.released.notify_waiters();
        if entry.waiters == 0 {
            state.names.remove(&spec.name);
        }
        true
    }

    /// One call on the bucket `name`.
    pub fn limit(&self, name: &str, spec: &LimitSpec) -> LimitAnswer {
        let now = self.clock_ms();
        let mut state = self.state.lock();
        if state.buckets.len() >= SWEEP_AT && !state.buckets.contains_key(name) {
            state
                .buckets
                .retain(|_, (spec, bucket)| now - bucket.at_ms < Bucket::idle_ms(spec) as f64);
        }
        let (kept, bucket) = state
            .buckets
            .entry(name.to_string())
            .or_insert_with(|| (*spec, Bucket::full(spec, now)));
        *kept = *spec;
        let answer = bucket.take(spec, now);
        LimitAnswer {
            allowed: answer.allowed,
            remaining: answer.remaining,
            retry_after_ms: answer.retry_after_ms,
        }
    }

    /// The live leases and the buckets not full again, at most `max` of each.
    pub fn in_use(&self, max: usize) -> InUse {
        let now = crate::now_ms();
        let clock = self.clock_ms();
        let state = self.state.lock();
        let locks = state
            .names
            .iter()
            .filter_map(|(name, entry)| {
                let lease = entry.lease.as_ref().filter(|l| l.expires_ms > now)?;
                Some(LeaseInfo {
                    name: name.clone(),
                    holder: lease.holder.clone(),
                    fence: lease.fence,
                    expires_ms: lease.expires_ms,
                })
            })
            .collect();
        let limits = state
            .buckets
            .iter()
            .filter_map(|(name, (spec, bucket))| BucketInfo::of(name, spec, bucket, clock))
            .collect();
        InUse {
            locks,
            limits,
            truncated: false,
        }
        .finish(max)
    }

    fn clock_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }
}

fn granted(lease: &Lease) -> LockAnswer {
    LockAnswer {
        acquired: true,
        fence: lease.fence,
        holder: lease.holder.clone(),
        expires_ms: lease.expires_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, fence: u64) -> LockSpec {
        LockSpec {
            name: "shop:job".into(),
            ttl_ms: 60_000,
            fence,
            holder: holder.into(),
            proven: false,
            wait_until: None,
            session: None,
            metrics: None,
        }
    }

    fn unlock(fence: u64) -> UnlockSpec {
        UnlockSpec {
            name: "shop:job".into(),
            fence,
            holder: "a".into(),
            proven: false,
        }
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_fences_grow() {
        let coord = MemoryCoord::new();
        let first = coord.lock(&spec("a", 0)).await;
        assert!(first.acquired);
        let refused = coord.lock(&spec("b", 0)).await;
        assert!(!refused.acquired);
        assert_eq!(refused.holder, "a");
        assert_eq!(refused.fence, 0, "a refusal never tells the holder's fence");
        assert!(!coord.unlock(&unlock(first.fence + 1)));
        assert!(coord.unlock(&unlock(first.fence)));
        assert!(!coord.unlock(&unlock(first.fence)), "released once");
        let second = coord.lock(&spec("b", 0)).await;
        assert!(second.acquired && second.fence > first.fence);
    }

    #[tokio::test]
    async fn renewal_keeps_the_fence_and_needs_it() {
        let coord = MemoryCoord::new();
        let first = coord.lock(&spec("a", 0)).await;
        let renewed = coord.lock(&spec("a", first.fence)).await;
        assert!(renewed.acquired);
        assert_eq!(renewed.fence, first.fence);
        assert!(renewed.expires_ms >= first.expires_ms);
        let mut proven = spec("b", first.fence);
        proven.proven = true;
        assert!(
            !coord.lock(&proven).await.acquired,
            "a proven caller must be the holder"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_the_release() {
        let coord = Arc::new(MemoryCoord::new());
        let first = coord.lock(&spec("a", 0)).await;
        let mut waiting = spec("b", 0);
        waiting.wait_until = Some(Instant::now() + Duration::from_secs(30));
        let waiter = tokio::spawn({
            let coord = coord.clone();
            async move { coord.lock(&waiting).await }
        });
        // Release only once the waiter is registered.
        while coord
            .state
            .lock()
            .names
            .get("shop:job")
            .map_or(0, |n| n.waiters)
            == 0
        {
            tokio::task::yield_now().await;
        }
        assert!(coord.unlock(&unlock(first.fence)));
        let answer = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the release, long before the lease's 60 s")
            .unwrap();
        assert!(answer.acquired && answer.fence > first.fence);
        assert_eq!(answer.holder, "b");
    }

    #[tokio::test]
    async fn an_expired_lease_is_granted_again() {
        let coord = MemoryCoord::new();
        let mut short = spec("a", 0);
        short.ttl_ms = 30;
        let first = coord.lock(&short).await;
        let mut waiting = spec("b", 0);
        waiting.wait_until = Some(Instant::now() + Duration::from_secs(30));
        let answer = coord.lock(&waiting).await;
        assert!(answer.acquired && answer.fence > first.fence);
        assert!(
            !coord.unlock(&unlock(first.fence)),
            "an expired fence frees nothing"
        );
    }

    #[tokio::test]
    async fn in_use_lists_live_leases_and_buckets_not_full() {
        let coord = MemoryCoord::new();
        let lease = coord.lock(&spec("a", 0)).await;
        let limit = LimitSpec {
            rate: 1,
            interval_ms: 60_000,
            burst: 3,
            cost: 1,
        };
        coord.limit("mail", &limit);
        let in_use = coord.in_use(10);
        assert_eq!(
            in_use.locks,
            [LeaseInfo {
                name: "shop:job".into(),
                holder: "a".into(),
                fence: lease.fence,
                expires_ms: lease.expires_ms,
            }]
        );
        assert_eq!(in_use.limits.len(), 1);
        assert_eq!((in_use.limits[0].tokens, in_use.limits[0].burst), (2, 3));
        assert!(coord.unlock(&unlock(lease.fence)));
        assert!(
            coord.in_use(10).locks.is_empty(),
            "a released lease is gone"
        );
    }

    #[test]
    fn limits_share_one_bucket_per_name() {
        let coord = MemoryCoord::new();
        let spec = LimitSpec {
            rate: 1,
            interval_ms: 60_000,
            burst: 3,
            cost: 1,
        };
        let allowed = (0..10)
            .filter(|_| coord.limit("mail", &spec).allowed)
            .count();
        assert_eq!(allowed, 3);
        let refused = coord.limit("mail", &spec);
        assert!(refused.retry_after_ms > 0);
        assert!(coord.limit("other", &spec).allowed);
    }
}
