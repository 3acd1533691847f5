//! The ledger of an operation: one outcome per member resolved at the start, with
//! the counts kept in step, and the record stored under an operation's key.

use ipc_proto::pb::ledger::State;
use ipc_proto::pb::outcome::Status;
use ipc_proto::pb::{Ledger, Msg, Outcome};

use super::Responder;
use prost::Message as _;

/// Which operation a stored ledger belongs to: a key used by one cannot be reused
/// by the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gather,
    Rollout,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gather => "gather",
            Kind::Rollout => "rollout",
        }
    }
}

/// What the bus keeps under an operation's key: the kind, what the operation asked
/// (a rerun must ask the same), and its ledger. Encoded with protobuf.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredOperation {
    #[prost(string, tag = "1")]
    pub kind: String,
    /// Digest of target, op, data, headers and labels.
    #[prost(string, tag = "2")]
    pub fingerprint: String,
    #[prost(message, optional, tag = "3")]
    pub ledger: Option<Ledger>,
    /// When the coordinating node last wrote it (ms since the epoch).
    #[prost(int64, tag = "4")]
    pub updated_ms: i64,
}

impl StoredOperation {
    pub fn encode_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn decode_bytes(bytes: &[u8]) -> Option<Self> {
        Self::decode(bytes).ok()
    }
}

/// A ledger for `members` (sorted by id, then node), every outcome PENDING.
pub(crate) fn new_ledger(id: String, target: &str, op: &str, members: Vec<Responder>) -> Ledger {
    Ledger {
        id,
        target: target.to_string(),
        op: op.to_string(),
        state: State::Running as i32,
        expected: members.len() as u32,
        outcomes: members
            .into_iter()
            .map(|m| Outcome {
                member: m.id,
                node: m.node,
                status: Status::Pending as i32,
                ..Outcome::default()
            })
            .collect(),
        ..Ledger::default()
    }
}

/// Recomputes the counts from the outcomes.
pub fn recount(ledger: &mut Ledger) {
    let count = |s: Status| {
        ledger
            .outcomes
            .iter()
            .filter(|o| o.status == s as i32)
            .count() as u32
    };
    ledger.ok = count(Status::Ok);
    ledger.failed = count(Status::Failed);
    ledger.no_reply = count(Status::NoReply);
    ledger.not_ready = count(Status::NotReady);
    ledger.skipped = count(Status::Skipped);
}

/// Outcomes that count against a Rollout's failure budget: every one settled
/// other than OK and SKIPPED.
pub fn failures(ledger: &Ledger) -> u32 {
    ledger.failed + ledger.no_reply + ledger.not_ready
}

/// The outcome of a request, as the ledger names it.
pub fn settle(
    outcome: &mut Outcome,
    result: Result<Msg, crate::error::RequestError>,
    waited_ms: u64,
) {
    use crate::error::RequestError;
    match result {
        Ok(reply) if reply.error.is_empty() => {
            outcome.status = Status::Ok as i32;
            outcome.detail = String::new();
            outcome.reply = Some(reply);
        }
        Ok(reply) => {
            outcome.status = Status::Failed as i32;
            outcome.detail = format!("replied with error: {}", reply.error);
            outcome.reply = Some(reply);
        }
        Err(RequestError::DeadlineExceeded(_)) => {
            outcome.status = Status::NoReply as i32;
            outcome.detail = format!("no answer within {waited_ms} ms");
        }
        Err(RequestError::NoResponders(_)) => {
            outcome.status = Status::NoReply as i32;
            outcome.detail = "gone: no longer connected when asked".into();
        }
        Err(RequestError::Unavailable(why)) => {
            outcome.status = Status::NoReply as i32;
            outcome.detail = format!("not answered: {why}");
        }
    }
}

/// Whether a ledger is finished (nothing more will be asked under it).
pub fn finished(ledger: &Ledger) -> bool {
    matches!(
        State::try_from(ledger.state),
        Ok(State::Done | State::Stopped | State::Cancelled | State::DryRun)
    )
}

/// A stable digest of what an operation asks, so that a rerun with the key can be
/// told apart from a different operation.
pub fn fingerprint(
    kind: Kind,
    target: &str,
    op: &str,
    data: Option<&prost_types::Value>,
    labels: &std::collections::HashMap<String, String>,
) -> String {
    use std::hash::{Hash, Hasher};
    let mut labels: Vec<(&String, &String)> = labels.iter().collect();
    labels.sort();
    let data = data.map(|d| d.encode_to_vec()).unwrap_or_default();
    // FNV-1a over a canonical encoding: stable across processes and versions,
    // unlike the std hasher's seed.
    let mut hasher = Fnv(0xcbf2_9ce4_8422_2325);
    (kind.as_str(), target, op, data, labels).hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_outcomes() {
        let members: Vec<Responder> = ["a", "b", "c"]
            .iter()
            .map(|id| Responder {
                id: id.to_string(),
                node: "n1".into(),
            })
            .collect();
        let mut ledger = new_ledger("op-1".into(), "shop:worker", "x", members);
        assert_eq!(ledger.expected, 3);
        settle(&mut ledger.outcomes[0], Ok(Msg::default()), 10);
        settle(
            &mut ledger.outcomes[1],
            Ok(Msg {
                error: "disk full".into(),
                ..Msg::default()
            }),
            10,
        );
        settle(
            &mut ledger.outcomes[2],
            Err(crate::error::RequestError::DeadlineExceeded("c".into())),
            2000,
        );
        recount(&mut ledger);
        assert_eq!((ledger.ok, ledger.failed, ledger.no_reply), (1, 1, 1));
        assert_eq!(failures(&ledger), 2);
        assert_eq!(ledger.outcomes[1].detail, "replied with error: disk full");
        assert_eq!(ledger.outcomes[2].detail, "no answer within 2000 ms");
    }

    #[test]
    fn fingerprints_differ_by_what_is_asked() {
        let labels = std::collections::HashMap::new();
        let a = fingerprint(Kind::Rollout, "shop:worker", "restart", None, &labels);
        assert_eq!(
            a,
            fingerprint(Kind::Rollout, "shop:worker", "restart", None, &labels)
        );
        assert_ne!(
            a,
            fingerprint(Kind::Rollout, "shop:worker", "reload", None, &labels)
        );
        assert_ne!(
            a,
            fingerprint(Kind::Gather, "shop:worker", "restart", None, &labels)
        );
    }
}
