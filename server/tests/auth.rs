//! Authentication and authorization against a real `ipc-server` over real gRPC:
//! tokens and their grants, TLS and mTLS with a CA made by the test, grpcurl,
//! reloading the tokens file on SIGHUP, and the refusal to listen beyond loopback
//! without credentials.

mod support;

use std::process::{Command, Stdio};

use ipc_proto::json::from_optional;
use ipc_proto::pb::{MembersRequest, ReplyRequest, SendMsgRequest, SubscribeRequest};
use serde_json::json;
use support::*;
use tonic::Code;

/// The tokens of the shop fleet: an operator, a worker, and a token without grants.
struct Shop {
    file: TokensFile,
    ops: String,
    worker: String,
    idle: String,
}

fn shop() -> Shop {
    let (ops, ops_entry) = token(
        "ops",
        "shop",
        r#"broadcast = [":>"]
send = [":>"]
subscribe = [":>"]
members = true"#,
    );
    let (worker, worker_entry) = token(
        "worker",
        "shop",
        r#"subscribe = [":worker", ":worker:*", ":w:*"]"#,
    );
    let (idle, idle_entry) = token("idle", "shop", "");
    Shop {
        file: TokensFile::new(&format!("{ops_entry}\n{worker_entry}\n{idle_entry}")),
        ops,
        worker,
        idle,
    }
}

fn assert_denied(status: &tonic::Status, verb: &str, what: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(verb) && status.message().contains(what),
        "expected the verb {verb:?} and {what:?} in {status:?}"
    );
}

