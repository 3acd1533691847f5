//! The `worker` example as a user runs it: a process that subscribes as role
//! `worker`, answers `config:get` and obeys `worker:restart`, driven with `ipcctl`.

mod common;

use std::path::PathBuf;
use std::process::{Output, Stdio};

use common::{HANG_GUARD, Server};
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
    tokio::time::timeout(HANG_GUARD, run)
        .await
        .expect("ipcctl finished")
        .expect("running ipcctl")
}

/// The next line the worker prints that starts with `prefix`.
async fn line_starting(lines: &mut Lines<BufReader<ChildStdout>>, prefix: &str) -> String {
    loop {
        let line = tokio::time::timeout(HANG_GUARD, lines.next_line())
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
    let server = Server::start();
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
    line_starting(&mut lines, "worker: subscribed").await;

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
    let restart = line_starting(&mut lines, "worker: restart #1").await;
    assert!(restart.ends_with("(grace 3s)"), "{restart}");

    worker.kill().await.expect("stopping the worker");
}
