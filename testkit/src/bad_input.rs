//! The inputs of the bad-input campaign (`server/tests/bad_input.rs`) as tables: each
//! a name, a request and the status code a node answers it with when the caller may
//! do everything the request asks (the "outside its grants" rows are refused by a
//! token without the grant). Shared with the check that the sidecar's socket answers
//! every one of them as the control plane's port does.

use std::collections::HashMap;

use bytes::{Buf, BufMut};
use ipc_proto::json::to_value;
use ipc_proto::pb::{BroadcastRequest, ReplyRequest, SendMsgRequest, SubscribeRequest};
use serde_json::json;
use tonic::codec::{DecodeBuf, EncodeBuf};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The `ipc.v1.Ipc` methods that take one request message.
pub const METHODS: [&str; 5] = [
    "/ipc.v1.Ipc/Broadcast",
    "/ipc.v1.Ipc/SendMsg",
    "/ipc.v1.Ipc/Subscribe",
    "/ipc.v1.Ipc/Reply",
    "/ipc.v1.Ipc/Members",
];

pub fn broadcast(channel: &str, op: &str, data: serde_json::Value) -> BroadcastRequest {
    BroadcastRequest {
        channel: channel.into(),
        op: op.into(),
        data: Some(to_value(&data)),
        headers: HashMap::new(),
        ..BroadcastRequest::default()
    }
}

pub fn subscription(channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..SubscribeRequest::default()
    }
}

/// A `google.protobuf.Value` of lists nested `depth` deep.
pub fn nested(depth: usize) -> prost_types::Value {
    let mut value = to_value(&json!("bottom"));
    for _ in 0..depth {
        value = prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(
                prost_types::ListValue {
                    values: vec![value],
                },
            )),
        };
    }
    value
}

/// Pseudo-random bytes from a fixed seed (reproducible runs).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// Bad Broadcast requests (with `--max-msg-bytes 65536`).
pub fn broadcasts() -> Vec<(&'static str, BroadcastRequest, Code)> {
    let mut many_headers = broadcast("junk:a", "x", json!(null));
    many_headers.headers = (0..10_000).map(|i| (format!("h{i}"), "v".into())).collect();
    let mut empty_header = broadcast("junk:a", "x", json!(null));
    empty_header.headers = HashMap::from([(String::new(), "v".into())]);
    vec![
        (
            "empty request",
            BroadcastRequest::default(),
            Code::InvalidArgument,
        ),
        (
            "empty op",
            broadcast("junk:a", "", json!(null)),
            Code::InvalidArgument,
        ),
        (
            "long op",
            broadcast("junk:a", &"o".repeat(300), json!(null)),
            Code::InvalidArgument,
        ),
        (
            "control op",
            broadcast("junk:a", "x\u{0}y", json!(null)),
            Code::InvalidArgument,
        ),
        (
            "huge channel",
            broadcast(&"c".repeat(60_000), "x", json!(null)),
            Code::InvalidArgument,
        ),
        (
            "unicode channel",
            broadcast("jünk:ä", "x", json!(null)),
            Code::InvalidArgument,
        ),
        (
            "bare colon",
            broadcast(":", "x", json!(null)),
            Code::InvalidArgument,
        ),
        (
            "pattern channel",
            broadcast("junk:>", "x", json!(null)),
            Code::InvalidArgument,
        ),
        (
            "over --max-msg-bytes",
            broadcast("junk:a", "x", json!("d".repeat(100_000))),
            Code::ResourceExhausted,
        ),
        (
            "over the frame limit",
            broadcast("junk:a", "x", json!("d".repeat(5 << 20))),
            Code::ResourceExhausted,
        ),
        ("10000 headers", many_headers, Code::ResourceExhausted),
        ("empty header name", empty_header, Code::InvalidArgument),
        (
            "outside its grants",
            broadcast("keep:n", "forged", json!(null)),
            Code::PermissionDenied,
        ),
    ]
}

/// Broadcast data nested beyond the decoder's limit: INVALID_ARGUMENT, "could not be decoded".
pub fn too_deep() -> BroadcastRequest {
    BroadcastRequest {
        data: Some(nested(200)),
        ..broadcast("junk:a", "x", json!(null))
    }
}

/// Request bytes that are no protobuf message: INVALID_ARGUMENT on every method.
pub fn undecodable() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("bad wire type", vec![0x0f, 0xff, 0xff]),
        ("truncated field", vec![0x0a, 0x10, b'a']),
        ("invalid UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        (
            "overlong varint",
            vec![0x08; 1].into_iter().chain([0xff; 11]).collect(),
        ),
    ]
}

