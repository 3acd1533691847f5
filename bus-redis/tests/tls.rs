//! Redis over TLS: a `redis-server` that speaks only TLS (`--port 0 --tls-port P`)
//! with a test certificate authority and client certificates, and an ACL user. The
//! replicas reach it with `rediss://`, `--redis-ca`, `--redis-cert`/`--redis-key`;
//! a wrong authority is refused with an error that names it, the replica staying up
//! and NOT_SERVING; passwords appear in no log and no error.

mod common;

use common::*;
use ipc_testkit::ServerProcess;
use ipc_testkit::redis::RedisServer;
use ipc_testkit::tls::TestCa;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const PASSWORD: &str = "tls-acl-pw-7f3c";

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A TLS-only Redis asking for client certificates, with ACL user `app`.
fn tls_redis(ca: &TestCa) -> RedisServer {
    let password = format!(">{PASSWORD}");
    let user = ["--user", "app", "on", &password, "~*", "&*", "+@all"];
    RedisServer::start_tls(ca, true, &user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reach_redis_over_mutual_tls_with_an_acl_user() {
    let ca = TestCa::new("redis-test-ca");
    let redis = tls_redis(&ca);
    let port = redis.port();
    let client = ca.client_cert("ipc-server", &["ipc-server"]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let password_file = dir.path().join("redis-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");

    // A: user and password in the URL. B: the user in the URL, the password in a file.
    let url_a = format!("rediss://app:{PASSWORD}@127.0.0.1:{port}/");
    let url_b = format!("rediss://app@127.0.0.1:{port}/");
    let ca_path = ca.cert_path();
    let tls = [
        "--redis-ca",
        path(&ca_path),
        "--redis-cert",
        path(&client.cert),
        "--redis-key",
        path(&client.key),
    ];
    let mut args_b = tls.to_vec();
    args_b.extend(["--redis-password-file", path(&password_file)]);
    let a = logged_replica(&url_a, "a", &tls);
    let b = logged_replica(&url_b, "b", &args_b);
    a.wait_health(ServingStatus::Serving).await;
    b.wait_health(ServingStatus::Serving).await;

    let (mut ca_client, mut cb_client) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&mut ca_client, channels("sa", &["news"])).await.0;
    let mut on_b = subscribe(&mut cb_client, channels("sb", &["news"])).await.0;
    broadcast(&mut cb_client, "news", "over tls from b")
        .await
        .expect("broadcast on b");
    broadcast(&mut ca_client, "news", "over tls from a")
        .await
        .expect("broadcast on a");
    let want = ["over tls from b", "over tls from a"];
    assert_eq!(texts(&mut on_a, 2).await, want);
    assert_eq!(texts(&mut on_b, 2).await, want);
    // Requests cross replicas over TLS too (the inboxes are TLS connections).
    let fleet = members(&mut ca_client).await;
    assert!(
        fleet.iter().any(|m| m.id == "sb" && m.node == "b"),
        "{fleet:?}"
    );

    for replica in [&a, &b] {
        let log = replica.log();
        assert!(log.contains("connected to Redis"), "{log}");
        assert!(
            !log.contains(PASSWORD),
            "the password is in the log:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_certificate_authority_is_refused_and_named() {
    let ca = TestCa::new("redis-test-ca");
    let redis = tls_redis(&ca);
    let stranger = TestCa::new("some-other-ca");
    let client = ca.client_cert("ipc-server", &["ipc-server"]);
    let url = format!("rediss://app:{PASSWORD}@127.0.0.1:{}/", redis.port());

    let mut replica = logged_replica(
        &url,
        "wrong-ca",
        &[
            "--redis-ca",
            path(&stranger.cert_path()),
            "--redis-cert",
            path(&client.cert),
            "--redis-key",
            path(&client.key),
        ],
    );
    replica.wait_health(ServingStatus::NotServing).await;
    let mut grpc = replica.client().await;
    // Refused, never acknowledged; the error says what is wrong.
    let refused = broadcast(&mut grpc, "news", "never stored").await;
    assert_code(refused, Code::Unavailable, "--redis-ca");
    let status = broadcast(&mut grpc, "news", "never stored")
        .await
        .expect_err("refused");
    assert!(
        status.message().contains("not trusted") && !status.message().contains(PASSWORD),
        "{}",
        status.message()
    );
    // The replica keeps running and trying (no crash loop), and logs why once.
    assert!(replica.running(), "the replica exited");
    let log = replica.log();
    assert!(log.contains("certificate is not trusted"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the password is in the log:\n{log}"
    );

    // Without a client certificate Redis (tls-auth-clients yes) refuses: named too.
    let ca_path = ca.cert_path();
    let no_cert = logged_replica(&url, "no-cert", &["--redis-ca", path(&ca_path)]);
    no_cert.wait_health(ServingStatus::NotServing).await;
    let mut grpc = no_cert.client().await;
    let refused = broadcast(&mut grpc, "news", "never stored").await;
    assert_code(refused, Code::Unavailable, "Redis is unreachable");

    // A plain redis:// URL with TLS files is a configuration error at start.
    let bad = std::process::Command::new(ipc_testkit::binary("ipc-server"))
        .args(["--redis", "redis://127.0.0.1:1/", "--redis-ca"])
        .arg(ca.cert_path())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .expect("running ipc-server");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("need a rediss:// URL"), "{stderr}");
}

fn logged_replica(url: &str, node: &str, extra: &[&str]) -> ServerProcess {
    ServerProcess::start_logged(&replica_args(&["--redis", url], node, extra))
}
