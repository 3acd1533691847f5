//! The rules of docs/design.md, checked against a real `ipc-server` process over real
//! gRPC on loopback.

mod support;

use std::time::Duration;

use ipc_proto::json::{from_optional, to_value};
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{
    BroadcastRequest, MembersRequest, Msg, ReplyRequest, SendMsgRequest, SubscribeRequest,
};
use serde_json::json;
use support::{
    broadcast, end_status, http_get, next, server, subscribe, subscriber_id, subscription,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

fn with_app<T>(message: T, app: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("ipc-app", app.parse().unwrap());
    request
}

/// Broadcasts a marker and reads until it arrives, returning what came before it.
/// Proves that nothing else is pending on the stream.
async fn drain_until_marker(
    client: &mut IpcClient<Channel>,
    stream: &mut Streaming<Msg>,
    channel: &str,
) -> Vec<Msg> {
    client
        .broadcast(broadcast(channel, "test:marker", json!(null)))
        .await
        .unwrap();
    let mut before = Vec::new();
    loop {
        let msg = next(stream).await;
        if msg.op == "test:marker" {
            return before;
        }
        before.push(msg);
    }
}

#[tokio::test]
async fn stream_opens_with_subscribed_and_every_message_has_a_cursor() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            id: "w1".into(),
            role: "worker".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let hello = next(&mut stream).await;
    assert_eq!(hello.op, "ipc:subscribed");
    let data = from_optional(hello.data.as_ref());
    assert_eq!(data["id"], "w1");
    assert!(data["node"].as_str().is_some_and(|n| !n.is_empty()));

    let ack = client
        .broadcast(broadcast(":worker", "worker:restart", json!({"n": 1})))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.channel, "shop:worker");
    let msg = next(&mut stream).await;
    assert_eq!(
        (msg.op.as_str(), msg.channel.as_str()),
        ("worker:restart", "shop:worker")
    );
    assert_eq!(msg.cursor, ack.cursor);
    assert_eq!(msg.id, ack.id);
    assert_eq!(from_optional(msg.data.as_ref()), json!({"n": 1}));
    assert!(msg.ts_ms > 0);
}

#[tokio::test]
async fn patterns_match_one_segment_or_the_rest() {
    let server = server(&[]);
    let mut client = server.client().await;
    let (mut star, _) = subscribe(&mut client, subscription(&["shop:*"])).await;
    let (mut tail, _) = subscribe(&mut client, subscription(&["shop:>"])).await;
    let (mut exact, _) = subscribe(&mut client, subscription(&["shop:worker:blue"])).await;

    for channel in ["shop:worker", "shop:worker:blue", "other:worker"] {
        client
            .broadcast(broadcast(channel, "test:op", json!(channel)))
            .await
            .unwrap();
    }
    let seen = |msgs: Vec<Msg>| msgs.into_iter().map(|m| m.channel).collect::<Vec<_>>();
    assert_eq!(
        seen(drain_until_marker(&mut client, &mut star, "shop:marker").await),
        ["shop:worker"]
    );
    assert_eq!(
        seen(drain_until_marker(&mut client, &mut tail, "shop:marker").await),
        ["shop:worker", "shop:worker:blue"]
    );
    assert_eq!(
        seen(drain_until_marker(&mut client, &mut exact, "shop:worker:blue").await),
        ["shop:worker:blue"]
    );
}

