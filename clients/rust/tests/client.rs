//! The library against a real `ipc-server`: what an application using `ipc-client`
//! sees.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{calls, server, server_on};
use ipc_client::{Client, Error, Handlers, MembersFilter, OP_GAP, OP_SUBSCRIBED, SubscribeOptions};
use ipc_testkit::redis::free_port;
use ipc_testkit::{PATIENCE, ServerProcess, next, until};
use serde_json::json;
use tokio::sync::Notify;

async fn connect(server: &ServerProcess, app: &str) -> Client {
    Client::builder(server.url())
        .app(app)
        .connect()
        .await
        .expect("connecting to the test server")
}

#[tokio::test]
async fn a_broadcast_reaches_the_role_channel_with_data_and_headers() {
    let server = server();
    let client = connect(&server, "shop").await;
    let mut worker = client.subscribe(SubscribeOptions::new().role("worker"));
    let subscribed = next(&mut worker).await;
    assert_eq!(subscribed.op, OP_SUBSCRIBED);
    assert!(subscribed.data["id"].is_string(), "{subscribed:?}");

    let receipt = client
        .broadcast(":worker", "worker:restart", json!({"grace": 5}))
        .header("by", "test")
        .await
        .expect("broadcast");
    assert_eq!(receipt.channel, "shop:worker");

    let msg = next(&mut worker).await;
    assert_eq!(msg.op, "worker:restart");
    assert_eq!(msg.data, json!({"grace": 5}));
    assert_eq!(msg.channel, "shop:worker");
    assert_eq!(msg.headers.get("by").map(String::as_str), Some("test"));
    assert_eq!(msg.id, receipt.id);
    assert_eq!(msg.cursor, receipt.cursor);
    assert!(!msg.is_request());
}

/// Registers `handlers` as a worker of app `shop` and returns once it is subscribed.
async fn run_worker(client: &Client, mut handlers: Handlers) -> tokio::task::JoinHandle<()> {
    let live = Arc::new(Notify::new());
    let signal = Arc::clone(&live);
    handlers.on(OP_SUBSCRIBED, move |_| {
        let signal = Arc::clone(&signal);
        async move {
            signal.notify_one();
            Ok(json!(null))
        }
    });
    let client = client.clone();
    let task = tokio::spawn(async move {
        let options = SubscribeOptions::new().role("worker").label("zone", "eu");
        handlers
            .run(&client, options)
            .await
            .expect("handlers stopped");
    });
    tokio::time::timeout(PATIENCE, live.notified())
        .await
        .expect("worker subscribed");
    task
}

fn config_handlers() -> Handlers {
    let mut handlers = Handlers::new();
    handlers.on("config:get", |msg| async move {
        match msg.data["key"].as_str() {
            Some("db") => Ok(json!("postgres://db")),
            other => Err(format!("unknown key {other:?}")),
        }
    });
    handlers
}

#[tokio::test]
async fn a_request_is_answered_by_the_handler_registered_for_its_op() {
    let server = server();
    let client = connect(&server, "shop").await;
    let worker = run_worker(&client, config_handlers()).await;

    let reply = client
        .send_msg(":worker", "config:get", json!({"key": "db"}), None)
        .await
        .expect("config:get answered");
    assert_eq!(reply.data, json!("postgres://db"));
    assert_eq!(reply.op, "config:get");
    assert!(reply.error.is_empty());

    // A handler's Err comes back as a reply carrying `error`.
    let err = client
        .send_msg(":worker", "config:get", json!({"key": "nope"}), None)
        .await
        .expect_err("unknown key");
    let Error::ReplyError(reply) = err else {
        panic!("expected a reply error, got {err}");
    };
    assert_eq!(reply.error, "unknown key Some(\"nope\")");

    // An op nobody handles is answered at once instead of timing out.
    let err = client
        .send_msg(":worker", "cache:flush", json!(null), Some(PATIENCE))
        .await
        .expect_err("no handler");
    assert!(
        matches!(&err, Error::ReplyError(reply) if reply.error.contains("no handler for op \"cache:flush\"")),
        "{err}"
    );
    // The answers travelled back on the worker's Serve stream, not as Reply calls.
    assert_eq!(
        calls(&server, "Reply").await,
        0,
        "answers sent as unary Reply calls"
    );
    assert_eq!(calls(&server, "Serve").await, 1);
    assert_eq!(calls(&server, "SendMsg").await, 3);
    worker.abort();
}

