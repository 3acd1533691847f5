//! `ipc-server`: parses flags, starts the control plane, reloads the tokens file on
//! SIGHUP (and on change with --tokens-watch), stops on SIGTERM/SIGINT.

use clap::Parser;
use ipc_server::{Config, Server, init_logging};

/// jemalloc rather than glibc's malloc: a message is allocated on the thread that
/// reads it and freed on the threads that deliver and evict it, which sends glibc to
/// its locked slow paths. jemalloc cuts the Redis path's instructions per message by
/// 17-31 % and keeps idle memory per subscriber where it was; mimalloc, also
/// measured, doubled it (BENCHMARKS.md, "The server's allocator and the release
/// build").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_json);
    let server = Server::start(config).await?;
    // Installed before the readiness line, so a SIGTERM sent right after it is
    // handled (graceful stop, exit 0) rather than killing the process.
    let shutdown = shutdown_signal()?;
    ipc_server::security::reload_tokens(
        server.tokens(),
        server.tokens_watch(),
        server.node().clone(),
    )?;
    tracing::info!(grpc = %server.grpc_addr(), metrics = %server.metrics_addr(), node = %server.node().name(), "serving");
    // The readiness line: tests and scripts wait for it instead of sleeping.
    let injector = server
        .injector_addr()
        .map(|addr| format!(" injector={addr}"))
        .unwrap_or_default();
    let admin = server
        .admin_addr()
        .map(|addr| format!(" admin={addr}"))
        .unwrap_or_default();
    println!(
        "listening grpc={} metrics={}{injector}{admin}",
        server.grpc_addr(),
        server.metrics_addr()
    );
    server.serve(shutdown).await
}

/// Installs the SIGTERM and SIGINT handlers; the future completes on the first.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}
