//! The `ipcctl` binary against a real server: what it prints and the exit status of
//! every outcome, as a script relies on them.

mod common;

use std::process::{Output, Stdio};
use std::sync::Arc;

use common::{ipcctl, ipcctl_command, server, server_on};
use ipc_client::{Client, Handlers, OP_SUBSCRIBED, SubscribeOptions};
use ipc_testkit::redis::free_port;
use ipc_testkit::{PATIENCE, next};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;
use tokio::sync::Notify;

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {output:?}"))
}

/// Asserts the exit status and that stderr is exactly one line containing `expected`.
fn assert_fails(output: &Output, code: i32, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{output:?}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one stderr line expected: {stderr:?}"
    );
    assert!(stderr.starts_with("ipcctl: "), "{stderr:?}");
    assert!(stderr.contains(expected), "{expected:?} not in {stderr:?}");
}

#[tokio::test]
async fn success_prints_json_and_exits_0() {
    let server = server();
    let addr = server.url();

    let ping = ipcctl(&addr, None, &["send", "", "ping"]).await;
    assert_eq!(ping.status.code(), Some(0), "{ping:?}");
    assert_eq!(stdout_json(&ping)["op"], "pong");
    assert!(ping.stderr.is_empty(), "{ping:?}");

    let args = [
        "broadcast",
        ":worker",
        "worker:restart",
        "--data",
        r#"{"grace":5}"#,
        "--header",
        "by=ops",
    ];
    let sent = ipcctl(&addr, Some("shop"), &args).await;
    assert_eq!(sent.status.code(), Some(0), "{sent:?}");
    let receipt = stdout_json(&sent);
    assert_eq!(receipt["channel"], "shop:worker");
    assert!(
        receipt["cursor"].as_str().is_some_and(|c| !c.is_empty()),
        "{receipt}"
    );
}

#[tokio::test]
async fn bad_input_exits_2() {
    let server = server();
    let addr = server.url();

    // Usage errors are clap's (several lines, with a hint), status 2.
    for args in [
        &["broadcast", "only-channel"][..],
        &["broadcast", "a:b", "op", "--data", "{bad"],
        &["broadcast", "a:b", "op", "--header", "novalue"],
        &["send", "x", "op", "--timeout", "soon"],
        &["subscribe", "--tag", "eu"],
        &["no-such-command"],
    ] {
        let output = ipcctl(&addr, None, args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
    }

    // The server refuses a bad channel: INVALID_ARGUMENT, one line.
    let output = ipcctl(&addr, None, &["broadcast", "bad channel!", "op"]).await;
    assert_fails(&output, 2, "invalid argument: ");

    let output = ipcctl("ftp://example:1", None, &["send", "", "ping"]).await;
    assert_fails(&output, 2, "invalid address \"ftp://example:1\"");
}

#[tokio::test]
async fn no_responders_exits_3() {
    let server = server();
    let output = ipcctl(&server.url(), None, &["send", "nobody", "config:get"]).await;
    assert_fails(&output, 3, "no responders for target \"nobody\"");
    assert!(output.stdout.is_empty(), "{output:?}");
}

#[tokio::test]
async fn deadline_exceeded_exits_4() {
    let server = server();
    let client = Client::connect(server.url()).await.expect("connect");
    // Subscribed, but never answers.
    let mut silent = client.subscribe(SubscribeOptions::new().id("silent"));
    assert_eq!(next(&mut silent).await.op, OP_SUBSCRIBED);

    let args = ["send", "silent", "config:get", "--timeout", "200ms"];
    let output = ipcctl(&server.url(), None, &args).await;
    assert_fails(
        &output,
        4,
        "deadline exceeded: no reply from target \"silent\" within 200ms",
    );
}

#[tokio::test]
async fn a_reply_carrying_error_exits_5_and_is_still_printed() {
    let server = server();
    let client = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .expect("connect");
    let live = Arc::new(Notify::new());
    let signal = Arc::clone(&live);
    let mut handlers = Handlers::new();
    handlers
        .on(OP_SUBSCRIBED, move |_| {
            let signal = Arc::clone(&signal);
            async move {
                signal.notify_one();
                Ok(json!(null))
            }
        })
        .on("config:get", |_| async { Err("disk on fire".to_owned()) });
    let worker_client = client.clone();
    let worker = tokio::spawn(async move {
        let options = SubscribeOptions::new().role("worker");
        handlers
            .run(&worker_client, options)
            .await
            .expect("handlers");
    });
    tokio::time::timeout(PATIENCE, live.notified())
        .await
        .expect("worker subscribed");

    let output = ipcctl(
        &server.url(),
        Some("shop"),
        &["send", ":worker", "config:get"],
    )
    .await;
    assert_fails(&output, 5, "reply carried error: disk on fire");
    assert_eq!(stdout_json(&output)["error"], "disk on fire");
    worker.abort();
}

#[tokio::test]
async fn an_unreachable_server_exits_6() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    let output = ipcctl(&addr, None, &["send", "", "ping"]).await;
    assert_fails(&output, 6, &format!("server unreachable: {addr}"));

    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("absent.sock").display().to_string();
    let output = ipcctl(&socket, None, &["members"]).await;
    assert_fails(&output, 6, "absent.sock");
}

