//! What a subscriber's stream sends: a message shared by all its subscribers, or
//! one member's request of an operation (Gather), written from the bytes its
//! members share and the few fields that are its own.
//!
//! An operation's requests differ only by `reply_to`, `id` and the member header:
//! building a `Msg` per member (the operation's headers map cloned, strings
//! copied) and encoding each whole was a third of the node's work per member
//! that was not HTTP/2. Protobuf lets an encoded message be followed by more
//! fields (and a map by more entries): the shared bytes, then the member's fields,
//! decode to the very message the member would otherwise get.

use std::sync::Arc;

use ipc_proto::pb::Msg;
use prost::Message as _;
use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::responders::MEMBER_HEADER;

/// An item of a subscriber's queue and stream.
pub enum Outbound {
    /// A message, shared by every stream it goes to.
    Msg(Arc<Msg>),
    /// A message that goes to this one stream only: encoded straight into the
    /// stream, not kept encoded for other streams.
    Sole(Arc<Msg>),
    /// One member's request of an operation.
    MemberRequest(Box<MemberRequest>),
}

impl Outbound {
    /// The item as a message (a member's request is built whole).
    pub fn into_shared(self) -> Arc<Msg> {
        match self {
            Outbound::Msg(msg) | Outbound::Sole(msg) => msg,
            Outbound::MemberRequest(request) => Arc::new(request.to_msg()),
        }
    }

    /// The item as an owned message.
    pub fn into_msg(self) -> Msg {
        match self {
            Outbound::Msg(msg) | Outbound::Sole(msg) => Arc::unwrap_or_clone(msg),
            Outbound::MemberRequest(request) => request.to_msg(),
        }
    }

    /// Its position in the log, if it is a log entry.
    pub fn cursor(&self) -> &str {
        match self {
            Outbound::Msg(msg) | Outbound::Sole(msg) => &msg.cursor,
            Outbound::MemberRequest(_) => "",
        }
    }
}

/// What an operation's requests share: every field but the member header, `id`
/// and `reply_to`, as a `Msg` and encoded once.
pub struct OperationRequest {
    shared: Msg,
    encoded: Vec<u8>,
}

/// Field numbers of `ipc.v1.Msg` written per member.
const HEADERS_FIELD: u32 = 3;
const ID_FIELD: u32 = 4;
const REPLY_TO_FIELD: u32 = 9;

impl OperationRequest {
    /// `shared` must not carry the member header, `id` or `reply_to`: each member's
    /// request adds its own.
    pub fn new(shared: Msg) -> Self {
        debug_assert!(shared.id.is_empty() && shared.reply_to.is_empty());
        debug_assert!(!shared.headers.contains_key(MEMBER_HEADER));
        let encoded = shared.encode_to_vec();
        Self { shared, encoded }
    }

    /// The shared fields, as a message.
    pub fn shared(&self) -> &Msg {
        &self.shared
    }

    /// Bytes of memory the shared part holds (its message and its encoding).
    pub fn memory_size(&self) -> usize {
        crate::msg_size::memory_size(&self.shared) + self.encoded.capacity()
    }
}

/// One member's request of an operation: the shared part and its own fields.
pub struct MemberRequest {
    pub operation: Arc<OperationRequest>,
    pub member: Arc<str>,
    pub id: String,
    pub reply_to: String,
}

impl MemberRequest {
    /// Writes the request's encoding: the shared bytes, then the member header
    /// (one more map entry), `id` and `reply_to`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_slice(&self.operation.encoded);
        let key = MEMBER_HEADER;
        let value: &str = &self.member;
        let entry_len = string_len(1, key) + string_len(2, value);
        encode_key(HEADERS_FIELD, WireType::LengthDelimited, dst);
        encode_varint(entry_len as u64, dst);
        put_string(1, key, dst);
        put_string(2, value, dst);
        put_string(ID_FIELD, &self.id, dst);
        put_string(REPLY_TO_FIELD, &self.reply_to, dst);
    }

    /// The request as one whole message (for a stream read in the process).
    pub fn to_msg(&self) -> Msg {
        let mut msg = self.operation.shared.clone();
        msg.headers
            .insert(MEMBER_HEADER.to_string(), self.member.to_string());
        msg.id.clone_from(&self.id);
        msg.reply_to.clone_from(&self.reply_to);
        msg
    }
}

/// A string field as prost writes it: nothing when empty.
fn put_string(tag: u32, value: &str, dst: &mut impl BufMut) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, dst);
        encode_varint(value.len() as u64, dst);
        dst.put_slice(value.as_bytes());
    }
}

fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(value.len() as u64) + value.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_request_decodes_to_the_message_it_stands_for() {
        let shared = Msg {
            op: "restart".into(),
            data: Some(ipc_proto::json::to_value(&serde_json::json!({"n": 1}))),
            headers: [
                ("ipc-op-id".to_string(), "op-1".to_string()),
                ("x".to_string(), "y".to_string()),
            ]
            .into(),
            channel: "shop:worker".into(),
            sender: "admin".into(),
            ts_ms: 1_700_000_000_000,
            ..Msg::default()
        };
        let request = MemberRequest {
            operation: Arc::new(OperationRequest::new(shared)),
            member: Arc::from("w-1"),
            id: "node-a-7".into(),
            reply_to: "node-a#3.0123456789abcdef".into(),
        };
        let mut bytes = Vec::new();
        request.encode(&mut bytes);
        let decoded = Msg::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded, request.to_msg());
        assert_eq!(decoded.headers.get(MEMBER_HEADER).unwrap(), "w-1");
        assert_eq!(decoded.headers.len(), 3);
        assert_eq!(decoded.id, "node-a-7");
        assert_eq!(decoded.reply_to, "node-a#3.0123456789abcdef");
        assert_eq!(decoded.encoded_len(), bytes.len());
    }
}
