//! What `ipcctl` takes: its commands, their flags and arguments, and the parsers of
//! their values.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::exit::EXIT_CODES;

/// Drive a fleet-ipc bus: broadcast, ask one process, tail channels, list members.
#[derive(Debug, Parser)]
#[command(name = "ipcctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Node to talk to: http://host:port, https://host:port, a Unix socket path or unix:PATH.
    #[arg(
        long,
        env = "IPC_ADDR",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    pub addr: String,
    /// Your app id, sent as `ipc-app` metadata: a leading ':' in channels expands to it,
    /// and `members` lists only this app.
    #[arg(long, env = "IPC_APP", global = true)]
    pub app: Option<String>,
    /// Bearer token sent as `authorization` metadata.
    #[arg(long, env = "IPC_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish a message on a channel; prints {"id","channel","cursor"}. Retried on
    /// UNAVAILABLE with an idempotency key, so it is never stored twice.
    Broadcast {
        /// Channel, e.g. `shop:worker` or `:worker` (your app's).
        channel: String,
        /// Op, e.g. `worker:restart`.
        op: String,
        #[command(flatten)]
        payload: Payload,
        /// Idempotency key: a repeat within the server's window (10 minutes by
        /// default) is not stored again and prints the first id with "duplicate":true.
        #[arg(long)]
        key: Option<String>,
    },
    /// Publish JSON lines from stdin on one stream ({"channel","op","data","headers","key"}
    /// a line); prints one answer a line, in order. Exits 2 at a line that is not a
    /// message (after the answers before it), else with the first refusal's status.
    Publish {
        /// Channel of lines that give none.
        #[arg(long)]
        channel: Option<String>,
        /// Op of lines that give none.
        #[arg(long)]
        op: Option<String>,
    },
    /// Ask one subscriber of TARGET and print its reply.
    Send {
        /// Subscriber id or role channel (`:worker` asks any one worker); '' for the
        /// node's built-ins (`ping`, `members`).
        target: String,
        /// Op, e.g. `config:get`.
        op: String,
        #[command(flatten)]
        payload: Payload,
        /// How long to wait for the reply: 500ms, 2s, 1m.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Print the messages of channels as JSON lines, like `tail -f`; reconnects and
    /// resumes by itself.
    Subscribe {
        /// Channels or patterns (`*` one segment, `>` the rest).
        channels: Vec<String>,
        /// Subscribe as this role (receives `<app>:<role>`).
        #[arg(long)]
        role: Option<String>,
        /// Tag within the role (receives `<app>:<role>:<tag>`).
        #[arg(long, requires = "role")]
        tag: Option<String>,
        /// Subscriber id (default: assigned by the node).
        #[arg(long)]
        id: Option<String>,
        /// Start after this cursor, replaying what came after it.
        #[arg(long)]
        cursor: Option<String>,
        /// Label shown by `members`, as key=value; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
    },
    /// List connected subscribers (of --app when set).
    Members {
        /// Only this role.
        #[arg(long)]
        role: Option<String>,
        /// Only those a broadcast on CHANNEL would reach (`:worker` is your app's),
        /// watchers of every app included; nothing is sent.
        #[arg(long)]
        channel: Option<String>,
        /// Only members with this label, as key=value; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// Every app, even when --app / IPC_APP is set.
        #[arg(long)]
        all_apps: bool,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask every responder of TARGET at once and wait for all (or the timeout): a line
    /// per member, then a summary naming who failed and who did not answer. Exits 0
    /// if all answered OK, 9 if not.
    Gather {
        #[command(flatten)]
        common: crate::fleetops::Common,
        /// How long to wait for the answers.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Ask the responders of TARGET in waves, the next wave once the current one
    /// answered (and, with --ready-timeout, came back), none past --max-failures: a
    /// line per member as it finishes, a progress bar on a terminal, then a summary.
    /// Exits 0 if all answered OK, 9 if some did not, 10 if stopped by the budget.
    Rollout {
        #[command(flatten)]
        common: crate::fleetops::Common,
        /// How long each member has to answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        pace: crate::fleetops::Pace,
    },
    /// Answer a request seen on `subscribe` (one with `reply_to`).
    Reply {
        /// The request's `reply_to`.
        reply_to: String,
        /// Op of the reply (usually the request's).
        op: String,
        #[command(flatten)]
        payload: Payload,
        /// Report this failure instead of a result.
        #[arg(long)]
        error: Option<String>,
    },
    /// Hold a fleet-wide lock while CMD runs (like `consul lock`): CMD gets the fencing
    /// token in IPC_LOCK_FENCE, the lease is renewed every ttl/3 and released when CMD
    /// ends; exits with CMD's status, or 8 if the lock is not acquired (or is lost, and
    /// CMD killed).
    Lock {
        /// Lock name, e.g. `shop:migrate` or `:migrate` (your app's).
        name: String,
        /// Lease length; renewed every third of it while CMD runs.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        ttl: Duration,
        /// How long to wait for the current holder to release it (0: fail at once).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        wait: Duration,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Release a lock held with FENCE; prints {"released":bool}, exits 8 if nothing was released.
    Unlock { name: String, fence: u64 },
    /// Draw from a fleet-wide token bucket; prints {"allowed","remaining","retry_after_ms"}
    /// and exits 0 if allowed, 8 if not.
    Limit {
        /// Bucket name, e.g. `shop:emails` or `:emails`.
        name: String,
        /// Tokens added per interval.
        #[arg(long)]
        rate: u32,
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// Bucket size (default: the rate).
        #[arg(long, default_value_t = 0)]
        burst: u32,
        /// Tokens this call takes.
        #[arg(long, default_value_t = 1)]
        cost: u32,
    },
    /// Add the fleet-ipc sidecar to the annotated workloads of a manifest, offline
    /// (like `istioctl kube-inject`): `ipcctl inject -f app.yaml | kubectl apply -f -`.
    /// The same patch as the admission webhook; needs no server.
    Inject {
        /// Manifest file (multi-document YAML); `-` reads standard input.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: String,
        #[command(flatten)]
        sidecar: ipc_inject::InjectConfig,
    },
    /// Manage access tokens for `ipc-server --tokens FILE`.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print a shell completion script: `ipcctl completions bash > /etc/bash_completion.d/ipcctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new token: the secret (shown once) on stderr, its tokens-file entry on
    /// stdout — `ipcctl token new ops >> tokens.toml`, then fill in its grants.
    New {
        /// Token name: the `sender` of what its holder sends.
        name: String,
    },
}

/// Data and headers of an outgoing message.
#[derive(Debug, clap::Args)]
pub struct Payload {
    /// Payload as JSON: '{"grace":5}', '"text"', 42.
    #[arg(long, value_name = "JSON", value_parser = parse_json)]
    pub data: Option<serde_json::Value>,
    /// Header as key=value; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub headers: Vec<(String, String)>,
}

impl Payload {
    pub fn data(&self) -> serde_json::Value {
        self.data.clone().unwrap_or(serde_json::Value::Null)
    }
}

pub fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

/// `500ms`, `2s`, `1.5s`, `1m`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    ipc_proto::duration::parse(text)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_take_the_usual_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn key_values_need_a_key() {
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }
}