#[tokio::test]
async fn other_failures_exit_1() {
    let server = server();
    // A reply to a request this fleet never issued: NOT_FOUND.
    let output = ipcctl(&server.url(), None, &["reply", "no-such-request", "op"]).await;
    assert_fails(&output, 1, "NOT_FOUND: ");
}

/// Reads ipcctl's JSON lines.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("a line in time")
        .expect("reading ipcctl output")
        .expect("ipcctl still running");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[tokio::test]
async fn subscribe_prints_json_lines_and_keeps_going_across_a_restart() {
    let mut first = server();
    let port = first.grpc.port();
    let mut tail = ipcctl_command(&first.url(), Some("shop"), &["subscribe", ":events"])
        .stdout(Stdio::piped())
        // It warns on stderr when it reconnects; not what this test reads.
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning ipcctl subscribe");
    let mut lines = BufReader::new(tail.stdout.take().expect("stdout")).lines();
    assert_eq!(next_line(&mut lines).await["op"], OP_SUBSCRIBED);

    let client = Client::builder(first.url())
        .app("shop")
        .connect()
        .await
        .expect("connect");
    client
        .broadcast(":events", "deploy:done", json!({"version": 7}))
        .await
        .expect("broadcast");
    let msg = next_line(&mut lines).await;
    assert_eq!(msg["op"], "deploy:done");
    assert_eq!(msg["data"], json!({"version": 7}));
    assert_eq!(msg["channel"], "shop:events");

    first.kill();
    let _second = server_on(&format!("127.0.0.1:{port}"), &[]);
    assert_eq!(next_line(&mut lines).await["op"], OP_SUBSCRIBED);
    assert_eq!(next_line(&mut lines).await["op"], "ipc:gap");
    client
        .broadcast(":events", "deploy:started", json!({"version": 8}))
        .await
        .expect("broadcast after the restart");
    assert_eq!(next_line(&mut lines).await["op"], "deploy:started");

    tail.kill().await.expect("stopping ipcctl subscribe");
}

