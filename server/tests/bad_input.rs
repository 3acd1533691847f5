//! The bad input campaign: every RPC of a real `ipc-server` gets garbage — empty
//! and huge fields, invalid patterns, data nested beyond the decoder's limit,
//! undecodable bytes, thousands of channels, unknown cursors, replies to others'
//! requests, streams opened and abandoned by the hundred, junk on the TCP port —
//! while a well-behaved publisher and subscriber go about their business. Then the
//! node must still serve them, and the subscriber must have every acknowledged
//! broadcast, once, in order.

mod support;

use ipc_proto::json::from_optional;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, MembersRequest, ReplyRequest, SendMsgRequest,
    SubscribeRequest,
};
use ipc_testkit::bad_input::{self, nested, noise};
use serde_json::json;
use support::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Statuses that would mean the node failed rather than refused.
fn assert_refused_cleanly(what: &str, status: &Status) {
    assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown | Code::Ok),
        "{what}: {status:?}"
    );
    // A refusal quotes what it refuses, but never echoes a huge input back.
    assert!(
        status.message().len() < 2048,
        "{what}: message of {} bytes",
        status.message().len()
    );
}

fn assert_code(what: &str, result: Result<impl std::fmt::Debug, Status>, code: Code) -> Status {
    let status = result.expect_err(what);
    assert_refused_cleanly(what, &status);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    status
}

/// Calls `method` with `payload` as its request bytes; the first response item.
async fn raw_call(
    channel: &Channel,
    method: &'static str,
    payload: Vec<u8>,
    secret: &str,
) -> Result<Vec<u8>, Status> {
    bad_input::raw_call(channel, method, authed(payload, secret)).await
}

struct Campaign {
    client: IpcClient<Channel>,
    ops: String,
    acked: Vec<BroadcastResponse>,
}

