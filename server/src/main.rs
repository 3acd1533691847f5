//! `ipc-server`: parses flags, starts the control plane, reloads the tokens file on
//! SIGHUP, stops on SIGTERM/SIGINT.

use clap::Parser;
use ipc_server::{Config, Server, init_logging};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_json);
    let server = Server::start(config).await?;
    if let Some(tokens) = server.tokens() {
        ipc_server::security::reload_tokens_on_sighup(tokens, server.node().metrics().clone())?;
    }
    tracing::info!(grpc = %server.grpc_addr(), metrics = %server.metrics_addr(), node = %server.node().name(), "serving");
    // The readiness line: tests and scripts wait for it instead of sleeping.
    println!(
        "listening grpc={} metrics={}",
        server.grpc_addr(),
        server.metrics_addr()
    );
    server.serve(shutdown_signal()).await
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