#[tokio::test]
async fn members_prints_a_table_or_json() {
    let server = server();
    let client = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .expect("connect");
    let options = SubscribeOptions::new()
        .id("w-1")
        .role("worker")
        .label("zone", "eu");
    let mut worker = client.subscribe(options);
    assert_eq!(next(&mut worker).await.op, OP_SUBSCRIBED);
    let mut other_app = Client::builder(server.url())
        .app("blog")
        .connect()
        .await
        .expect("connect")
        .subscribe(SubscribeOptions::new().id("b-1").role("web"));
    assert_eq!(next(&mut other_app).await.op, OP_SUBSCRIBED);

    let output = ipcctl(&server.url(), Some("shop"), &["members", "--json"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let members = stdout_json(&output);
    assert_eq!(
        members.as_array().map(Vec::len),
        Some(1),
        "only app shop: {members}"
    );
    assert_eq!(members[0]["id"], "w-1");
    assert_eq!(members[0]["labels"], json!({"zone": "eu"}));

    let output = ipcctl(&server.url(), Some("shop"), &["members", "--all-apps"]).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let table = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(
        rows[0].starts_with("ID") && rows[0].contains("ROLE"),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r.starts_with("w-1") && r.contains("zone=eu")),
        "{table}"
    );
    assert!(
        rows.iter()
            .any(|r| r.starts_with("b-1") && r.contains("web")),
        "{table}"
    );

    // --channel: who a broadcast on it would reach, watchers of another app included.
    let mut watcher = Client::builder(server.url())
        .app("blog")
        .connect()
        .await
        .expect("connect")
        .subscribe(SubscribeOptions::new().id("b-tail").channel("shop:>"));
    assert_eq!(next(&mut watcher).await.op, OP_SUBSCRIBED);
    let args = ["members", "--channel", ":worker", "--json"];
    let output = ipcctl(&server.url(), Some("shop"), &args).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let mut ids: Vec<String> = stdout_json(&output)
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["b-tail", "w-1"]);
    let args = ["members", "--channel", "shop:>"];
    let output = ipcctl(&server.url(), Some("shop"), &args).await;
    assert_fails(&output, 2, "channel: ");
}

#[tokio::test]
async fn help_documents_exit_codes_and_completions_are_generated() {
    let help = ipcctl("http://127.0.0.1:1", None, &["--help"]).await;
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for line in [
        "3  no responders",
        "4  deadline exceeded",
        "6  server unreachable",
    ] {
        assert!(text.contains(line), "{line:?} missing from --help:\n{text}");
    }

    let bash = ipcctl("http://127.0.0.1:1", None, &["completions", "bash"]).await;
    assert_eq!(bash.status.code(), Some(0), "{bash:?}");
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(
        script.contains("complete") && script.contains("ipcctl"),
        "{script}"
    );
}

/// `ipcctl token new` makes a working token; without it the server refuses (exit 7),
/// and a token is confined to its grants (exit 7 again).
#[tokio::test]
async fn issued_tokens_authenticate_and_refusals_exit_7() {
    let made = ipcctl_command("http://unused", None, &["token", "new", "ops"])
        .output()
        .await
        .unwrap();
    assert_eq!(made.status.code(), Some(0), "{made:?}");
    let stderr = String::from_utf8(made.stderr).unwrap();
    let secret = stderr.rsplit(' ').next().unwrap().trim().to_string();
    let entry = String::from_utf8(made.stdout).unwrap();
    assert!(
        !entry.contains(&secret),
        "the secret must not reach the tokens file"
    );
    // Fill in the grants, as the operator would.
    let entry = entry
        .replace("broadcast = []", r#"broadcast = ["shop:>"]"#)
        .replace("# app = \"shop\"", "app = \"shop\"");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, entry).unwrap();
    let server = server_on("127.0.0.1:0", &["--tokens", tokens.to_str().unwrap()]);
    let addr = server.url();

    let anonymous = ipcctl(&addr, None, &["broadcast", "shop:worker", "x"]).await;
    assert_fails(&anonymous, 7, "");
    let with = |args: &[&str]| {
        let mut all = vec!["--token", secret.as_str()];
        all.extend_from_slice(args);
        all.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = with(&["broadcast", ":worker", "worker:restart"]);
    let granted = ipcctl(
        &addr,
        None,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(granted.status.code(), Some(0), "{granted:?}");
    assert_eq!(stdout_json(&granted)["channel"], "shop:worker");
    let args = with(&["broadcast", "billing:worker", "x"]);
    let denied = ipcctl(
        &addr,
        None,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    assert_fails(&denied, 7, "billing:worker");
}
