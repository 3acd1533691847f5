//! Unit tests of the input rules, on a node over the memory bus.

use std::sync::Arc;

use super::*;
use crate::memory::{MemoryBus, Retention};
use crate::node::{NodeConfig, RateLimit};

fn node_with(config: NodeConfig) -> Arc<Node> {
    Node::new(config, Arc::new(MemoryBus::new(Retention::default())))
}

/// A node named `cp-1` whose callers default to app `shop`, with small limits.
fn node() -> Arc<Node> {
    node_with(NodeConfig {
        name: "cp-1".into(),
        default_app: Some("shop".into()),
        max_msg_bytes: 1000,
        max_headers: 3,
        max_header_bytes: 100,
        max_channels: 4,
        default_timeout: Duration::from_secs(5),
        max_timeout: Duration::from_secs(60),
        ..NodeConfig::default()
    })
}

fn anonymous() -> Caller {
    Caller {
        sender: "worker-1".into(),
        ..Caller::default()
    }
}

/// An authenticated caller of app `shop` that may subscribe to `patterns` only.
fn granted(patterns: &[&str]) -> Caller {
    let grants = Grants {
        subscribe: patterns
            .iter()
            .map(|p| Pattern::parse(p).unwrap())
            .collect(),
        ..Grants::default()
    };
    Caller {
        app: Some("shop".into()),
        sender: "token-a".into(),
        grants: Some(Arc::new(grants)),
        trace: None,
    }
}

