//! What the pod asks the control plane for: the union of its identity channels
//! and the local subscriptions (within the token's grants), the local members it
//! relays, and when a local subscriber's patterns are covered — acknowledged by a
//! stream whose head was handled, or promised while the upstream could not be asked.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipc_core::channel::Pattern;
use ipc_proto::pb::Member;

use super::Inner;
use super::session::Active;

impl Inner {
    /// Every pattern of the local subscribers, as text.
    fn local_patterns(&self) -> HashSet<String> {
        self.local()
            .map(|local| {
                local
                    .subscribers()
                    .into_iter()
                    .flat_map(|m| m.channels)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The local members (subscribers, and what they relay) with the pod's labels:
    /// the upstream subscription relays them, so that the fleet's Members lists
    /// each of the pod's processes. Every local subscriber's id is in the union, so
    /// a local subscriber coming or going re-opens the stream with the new list.
    pub(super) fn relayed(&self) -> Vec<Member> {
        let grants = self.grants.read().clone();
        let relayer = &self.config.identity.id;
        self.local()
            .map(|local| {
                local
                    .members()
                    .into_iter()
                    .filter(|m| grants.as_ref().is_none_or(|g| g.may_relay(m, relayer)))
                    .map(|m| self.with_pod_labels(m))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A local member with the pod's labels (`pod`, `namespace`, `node`, `--label`s,
    /// `pod-id`) added; its own labels win.
    pub(super) fn with_pod_labels(&self, mut member: Member) -> Member {
        for (key, value) in &self.config.identity.labels {
            member
                .labels
                .entry(key.clone())
                .or_insert_with(|| value.clone());
        }
        member
            .labels
            .entry("pod-id".into())
            .or_insert_with(|| self.config.identity.id.clone());
        member
    }

    /// The pod's identity channels plus every local subscriber's patterns; exact
    /// names that a wildcard of the union already matches are left out.
    pub(super) fn union(&self) -> Vec<Pattern> {
        let mut all: BTreeMap<String, Pattern> = self
            .identity_patterns
            .iter()
            .map(|p| (p.as_str().to_string(), p.clone()))
            .collect();
        let grants = self.grants.read().clone();
        if let Some(local) = self.local() {
            for member in local.subscribers() {
                for channel in member.channels {
                    if let Ok(pattern) = Pattern::parse(&channel) {
                        // What the token cannot cover stays local: asking for it
                        // would get the whole pod's subscription refused.
                        if grants.as_ref().is_none_or(|g| g.covers(&pattern)) {
                            all.entry(channel).or_insert(pattern);
                        }
                    }
                }
            }
        }
        let wildcards: Vec<Pattern> = all.values().filter(|p| !p.is_exact()).cloned().collect();
        all.retain(|_, p| {
            !p.is_exact()
                || self.pod_channels.contains(p.as_str())
                || !wildcards.iter().any(|w| w.matches(p.as_str()))
        });
        all.into_values().collect()
    }

    pub(super) async fn cover(&self, patterns: &[Pattern]) {
        // What the token cannot cover stays local (see `union`): nothing to wait for.
        let grants = self.grants.read().clone();
        let patterns: Vec<Pattern> = patterns
            .iter()
            .filter(|p| grants.as_ref().is_none_or(|g| g.covers(p)))
            .cloned()
            .collect();
        let patterns = patterns.as_slice();
        let mut acked = self.acked.subscribe();
        let mut health = self.health.subscribe();
        let deadline = tokio::time::Instant::now() + self.config.cover_wait;
        loop {
            if covers(&acked.borrow_and_update(), patterns) {
                return;
            }
            // During an outage the subscriber is answered at once; messages of its
            // patterns come from where the pod stood, once reconnected.
            if !*health.borrow_and_update() && self.ever_connected.load(Ordering::Acquire) {
                break;
            }
            tokio::select! {
                changed = acked.changed() => if changed.is_err() { break },
                changed = health.changed() => if changed.is_err() { break },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        tracing::debug!("local subscriber answered before the upstream covers its channels");
        let mut promised = self.promised.lock();
        for pattern in patterns {
            promised.insert(pattern.as_str().to_string(), pattern.clone());
        }
    }

    /// The stream's head has been handled: its union is now what the pod receives.
    pub(super) fn acknowledge(&self, active: &mut Active) {
        let continued: HashSet<String> = {
            let promised = self.promised.lock();
            active
                .acked_at_open
                .iter()
                .map(|p| p.as_str().to_string())
                .chain(promised.keys().cloned())
                .collect()
        };
        {
            let mut ring = self.ring.lock();
            if let Some(position) = active.position {
                ring.advance(position);
            }
            let now = ring.last;
            ring.cover(&active.union, &continued, active.resumed_from, now);
        }
        let local = self.local_patterns();
        let settled = {
            let mut promised = self.promised.lock();
            let mut settled = false;
            // Kept: what this stream does not cover yet and a local subscriber still
            // wants (the next stream will); dropped: what nobody wants any more.
            promised.retain(|key, p| {
                if !local.contains(key) {
                    return false;
                }
                let covered = covers(&active.union, std::slice::from_ref(p));
                settled |= covered;
                !covered
            });
            settled
        };
        if settled && active.resumed_from.is_none() && !active.gap_notified {
            // Subscribers were answered while the pod had no position in the log to
            // resume from: what was published before now may be missing for them.
            self.notify_gap(
                None,
                "the sidecar was not connected to the control plane when you subscribed; messages published before it connected are not delivered",
            );
        }
        self.acked.send_replace(Arc::new(active.union.clone()));
        self.ever_connected.store(true, Ordering::Release);
        self.health.send_replace(true);
        active.acknowledged = true;
    }
}

/// Whether every pattern is included in the acknowledged union.
fn covers(acked: &[Pattern], patterns: &[Pattern]) -> bool {
    patterns.iter().all(|q| {
        acked
            .iter()
            .any(|p| p == q || (q.is_exact() && p.matches(q.as_str())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_counts_wildcards_for_exact_names() {
        let p = |t: &str| Pattern::parse(t).unwrap();
        assert!(covers(&[p("shop:>")], &[p("shop:worker")]));
        assert!(!covers(&[p("shop:>")], &[p("shop:*")]));
        assert!(covers(&[p("a"), p("b")], &[p("b")]));
        assert!(!covers(&[p("a")], &[p("a"), p("c")]));
    }
}
