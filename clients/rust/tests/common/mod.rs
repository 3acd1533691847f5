//! What only the Rust client's tests need: an `ipc-server` with the client tests'
//! defaults (app `app`, node `test-node`), its per-method call counts, and ipcctl
//! runs. The processes and the stream helpers every crate's tests share are in
//! `ipc_testkit`.

#![allow(dead_code)] // each test binary uses a different part

pub mod fleet;

use ipc_testkit::{PATIENCE, ServerProcess};

/// A server on a free port with the client tests' defaults.
pub fn server() -> ServerProcess {
    server_on("127.0.0.1:0", &[])
}

/// A server listening on `listen` (to restart one on the same port) with extra
/// flags.
pub fn server_on(listen: &str, extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--listen", listen];
    args.extend(["--app", "app", "--node", "test-node", "--grace-ms", "1000"]);
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

/// How many calls of `method` (`Reply`, `Serve`, …) `server` answered OK, as its
/// `/metrics` counts them (0 before the first).
pub async fn calls(server: &ServerProcess, method: &str) -> u64 {
    let (_, text) = ipc_testkit::http_get(server.metrics, "/metrics").await;
    let series = format!("ipc_rpc_requests_total{{method=\"{method}\",code=\"OK\"}} ");
    ipc_testkit::http::sample(&text, &series).unwrap_or(0)
}

/// `ipcctl` of this build with `IPC_ADDR` (and `IPC_APP`), none of the caller's
/// `IPC_*` settings; killed when dropped.
pub fn ipcctl_command(addr: &str, app: Option<&str>, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ipcctl"));
    command
        .env("IPC_ADDR", addr)
        .env_remove("IPC_APP")
        .env_remove("IPC_TOKEN")
        .env_remove("RUST_LOG")
        .args(args)
        .kill_on_drop(true);
    if let Some(app) = app {
        command.env("IPC_APP", app);
    }
    command
}

/// Runs ipcctl to completion (asynchronously, so that in-test subscribers keep
/// answering meanwhile).
pub async fn ipcctl(addr: &str, app: Option<&str>, args: &[&str]) -> std::process::Output {
    let run = ipcctl_command(addr, app, args).output();
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("ipcctl finished")
        .expect("running ipcctl")
}