/// Bad SendMsg requests.
pub fn sends() -> Vec<(&'static str, SendMsgRequest, Code)> {
    vec![
        (
            "empty request",
            SendMsgRequest::default(),
            Code::InvalidArgument,
        ),
        (
            "bad target",
            SendMsgRequest {
                target: "a b".into(),
                op: "x".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "pattern target",
            SendMsgRequest {
                target: "junk:*".into(),
                op: "x".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "huge timeout",
            SendMsgRequest {
                target: "junk:a".into(),
                op: "x".into(),
                timeout_ms: u32::MAX,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "no responders",
            SendMsgRequest {
                target: "junk:nobody".into(),
                op: "x".into(),
                ..Default::default()
            },
            Code::Unavailable,
        ),
        (
            "unknown built-in",
            SendMsgRequest {
                op: "reboot".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "members without the grant",
            SendMsgRequest {
                op: "members".into(),
                ..Default::default()
            },
            Code::PermissionDenied,
        ),
        (
            "outside its grants",
            SendMsgRequest {
                target: "shop:w:1".into(),
                op: "x".into(),
                ..Default::default()
            },
            Code::PermissionDenied,
        ),
    ]
}

/// Bad Subscribe requests; `epoch` is the epoch of the node's log (a cursor's first part).
pub fn subscribes(epoch: &str) -> Vec<(&'static str, SubscribeRequest, Code)> {
    let thousands: Vec<String> = (0..5000).map(|i| format!("junk:c{i}")).collect();
    let labels: HashMap<String, String> =
        (0..10_000).map(|i| (format!("l{i}"), "v".into())).collect();
    vec![
        (
            "5000 channels",
            SubscribeRequest {
                channels: thousands,
                ..Default::default()
            },
            Code::ResourceExhausted,
        ),
        (
            "10000 labels",
            SubscribeRequest {
                labels,
                ..Default::default()
            },
            Code::ResourceExhausted,
        ),
        ("empty pattern", subscription(&[""]), Code::InvalidArgument),
        (
            "empty segment",
            subscription(&["junk::a"]),
            Code::InvalidArgument,
        ),
        (
            "tail not last",
            subscription(&["junk:>:a"]),
            Code::InvalidArgument,
        ),
        (
            "partial wildcard",
            subscription(&["junk:a*"]),
            Code::InvalidArgument,
        ),
        ("unicode", subscription(&["jünk"]), Code::InvalidArgument),
        (
            "long pattern",
            subscription(&[&"p".repeat(300)]),
            Code::InvalidArgument,
        ),
        (
            "pattern as id",
            SubscribeRequest {
                id: "junk:*".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            // Over --max-msg-bytes before the id is even read (issue 15).
            "huge id",
            SubscribeRequest {
                id: "i".repeat(100_000),
                ..Default::default()
            },
            Code::ResourceExhausted,
        ),
        (
            "bad app",
            SubscribeRequest {
                app: "a:b".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "tag without role",
            SubscribeRequest {
                tag: "t".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "malformed cursor",
            SubscribeRequest {
                cursor: "zzz".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "huge cursor",
            SubscribeRequest {
                cursor: "9".repeat(100_000),
                ..Default::default()
            },
            Code::ResourceExhausted,
        ),
        (
            "cursor ahead of the log",
            SubscribeRequest {
                cursor: format!("{epoch}.999999999-0"),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "channels outside its grants",
            subscription(&["keep:>"]),
            Code::PermissionDenied,
        ),
        ("everything", subscription(&[">"]), Code::PermissionDenied),
        (
            "the witness's id, to take it over",
            SubscribeRequest {
                id: "keep:witness".into(),
                ..Default::default()
            },
            Code::PermissionDenied,
        ),
        (
            "a role outside its grants",
            SubscribeRequest {
                role: "worker".into(),
                ..Default::default()
            },
            Code::PermissionDenied,
        ),
    ]
}

/// Bad Reply requests.
pub fn replies() -> Vec<(&'static str, ReplyRequest, Code)> {
    vec![
        (
            "empty request",
            ReplyRequest::default(),
            Code::InvalidArgument,
        ),
        (
            "unknown node",
            ReplyRequest {
                reply_to: "someone#42".into(),
                op: "x".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            "garbage reply_to",
            ReplyRequest {
                reply_to: "garbage".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            "huge reply_to",
            ReplyRequest {
                reply_to: "r".repeat(100_000),
                ..Default::default()
            },
            Code::ResourceExhausted,
        ),
    ]
}

/// Sends raw bytes as the request message of `method`: whatever protobuf or not.
#[derive(Clone, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Calls `method` with `request`'s raw bytes as its request message; the first
/// response item (waiting at most [`PATIENCE`](crate::stream::PATIENCE)).
pub async fn raw_call(
    channel: &Channel,
    method: &'static str,
    request: tonic::Request<Vec<u8>>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let response = grpc
        .server_streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(method),
            RawCodec,
        )
        .await?;
    let mut stream = response.into_inner();
    match tokio::time::timeout(crate::stream::PATIENCE, stream.message()).await {
        Ok(Ok(Some(item))) => Ok(item),
        Ok(Ok(None)) => Ok(Vec::new()),
        Ok(Err(status)) => Err(status),
        Err(_) => panic!("{method}: no answer within the patience bound"),
    }
}
