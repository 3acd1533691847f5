//! Redis failover under Sentinel, with real processes: a primary, a replica, three
//! `redis-sentinel`s, two `ipc-server` replicas found through `--redis-sentinel`,
//! subscribers on both and a publisher that retries with idempotency keys.
//!
//! - With `--redis-min-replicas 1`, a failover (`SENTINEL FAILOVER`, or SIGKILL of
//!   the primary) loses no acknowledged message, subscribers see every one once and
//!   no `ipc:gap`, and the publisher's errors meanwhile are UNAVAILABLE only.
//! - Without it, a loss is forced (the replica is cut off before the primary dies):
//!   every subscriber that misses an acknowledged message gets `ipc:gap`, live and
//!   when resuming later — never a silent loss.
//! - With credentials everywhere (Redis's default user off, an ACL user for the
//!   replicas and the Sentinels; Sentinels with `requirepass`), the replicas find
//!   the primary with `--redis-username`, `--redis-password-file` and
//!   `--redis-sentinel-password-file`, and follow a failover; a wrong Sentinel
//!   password is named in the log and keeps the replica up, NOT_SERVING.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ipc_core::notice::Gap;
use ipc_proto::pb::{BroadcastRequest, Msg, SubscribeRequest};
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::{RedisServer, SentinelServer};
use tokio::sync::mpsc;
use tonic::{Code, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;

const MASTER: &str = "fleet";

/// The ACL user of every Redis server of a cluster with [`Credentials::everywhere`].
const REDIS_USER: &str = "fleet-ipc";
const REDIS_PASSWORD: &str = "acl-pw-of-redis-5d1e";
const SENTINEL_PASSWORD: &str = "sentinel-pw-9b2c";

/// Who may talk to a cluster's Redis servers and Sentinels.
#[derive(Clone, Default)]
struct Credentials {
    /// An ACL user and its password on every Redis server, whose default user is
    /// off; replication and the Sentinels use it too.
    redis: Option<(&'static str, &'static str)>,
    /// The Sentinels' `requirepass`.
    sentinel: Option<&'static str>,
}

impl Credentials {
    fn everywhere() -> Self {
        Self {
            redis: Some((REDIS_USER, REDIS_PASSWORD)),
            sentinel: Some(SENTINEL_PASSWORD),
        }
    }

    /// `redis-server` arguments: the ACL user, the default user off, and how a
    /// replica authenticates to its primary.
    fn redis_args(&self) -> Vec<String> {
        let Some((user, password)) = self.redis else {
            return Vec::new();
        };
        [
            "--user",
            user,
            "on",
            &format!(">{password}"),
            "~*",
            "&*",
            "+@all",
            "--user",
            "default",
            "off",
            "--masteruser",
            user,
            "--masterauth",
            password,
        ]
        .map(String::from)
        .to_vec()
    }

    /// `sentinel.conf` lines: the Sentinels' password and how they reach Redis.
    fn sentinel_config(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(password) = self.sentinel {
            lines.push(format!("requirepass {password}"));
        }
        if let Some((user, password)) = self.redis {
            lines.push(format!("sentinel auth-user {MASTER} {user}"));
            lines.push(format!("sentinel auth-pass {MASTER} {password}"));
        }
        lines
    }
}

struct Cluster {
    primary: RedisServer,
    replicas: Vec<RedisServer>,
    sentinels: Vec<SentinelServer>,
    credentials: Credentials,
}

impl Cluster {
    /// A primary with `replicas` replicas (a primary killed with only one replica
    /// leaves the new primary none, and `--redis-min-replicas 1` then rightly
    /// acknowledges nothing).
    async fn start(replicas: usize) -> Self {
        Self::start_with(replicas, Credentials::default()).await
    }

    async fn start_with(replicas: usize, credentials: Credentials) -> Self {
        let redis_args = credentials.redis_args();
        let redis_args: Vec<&str> = redis_args.iter().map(String::as_str).collect();
        let primary = RedisServer::start_with(&redis_args);
        let port = primary.port().to_string();
        let replicas = (0..replicas)
            .map(|_| {
                let mut args = vec!["--replicaof", "127.0.0.1", &port];
                args.extend(&redis_args);
                RedisServer::start_with(&args)
            })
            .collect();
        let sentinel_config = credentials.sentinel_config();
        let sentinel_config: Vec<&str> = sentinel_config.iter().map(String::as_str).collect();
        let sentinels = (0..3)
            .map(|_| SentinelServer::start_with(MASTER, primary.port(), &sentinel_config))
            .collect();
        let cluster = Self {
            primary,
            replicas,
            sentinels,
            credentials,
        };
        eventually(
            "the replicas in sync and known to the Sentinels",
            || async {
                let info: String = cluster.ask_redis(
                    cluster.primary.port(),
                    redis::cmd("INFO").arg("replication"),
                );
                let known: Vec<redis::Value> =
                    cluster.ask_sentinel(redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER));
                let online = info.matches("state=online").count();
                (online == cluster.replicas.len() && known.len() == online).then_some(())
            },
        )
        .await;
        cluster
    }

    /// A command to the Redis server on `port`, with the cluster's credentials.
    fn ask_redis<T: redis::FromRedisValue>(&self, port: u16, cmd: &mut redis::Cmd) -> T {
        let user = match self.credentials.redis {
            Some((user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        };
        query_url(&format!("redis://{user}127.0.0.1:{port}/"), cmd)
    }

    /// A command to the first Sentinel, with its password.
    fn ask_sentinel<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let password = match self.credentials.sentinel {
            Some(password) => format!(":{password}@"),
            None => String::new(),
        };
        let port = self.sentinels[0].port();
        query_url(&format!("redis://{password}127.0.0.1:{port}/"), cmd)
    }

    fn sentinel_list(&self) -> String {
        SentinelServer::list(&self.sentinels)
    }

    fn replica(&self, node: &str, extra: &[&str]) -> ServerProcess {
        let sentinels = self.sentinel_list();
        ServerProcess::start(&replica_args(&self.bus(&sentinels), node, extra))
    }

    /// A replica whose log is kept for [`ServerProcess::log`].
    fn logged_replica(&self, node: &str, extra: &[&str]) -> ServerProcess {
        let sentinels = self.sentinel_list();
        ServerProcess::start_logged(&replica_args(&self.bus(&sentinels), node, extra))
    }

    /// The flags that name the bus: the Sentinels and the primary's name.
    fn bus<'a>(&self, sentinels: &'a str) -> [&'a str; 4] {
        ["--redis-sentinel", sentinels, "--redis-master", MASTER]
    }

    /// The port Sentinel names as the primary now.
    fn primary_port(&self) -> u16 {
        let (_, port): (String, u16) = self.ask_sentinel(
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER),
        );
        port
    }

    /// Waits until Sentinel names a former replica primary; returns it.
    async fn wait_failed_over(&self) -> &RedisServer {
        eventually("Sentinel names a former replica primary", || async {
            let port = self.primary_port();
            self.replicas.iter().find(|r| r.port() == port)
        })
        .await
    }
}