#[tokio::test]
async fn members_lists_subscribers_with_their_role_and_labels() {
    let server = server();
    let client = connect(&server, "shop").await;
    let worker = run_worker(&client, Handlers::new()).await;

    let members = client
        .members(MembersFilter::all().app("shop").role("worker"))
        .await
        .expect("members");
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].role, "worker");
    assert_eq!(members[0].app, "shop");
    assert_eq!(
        members[0].labels.get("zone").map(String::as_str),
        Some("eu")
    );
    assert!(members[0].channels.contains(&"shop:worker".to_owned()));

    let none = client
        .members(MembersFilter::all().role("web"))
        .await
        .expect("members");
    assert!(none.is_empty(), "{none:?}");
    worker.abort();
}

#[tokio::test]
async fn no_responders_and_deadline_exceeded_are_distinct_errors() {
    let server = server();
    let client = connect(&server, "shop").await;

    let err = client
        .send_msg("nobody", "config:get", json!(null), Some(PATIENCE))
        .await
        .expect_err("nobody subscribed");
    assert!(
        matches!(&err, Error::NoResponders { target } if target == "nobody"),
        "{err}"
    );

    // Subscribed, but never answers.
    let mut silent = client.subscribe(SubscribeOptions::new().id("silent"));
    assert_eq!(next(&mut silent).await.op, OP_SUBSCRIBED);
    let err = client
        .send_msg(
            "silent",
            "config:get",
            json!(null),
            Some(Duration::from_millis(200)),
        )
        .await
        .expect_err("nobody answers");
    assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
    // The silent subscriber did receive the request, with a reply_to.
    let request = next(&mut silent).await;
    assert!(request.is_request(), "{request:?}");
    assert_eq!(request.op, "config:get");
}

#[tokio::test]
async fn bad_input_and_built_ins() {
    let server = server();
    let client = connect(&server, "shop").await;

    let err = client
        .broadcast("bad channel!", "op", json!(null))
        .await
        .expect_err("bad channel");
    assert!(
        matches!(&err, Error::InvalidArgument(m) if !m.is_empty()),
        "{err}"
    );

    let pong = client
        .send_msg("", "ping", json!(null), None)
        .await
        .expect("ping");
    assert_eq!(pong.op, "pong");

    let err = client
        .reply("not-a-reply-to", "x", json!(null))
        .await
        .expect_err("unknown reply_to");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

#[tokio::test]
async fn an_unreachable_server_is_reported_as_such() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    let err = Client::connect(&addr).await.expect_err("nothing listens");
    assert!(
        matches!(&err, Error::Unreachable(m) if m.contains(&addr[7..])),
        "{err}"
    );

    // A lazy client fails on its first call instead.
    let client = Client::builder(&addr).connect_lazy().expect("lazy client");
    let err = client
        .broadcast("a:b", "op", json!(null))
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, Error::Unreachable(_)), "{err}");
}

