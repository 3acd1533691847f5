//! What only the Redis bus tests need: the flags of their `ipc-server` replicas
//! (prefix `test`, app `shop`, a short presence TTL), and client calls carrying
//! text payloads. The processes, the private redis-server, stream and health
//! helpers every crate's tests share are in `ipc_testkit`, re-exported here for the
//! tests' `use common::*`.

#![allow(dead_code, unused_imports)] // each test file uses its own subset

use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, Member, MembersRequest, Msg, ReplyRequest, SendMsgRequest,
    SubscribeRequest,
};
use ipc_testkit::TEST_APP;
use ipc_testkit::redis::RedisServer;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

pub use ipc_testkit::{PATIENCE, ServerProcess, eventually, metric, next, subscribe};

/// Presence TTL of replicas in tests: short, so a dead replica vanishes quickly.
pub const PRESENCE_TTL_MS: &str = "1500";

pub type Client = IpcClient<Channel>;

/// Starts a replica named `node` on `redis_url` (app `shop`).
pub fn replica(redis_url: &str, node: &str) -> ServerProcess {
    replica_with(redis_url, node, &[])
}

pub fn replica_with(redis_url: &str, node: &str, extra: &[&str]) -> ServerProcess {
    ServerProcess::start(&replica_args(&["--redis", redis_url], node, extra))
}

/// The flags of a test replica named `node` on the Redis that `bus` names
/// (`--redis URL`, or the Sentinel flags), then `extra`.
pub fn replica_args<'a>(bus: &[&'a str], node: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = bus.to_vec();
    args.extend([
        "--redis-prefix",
        "test",
        "--node",
        node,
        "--app",
        TEST_APP,
        "--presence-ttl-ms",
        PRESENCE_TTL_MS,
    ]);
    // Short by default so an unreachable Redis shows quickly; a test may set its own.
    if !extra.contains(&"--redis-timeout-ms") {
        args.extend_from_slice(&["--redis-timeout-ms", "1000"]);
    }
    args.extend_from_slice(extra);
    args
}

pub fn redis() -> RedisServer {
    RedisServer::start()
}

pub fn text(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_string())),
    }
}

pub fn text_of(msg: &Msg) -> String {
    match msg.data.as_ref().and_then(|d| d.kind.as_ref()) {
        Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
        other => panic!("message {} has no text data: {other:?}", msg.op),
    }
}

pub async fn broadcast(
    client: &mut Client,
    channel: &str,
    body: &str,
) -> Result<BroadcastResponse, Status> {
    client
        .broadcast(BroadcastRequest {
            channel: channel.into(),
            op: "note".into(),
            data: Some(text(body)),
            ..BroadcastRequest::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

pub fn channels(id: &str, channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        id: id.into(),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..SubscribeRequest::default()
    }
}

/// The next `n` messages' texts.
pub async fn texts(stream: &mut Streaming<Msg>, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(text_of(&next(stream).await));
    }
    out
}

pub async fn send(
    client: &mut Client,
    target: &str,
    op: &str,
    timeout_ms: u32,
) -> Result<Msg, Status> {
    client
        .send_msg(SendMsgRequest {
            target: target.into(),
            op: op.into(),
            data: Some(text("question")),
            timeout_ms,
            ..SendMsgRequest::default()
        })
        .await
        .map(|r| r.into_inner().reply.unwrap_or_default())
}

pub async fn reply(client: &mut Client, reply_to: &str, answer: &str) -> Result<(), Status> {
    client
        .reply(ReplyRequest {
            reply_to: reply_to.into(),
            op: "answer".into(),
            data: Some(text(answer)),
            ..ReplyRequest::default()
        })
        .await
        .map(|_| ())
}

pub async fn members(client: &mut Client) -> Vec<Member> {
    let mut members = client
        .members(MembersRequest::default())
        .await
        .unwrap_or_else(|e| panic!("members failed: {e}"))
        .into_inner()
        .members;
    members.sort_by(|a, b| a.id.cmp(&b.id));
    members
}

pub fn member_ids(members: &[Member]) -> Vec<(String, String)> {
    members
        .iter()
        .map(|m| (m.id.clone(), m.node.clone()))
        .collect()
}

pub fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, containing: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "{status}");
            assert!(
                status.message().contains(containing),
                "{:?} does not say {containing:?}",
                status.message()
            );
        }
        Ok(value) => panic!("expected {code:?}, got {value:?}"),
    }
}
