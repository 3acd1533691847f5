//! Who answers a request in a node that is a member itself (a sidecar's pod): its
//! hook for the op, then a local responder, then a built-in sent to its id — in
//! the same order for a local caller's SendMsg and for a request a bus brings from
//! another node through its `Local` handle.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use ipc_core::bus::{
    Bus, BusError, IdempotencyKey, PendingAppend, Replay, ReplyError, RequestError,
};
use ipc_core::channel::Pattern;
use ipc_core::cursor::Cursor;
use ipc_core::local::Local;
use ipc_core::memory::{MemoryBus, Retention};
use ipc_core::node::{Hooks, OwnMember};
use ipc_core::{Caller, Node, NodeConfig, NodeError};
use ipc_proto::pb::{Member, Msg, ReplyRequest, SendMsgRequest, SubscribeRequest};
use tokio::sync::watch;

/// The memory bus, keeping the handle it is attached with, as a bus bringing
/// requests from other nodes would.
struct Attached {
    bus: MemoryBus,
    local: OnceLock<Local>,
}

#[async_trait]
impl Bus for Attached {
    fn attach(&self, local: Local) {
        self.bus.attach(local.clone());
        let _ = self.local.set(local);
    }

    async fn submit(
        &self,
        msg: Msg,
        key: Option<IdempotencyKey>,
    ) -> Result<PendingAppend, BusError> {
        self.bus.submit(msg, key).await
    }

    async fn replay(&self, after: &Cursor, patterns: &[Pattern]) -> Result<Replay, BusError> {
        self.bus.replay(after, patterns).await
    }

    async fn request(&self, target: &str, msg: Msg, at: Instant) -> Result<Msg, RequestError> {
        self.bus.request(target, msg, at).await
    }

    async fn forward_reply(&self, reply: Msg) -> Result<(), ReplyError> {
        self.bus.forward_reply(reply).await
    }

    async fn members(&self, local: Vec<Member>) -> Result<Vec<Member>, BusError> {
        self.bus.members(local).await
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.bus.health()
    }
}

/// A hook for the op `hooked` only.
struct OneHook;

#[async_trait]
impl Hooks for OneHook {
    fn has(&self, op: &str) -> bool {
        op == "hooked"
    }

    async fn answer(&self, request: &Msg, _deadline: Instant) -> Msg {
        Msg {
            op: format!("hook:{}", request.op),
            sender: "pod-1".into(),
            ..Msg::default()
        }
    }
}

/// A node that is member `pod-1` of role `shop:web`, with a local responder of
/// that role answering `responder:OP`.
async fn pod_node() -> (Arc<Node>, Local) {
    let bus = Arc::new(Attached {
        bus: MemoryBus::new(Retention::default()),
        local: OnceLock::new(),
    });
    let node = Node::with_own_member(
        NodeConfig {
            name: "pod-node".into(),
            default_app: Some("shop".into()),
            ..NodeConfig::default()
        },
        bus.clone(),
        OwnMember {
            id: "pod-1".into(),
            channels: HashSet::from(["pod-1".into(), "shop:web".into()]),
            hooks: Arc::new(OneHook),
        },
    );
    let local = bus.local.get().expect("attached").clone();
    let request = SubscribeRequest {
        id: "w1".into(),
        role: "web".into(),
        ..Default::default()
    };
    let mut stream = node.subscribe(&Caller::default(), request).await.unwrap();
    let responder = node.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if msg.reply_to.is_empty() {
                continue;
            }
            let reply = ReplyRequest {
                reply_to: msg.reply_to.clone(),
                op: format!("responder:{}", msg.op),
                ..Default::default()
            };
            let _ = responder.reply(&Caller::default(), reply).await;
        }
    });
    (node, local)
}

async fn send(node: &Node, target: &str, op: &str) -> Result<String, NodeError> {
    let request = SendMsgRequest {
        target: target.into(),
        op: op.into(),
        timeout_ms: 10_000,
        ..Default::default()
    };
    let reply = node.send_msg(&Caller::default(), request, None).await?;
    Ok(reply.op)
}

async fn from_another_node(local: &Local, target: &str, op: &str) -> Result<String, RequestError> {
    let request = Msg {
        op: op.into(),
        channel: target.into(),
        id: "remote-1".into(),
        sender: "elsewhere".into(),
        ..Msg::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    Ok(local.request(target, request, deadline).await?.op)
}

#[tokio::test]
async fn a_hook_answers_before_a_local_responder_and_a_builtin_after_it() {
    let (node, _local) = pod_node().await;
    assert_eq!(send(&node, ":web", "hooked").await.unwrap(), "hook:hooked");
    assert_eq!(send(&node, ":web", "work").await.unwrap(), "responder:work");
    assert_eq!(send(&node, "pod-1", "ping").await.unwrap(), "pong");
    assert_eq!(send(&node, "pod-1", "hooked").await.unwrap(), "hook:hooked");
    let nobody = send(&node, "pod-1", "work").await.unwrap_err();
    assert!(matches!(nobody, NodeError::NoResponders(_)), "{nobody:?}");
}

#[tokio::test]
async fn a_request_from_another_node_is_answered_in_the_same_order() {
    let (_node, local) = pod_node().await;
    let ask = |target: &'static str, op: &'static str| from_another_node(&local, target, op);
    assert_eq!(ask("shop:web", "hooked").await.unwrap(), "hook:hooked");
    assert_eq!(ask("shop:web", "work").await.unwrap(), "responder:work");
    assert_eq!(ask("pod-1", "ping").await.unwrap(), "pong");
    assert_eq!(ask("pod-1", "hooked").await.unwrap(), "hook:hooked");
    let nobody = ask("pod-1", "work").await.unwrap_err();
    assert!(
        matches!(nobody, RequestError::NoResponders(_)),
        "{nobody:?}"
    );
}
