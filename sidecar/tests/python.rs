//! A Python process (the `fleet_ipc` client on grpcio) in the pod, over the socket:
//! ping, subscribe, broadcast through the control plane, and answer a request that
//! came from the control plane.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

#[tokio::test]
async fn a_python_worker_in_the_pod_talks_through_the_socket() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(python())
        .arg(root.join("tests/python/pod_worker.py"))
        .arg(&sidecar.socket)
        .env("PYTHONPATH", root.join("../clients/python"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting python (the workspace's .venv, or python3 with grpcio)");
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx
                .send(serde_json::from_str::<serde_json::Value>(&line).expect("a JSON line"));
        }
    });
    let mut line = async || {
        tokio::time::timeout(PATIENCE, lines.recv())
            .await
            .expect("python said nothing")
            .expect("python exited early")
    };
    assert_eq!(line().await, json!({"pong": "pong"}));
    assert_eq!(line().await, json!({"subscribed": "ipc:subscribed"}));
    assert_eq!(
        line().await,
        json!({"got": {"x": 1}, "channel": "shop:py", "has_cursor": true})
    );

    let mut operator = server.client().await;
    let answer = send(&mut operator, ":pyworker", "py:ask", 10_000)
        .await
        .unwrap();
    assert_eq!(
        (answer.op.as_str(), data(&answer)),
        ("py:answer", json!({"echo": null}))
    );
    assert_eq!(line().await, json!({"answered": "py:ask"}));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
