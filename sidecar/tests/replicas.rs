//! The sidecar on a real control plane: a private redis-server and two `ipc-server`
//! replicas on it. The replica the pod uses dies and comes back (or another one takes
//! over); the pod's subscribers keep their streams and miss nothing.

mod common;

use common::*;
use ipc_proto::pb::{MembersRequest, Msg, SubscribeRequest};
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::{RedisServer, free_port};
use serde_json::json;
use tonic::Streaming;

fn replica(redis: &RedisServer, node: &str, port: Option<u16>) -> ServerProcess {
    let listen = port.map(|p| format!("127.0.0.1:{p}"));
    let mut extra = vec!["--presence-ttl-ms", "1500", "--redis-timeout-ms", "1000"];
    if let Some(listen) = &listen {
        extra.extend(["--listen", listen.as_str()]);
    }
    ServerProcess::replica(&redis.url(), "sidecar", node, &extra)
}

async fn publish(replica: &ServerProcess, range: std::ops::Range<u64>) {
    let mut operator = replica.client().await;
    for n in range {
        broadcast(&mut operator, ":news", "n", json!(n))
            .await
            .unwrap();
    }
}

/// The next `count` numbers on the stream; any other message (an `ipc:gap`) fails.
async fn numbers(stream: &mut Streaming<Msg>, count: usize) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let msg = next(stream).await;
        assert_eq!(msg.op, "n", "unexpected {msg:?}");
        seen.push(data(&msg).as_u64().unwrap());
    }
    seen
}

