//! Locks taken through the pod socket, on two `ipc-server` replicas sharing a real
//! Redis: the sidecar relays them upstream (the holder is the pod), renews them
//! while the local connection lives, and releases them when it ends — a holder
//! process killed with SIGKILL frees its lock at once, long before its TTL.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use ipc_proto::pb::{LimitRequest, LockRequest};
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::RedisServer;

fn replica(redis: &RedisServer, node: &str) -> ServerProcess {
    let extra = ["--presence-ttl-ms", "1500", "--redis-timeout-ms", "1000"];
    ServerProcess::replica(&redis.url(), "leases", node, &extra)
}

fn lock(name: &str, ttl_ms: u32, wait_ms: u32) -> LockRequest {
    LockRequest {
        name: name.into(),
        ttl_ms,
        wait_ms,
        fence: 0,
    }
}

fn python() -> std::path::PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    ipc_testkit::find_program("python3")
        .expect("python3 with grpcio not found: scripts/test installs it")
}

#[tokio::test]
async fn a_killed_holder_behind_the_sidecar_releases_its_lock_at_once() {
    let redis = RedisServer::start();
    let a = replica(&redis, "a");
    let b = replica(&redis, "b");
    let sidecar = SidecarProcess::start(&a.url(), &[]);
    sidecar.wait_upstream(true).await;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut holder = Command::new(python())
        .arg(root.join("sidecar/tests/clients/lock_holder.py"))
        .arg(&sidecar.socket)
        .arg(":migrate")
        .arg("60000")
        .env("PYTHONPATH", root.join("clients/python"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("the holder's answer");
    let held: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(held["acquired"], true, "{held}");
    assert_eq!(held["holder"], POD_ID, "upstream, the pod holds the lock");
    let fence: u64 = held["fence"].as_str().unwrap().parse().unwrap();
    let expires_ms = held["expires_ms"].as_i64().unwrap();

    let mut other = b.client().await;
    let refused = other
        .lock(with_app(lock(":migrate", 60_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.acquired, "held by the pod: {refused:?}");

    let waiter =
        tokio::spawn(async move { other.lock(with_app(lock(":migrate", 60_000, 50_000))).await });
    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    let granted = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("released when the holder died, not after its 60 s TTL")
        .unwrap()
        .expect("lock")
        .into_inner();
    assert!(granted.acquired && granted.fence > fence, "{granted:?}");
    assert!(
        ipc_core::now_ms() < expires_ms,
        "granted before the dead holder's lease would have expired"
    );
}

#[tokio::test]
async fn the_sidecar_renews_a_lock_while_the_connection_lives() {
    let redis = RedisServer::start();
    let a = replica(&redis, "a");
    let sidecar = SidecarProcess::start(&a.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let held = local
        .lock(lock(":report", 600, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);

    // Well past the TTL, the lease is still the pod's: the sidecar renewed it.
    let mut upstream = a.client().await;
    let past = held.expires_ms + 1500;
    while ipc_core::now_ms() < past {
        let other = upstream
            .lock(with_app(lock(":report", 600, 0)))
            .await
            .unwrap()
            .into_inner();
        assert!(
            !other.acquired,
            "the lease ran out while its holder lived: {other:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // sampling, not waiting
    }

    // Closing the connection releases it: a waiter gets it at once.
    drop(local);
    let granted = upstream
        .lock(with_app(lock(":report", 60_000, 20_000)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        granted.acquired && granted.fence > held.fence,
        "{granted:?}"
    );

    // Limit goes upstream too: the pod and the control plane share the bucket.
    let mut local = sidecar.client().await;
    let call = LimitRequest {
        name: ":mail".into(),
        rate: 1,
        interval_ms: 60_000,
        burst: 2,
        cost: 1,
    };
    assert!(
        local
            .limit(call.clone())
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert!(
        upstream
            .limit(with_app(call.clone()))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let refused = local.limit(call).await.unwrap().into_inner();
    assert!(
        !refused.allowed && refused.retry_after_ms > 0,
        "{refused:?}"
    );
}
