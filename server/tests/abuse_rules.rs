//! The medium and low findings of the abuse review, each against a real
//! `ipc-server`: Subscribe held to --max-msg-bytes, relayed members within the
//! relaying token's grants, Members never failing for size, unguessable
//! `reply_to`, revoked tokens' streams (Subscribe, Serve, Publish) ended on
//! SIGHUP, short error echoes, control characters refused, and `info` needing a
//! grant.

mod support;

use std::collections::HashMap;

use futures::StreamExt;
use ipc_proto::pb::{Member, MembersRequest, ReplyRequest, SendMsgRequest, SubscribeRequest};
use serde_json::json;
use support::*;
use tonic::Code;

#[tokio::test]
async fn subscribe_is_held_to_the_message_limit() {
    let server = server(&["--max-msg-bytes", "2048"]);
    let mut client = server.client().await;
    let channels: Vec<String> = (0..40)
        .map(|i| format!("app:{}{i}", "c".repeat(80)))
        .collect();
    let request = SubscribeRequest {
        channels,
        ..SubscribeRequest::default()
    };
    let status = client.subscribe(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-msg-bytes"), "{status:?}");
}

#[tokio::test]
async fn relayed_members_stay_within_the_relaying_tokens_grants() {
    let (secret, entry) = token(
        "web",
        "shop",
        "subscribe = [\"shop:web\", \"shop:web:*\", \"shop:pod:>\"]",
    );
    let tokens = TokensFile::new(&entry);
    let server = server(&["--tokens", tokens.arg()]);
    let mut client = server.client().await;
    let relaying = |member: Member| SubscribeRequest {
        id: "shop:pod:1".into(),
        members: vec![member],
        ..SubscribeRequest::default()
    };
    let fake_admin = Member {
        id: "shop:pod:1:a".into(),
        app: "other".into(),
        role: "admin".into(),
        ..Member::default()
    };
    let wrong_role = Member {
        id: "shop:pod:1:b".into(),
        role: "admin".into(),
        ..Member::default()
    };
    let wrong_channel = Member {
        id: "shop:pod:1:c".into(),
        channels: vec!["shop:billing".into()],
        ..Member::default()
    };
    for member in [fake_admin, wrong_role, wrong_channel] {
        let status = client
            .subscribe(authed(relaying(member.clone()), &secret))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{member:?}: {status:?}"
        );
        assert!(status.message().contains("relay"), "{status:?}");
    }
    let fine = Member {
        id: "shop:pod:1:d".into(),
        role: "web".into(),
        channels: vec!["shop:web:x".into()],
        ..Member::default()
    };
    let (_stream, _) = subscribe(&mut client, authed(relaying(fine), &secret)).await;
}

#[tokio::test]
async fn members_never_fails_for_size_it_says_it_truncated() {
    let server = server(&[]);
    let mut client = server.client().await;
    // Six streams of ~900 KB of relayed members: more than a response may hold.
    let mut streams = Vec::new();
    for s in 0..6 {
        let members = (0..14)
            .map(|i| Member {
                id: format!("relay{s}:m{i}"),
                labels: HashMap::from([("blob".to_string(), "x".repeat(60_000))]),
                ..Member::default()
            })
            .collect();
        let request = SubscribeRequest {
            id: format!("relay{s}"),
            members,
            ..SubscribeRequest::default()
        };
        streams.push(subscribe(&mut client, request).await);
    }
    let response = client
        .members(MembersRequest::default())
        .await
        .expect("Members must not fail for size")
        .into_inner();
    assert!(response.truncated);
    assert!(!response.members.is_empty());
}

fn request_to(target: &str) -> SendMsgRequest {
    SendMsgRequest {
        target: target.into(),
        op: "q".into(),
        timeout_ms: 10_000,
        ..SendMsgRequest::default()
    }
}

