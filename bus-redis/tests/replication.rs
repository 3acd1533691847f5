//! `--redis-min-replicas`: a broadcast (and a lock) is acknowledged only once a
//! Redis replica holds it (`WAIT`), checked against a real primary and a real
//! `redis-server --replicaof`. When the replica is gone the caller gets
//! UNAVAILABLE, never a false acknowledgement, and a retry with a key stores nothing
//! twice.

mod common;

use common::*;
use ipc_proto::pb::{BroadcastRequest, LockRequest};
use ipc_testkit::redis::RedisServer;
use tonic::Code;

/// A primary and one replica of it, in sync.
fn primary_and_replica() -> (RedisServer, RedisServer) {
    let primary = redis();
    let port = primary.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    (primary, replica)
}

fn query<T: redis::FromRedisValue>(server: &RedisServer, cmd: &mut redis::Cmd) -> T {
    let client = redis::Client::open(server.url()).expect("redis url");
    let mut conn = client.get_connection().expect("connecting to redis");
    cmd.query(&mut conn).expect("redis command")
}

async fn wait_in_sync(primary: &RedisServer) {
    eventually("the Redis replica in sync", || async {
        let info: String = query(primary, redis::cmd("INFO").arg("replication"));
        (info.contains("connected_slaves:1") && info.contains("state=online")).then_some(())
    })
    .await;
}

fn keyed(body: &str, key: &str) -> BroadcastRequest {
    BroadcastRequest {
        channel: "news".into(),
        op: "note".into(),
        data: Some(text(body)),
        key: key.into(),
        ..BroadcastRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_only_once_a_redis_replica_has_it() {
    let (primary, mut replica_redis) = primary_and_replica();
    wait_in_sync(&primary).await;
    // WAIT gets half the call timeout: 2 s, so a loaded machine's replica still
    // confirms in time while the refusals below stay quick enough.
    let min = ["--redis-min-replicas", "1", "--redis-timeout-ms", "4000"];
    let a = replica_with(&primary.url(), "a", &min);
    let b = replica_with(&primary.url(), "b", &min);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut stream = subscribe(&mut ca, channels("s", &["news"])).await.0;

    for i in 0..20 {
        broadcast(&mut cb, "news", &format!("m{i}"))
            .await
            .expect("acknowledged with the replica up");
        // Acknowledged means the replica holds it already, not "soon".
        let on_replica: usize = query(&replica_redis, redis::cmd("XLEN").arg("test:log"));
        assert_eq!(on_replica, i + 1, "the replica lacks an acknowledged entry");
    }
    assert_eq!(
        texts(&mut stream, 20).await,
        (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    let granted = ca
        .lock(LockRequest {
            name: "deploy".into(),
            ttl_ms: 60_000,
            ..LockRequest::default()
        })
        .await
        .expect("lock with the replica up")
        .into_inner();
    assert!(granted.acquired);

    // The replica is gone: the primary still stores, but nothing is acknowledged.
    replica_redis.stop();
    let refused = cb.broadcast(keyed("while alone", "k1")).await;
    assert_code(refused, Code::Unavailable, "--redis-min-replicas");
    let refused = ca
        .lock(LockRequest {
            name: "other".into(),
            ttl_ms: 60_000,
            ..LockRequest::default()
        })
        .await;
    assert_code(refused, Code::Unavailable, "replicas required");

    // Back: the retry with the same key is acknowledged as the first message, so the
    // subscriber gets it once.
    replica_redis.restart();
    wait_in_sync(&primary).await;
    let answer = eventually("the keyed retry acknowledged", || {
        let mut cb = cb.clone();
        async move { cb.broadcast(keyed("while alone", "k1")).await.ok() }
    })
    .await
    .into_inner();
    assert!(answer.duplicate, "{answer:?}");
    broadcast(&mut cb, "news", "after")
        .await
        .expect("acknowledged again");
    assert_eq!(texts(&mut stream, 2).await, ["while alone", "after"]);
}
