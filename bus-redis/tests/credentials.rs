//! Redis that wants a password: the replica reads it from `--redis-password-file`
//! (so it stays out of the command line and the URL); without it, Redis refuses the
//! replica's commands and the replica says so (NOT_SERVING, UNAVAILABLE). An ACL
//! user comes from the URL or from `--redis-username`, never two different ones.

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
    a.wait_health(ServingStatus::Serving).await;
    let mut ca = a.client().await;
    let mut stream = subscribe(&mut ca, channels("s", &["news"])).await.0;
    broadcast(&mut ca, "news", "hello")
        .await
        .expect("broadcast");
    assert_eq!(texts(&mut stream, 1).await, ["hello"]);

    // Without the password Redis refuses every command: never a false acknowledgement.
    let b = replica(&redis.url(), "b");
    b.wait_health(ServingStatus::NotServing).await;
    let mut cb = b.client().await;
    assert_code(
        broadcast(&mut cb, "news", "refused").await,
        Code::Unavailable,
        "",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_user_comes_from_the_url_or_from_redis_username() {
    let password = format!(">{PASSWORD}");
    let redis = RedisServer::start_with(&[
        "--user", "app", "on", &password, "~*", "&*", "+@all", "--user", "default", "off",
    ]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("redis-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).expect("password file");
    let file = file.to_str().expect("utf-8 path");
    let url_with_user = format!("redis://app@127.0.0.1:{}/", redis.port());

    let a = replica_with(&url_with_user, "a", &["--redis-password-file", file]);
    let b = replica_with(
        &redis.url(),
        "b",
        &["--redis-username", "app", "--redis-password-file", file],
    );
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut stream = subscribe(&mut ca, channels("s", &["news"])).await.0;
    broadcast(&mut cb, "news", "as app")
        .await
        .expect("broadcast as the flag's user");
    assert_eq!(texts(&mut stream, 1).await, ["as app"]);

    // A URL naming one user and the flag another: refused at start, naming both.
    let conflict = std::process::Command::new(ipc_testkit::binary("ipc-server"))
        .args(["--redis", &url_with_user, "--redis-username", "ops"])
        .args(["--redis-password-file", file])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .expect("running ipc-server");
    assert!(!conflict.status.success());
    let stderr = String::from_utf8_lossy(&conflict.stderr);
    assert!(
        stderr.contains("--redis-username \"ops\"") && stderr.contains("\"app\""),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "{stderr}");
}