#[tokio::test]
async fn colon_prefix_uses_ipc_app_metadata_else_the_server_default() {
    let server = server(&["--app", "default-app"]);
    let mut client = server.client().await;
    let ack = client
        .broadcast(with_app(broadcast(":worker", "x", json!(null)), "shop"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.channel, "shop:worker");
    let ack = client
        .broadcast(broadcast(":worker", "x", json!(null)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.channel, "default-app:worker");

    // A subscriber's `:` patterns and role channel expand with its app too.
    let (mut stream, _) = subscribe(
        &mut client,
        with_app(
            SubscribeRequest {
                channels: vec![":jobs:>".into()],
                ..Default::default()
            },
            "shop",
        ),
    )
    .await;
    client
        .broadcast(broadcast("shop:jobs:daily", "run", json!(null)))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.channel, "shop:jobs:daily");
}

#[tokio::test]
async fn role_and_tag_channels_and_the_own_id_are_subscribed_automatically() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let (mut blue, hello) = subscribe(
        &mut client,
        SubscribeRequest {
            role: "worker".into(),
            tag: "blue".into(),
            ..Default::default()
        },
    )
    .await;
    let id = subscriber_id(&hello);
    let (mut green, _) = subscribe(
        &mut client,
        SubscribeRequest {
            role: "worker".into(),
            tag: "green".into(),
            ..Default::default()
        },
    )
    .await;
    client
        .broadcast(broadcast(":worker", "all", json!(null)))
        .await
        .unwrap();
    client
        .broadcast(broadcast(":worker:blue", "blue-only", json!(null)))
        .await
        .unwrap();
    client
        .broadcast(broadcast(&id, "just-me", json!(null)))
        .await
        .unwrap();
    let ops = |msgs: Vec<Msg>| msgs.into_iter().map(|m| m.op).collect::<Vec<_>>();
    assert_eq!(
        ops(drain_until_marker(&mut client, &mut blue, "shop:worker").await),
        ["all", "blue-only", "just-me"]
    );
    assert_eq!(
        ops(drain_until_marker(&mut client, &mut green, "shop:worker").await),
        ["all"]
    );

    let members = client
        .members(MembersRequest {
            role: "worker".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(members.len(), 2);
    let me = members
        .iter()
        .find(|m| m.id == id)
        .expect("subscriber listed");
    assert_eq!(
        (me.app.as_str(), me.role.as_str(), me.tag.as_str()),
        ("shop", "worker", "blue")
    );
    assert!(me.channels.contains(&"shop:worker:blue".to_string()));
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_messages_in_order() {
    let server = server(&[]);
    let mut client = server.client().await;
    let (mut stream, hello) = subscribe(&mut client, subscription(&["orders"])).await;
    let id = subscriber_id(&hello);
    client
        .broadcast(broadcast("orders", "o", json!(1)))
        .await
        .unwrap();
    let last_seen = next(&mut stream).await;
    drop(stream);

    for n in 2..=4 {
        client
            .broadcast(broadcast("orders", "o", json!(n)))
            .await
            .unwrap();
        client
            .broadcast(broadcast("other", "noise", json!(n)))
            .await
            .unwrap();
    }
    let resumed = SubscribeRequest {
        channels: vec!["orders".into()],
        id,
        cursor: last_seen.cursor,
        ..Default::default()
    };
    let (mut stream, _) = subscribe(&mut client, resumed).await;
    let missed = drain_until_marker(&mut client, &mut stream, "orders").await;
    let values: Vec<_> = missed
        .iter()
        .map(|m| from_optional(m.data.as_ref()))
        .collect();
    assert_eq!(values, [json!(2), json!(3), json!(4)]);
}

#[tokio::test]
async fn a_cursor_beyond_retention_is_reported_as_a_gap() {
    let server = server(&["--retention", "3"]);
    let mut client = server.client().await;
    let first = client
        .broadcast(broadcast("ch", "o", json!(0)))
        .await
        .unwrap()
        .into_inner();
    for n in 1..=5 {
        client
            .broadcast(broadcast("ch", "o", json!(n)))
            .await
            .unwrap();
    }
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeRequest {
            channels: vec!["ch".into()],
            cursor: first.cursor,
            ..Default::default()
        },
    )
    .await;
    let gap = next(&mut stream).await;
    assert_eq!(gap.op, "ipc:gap");
    // Then what is still retained, oldest first.
    let values: Vec<_> = drain_until_marker(&mut client, &mut stream, "ch")
        .await
        .iter()
        .map(|m| from_optional(m.data.as_ref()))
        .collect();
    assert_eq!(values, [json!(3), json!(4), json!(5)]);
}

#[tokio::test]
async fn a_cursor_from_an_earlier_run_is_reported_as_a_gap() {
    let mut first = server(&[]);
    let cursor = first
        .client()
        .await
        .broadcast(broadcast("ch", "o", json!(0)))
        .await
        .unwrap()
        .into_inner()
        .cursor;
    first.kill();
    let second = server(&[]);
    let mut client = second.client().await;
    let (mut stream, _) = subscribe(
        &mut client,
        SubscribeRequest {
            channels: vec!["ch".into()],
            cursor,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next(&mut stream).await.op, "ipc:gap");
}

#[tokio::test]
async fn a_slow_subscriber_is_cut_off_while_a_fast_one_keeps_receiving() {
    let server = server(&["--subscriber-queue", "8"]);
    let mut client = server.client().await;
    let (mut slow, _) = subscribe(&mut client, subscription(&["firehose"])).await;
    let (mut fast, _) = subscribe(&mut server.client().await, subscription(&["firehose"])).await;
    let total = 3000;
    let payload = "x".repeat(1024);
    let publisher = {
        let mut client = client.clone();
        tokio::spawn(async move {
            for n in 0..total {
                client
                    .broadcast(broadcast(
                        "firehose",
                        "tick",
                        json!({"n": n, "pad": payload}),
                    ))
                    .await
                    .unwrap();
            }
        })
    };
    // The fast subscriber reads everything, in order, while the slow one reads nothing.
    for n in 0..total {
        let msg = next(&mut fast).await;
        assert_eq!(from_optional(msg.data.as_ref())["n"], json!(n));
    }
    publisher.await.unwrap();
    let status = end_status(&mut slow).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("cursor"), "{status:?}");
}

#[tokio::test]
async fn send_msg_reaches_exactly_one_subscriber_and_returns_its_reply() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let (mut a, _) = subscribe(
        &mut client,
        SubscribeRequest {
            role: "worker".into(),
            ..Default::default()
        },
    )
    .await;
    let (mut b, _) = subscribe(
        &mut client,
        SubscribeRequest {
            role: "worker".into(),
            ..Default::default()
        },
    )
    .await;

    let mut caller = client.clone();
    let call = tokio::spawn(async move {
        caller
            .send_msg(SendMsgRequest {
                target: ":worker".into(),
                op: "config:get".into(),
                timeout_ms: 5000,
                ..Default::default()
            })
            .await
    });
    // Whichever of the two got it answers; the other must not have received it.
    let request = tokio::select! {
        m = next(&mut a) => m,
        m = next(&mut b) => m,
    };
    assert_eq!(request.op, "config:get");
    assert!(!request.reply_to.is_empty());
    client
        .reply(ReplyRequest {
            reply_to: request.reply_to.clone(),
            op: "config".into(),
            data: Some(to_value(&json!({"v": 7}))),
            ..Default::default()
        })
        .await
        .unwrap();
    let reply = call.await.unwrap().unwrap().into_inner().reply.unwrap();
    assert_eq!(from_optional(reply.data.as_ref()), json!({"v": 7}));
    assert!(
        drain_until_marker(&mut client, &mut a, "shop:worker")
            .await
            .is_empty()
    );
    assert!(
        drain_until_marker(&mut client, &mut b, "shop:worker")
            .await
            .is_empty()
    );

    // A second answer to the same request is late.
    let late = client
        .reply(ReplyRequest {
            reply_to: request.reply_to,
            op: "again".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::NotFound);
}

#[tokio::test]
async fn a_reply_with_error_comes_back_as_a_reply() {
    let server = server(&[]);
    let mut client = server.client().await;
    let (mut worker, hello) = subscribe(&mut client, subscription(&[])).await;
    let id = subscriber_id(&hello);
    let mut caller = client.clone();
    let call = tokio::spawn(async move {
        caller
            .send_msg(SendMsgRequest {
                target: id,
                op: "job".into(),
                ..Default::default()
            })
            .await
    });
    let request = next(&mut worker).await;
    client
        .reply(ReplyRequest {
            reply_to: request.reply_to,
            error: "disk full".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let reply = call.await.unwrap().unwrap().into_inner().reply.unwrap();
    assert_eq!(reply.error, "disk full");
}

#[tokio::test]
async fn no_subscriber_means_unavailable_at_once() {
    let server = server(&[]);
    let mut client = server.client().await;
    let mut request = Request::new(SendMsgRequest {
        target: "nobody:home".into(),
        op: "x".into(),
        timeout_ms: 60_000,
        ..Default::default()
    });
    // If the server waited for the timeout instead, this deadline would fire first with a different message.
    request.set_timeout(Duration::from_secs(20));
    let status = client.send_msg(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("no responders"), "{status:?}");
}

#[tokio::test]
async fn send_msg_waits_for_the_smaller_of_timeout_ms_and_the_grpc_deadline() {
    let server = server(&[]);
    let mut client = server.client().await;
    let (mut worker, hello) = subscribe(&mut client, subscription(&[])).await;
    let id = subscriber_id(&hello);

    // timeout_ms is the smaller: the server itself reports the timeout (the gRPC
    // deadline is far away, so the status must come from the server).
    let mut request = Request::new(SendMsgRequest {
        target: id.clone(),
        op: "slow".into(),
        timeout_ms: 200,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(30));
    let status = client.send_msg(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert!(status.message().contains("no reply"), "{status:?}");
    let first = next(&mut worker).await;

    // The gRPC deadline is the smaller: the server stops waiting then, so a reply
    // after it is late.
    let mut request = Request::new(SendMsgRequest {
        target: id,
        op: "slow".into(),
        timeout_ms: 60_000,
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(1000));
    let status = client.send_msg(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    let second = next(&mut worker).await;
    for request in [first, second] {
        // The server forgot both requests when their deadlines passed.
        let status = poll_until_not_found(&mut client, &request.reply_to).await;
        assert_eq!(status.code(), Code::NotFound);
    }
}

/// Replies until the server reports the request unknown; bounded.
async fn poll_until_not_found(client: &mut IpcClient<Channel>, reply_to: &str) -> tonic::Status {
    for _ in 0..100 {
        match client
            .reply(ReplyRequest {
                reply_to: reply_to.into(),
                op: "late".into(),
                ..Default::default()
            })
            .await
        {
            Err(status) => return status,
            // Accepted means the server was still waiting: a timing window on a busy machine.
            Ok(_) => tokio::task::yield_now().await,
        }
    }
    panic!("reply to {reply_to} never reported late");
}

#[tokio::test]
async fn unknown_and_empty_reply_to_are_refused() {
    let server = server(&[]);
    let mut client = server.client().await;
    let status = client
        .reply(ReplyRequest {
            reply_to: "someone#42".into(),
            op: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client
        .reply(ReplyRequest {
            reply_to: "garbage".into(),
            op: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = client.reply(ReplyRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn the_node_answers_ping_and_members_itself() {
    let server = server(&["--node", "node-a", "--app", "shop"]);
    let mut client = server.client().await;
    let (_stream, hello) = subscribe(
        &mut client,
        SubscribeRequest {
            role: "web".into(),
            ..Default::default()
        },
    )
    .await;
    let id = subscriber_id(&hello);
    let pong = client
        .send_msg(SendMsgRequest {
            op: "ping".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(pong.op, "pong");
    assert_eq!(from_optional(pong.data.as_ref())["node"], "node-a");
    let members = client
        .send_msg(SendMsgRequest {
            op: "members".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(from_optional(members.data.as_ref())[0]["id"], json!(id));
    let unknown = client
        .send_msg(SendMsgRequest {
            op: "reboot".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_other_clients_are_unaffected() {
    let server = server(&["--max-msg-bytes", "4096"]);
    let mut client = server.client().await;
    let (mut bystander, _) = subscribe(&mut client, subscription(&["calm"])).await;

    let cases: Vec<(&str, BroadcastRequest, Code, &str)> = vec![
        (
            "empty op",
            broadcast("a", "", json!(null)),
            Code::InvalidArgument,
            "op is empty",
        ),
        (
            "bad channel",
            broadcast("a b", "x", json!(null)),
            Code::InvalidArgument,
            "invalid character",
        ),
        (
            "empty segment",
            broadcast("a::b", "x", json!(null)),
            Code::InvalidArgument,
            "empty segment",
        ),
        (
            "pattern",
            broadcast("a:*", "x", json!(null)),
            Code::InvalidArgument,
            "channel name is needed",
        ),
        (
            "tail pattern",
            broadcast("a:>", "x", json!(null)),
            Code::InvalidArgument,
            "channel name is needed",
        ),
        (
            "empty channel",
            broadcast("", "x", json!(null)),
            Code::InvalidArgument,
            "channel is empty",
        ),
        (
            "too long",
            broadcast(&"a".repeat(300), "x", json!(null)),
            Code::InvalidArgument,
            "longer than",
        ),
        (
            "oversized",
            broadcast("a", "x", json!("y".repeat(10_000))),
            Code::ResourceExhausted,
            "limit",
        ),
    ];
    for (what, request, code, text) in cases {
        let status = client.broadcast(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(text), "{what}: {status:?}");
    }
    let bad_subscriptions = [
        (
            "malformed cursor",
            SubscribeRequest {
                cursor: "not-a-cursor".into(),
                ..Default::default()
            },
            "malformed cursor",
        ),
        ("bad pattern", subscription(&["a:>:b"]), "must come last"),
        (
            "tag without role",
            SubscribeRequest {
                tag: "blue".into(),
                ..Default::default()
            },
            "without a role",
        ),
        (
            "pattern as id",
            SubscribeRequest {
                id: "a:*".into(),
                ..Default::default()
            },
            "subscriber id",
        ),
    ];
    for (what, request, text) in bad_subscriptions {
        let status = client.subscribe(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains(text), "{what}: {status:?}");
    }
    let status = client
        .send_msg(SendMsgRequest {
            target: "a:*".into(),
            op: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // The bystander still receives, and nothing stray reached it.
    let ack = client
        .broadcast(broadcast("calm", "still-here", json!(null)))
        .await
        .unwrap()
        .into_inner();
    let msg = next(&mut bystander).await;
    assert_eq!(
        (msg.op.as_str(), msg.cursor.as_str()),
        ("still-here", ack.cursor.as_str())
    );
}

// Multi-threaded so that the client reads the final status promptly, before the
// exiting server's socket closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_with_unavailable_and_exits_cleanly() {
    let mut server = server(&["--grace-ms", "2000"]);
    let mut client = server.client().await;
    let (mut stream, _) = subscribe(&mut client, subscription(&["x"])).await;
    server.send_sigterm();
    let status = end_status(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop((stream, client));
    let exit = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
}

#[tokio::test]
async fn metrics_count_accepted_and_delivered_messages() {
    let server = server(&[]);
    let mut client = server.client().await;
    let (mut stream, _) = subscribe(&mut client, subscription(&["m"])).await;
    for _ in 0..3 {
        client
            .broadcast(broadcast("m", "x", json!(null)))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        next(&mut stream).await;
    }
    let _ = client
        .send_msg(SendMsgRequest {
            target: "nobody".into(),
            op: "x".into(),
            ..Default::default()
        })
        .await;
    let (_, text) = http_get(server.metrics, "/metrics").await;
    assert!(text.contains("ipc_messages_accepted_total 3"), "{text}");
    assert!(text.contains("ipc_messages_delivered_total 3"), "{text}");
    assert!(text.contains("ipc_subscribers 1"), "{text}");
    assert!(
        text.contains("ipc_sendmsg_total{outcome=\"no_responders\"} 1"),
        "{text}"
    );
}
