//! The version and git commit of this build, as `ipc_build_info` reports them.
//!
//! A crate of its own so that a new commit rebuilds only this crate and the
//! binaries, not the workspace (see `build.rs` for where the commit comes from).

/// The workspace version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit (12 hex digits) this build is from, or `unknown`.
pub const COMMIT: &str = env!("IPC_GIT_COMMIT");
