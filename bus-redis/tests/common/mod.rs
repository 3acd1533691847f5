//! Shared harness of the Redis bus tests: a private redis-server, `ipc-server`
//! replicas on it, and small client helpers. Every wait is bounded and waits on a
//! real signal (a stream message, a health change) or polls a real answer.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, Member, MembersRequest, Msg, ReplyRequest, SendMsgRequest,
    SubscribeRequest,
};
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::RedisServer;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest wait for anything expected to happen; a test fails rather than hangs.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Presence TTL of replicas in tests: short, so a dead replica vanishes quickly.
pub const PRESENCE_TTL_MS: &str = "1500";

pub type Client = IpcClient<Channel>;

/// Starts a replica named `node` on `redis_url` (app `shop`).
pub fn replica(redis_url: &str, node: &str) -> ServerProcess {
    replica_with(redis_url, node, &[])
}

pub fn replica_with(redis_url: &str, node: &str, extra: &[&str]) -> ServerProcess {
    let mut args = vec![
        "--redis",
        redis_url,
        "--redis-prefix",
        "test",
        "--node",
        node,
        "--app",
        "shop",
        "--presence-ttl-ms",
        PRESENCE_TTL_MS,
    ];
    // Short by default so an unreachable Redis shows quickly; a test may set its own.
    if !extra.contains(&"--redis-timeout-ms") {
        args.extend_from_slice(&["--redis-timeout-ms", "1000"]);
    }
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
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

/// Subscribes and returns the stream after its `ipc:subscribed`.
pub async fn subscribe(client: &mut Client, req: SubscribeRequest) -> Streaming<Msg> {
    let mut stream = client
        .subscribe(req)
        .await
        .unwrap_or_else(|e| panic!("subscribe refused: {e}"))
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(first.op, "ipc:subscribed", "{first:?}");
    stream
}

pub fn channels(id: &str, channels: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        id: id.into(),
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..SubscribeRequest::default()
    }
}

/// The next message of a stream; fails the test if none comes in time.
pub async fn next(stream: &mut Streaming<Msg>) -> Msg {
    match tokio::time::timeout(PATIENCE, stream.message()).await {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Err(status)) => panic!("stream failed: {status}"),
        Err(_) => panic!("no message within {PATIENCE:?}"),
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

/// Polls `check` until it returns `Some`, at most [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits, on the gRPC health Watch stream, until `server` reports `want`.
pub async fn wait_health(server: &ServerProcess, want: ServingStatus) {
    let channel = Channel::from_shared(server.url())
        .expect("server url")
        .connect()
        .await
        .expect("connecting for health");
    let mut health = HealthClient::new(channel);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: "ipc.v1.Ipc".into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let wait = async {
        while let Some(update) = updates.message().await.expect("health stream") {
            if update.status == want as i32 {
                return;
            }
        }
        panic!("health stream ended");
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("health not {want:?} within {PATIENCE:?}"));
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
