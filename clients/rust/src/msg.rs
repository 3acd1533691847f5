//! The values callers handle: messages, members and broadcast receipts, with the
//! payload as `serde_json::Value` rather than `google.protobuf.Value`.
//!
//! They serialize to JSON with the proto's field names, leaving out empty fields;
//! `ipcctl` prints them that way.

use std::collections::BTreeMap;

use ipc_proto::json;
use ipc_proto::pb;
use serde::{Deserialize, Serialize};

/// The op of the first message of every subscription stream; data is
/// `{"id": <subscriber id>, "node": <node name>}`.
pub const OP_SUBSCRIBED: &str = "ipc:subscribed";
/// The op a node sends when messages could not be replayed (cursor older than the
/// log's retention, or the log was lost).
pub const OP_GAP: &str = "ipc:gap";
/// The op of the notice a Serve stream sends when one of its replies was not
/// delivered: data `{"reply_to", "code", "error"}` (`code` as a status name:
/// `NOT_FOUND` when the requester gave up). [`Handlers::run`](crate::Handlers::run)
/// logs it.
pub const OP_REPLY_ERROR: &str = "ipc:reply-error";

/// A message as a subscriber sees it, and as a reply comes back from `send_msg`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Msg {
    /// What to do: `worker:restart`, `config:get`.
    pub op: String,
    /// The payload; `null` when absent.
    pub data: serde_json::Value,
    /// Free-form string headers.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Unique id assigned by the node that accepted the message.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The resolved channel, e.g. `shop:worker`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// Subscriber id or authenticated name of the sender.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sender: String,
    /// Acceptance time, ms since the epoch.
    #[serde(skip_serializing_if = "is_zero")]
    pub ts_ms: i64,
    /// Position in the log; subscriptions resume after it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cursor: String,
    /// Set on requests: answer with [`Client::reply`](crate::Client::reply).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reply_to: String,
    /// Set on a reply that reports failure.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Msg {
    /// A request expects an answer: its sender is waiting in `send_msg`.
    pub fn is_request(&self) -> bool {
        !self.reply_to.is_empty()
    }
}

impl From<pb::Msg> for Msg {
    fn from(msg: pb::Msg) -> Self {
        Msg {
            data: json::from_optional(msg.data.as_ref()),
            op: msg.op,
            headers: msg.headers.into_iter().collect(),
            id: msg.id,
            channel: msg.channel,
            sender: msg.sender,
            ts_ms: msg.ts_ms,
            cursor: msg.cursor,
            reply_to: msg.reply_to,
            error: msg.error,
        }
    }
}

/// One connected subscriber, as `members` lists it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Member {
    /// Subscriber id; also a channel that targets exactly this subscriber.
    pub id: String,
    /// App id.
    pub app: String,
    /// Role, e.g. `worker`; empty when none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// Tag within the role; empty when none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tag: String,
    /// Labels given at subscribe time.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Channels and patterns it receives, automatic ones included.
    pub channels: Vec<String>,
    /// The node (server replica or sidecar) it is connected to.
    pub node: String,
    /// When it connected, ms since the epoch.
    pub connected_ms: i64,
}

impl From<pb::Member> for Member {
    fn from(member: pb::Member) -> Self {
        Member {
            id: member.id,
            app: member.app,
            role: member.role,
            tag: member.tag,
            labels: member.labels.into_iter().collect(),
            channels: member.channels,
            node: member.node,
            connected_ms: member.connected_ms,
        }
    }
}

/// The acknowledgement of a broadcast: the message is stored in the bus log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Broadcasted {
    /// The id assigned to the message.
    pub id: String,
    /// The resolved channel (`:worker` comes back as `shop:worker`).
    pub channel: String,
    /// The message's position in the log.
    pub cursor: String,
    /// Its key was seen within the node's window: nothing was stored, and `id` and
    /// `cursor` are the first message's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

impl From<pb::BroadcastResponse> for Broadcasted {
    fn from(response: pb::BroadcastResponse) -> Self {
        Broadcasted {
            id: response.id,
            channel: response.channel,
            cursor: response.cursor,
            duplicate: response.duplicate,
        }
    }
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form_uses_proto_names_and_omits_empty_fields() {
        let msg = Msg::from(pb::Msg {
            op: "config:get".into(),
            data: Some(json::to_value(&serde_json::json!({"key": "db"}))),
            reply_to: "r1".into(),
            ..Default::default()
        });
        assert!(msg.is_request());
        let text = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            text,
            r#"{"op":"config:get","data":{"key":"db"},"reply_to":"r1"}"#
        );
        let back: Msg = serde_json::from_str(&text).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn absent_data_is_null() {
        let msg = Msg::from(pb::Msg {
            op: "ping".into(),
            ..Default::default()
        });
        assert_eq!(msg.data, serde_json::Value::Null);
        assert!(!msg.is_request());
    }
}
