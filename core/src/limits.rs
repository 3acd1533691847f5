//! Requests per second per identity: a token bucket per caller.
//!
//! Each identity (a token name, a certificate name, or for unauthenticated
//! callers their `ipc-sender` or address) has a bucket of `burst` requests that
//! refills at `per_second`. The table is bounded: when it holds
//! [`MAX_TRACKED`] identities, full buckets (identities idle long enough to have
//! refilled, indistinguishable from new ones) are dropped first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Most identities tracked at once.
pub const MAX_TRACKED: usize = 100_000;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `per_second` requests per second on average, up to `burst` at once (at
    /// least one).
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    pub fn per_second(&self) -> u32 {
        self.per_second as u32
    }

    /// Takes one request from `identity`'s bucket at `now`; when it is empty,
    /// returns how long until the next request would be admitted.
    pub fn check(&self, identity: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock();
        if !buckets.contains_key(identity) && buckets.len() >= MAX_TRACKED {
            self.forget_idle(&mut buckets, now);
        }
        let bucket = buckets.entry(identity.to_string()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }

    fn forget_idle(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let refill = |b: &Bucket| {
            b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * self.per_second
        };
        buckets.retain(|_, b| refill(b) < self.burst);
        if buckets.len() >= MAX_TRACKED {
            // Every tracked identity is busy: start over rather than grow without
            // bound (callers get a fresh burst, which errs on the lenient side).
            buckets.clear();
        }
    }

    /// Identities tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_refill_rate() {
        let limiter = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("a", t0).is_ok());
        }
        let wait = limiter.check("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100));
        // Another identity has its own bucket.
        assert!(limiter.check("b", t0).is_ok());
        // 100 ms later one request's worth has refilled, not more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(limiter.check("a", t1).is_ok());
        assert!(limiter.check("a", t1).is_err());
        // Long idle: back to a full burst, never more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.check("a", t2).is_ok());
        }
        assert!(limiter.check("a", t2).is_err());
    }
}
