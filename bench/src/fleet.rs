//! fleet-ipc as a peer, through the tonic client generated from the contract: over
//! TCP to `ipc-server` (one node, or replicas on Redis) or over the Unix socket of
//! an `ipc-sidecar`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{BroadcastRequest, Msg, ReplyRequest, SendMsgRequest, SubscribeRequest};
use prost_types::value::Kind;
use tonic::transport::{Channel, Endpoint};

use crate::peer::{Deliveries, PubSub, Publisher, RequestReply, Requester, SubscriberConnection};

/// Where a client connects.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A new HTTP/2 connection (tonic multiplexes every call made on it).
pub async fn connect(target: &Target) -> anyhow::Result<IpcClient<Channel>> {
    let channel = match target {
        Target::Tcp(addr) => Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?,
        Target::Unix(path) => {
            let path = path.clone();
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .context("connecting to the sidecar's socket")?
        }
    };
    Ok(IpcClient::new(channel).max_decoding_message_size(8 << 20))
}

/// Opens a Subscribe stream and waits for its `ipc:subscribed` (from then on it is
/// live).
pub async fn subscribe(
    client: &IpcClient<Channel>,
    request: SubscribeRequest,
) -> anyhow::Result<tonic::Streaming<Msg>> {
    let mut stream = client.clone().subscribe(request).await?.into_inner();
    let first = stream
        .message()
        .await?
        .context("stream ended before ipc:subscribed")?;
    ensure!(
        first.op == "ipc:subscribed",
        "first message is {:?}, not ipc:subscribed",
        first.op
    );
    Ok(stream)
}

/// The payload carried as a string in `data`.
pub fn payload_of(msg: Msg) -> Bytes {
    match msg.data.and_then(|v| v.kind) {
        Some(Kind::StringValue(text)) => Bytes::from(text.into_bytes()),
        _ => Bytes::new(),
    }
}

pub(crate) fn data(payload: Bytes) -> Option<prost_types::Value> {
    // Payloads are made by `payload::stamped`: ASCII.
    let text = String::from_utf8_lossy(&payload).into_owned();
    Some(prost_types::Value {
        kind: Some(Kind::StringValue(text)),
    })
}

/// fleet-ipc: subscribers spread over `subscribe_to`, the publisher on `publish_to`.
pub struct Fleet {
    pub subscribe_to: Vec<Target>,
    pub publish_to: Target,
    /// The `ipc-server` (and sidecar) processes behind the targets.
    pub pids: Vec<u32>,
    /// Publish on one Publish stream instead of one unary Broadcast each.
    pub publish_stream: bool,
}

struct FleetConnection(IpcClient<Channel>);
struct FleetPublisher(IpcClient<Channel>);

#[async_trait]
impl PubSub for Fleet {
    async fn connect(&self, index: usize) -> anyhow::Result<Arc<dyn SubscriberConnection>> {
        let target = &self.subscribe_to[index % self.subscribe_to.len()];
        Ok(Arc::new(FleetConnection(connect(target).await?)))
    }

    async fn publisher(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        if self.publish_stream {
            return Ok(Arc::new(
                crate::streams::StreamPublisher::open(&self.publish_to).await?,
            ));
        }
        Ok(Arc::new(FleetPublisher(connect(&self.publish_to).await?)))
    }

    fn processes(&self) -> Vec<u32> {
        self.pids.clone()
    }
}

#[async_trait]
impl SubscriberConnection for FleetConnection {
    async fn subscribe(&self, subject: &str) -> anyhow::Result<Deliveries> {
        let stream = subscribe(
            &self.0,
            SubscribeRequest {
                channels: vec![subject.to_string()],
                ..SubscribeRequest::default()
            },
        )
        .await?;
        Ok(stream
            .map(|item| item.map(payload_of).map_err(anyhow::Error::from))
            .boxed())
    }
}

#[async_trait]
impl Publisher for FleetPublisher {
    async fn publish(&self, subject: &str, payload: Bytes) -> anyhow::Result<()> {
        self.0
            .clone()
            .broadcast(BroadcastRequest {
                channel: subject.to_string(),
                op: "bench:tick".into(),
                data: data(payload),
                ..BroadcastRequest::default()
            })
            .await?;
        Ok(())
    }
}

/// SendMsg from `request_from` to an echoing responder subscribed on `respond_on`.
pub struct FleetRequests {
    pub request_from: Target,
    pub respond_on: Target,
    /// The responder answers on its Serve stream instead of with unary Replies.
    pub serve: bool,
}

struct FleetRequester {
    client: IpcClient<Channel>,
    target: String,
}

#[async_trait]
impl RequestReply for FleetRequests {
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>> {
        let id = format!("bench-responder-{}", crate::payload::now_ns());
        if self.serve {
            crate::streams::serve_echo(&self.respond_on, &id).await?;
            return Ok(Arc::new(FleetRequester {
                client: connect(&self.request_from).await?,
                target: id,
            }));
        }
        let responder = connect(&self.respond_on).await?;
        let mut requests = subscribe(
            &responder,
            SubscribeRequest {
                id: id.clone(),
                ..SubscribeRequest::default()
            },
        )
        .await?;
        // The responder answers each request as it arrives, concurrently, as a
        // worker with independent handlers would. It ends with its connection.
        tokio::spawn(async move {
            while let Ok(Some(msg)) = requests.message().await {
                if msg.reply_to.is_empty() {
                    continue;
                }
                let mut client = responder.clone();
                tokio::spawn(async move {
                    let _ = client
                        .reply(ReplyRequest {
                            reply_to: msg.reply_to,
                            op: "bench:echo".into(),
                            data: msg.data,
                            ..ReplyRequest::default()
                        })
                        .await;
                });
            }
        });
        Ok(Arc::new(FleetRequester {
            client: connect(&self.request_from).await?,
            target: id,
        }))
    }
}

/// SendMsg `ping` with an empty target, answered by the node itself: one unary
/// gRPC round trip, the floor under a SendMsg that goes to a subscriber and back.
pub struct FleetPing {
    pub target: Target,
}

struct FleetPinger(IpcClient<Channel>);

#[async_trait]
impl RequestReply for FleetPing {
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>> {
        Ok(Arc::new(FleetPinger(connect(&self.target).await?)))
    }
}

#[async_trait]
impl Requester for FleetPinger {
    async fn request(&self, _payload: Bytes) -> anyhow::Result<()> {
        self.0
            .clone()
            .send_msg(SendMsgRequest {
                op: "ping".into(),
                ..SendMsgRequest::default()
            })
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Requester for FleetRequester {
    async fn request(&self, payload: Bytes) -> anyhow::Result<()> {
        let response = self
            .client
            .clone()
            .send_msg(SendMsgRequest {
                target: self.target.clone(),
                op: "bench:ask".into(),
                data: data(payload),
                timeout_ms: 5_000,
                ..SendMsgRequest::default()
            })
            .await?
            .into_inner();
        ensure!(response.reply.is_some(), "SendMsg answered without a reply");
        Ok(())
    }
}
