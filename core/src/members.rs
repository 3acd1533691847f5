//! Members answers: who a broadcast on a channel would reach
//! (`MembersRequest.channel`), and lists that never fail for size — a list larger
//! than a response may be is cut, and the answer says so (`MembersResponse.truncated`).

use ipc_proto::pb::Member;
use prost::Message as _;

use crate::channel::Pattern;

/// Whether a broadcast on `channel` (an expanded channel name) reaches `member`:
/// one of its subscriptions matches it — patterns, role and tag channels and its
/// id alike, as the hub matches them when it delivers. Watchers count: a broadcast
/// reaches them too.
pub fn receives(member: &Member, channel: &str) -> bool {
    member
        .channels
        .iter()
        .filter_map(|text| Pattern::parse(text).ok())
        .any(|pattern| pattern.matches(channel))
}

/// Room left in a response for what surrounds the members (field tags, the
/// `truncated` flag, gRPC framing).
const MARGIN: usize = 64 << 10;

/// The largest gRPC message a node sends or accepts for `max_msg_bytes` (as the
/// server and the sidecar configure tonic): twice the message limit, at least 4 MiB.
pub fn max_frame_bytes(max_msg_bytes: usize) -> usize {
    max_msg_bytes.saturating_mul(2).max(4 << 20)
}

/// The members that fit in `budget` encoded bytes, in order, and whether some
/// were left out.
pub fn cap(members: Vec<Member>, budget: usize) -> (Vec<Member>, bool) {
    let budget = budget.saturating_sub(MARGIN);
    let mut used = 0;
    let mut kept = Vec::with_capacity(members.len());
    let total = members.len();
    for member in members {
        // Each entry: its bytes plus a tag and a length prefix.
        let size = member.encoded_len() + 6;
        if used + size > budget {
            break;
        }
        used += size;
        kept.push(member);
    }
    let truncated = kept.len() < total;
    (kept, truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_reaches_members_whose_subscriptions_match() {
        let member = |channels: &[&str]| Member {
            channels: channels.iter().map(|c| c.to_string()).collect(),
            ..Member::default()
        };
        let worker = member(&["shop:worker", "shop:worker:eu", "w1"]);
        let tail = member(&["shop:>", "tail"]);
        let one_level = member(&["shop:*", "t2"]);
        assert!(receives(&worker, "shop:worker"));
        assert!(receives(&worker, "w1"));
        assert!(!receives(&worker, "shop:orders"));
        assert!(receives(&tail, "shop:worker:eu"));
        assert!(receives(&one_level, "shop:worker"));
        assert!(!receives(&one_level, "shop:worker:eu"));
        assert!(!receives(&member(&["not a pattern!"]), "shop:worker"));
    }

    #[test]
    fn keeps_what_fits_and_says_when_it_cut() {
        let member = |i: usize| Member {
            id: format!("m{i}"),
            labels: [("blob".to_string(), "x".repeat(1000))].into(),
            ..Member::default()
        };
        let all: Vec<Member> = (0..200).map(member).collect();
        let (kept, truncated) = cap(all.clone(), MARGIN + 50_000);
        assert!(truncated);
        assert!(!kept.is_empty() && kept.len() < 200);
        assert_eq!(kept[0].id, "m0");
        let (kept, truncated) = cap(all, 4 << 20);
        assert_eq!((kept.len(), truncated), (200, false));
    }
}
