//! The `worker` example as a user runs it: a process that subscribes as role
//! `worker`, answers `config:get` and restarts on `worker:restart` (subscribing again
//! under its id), driven with `ipcctl` and a Rollout.

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};

use common::server;
use futures::StreamExt;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{RolloutRequest, SendMsgRequest, ledger, outcome};
use ipc_testkit::PATIENCE;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

/// `cargo test` builds the examples next to the test executables' directory.
fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join(name))
        .expect("target directory layout");
    assert!(
        path.is_file(),
        "{} not built: run `cargo test -p ipc-client` (it builds examples)",
        path.display()
    );
    path
}

async fn ipcctl(addr: &str, args: &[&str]) -> Output {
    let run = Command::new(env!("CARGO_BIN_EXE_ipcctl"))
        .args(["--addr", addr, "--app", "shop"])
        .args(args)
        .env_remove("IPC_TOKEN")
        .output();
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("ipcctl finished")
        .expect("running ipcctl")
}

/// The next line the worker prints that starts with `prefix`.
async fn line_starting(lines: &mut Lines<BufReader<ChildStdout>>, prefix: &str) -> String {
    loop {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {prefix:?} line in time"))
            .expect("reading the worker's output")
            .unwrap_or_else(|| panic!("worker exited before printing {prefix:?}"));
        if line.starts_with(prefix) {
            return line;
        }
    }
}

#[tokio::test]
async fn the_worker_example_answers_config_get_and_obeys_restart() {
    let server = server();
    let addr = server.url();
    let mut worker = Command::new(example_binary("worker"))
        .args(["--addr", &addr, "--app", "shop"])
        .env_remove("IPC_ADDR")
        .env_remove("IPC_APP")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the worker example");
    let mut lines = BufReader::new(worker.stdout.take().expect("stdout")).lines();
    let local = line_starting(&mut lines, "worker: local config:get").await;
    assert!(local.ends_with("Some(Ok(Number(16)))"), "{local}");
    let first = line_starting(&mut lines, "worker: subscribed").await;

    let args = [
        "send",
        ":worker",
        "config:get",
        "--data",
        r#"{"key":"db_url"}"#,
    ];
    let output = ipcctl(&addr, &args).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let reply: Value = serde_json::from_slice(&output.stdout).expect("JSON reply");
    assert_eq!(reply["data"], "postgres://db.internal/shop");

    let args = [
        "send",
        ":worker",
        "config:get",
        "--data",
        r#"{"key":"nope"}"#,
    ];
    let output = ipcctl(&addr, &args).await;
    assert_eq!(output.status.code(), Some(5), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("no config key \"nope\""));

    let args = [
        "broadcast",
        ":worker",
        "worker:restart",
        "--data",
        r#"{"grace":3}"#,
    ];
    let output = ipcctl(&addr, &args).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let restart = line_starting(&mut lines, "worker: restart requested").await;
    assert!(restart.ends_with("(grace 3s)"), "{restart}");
    let id = subscribed_id(&first);
    assert_eq!(
        line_starting(&mut lines, "worker: restarting as").await,
        format!("worker: restarting as {id}")
    );
    let again = line_starting(&mut lines, "worker: subscribed").await;
    assert_eq!(subscribed_id(&again), id, "subscribed again under its id");

    worker.kill().await.expect("stopping the worker");
}

/// The id in a `worker: subscribed id="…" node="…"` line.
fn subscribed_id(line: &str) -> String {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("id="))
        .map(|id| id.trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("no id in {line:?}"))
}

#[tokio::test]
async fn a_rollout_restarts_the_worker_and_waits_for_it_to_come_back() {
    let server = server();
    let mut worker = Command::new(example_binary("worker"))
        .args(["--addr", &server.url(), "--app", "shop", "--id", "worker-1"])
        .env_remove("IPC_ADDR")
        .env_remove("IPC_APP")
        .env_remove("IPC_ID")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting the worker example");
    let mut lines = BufReader::new(worker.stdout.take().expect("stdout")).lines();
    line_starting(&mut lines, "worker: subscribed").await;

    let mut rpc = IpcClient::connect(server.url()).await.expect("connecting");
    let request = RolloutRequest {
        target: "shop:worker".into(),
        op: "worker:restart".into(),
        ready_timeout_ms: 10_000,
        ..RolloutRequest::default()
    };
    let mut events = rpc.rollout(request).await.expect("rollout").into_inner();
    let mut last = None;
    while let Some(event) = tokio::time::timeout(PATIENCE, events.next())
        .await
        .expect("rollout event in time")
    {
        last = Some(event.expect("rollout event"));
    }
    let ledger = last
        .and_then(|event| event.ledger)
        .expect("the ledger last");
    assert_eq!(ledger.state, ledger::State::Done as i32, "{ledger:?}");
    assert_eq!(ledger.outcomes.len(), 1);
    assert_eq!(ledger.outcomes[0].status, outcome::Status::Ok as i32);
    assert_eq!(
        line_starting(&mut lines, "worker: restarting as").await,
        "worker: restarting as worker-1"
    );

    // The same operation again (a rerun after its coordinator died sends the same
    // ipc-op-id): answered, no second restart.
    let repeat = SendMsgRequest {
        target: "worker-1".into(),
        op: "worker:restart".into(),
        headers: [("ipc-op-id".to_owned(), ledger.id.clone())].into(),
        timeout_ms: 10_000,
        ..SendMsgRequest::default()
    };
    let reply = rpc.send_msg(repeat).await.expect("send_msg").into_inner();
    let data = reply.reply.and_then(|r| r.data).expect("reply data");
    assert_eq!(
        ipc_proto::json::from_optional(Some(&data))["restarted"],
        Value::Bool(false)
    );
    assert_eq!(
        line_starting(&mut lines, "worker: restart for").await,
        format!("worker: restart for {} already done", ledger.id)
    );

    worker.kill().await.expect("stopping the worker");
}
