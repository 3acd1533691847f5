//! `ipc-sidecar`: parses flags, starts the sidecar, stops on SIGTERM/SIGINT.

use clap::Parser;
use ipc_sidecar::{Config, Sidecar, init_logging};
use tokio::signal::unix::{SignalKind, signal};

// One thread: the sidecar relays small messages for one pod; a single-threaded
// runtime keeps its memory small and saves cross-thread wake-ups on every hop.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_json);
    // Handlers first: a SIGTERM right after the readiness line must stop the sidecar
    // gracefully, not kill it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let sidecar = Sidecar::start(config).await?;
    let socket = sidecar.socket_path().display().to_string();
    let health = sidecar.health_addr();
    let tcp = sidecar
        .tcp_addr()
        .map(|addr| format!(" tcp={addr}"))
        .unwrap_or_default();
    tracing::info!(%socket, tcp = %tcp.trim_start(), %health, id = %sidecar.identity().id, node = %sidecar.node().name(), "serving");
    // The readiness line: tests and scripts wait for it instead of sleeping
    // (`health=` stays last: clients' test helpers take the rest of the line).
    println!("listening socket={socket}{tcp} health={health}");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    sidecar.serve(shutdown).await
}
