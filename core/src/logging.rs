//! Logging set-up shared by the binaries (server, sidecar): `tracing` with a
//! `RUST_LOG` filter (default `info`), text or JSON lines, on stderr.

/// Installs the global `tracing` subscriber. Colours only on a terminal.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
