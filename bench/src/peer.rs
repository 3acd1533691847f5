//! What a workload needs from a system under test, so the same workload code runs
//! against fleet-ipc, NATS and Redis: pub/sub connections and a request/reply pair.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

/// Payloads as a subscriber receives them; an error ends the subscription (e.g.
/// fleet-ipc cut it off as too slow).
pub type Deliveries = BoxStream<'static, anyhow::Result<Bytes>>;

/// A publish/subscribe system.
#[async_trait]
pub trait PubSub: Send + Sync {
    /// Opens the `index`-th subscriber connection (systems with several nodes spread
    /// them over the nodes).
    async fn connect(&self, index: usize) -> anyhow::Result<Arc<dyn SubscriberConnection>>;

    /// One publisher connection; clones of the returned handle share it, so
    /// concurrent `publish` calls are in flight together on it.
    async fn publisher(&self) -> anyhow::Result<Arc<dyn Publisher>>;

    /// The server processes doing the work, whose CPU time is measured.
    fn processes(&self) -> Vec<u32>;
}

/// A connection that can carry subscriptions.
#[async_trait]
pub trait SubscriberConnection: Send + Sync {
    /// Subscribes to `subject`; messages published after this returns are delivered.
    async fn subscribe(&self, subject: &str) -> anyhow::Result<Deliveries>;
}

#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes once; returns when the system accepted it (its acknowledgement for
    /// fleet-ipc and Redis, the client's write buffer for NATS core).
    async fn publish(&self, subject: &str, payload: Bytes) -> anyhow::Result<()>;

    /// How many publishes the throughput workload keeps in flight on this publisher.
    fn in_flight(&self) -> usize {
        crate::workloads::PUBLISH_WINDOW
    }

    /// Waits until everything published so far left the client.
    async fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A request/reply system: a responder that echoes, and a requester.
#[async_trait]
pub trait RequestReply: Send + Sync {
    /// Starts the echoing responder (live when this returns) and connects the
    /// requester.
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>>;
}

#[async_trait]
pub trait Requester: Send + Sync {
    /// Sends a request and waits for its reply.
    async fn request(&self, payload: Bytes) -> anyhow::Result<()>;
}