fn map(entries: &[(&str, &str)]) -> HashMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn invalid(result: Result<impl std::fmt::Debug, NodeError>) -> String {
    match result {
        Err(NodeError::InvalidArgument(text)) => text,
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

fn too_large(result: Result<impl std::fmt::Debug, NodeError>) -> String {
    match result {
        Err(NodeError::TooLarge(text)) => text,
        other => panic!("expected RESOURCE_EXHAUSTED, got {other:?}"),
    }
}

fn denied(result: Result<impl std::fmt::Debug, NodeError>) -> String {
    match result {
        Err(NodeError::PermissionDenied(text)) => text,
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
}

#[test]
fn a_message_over_the_size_limit_is_refused_naming_the_flag_and_counted() {
    let node = node();
    assert!(node.check_size(1000).is_ok());
    let text = too_large(node.check_size(1001));
    assert!(
        text.contains("1001 bytes") && text.contains("--max-msg-bytes"),
        "{text}"
    );
    assert_eq!(node.metrics.refusals(Refusal::MsgBytes), 1);
}

#[test]
fn headers_are_bounded_in_count_and_bytes() {
    let node = node();
    assert!(
        node.check_headers(&map(&[("a", "1"), ("b", "2"), ("c", "3")]))
            .is_ok()
    );
    let text = too_large(node.check_headers(&map(&[("a", ""), ("b", ""), ("c", ""), ("d", "")])));
    assert!(
        text.contains("4 headers") && text.contains("--max-headers"),
        "{text}"
    );
    assert_eq!(node.metrics.refusals(Refusal::Headers), 1);
    let text = too_large(node.check_map("labels", &map(&[("k", &"v".repeat(100))])));
    assert!(
        text.contains("labels total 101 bytes") && text.contains("--max-header-bytes"),
        "{text}"
    );
    assert_eq!(node.metrics.refusals(Refusal::HeaderBytes), 1);
}

#[test]
fn header_names_and_values_are_printable_and_names_not_empty() {
    let node = node();
    let text = invalid(node.check_headers(&map(&[("trace\nid", "x")])));
    assert!(
        text.contains("headers name") && text.contains("U+000A"),
        "{text}"
    );
    let text = invalid(node.check_map("labels", &map(&[("zone", "eu\u{202E}")])));
    assert!(
        text.contains("labels \"zone\" value") && text.contains("U+202E"),
        "{text}"
    );
    let text = invalid(node.check_headers(&map(&[("", "x")])));
    assert!(text.contains("must be 1 to 128 bytes"), "{text}");
    let long = "n".repeat(129);
    let node = node_with(NodeConfig {
        max_header_bytes: 1000,
        ..NodeConfig::default()
    });
    let text = invalid(node.check_headers(&map(&[(&long, "x")])));
    assert!(text.contains("must be 1 to 128 bytes"), "{text}");
}

#[test]
fn an_op_is_required_bounded_and_printable() {
    assert!(check_op("worker:restart").is_ok());
    assert!(invalid(check_op("")).contains("op is empty"));
    assert!(check_op(&"o".repeat(256)).is_ok());
    assert!(invalid(check_op(&"o".repeat(257))).contains("257 bytes; at most 256"));
    assert!(invalid(check_op("re\tstart")).contains("U+0009"));
}

#[test]
fn timeouts_default_are_capped_and_end_before_the_grpc_deadline() {
    let node = node();
    assert_eq!(
        node.request_timeout(0, None).unwrap(),
        Duration::from_secs(5)
    );
    assert_eq!(
        node.request_timeout(2000, None).unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(
        node.request_timeout(60_000, None).unwrap(),
        Duration::from_secs(60)
    );
    let text = invalid(node.request_timeout(60_001, None));
    assert!(
        text.contains("timeout_ms 60001") && text.contains("60000 ms"),
        "{text}"
    );
    assert_eq!(node.metrics.refusals(Refusal::Timeout), 1);
    // The smaller of timeout_ms and the gRPC deadline, less the margin.
    let grpc = Duration::from_secs(1);
    assert_eq!(
        node.request_timeout(2000, Some(grpc)).unwrap(),
        before_grpc_deadline(grpc)
    );
    assert_eq!(
        node.request_timeout(500, Some(grpc)).unwrap(),
        Duration::from_millis(500)
    );
}

#[test]
fn the_margin_before_a_grpc_deadline_is_a_fifth_at_most_100_ms() {
    assert_eq!(
        before_grpc_deadline(Duration::from_secs(10)),
        Duration::from_millis(9900)
    );
    assert_eq!(
        before_grpc_deadline(Duration::from_millis(200)),
        Duration::from_millis(160)
    );
    assert_eq!(before_grpc_deadline(Duration::ZERO), Duration::ZERO);
}

#[test]
fn the_app_is_the_callers_else_the_nodes_default() {
    let node = node();
    assert_eq!(node.app(&anonymous()), Some("shop"));
    let billing = Caller {
        app: Some("billing".into()),
        ..anonymous()
    };
    assert_eq!(node.app(&billing), Some("billing"));
    let empty = Caller {
        app: Some(String::new()),
        ..anonymous()
    };
    assert_eq!(node.app(&empty), Some("shop"));
    let bare = node_with(NodeConfig::default());
    assert_eq!(bare.app(&anonymous()), None);
}

#[test]
fn grants_bind_authenticated_callers_only() {
    let node = node();
    assert!(
        node.authorize(&anonymous(), "send to", "shop:worker", |_| false)
            .is_ok()
    );
    let caller = granted(&["shop:>"]);
    assert!(
        node.authorize(&caller, "send to", "shop:worker", |_| true)
            .is_ok()
    );
    let text = denied(node.authorize(&caller, "send to", "shop:worker", |_| false));
    assert_eq!(
        text,
        "token-a may not send to \"shop:worker\": not in its grants"
    );
    assert_eq!(node.metrics.refusals(Refusal::PermissionDenied), 1);
}

#[test]
fn the_rate_limit_counts_per_identity() {
    let node = node_with(NodeConfig {
        rate_limit: Some(RateLimit {
            per_second: 1,
            burst: 2,
        }),
        ..NodeConfig::default()
    });
    let a = anonymous();
    assert!(node.admit(&a).is_ok());
    assert!(node.admit(&a).is_ok());
    let text = too_large(node.admit(&a));
    assert!(
        text.contains("worker-1 exceeds 1 requests per second"),
        "{text}"
    );
    assert_eq!(node.metrics.refusals(Refusal::Rate), 1);
    let b = Caller {
        sender: "worker-2".into(),
        ..Caller::default()
    };
    assert!(
        node.admit(&b).is_ok(),
        "another identity has its own bucket"
    );
    // Without a limit, everyone is admitted.
    let unlimited = self::node();
    for _ in 0..100 {
        assert!(unlimited.admit(&a).is_ok());
    }
}

fn subscribe(role: &str, tag: &str, id: &str, channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        role: role.into(),
        tag: tag.into(),
        id: id.into(),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..SubscribeRequest::default()
    }
}

fn patterns(spec: &SubscriberSpec) -> Vec<&str> {
    spec.patterns.iter().map(Pattern::as_str).collect()
}

#[test]
fn a_subscription_gets_its_role_tag_and_id_channels_once_each() {
    let node = node();
    let req = subscribe(
        "worker",
        "eu",
        "worker-1",
        &[":metrics", "shop:worker", "shop:*"],
    );
    let spec = node.subscriber_spec(&anonymous(), &req).unwrap();
    assert_eq!(spec.id, "worker-1");
    assert_eq!(spec.app, "shop");
    assert_eq!(
        patterns(&spec),
        [
            "shop:metrics",
            "shop:worker",
            "shop:*",
            "shop:worker:eu",
            "worker-1"
        ]
    );
    assert_eq!(spec.owner, "worker-1");
    assert!(!spec.verified_owner);
}

#[test]
fn a_subscription_without_an_id_gets_a_generated_one() {
    let node = node();
    let spec = node
        .subscriber_spec(&anonymous(), &SubscribeRequest::default())
        .unwrap();
    assert!(spec.id.starts_with("sub-"), "{}", spec.id);
    assert_eq!(patterns(&spec), [spec.id.as_str()]);
}

#[test]
fn a_subscription_with_bad_fields_is_refused_naming_the_field() {
    let node = node();
    let caller = anonymous();
    let text = invalid(node.subscriber_spec(&caller, &subscribe("", "eu", "", &[])));
    assert!(text.contains("tag given without a role"), "{text}");
    let text = invalid(node.subscriber_spec(&caller, &subscribe("work:er", "", "", &[])));
    assert!(text.contains("role \"work:er\""), "{text}");
    let text = invalid(node.subscriber_spec(&caller, &subscribe("", "", "a::b", &[])));
    assert!(text.starts_with("subscriber id:"), "{text}");
    let text = invalid(node.subscriber_spec(&caller, &subscribe("", "", "", &["shop:>:x"])));
    assert!(text.contains("'>' before its last segment"), "{text}");
    let bad_app = SubscribeRequest {
        app: "sh op".into(),
        ..SubscribeRequest::default()
    };
    let text = invalid(node.subscriber_spec(&caller, &bad_app));
    assert!(text.contains("app \"sh op\""), "{text}");
    let no_app = node_with(NodeConfig::default());
    let text = invalid(no_app.subscriber_spec(&caller, &subscribe("worker", "", "", &[])));
    assert!(text.contains("role given but no app id is known"), "{text}");
    let text = too_large(
        node.subscriber_spec(&caller, &subscribe("", "", "", &["a", "b", "c", "d", "e"])),
    );
    assert!(
        text.contains("5 channels in one subscription; at most 4"),
        "{text}"
    );
    assert_eq!(node.metrics.refusals(Refusal::Channels), 1);
}

#[test]
fn an_authenticated_subscriber_needs_grants_for_its_patterns_and_chosen_id() {
    let node = node();
    let caller = granted(&["shop:worker", "shop:worker:>", "worker-1"]);
    assert!(
        node.subscriber_spec(&caller, &subscribe("worker", "eu", "worker-1", &[]))
            .is_ok()
    );
    // A generated id needs no grant.
    assert!(
        node.subscriber_spec(&caller, &subscribe("worker", "", "", &[]))
            .is_ok()
    );
    let text = denied(node.subscriber_spec(&caller, &subscribe("worker", "", "worker-2", &[])));
    assert!(text.contains("subscribe with id \"worker-2\""), "{text}");
    let text = denied(node.subscriber_spec(&caller, &subscribe("", "", "", &["shop:>"])));
    assert!(text.contains("subscribe to \"shop:>\""), "{text}");
    let spec = node
        .subscriber_spec(&caller, &subscribe("worker", "", "", &[]))
        .unwrap();
    assert!(spec.verified_owner);
    assert_eq!(spec.owner, "token-a");
}

fn member(id: &str, node: &str) -> Member {
    Member {
        id: id.into(),
        node: node.into(),
        app: "shop".into(),
        role: "worker".into(),
        ..Member::default()
    }
}

#[test]
fn relayed_members_default_to_the_relayers_node_and_get_their_roles() {
    let node = node();
    let relayed = node
        .relayed_members(
            &anonymous(),
            "pod-a",
            &[member("worker-1", ""), member("worker-2", "pod-b")],
        )
        .unwrap();
    assert_eq!(relayed[0].node, "pod-a");
    assert_eq!(relayed[1].node, "pod-b");
    assert_eq!(relayed[0].roles, ["shop:worker"]);
    assert!(relayed[0].responder);
    assert!(
        relayed[0].connected_ms > 0,
        "a relayed member without a time gets now"
    );
}

#[test]
fn relayed_members_with_bad_fields_are_refused_naming_the_member() {
    let node = node();
    let caller = anonymous();
    let text = invalid(node.relayed_members(&caller, "pod-a", &[member("worker-1", "cp-1")]));
    assert!(
        text.starts_with("relayed member \"worker-1\": node \"cp-1\" is this node's name"),
        "{text}"
    );
    let text = invalid(node.relayed_members(
        &caller,
        "pod-a",
        &[member("worker-1", ""), member("worker-1", "pod-a")],
    ));
    assert!(text.contains("listed twice for node \"pod-a\""), "{text}");
    let text = invalid(node.relayed_members(&caller, "pod-a", &[member("a b", "")]));
    assert!(text.starts_with("relayed member \"a b\": id:"), "{text}");
    let with_bad_role = Member {
        role: "wor:ker".into(),
        ..member("worker-1", "")
    };
    let text = invalid(node.relayed_members(&caller, "pod-a", &[with_bad_role]));
    assert!(text.contains("role \"wor:ker\""), "{text}");
    let with_bad_channel = Member {
        channels: vec!["shop:*x".into()],
        ..member("worker-1", "")
    };
    let text = invalid(node.relayed_members(&caller, "pod-a", &[with_bad_channel]));
    assert!(text.contains("channel:"), "{text}");
    let too_many: Vec<Member> = (0..5).map(|i| member(&format!("w{i}"), "")).collect();
    let text = too_large(node.relayed_members(&caller, "pod-a", &too_many));
    assert!(
        text.contains("5 relayed members in one subscription; at most 4"),
        "{text}"
    );
}

#[test]
fn an_authenticated_relayer_may_relay_only_what_its_grants_cover() {
    let node = node();
    let caller = granted(&["worker-1", "shop:worker"]);
    assert!(
        node.relayed_members(&caller, "pod-a", &[member("worker-1", "")])
            .is_ok()
    );
    let text = denied(node.relayed_members(&caller, "pod-a", &[member("worker-2", "")]));
    assert!(
        text.contains("relay a member with id \"worker-2\""),
        "{text}"
    );
    let other_app = Member {
        app: "billing".into(),
        ..member("worker-1", "")
    };
    let text = denied(node.relayed_members(&caller, "pod-a", &[other_app]));
    assert!(
        text.starts_with(
            "relayed member \"worker-1\": token-a may only relay members of its own app \"shop\""
        ),
        "{text}"
    );
    let elsewhere = member("worker-1", "pod-b");
    let text = denied(node.relayed_members(&caller, "pod-a", &[elsewhere]));
    assert!(text.contains("relay a member of \"pod-b\""), "{text}");
}
