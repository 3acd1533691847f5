//! The notices a node puts on Subscribe streams, built and read here only, so that
//! every bus and relay sends the same payload:
//!
//! - `ipc:subscribed` opens every stream: `{id, node, replayed, cursor?}`.
//! - `ipc:gap` says messages were lost before what follows: `{cursor, reason}`,
//!   `cursor` being the last position before the loss (empty when unknown).
//!
//! Notices carry no `cursor` of their own on the message: they are not log entries.

use ipc_proto::json;
use ipc_proto::pb::Msg;
use serde::{Deserialize, Serialize};

pub const SUBSCRIBED: &str = "ipc:subscribed";
pub const GAP: &str = "ipc:gap";

/// The data of `ipc:subscribed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    /// The subscriber id (generated when the request had none).
    pub id: String,
    /// The node serving the stream.
    pub node: String,
    /// How many messages of the stream's head (replayed entries and an `ipc:gap`)
    /// follow this notice; a relay such as the sidecar counts them.
    #[serde(default)]
    pub replayed: usize,
    /// Where the stream stands in the log once the head is sent: a resume point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// The data of `ipc:gap`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The last position before the loss; empty when unknown.
    #[serde(default)]
    pub cursor: String,
    /// What was lost and why, for people.
    #[serde(default)]
    pub reason: String,
}

impl Subscribed {
    /// The notice, with the message `id` and `sender` (the node's name) given.
    pub fn to_msg(&self, id: String, sender: &str) -> Msg {
        notice(SUBSCRIBED, self, id, sender)
    }

    /// Reads `msg` if it is an `ipc:subscribed`.
    pub fn from_msg(msg: &Msg) -> Option<Self> {
        read(SUBSCRIBED, msg)
    }
}

impl Gap {
    pub fn new(cursor: Option<impl ToString>, reason: impl Into<String>) -> Self {
        Self {
            cursor: cursor.map(|c| c.to_string()).unwrap_or_default(),
            reason: reason.into(),
        }
    }

    /// The notice, with the message `id` and `sender` (the node's name) given.
    pub fn to_msg(&self, id: String, sender: &str) -> Msg {
        notice(GAP, self, id, sender)
    }

    /// Reads `msg` if it is an `ipc:gap` notice (not a log entry of that op).
    pub fn from_msg(msg: &Msg) -> Option<Self> {
        if !msg.cursor.is_empty() {
            return None;
        }
        read(GAP, msg)
    }
}

fn notice(op: &str, data: &impl Serialize, id: String, sender: &str) -> Msg {
    let data = serde_json::to_value(data).expect("a notice serializes");
    Msg {
        op: op.to_string(),
        data: Some(json::to_value(&data)),
        id,
        sender: sender.to_string(),
        ts_ms: crate::now_ms(),
        ..Msg::default()
    }
}

fn read<T: serde::de::DeserializeOwned + Default>(op: &str, msg: &Msg) -> Option<T> {
    if msg.op != op {
        return None;
    }
    // Numbers come back from `google.protobuf.Value` as floats.
    let mut data = json::from_optional(msg.data.as_ref());
    if let Some(replayed) = data.get_mut("replayed")
        && let Some(n) = replayed.as_f64()
    {
        *replayed = (n as u64).into();
    }
    Some(serde_json::from_value(data).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribed_round_trips_through_a_message() {
        let notice = Subscribed {
            id: "w1".into(),
            node: "n1".into(),
            replayed: 3,
            cursor: Some("7.5-0".into()),
        };
        let msg = notice.to_msg("id-1".into(), "n1");
        assert_eq!(msg.op, SUBSCRIBED);
        assert!(msg.cursor.is_empty());
        assert_eq!(Subscribed::from_msg(&msg), Some(notice));
        assert_eq!(Gap::from_msg(&msg), None);
    }

    #[test]
    fn gap_has_cursor_and_reason_even_when_the_cursor_is_unknown() {
        let msg = Gap::new(None::<String>, "the log was lost").to_msg("id-2".into(), "n1");
        let data = json::from_optional(msg.data.as_ref());
        assert_eq!(
            data,
            serde_json::json!({"cursor": "", "reason": "the log was lost"})
        );
        assert_eq!(Gap::from_msg(&msg).unwrap().reason, "the log was lost");
    }

    #[test]
    fn a_log_entry_with_the_gap_op_is_not_a_notice() {
        let entry = Msg {
            op: GAP.into(),
            cursor: "7.5-0".into(),
            ..Msg::default()
        };
        assert_eq!(Gap::from_msg(&entry), None);
    }
}