#[tokio::test]
async fn the_replica_of_the_pod_restarts_and_its_subscribers_miss_nothing() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut a = replica(&redis, "a", Some(port));
    let b = replica(&redis, "b", None);
    let sidecar = SidecarProcess::start(&a.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;

    publish(&b, 0..10).await;
    assert_eq!(numbers(&mut stream, 10).await, (0..10).collect::<Vec<_>>());

    a.kill();
    sidecar.wait_upstream(false).await;
    publish(&b, 10..30).await;
    let _a = replica(&redis, "a", Some(port));
    sidecar.wait_upstream(true).await;
    publish(&b, 30..40).await;
    assert_eq!(numbers(&mut stream, 30).await, (10..40).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_pod_moves_to_the_next_replica_and_is_reachable_through_any() {
    let redis = RedisServer::start();
    let mut a = replica(&redis, "a", None);
    let b = replica(&redis, "b", None);
    let upstreams = format!("{},{}", a.url(), b.url());
    let sidecar = SidecarProcess::start(&upstreams, &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;
    let request = SubscribeRequest {
        id: "w1".into(),
        role: "worker".into(),
        ..Default::default()
    };
    let (mut requests, _) = subscribe(&mut local, with_app(request)).await;

    a.kill();
    publish(&b, 0..20).await;
    assert_eq!(numbers(&mut stream, 20).await, (0..20).collect::<Vec<_>>());
    sidecar.wait_upstream(true).await;

    // A request through the surviving replica reaches the pod's subscriber.
    let mut operator = b.client().await;
    let asking = {
        let mut operator = operator.clone();
        tokio::spawn(async move { send(&mut operator, "w1", "stats:get", 10_000).await })
    };
    let msg = loop {
        let msg = next(&mut requests).await;
        if !msg.reply_to.is_empty() {
            break msg;
        }
    };
    reply(&mut local, &msg, "stats", json!({"ok": true})).await;
    assert_eq!(data(&asking.await.unwrap().unwrap()), json!({"ok": true}));

    let members = operator
        .members(with_app(MembersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .members;
    let pod = members
        .iter()
        .find(|m| m.id == POD_ID)
        .expect("the pod in the fleet's members");
    assert_eq!(pod.labels.get("pod").map(String::as_str), Some("web-1"));
}

#[tokio::test]
async fn a_subscriber_that_joins_during_an_outage_gets_what_was_published_meanwhile() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut a = replica(&redis, "a", Some(port));
    let b = replica(&redis, "b", None);
    let sidecar = SidecarProcess::start(&a.url(), &[]);
    sidecar.wait_upstream(true).await;

    a.kill();
    sidecar.wait_upstream(false).await;
    // Answered at once: the pod was connected before and resumes from where it stood.
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;
    publish(&b, 0..5).await;
    let _a = replica(&redis, "a", Some(port));
    sidecar.wait_upstream(true).await;
    publish(&b, 5..10).await;
    assert_eq!(numbers(&mut stream, 10).await, (0..10).collect::<Vec<_>>());
}

/// Issue 14: a sidecar restarted while Redis is down cannot fetch what its pod's
/// subscribers missed, although it is all still in Redis. It must hold the resume or
/// refuse it (UNAVAILABLE, retryable), never answer `ipc:gap` and skip ahead.
#[tokio::test]
async fn a_sidecar_restarted_during_a_redis_outage_skips_nothing_for_resuming_subscribers() {
    let mut redis = RedisServer::start();
    let a = replica(&redis, "a", None);
    let b = replica(&redis, "b", None);
    let first = SidecarProcess::start(&a.url(), &[]);
    first.wait_upstream(true).await;
    let mut local = first.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;
    publish(&b, 0..5).await;
    let mut cursor = String::new();
    for n in 0..5 {
        let msg = next(&mut stream).await;
        assert_eq!(data(&msg), json!(n));
        cursor = msg.cursor;
    }
    drop((stream, local, first));
    // Missed by the pod while its sidecar is away, and kept in Redis.
    publish(&b, 5..10).await;
    redis.stop();

    let second = SidecarProcess::start(&a.url(), &[]);
    second.wait_upstream(true).await;
    let mut local = second.client().await;
    let resume = SubscribeRequest {
        channels: vec![":news".into()],
        cursor: cursor.clone(),
        ..Default::default()
    };
    let during = local.subscribe(with_app(resume.clone())).await;
    let mut stream = match during {
        Ok(stream) => Some(stream.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
            assert!(status.message().contains("Redis"), "{status}");
            None
        }
    };
    redis.restart();
    let mut stream = match stream.take() {
        Some(mut stream) => {
            assert_eq!(next(&mut stream).await.op, "ipc:subscribed");
            stream
        }
        None => {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                match local.subscribe(with_app(resume.clone())).await {
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        assert_eq!(next(&mut stream).await.op, "ipc:subscribed");
                        break stream;
                    }
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
                        assert!(tokio::time::Instant::now() < deadline, "{status}");
                        // Polling: the replicas reconnect to Redis on their own backoff.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    assert_eq!(numbers(&mut stream, 5).await, (5..10).collect::<Vec<_>>());
}

/// Issue 14: a replica that hangs (SIGSTOP: its sockets stay open, nothing answers)
/// must not stall the pod for the 20 s of a slow keepalive. The sidecar pings its
/// upstream every second (`--upstream-keepalive`), gives it up after three silent
/// periods and resumes on the next address with its cursor: nothing is lost, and the
/// pod hears again well within the bound below.
#[tokio::test]
async fn a_hung_replica_is_left_within_seconds_and_the_pod_resumes_on_the_next() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let redis = RedisServer::start();
    let a = replica(&redis, "a", None);
    let b = replica(&redis, "b", None);
    let sidecar = SidecarProcess::start(&format!("{},{}", a.url(), b.url()), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;
    publish(&b, 0..3).await;
    assert_eq!(numbers(&mut stream, 3).await, [0, 1, 2]);

    let hung = Pid::from_raw(a.pid() as i32);
    kill(hung, Signal::SIGSTOP).expect("SIGSTOP");
    publish(&b, 3..10).await;
    // A liveness bound, well above the expected ~4 s, well below the 20 s of old.
    let bound = std::time::Duration::from_secs(15);
    let resumed = tokio::time::timeout(bound, numbers(&mut stream, 7)).await;
    let _ = kill(hung, Signal::SIGCONT);
    assert_eq!(
        resumed.expect("the pod still stalled on the hung replica"),
        (3..10).collect::<Vec<_>>()
    );
}
