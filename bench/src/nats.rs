//! NATS core as a peer, through `async-nats`: pub/sub on a subject and
//! request/reply with an echoing responder.

use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::peer::{Deliveries, PubSub, Publisher, RequestReply, Requester, SubscriberConnection};

pub struct Nats {
    pub url: String,
    pub pid: u32,
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        // Room for the bursts the workloads allow, so the client never drops.
        .subscription_capacity(1 << 16)
        .connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// Returns once the server has processed every command this client sent so far:
/// NATS handles a connection's commands in order, so a message to a private inbox
/// coming back proves the earlier SUBs are in place.
pub(crate) async fn round_trip(client: &async_nats::Client) -> anyhow::Result<()> {
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, Bytes::new()).await?;
    probe
        .next()
        .await
        .context("NATS connection closed during a round trip")?;
    Ok(())
}

struct NatsConnection(async_nats::Client);
struct NatsPublisher(async_nats::Client);

#[async_trait]
impl PubSub for Nats {
    async fn connect(&self, _index: usize) -> anyhow::Result<Arc<dyn SubscriberConnection>> {
        Ok(Arc::new(NatsConnection(connect(&self.url).await?)))
    }

    async fn publisher(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        Ok(Arc::new(NatsPublisher(connect(&self.url).await?)))
    }

    fn processes(&self) -> Vec<u32> {
        vec![self.pid]
    }
}

#[async_trait]
impl SubscriberConnection for NatsConnection {
    async fn subscribe(&self, subject: &str) -> anyhow::Result<Deliveries> {
        let subscriber = self.0.subscribe(subject.to_string()).await?;
        round_trip(&self.0).await?;
        Ok(subscriber.map(|msg| Ok(msg.payload)).boxed())
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, subject: &str, payload: Bytes) -> anyhow::Result<()> {
        self.0.publish(subject.to_string(), payload).await?;
        Ok(())
    }

    async fn flush(&self) -> anyhow::Result<()> {
        self.0.flush().await?;
        Ok(())
    }
}

pub struct NatsRequests {
    pub url: String,
}

struct NatsRequester(async_nats::Client);

const REQUEST_SUBJECT: &str = "bench.ask";

#[async_trait]
impl RequestReply for NatsRequests {
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>> {
        let responder = connect(&self.url).await?;
        let mut requests = responder.subscribe(REQUEST_SUBJECT).await?;
        round_trip(&responder).await?;
        tokio::spawn(async move {
            while let Some(msg) = requests.next().await {
                if let Some(reply) = msg.reply {
                    let _ = responder.publish(reply, msg.payload).await;
                }
            }
        });
        Ok(Arc::new(NatsRequester(connect(&self.url).await?)))
    }
}

#[async_trait]
impl Requester for NatsRequester {
    async fn request(&self, payload: Bytes) -> anyhow::Result<()> {
        self.0.request(REQUEST_SUBJECT, payload).await?;
        Ok(())
    }
}
