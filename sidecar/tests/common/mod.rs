//! What only the sidecar's tests need: the control plane of a test pod (app
//! `shop`), requests with its app, payload builders. The processes
//! (`SidecarProcess`, `ServerProcess`), stream, health and HTTP helpers every
//! crate's tests share are in `ipc_testkit`, re-exported here for the tests'
//! `use common::*`.

#![allow(dead_code, unused_imports)] // each test file uses its own subset

use ipc_proto::json::{from_optional, to_value};
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, Member, MembersRequest, Msg, ReplyRequest, SendMsgRequest,
    SubscribeRequest,
};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

pub type Client = IpcClient<Channel>;

pub use ipc_testkit::TEST_APP as APP;
pub use ipc_testkit::{
    PATIENCE, POD_ID, ServerProcess, SidecarProcess, grpcurl, http_get, next, pod_args,
    run_grpcurl, subscribe, uds_client,
};

/// A control-plane server (memory bus, app `shop`) on a free port, or on `port`.
pub fn server_on(port: Option<u16>, extra: &[&str]) -> ServerProcess {
    let listen = port.map(|p| format!("127.0.0.1:{p}"));
    let mut args = vec!["--app", APP];
    if let Some(listen) = &listen {
        args.extend(["--listen", listen.as_str()]);
    }
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

pub fn server() -> ServerProcess {
    server_on(None, &[])
}

/// `ipc-app: shop` on a request.
pub fn with_app<T>(body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert("ipc-app", APP.parse().expect("metadata"));
    request
}

/// A `job:run` broadcast on `:jobs` carrying `n`, with idempotency key `key` (none
/// when empty).
pub fn job(key: &str, n: serde_json::Value) -> BroadcastRequest {
    BroadcastRequest {
        channel: ":jobs".into(),
        op: "job:run".into(),
        data: json(n),
        key: key.into(),
        ..Default::default()
    }
}

pub fn json(value: serde_json::Value) -> Option<prost_types::Value> {
    Some(to_value(&value))
}

pub fn data(msg: &Msg) -> serde_json::Value {
    from_optional(msg.data.as_ref())
}

pub async fn broadcast(
    client: &mut Client,
    channel: &str,
    op: &str,
    data: serde_json::Value,
) -> Result<BroadcastResponse, Status> {
    let request = BroadcastRequest {
        channel: channel.into(),
        op: op.into(),
        data: json(data),
        ..Default::default()
    };
    client
        .broadcast(with_app(request))
        .await
        .map(|r| r.into_inner())
}

pub async fn send(
    client: &mut Client,
    target: &str,
    op: &str,
    timeout_ms: u32,
) -> Result<Msg, Status> {
    let request = SendMsgRequest {
        target: target.into(),
        op: op.into(),
        timeout_ms,
        ..Default::default()
    };
    client
        .send_msg(with_app(request))
        .await
        .map(|r| r.into_inner().reply.expect("a reply"))
}

pub async fn reply(client: &mut Client, request: &Msg, op: &str, data: serde_json::Value) {
    let body = ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: op.into(),
        data: json(data),
        ..Default::default()
    };
    client.reply(with_app(body)).await.expect("reply");
}

pub async fn subscribe_to(client: &mut Client, channels: &[&str]) -> Streaming<Msg> {
    let request = SubscribeRequest {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    };
    subscribe(client, with_app(request)).await.0
}

/// Members of the control plane `server` (app `shop`) once `done` holds for them;
/// fails after [`PATIENCE`]. Polls: presence is written in the background, there
/// is no event to await.
pub async fn wait_members(
    server: &ServerProcess,
    what: &str,
    done: impl Fn(&[Member]) -> bool,
) -> Vec<Member> {
    let mut operator = server.client().await;
    let give_up = tokio::time::Instant::now() + PATIENCE;
    loop {
        let members = operator
            .members(with_app(MembersRequest::default()))
            .await
            .expect("members")
            .into_inner()
            .members;
        if done(&members) {
            return members;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "{what}: not within {PATIENCE:?}; members are {members:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
