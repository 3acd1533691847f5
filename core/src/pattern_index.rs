//! Which subscribers' wildcard patterns match a channel, found without looking at
//! every pattern: the patterns are kept in a trie of their segments.
//!
//! Scanning every pattern of every subscriber per message made one identity's
//! subscriptions (1,000 streams × 256 wildcard patterns, the default limits) cost
//! every broadcast 256,000 matches. The trie visits only the nodes that a
//! channel's segments lead to: per message, at most two children per level (the
//! literal segment and `*`) and never a node twice, so patterns that cannot match
//! cost nothing, whatever their number.

use crate::channel::{Pattern, Segment};

/// Subscriber keys by pattern; a key may be under several patterns.
#[derive(Debug, Default)]
pub struct PatternIndex {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// Children by literal segment, sorted by it: compact for the usual one or
    /// few children, a binary search for many.
    literal: Vec<(Box<str>, Node)>,
    /// The child for `*`.
    one: Option<Box<Node>>,
    /// Keys whose pattern ends here: the channel must end here too.
    ends: Vec<u64>,
    /// Keys whose pattern ends with `>` after this node: one or more segments follow.
    rest: Vec<u64>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.one.is_none()
            && self.ends.is_empty()
            && self.rest.is_empty()
    }

    fn insert(&mut self, segments: &[Segment], key: u64) {
        match segments {
            [] => self.ends.push(key),
            [Segment::Rest, ..] => self.rest.push(key),
            [Segment::One, tail @ ..] => self.one.get_or_insert_default().insert(tail, key),
            [Segment::Literal(literal), tail @ ..] => {
                let at = match self.child(literal) {
                    Ok(at) => at,
                    Err(at) => {
                        self.literal
                            .insert(at, (literal.as_str().into(), Node::default()));
                        at
                    }
                };
                self.literal[at].1.insert(tail, key);
            }
        }
    }

    /// Where the child for `literal` is, or would be inserted.
    fn child(&self, literal: &str) -> Result<usize, usize> {
        self.literal
            .binary_search_by(|(segment, _)| segment.as_ref().cmp(literal))
    }

    /// Removes `key` from the pattern's place and prunes nodes left empty.
    fn remove(&mut self, segments: &[Segment], key: u64) {
        match segments {
            [] => self.ends.retain(|k| *k != key),
            [Segment::Rest, ..] => self.rest.retain(|k| *k != key),
            [Segment::One, tail @ ..] => {
                if let Some(child) = &mut self.one {
                    child.remove(tail, key);
                    if child.is_empty() {
                        self.one = None;
                    }
                }
            }
            [Segment::Literal(literal), tail @ ..] => {
                if let Ok(at) = self.child(literal) {
                    let child = &mut self.literal[at].1;
                    child.remove(tail, key);
                    if child.is_empty() {
                        self.literal.remove(at);
                    }
                }
            }
        }
    }

    fn matching(&self, segments: &[&str], out: &mut Vec<u64>) {
        let Some((first, tail)) = segments.split_first() else {
            out.extend_from_slice(&self.ends);
            return;
        };
        out.extend_from_slice(&self.rest);
        if let Ok(at) = self.child(first) {
            self.literal[at].1.matching(tail, out);
        }
        if let Some(child) = &self.one {
            child.matching(tail, out);
        }
    }

    /// Whether [`Node::matching`] would find a key, stopping at the first.
    fn any(&self, mut segments: std::str::Split<'_, char>) -> bool {
        let Some(first) = segments.next() else {
            return !self.ends.is_empty();
        };
        if !self.rest.is_empty() {
            return true;
        }
        if let Ok(at) = self.child(first)
            && self.literal[at].1.any(segments.clone())
        {
            return true;
        }
        self.one.as_ref().is_some_and(|child| child.any(segments))
    }
}

impl PatternIndex {
    /// Adds `key` under `pattern`.
    pub fn insert(&mut self, pattern: &Pattern, key: u64) {
        self.root.insert(pattern.segments(), key);
    }

    /// Removes `key` from under `pattern` (every time it was added there).
    pub fn remove(&mut self, pattern: &Pattern, key: u64) {
        self.root.remove(pattern.segments(), key);
    }

