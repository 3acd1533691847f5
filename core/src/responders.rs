//! Who takes requests: the responders-and-watchers rule, in one place for every bus.
//!
//! A request (SendMsg, Gather, Rollout) goes only to *responders* of its target:
//! subscribers whose id is the target, or whose role channel (`app:role`,
//! `app:role:tag`) is. A subscriber that matches the target only through a pattern or
//! an explicit channel subscription is a *watcher*: it receives broadcasts, never
//! requests. The hub indexes subscribers by these channels, Redis presence publishes
//! them as request routes, and a sidecar relays its pod's responders upstream.

use ipc_proto::pb::{Member, Msg};

/// Header of a reply from a relay (a sidecar) that could not answer the request in
/// its pod after all (its local responder left, no hook for the op): the request is
/// tried on another responder within its deadline instead of failing.
pub const CANNOT_ANSWER_HEADER: &str = "ipc-cannot-answer";

/// Header set on a request addressed to one member (Gather, Rollout) whose `channel`
/// is the operation's target: the member's id, so that a relay hands it to that
/// process and no other.
pub const MEMBER_HEADER: &str = "ipc-member";

/// The role channels a subscriber of `app`, `role` and `tag` answers requests for:
/// `app:role`, and `app:role:tag` with a tag. None without an app and a role.
pub fn role_channels(app: &str, role: &str, tag: &str) -> Vec<String> {
    if app.is_empty() || role.is_empty() {
        return Vec::new();
    }
    let mut channels = vec![format!("{app}:{role}")];
    if !tag.is_empty() {
        channels.push(format!("{app}:{role}:{tag}"));
    }
    channels
}

/// Fills `responder` and `roles` of a member from its app, role and tag.
pub fn with_roles(mut member: Member) -> Member {
    member.roles = role_channels(&member.app, &member.role, &member.tag);
    member.responder = !member.roles.is_empty();
    member
}

/// The channels a member takes requests on: its id, then its role channels.
pub fn request_channels(member: &Member) -> impl Iterator<Item = &str> {
    std::iter::once(member.id.as_str()).chain(member.roles.iter().map(String::as_str))
}

/// Whether a request to `target` may go to `member`.
pub fn responds_to(member: &Member, target: &str) -> bool {
    request_channels(member).any(|c| c == target)
}

/// A reply that means "this relay could not answer after all".
pub fn cannot_answer(reply: &Msg) -> bool {
    reply.headers.contains_key(CANNOT_ANSWER_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_channels_need_an_app_and_a_role() {
        assert_eq!(role_channels("shop", "worker", ""), vec!["shop:worker"]);
        assert_eq!(
            role_channels("shop", "worker", "eu"),
            vec!["shop:worker", "shop:worker:eu"]
        );
        assert!(role_channels("", "worker", "eu").is_empty());
        assert!(role_channels("shop", "", "").is_empty());
    }

    #[test]
    fn a_member_responds_to_its_id_and_roles_only() {
        let worker = with_roles(Member {
            id: "w1".into(),
            app: "shop".into(),
            role: "worker".into(),
            channels: vec!["shop:>".into()],
            ..Member::default()
        });
        assert!(worker.responder);
        assert!(responds_to(&worker, "w1"));
        assert!(responds_to(&worker, "shop:worker"));
        assert!(!responds_to(&worker, "shop:orders"));
        let tail = with_roles(Member {
            id: "tail".into(),
            app: "shop".into(),
            channels: vec!["shop:>".into()],
            ..Member::default()
        });
        assert!(!tail.responder);
        assert!(!responds_to(&tail, "shop:worker"));
    }
}
