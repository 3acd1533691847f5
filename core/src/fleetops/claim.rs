//! Claims: one run of a keyed operation at a time, fleet-wide.
//!
//! A Gather or Rollout with a key claims it before it asks anyone: a lease (the
//! rules of [`crate::coord`]) kept where the operation records are, renewed every
//! third of [`CLAIM_TTL`] while the run lasts and released when it ends. So two
//! calls with the same key never ask members at the same time, on one node or on
//! two replicas:
//!
//! - a second **Gather** waits for the claim until its own deadline, then answers
//!   the first one's ledger (stored by then) and asks nobody;
//! - a second **Rollout** waits a little longer than [`CLAIM_TTL`] — long enough for
//!   the claim of a coordinator that died to expire, so a rerun after a crash
//!   resumes — and is refused with ABORTED while the first run is still alive: its
//!   events go to the call that started it.
//!
//! A run whose caller goes away releases its claim when it ends; one whose node
//! dies leaves it to expire within [`CLAIM_TTL`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::{Either, select};

use super::Asked;
use super::ledger::Kind;
use crate::coord::{LockSpec, UnlockSpec};
use crate::error::NodeError;
use crate::node::Node;

/// How long a claim lasts without renewal: a key whose coordinator died is free
/// again after this.
pub const CLAIM_TTL: Duration = Duration::from_secs(5);

/// How a claim's lease name starts (`op#APP/KEY`): `#` is not allowed in lock
/// names, so no Lock call can take a claim's name.
pub const CLAIM_PREFIX: &str = "op#";

/// Whether a lease is a claim of a keyed operation rather than a lock.
pub fn is_claim(lease_name: &str) -> bool {
    lease_name.starts_with(CLAIM_PREFIX)
}

/// A key claimed by this node for one run.
pub(crate) struct Claim {
    name: String,
    holder: String,
    /// The lease's fence; a renewal that had to take the lease afresh changes it.
    fence: AtomicU64,
}

impl Node {
    /// Claims the key of `asked` (nothing to claim without a key), waiting until
    /// `until` for a claim held by another call to be released or to expire.
    /// Still held then: ABORTED, naming the node that holds it.
    pub(crate) async fn claim(
        &self,
        asked: &Asked,
        until: Instant,
    ) -> Result<Option<Claim>, NodeError> {
        let Some((key, scoped)) = &asked.key else {
            return Ok(None);
        };
        let name = format!("{CLAIM_PREFIX}{scoped}");
        let holder = self.config().name.clone();
        let answer = self
            .bus()
            .claim_operation(self.claim_spec(&name, &holder, 0, Some(until)), &self.coord)
            .await?;
        if answer.acquired {
            return Ok(Some(Claim {
                name,
                holder,
                fence: AtomicU64::new(answer.fence),
            }));
        }
        let advice = match asked.kind {
            Kind::Gather => "ask again with the key once it has finished to get its ledger",
            Kind::Rollout => {
                "its events go to the call that started it; rerun with the key once it has finished to get its ledger"
            }
        };
        Err(NodeError::Aborted(format!(
            "key {key:?} is in use: a {} with this key is running, coordinated by node {:?}; {advice}",
            asked.kind.as_str(),
            answer.holder
        )))
    }

    /// Runs `work` while keeping `claim` alive.
    pub(crate) async fn while_claimed<T>(
        &self,
        claim: Option<&Claim>,
        work: impl Future<Output = T>,
    ) -> T {
        let Some(claim) = claim else {
            return work.await;
        };
        let work = std::pin::pin!(work);
        let renew = std::pin::pin!(self.keep_claimed(claim));
        match select(work, renew).await {
            Either::Left((done, _)) => done,
            Either::Right((never, _)) => match never {},
        }
    }

    /// Releases a claim; a failure is logged: the claim then expires by itself.
    pub(crate) async fn release(&self, claim: Option<Claim>) {
        let Some(claim) = claim else {
            return;
        };
        let unlock = UnlockSpec {
            name: claim.name.clone(),
            fence: claim.fence.load(Ordering::Relaxed),
            holder: claim.holder.clone(),
            proven: false,
        };
        if let Err(error) = self.bus().release_operation(unlock, &self.coord).await {
            tracing::warn!(%error, claim = %claim.name, "claim not released; it expires by itself");
        }
    }

    /// Renews `claim` every third of its TTL, for as long as it is polled.
    async fn keep_claimed(&self, claim: &Claim) -> Infallible {
        loop {
            tokio::time::sleep(CLAIM_TTL / 3).await;
            let fence = claim.fence.load(Ordering::Relaxed);
            let spec = self.claim_spec(&claim.name, &claim.holder, fence, None);
            match self.bus().claim_operation(spec, &self.coord).await {
                Ok(answer) if answer.acquired => claim.fence.store(answer.fence, Ordering::Relaxed),
                Ok(answer) => {
                    // Lost (the bus was out of reach longer than the TTL) and taken
                    // by another call: try afresh, the run itself goes on.
                    tracing::warn!(claim = %claim.name, holder = %answer.holder, "claim lost");
                    claim.fence.store(0, Ordering::Relaxed);
                }
                Err(error) => tracing::warn!(%error, claim = %claim.name, "claim not renewed"),
            }
        }
    }

    fn claim_spec(
        &self,
        name: &str,
        holder: &str,
        fence: u64,
        wait_until: Option<Instant>,
    ) -> LockSpec {
        LockSpec {
            name: name.to_string(),
            ttl_ms: CLAIM_TTL.as_millis() as u32,
            fence,
            holder: holder.to_string(),
            proven: false,
            wait_until,
            session: None,
            metrics: None,
        }
    }
}
