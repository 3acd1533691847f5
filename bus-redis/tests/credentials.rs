//! Redis that wants a password: the replica reads it from `--redis-password-file`
//! (so it stays out of the command line and the URL); without it, Redis refuses the
//! replica's commands and the replica says so (NOT_SERVING, UNAVAILABLE).

mod common;

use common::*;
use ipc_testkit::redis::RedisServer;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const PASSWORD: &str = "s3cret-for-the-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reads_the_redis_password_from_a_file() {
    let redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("redis-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).expect("password file");
    let file = file.to_str().expect("utf-8 path");

    let a = replica_with(&redis.url(), "a", &["--redis-password-file", file]);
    wait_health(&a, ServingStatus::Serving).await;
    let mut ca = a.client().await;
    let mut stream = subscribe(&mut ca, channels("s", &["news"])).await;
    broadcast(&mut ca, "news", "hello")
        .await
        .expect("broadcast");
    assert_eq!(texts(&mut stream, 1).await, ["hello"]);

    // Without the password Redis refuses every command: never a false acknowledgement.
    let b = replica(&redis.url(), "b");
    wait_health(&b, ServingStatus::NotServing).await;
    let mut cb = b.client().await;
    assert_code(
        broadcast(&mut cb, "news", "refused").await,
        Code::Unavailable,
        "",
    );
}
