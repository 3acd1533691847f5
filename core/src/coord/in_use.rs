//! What coordination is in use: the live leases and the token buckets that are not
//! full, for people (the admin console). Not part of the gRPC contract.
//!
//! A bus lists what it stores ([`crate::Bus::in_use`]), at most [`MAX_LISTED`] of
//! each; [`Node::in_use`] keeps the locks (not the claims of keyed operations,
//! leases too) and buckets the caller's grants cover.

use super::LimitSpec;
use super::bucket::Bucket;
use crate::auth::Caller;
use crate::error::NodeError;
use crate::fleetops::claim::is_claim;
use crate::node::Node;

/// The most leases, and the most buckets, one listing returns.
pub const MAX_LISTED: usize = 1000;

/// A live lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub name: String,
    pub holder: String,
    pub fence: u64,
    /// Ms since the epoch.
    pub expires_ms: i64,
}

/// A token bucket that is not full (a full bucket is the same as an unused one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketInfo {
    pub name: String,
    /// Whole tokens left now.
    pub tokens: u32,
    /// The bucket's size, refill rate and interval, as of its last call.
    pub burst: u32,
    pub rate: u32,
    pub interval_ms: u32,
    /// In how long it is full again if nobody draws from it.
    pub full_in_ms: u64,
}

impl BucketInfo {
    /// The bucket `name` as of `now_ms` (in the bucket's own clock); `None` once full.
    pub fn of(name: &str, spec: &LimitSpec, bucket: &Bucket, now_ms: f64) -> Option<Self> {
        let tokens = bucket.refilled(spec, now_ms);
        let missing = f64::from(spec.burst) - tokens;
        if missing <= 0.0 {
            return None;
        }
        let per_ms = f64::from(spec.rate) / f64::from(spec.interval_ms);
        Some(Self {
            name: name.to_string(),
            tokens: tokens.floor() as u32,
            burst: spec.burst,
            rate: spec.rate,
            interval_ms: spec.interval_ms,
            full_in_ms: (missing / per_ms).ceil() as u64,
        })
    }
}

/// Leases and buckets in use, each list sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InUse {
    pub locks: Vec<LeaseInfo>,
    pub limits: Vec<BucketInfo>,
    /// More were stored than listed ([`MAX_LISTED`], or the bus's bound on looking).
    pub truncated: bool,
}

impl InUse {
    /// Sorts both lists by name and cuts them at `max`.
    pub fn finish(mut self, max: usize) -> Self {
        self.locks.sort_by(|a, b| a.name.cmp(&b.name));
        self.limits.sort_by(|a, b| a.name.cmp(&b.name));
        if self.locks.len() > max || self.limits.len() > max {
            self.truncated = true;
            self.locks.truncate(max);
            self.limits.truncate(max);
        }
        self
    }
}

impl Node {
    /// The leases and buckets in use fleet-wide that the caller's `lock` and
    /// `limit` grants cover (all of them for a caller without grants).
    pub async fn in_use(&self, caller: &Caller) -> Result<InUse, NodeError> {
        let mut in_use = self.bus().in_use(&self.coord, MAX_LISTED).await?;
        // Keyed operations' claims are leases too, kept with the locks: not locks.
        in_use.locks.retain(|l| !is_claim(&l.name));
        if let Some(grants) = caller.grants.as_deref() {
            in_use.locks.retain(|l| grants.may_lock(&l.name));
            in_use.limits.retain(|l| grants.may_limit(&l.name));
        }
        Ok(in_use)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_listed_until_it_is_full_again() {
        let spec = LimitSpec {
            rate: 10,
            interval_ms: 1000,
            burst: 5,
            cost: 2,
        };
        let mut bucket = Bucket::full(&spec, 0.0);
        assert_eq!(BucketInfo::of("mail", &spec, &bucket, 0.0), None);
        bucket.take(&spec, 0.0);
        let info = BucketInfo::of("mail", &spec, &bucket, 50.0).unwrap();
        assert_eq!((info.tokens, info.burst, info.full_in_ms), (3, 5, 150));
        assert_eq!(BucketInfo::of("mail", &spec, &bucket, 200.0), None);
    }

    #[test]
    fn lists_are_sorted_and_bounded() {
        let lease = |name: &str| LeaseInfo {
            name: name.into(),
            holder: "h".into(),
            fence: 1,
            expires_ms: 0,
        };
        let in_use = InUse {
            locks: vec![lease("b"), lease("c"), lease("a")],
            ..InUse::default()
        }
        .finish(2);
        let names: Vec<&str> = in_use.locks.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(in_use.truncated);
    }
}