fn query<T: redis::FromRedisValue>(port: u16, cmd: &mut redis::Cmd) -> T {
    query_url(&format!("redis://127.0.0.1:{port}/"), cmd)
}

fn query_url<T: redis::FromRedisValue>(url: &str, cmd: &mut redis::Cmd) -> T {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client.get_connection().expect("connecting to redis");
    cmd.query(&mut conn).expect("redis command")
}

/// What a subscriber saw: message bodies in order, and gap notices.
#[derive(Default, Debug)]
struct Seen {
    bodies: Vec<String>,
    gaps: Vec<Gap>,
}

/// Collects a stream into `Seen` until `done` bodies arrived or `quiet` passes
/// without a message.
async fn collect(stream: &mut Streaming<Msg>, want: &BTreeSet<String>, quiet: Duration) -> Seen {
    let mut seen = Seen::default();
    loop {
        let have: BTreeSet<String> = seen.bodies.iter().cloned().collect();
        if want.is_subset(&have) {
            return seen;
        }
        match tokio::time::timeout(quiet, stream.message()).await {
            Ok(Ok(Some(msg))) => match Gap::from_msg(&msg) {
                Some(gap) => seen.gaps.push(gap),
                None => seen.bodies.push(text_of(&msg)),
            },
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return seen,
        }
    }
}

