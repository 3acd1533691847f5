//! Workload 9 (issue 17): how long broadcasts stop when the Redis primary is killed.
//!
//! A Redis primary, its replica and three Sentinels (`down-after-milliseconds`
//! 1000, the testkit's), one `ipc-server` that finds the primary through the
//! Sentinels, and a publisher sending broadcasts back to back (a refused one is
//! sent again after [`RETRY_PAUSE`]). The primary is SIGKILLed; measured from the
//! kill:
//!
//! - Sentinel's own time, as the first Sentinel announces it on its pub/sub (the
//!   benchmark subscribes to all three): `+odown` (the Sentinels agree the primary
//!   is down) and `+switch-master` (a replica was promoted);
//! - the first broadcast acknowledged after the kill (sent after it: a dead
//!   primary acknowledges nothing), i.e. the control plane's own outage.
//!
//! Target: the first acknowledgement ≤ Sentinel's `+switch-master` + 1 s. Each
//! round starts a fresh cluster, so rounds do not inherit a demoted primary.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use ipc_proto::pb::BroadcastRequest;
use ipc_testkit::redis::{RedisServer as TestRedis, SentinelServer};
use tokio::sync::{mpsc, watch};

use crate::fleet::{Target, connect};
use crate::procs::{Binary, IpcServer};

/// The name the Sentinels monitor the primary by.
const MASTER: &str = "bench-failover";
/// How long a refused broadcast waits before it is sent again: the resolution of
/// the measured outage.
pub const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Bound on each wait of a round (cluster ready, failover, first acknowledgement).
const PATIENCE: Duration = Duration::from_secs(30);

/// One round's times, each from the SIGKILL of the primary.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// The first Sentinel's `+odown`: the primary is agreed to be down.
    pub odown: Option<Duration>,
    /// The first Sentinel's `+switch-master`: a replica is the primary now.
    pub switch_master: Duration,
    /// The first broadcast sent after the kill and acknowledged.
    pub first_ack: Duration,
}

/// The primary, its replica and the three Sentinels of one round.
struct Cluster {
    primary: TestRedis,
    _replica: TestRedis,
    sentinels: Vec<SentinelServer>,
}

impl Cluster {
    /// Starts it and waits until the replica is in sync and every Sentinel knows
    /// the replica and the two other Sentinels (else the failover would wait for
    /// them to meet, and measure that).
    async fn start() -> anyhow::Result<Self> {
        let no_persistence = ["--appendonly", "no"];
        let primary =
            crate::durable::started("a redis-server", || TestRedis::start_with(&no_persistence))?;
        let port = primary.port().to_string();
        let replica = crate::durable::started("a redis-server", || {
            TestRedis::start_with(&["--replicaof", "127.0.0.1", &port, "--appendonly", "no"])
        })?;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(crate::durable::started("a redis-sentinel", || {
                SentinelServer::start(MASTER, primary.port())
            })?);
        }
        let cluster = Self {
            primary,
            _replica: replica,
            sentinels,
        };
        let deadline = Instant::now() + PATIENCE;
        while !cluster.ready().await? {
            if Instant::now() > deadline {
                bail!(
                    "the Sentinels did not all see the replica and each other within {PATIENCE:?}"
                );
            }
            // Sentinels meet through hello messages every 2 s: nothing to wait on
            // but their answers.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(cluster)
    }

    async fn ready(&self) -> anyhow::Result<bool> {
        let info: String = ask(self.primary.port(), redis::cmd("INFO").arg("replication")).await?;
        if !info.contains("state=online") {
            return Ok(false);
        }
        for sentinel in &self.sentinels {
            let replicas: Vec<redis::Value> = ask(
                sentinel.port(),
                redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER),
            )
            .await?;
            let peers: Vec<redis::Value> = ask(
                sentinel.port(),
                redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER),
            )
            .await?;
            if replicas.len() != 1 || peers.len() != self.sentinels.len() - 1 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn sentinel_list(&self) -> String {
        SentinelServer::list(&self.sentinels)
    }
}

async fn ask<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> anyhow::Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    Ok(cmd.query_async(&mut conn).await?)
}

/// Sends `(event, when)` for each `+odown` and `+switch-master` a Sentinel
/// announces, until the receiver is dropped.
async fn listen(port: u16, events: mpsc::UnboundedSender<(String, Instant)>) -> anyhow::Result<()> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&["+odown", "+switch-master"]).await?;
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let event = message.get_channel_name().to_string();
            if events.send((event, Instant::now())).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// One round: a fresh cluster and server, the kill, the times.
pub async fn round(binary: &Binary, limits: &[&str]) -> anyhow::Result<Round> {
    let mut cluster = Cluster::start().await?;
    let sentinels = cluster.sentinel_list();
    let mut args = vec![
        "--redis-sentinel",
        &sentinels,
        "--redis-master",
        MASTER,
        "--node",
        "bench-failover",
        "--redis-timeout-ms",
        "1000",
    ];
    args.extend(limits);
    let server = IpcServer::start(binary, &args)?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    for sentinel in &cluster.sentinels {
        listen(sentinel.port(), events_tx.clone())
            .await
            .context("subscribing to a Sentinel's events")?;
    }
    drop(events_tx);

    // The publisher: each acknowledged broadcast as (sent, acknowledged).
    let (acked_tx, mut acked) = mpsc::unbounded_channel::<(Instant, Instant)>();
    let (stop_tx, mut stop) = watch::channel(false);
    let mut client = connect(&Target::Tcp(server.grpc)).await?;
    let publisher = tokio::spawn(async move {
        let mut sequence = 0u64;
        while !*stop.borrow() {
            sequence += 1;
            let sent = Instant::now();
            let request = BroadcastRequest {
                channel: "bench.failover".into(),
                op: "tick".into(),
                key: format!("tick-{sequence}"),
                ..BroadcastRequest::default()
            };
            let answer = tokio::time::timeout(Duration::from_secs(5), client.broadcast(request));
            match answer.await {
                Ok(Ok(_)) => {
                    if acked_tx.send((sent, Instant::now())).is_err() {
                        return;
                    }
                }
                _ => {
                    tokio::select! {
                        _ = stop.changed() => {}
                        () = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
            }
        }
    });

    let outcome = async {
        tokio::time::timeout(PATIENCE, acked.recv())
            .await
            .context("no broadcast acknowledged before the kill")?
            .context("the publisher stopped")?;
        let killed = Instant::now();
        cluster.primary.stop();
        // The first broadcast sent after the kill and acknowledged (a dead primary
        // acknowledges nothing; one sent before the kill may still be answered).
        let first_ack = tokio::time::timeout(PATIENCE, async {
            while let Some((sent, acknowledged)) = acked.recv().await {
                if sent >= killed {
                    return Some(acknowledged.duration_since(killed));
                }
            }
            None
        })
        .await
        .context("no broadcast acknowledged after the kill")?
        .context("the publisher stopped")?;
        let mut odown = None;
        let switch_master = loop {
            let Some((event, when)) = tokio::time::timeout(PATIENCE, events.recv())
                .await
                .context("no +switch-master from the Sentinels")?
            else {
                bail!("the Sentinels' event streams ended");
            };
            let since = when.saturating_duration_since(killed);
            match event.as_str() {
                "+odown" => {
                    odown.get_or_insert(since);
                }
                _ => break since,
            }
        };
        Ok::<_, anyhow::Error>(Round {
            odown,
            switch_master,
            first_ack,
        })
    }
    .await;
    let _ = stop_tx.send(true);
    let _ = publisher.await;
    drop(server);
    outcome
}
