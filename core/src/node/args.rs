//! The node's flags, written once for both binaries (with the `clap` feature):
//! `ipc-server` and `ipc-sidecar` flatten [`NodeArgs`] into their own flags, and its
//! defaults are [`NodeConfig::default`]'s, so a default lives in one place.
//!
//! What stays in each binary is what differs on purpose: the node's name and
//! `--app` (the server's name is the host's, the sidecar's the pod's id; the
//! sidecar's app is also the pod's identity). The server's further node flags
//! (queue bytes, the dedup window, the limits), which the sidecar does not take,
//! read their defaults from [`NodeConfig::default`] too.

use std::sync::LazyLock;
use std::time::Duration;

use super::NodeConfig;
use crate::mount::MountOptions;

/// The node's flags both binaries take.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Largest message accepted (op, data and headers, encoded), in bytes.
    #[arg(long, env = "IPC_MAX_MSG_BYTES", default_value_t = NodeConfig::default().max_msg_bytes)]
    pub max_msg_bytes: usize,
    /// Messages queued per subscriber before it is cut off as too slow (it can resume).
    #[arg(long, env = "IPC_SUBSCRIBER_QUEUE", default_value_t = NodeConfig::default().subscriber_queue)]
    pub subscriber_queue: usize,
    /// Largest SendMsg timeout_ms accepted, in milliseconds.
    #[arg(long, env = "IPC_MAX_TIMEOUT_MS", default_value_t = millis(NodeConfig::default().max_timeout))]
    pub max_timeout_ms: u64,
    /// Time given to open calls to finish at shutdown, in milliseconds.
    #[arg(long, env = "IPC_GRACE_MS", default_value_t = millis(MountOptions::default().grace))]
    pub grace_ms: u64,
}

impl NodeArgs {
    /// The node's configuration: these flags over [`NodeConfig::default`], under the
    /// name and default app the binary chose.
    pub fn node_config(&self, name: String, default_app: Option<String>) -> NodeConfig {
        NodeConfig {
            name,
            default_app,
            max_msg_bytes: self.max_msg_bytes,
            subscriber_queue: self.subscriber_queue,
            max_timeout: self.max_timeout(),
            ..NodeConfig::default()
        }
    }

    /// `--max-timeout-ms`.
    pub fn max_timeout(&self) -> Duration {
        Duration::from_millis(self.max_timeout_ms)
    }

    /// `--grace-ms`: the [`MountOptions::grace`] of the node's mount.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
}

/// A default duration as the `*_MS` flags show it.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `--dedup-window`'s default as the flag writes it (`10m`), from
/// [`NodeConfig::default`]'s window.
pub fn default_dedup_window() -> &'static str {
    static TEXT: LazyLock<String> =
        LazyLock::new(|| window_text(NodeConfig::default().dedup_window));
    &TEXT
}

/// A window in the largest unit that writes it whole: `10m`, `90s`, `1500ms`.
fn window_text(window: Duration) -> String {
    let ms = window.as_millis();
    for (unit, per) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms > 0 && ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::publish::parse_window;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        node: NodeArgs,
    }

    #[test]
    fn no_flags_give_the_default_node() {
        let flags = Flags::try_parse_from(["node"]).unwrap();
        let config = flags.node.node_config("n".into(), None);
        let default = NodeConfig::default();
        assert_eq!(config.max_msg_bytes, default.max_msg_bytes);
        assert_eq!(config.subscriber_queue, default.subscriber_queue);
        assert_eq!(config.max_timeout, default.max_timeout);
        assert_eq!(flags.node.grace(), MountOptions::default().grace);
    }

    #[test]
    fn windows_are_written_as_the_flag_reads_them() {
        assert_eq!(default_dedup_window(), "10m");
        for text in ["10m", "90s", "1500ms", "2h", "1ms"] {
            assert_eq!(window_text(parse_window(text).unwrap()), text);
        }
    }
}