/// Broadcasts `body` on `news` under the key `body`, retried until acknowledged (as a
/// publisher with retries would: every failure must be UNAVAILABLE, and the key makes
/// a retry of a stored message a duplicate, never a second delivery).
async fn broadcast_until_acknowledged(client: &mut Client, body: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let sent = client
            .broadcast(BroadcastRequest {
                channel: "news".into(),
                op: "note".into(),
                data: Some(text(body)),
                key: body.into(),
                ..BroadcastRequest::default()
            })
            .await;
        match sent {
            Ok(_) => return,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{body} never acknowledged"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Publishes `count` keyed messages alternating between `clients`, each retried
/// until acknowledged. `pause_after` messages in, it reports on `midway` and goes on.
async fn publish(
    mut clients: Vec<Client>,
    count: usize,
    pause_after: usize,
    midway: mpsc::Sender<()>,
) -> Vec<String> {
    let mut acked = Vec::new();
    for i in 0..count {
        if i == pause_after {
            midway.send(()).await.expect("test waits");
        }
        let body = format!("m{i:03}");
        broadcast_until_acknowledged(&mut clients[i % 2], &body).await;
        acked.push(body);
    }
    acked
}

async fn failover_loses_nothing_acknowledged(kill: bool) {
    let mut cluster = Cluster::start(if kill { 2 } else { 1 }).await;
    let min = ["--redis-min-replicas", "1"];
    let (a, b) = (cluster.replica("a", &min), cluster.replica("b", &min));
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&mut ca, channels("sa", &["news"])).await.0;
    let mut on_b = subscribe(&mut cb, channels("sb", &["news"])).await.0;

    let (midway, mut reached) = mpsc::channel(1);
    let publisher = tokio::spawn(publish(vec![ca.clone(), cb.clone()], 60, 20, midway));
    reached.recv().await.expect("publisher midway");
    if kill {
        cluster.primary.stop();
    } else {
        let _: String = query(
            cluster.sentinels[0].port(),
            redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER),
        );
    }
    cluster.wait_failed_over().await;
    let acked = publisher.await.expect("publisher");
    let want: BTreeSet<String> = acked.iter().cloned().collect();

    for (name, stream) in [("a", &mut on_a), ("b", &mut on_b)] {
        let seen = collect(stream, &want, PATIENCE).await;
        assert!(seen.gaps.is_empty(), "{name} got a gap: {:?}", seen.gaps);
        assert_eq!(seen.bodies, acked, "{name}: lost, duplicated or reordered");
    }
    // Both replicas work on the new primary: health back by itself, new broadcasts.
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;
    // The demoted primary may still be catching up as the new primary's replica,
    // so the first broadcasts can be refused (UNAVAILABLE) until it confirms them.
    broadcast_until_acknowledged(&mut cb, "after").await;
    assert_eq!(texts(&mut on_a, 1).await, ["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_with_min_replicas_loses_nothing_acknowledged() {
    failover_loses_nothing_acknowledged(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_with_min_replicas_loses_nothing_acknowledged() {
    failover_loses_nothing_acknowledged(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_min_replicas_a_lost_message_is_reported_as_a_gap() {
    let mut cluster = Cluster::start(1).await;
    let (a, b) = (cluster.replica("a", &[]), cluster.replica("b", &[]));
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&mut ca, channels("sa", &["news"])).await.0;
    let mut on_b = subscribe(&mut cb, channels("sb", &["news"])).await.0;
    let before = broadcast(&mut cb, "news", "before").await.expect("before");
    assert_eq!(texts(&mut on_a, 1).await, ["before"]);
    assert_eq!(texts(&mut on_b, 1).await, ["before"]);

    // The replica holds "before" (and the log's epoch) before it is cut off:
    // replication is asynchronous, and the loss must be of the later messages only.
    let replica_port = cluster.replicas[0].port();
    eventually("the Redis replica holds the first message", || async move {
        let len: usize = query(replica_port, redis::cmd("XLEN").arg("test:log"));
        (len >= 1).then_some(())
    })
    .await;
    // Cut the replica off (it cannot sync again: a wrong password for its primary),
    // then acknowledge messages the replica never gets, then lose the primary.
    let _: () = query(
        cluster.replicas[0].port(),
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("masterauth")
            .arg("wrong"),
    );
    let _: i64 = query(
        cluster.primary.port(),
        redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
    );
    let mut lost = Vec::new();
    for i in 0..5 {
        let body = format!("doomed{i}");
        broadcast(&mut ca, "news", &body)
            .await
            .expect("acknowledged by the primary alone");
        lost.push(body);
    }
    cluster.primary.stop();
    cluster.wait_failed_over().await;
    let after = eventually("a broadcast on the new primary", || {
        let mut cb = cb.clone();
        async move { broadcast(&mut cb, "news", "after").await.ok() }
    })
    .await;
    let on_new_primary: usize = query(
        cluster.replicas[0].port(),
        redis::cmd("XLEN").arg("test:log"),
    );
    assert!(
        on_new_primary >= 2,
        "before, a mark and after: {on_new_primary}"
    );

    // Live subscribers: the loss is reported (with the last surviving position),
    // then the stream goes on.
    let want: BTreeSet<String> = ["after".to_string()].into();
    for (name, stream) in [("a", &mut on_a), ("b", &mut on_b)] {
        let seen = collect(stream, &want, PATIENCE).await;
        assert_eq!(seen.gaps.len(), 1, "{name}: {seen:?}");
        assert_eq!(seen.gaps[0].cursor, before.cursor, "{name}: {seen:?}");
        assert!(seen.gaps[0].reason.contains("failover"), "{seen:?}");
        assert_eq!(
            seen.bodies.last().map(String::as_str),
            Some("after"),
            "{name}: {seen:?}"
        );
    }
    // A subscriber resuming later from before the loss is told too, then gets what
    // survived.
    let mut resumed = client_stream(
        &mut ca,
        SubscribeRequest {
            cursor: before.cursor.clone(),
            ..channels("late", &["news"])
        },
    )
    .await;
    let seen = collect(&mut resumed, &want, PATIENCE).await;
    assert_eq!(seen.gaps.len(), 1, "{seen:?}");
    assert_eq!(seen.bodies, ["after"], "{seen:?}");
    assert_eq!(
        after.cursor.split('.').next(),
        before.cursor.split('.').next(),
        "same epoch: cursors stay valid"
    );
}

/// Password files of a replica for a cluster with [`Credentials::everywhere`]:
/// the Redis ACL user's, and `sentinel_password` for the Sentinels.
struct PasswordFiles {
    _dir: tempfile::TempDir,
    redis: String,
    sentinel: String,
}

impl PasswordFiles {
    fn new(sentinel_password: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let write = |name: &str, password: &str| {
            let file = dir.path().join(name);
            std::fs::write(&file, format!("{password}\n")).expect("password file");
            file.to_str().expect("utf-8 path").to_string()
        };
        Self {
            redis: write("redis-password", REDIS_PASSWORD),
            sentinel: write("sentinel-password", sentinel_password),
            _dir: dir,
        }
    }

    /// The primary's ACL user and password only.
    fn redis_args(&self) -> Vec<&str> {
        vec![
            "--redis-username",
            REDIS_USER,
            "--redis-password-file",
            &self.redis,
        ]
    }

    /// The primary's credentials and the Sentinels' password.
    fn args(&self) -> Vec<&str> {
        let mut args = self.redis_args();
        args.extend(["--redis-sentinel-password-file", &self.sentinel]);
        args
    }
}

fn assert_no_password_in(log: &str) {
    for password in [REDIS_PASSWORD, SENTINEL_PASSWORD] {
        assert!(!log.contains(password), "a password is in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_find_the_primary_through_sentinels_with_credentials_and_follow_a_failover() {
    let cluster = Cluster::start_with(1, Credentials::everywhere()).await;
    let files = PasswordFiles::new(SENTINEL_PASSWORD);
    let (a, b) = (
        cluster.logged_replica("a", &files.args()),
        cluster.logged_replica("b", &files.args()),
    );
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&mut ca, channels("sa", &["news"])).await.0;
    let mut on_b = subscribe(&mut cb, channels("sb", &["news"])).await.0;
    broadcast(&mut cb, "news", "before")
        .await
        .expect("a broadcast as the ACL user");
    assert_eq!(texts(&mut on_a, 1).await, ["before"]);
    assert_eq!(texts(&mut on_b, 1).await, ["before"]);

    // The Redis replica holds "before" first (replication is asynchronous, and
    // this test is about following the primary, not about what a failover loses).
    let replica_port = cluster.replicas[0].port();
    eventually("the Redis replica holds the first message", || async {
        let len: usize = cluster.ask_redis(replica_port, redis::cmd("XLEN").arg("test:log"));
        (len >= 1).then_some(())
    })
    .await;
    let _: String = cluster.ask_sentinel(redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER));
    let new_primary = cluster.wait_failed_over().await.port();

    // Both replicas follow (Sentinel names the promoted replica before it announces
    // +switch-master, and the old primary accepts writes until Sentinel demotes it:
    // broadcast only once both replicas moved), still as the ACL user.
    let moved = format!("Redis primary is now 127.0.0.1:{new_primary}");
    for replica in [&a, &b] {
        eventually("the replica moves to the new primary", || {
            let followed = replica.log().contains(&moved);
            async move { followed.then_some(()) }
        })
        .await;
    }
    // A broadcast on either reaches the subscribers of both.
    broadcast_until_acknowledged(&mut ca, "after-from-a").await;
    broadcast_until_acknowledged(&mut cb, "after-from-b").await;
    let after = ["after-from-a".to_string(), "after-from-b".to_string()];
    let want: BTreeSet<String> = after.iter().cloned().collect();
    for (name, stream) in [("a", &mut on_a), ("b", &mut on_b)] {
        let seen = collect(stream, &want, PATIENCE).await;
        assert!(seen.gaps.is_empty(), "{name} got a gap: {:?}", seen.gaps);
        assert_eq!(seen.bodies, after, "{name}");
    }
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;
    for replica in [&a, &b] {
        assert_no_password_in(&replica.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sentinel_password_is_named_and_the_replica_stays_up_not_serving() {
    let cluster = Cluster::start_with(0, Credentials::everywhere()).await;
    let sentinel = cluster.sentinels[0].addr();

    let wrong = PasswordFiles::new("not-the-sentinel-password");
    let mut replica = cluster.logged_replica("wrong", &wrong.args());
    let log = eventually(
        "the log names the Sentinel and the refused password",
        || {
            let log = replica.log();
            let named = log.contains(&format!("Sentinel {sentinel}: authentication failed"));
            async move { named.then_some(log) }
        },
    )
    .await;
    assert!(log.contains("--redis-sentinel-password-file"), "{log}");
    assert_no_password_in(&log);
    replica.wait_health(ServingStatus::NotServing).await;
    let mut client = replica.client().await;
    let refused = broadcast(&mut client, "news", "never stored").await;
    assert_code(refused, Code::Unavailable, "authentication failed");
    assert!(replica.running(), "the replica exited");

    // No Sentinel password at all: the Sentinel asks for one, and the log says so.
    let mut unauthenticated = cluster.logged_replica("none", &wrong.redis_args());
    eventually("the log says the Sentinel wants a password", || {
        let named = unauthenticated
            .log()
            .contains(&format!("Sentinel {sentinel}: authentication required"));
        async move { named.then_some(()) }
    })
    .await;
    assert!(unauthenticated.running(), "the replica exited");

    // The right password, nothing else changed: SERVING.
    let right = PasswordFiles::new(SENTINEL_PASSWORD);
    let good = cluster.replica("right", &right.args());
    good.wait_health(ServingStatus::Serving).await;
    let mut client = good.client().await;
    broadcast(&mut client, "news", "stored")
        .await
        .expect("a broadcast with the right Sentinel password");
}

/// Subscribes, retrying while the replica answers UNAVAILABLE (it may still be
/// moving its connections to the new primary), and returns the stream after its
/// `ipc:subscribed`.
async fn client_stream(client: &mut Client, req: SubscribeRequest) -> Streaming<Msg> {
    let mut stream = eventually("a resumed subscription", || {
        let (mut client, req) = (client.clone(), req.clone());
        async move {
            match client.subscribe(req).await {
                Ok(stream) => Some(stream.into_inner()),
                Err(status) if status.code() == Code::Unavailable => None,
                Err(status) => panic!("subscribe refused: {status}"),
            }
        }
    })
    .await;
    let first = next(&mut stream).await;
    assert_eq!(first.op, "ipc:subscribed", "{first:?}");
    stream
}