#[tokio::test]
async fn reply_to_is_unguessable_and_a_huge_one_is_not_echoed_whole() {
    let server = server(&[]);
    let mut responder = server.client().await;
    // A responder of `app:svc`: its id (a channel subscription would be a watcher).
    let (mut stream, _) = subscribe(
        &mut responder,
        ipc_proto::pb::SubscribeRequest {
            id: "app:svc".into(),
            ..subscription(&[])
        },
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut caller = server.client().await;
        let call = tokio::spawn(async move { caller.send_msg(request_to("app:svc")).await });
        let request = next(&mut stream).await;
        let (_, rest) = request.reply_to.rsplit_once('#').unwrap();
        let (_, secret) = rest.split_once('.').expect("a random part");
        assert_eq!(secret.len(), 16, "{}", request.reply_to);
        assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
        seen.push(secret.to_string());
        responder
            .reply(ReplyRequest {
                reply_to: request.reply_to.clone(),
                op: "a".into(),
                ..ReplyRequest::default()
            })
            .await
            .unwrap();
        call.await.unwrap().unwrap();
    }
    assert_ne!(seen[0], seen[1]);
    // A guess with the old shape (<node>#<counter>) answers nothing.
    let status = responder
        .reply(ReplyRequest {
            reply_to: format!("{}#1", "n"),
            op: "a".into(),
            ..ReplyRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let huge = ReplyRequest {
        reply_to: "x".repeat(500_000),
        op: "a".into(),
        ..ReplyRequest::default()
    };
    let status = responder.reply(huge).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().len() < 1024, "{}", status.message().len());
}

#[tokio::test]
async fn control_and_direction_override_characters_are_refused() {
    let server = server(&[]);
    let mut client = server.client().await;
    let status = client
        .broadcast(broadcast("app:a", "evil\u{202E}txt", json!(null)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("op"), "{status:?}");
    let mut with_header = broadcast("app:a", "x", json!(null));
    with_header.headers = HashMap::from([("note".to_string(), "line\nforged".to_string())]);
    let status = client.broadcast(with_header).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("headers"), "{status:?}");
    let status = client
        .broadcast(broadcast("app:a\u{0}", "x", json!(null)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn the_info_builtin_needs_a_grant() {
    let (plain, plain_entry) = token("plain", "shop", "broadcast = [\"shop:>\"]");
    let (ops, ops_entry) = token("ops", "shop", "members = true");
    let tokens = TokensFile::new(&format!("{plain_entry}\n{ops_entry}"));
    let server = server(&["--tokens", tokens.arg()]);
    let mut client = server.client().await;
    let info = SendMsgRequest {
        op: "info".into(),
        ..SendMsgRequest::default()
    };
    let status = client
        .send_msg(authed(info.clone(), &plain))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    client.send_msg(authed(info, &ops)).await.unwrap();
}

#[tokio::test]
async fn removing_a_token_and_sighup_ends_its_streams() {
    let (gone, gone_entry) = token("gone", "shop", "subscribe = [\"shop:>\"]");
    let (kept, kept_entry) = token(
        "kept",
        "shop",
        "subscribe = [\"shop:>\"]\nbroadcast = [\"shop:>\"]",
    );
    let tokens = TokensFile::new(&format!("{gone_entry}\n{kept_entry}"));
    let server = server(&["--tokens", tokens.arg()]);
    let mut client = server.client().await;
    let (mut revoked, _) = subscribe(&mut client, authed(subscription(&["shop:a"]), &gone)).await;
    let (mut staying, _) = subscribe(&mut client, authed(subscription(&["shop:a"]), &kept)).await;
    tokens.rewrite(&kept_entry);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let ended = tokio::time::timeout(PATIENCE, revoked.next())
        .await
        .expect("the revoked stream stayed open")
        .expect("a status")
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    wait_for_metric(&server, "ipc_revoked_streams_total", |n| n == 1).await;
    client
        .broadcast(authed(broadcast("shop:a", "still", json!(null)), &kept))
        .await
        .unwrap();
    assert_eq!(next(&mut staying).await.op, "still");
}

/// Sends one broadcast (op `op`, to `shop:a`) on an open Publish stream and
/// checks that it is accepted.
async fn publish_one(
    stream: &tokio::sync::mpsc::Sender<ipc_proto::pb::BroadcastRequest>,
    answers: &mut tonic::Streaming<ipc_proto::pb::BroadcastResponse>,
    op: &str,
) {
    stream
        .send(broadcast("shop:a", op, json!(null)))
        .await
        .unwrap();
    let answer = tokio::time::timeout(PATIENCE, answers.next())
        .await
        .expect("an answer")
        .expect("the stream goes on")
        .expect("answered");
    assert!(answer.error.is_empty(), "{answer:?}");
}

#[tokio::test]
async fn removing_a_token_and_sighup_ends_its_publish_and_serve_streams() {
    use ipc_proto::pb::{ServeRequest, serve_request};
    use tokio_stream::wrappers::ReceiverStream;

    let grants = "subscribe = [\"shop:>\"]\nbroadcast = [\"shop:>\"]";
    let (gone, gone_entry) = token("gone", "shop", grants);
    let (kept, kept_entry) = token("kept", "shop", grants);
    let tokens = TokensFile::new(&format!("{gone_entry}\n{kept_entry}"));
    let server = server(&["--tokens", tokens.arg()]);
    let mut client = server.client().await;

    // Publish streams of both tokens, each with one message answered, left open.
    let mut publishers = Vec::new();
    for secret in [&gone, &kept] {
        let (to_node, outgoing) = tokio::sync::mpsc::channel(8);
        let mut answers = client
            .publish(authed(ReceiverStream::new(outgoing), secret))
            .await
            .expect("publish opens")
            .into_inner();
        publish_one(&to_node, &mut answers, "before").await;
        publishers.push((to_node, answers));
    }
    // A Serve stream of the token to be removed, greeted and left open.
    let (to_serve, serve_out) = tokio::sync::mpsc::channel(8);
    to_serve
        .send(ServeRequest {
            kind: Some(serve_request::Kind::Subscribe(subscription(&["shop:b"]))),
        })
        .await
        .unwrap();
    let mut serving = client
        .serve(authed(ReceiverStream::new(serve_out), &gone))
        .await
        .expect("serve opens")
        .into_inner();
    assert_eq!(next(&mut serving).await.op, "ipc:subscribed");

    tokens.rewrite(&kept_entry);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();

    let ended = end_status(&mut serving).await;
    assert_eq!(ended.code(), Code::Unauthenticated, "Serve: {ended:?}");
    let (kept_publisher, kept_answers) = publishers.pop().unwrap();
    let (_gone_publisher, mut gone_answers) = publishers.pop().unwrap();
    let ended = end_status(&mut gone_answers).await;
    assert_eq!(ended.code(), Code::Unauthenticated, "Publish: {ended:?}");
    assert!(ended.message().contains("tokens file"), "{ended:?}");
    // The Serve subscription and the Publish stream.
    wait_for_metric(&server, "ipc_revoked_streams_total", |n| n == 2).await;

    // The other token's Publish stream goes on.
    let mut kept_answers = kept_answers;
    publish_one(&kept_publisher, &mut kept_answers, "after").await;
}
