//! SendMsgs (many SendMsg on one stream, answered by number in any order) on a real
//! `ipc-server`: each request answered as its unary SendMsg would be — a reply, no
//! responders, bad input — and the stream going on after a refusal.

mod support;

use std::collections::HashMap;

use futures::StreamExt;
use ipc_proto::pb::{ReplyRequest, SendMsgRequest, SendMsgsRequest, ServeRequest, serve_request};
use serde_json::json;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn request(seq: u64, target: &str, op: &str) -> SendMsgsRequest {
    SendMsgsRequest {
        seq,
        request: Some(SendMsgRequest {
            target: target.into(),
            op: op.into(),
            timeout_ms: 5_000,
            ..SendMsgRequest::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_answered_by_its_number_and_a_refusal_does_not_end_the_stream() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;

    // A worker answering on its Serve stream.
    let (to_node, mut worker) = serve_worker(&mut client, "shop:w:1", "worker").await;

    let (requests, stream) = mpsc::channel(8);
    let mut answers = server
        .client()
        .await
        .send_msgs(ReceiverStream::new(stream))
        .await
        .expect("SendMsgs opens")
        .into_inner();
    // A message without its request, a target nobody answers, a request with no
    // op: each refused on its own, as the unary call would be.
    requests
        .send(SendMsgsRequest {
            seq: 7,
            request: None,
        })
        .await
        .unwrap();
    requests.send(request(8, ":nobody", "sum")).await.unwrap();
    requests.send(request(9, ":worker", "")).await.unwrap();
    requests.send(request(10, ":worker", "sum")).await.unwrap();

    let asked = next(&mut worker).await;
    assert_eq!(asked.op, "sum");
    to_node
        .send(ServeRequest {
            kind: Some(serve_request::Kind::Reply(ReplyRequest {
                reply_to: asked.reply_to.clone(),
                op: "answer".into(),
                data: Some(ipc_proto::json::to_value(&json!(42))),
                ..ReplyRequest::default()
            })),
        })
        .await
        .unwrap();

    let mut by_seq = HashMap::new();
    for _ in 0..4 {
        let answer = next(&mut answers).await;
        by_seq.insert(answer.seq, answer);
    }
    let missing = &by_seq[&7];
    assert_eq!(missing.code, Code::InvalidArgument as i32, "{missing:?}");
    assert!(missing.error.contains("request"), "{missing:?}");
    let nobody = &by_seq[&8];
    assert_eq!(nobody.code, Code::Unavailable as i32, "{nobody:?}");
    assert!(nobody.error.contains("no responders"), "{nobody:?}");
    assert_eq!(
        by_seq[&9].code,
        Code::InvalidArgument as i32,
        "{:?}",
        by_seq[&9]
    );
    let answered = &by_seq[&10];
    assert_eq!(answered.code, 0, "{answered:?}");
    let reply = answered.reply.as_ref().expect("a reply");
    assert_eq!(
        ipc_proto::json::from_optional(reply.data.as_ref()),
        json!(42)
    );

    // Closing the request side ends the stream cleanly once all are answered.
    drop(requests);
    let end = tokio::time::timeout(PATIENCE, answers.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "{end:?}");
}
