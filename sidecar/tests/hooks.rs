//! Hooks: shell commands the sidecar runs for ops on the pod's channels. A hook that
//! writes to a FIFO lets the test wait for it (opening a FIFO blocks until the other
//! end opens).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;

/// A FIFO in a fresh temporary directory.
fn fifo() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("hook.fifo");
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    (dir, path)
}

/// The runs of a hook that writes its message to a FIFO, in order.
struct Runs {
    fifo: PathBuf,
    /// Runs read but not yet taken: when a waiting run starts right as the one
    /// before it ends, it opens the FIFO before the reader saw the end of the first
    /// one, and one read returns both messages, one after the other.
    read: std::collections::VecDeque<serde_json::Value>,
}

impl Runs {
    fn new(fifo: &Path) -> Self {
        Runs {
            fifo: fifo.to_path_buf(),
            read: Default::default(),
        }
    }

    /// The message the next run of the hook was given (what it wrote, as JSON).
    async fn next(&mut self) -> serde_json::Value {
        if let Some(run) = self.read.pop_front() {
            return run;
        }
        let path = self.fifo.clone();
        let reading = tokio::task::spawn_blocking(move || std::fs::read_to_string(path));
        let text = tokio::time::timeout(PATIENCE, reading)
            .await
            .expect("the hook did not run")
            .unwrap()
            .expect("reading the FIFO");
        for run in serde_json::Deserializer::from_str(&text).into_iter() {
            let run = run.unwrap_or_else(|e| panic!("hook wrote {text:?}: {e}"));
            self.read.push_back(run);
        }
        self.read.pop_front().expect("a run wrote nothing")
    }
}

/// What the next run of the hook wrote to the FIFO, as JSON.
async fn read_run(path: &Path) -> serde_json::Value {
    Runs::new(path).next().await
}

#[tokio::test]
async fn a_broadcast_to_the_pod_runs_its_hook_with_the_message_on_stdin() {
    let server = server();
    let (_dir, fifo) = fifo();
    let hook = format!("deploy:restart=cat > {}", fifo.display());
    let sidecar = SidecarProcess::start(&server.url(), &["--hook", &hook]);
    sidecar.wait_upstream(true).await;
    // A local subscriber brings `:news` into the pod: the op there is not the pod's.
    let mut local = sidecar.client().await;
    let _news = subscribe_to(&mut local, &[":news"]).await;

    let mut operator = server.client().await;
    broadcast(&mut operator, ":news", "deploy:restart", json!({"v": 1}))
        .await
        .unwrap();
    broadcast(&mut operator, ":web", "deploy:restart", json!({"v": 2}))
        .await
        .unwrap();
    let run = read_run(&fifo).await;
    assert_eq!(
        run["channel"], "shop:web",
        "only the pod's channels run hooks: {run}"
    );
    assert_eq!(
        (run["op"].clone(), run["data"].clone()),
        (json!("deploy:restart"), json!({"v": 2}))
    );
    assert!(run["cursor"].as_str().is_some_and(|c| !c.is_empty()));
}

#[tokio::test]
async fn runs_of_one_hook_never_overlap_and_a_burst_is_cut_to_one_waiting_run() {
    let server = server();
    let (_dir, fifo) = fifo();
    let hook = format!("config:reload=cat > {}", fifo.display());
    let sidecar = SidecarProcess::start(&server.url(), &["--hook", &hook]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut witness = subscribe_to(&mut local, &[":web"]).await;
    let mut operator = server.client().await;

    // The first run blocks until the FIFO is read; the second waits; the third is
    // skipped. The hook's fate is decided before local subscribers see a message.
    for n in 1..=3 {
        broadcast(&mut operator, ":web", "config:reload", json!(n))
            .await
            .unwrap();
    }
    for n in 1..=3 {
        assert_eq!(data(&next(&mut witness).await), json!(n));
    }
    let mut runs = Runs::new(&fifo);
    assert_eq!(runs.next().await["data"], 1);
    assert_eq!(runs.next().await["data"], 2);
    broadcast(&mut operator, ":web", "config:reload", json!(4))
        .await
        .unwrap();
    assert_eq!(runs.next().await["data"], 4, "3 was skipped");
}

#[tokio::test]
async fn a_request_to_the_pod_is_answered_with_the_exit_code_and_the_output() {
    let server = server();
    let sidecar = SidecarProcess::start(
        &server.url(),
        &[
            "--hook",
            "status:dump=cat; echo; echo trouble >&2; exit 4",
            "--hook",
            "cache:clear=echo cleared",
        ],
    );
    sidecar.wait_upstream(true).await;
    let mut operator = server.client().await;

    let answer = send(&mut operator, POD_ID, "status:dump", 10_000)
        .await
        .unwrap();
    assert_eq!(answer.op, "status:dump");
    assert!(answer.error.contains("exited with status 4"), "{answer:?}");
    let result = data(&answer);
    assert_eq!(result["exit_code"], 4);
    let output = result["output"].as_str().unwrap();
    assert!(
        output.contains(r#""op":"status:dump""#),
        "the message was on stdin: {output}"
    );
    assert!(
        output.ends_with("trouble\n"),
        "stdout and stderr, in order: {output}"
    );

    // To every pod of the role, and from inside the pod without the control plane.
    let answer = send(&mut operator, ":web", "cache:clear", 10_000)
        .await
        .unwrap();
    assert_eq!(
        (answer.error.as_str(), data(&answer)["output"].clone()),
        ("", json!("cleared\n"))
    );
    let mut server = server;
    server.kill();
    sidecar.wait_upstream(false).await;
    let mut local = sidecar.client().await;
    let answer = send(&mut local, POD_ID, "cache:clear", 10_000)
        .await
        .unwrap();
    assert_eq!(data(&answer)["exit_code"], 0);
}

#[tokio::test]
async fn a_hook_past_its_timeout_is_killed_and_the_request_told() {
    let server = server();
    let sidecar = SidecarProcess::start(
        &server.url(),
        &[
            "--hook-timeout",
            "300ms",
            "--hook",
            "slow:op=echo begun; sleep 30",
        ],
    );
    sidecar.wait_upstream(true).await;
    let mut operator = server.client().await;
    let answer = send(&mut operator, POD_ID, "slow:op", 20_000)
        .await
        .unwrap();
    assert!(answer.error.contains("timed out"), "{answer:?}");
    let result = data(&answer);
    assert_eq!(
        (result["timed_out"].clone(), result["output"].clone()),
        (json!(true), json!("begun\n"))
    );
}
