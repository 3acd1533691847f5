//! The token bucket of `Limit`: `burst` tokens at most, refilled at `rate` per
//! `interval_ms`; a call takes `cost` tokens or is refused with the time until
//! enough are back. The Redis bus runs the same arithmetic in a script.

use super::LimitSpec;

/// One bucket's state: tokens (fractional) as of `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at_ms: f64,
}

/// The outcome of one call on a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketAnswer {
    pub allowed: bool,
    /// Whole tokens left after the call.
    pub remaining: u32,
    /// When a refused call could succeed, in ms (0 when allowed).
    pub retry_after_ms: u32,
}

impl Bucket {
    /// A full bucket, as a name never used (or idle long enough) is.
    pub fn full(spec: &LimitSpec, now_ms: f64) -> Self {
        Self {
            tokens: f64::from(spec.burst),
            at_ms: now_ms,
        }
    }

    /// Refills for the time since the last call, then takes `cost` if there is
    /// enough. A clock that went back refills nothing.
    pub fn take(&mut self, spec: &LimitSpec, now_ms: f64) -> BucketAnswer {
        let per_ms = f64::from(spec.rate) / f64::from(spec.interval_ms);
        self.tokens = self.refilled(spec, now_ms);
        self.at_ms = self.at_ms.max(now_ms);
        let cost = f64::from(spec.cost);
        if self.tokens >= cost {
            self.tokens -= cost;
            BucketAnswer {
                allowed: true,
                remaining: self.tokens.floor() as u32,
                retry_after_ms: 0,
            }
        } else {
            BucketAnswer {
                allowed: false,
                remaining: self.tokens.floor() as u32,
                retry_after_ms: ((cost - self.tokens) / per_ms).ceil().max(1.0) as u32,
            }
        }
    }

    /// The tokens at `now_ms`: refilled for the time since the last call, at most
    /// `burst`. A clock that went back refills nothing.
    pub fn refilled(&self, spec: &LimitSpec, now_ms: f64) -> f64 {
        let per_ms = f64::from(spec.rate) / f64::from(spec.interval_ms);
        let elapsed = (now_ms - self.at_ms).max(0.0);
        (self.tokens + elapsed * per_ms).min(f64::from(spec.burst))
    }

    /// How long after its last call a bucket is full again, so can be forgotten.
    pub fn idle_ms(spec: &LimitSpec) -> u64 {
        (u64::from(spec.burst) * u64::from(spec.interval_ms)).div_ceil(u64::from(spec.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: LimitSpec = LimitSpec {
        rate: 10,
        interval_ms: 1000,
        burst: 5,
        cost: 1,
    };

    #[test]
    fn burst_then_refill_at_rate() {
        let mut bucket = Bucket::full(&SPEC, 0.0);
        for left in (0..5).rev() {
            let answer = bucket.take(&SPEC, 0.0);
            assert!(answer.allowed);
            assert_eq!(answer.remaining, left);
        }
        let refused = bucket.take(&SPEC, 0.0);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ms, 100);
        assert!(!bucket.take(&SPEC, 50.0).allowed);
        assert!(bucket.take(&SPEC, 100.0).allowed);
        // A long pause refills only up to the burst.
        let answer = bucket.take(&SPEC, 100_000.0);
        assert_eq!(answer.remaining, 4);
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut bucket = Bucket::full(&SPEC, 1000.0);
        for _ in 0..5 {
            bucket.take(&SPEC, 1000.0);
        }
        assert!(!bucket.take(&SPEC, 10.0).allowed);
    }

    #[test]
    fn idle_time_is_a_full_refill() {
        assert_eq!(Bucket::idle_ms(&SPEC), 500);
    }
}
