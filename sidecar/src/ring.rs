//! The sidecar's memory of the upstream log: where it stands (the last cursor), a
//! bounded ring of the entries it handed to local subscribers, and from which
//! position each pattern of the upstream subscription has been complete.
//!
//! A local subscriber resuming from cursor `C` is answered from the ring only when
//! the ring provably holds every entry after `C` for each of its patterns: same log
//! epoch, nothing after `C` evicted, and every pattern covered since `C` or earlier.
//! Otherwise the upstream is asked (or the loss is reported).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ipc_core::channel::Pattern;
use ipc_core::cursor::Cursor;
use ipc_proto::pb::Msg;

/// `a` is strictly after `b` in the same log.
pub fn is_after(a: &Cursor, b: &Cursor) -> bool {
    a.epoch == b.epoch && a.position() > b.position()
}

/// `a` is at or before `b` in the same log.
pub fn is_at_or_before(a: &Cursor, b: &Cursor) -> bool {
    a.epoch == b.epoch && a.position() <= b.position()
}

/// Bounds of the ring.
#[derive(Debug, Clone, Copy)]
pub struct RingLimits {
    pub messages: usize,
    pub bytes: usize,
}

pub struct Ring {
    limits: RingLimits,
    entries: VecDeque<(Cursor, Arc<Msg>, usize)>,
    bytes: usize,
    /// Cursor of the newest evicted entry: the ring is complete only after it.
    evicted: Option<Cursor>,
    /// The position the sidecar has reached in the upstream log: every entry of the
    /// subscribed patterns up to here was handed to the hub (or deliberately not).
    pub last: Option<Cursor>,
    /// For each pattern of the upstream subscription, the position after which the
    /// ring has every entry it matches.
    covered: HashMap<String, (Pattern, Cursor)>,
}

impl Ring {
    pub fn new(limits: RingLimits) -> Self {
        Self {
            limits,
            entries: VecDeque::new(),
            bytes: 0,
            evicted: None,
            last: None,
            covered: HashMap::new(),
        }
    }

    /// Records an entry handed to the hub.
    pub fn push(&mut self, cursor: Cursor, msg: Arc<Msg>) {
        let size = ipc_core::msg_size::memory_size(&msg);
        self.entries.push_back((cursor, msg, size));
        self.bytes += size;
        self.last = Some(cursor);
        while self.entries.len() > self.limits.messages.max(1)
            || (self.bytes > self.limits.bytes && self.entries.len() > 1)
        {
            if let Some((cursor, _, size)) = self.entries.pop_front() {
                self.bytes -= size;
                self.evicted = Some(cursor);
            }
        }
    }

    /// Forgets everything: the upstream log was lost (a new epoch).
    pub fn reset(&mut self) {
        self.entries.clear();
        self.bytes = 0;
        self.evicted = None;
        self.last = None;
        self.covered.clear();
    }

    /// Moves the position forward (never back) without an entry: the upstream said
    /// nothing more matches up to `position`.
    pub fn advance(&mut self, position: Cursor) {
        match self.last {
            Some(last)
                if last.epoch == position.epoch && last.position() >= position.position() => {}
            _ => self.last = Some(position),
        }
    }

    /// Sets the coverage after the upstream subscription changed to `union`:
    /// patterns in `continued` keep their coverage (or start at `resumed_from`, the
    /// cursor the new stream resumed after), the others start at `now`.
    pub fn cover(
        &mut self,
        union: &[Pattern],
        continued: &HashSet<String>,
        resumed_from: Option<Cursor>,
        now: Option<Cursor>,
    ) {
        let mut covered = HashMap::new();
        for pattern in union {
            let key = pattern.as_str();
            let kept = if continued.contains(key) {
                self.covered
                    .get(key)
                    .map(|(_, from)| *from)
                    .or(resumed_from)
                    .or(now)
            } else {
                now
            };
            if let Some(from) = kept {
                covered.insert(key.to_string(), (pattern.clone(), from));
            }
        }
        self.covered = covered;
    }

    /// Since when `pattern` has been complete in the ring: the earliest coverage of
    /// an upstream pattern that includes it.
    fn covered_since(&self, pattern: &Pattern) -> Option<Cursor> {
        self.covered
            .values()
            .filter(|(upstream, _)| {
                upstream == pattern || (pattern.is_exact() && upstream.matches(pattern.as_str()))
            })
            .map(|(_, from)| *from)
            .min_by_key(|c| c.position())
    }