/// Restarts the server on the same port, by SIGTERM or SIGKILL, under a live
/// subscription: the client must come back by itself with the same id, report the
/// lost log as `ipc:gap`, and receive what is broadcast after the restart.
async fn survives_restart(graceful: bool) {
    let mut first = server();
    let port = first.grpc.port();
    let client = connect(&first, "shop").await;
    let mut sub = client.subscribe(SubscribeOptions::new().role("worker"));
    let subscribed = next(&mut sub).await;
    assert_eq!(subscribed.op, OP_SUBSCRIBED);
    let id = subscribed.data["id"].clone();

    client
        .broadcast(":worker", "before", json!(1))
        .await
        .expect("broadcast");
    let before = next(&mut sub).await;
    assert_eq!(before.op, "before");

    if graceful {
        let exit = first.terminate();
        assert!(
            exit.success(),
            "ipc-server exited with {exit} after SIGTERM"
        );
    } else {
        first.kill();
    }
    let _second = server_on(&format!("127.0.0.1:{port}"), &[]);

    // The memory bus lost its log: the subscription resumes with a stale cursor.
    let (skipped, again) = until(&mut sub, |m| m.op == OP_SUBSCRIBED).await;
    assert!(
        skipped.is_empty(),
        "unexpected before reconnecting: {skipped:?}"
    );
    assert_eq!(
        again.data["id"], id,
        "the subscriber id is kept across reconnects"
    );
    let (skipped, gap) = until(&mut sub, |m| m.op == OP_GAP).await;
    assert!(skipped.is_empty(), "unexpected before the gap: {skipped:?}");
    assert_eq!(gap.data["cursor"], json!(before.cursor), "{gap:?}");

    client
        .broadcast(":worker", "after", json!(2))
        .await
        .expect("broadcast after the restart");
    let after = next(&mut sub).await;
    assert_eq!(after.op, "after");
    assert_eq!(after.data, json!(2));

    let members = client
        .members(MembersFilter::all().role("worker"))
        .await
        .expect("members");
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(json!(members[0].id), id);
}

#[tokio::test]
async fn a_subscription_survives_a_graceful_server_restart() {
    survives_restart(true).await;
}

#[tokio::test]
async fn a_subscription_survives_a_killed_server() {
    survives_restart(false).await;
}

#[tokio::test]
async fn a_subscription_resumes_from_its_cursor_without_duplicates() {
    let server = server();
    let client = connect(&server, "shop").await;
    let third = client
        .broadcast("shop:events", "tick", json!(3))
        .await
        .expect("broadcast");
    client
        .broadcast("shop:events", "tick", json!(4))
        .await
        .expect("broadcast");

    // Resuming after message 3 replays 4 (not 3 again), then continues live.
    let mut sub = client.subscribe(
        SubscribeOptions::new()
            .channel(":events")
            .cursor(third.cursor),
    );
    assert_eq!(next(&mut sub).await.op, OP_SUBSCRIBED);
    let replayed = next(&mut sub).await;
    assert_eq!(replayed.data, json!(4));
    client
        .broadcast("shop:events", "tick", json!(5))
        .await
        .expect("broadcast");
    assert_eq!(next(&mut sub).await.data, json!(5));
}

#[tokio::test]
async fn a_bad_channel_ends_the_subscription_with_the_reason() {
    let server = server();
    let client = connect(&server, "shop").await;
    let mut sub = client.subscribe(SubscribeOptions::new().channel("bad channel!"));
    let first = tokio::time::timeout(PATIENCE, futures::StreamExt::next(&mut sub))
        .await
        .expect("an answer");
    assert!(
        matches!(first, Some(Err(Error::InvalidArgument(_)))),
        "{first:?}"
    );
    assert!(futures::StreamExt::next(&mut sub).await.is_none());
}

#[tokio::test]
async fn a_slow_consumer_cut_off_by_the_node_still_gets_every_message() {
    // A tiny per-subscriber queue: not reading makes the node cut the stream.
    let server = server_on("127.0.0.1:0", &["--subscriber-queue", "4"]);
    let client = connect(&server, "shop").await;
    let mut sub = client.subscribe(SubscribeOptions::new().channel(":bulk"));
    assert_eq!(next(&mut sub).await.op, OP_SUBSCRIBED);

    // Enough data to fill the HTTP/2 windows while the subscriber does not read.
    let filler = "x".repeat(100_000);
    let count = 80;
    for n in 0..count {
        client
            .broadcast(":bulk", "chunk", json!({"n": n, "filler": filler}))
            .await
            .expect("broadcast");
    }

    let mut received = Vec::new();
    let mut reconnects = 0;
    while received.len() < count {
        let msg = next(&mut sub).await;
        match msg.op.as_str() {
            "chunk" => received.push(msg.data["n"].as_u64().expect("n")),
            OP_SUBSCRIBED => reconnects += 1,
            other => panic!("unexpected {other}: {msg:?}"),
        }
    }
    assert!(reconnects >= 1, "the node never cut the subscriber off");
    let expected: Vec<u64> = (0..count as u64).collect();
    assert_eq!(received, expected, "every message once, in order");
}
