//! Members answers that never fail for size: a list larger than a response may be
//! is cut, and the answer says so (`MembersResponse.truncated`).

use ipc_proto::pb::Member;
use prost::Message as _;

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
