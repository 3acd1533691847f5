//! Workload 7 (issue 16): a fleet-wide lock and rate limit through one Redis-backed
//! replica, against the same operations done directly on the same Redis by this
//! process — `SET NX PX` and a Lua release for the lock, the token-bucket script
//! the Redis bus itself runs (`ipc_bus_redis::LIMIT_SCRIPT`) for the limit.
//!
//! Each operation is uncontended: every Lock+Unlock takes a lock name of its own
//! (as many holders of different resources would), every Limit call asks one bucket
//! with room to spare (the cost of the decision, not of a refusal).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{LimitRequest, LockRequest, UnlockRequest};
use redis::aio::MultiplexedConnection;
use tonic::transport::Channel;

use crate::fleet::{Target, connect};
use crate::peer::{RequestReply, Requester};

/// Lease of a benchmark lock: far longer than any round trip.
const TTL_MS: u32 = 10_000;
/// The bucket's rate per second: never refuses at these loads.
const RATE: u32 = 100_000_000;

/// Which operation a requester repeats.
#[derive(Debug, Clone, Copy)]
pub enum Operation {
    /// Lock a name of its own, then unlock it with the fence (or token) granted.
    LockUnlock,
    /// One call on a shared token bucket.
    Limit,
}

/// A fresh prefix per run, so runs never meet each other's names.
fn run_prefix(kind: &str) -> String {
    format!("bench:{kind}:{}", crate::payload::now_ns())
}

/// fleet-ipc's `Lock`/`Unlock` or `Limit` on the replica at `target`.
pub struct FleetCoord {
    pub target: Target,
    pub operation: Operation,
}

struct FleetCoordinator {
    client: IpcClient<Channel>,
    operation: Operation,
    prefix: String,
    next: AtomicU64,
}

#[async_trait]
impl RequestReply for FleetCoord {
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>> {
        Ok(Arc::new(FleetCoordinator {
            client: connect(&self.target).await?,
            operation: self.operation,
            prefix: run_prefix("coord"),
            next: AtomicU64::new(0),
        }))
    }
}

#[async_trait]
impl Requester for FleetCoordinator {
    async fn request(&self, _payload: Bytes) -> anyhow::Result<()> {
        let mut client = self.client.clone();
        match self.operation {
            Operation::LockUnlock => {
                let name = format!(
                    "{}-{}",
                    self.prefix,
                    self.next.fetch_add(1, Ordering::Relaxed)
                );
                let lease = client
                    .lock(LockRequest {
                        name: name.clone(),
                        ttl_ms: TTL_MS,
                        ..LockRequest::default()
                    })
                    .await?
                    .into_inner();
                ensure!(lease.acquired, "lock {name} not acquired");
                let released = client
                    .unlock(UnlockRequest {
                        name,
                        fence: lease.fence,
                    })
                    .await?
                    .into_inner();
                ensure!(released.released, "unlock released nothing");
            }
            Operation::Limit => {
                client
                    .limit(LimitRequest {
                        name: self.prefix.clone(),
                        rate: RATE,
                        interval_ms: 1_000,
                        burst: RATE,
                        cost: 1,
                    })
                    .await?;
            }
        }
        Ok(())
    }
}

/// The same operations sent straight to Redis on one multiplexed connection
/// (concurrent commands pipelined, as fleet-ipc's calls share one HTTP/2 connection).
pub struct RedisCoord {
    pub client: redis::Client,
    pub operation: Operation,
}

struct RedisCoordinator {
    connection: MultiplexedConnection,
    operation: Operation,
    prefix: String,
    next: AtomicU64,
    release: redis::Script,
    limit: redis::Script,
}

/// Deletes the lock only if it still holds the caller's token.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

#[async_trait]
impl RequestReply for RedisCoord {
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>> {
        let connection = self
            .client
            .get_multiplexed_async_connection()
            .await
            .context("connecting to redis-server")?;
        Ok(Arc::new(RedisCoordinator {
            connection,
            operation: self.operation,
            prefix: run_prefix("redis-coord"),
            next: AtomicU64::new(0),
            release: redis::Script::new(RELEASE_SCRIPT),
            limit: redis::Script::new(ipc_bus_redis::LIMIT_SCRIPT),
        }))
    }
}

#[async_trait]
impl Requester for RedisCoordinator {
    async fn request(&self, _payload: Bytes) -> anyhow::Result<()> {
        let mut connection = self.connection.clone();
        match self.operation {
            Operation::LockUnlock => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let key = format!("{}-{n}", self.prefix);
                let token = n.to_string();
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(TTL_MS)
                    .query_async(&mut connection)
                    .await?;
                ensure!(set.is_some(), "SET NX on {key} refused");
                let deleted: i64 = self
                    .release
                    .key(&key)
                    .arg(&token)
                    .invoke_async(&mut connection)
                    .await?;
                ensure!(deleted == 1, "release deleted nothing");
            }
            Operation::Limit => {
                let _: Vec<i64> = self
                    .limit
                    .key(&self.prefix)
                    .arg(RATE)
                    .arg(1_000)
                    .arg(RATE)
                    .arg(1)
                    .invoke_async(&mut connection)
                    .await?;
            }
        }
        Ok(())
    }
}

/// One `PING` on a multiplexed connection to the same Redis: the Redis round trip
/// under every coordination call, whoever sends it.
pub struct RedisPing {
    pub client: redis::Client,
}

struct RedisPinger(MultiplexedConnection);

#[async_trait]
impl RequestReply for RedisPing {
    async fn start(&self) -> anyhow::Result<Arc<dyn Requester>> {
        Ok(Arc::new(RedisPinger(
            self.client
                .get_multiplexed_async_connection()
                .await
                .context("connecting to redis-server")?,
        )))
    }
}

#[async_trait]
impl Requester for RedisPinger {
    async fn request(&self, _payload: Bytes) -> anyhow::Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.0.clone()).await?;
        Ok(())
    }
}
