//! Serve: subscribe and answer on one bidirectional stream, on a real `ipc-server`.
//! Requests arrive as on Subscribe, replies go back on the stream, and a reply that
//! cannot be delivered is reported on the stream, which goes on.

mod support;

use ipc_proto::pb::{ReplyRequest, SendMsgRequest, ServeRequest, SubscribeRequest, serve_request};
use serde_json::json;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn reply(reply_to: &str, data: serde_json::Value) -> ServeRequest {
    ServeRequest {
        kind: Some(serve_request::Kind::Reply(ReplyRequest {
            reply_to: reply_to.into(),
            op: "answer".into(),
            data: Some(ipc_proto::json::to_value(&data)),
            ..ReplyRequest::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_travel_back_on_the_stream_and_a_bad_one_is_reported_there() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let (to_node, mut stream) = serve_worker(&mut client, "shop:w:1", "worker").await;

    for n in 0..3 {
        let mut caller = server.client().await;
        let asked = tokio::spawn(async move {
            caller
                .send_msg(SendMsgRequest {
                    target: ":worker".into(),
                    op: "sum".into(),
                    data: Some(ipc_proto::json::to_value(&json!(n))),
                    ..SendMsgRequest::default()
                })
                .await
        });
        let request = next(&mut stream).await;
        assert_eq!(request.op, "sum");
        to_node
            .send(reply(&request.reply_to, json!(n * 10)))
            .await
            .unwrap();
        let answer = asked.await.unwrap().expect("answered").into_inner();
        let data = ipc_proto::json::from_optional(answer.reply.unwrap().data.as_ref());
        assert_eq!(data, json!(n * 10));

        // Answering the same request again cannot be delivered: reported, not fatal.
        to_node
            .send(reply(&request.reply_to, json!(0)))
            .await
            .unwrap();
        let notice = next(&mut stream).await;
        assert_eq!(notice.op, "ipc:reply-error");
        let data = ipc_proto::json::from_optional(notice.data.as_ref());
        assert_eq!(data["reply_to"], json!(request.reply_to));
        assert_eq!(data["code"], "NOT_FOUND");
    }

    // A client that closes its side keeps receiving.
    drop(to_node);
    let mut broadcaster = server.client().await;
    broadcaster
        .broadcast(broadcast(":worker", "note", json!("still here")))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.op, "note");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_message_must_subscribe() {
    let server = server(&[]);
    let mut client = server.client().await;
    let first = reply("x", json!(null));
    let refused = client
        .serve(futures::stream::iter(vec![first]))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("subscribe"), "{refused}");
    let empty = client
        .serve(futures::stream::iter(Vec::<ServeRequest>::new()))
        .await
        .expect_err("refused");
    assert_eq!(empty.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_sent_after_the_subscription_was_replaced_is_still_delivered() {
    // A worker restarting under its id: it answers on its old stream while its new
    // subscription (same id) has already replaced the old one.
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let subscribe = || ServeRequest {
        kind: Some(serve_request::Kind::Subscribe(SubscribeRequest {
            id: "shop:w:1".into(),
            role: "worker".into(),
            ..SubscribeRequest::default()
        })),
    };
    let (to_node, outgoing) = mpsc::channel(8);
    to_node.send(subscribe()).await.unwrap();
    let mut old = client
        .serve(ReceiverStream::new(outgoing))
        .await
        .expect("serve opens")
        .into_inner();
    assert_eq!(next(&mut old).await.op, "ipc:subscribed");

    let mut caller = server.client().await;
    let asked = tokio::spawn(async move {
        caller
            .send_msg(SendMsgRequest {
                target: "shop:w:1".into(),
                op: "worker:restart".into(),
                timeout_ms: 10_000,
                ..SendMsgRequest::default()
            })
            .await
    });
    let request = next(&mut old).await;
    assert_eq!(request.op, "worker:restart");

    let (to_new, new_outgoing) = mpsc::channel(8);
    to_new.send(subscribe()).await.unwrap();
    let mut new = client
        .serve(ReceiverStream::new(new_outgoing))
        .await
        .expect("serve opens")
        .into_inner();
    assert_eq!(next(&mut new).await.op, "ipc:subscribed");
    // The old stream is over; its sending side is still open.
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(_)) = old.message().await {}
    });
    ended.await.expect("the replaced stream ends");

    to_node
        .send(reply(&request.reply_to, json!({"restarted": true})))
        .await
        .unwrap();
    drop(to_node);
    let answer = asked.await.unwrap().expect("answered").into_inner();
    let data = ipc_proto::json::from_optional(answer.reply.unwrap().data.as_ref());
    assert_eq!(data, json!({"restarted": true}));
}
