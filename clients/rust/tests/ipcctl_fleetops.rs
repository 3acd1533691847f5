//! `ipcctl gather` and `ipcctl rollout` against a real server and workers that
//! answer OK, with an error, or never: what an operator reads, what a script
//! parses, and the exit status of each ending.

mod common;

use std::collections::BTreeMap;
use std::process::Output;

use common::fleet::{Answer, Shared, asked_counts, worker, worker_with};
use common::{ipcctl, server};
use ipc_client::SubscribeOptions;
use ipc_testkit::PATIENCE;
use serde_json::Value;

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every stdout line parsed as JSON (a line that is not fails the test).
fn json_lines(output: &Output) -> Vec<Value> {
    stdout(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

/// The summary table's rows: (member, status).
fn not_ok_rows(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip_while(|line| !(line.starts_with("MEMBER ") && line.contains(" STATUS ")))
        .skip(1)
        .map(|line| {
            let cells: Vec<&str> = line.split_whitespace().collect();
            (cells[0].to_string(), cells[2].to_string())
        })
        .collect()
}

/// A worker of group `group` (a label), so that each scenario selects its own.
async fn grouped(url: &str, id: &str, group: &str, answer: Answer, record: &Shared) {
    let options = SubscribeOptions::new()
        .id(id)
        .role("worker")
        .label("group", group);
    // Detached: it runs until the test (and its runtime) ends.
    drop(worker_with(url, options, "deploy", answer, record.clone()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gather_prints_each_member_names_who_failed_and_exits_by_outcome() {
    let server = server();
    let (url, record) = (server.url(), Shared::default());
    let _ok1 = worker(&url, "ok-1", "status", Answer::Ok, record.clone()).await;
    let _ok2 = worker(&url, "ok-2", "status", Answer::Ok, record.clone()).await;

    let output = ipcctl(&url, Some("shop"), &["gather", ":worker", "status"]).await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    for member in ["ok-1", "ok-2"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("OK") && l.contains(&format!(" {member} "))),
            "no line for {member}:\n{text}"
        );
    }
    assert!(text.contains("every member answered OK"), "{text}");

    let _bad = worker(&url, "bad", "status", Answer::Error, record.clone()).await;
    let _mute = worker(&url, "mute", "status", Answer::Silent, record.clone()).await;
    let args = ["gather", ":worker", "status", "--timeout", "1s"];
    let output = ipcctl(&url, Some("shop"), &args).await;
    assert_exit(&output, 9);
    let text = stdout(&output);
    assert!(
        text.contains("4 member(s): 2 ok, 1 failed, 1 no reply"),
        "{text}"
    );
    assert_eq!(
        not_ok_rows(&text),
        [
            ("bad".to_string(), "FAILED".to_string()),
            ("mute".into(), "NO_REPLY".into())
        ]
    );
    assert!(
        text.contains("replied with error: disk full on bad"),
        "{text}"
    );
    assert!(text.contains("no answer within 1000 ms"), "{text}");

    // --json: a line per member, then the ledger; every line is JSON.
    let args = ["gather", ":worker", "status", "--timeout", "1s", "--json"];
    let output = ipcctl(&url, Some("shop"), &args).await;
    assert_exit(&output, 9);
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 5, "{lines:?}");
    let statuses: BTreeMap<&str, &str> = lines[..4]
        .iter()
        .map(|l| {
            let outcome = &l["outcome"];
            (
                outcome["member"].as_str().unwrap(),
                outcome["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        BTreeMap::from([
            ("bad", "FAILED"),
            ("mute", "NO_REPLY"),
            ("ok-1", "OK"),
            ("ok-2", "OK")
        ])
    );
    let ledger = &lines[4]["ledger"];
    assert_eq!(
        (ledger["state"].as_str(), ledger["expected"].as_u64()),
        (Some("DONE"), Some(4))
    );

    // --dry-run: who would be asked; nobody is.
    let before = asked_counts(&record);
    let output = ipcctl(
        &url,
        Some("shop"),
        &["gather", ":worker", "status", "--dry-run"],
    )
    .await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    assert!(
        text.contains("4 member(s) would be asked; nobody was asked"),
        "{text}"
    );
    for member in ["bad", "mute", "ok-1", "ok-2"] {
        assert!(
            text.lines().any(|l| l.starts_with(member)),
            "{member}:\n{text}"
        );
    }
    assert_eq!(asked_counts(&record), before, "a dry run asks nobody");

    // Refusals keep their usual statuses.
    let output = ipcctl(&url, Some("shop"), &["gather", ":nobody", "status"]).await;
    assert_exit(&output, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_exits_0_when_all_ok_9_when_some_failed_10_when_stopped_by_its_budget() {
    let server = server();
    let (url, record) = (server.url(), Shared::default());
    for id in ["g1", "g2", "g3", "g4", "g5"] {
        grouped(&url, id, "good", Answer::Ok, &record).await;
    }
    grouped(&url, "m1", "mixed", Answer::Ok, &record).await;
    grouped(&url, "m2", "mixed", Answer::Error, &record).await;
    grouped(&url, "m3", "mixed", Answer::Ok, &record).await;
    let rollout = |extra: &[&str]| {
        let mut args = vec!["rollout", ":worker", "deploy", "--timeout", "5s"];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let url = url.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ipcctl(&url, Some("shop"), &args).await
        }
    };

    // A dry run: the plan, in waves; nobody asked.
    let output = run(rollout(&[
        "--label",
        "group=good",
        "--wave-size",
        "2",
        "--dry-run",
    ]))
    .await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    assert!(
        text.contains("5 member(s) would be asked in 3 wave(s); nobody was asked"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("g5") && l.ends_with(" 3")),
        "{text}"
    );
    assert!(
        record.lock().unwrap().asked.is_empty(),
        "a dry run asks nobody"
    );

    // All OK, in waves of 2, as JSON lines.
    let output = run(rollout(&[
        "--label",
        "group=good",
        "--wave-size",
        "2",
        "--json",
    ]))
    .await;
    assert_exit(&output, 0);
    let lines = json_lines(&output);
    assert_eq!(
        lines.len(),
        6,
        "an event per member, then the ledger: {lines:?}"
    );
    for line in &lines[..5] {
        assert_eq!(line["outcome"]["status"], "OK", "{line}");
        assert_eq!(line["outcome"]["wave"], line["wave"], "{line}");
    }
    assert_eq!(lines[5]["ledger"]["state"], "DONE");
    assert_eq!(lines[5]["ledger"]["waves"], 3);
    let most_busy = record.lock().unwrap().most_busy;
    assert!(most_busy <= 2, "the workers saw {most_busy} busy at once");

    // m2 fails: the budget (0) stops the rollout before m3's wave.
    let output = run(rollout(&["--label", "group=mixed", "--key", "mixed-1"])).await;
    assert_exit(&output, 10);
    let text = stdout(&output);
    assert!(text.contains("STOPPED by the failure budget"), "{text}");
    assert_eq!(
        not_ok_rows(&text),
        [
            ("m2".to_string(), "FAILED".to_string()),
            ("m3".into(), "PENDING".into())
        ]
    );
    assert!(
        text.contains("not asked: stopped before its wave"),
        "{text}"
    );
    assert!(
        !record.lock().unwrap().asked.contains_key("m3"),
        "m3 never asked"
    );

    // Rerun with the key and a budget of 1: m1 skipped, m2 fails again, m3 asked.
    let output = run(rollout(&[
        "--label",
        "group=mixed",
        "--key",
        "mixed-1",
        "--max-failures",
        "1",
    ]))
    .await;
    assert_exit(&output, 9);
    let text = stdout(&output);
    assert!(
        text.lines()
            .any(|l| l.starts_with("SKIPPED") && l.contains(" m1 ")),
        "{text}"
    );
    assert_eq!(
        not_ok_rows(&text),
        [("m2".to_string(), "FAILED".to_string())]
    );
    let counts = asked_counts(&record);
    assert_eq!((counts["m1"], counts["m2"], counts["m3"]), (1, 2, 1));

    // The key for another operation: bad input; nobody there: no responders.
    let output = run(vec![
        "rollout".into(),
        ":worker".into(),
        "reload".into(),
        "--key".into(),
        "mixed-1".into(),
    ])
    .await;
    assert_exit(&output, 2);
    assert!(String::from_utf8_lossy(&output.stderr).contains("different operation"));
    let output = run(vec!["rollout".into(), ":nobody".into(), "deploy".into()]).await;
    assert_exit(&output, 3);
}

/// On a terminal the rollout draws a progress bar on stderr (and lines on stdout);
/// `script` gives ipcctl a pseudo-terminal, as an operator's would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_a_rollout_shows_a_progress_bar() {
    let server = server();
    let (url, record) = (server.url(), Shared::default());
    for id in ["t1", "t2", "t3"] {
        drop(worker(&url, id, "deploy", Answer::Ok, record.clone()).await);
    }
    let command = format!(
        "{} --addr {url} --app shop rollout :worker deploy --wave-size 1",
        env!("CARGO_BIN_EXE_ipcctl")
    );
    let run = tokio::process::Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("ipcctl finished")
        .expect("running script (util-linux)");
    assert_exit(&output, 0);
    let screen = stdout(&output);
    assert!(screen.contains("\r\x1b[2K["), "no bar drawn:\n{screen:?}");
    assert!(
        screen.contains("3/3 · wave 3/3"),
        "the bar ends full:\n{screen:?}"
    );
    for member in ["t1", "t2", "t3"] {
        assert!(
            screen.contains(&format!("OK         {member}  node")),
            "{screen:?}"
        );
    }
    assert!(screen.contains("every member answered OK"), "{screen:?}");
}