#[tokio::test]
async fn requests_without_a_valid_token_are_unauthenticated() {
    let shop = shop();
    let server = server(&["--tokens", shop.file.arg()]);
    let mut client = server.client().await;
    let wrong = "ipct_0000";
    for secret in [None, Some(wrong)] {
        let statuses = [
            client
                .broadcast(with(secret, broadcast(":worker", "x", json!(null))))
                .await
                .unwrap_err(),
            client
                .send_msg(with(
                    secret,
                    SendMsgRequest {
                        op: "ping".into(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap_err(),
            client
                .subscribe(with(secret, subscription(&[":worker"])))
                .await
                .unwrap_err(),
            client
                .reply(with(
                    secret,
                    ReplyRequest {
                        reply_to: "n#1".into(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap_err(),
            client
                .members(with(secret, MembersRequest::default()))
                .await
                .unwrap_err(),
        ];
        for status in statuses {
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "{secret:?}: {status:?}"
            );
        }
    }
    let mut basic = tonic::Request::new(MembersRequest::default());
    basic
        .metadata_mut()
        .insert("authorization", "Basic b3BzOm9wcw==".parse().unwrap());
    let status = client.members(basic).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("Bearer"), "{status:?}");
    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"unauthenticated\"}").await,
        11
    );

    // Health and reflection stay open: probes and `grpcurl list` need no token.
    let health = tonic_health_check(&server).await;
    assert_eq!(health, 1, "SERVING");
}

/// A request with the bearer `secret`, or without credentials.
fn with<T>(secret: Option<&str>, message: T) -> tonic::Request<T> {
    match secret {
        Some(s) => authed(message, s),
        None => tonic::Request::new(message),
    }
}

/// The gRPC health status of the server (1 = SERVING), asked without a token.
async fn tonic_health_check(server: &ipc_testkit::ServerProcess) -> i32 {
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn grants_allow_what_they_name_and_refuse_the_rest() {
    let shop = shop();
    let server = server(&["--tokens", shop.file.arg()]);
    let mut client = server.client().await;

    // The worker may subscribe to its role and tag channels under a granted id.
    let (mut worker_stream, hello) = subscribe(
        &mut client,
        authed(
            SubscribeRequest {
                id: "shop:w:1".into(),
                role: "worker".into(),
                tag: "blue".into(),
                ..Default::default()
            },
            &shop.worker,
        ),
    )
    .await;
    let worker_id = subscriber_id(&hello);
    assert_eq!(worker_id, "shop:w:1");

    // ... and nothing else: an explicit pattern, another role, an ungranted id.
    let refusals = [
        (
            SubscribeRequest {
                channels: vec!["shop:>".into()],
                ..Default::default()
            },
            "subscribe to",
            "shop:>",
        ),
        (
            SubscribeRequest {
                role: "web".into(),
                ..Default::default()
            },
            "subscribe to",
            "shop:web",
        ),
        (
            SubscribeRequest {
                id: "ops-console".into(),
                ..Default::default()
            },
            "subscribe with id",
            "ops-console",
        ),
        (
            SubscribeRequest {
                channels: vec![":worker:*:x".into()],
                ..Default::default()
            },
            "subscribe to",
            "shop:worker:*:x",
        ),
        // Relaying a member lists it fleet-wide under its id: the id needs a grant.
        (
            SubscribeRequest {
                id: "shop:w:2".into(),
                members: vec![ipc_proto::pb::Member {
                    id: "ops-console".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            "relay a member with id",
            "ops-console",
        ),
    ];
    for (request, verb, what) in refusals {
        let status = client
            .subscribe(authed(request, &shop.worker))
            .await
            .unwrap_err();
        assert_denied(&status, verb, what);
    }
    let status = client
        .broadcast(authed(broadcast(":worker", "x", json!(null)), &shop.worker))
        .await
        .unwrap_err();
    assert_denied(&status, "broadcast to", "shop:worker");
    let status = client
        .send_msg(authed(
            SendMsgRequest {
                target: "shop:w:1".into(),
                op: "x".into(),
                ..Default::default()
            },
            &shop.worker,
        ))
        .await
        .unwrap_err();
    assert_denied(&status, "send to", "shop:w:1");
    let status = client
        .members(authed(MembersRequest::default(), &shop.worker))
        .await
        .unwrap_err();
    assert_denied(&status, "list", "members");
    let status = client
        .send_msg(authed(
            SendMsgRequest {
                op: "members".into(),
                ..Default::default()
            },
            &shop.worker,
        ))
        .await
        .unwrap_err();
    assert_denied(&status, "list", "members");
    // Ping needs no grant.
    let pong = client
        .send_msg(authed(
            SendMsgRequest {
                op: "ping".into(),
                ..Default::default()
            },
            &shop.idle,
        ))
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(pong.op, "pong");
    let status = client
        .broadcast(authed(broadcast(":worker", "x", json!(null)), &shop.idle))
        .await
        .unwrap_err();
    assert_denied(&status, "broadcast to", "shop:worker");

    // The operator broadcasts within its app and not beyond; its sender is its
    // token's name whatever `ipc-sender` says.
    let status = client
        .broadcast(authed(
            broadcast("other:worker", "x", json!(null)),
            &shop.ops,
        ))
        .await
        .unwrap_err();
    assert_denied(&status, "broadcast to", "other:worker");
    let mut spoofed = authed(
        broadcast(":worker:blue", "worker:restart", json!({})),
        &shop.ops,
    );
    spoofed
        .metadata_mut()
        .insert("ipc-sender", "mallory".parse().unwrap());
    let ack = client.broadcast(spoofed).await.unwrap().into_inner();
    assert_eq!(ack.channel, "shop:worker:blue");
    let msg = next(&mut worker_stream).await;
    assert_eq!(
        (msg.op.as_str(), msg.sender.as_str(), msg.cursor.as_str()),
        ("worker:restart", "ops", ack.cursor.as_str())
    );

    // The operator asks the worker; only the worker's identity may answer.
    let mut ops_client = client.clone();
    let ops_secret = shop.ops.clone();
    let ask = tokio::spawn(async move {
        ops_client
            .send_msg(authed(
                SendMsgRequest {
                    target: "shop:w:1".into(),
                    op: "status".into(),
                    ..Default::default()
                },
                &ops_secret,
            ))
            .await
    });
    let request = next(&mut worker_stream).await;
    assert_eq!(
        (request.op.as_str(), request.sender.as_str()),
        ("status", "ops")
    );
    let hijack = client
        .reply(authed(
            ReplyRequest {
                reply_to: request.reply_to.clone(),
                op: "forged".into(),
                ..Default::default()
            },
            &shop.ops,
        ))
        .await
        .unwrap_err();
    assert_eq!(hijack.code(), Code::NotFound, "{hijack:?}");
    client
        .reply(authed(
            ReplyRequest {
                reply_to: request.reply_to.clone(),
                op: "ok".into(),
                ..Default::default()
            },
            &shop.worker,
        ))
        .await
        .unwrap();
    let reply = ask.await.unwrap().unwrap().into_inner().reply.unwrap();
    assert_eq!((reply.op.as_str(), reply.sender.as_str()), ("ok", "worker"));

    let members = client
        .members(authed(MembersRequest::default(), &shop.ops))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].id, "shop:w:1");
    assert_eq!(
        metric(&server, "ipc_refusals_total{reason=\"permission_denied\"}").await,
        11
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tokens_file_without_dropping_streams() {
    let (ops, ops_entry) = token("ops", "shop", "broadcast = [\":>\"]\nsubscribe = [\":>\"]");
    let file = TokensFile::new(&ops_entry);
    let server = server(&["--tokens", file.arg()]);
    let mut client = server.client().await;
    let (mut stream, _) = subscribe(&mut client, authed(subscription(&[":news"]), &ops)).await;

    let (late, late_entry) = token("late", "shop", "broadcast = [\":news\"]");
    let status = client
        .broadcast(authed(broadcast(":news", "x", json!(null)), &late))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let sighup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    // A broken file is refused and the one in force stays.
    file.rewrite("[[token]]\nname = ");
    sighup();
    wait_for_metric(&server, "ipc_token_reloads_total{result=\"error\"}", |n| {
        n == 1
    })
    .await;
    client
        .broadcast(authed(broadcast(":news", "still-ops", json!(null)), &ops))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.op, "still-ops");

    file.rewrite(&format!("{ops_entry}\n{late_entry}"));
    sighup();
    wait_for_metric(&server, "ipc_token_reloads_total{result=\"ok\"}", |n| {
        n == 1
    })
    .await;
    let ack = client
        .broadcast(authed(broadcast(":news", "from-late", json!(null)), &late))
        .await
        .unwrap()
        .into_inner();
    // The stream opened before the reload is still there and gets it.
    let msg = next(&mut stream).await;
    assert_eq!(
        (msg.op.as_str(), msg.sender.as_str(), msg.cursor.as_str()),
        ("from-late", "late", ack.cursor.as_str())
    );
    // Removing a token takes effect at the next reload.
    file.rewrite(&late_entry);
    sighup();
    wait_for_metric(&server, "ipc_token_reloads_total{result=\"ok\"}", |n| {
        n == 2
    })
    .await;
    let status = client
        .broadcast(authed(broadcast(":news", "x", json!(null)), &ops))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn tokens_watch_reloads_a_changed_file_without_a_signal() {
    let grants = "broadcast = [\":>\"]\nsubscribe = [\":>\"]";
    let (gone, gone_entry) = token("gone", "shop", grants);
    let file = TokensFile::new(&gone_entry);
    let server = server(&["--tokens", file.arg(), "--tokens-watch", "100ms"]);
    let mut client = server.client().await;
    let (mut stream, _) = subscribe(&mut client, authed(subscription(&[":news"]), &gone)).await;
    // Unchanged contents are not reloaded, however many ticks pass: the first
    // reload counted is the change below.
    let (fresh, fresh_entry) = token("fresh", "shop", grants);
    file.rewrite(&fresh_entry);
    wait_for_metric(&server, "ipc_token_reloads_total{result=\"ok\"}", |n| {
        n >= 1
    })
    .await;
    let ended = tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut stream))
        .await
        .expect("the removed token's stream stayed open")
        .expect("a status")
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    client
        .broadcast(authed(broadcast(":news", "x", json!(null)), &fresh))
        .await
        .expect("the new token is in force");
    assert_eq!(
        metric(&server, "ipc_token_reloads_total{result=\"ok\"}").await,
        1,
        "one change, one reload"
    );
}

#[tokio::test]
async fn sighup_without_a_tokens_file_does_not_stop_the_server() {
    let server = server(&[]);
    let mut client = server.client().await;
    // Signal disposition is set before the readiness line, so SIGHUP's default
    // action (terminate) never applies; the signal is delivered at once.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    for _ in 0..3 {
        client
            .send_msg(SendMsgRequest {
                op: "ping".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_non_loopback_address_needs_credentials_or_insecure() {
    let output = Command::new(env!("CARGO_BIN_EXE_ipc-server"))
        .args(["--listen", "0.0.0.0:0", "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without authentication")
            && stderr.contains("--insecure")
            && stderr.contains("--tokens"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).is_empty());

    // With --insecure, or with tokens, it serves.
    let insecure = server(&["--listen", "0.0.0.0:0", "--insecure"]);
    assert!(insecure.grpc.ip().is_unspecified());
    let shop = shop();
    let authed_server = server(&["--listen", "0.0.0.0:0", "--tokens", shop.file.arg()]);
    let mut client = ipc_proto::pb::ipc_client::IpcClient::connect(format!(
        "http://127.0.0.1:{}",
        authed_server.grpc.port()
    ))
    .await
    .unwrap();
    client
        .broadcast(authed(broadcast(":worker", "x", json!(null)), &shop.ops))
        .await
        .unwrap();
}

#[tokio::test]
async fn tls_with_tokens_and_grpcurl_with_cacert() {
    let ca = TestCa::new("test-ca");
    let cert = ca.server_cert();
    let shop = shop();
    let server = server(&[
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
        "--tokens",
        shop.file.arg(),
    ]);
    let mut client = tls_client(&server, &ca, None).await.unwrap();
    let ack = client
        .broadcast(authed(broadcast(":worker", "x", json!(null)), &shop.ops))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.channel, "shop:worker");
    let status = client
        .broadcast(broadcast(":worker", "x", json!(null)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A client that does not trust the server's CA cannot talk to it.
    let other_ca = TestCa::new("other-ca");
    let refused = match tls_client(&server, &other_ca, None).await {
        Err(_) => true,
        Ok(mut c) => c.members(MembersRequest::default()).await.is_err(),
    };
    assert!(refused);
    // Nor can a plaintext client.
    let mut plain = server.client().await;
    assert!(plain.members(MembersRequest::default()).await.is_err());

    let grpcurl = grpcurl();
    let addr = server.grpc.to_string();
    let run = |extra: &[&str]| {
        let output = Command::new(&grpcurl)
            .args([
                "-cacert",
                ca.cert_path().to_str().unwrap(),
                "-servername",
                "localhost",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let bearer = format!("authorization: Bearer {}", shop.ops);
    let (ok, out) = run(&[
        "-H",
        &bearer,
        "-d",
        r#"{"channel":":worker","op":"worker:restart"}"#,
        &addr,
        "ipc.v1.Ipc/Broadcast",
    ]);
    assert!(ok, "{out}");
    let response: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(response["channel"], "shop:worker");
    let (ok, out) = run(&[
        "-d",
        r#"{"channel":":worker","op":"worker:restart"}"#,
        &addr,
        "ipc.v1.Ipc/Broadcast",
    ]);
    assert!(!ok);
    assert!(out.contains("Unauthenticated"), "{out}");
    let (ok, out) = run(&[&addr, "list"]);
    assert!(ok && out.contains("ipc.v1.Ipc"), "{out}");
}

#[tokio::test]
async fn mtls_maps_client_certificates_to_token_entries() {
    let ca = TestCa::new("test-ca");
    let cert = ca.server_cert();
    let (ops, ops_entry) = token("ops", "shop", "broadcast = [\":>\"]\nsubscribe = [\":>\"]");
    let edge_entry = "[[token]]\nname = \"edge\"\napp = \"shop\"\ncert_name = \"edge.shop.svc\"\nsubscribe = [\":edge\"]\nbroadcast = [\":edge\"]\n";
    let file = TokensFile::new(&format!("{ops_entry}\n{edge_entry}"));
    let server = server(&[
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
        "--tls-client-ca",
        ca.cert_path().to_str().unwrap(),
        "--tokens",
        file.arg(),
    ]);
    // Mapped by a DNS name of the certificate (its CN is something else).
    let edge_cert = ca.client_cert("edge-7f9c", &["edge.shop.svc"]);
    let mut edge = tls_client(&server, &ca, Some(&edge_cert)).await.unwrap();
    let (mut stream, _) = subscribe(&mut edge, subscription(&[":edge"])).await;
    let ack = edge
        .broadcast(broadcast(":edge", "hello", json!(null)))
        .await
        .unwrap()
        .into_inner();
    let msg = next(&mut stream).await;
    assert_eq!(
        (msg.sender.as_str(), msg.cursor.as_str()),
        ("edge", ack.cursor.as_str())
    );
    let status = edge
        .broadcast(broadcast(":worker", "x", json!(null)))
        .await
        .unwrap_err();
    assert_denied(&status, "broadcast to", "shop:worker");

    // A certificate of the right CA without an entry is not enough.
    let stranger = ca.client_cert("stranger", &[]);
    let mut client = tls_client(&server, &ca, Some(&stranger)).await.unwrap();
    let status = client
        .broadcast(broadcast(":edge", "x", json!(null)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("stranger"), "{status:?}");

    // With a tokens file, a client without a certificate may use a token.
    let mut token_only = tls_client(&server, &ca, None).await.unwrap();
    token_only
        .broadcast(authed(broadcast(":edge", "x", json!(null)), &ops))
        .await
        .unwrap();

    // A certificate from another CA fails the handshake.
    let rogue_ca = TestCa::new("rogue-ca");
    let rogue = rogue_ca.client_cert("edge.shop.svc", &["edge.shop.svc"]);
    let refused = match tls_client(&server, &ca, Some(&rogue)).await {
        Err(_) => true,
        Ok(mut c) => c.members(MembersRequest::default()).await.is_err(),
    };
    assert!(refused);
}

#[tokio::test]
async fn mtls_alone_authenticates_by_certificate_name() {
    let ca = TestCa::new("test-ca");
    let cert = ca.server_cert();
    let server = server(&[
        "--listen",
        "0.0.0.0:0",
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
        "--tls-client-ca",
        ca.cert_path().to_str().unwrap(),
        "--app",
        "shop",
    ]);
    let cert = ca.client_cert("ops-laptop", &[]);
    let mut client = tls_client(&server, &ca, Some(&cert)).await.unwrap();
    let (mut stream, _) = subscribe(&mut client, subscription(&[":x"])).await;
    client
        .broadcast(broadcast(":x", "hi", json!(null)))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.sender, "ops-laptop");
    let pong = client
        .send_msg(SendMsgRequest {
            op: "members".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(
        from_optional(pong.data.as_ref()).as_array().unwrap().len(),
        1
    );
    // Without a certificate the handshake fails: mTLS is required.
    let refused = match tls_client(&server, &ca, None).await {
        Err(_) => true,
        Ok(mut c) => c.members(MembersRequest::default()).await.is_err(),
    };
    assert!(refused);
}
