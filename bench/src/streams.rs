//! fleet-ipc's streams as peers: a publisher on one `Publish` stream (answers
//! matched to publishes by order) and a responder that answers on its `Serve`
//! stream instead of one unary `Reply` per request.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, anyhow, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, Msg, ReplyRequest, ServeRequest, SubscribeRequest, serve_request,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::fleet::{Target, connect, data};
use crate::peer::Publisher;

type Waiting = Arc<Mutex<VecDeque<oneshot::Sender<anyhow::Result<()>>>>>;

/// Publishes on one Publish stream; concurrent `publish` calls are in flight
/// together on it and each returns when its own answer came back.
pub struct StreamPublisher {
    /// The stream's sender and the publishes waiting for an answer, in order;
    /// one lock so that both stay in the same order.
    sending: Mutex<mpsc::UnboundedSender<BroadcastRequest>>,
    waiting: Waiting,
}

impl StreamPublisher {
    pub async fn open(target: &Target) -> anyhow::Result<Self> {
        let client = connect(target).await?;
        let (sender, requests) = mpsc::unbounded_channel();
        let mut answers = client
            .clone()
            .publish(UnboundedReceiverStream::new(requests))
            .await?
            .into_inner();
        let waiting: Waiting = Arc::default();
        let answered = waiting.clone();
        tokio::spawn(async move {
            let failure = loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        let Some(done) = answered.lock().unwrap().pop_front() else {
                            break "an answer to no publish".to_string();
                        };
                        let _ = done.send(if answer.error.is_empty() {
                            Ok(())
                        } else {
                            Err(anyhow!("refused: {}", answer.error))
                        });
                    }
                    Ok(None) => break "the Publish stream ended".to_string(),
                    Err(status) => break format!("the Publish stream failed: {status}"),
                }
            };
            for done in answered.lock().unwrap().drain(..) {
                let _ = done.send(Err(anyhow!("{failure}")));
            }
        });
        Ok(Self {
            sending: Mutex::new(sender),
            waiting,
        })
    }
}

/// Publishes in flight on one Publish stream: the node's read-ahead window
/// (`ipc_core::grpc::publish::PUBLISH_WINDOW`), which a bulk publisher such as the
/// Rust client's `Client::publish` or `ipcctl publish` keeps full. Unary calls stay
/// at the workload's 64: each is a call of its own, waited for by its caller.
pub const STREAM_IN_FLIGHT: usize = 256;

#[async_trait]
impl Publisher for StreamPublisher {
    fn in_flight(&self) -> usize {
        STREAM_IN_FLIGHT
    }

    async fn publish(&self, subject: &str, payload: Bytes) -> anyhow::Result<()> {
        let (done, answer) = oneshot::channel();
        {
            let sender = self.sending.lock().unwrap();
            self.waiting.lock().unwrap().push_back(done);
            sender
                .send(BroadcastRequest {
                    channel: subject.to_string(),
                    op: "bench:tick".into(),
                    data: data(payload),
                    ..BroadcastRequest::default()
                })
                .map_err(|_| anyhow!("the Publish stream is closed"))?;
        }
        answer.await.context("the Publish stream ended")?
    }
}

/// Starts an echoing responder with id `id` on a Serve stream: each request is
/// answered on the stream itself.
pub async fn serve_echo(target: &Target, id: &str) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let subscribe = SubscribeRequest {
        id: id.to_string(),
        ..SubscribeRequest::default()
    };
    let answering = serve(&client, subscribe, |msg| ReplyRequest {
        reply_to: msg.reply_to,
        op: "bench:echo".into(),
        data: msg.data,
        ..ReplyRequest::default()
    })
    .await?;
    tokio::spawn(async move {
        let _client = client;
        answering.await;
    });
    Ok(())
}

/// Opens a Serve stream on `client` subscribed as `subscribe` and waits until it is
/// live (`ipc:subscribed`). Returns the loop that answers each request at once with
/// `answer`, on the stream itself, until the stream ends: the caller spawns it.
pub async fn serve<Answer: Fn(Msg) -> ReplyRequest + Send + 'static>(
    client: &IpcClient<Channel>,
    subscribe: SubscribeRequest,
    answer: Answer,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static + use<Answer>> {
    let (replies, outgoing) = mpsc::unbounded_channel();
    replies
        .send(ServeRequest {
            kind: Some(serve_request::Kind::Subscribe(subscribe)),
        })
        .map_err(|_| anyhow!("Serve stream closed"))?;
    let mut stream = client
        .clone()
        .serve(UnboundedReceiverStream::new(outgoing))
        .await?
        .into_inner();
    let first = stream
        .message()
        .await?
        .context("stream ended before ipc:subscribed")?;
    ensure!(
        first.op == "ipc:subscribed",
        "first message is {:?}",
        first.op
    );
    Ok(async move {
        while let Ok(Some(msg)) = stream.message().await {
            if msg.reply_to.is_empty() {
                continue;
            }
            let reply = ServeRequest {
                kind: Some(serve_request::Kind::Reply(answer(msg))),
            };
            if replies.send(reply).is_err() {
                return;
            }
        }
    })
}
