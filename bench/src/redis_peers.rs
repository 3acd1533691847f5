//! Redis as a peer, through the `redis` crate: `PUBLISH`/`SUBSCRIBE` (at most once,
//! no log), and a Redis Stream used directly — `XADD` pipelined by one publisher,
//! each subscriber reading with `XREAD BLOCK` (the log fleet-ipc's Redis bus is
//! built on, without fleet-ipc).

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};

use crate::peer::{Deliveries, PubSub, Publisher, SubscriberConnection};

/// A multiplexed connection: concurrent commands on it are pipelined. No response
/// timeout, so that `XREAD BLOCK` may wait.
async fn connection(client: &redis::Client) -> anyhow::Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting to redis-server")
}

pub struct RedisPubSub {
    pub client: redis::Client,
    pub pid: u32,
}

struct PubSubConnection(redis::Client);
struct CommandPublisher(MultiplexedConnection);

#[async_trait]
impl PubSub for RedisPubSub {
    async fn connect(&self, _index: usize) -> anyhow::Result<Arc<dyn SubscriberConnection>> {
        // Every Redis subscription needs a connection of its own: made in subscribe.
        Ok(Arc::new(PubSubConnection(self.client.clone())))
    }

    async fn publisher(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        Ok(Arc::new(CommandPublisher(connection(&self.client).await?)))
    }

    fn processes(&self) -> Vec<u32> {
        vec![self.pid]
    }
}

#[async_trait]
impl SubscriberConnection for PubSubConnection {
    async fn subscribe(&self, subject: &str) -> anyhow::Result<Deliveries> {
        let mut pubsub = self.0.get_async_pubsub().await?;
        // Returns once Redis confirmed the subscription.
        pubsub.subscribe(subject).await?;
        Ok(pubsub
            .into_on_message()
            .map(|msg| Ok(Bytes::copy_from_slice(msg.get_payload_bytes())))
            .boxed())
    }
}

#[async_trait]
impl Publisher for CommandPublisher {
    async fn publish(&self, subject: &str, payload: Bytes) -> anyhow::Result<()> {
        let _receivers: i64 = redis::cmd("PUBLISH")
            .arg(subject)
            .arg(payload.as_ref())
            .query_async(&mut self.0.clone())
            .await?;
        Ok(())
    }
}

/// Entries kept in a benchmark stream (`MAXLEN ~`), as fleet-ipc's retention does.
const STREAM_MAXLEN: usize = 100_000;
/// Entries one `XREAD` returns at most.
const XREAD_COUNT: usize = 512;

pub struct RedisStream {
    pub client: redis::Client,
    pub pid: u32,
    /// Each `XADD` followed by `WAIT N 0` in the same pipeline: acknowledged once N
    /// Redis replicas hold it (0: no `WAIT`).
    pub wait_replicas: u32,
}

struct StreamConnection(redis::Client);
struct XaddPublisher {
    connection: MultiplexedConnection,
    wait_replicas: u32,
}

#[async_trait]
impl PubSub for RedisStream {
    async fn connect(&self, _index: usize) -> anyhow::Result<Arc<dyn SubscriberConnection>> {
        Ok(Arc::new(StreamConnection(self.client.clone())))
    }

    async fn publisher(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        Ok(Arc::new(XaddPublisher {
            connection: connection(&self.client).await?,
            wait_replicas: self.wait_replicas,
        }))
    }

    fn processes(&self) -> Vec<u32> {
        vec![self.pid]
    }
}

fn stream_key(subject: &str) -> String {
    format!("bench-stream:{subject}")
}

#[async_trait]
impl Publisher for XaddPublisher {
    async fn publish(&self, subject: &str, payload: Bytes) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(stream_key(subject))
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAXLEN)
            .arg("*")
            .arg("d")
            .arg(payload.as_ref())
            .ignore();
        if self.wait_replicas == 0 {
            pipe.query_async::<()>(&mut self.connection.clone()).await?;
            return Ok(());
        }
        pipe.cmd("WAIT").arg(self.wait_replicas).arg(0);
        let (acked,): (u32,) = pipe.query_async(&mut self.connection.clone()).await?;
        anyhow::ensure!(
            acked >= self.wait_replicas,
            "WAIT {} answered {acked}",
            self.wait_replicas
        );
        Ok(())
    }
}

#[async_trait]
impl SubscriberConnection for StreamConnection {
    /// Reads the stream from its start: workloads use a fresh subject per run, so
    /// this subscriber sees exactly what is published from now on.
    async fn subscribe(&self, subject: &str) -> anyhow::Result<Deliveries> {
        let conn = connection(&self.0).await?;
        let key = stream_key(subject);
        let state = (conn, key, "0-0".to_string(), VecDeque::<Bytes>::new());
        Ok(futures::stream::unfold(Some(state), |state| async move {
            let (mut conn, key, mut last, mut buffered) = state?;
            loop {
                if let Some(payload) = buffered.pop_front() {
                    return Some((Ok(payload), Some((conn, key, last, buffered))));
                }
                let reply: Result<Value, _> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(XREAD_COUNT)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(&mut conn)
                    .await;
                match reply
                    .map_err(anyhow::Error::from)
                    .and_then(|reply| parse_xread(reply, &mut last, &mut buffered))
                {
                    Ok(()) => {}
                    Err(e) => return Some((Err(e), None)),
                }
            }
        })
        .boxed())
    }
}

/// Appends the `d` field of each entry of an XREAD reply (RESP2 or RESP3) and
/// advances `last` to the newest id.
fn parse_xread(reply: Value, last: &mut String, out: &mut VecDeque<Bytes>) -> anyhow::Result<()> {
    let streams = match reply {
        Value::Nil => return Ok(()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        other => bail!("unexpected XREAD reply {other:?}"),
    };
    for entries in streams {
        let Value::Array(entries) = entries else {
            bail!("unexpected XREAD entries {entries:?}")
        };
        for entry in entries {
            let Value::Array(mut entry) = entry else {
                bail!("unexpected XREAD entry {entry:?}")
            };
            let fields = entry.pop();
            let id = entry.pop();
            if let Some(Value::BulkString(id)) = id {
                *last = String::from_utf8_lossy(&id).into_owned();
            }
            if let Some(Value::Array(fields)) = fields
                && let Some(Value::BulkString(payload)) = fields.into_iter().nth(1)
            {
                out.push_back(Bytes::from(payload));
            }
        }
    }
    Ok(())
}
