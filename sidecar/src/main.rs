//! `ipc-sidecar`: parses flags, starts the sidecar, stops on SIGTERM/SIGINT.

use clap::Parser;
use ipc_sidecar::{Config, Sidecar, init_logging};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_json);
    let sidecar = Sidecar::start(config).await?;
    let socket = sidecar.socket_path().display().to_string();
    let health = sidecar.health_addr();
    tracing::info!(%socket, %health, id = %sidecar.identity().id, node = %sidecar.node().name(), "serving");
    // The readiness line: tests and scripts wait for it instead of sleeping.
    println!("listening socket={socket} health={health}");
    sidecar.serve(shutdown_signal()).await
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
