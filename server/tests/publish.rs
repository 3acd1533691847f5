//! Publish (many broadcasts on one stream) and idempotent Broadcast on a real
//! `ipc-server` alone (memory bus): answers in order once stored, refusals answered
//! on the stream, an undecodable message ending it, a repeated key stored once.

mod support;

use std::time::Duration;

use futures::StreamExt;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse};
use prost::Message as _;
use serde_json::json;
use support::*;
use tonic::{Code, Status};

/// Publishes `requests` on one stream; every answer, and how the stream ended.
async fn publish_all(
    client: &mut ipc_proto::pb::ipc_client::IpcClient<tonic::transport::Channel>,
    messages: Vec<BroadcastRequest>,
) -> (Vec<BroadcastResponse>, Option<Status>) {
    let mut answers = Vec::new();
    let mut stream = client
        .publish(futures::stream::iter(messages))
        .await
        .expect("publish opens")
        .into_inner();
    loop {
        match tokio::time::timeout(PATIENCE, stream.next()).await {
            Ok(Some(Ok(answer))) => answers.push(answer),
            Ok(Some(Err(status))) => return (answers, Some(status)),
            Ok(None) => return (answers, None),
            Err(_) => panic!("no answer within the patience bound"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_answers_every_message_in_order_once_stored() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let (mut reader, _) = subscribe(&mut client, subscription(&["news"])).await;
    let messages: Vec<_> = (0..300)
        .map(|n| broadcast("news", "note", json!({ "n": n })))
        .collect();
    let (answers, ended) = publish_all(&mut client, messages).await;
    assert!(ended.is_none(), "the stream ends cleanly: {ended:?}");
    assert_eq!(answers.len(), 300, "one answer per message");
    for (n, answer) in answers.iter().enumerate() {
        assert!(answer.error.is_empty() && answer.code == 0, "{answer:?}");
        assert!(!answer.cursor.is_empty() && !answer.duplicate);
        let msg = next(&mut reader).await;
        assert_eq!(
            (&msg.id, &msg.cursor),
            (&answer.id, &answer.cursor),
            "answer {n} names the message stored {n}th"
        );
        assert_eq!(ipc_proto::json::from_optional(msg.data.as_ref())["n"], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_answered_with_its_code_and_the_stream_goes_on() {
    let (secret, entry) = token(
        "pub",
        "shop",
        "broadcast = [\"shop:>\"]\nsubscribe = [\">\"]",
    );
    let file = TokensFile::new(&entry);
    let server = server(&["--tokens", file.arg(), "--max-msg-bytes", "2048"]);
    let mut client = server.client().await;
    let (mut reader, _) = subscribe(&mut client, authed(subscription(&[":>"]), &secret)).await;
    let big = broadcast(":news", "note", json!("x".repeat(4096)));
    let messages = vec![
        broadcast(":news", "note", json!(1)),
        broadcast(":news", "", json!("no op")),
        big,
        broadcast("elsewhere", "note", json!("not granted")),
        broadcast("bad channel!", "note", json!(null)),
        BroadcastRequest {
            key: "k\u{1}".into(),
            ..broadcast(":news", "note", json!("bad key"))
        },
        broadcast(":news", "note", json!(2)),
    ];
    let mut stream = client
        .publish(authed(futures::stream::iter(messages), &secret))
        .await
        .expect("publish opens")
        .into_inner();
    let mut answers = Vec::new();
    while let Some(item) = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("answers come")
    {
        answers.push(item.expect("the stream goes on"));
    }
    let codes: Vec<i32> = answers.iter().map(|a| a.code).collect();
    assert_eq!(
        codes,
        [
            0,
            Code::InvalidArgument as i32,
            Code::ResourceExhausted as i32,
            Code::PermissionDenied as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            0
        ]
    );
    for refused in &answers[1..6] {
        assert!(!refused.error.is_empty(), "says why: {refused:?}");
        assert!(refused.cursor.is_empty() && refused.id.is_empty());
    }
    assert!(answers[1].error.contains("op is empty"), "{:?}", answers[1]);
    assert!(answers[3].error.contains("not in its grants"));
    for n in [1, 2] {
        let msg = next(&mut reader).await;
        assert_eq!(ipc_proto::json::from_optional(msg.data.as_ref()), json!(n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_past_the_rate_limit_are_refused_one_by_one() {
    let server = server(&["--rate-limit", "1", "--rate-burst", "3"]);
    let mut client = server.client().await;
    let messages: Vec<_> = (0..8)
        .map(|n| broadcast("news", "note", json!(n)))
        .collect();
    let (answers, ended) = publish_all(&mut client, messages).await;
    assert!(ended.is_none());
    assert_eq!(answers.len(), 8);
    let limited: Vec<_> = answers
        .iter()
        .filter(|a| a.code == Code::ResourceExhausted as i32)
        .collect();
    assert!(
        !limited.is_empty() && limited.iter().all(|a| a.error.contains("rate limit")),
        "{answers:?}"
    );
    assert!(
        answers[0].code == 0,
        "the burst covers the first: {answers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_ends_the_stream_after_the_answers_before_it() {
    let server = server(&[]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let good = broadcast("news", "note", json!(1)).encode_to_vec();
    // A string field (op) holding invalid UTF-8.
    let bad = vec![0x12, 0x02, 0xff, 0xfe];
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let response = grpc
        .streaming(
            tonic::Request::new(futures::stream::iter(vec![good, bad.clone(), bad])),
            http::uri::PathAndQuery::from_static("/ipc.v1.Ipc/Publish"),
            RawCodec,
        )
        .await
        .expect("publish opens");
    let mut stream = response.into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap()
        .expect("an answer")
        .expect("the good message is answered");
    let answer = BroadcastResponse::decode(first.as_slice()).unwrap();
    assert!(!answer.cursor.is_empty(), "{answer:?}");
    let status = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .unwrap()
        .expect("the stream ends with a status")
        .expect_err("with an error");
    assert_eq!(
        status.code(),
        Code::Internal,
        "as Broadcast would: {status}"
    );
    // The node still serves.
    client_broadcast_ok(&server).await;
}

async fn client_broadcast_ok(server: &ipc_testkit::ServerProcess) {
    let mut client = server.client().await;
    client
        .broadcast(broadcast("news", "note", json!("after")))
        .await
        .expect("still serving");
}

fn keyed(key: &str, n: i64) -> BroadcastRequest {
    BroadcastRequest {
        key: key.into(),
        ..broadcast(":jobs", "job:run", json!({ "n": n }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_is_stored_once_and_answers_the_first_id() {
    let server = server(&["--app", "shop", "--dedup-window", "2s"]);
    let mut client = server.client().await;
    let (mut reader, _) = subscribe(&mut client, subscription(&[":jobs"])).await;

    let first = client
        .broadcast(keyed("run-1", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate && !first.cursor.is_empty());
    let again = client
        .broadcast(keyed("run-1", 2))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate, "{again:?}");
    assert_eq!(
        (&again.id, &again.cursor, &again.channel),
        (&first.id, &first.cursor, &first.channel)
    );
    // On a Publish stream too, next to a new key.
    let (answers, _) = publish_all(&mut client, vec![keyed("run-1", 3), keyed("run-2", 4)]).await;
    assert!(answers[0].duplicate && answers[0].id == first.id);
    assert!(!answers[1].duplicate);
    // Keys are per app: another app's "run-1" is its own.
    let mut other = tonic::Request::new(keyed("run-1", 5));
    other
        .metadata_mut()
        .insert("ipc-app", "billing".parse().unwrap());
    let billing = client.broadcast(other).await.unwrap().into_inner();
    assert!(!billing.duplicate && billing.channel == "billing:jobs");

    // Delivered once: after the first come run-2's message, nothing in between.
    let seen: Vec<i64> = [next(&mut reader).await, next(&mut reader).await]
        .iter()
        .map(|m| {
            ipc_proto::json::from_optional(m.data.as_ref())["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seen, [1, 4]);

    // Past the window the key is free again.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let answer = client
            .broadcast(keyed("run-1", 6))
            .await
            .unwrap()
            .into_inner();
        if !answer.duplicate {
            assert_ne!(answer.id, first.id);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