    /// Entries after `after` if the ring has all of them for `patterns`. A cursor
    /// beyond the last position the sidecar reached is not answered: it may be
    /// ahead of the control plane's log (which refuses it), or a position the
    /// sidecar has not reached yet (a Broadcast's own cursor); only the control
    /// plane can tell.
    pub fn replay(&self, after: &Cursor, patterns: &[Pattern]) -> Option<Vec<Arc<Msg>>> {
        let last = self.last?;
        if last.epoch != after.epoch || is_after(after, &last) {
            return None;
        }
        if self
            .evicted
            .is_some_and(|evicted| is_after(&evicted, after))
        {
            return None;
        }
        let complete = patterns.iter().all(|p| {
            self.covered_since(p)
                .is_some_and(|from| is_at_or_before(&from, after))
        });
        if !complete {
            return None;
        }
        Some(
            self.entries
                .iter()
                .filter(|(cursor, _, _)| is_after(cursor, after))
                .map(|(_, msg, _)| msg.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(hi: u64) -> Cursor {
        Cursor {
            epoch: 7,
            hi,
            lo: 0,
        }
    }

    fn p(text: &str) -> Pattern {
        Pattern::parse(text).unwrap()
    }

    fn entry(hi: u64, channel: &str) -> Arc<Msg> {
        Arc::new(Msg {
            op: "x".into(),
            channel: channel.into(),
            cursor: c(hi).to_string(),
            ..Msg::default()
        })
    }

    fn ring() -> Ring {
        Ring::new(RingLimits {
            messages: 3,
            bytes: 1 << 20,
        })
    }

    #[test]
    fn answers_only_for_patterns_covered_since_the_cursor() {
        let mut ring = ring();
        ring.cover(&[p("a")], &HashSet::new(), None, Some(c(1)));
        ring.push(c(2), entry(2, "a"));
        ring.push(c(3), entry(3, "a"));
        let replay = ring.replay(&c(2), &[p("a")]).unwrap();
        assert_eq!(replay.len(), 1);
        assert!(
            ring.replay(&c(0), &[p("a")]).is_none(),
            "before the coverage"
        );

        // `b` joins at 3: a subscriber of `b` resuming from 2 needs the upstream.
        let continued = HashSet::from(["a".to_string()]);
        ring.cover(&[p("a"), p("b")], &continued, Some(c(3)), Some(c(3)));
        assert!(ring.replay(&c(2), &[p("b")]).is_none());
        assert!(
            ring.replay(&c(2), &[p("a")]).is_some(),
            "a kept its coverage"
        );
        assert!(ring.replay(&c(3), &[p("b")]).is_some());
    }

    #[test]
    fn a_wildcard_covers_the_exact_names_it_matches() {
        let mut ring = ring();
        ring.advance(c(1));
        ring.cover(&[p("shop:>")], &HashSet::new(), None, Some(c(1)));
        assert!(ring.replay(&c(1), &[p("shop:worker")]).is_some());
        assert!(ring.replay(&c(1), &[p("shop:*")]).is_none());
    }

    #[test]
    fn a_cursor_beyond_the_last_position_is_left_to_the_upstream() {
        let mut ring = ring();
        ring.cover(&[p("a")], &HashSet::new(), None, Some(c(0)));
        ring.push(c(1), entry(1, "a"));
        assert_eq!(ring.replay(&c(1), &[p("a")]).unwrap().len(), 0);
        assert!(ring.replay(&c(2), &[p("a")]).is_none());
    }

    #[test]
    fn eviction_and_another_epoch_are_not_answered() {
        let mut ring = ring();
        ring.cover(&[p("a")], &HashSet::new(), None, Some(c(0)));
        for hi in 1..=5 {
            ring.push(c(hi), entry(hi, "a"));
        }
        assert!(ring.replay(&c(1), &[p("a")]).is_none(), "2 was evicted");
        assert_eq!(ring.replay(&c(2), &[p("a")]).unwrap().len(), 3);
        let other = Cursor {
            epoch: 8,
            hi: 4,
            lo: 0,
        };
        assert!(ring.replay(&other, &[p("a")]).is_none());
    }
}
