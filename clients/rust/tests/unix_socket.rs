//! Connecting by Unix socket, as applications reach their pod's sidecar. Until a
//! sidecar is at hand, a small in-test relay exposes the real server on a socket:
//! every byte the client sends goes through the socket file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::server;
use ipc_client::{Client, OP_SUBSCRIBED, SubscribeOptions};
use ipc_testkit::next;
use serde_json::json;
use tokio::net::{TcpStream, UnixListener};

/// Relays every connection accepted on `socket` to `upstream`, until the test ends.
fn relay(socket: &Path, upstream: std::net::SocketAddr) {
    let listener = UnixListener::bind(socket).expect("binding the test socket");
    tokio::spawn(async move {
        while let Ok((mut local, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut remote) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
            });
        }
    });
}

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ipc.sock")
}

#[tokio::test]
async fn the_client_works_over_a_unix_socket_in_every_address_form() {
    let server = server();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = socket_in(&dir);
    relay(&socket, server.grpc);

    let path = socket.display().to_string();
    for addr in [
        path.clone(),
        format!("unix:{path}"),
        format!("unix://{path}"),
    ] {
        let client = Client::builder(&addr)
            .app("shop")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        let pong = client
            .send_msg("", "ping", json!(null), None)
            .await
            .unwrap_or_else(|e| panic!("{addr}: {e}"));
        assert_eq!(pong.op, "pong", "{addr}");
    }

    // A subscription over the socket receives a broadcast made over TCP.
    let local = Client::builder(&path)
        .app("shop")
        .connect()
        .await
        .expect("socket");
    let remote = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .expect("tcp");
    let mut sub = local.subscribe(SubscribeOptions::new().role("worker"));
    assert_eq!(next(&mut sub).await.op, OP_SUBSCRIBED);
    remote
        .broadcast(":worker", "worker:restart", json!({"via": "tcp"}))
        .await
        .expect("broadcast");
    let msg = next(&mut sub).await;
    assert_eq!(msg.op, "worker:restart");
    assert_eq!(msg.data, json!({"via": "tcp"}));
}

#[tokio::test]
async fn ipcctl_takes_a_socket_path_as_address() {
    let server = server();
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = socket_in(&dir);
    relay(&socket, server.grpc);

    // Run the CLI off the runtime's thread: the relay must keep serving meanwhile.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ipcctl"))
            .args(["--addr", &socket.display().to_string(), "send", "", "ping"])
            .env_remove("IPC_APP")
            .env_remove("IPC_TOKEN")
            .output()
            .expect("running ipcctl")
    })
    .await
    .expect("ipcctl thread");
    assert!(output.status.success(), "{output:?}");
    let reply: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON reply");
    assert_eq!(reply["op"], "pong");
}
