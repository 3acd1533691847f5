//! `ipcctl lock`, `unlock` and `limit` against a real server: the fence reaches the
//! command, a held lock refuses a second holder with status 8, the command's status
//! is passed through, the lock is released at exit, and a bucket allows then refuses.

mod common;

use std::process::{Output, Stdio};

use common::server;
use ipc_testkit::PATIENCE;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

fn ipcctl_command(addr: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ipcctl"));
    command
        .env("IPC_ADDR", addr)
        .env_remove("IPC_APP")
        .env_remove("IPC_TOKEN")
        .env_remove("IPC_LOCK_FENCE")
        .args(args)
        .kill_on_drop(true);
    command
}

async fn ipcctl(addr: &str, args: &[&str]) -> Output {
    let run = ipcctl_command(addr, args).stdin(Stdio::null()).output();
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("ipcctl finished")
        .expect("running ipcctl")
}

fn fence_of(output: &Output) -> u64 {
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("no fence printed ({e}): {output:?}"))
}

#[tokio::test]
async fn lock_runs_the_command_with_a_fence_and_refuses_a_second_holder() {
    let server = server();
    let addr = server.url();

    let first = ipcctl(
        &addr,
        &["lock", "app:job", "--", "sh", "-c", "echo $IPC_LOCK_FENCE"],
    )
    .await;
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let first_fence = fence_of(&first);
    assert!(first_fence > 0);

    // A holder that keeps the lock until we write a line to its standard input.
    let mut holder = ipcctl_command(
        &addr,
        &[
            "lock",
            "app:job",
            "--ttl",
            "3s",
            "--",
            "sh",
            "-c",
            "echo $IPC_LOCK_FENCE; read line; exit 0",
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .expect("starting the holder");
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the holder printed its fence")
        .unwrap()
        .expect("a line");
    let held_fence: u64 = line.trim().parse().expect("a fence");
    assert!(
        held_fence > first_fence,
        "fences grow: {held_fence} after {first_fence}"
    );

    let second = ipcctl(&addr, &["lock", "app:job", "--", "sh", "-c", "echo ran"]).await;
    assert_eq!(second.status.code(), Some(8), "{second:?}");
    assert!(
        second.stdout.is_empty(),
        "the command must not run: {second:?}"
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("not acquired"), "{stderr}");

    // Unlock with a wrong fence releases nothing.
    let wrong = ipcctl(
        &addr,
        &["unlock", "app:job", &(held_fence + 1000).to_string()],
    )
    .await;
    assert_eq!(wrong.status.code(), Some(8), "{wrong:?}");
    let answer: Value = serde_json::from_slice(&wrong.stdout).unwrap();
    assert_eq!(answer["released"], false);

    // A waiter gets the lock once the holder's command ends and ipcctl unlocks.
    let waiter = ipcctl_command(
        &addr,
        &[
            "lock",
            "app:job",
            "--wait",
            "20s",
            "--",
            "sh",
            "-c",
            "echo $IPC_LOCK_FENCE",
        ],
    )
    .stdin(Stdio::null())
    .output();
    let waiter = tokio::spawn(waiter);
    let mut stdin = holder.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    let status = tokio::time::timeout(PATIENCE, holder.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let waited = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(waited.status.code(), Some(0), "{waited:?}");
    assert!(fence_of(&waited) > held_fence);
}

#[tokio::test]
async fn lock_passes_the_commands_status_through_and_releases() {
    let server = server();
    let addr = server.url();

    let failed = ipcctl(&addr, &["lock", "app:fails", "--", "sh", "-c", "exit 3"]).await;
    assert_eq!(failed.status.code(), Some(3), "{failed:?}");
    // Released at exit: taken again at once without waiting.
    let again = ipcctl(&addr, &["lock", "app:fails", "--", "true"]).await;
    assert_eq!(again.status.code(), Some(0), "{again:?}");

    let missing = ipcctl(&addr, &["lock", "app:fails", "--", "/nonexistent/cmd"]).await;
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    let after = ipcctl(&addr, &["lock", "app:fails", "--", "true"]).await;
    assert_eq!(
        after.status.code(),
        Some(0),
        "released after a failed start: {after:?}"
    );

    let bad = ipcctl(&addr, &["lock", "app:fails", "--ttl", "0s", "--", "true"]).await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[tokio::test]
async fn limit_allows_the_burst_then_refuses() {
    let server = server();
    let addr = server.url();
    let args = [
        "limit",
        "app:mail",
        "--rate",
        "1",
        "--interval",
        "1h",
        "--burst",
        "2",
    ];
    for remaining in [1, 0] {
        let allowed = ipcctl(&addr, &args).await;
        assert_eq!(allowed.status.code(), Some(0), "{allowed:?}");
        let answer: Value = serde_json::from_slice(&allowed.stdout).unwrap();
        assert_eq!(answer["allowed"], true);
        assert_eq!(answer["remaining"], remaining);
    }
    let refused = ipcctl(&addr, &args).await;
    assert_eq!(refused.status.code(), Some(8), "{refused:?}");
    let answer: Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(answer["allowed"], false);
    assert!(answer["retry_after_ms"].as_u64().unwrap() > 0, "{answer}");
}

#[tokio::test]
async fn a_terminated_ipcctl_passes_the_signal_on_and_releases() {
    let server = server();
    let addr = server.url();
    let mut holder = ipcctl_command(
        &addr,
        &[
            "lock",
            "app:term",
            "--",
            "sh",
            "-c",
            "echo $IPC_LOCK_FENCE; read line",
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .expect("starting the holder");
    let mut lines = BufReader::new(holder.stdout.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the holder printed its fence")
        .unwrap()
        .expect("a line");

    // Held open until the holder has ended: `Child::wait` closes a stdin it still owns,
    // and the `read` would then end on EOF (exit 1) before the forwarded signal lands.
    let _stdin = holder.stdin.take();
    let pid = nix::unistd::Pid::from_raw(holder.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, holder.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "the command's death by SIGTERM: {status:?}"
    );

    // Released at once, not at the end of the 30 s lease.
    let after = ipcctl(&addr, &["lock", "app:term", "--", "true"]).await;
    assert_eq!(after.status.code(), Some(0), "{after:?}");
}
