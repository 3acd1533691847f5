//! Bulk publishing (`Client::publish`, `ipcctl publish`) and idempotency keys
//! (`Broadcast::key`, `ipcctl broadcast --key`) against a real server.

mod common;

use std::process::Stdio;

use common::server;
use futures::StreamExt;
use ipc_client::{Client, Error, OP_SUBSCRIBED, Publication, SubscribeOptions};
use ipc_testkit::{PATIENCE, next};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

async fn ipcctl_with_stdin(addr: &str, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipcctl"))
        .env("IPC_ADDR", addr)
        .env("IPC_APP", "shop")
        .env_remove("IPC_TOKEN")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running ipcctl");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("ipcctl finished")
        .unwrap()
}

fn lines(output: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test]
async fn client_publish_answers_each_message_in_order() {
    let server = server();
    let client = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .unwrap();
    let mut reader = client.subscribe(SubscribeOptions::new().channel(":metrics"));
    assert_eq!(next(&mut reader).await.op, OP_SUBSCRIBED);
    let mut messages: Vec<_> = (0..50)
        .map(|n| Publication::new(":metrics", "tick", json!(n)))
        .collect();
    messages[10].op.clear();
    let answers: Vec<_> = client
        .publish(futures::stream::iter(messages))
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(answers.len(), 50);
    assert!(matches!(&answers[10], Err(Error::InvalidArgument(m)) if m.contains("op")));
    for (n, answer) in answers.iter().enumerate().filter(|(n, _)| *n != 10) {
        let stored = answer.as_ref().unwrap();
        let msg = next(&mut reader).await;
        assert_eq!((&msg.id, msg.data.clone()), (&stored.id, json!(n)));
    }
}

#[tokio::test]
async fn a_broadcast_key_is_stored_once() {
    let server = server();
    let client = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .unwrap();
    let first = client
        .broadcast(":jobs", "job:run", json!(1))
        .key("nightly-1")
        .await
        .unwrap();
    let again = client
        .broadcast(":jobs", "job:run", json!(2))
        .key("nightly-1")
        .await
        .unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert_eq!((&again.id, &again.cursor), (&first.id, &first.cursor));
    // Without a key of its own a broadcast gets a fresh one: never a duplicate.
    let a = client.broadcast(":jobs", "x", json!(null)).await.unwrap();
    let b = client.broadcast(":jobs", "x", json!(null)).await.unwrap();
    assert!(!a.duplicate && !b.duplicate && a.id != b.id);

    let args = ["broadcast", ":jobs", "job:run", "--key", "nightly-1"];
    let output = ipcctl_with_stdin(&server.url(), &args, "").await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let printed = &lines(&output)[0];
    assert_eq!(printed["duplicate"], true);
    assert_eq!(printed["id"], json!(first.id));
}

#[tokio::test]
async fn ipcctl_publish_prints_one_answer_a_line_and_exits_with_the_first_refusal() {
    let server = server();
    let client = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .unwrap();
    let mut reader = client.subscribe(SubscribeOptions::new().channel(":jobs"));
    assert_eq!(next(&mut reader).await.op, OP_SUBSCRIBED);

    let stdin = [
        r#"{"data": 1}"#,
        r#"{"data": 2, "key": "k"}"#,
        r#"{"data": 3, "key": "k"}"#,
        r#"{"channel": "bad channel!", "data": 4}"#,
        "",
        r#"{"op": "other", "data": 5}"#,
    ]
    .join("\n");
    let args = ["publish", "--channel", ":jobs", "--op", "job:run"];
    let output = ipcctl_with_stdin(&server.url(), &args, &stdin).await;
    let answers = lines(&output);
    assert_eq!(answers.len(), 5, "{output:?}");
    assert!(answers[0]["cursor"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(answers[2]["duplicate"], true);
    assert_eq!(answers[2]["id"], answers[1]["id"]);
    assert_eq!(answers[3]["code"], "INVALID_ARGUMENT");
    assert_eq!(output.status.code(), Some(2), "INVALID_ARGUMENT exits 2");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("1 message(s) refused"), "{stderr}");
    let seen: Vec<Value> = [
        next(&mut reader).await,
        next(&mut reader).await,
        next(&mut reader).await,
    ]
    .into_iter()
    .map(|m| m.data)
    .collect();
    assert_eq!(seen, [json!(1), json!(2), json!(5)]);

    // A line that is not a message stops the input there.
    let output = ipcctl_with_stdin(&server.url(), &args, "{\"data\": 6}\nnot json\n{}").await;
    assert_eq!(lines(&output).len(), 1);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("stdin line 2"));
}

/// The case the automatic key is for: the node stores a broadcast, its answer is
/// lost with the connection (UNAVAILABLE), the client retries — under the same key,
/// so the retry is answered as a duplicate and the message is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_retried_after_its_answer_was_lost_is_delivered_once() {
    let server = server();
    let proxy = ipc_testkit::proxy::HoldingProxy::start(server.grpc).await;
    let direct = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .unwrap();
    let mut jobs = direct.subscribe(SubscribeOptions::new().channel(":jobs"));
    assert_eq!(next(&mut jobs).await.op, OP_SUBSCRIBED);
    let through_proxy = Client::builder(format!("http://{}", proxy.addr))
        .app("shop")
        .timeout(std::time::Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    // The connection is up before answers are held.
    through_proxy
        .broadcast(":warmup", "x", json!(null))
        .await
        .unwrap();

    proxy.hold_answers(true);
    let sending = tokio::spawn(async move {
        through_proxy
            .broadcast(":jobs", "job:run", json!("once"))
            .await
    });
    let stored = next(&mut jobs).await;
    assert_eq!(stored.data, json!("once"));
    proxy.cut();
    proxy.hold_answers(false);

    let answer = tokio::time::timeout(PATIENCE, sending)
        .await
        .expect("the retry is answered")
        .expect("the broadcasting task")
        .expect("acknowledged after the retry");
    assert!(
        answer.duplicate,
        "the retry carried the first attempt's key"
    );
    assert_eq!((&answer.id, &answer.cursor), (&stored.id, &stored.cursor));
    direct
        .broadcast(":jobs", "marker", json!(null))
        .await
        .unwrap();
    assert_eq!(
        next(&mut jobs).await.op,
        "marker",
        "the broadcast was delivered twice"
    );
}