    /// Whether no pattern is indexed.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Appends the keys of the patterns that match `channel` (a valid name): a
    /// key once per matching pattern, in no particular order.
    pub fn matching(&self, channel: &str, out: &mut Vec<u64>) {
        if self.is_empty() {
            return;
        }
        // A valid channel has at most 128 segments (256 bytes): the recursion is bounded.
        let segments: Vec<&str> = channel.split(':').collect();
        self.root.matching(&segments, out);
    }

    /// Whether any pattern matches `channel`: [`PatternIndex::matching`] without
    /// collecting the keys (no allocation), for a caller that only asks whether a
    /// message has a taker.
    pub fn matches_any(&self, channel: &str) -> bool {
        !self.is_empty() && self.root.any(channel.split(':'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::strategies::{small_channels, small_pattern};
    use proptest::prelude::*;

    fn keys(index: &PatternIndex, channel: &str) -> Vec<u64> {
        let mut out = Vec::new();
        index.matching(channel, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_as_patterns_define_them() {
        let mut index = PatternIndex::default();
        for (key, text) in ["shop:*", "shop:>", "*:worker", ">", "shop:worker:*"]
            .iter()
            .enumerate()
        {
            index.insert(&Pattern::parse(text).unwrap(), key as u64);
        }
        assert_eq!(keys(&index, "shop:worker"), [0, 1, 2, 3]);
        assert_eq!(keys(&index, "shop:worker:blue"), [1, 3, 4]);
        assert_eq!(keys(&index, "shop"), [3]);
        assert_eq!(keys(&index, "other:worker"), [2, 3]);
        assert!(index.matches_any("shop") && index.matches_any("x:y:z"));
        let mut literal = PatternIndex::default();
        literal.insert(&Pattern::parse("shop:*:blue").unwrap(), 1);
        assert!(literal.matches_any("shop:worker:blue"));
        assert!(!literal.matches_any("shop:worker") && !literal.matches_any("shop:worker:red"));
        assert!(!PatternIndex::default().matches_any("shop"));
    }

    #[test]
    fn removing_every_pattern_leaves_nothing_behind() {
        let mut index = PatternIndex::default();
        let patterns: Vec<Pattern> = ["a:*:c", "a:>", "a:*:c", "*:b"]
            .iter()
            .map(|p| Pattern::parse(p).unwrap())
            .collect();
        for pattern in &patterns {
            index.insert(pattern, 7);
            index.insert(pattern, 8);
        }
        for pattern in &patterns {
            index.remove(pattern, 7);
        }
        assert_eq!(keys(&index, "a:b:c"), [8, 8, 8]);
        for pattern in &patterns {
            index.remove(pattern, 8);
        }
        assert!(index.is_empty());
    }

    proptest! {
        /// The index finds exactly the keys a scan of every pattern finds, also
        /// after some keys were removed.
        #[test]
        fn the_index_agrees_with_matching_every_pattern(
            subscribers in proptest::collection::vec(
                proptest::collection::vec(small_pattern(), 1..4), 1..12),
            removed in proptest::collection::vec(any::<bool>(), 12),
        ) {
            let subscribers: Vec<Vec<Pattern>> = subscribers
                .iter()
                .map(|patterns| patterns.iter().map(|p| Pattern::parse(p).unwrap()).collect())
                .collect();
            let mut index = PatternIndex::default();
            for (key, patterns) in subscribers.iter().enumerate() {
                for pattern in patterns {
                    index.insert(pattern, key as u64);
                }
            }
            for (key, patterns) in subscribers.iter().enumerate() {
                if removed[key] {
                    for pattern in patterns {
                        index.remove(pattern, key as u64);
                    }
                }
            }
            for channel in small_channels() {
                let mut found = keys(&index, &channel);
                found.dedup();
                let scanned: Vec<u64> = subscribers
                    .iter()
                    .enumerate()
                    .filter(|(key, patterns)| {
                        !removed[*key] && patterns.iter().any(|p| p.matches(&channel))
                    })
                    .map(|(key, _)| key as u64)
                    .collect();
                prop_assert_eq!(index.matches_any(&channel), !scanned.is_empty(), "{}", channel);
                prop_assert_eq!(found, scanned, "{}", channel);
            }
        }
    }
}