impl Campaign {
    /// A well-behaved broadcast; its acknowledgement is remembered.
    async fn publish(&mut self) {
        let n = self.acked.len();
        let ack = self
            .client
            .broadcast(authed(
                broadcast("keep:n", "keep", json!({"n": n})),
                &self.ops,
            ))
            .await
            .expect("a well-behaved broadcast is accepted")
            .into_inner();
        self.acked.push(ack);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_rpc_harms_no_one_and_loses_no_acknowledged_message() {
    let (ops, ops_entry) = token(
        "ops",
        "shop",
        "broadcast = [\">\"]\nsend = [\">\"]\nsubscribe = [\">\"]\nmembers = true",
    );
    let (worker, worker_entry) = token("worker", "shop", "subscribe = [\"shop:>\"]");
    let (mallory, mallory_entry) = token(
        "mallory",
        "shop",
        "broadcast = [\"junk:>\"]\nsend = [\"junk:>\"]\nsubscribe = [\"junk:>\"]",
    );
    let file = TokensFile::new(&format!("{ops_entry}\n{worker_entry}\n{mallory_entry}"));
    let server = server(&[
        "--tokens",
        file.arg(),
        "--app",
        "shop",
        "--max-msg-bytes",
        "65536",
    ]);
    let client = server.client().await;
    let mut campaign = Campaign {
        client: client.clone(),
        ops: ops.clone(),
        acked: Vec::new(),
    };
    let mut bad = server.client().await;

    // The well-behaved: a witness of everything on keep:>, and a worker that answers.
    let (mut witness, _) = subscribe(
        &mut campaign.client,
        authed(
            SubscribeRequest {
                id: "keep:witness".into(),
                channels: vec!["keep:>".into()],
                ..Default::default()
            },
            &ops,
        ),
    )
    .await;
    let (mut worker_stream, _) = subscribe(
        &mut campaign.client,
        authed(
            SubscribeRequest {
                id: "shop:w:1".into(),
                role: "worker".into(),
                ..Default::default()
            },
            &worker,
        ),
    )
    .await;
    campaign.publish().await;

    // --- Broadcast ---------------------------------------------------------------
    let broadcasts = bad_input::broadcasts();
    for (what, request, code) in broadcasts {
        assert_code(what, bad.broadcast(authed(request, &mallory)).await, code);
    }
    let deep = bad_input::too_deep();
    let status = assert_code(
        "nested 200 deep",
        bad.broadcast(authed(deep, &mallory)).await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("could not be decoded"),
        "{status:?}"
    );
    // Nesting the decoder accepts is accepted.
    let fine = BroadcastRequest {
        data: Some(nested(30)),
        ..broadcast("junk:a", "x", json!(null))
    };
    bad.broadcast(authed(fine, &mallory)).await.unwrap();
    assert_code(
        "no token",
        bad.broadcast(broadcast("keep:n", "x", json!(null))).await,
        Code::Unauthenticated,
    );
    campaign.publish().await;

    // --- Undecodable bytes on every RPC ---------------------------------------------
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let methods = bad_input::METHODS;
    let undecodable = bad_input::undecodable();
    for method in methods {
        for (what, payload) in &undecodable {
            let status = raw_call(&channel, method, payload.clone(), &ops)
                .await
                .expect_err(what);
            assert_refused_cleanly(what, &status);
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{method} {what}: {status:?}"
            );
        }
        // Noise may happen to decode (unknown fields are skipped): then the node
        // judges the message; either way it answers, and never with a failure of its own.
        for seed in 0..20 {
            match raw_call(&channel, method, noise(seed, 64), &ops).await {
                Ok(_) => {}
                Err(status) => assert_refused_cleanly(method, &status),
            }
        }
    }
    campaign.publish().await;

    // --- SendMsg ----------------------------------------------------------------
    let sends = bad_input::sends();
    for (what, request, code) in sends {
        assert_code(what, bad.send_msg(authed(request, &mallory)).await, code);
    }
    // A sink that takes requests and never answers: 200 callers time out, and the
    // node forgets every one of them.
    let (sink, _) = subscribe(&mut bad, authed(subscription(&["junk:sink"]), &mallory)).await;
    let waits = (0..200).map(|_| {
        let mut client = bad.clone();
        let mallory = mallory.clone();
        async move {
            client
                .send_msg(authed(
                    SendMsgRequest {
                        target: "junk:sink".into(),
                        op: "x".into(),
                        timeout_ms: 200,
                        ..Default::default()
                    },
                    &mallory,
                ))
                .await
        }
    });
    for result in futures::future::join_all(waits).await {
        let status = result.unwrap_err();
        // Either the deadline passed, or the sink's queue was full and it was cut off.
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Unavailable),
            "{status:?}"
        );
    }
    drop(sink);
    campaign.publish().await;

    // --- Subscribe --------------------------------------------------------------
    let head = campaign.acked.last().unwrap().cursor.clone();
    let epoch = head.split('.').next().unwrap().to_string();
    let subscribes = bad_input::subscribes(&epoch);
    for (what, request, code) in subscribes {
        assert_code(what, bad.subscribe(authed(request, &mallory)).await, code);
    }
    // A cursor of another epoch (a log that is gone) is reported as a gap.
    let (mut stale, _) = subscribe(
        &mut bad,
        authed(
            SubscribeRequest {
                channels: vec!["junk:stale".into()],
                cursor: "dead.5-0".into(),
                ..Default::default()
            },
            &mallory,
        ),
    )
    .await;
    assert_eq!(next(&mut stale).await.op, "ipc:gap");
    drop(stale);
    campaign.publish().await;

    // --- Reply ------------------------------------------------------------------
    let replies = bad_input::replies();
    for (what, request, code) in replies {
        assert_code(what, bad.reply(authed(request, &mallory)).await, code);
    }
    // A reply to someone else's request: the request does not exist for mallory,
    // and its rightful answer still gets through.
    let mut asker = campaign.client.clone();
    let ops_secret = ops.clone();
    let question = tokio::spawn(async move {
        asker
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
    assert_eq!(request.op, "status");
    let forged = ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: "forged".into(),
        ..Default::default()
    };
    assert_code(
        "someone else's request",
        bad.reply(authed(forged, &mallory)).await,
        Code::NotFound,
    );
    let answer = ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: "ok".into(),
        ..Default::default()
    };
    campaign
        .client
        .reply(authed(answer.clone(), &worker))
        .await
        .unwrap();
    let reply = question.await.unwrap().unwrap().into_inner().reply.unwrap();
    assert_eq!((reply.op.as_str(), reply.sender.as_str()), ("ok", "worker"));
    assert_code(
        "answered twice",
        campaign.client.reply(authed(answer, &worker)).await,
        Code::NotFound,
    );
    campaign.publish().await;

    // --- Members ----------------------------------------------------------------
    assert_code(
        "members without the grant",
        bad.members(authed(MembersRequest::default(), &mallory))
            .await,
        Code::PermissionDenied,
    );
    let odd_filter = MembersRequest {
        app: "x".repeat(10_000),
        labels: (0..1000).map(|i| (format!("l{i}"), "v".into())).collect(),
        ..Default::default()
    };
    let members = campaign
        .client
        .members(authed(odd_filter, &ops))
        .await
        .unwrap()
        .into_inner()
        .members;
    assert!(members.is_empty());

    // --- Streams opened and abandoned ---------------------------------------------
    // The witness and the worker; the streams above are gone once the node noticed.
    let baseline = 2;
    wait_for_metric(&server, "ipc_subscribers", |n| n == baseline).await;
    let mut connections = Vec::new();
    for _ in 0..3 {
        connections.push(server.client().await);
    }
    let mut abandoned = Vec::new();
    for i in 0..300 {
        let client = &mut connections[i % 3];
        let mut stream = client
            .subscribe(authed(subscription(&["junk:abandoned"]), &mallory))
            .await
            .unwrap()
            .into_inner();
        if i % 2 == 0 {
            // Half read their greeting, half never read anything.
            assert_eq!(next(&mut stream).await.op, "ipc:subscribed");
        }
        abandoned.push(stream);
    }
    // Calls abandoned before their answer: subscribes and requests to the sink-less
    // channel, cancelled in flight.
    let mut in_flight = Vec::new();
    for _ in 0..100 {
        let mut client = connections[0].clone();
        let mallory = mallory.clone();
        in_flight.push(tokio::spawn(async move {
            let _stream = client
                .subscribe(authed(subscription(&["junk:cancelled"]), &mallory))
                .await
                .map(|r| r.into_inner());
            std::future::pending::<()>().await;
        }));
    }
    // Broadcasts to the abandoned streams fill no memory without bound: they are
    // cut off or dropped with their connections.
    for _ in 0..20 {
        bad.broadcast(authed(
            broadcast("junk:abandoned", "x", json!("y".repeat(1000))),
            &mallory,
        ))
        .await
        .unwrap();
    }
    for task in &in_flight {
        task.abort();
    }
    drop(abandoned);
    drop(connections);
    for task in in_flight {
        let _ = task.await;
    }
    wait_for_metric(&server, "ipc_subscribers", |n| n == baseline).await;
    campaign.publish().await;

    // --- Junk on the TCP port ---------------------------------------------------------
    // A connection that never says anything is held until the end of the test.
    let _idle = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut junk = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
        junk.write_all(&noise(7, 4096)).await.unwrap();
        drop(junk);
        let mut http1 = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
        http1
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        drop(http1);
        campaign.publish().await;
    }

    // --- The well-behaved were not harmed ----------------------------------------------
    let pong = campaign
        .client
        .send_msg(authed(
            SendMsgRequest {
                op: "ping".into(),
                ..Default::default()
            },
            &ops,
        ))
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(pong.op, "pong");

    // The witness got every acknowledged broadcast, once, in order, and nothing else.
    let mut seen = Vec::new();
    while seen.len() < campaign.acked.len() {
        let msg = next(&mut witness).await;
        seen.push((msg.id, msg.cursor, msg.sender));
    }
    let expected: Vec<_> = campaign
        .acked
        .iter()
        .map(|a| (a.id.clone(), a.cursor.clone(), "ops".to_string()))
        .collect();
    assert_eq!(seen, expected);

    // And a subscriber resuming from the first acknowledgement replays the rest.
    let (mut resumed, _) = subscribe(
        &mut campaign.client,
        authed(
            SubscribeRequest {
                channels: vec!["keep:>".into()],
                cursor: campaign.acked[0].cursor.clone(),
                ..Default::default()
            },
            &ops,
        ),
    )
    .await;
    for ack in &campaign.acked[1..] {
        let msg = next(&mut resumed).await;
        assert_eq!((&msg.id, &msg.cursor), (&ack.id, &ack.cursor));
        assert!(from_optional(msg.data.as_ref())["n"].is_u64());
    }
    campaign.publish().await;
    let last = campaign.acked.last().unwrap();
    assert_eq!(next(&mut resumed).await.id, last.id);
    assert_eq!(next(&mut witness).await.id, last.id);

    // Refusals were counted by reason.
    assert!(metric(&server, "ipc_refusals_total{reason=\"permission_denied\"}").await >= 8);
    assert!(metric(&server, "ipc_refusals_total{reason=\"msg_bytes\"}").await >= 1);
}
