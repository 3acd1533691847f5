//! Judging a soak: per subscriber, every acknowledged message after its start must
//! have arrived once, in log order, or be covered by an `ipc:gap` that was justified
//! (its entries really gone from Redis).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::actors::{Ack, Pos, Seen, SubscriberLog};
use crate::faults::Injected;

/// The verdict on one subscriber.
#[derive(Debug, Default, serde::Serialize)]
pub struct Verdict {
    pub name: String,
    pub kind: String,
    pub expected: usize,
    pub received: usize,
    /// Acknowledged, after the start, never received, and no gap announced it.
    pub silent_loss: usize,
    /// Missing but announced by `ipc:gap`.
    pub announced_loss: usize,
    pub gaps: usize,
    /// Gaps over entries that are still in Redis: avoidable loss.
    pub unjustified_gaps: usize,
    pub gap_reasons: Vec<String>,
    pub duplicates: usize,
    pub reordered: usize,
    /// The final message never arrived.
    pub hung: bool,
    pub reconnects: usize,
    /// Why the stream last broke (for a hung one: why it is not receiving).
    pub last_error: String,
}

impl Verdict {
    pub fn failed(&self) -> bool {
        self.silent_loss > 0
            || self.unjustified_gaps > 0
            || self.duplicates > 0
            || self.reordered > 0
            || self.hung
    }
}

/// Judges `log` against the acknowledged messages and what Redis holds at the end.
pub fn judge(log: &SubscriberLog, acks: &[Ack], in_redis: &HashSet<Pos>, last: u64) -> Verdict {
    let seen = log.seen.lock();
    let mut verdict = Verdict {
        name: log.name.clone(),
        kind: log.kind.to_string(),
        ..Verdict::default()
    };
    // The start: the position of the first `ipc:subscribed` (every replica and a
    // connected sidecar tell it); without one, the first message received.
    let start = seen.iter().find_map(|s| match s {
        Seen::Subscribed { pos, .. } => Some(*pos),
        _ => None,
    });
    let first_message = seen.iter().find_map(|s| match s {
        Seen::Message { pos, .. } => Some(*pos),
        _ => None,
    });
    let start = match (start.flatten(), first_message) {
        (Some(pos), _) => Some(pos),
        (None, Some(first)) => Some(Pos {
            lo: first.lo.saturating_sub(1),
            ..first
        }),
        (None, None) => None,
    };
    let mut received: HashMap<Pos, usize> = HashMap::new();
    let mut highest: Option<Pos> = None;
    // Ranges (from, until] announced lost by a gap: until the next message received.
    let mut gaps: Vec<(Option<Pos>, Option<Pos>)> = Vec::new();
    let mut open_gap = false;
    for s in seen.iter() {
        match s {
            Seen::Message { number, pos, .. } => {
                let n = received.entry(*pos).or_default();
                *n += 1;
                if *n > 1 {
                    verdict.duplicates += 1;
                } else if highest.is_some_and(|h| *pos < h) {
                    verdict.reordered += 1;
                }
                highest = highest.max(Some(*pos));
                if open_gap {
                    if let Some(gap) = gaps.last_mut() {
                        gap.1 = Some(*pos);
                    }
                    open_gap = false;
                }
                if *number == last {
                    verdict.hung = false;
                }
                verdict.received += 1;
            }
            Seen::Gap { from, reason } => {
                verdict.gaps += 1;
                verdict.gap_reasons.push(reason.clone());
                gaps.push((from.or(highest).or(start), None));
                open_gap = true;
            }
            Seen::Broken { why } => {
                verdict.reconnects += 1;
                verdict.last_error.clone_from(why);
            }
            Seen::Subscribed { .. } => {}
        }
    }
    verdict.hung = !seen
        .iter()
        .any(|s| matches!(s, Seen::Message { number, .. } if *number == last));
    let in_gap = |pos: Pos| {
        gaps.iter().position(|(from, until)| {
            from.is_none_or(|f| pos > f) && until.is_none_or(|u| pos <= u)
        })
    };
    let mut unjustified: HashSet<usize> = HashSet::new();
    for ack in acks {
        if start.is_some_and(|s| ack.pos <= s) || ack.duplicate {
            continue;
        }
        verdict.expected += 1;
        if received.contains_key(&ack.pos) {
            continue;
        }
        match in_gap(ack.pos) {
            Some(gap) => {
                verdict.announced_loss += 1;
                if in_redis.contains(&ack.pos) {
                    unjustified.insert(gap);
                }
            }
            None => verdict.silent_loss += 1,
        }
    }
    verdict.unjustified_gaps = unjustified.len();
    verdict
}

/// Recovery after each fault: how long from the fault healed until a subscriber
/// received the first message acknowledged after that — per subscriber and fault.
pub fn recoveries(faults: &[Injected], acks: &[Ack], logs: &[&SubscriberLog]) -> Vec<Duration> {
    let mut out = Vec::new();
    for fault in faults {
        let Some(first_after) = acks.iter().find(|a| a.at >= fault.healed) else {
            continue;
        };
        for log in logs {
            let seen = log.seen.lock();
            let arrival: Option<Instant> = seen.iter().find_map(|s| match s {
                Seen::Message { pos, at, .. } if *pos >= first_after.pos => Some(*at),
                _ => None,
            });
            if let Some(at) = arrival {
                out.push(at.saturating_duration_since(fault.healed));
            }
        }
    }
    out.sort();
    out
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Entries stored more than once for one number (a retry whose first answer was
/// lost): positions per number, from the log read back from Redis.
pub fn stored_twice(log: &BTreeMap<Pos, u64>) -> usize {
    let mut per_number: HashMap<u64, usize> = HashMap::new();
    for number in log.values() {
        *per_number.entry(*number).or_default() += 1;
    }
    per_number.values().filter(|n| **n > 1).count()
}
