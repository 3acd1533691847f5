//! Resume while publishers keep publishing: the replay/live hand-over must lose
//! nothing and repeat nothing. Calls the node directly (no sockets): this is a unit
//! test of the hand-over logic; the gRPC path is covered by the server's tests.

use std::sync::Arc;

use futures::StreamExt;
use ipc_core::memory::{MemoryBus, Retention};
use ipc_core::node::SubscribeStream;
use ipc_core::{Caller, Node, NodeConfig};
use ipc_proto::json::{from_optional, to_value};
use ipc_proto::pb::{BroadcastRequest, Msg, SubscribeRequest};

fn node() -> Arc<Node> {
    Node::new(
        NodeConfig::default(),
        Arc::new(MemoryBus::new(Retention::default())),
    )
}

async fn open(node: &Node, cursor: &str) -> SubscribeStream {
    let request = SubscribeRequest {
        channels: vec!["seq".into()],
        id: "reader".into(),
        cursor: cursor.into(),
        ..Default::default()
    };
    let mut stream = node.subscribe(&Caller::default(), request).await.unwrap();
    let hello = stream.next().await.unwrap().unwrap();
    assert_eq!(hello.op, "ipc:subscribed");
    stream
}

async fn next(stream: &mut SubscribeStream) -> Arc<Msg> {
    stream
        .next()
        .await
        .expect("stream ended")
        .expect("stream closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_during_publishing_loses_and_repeats_nothing() {
    let node = node();
    let total: u64 = 3000;
    let mut stream = open(&node, "").await;
    let publisher = {
        let node = node.clone();
        tokio::spawn(async move {
            for n in 0..total {
                let request = BroadcastRequest {
                    channel: "seq".into(),
                    op: "n".into(),
                    data: Some(to_value(&n.into())),
                    ..Default::default()
                };
                node.broadcast(&Caller::default(), request).await.unwrap();
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut seen = Vec::new();
    // Disconnect and resume every 250 messages while the publisher runs.
    while (seen.len() as u64) < total {
        let msg = next(&mut stream).await;
        seen.push(from_optional(msg.data.as_ref()).as_u64().unwrap());
        if seen.len() % 250 == 0 {
            drop(stream);
            stream = open(&node, &msg.cursor).await;
        }
    }
    publisher.await.unwrap();
    assert_eq!(seen, (0..total).collect::<Vec<_>>());
}
