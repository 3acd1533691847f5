//! `ipcctl`: the operator's CLI for fleet-ipc, on top of the `ipc-client` library.
//!
//! Prints results as JSON on stdout, one clear line on stderr on failure, and an exit
//! status that tells scripts what happened (see [`EXIT_CODES`]).

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{CommandFactory, Parser, Subcommand};
use futures::StreamExt;
use ipc_client::{Client, Error, Member, MembersFilter, SubscribeOptions};

#[path = "ipcctl/coord.rs"]
mod coord;
#[path = "ipcctl/fleetops.rs"]
mod fleetops;
#[path = "ipcctl/publish.rs"]
mod publish;

/// The exit statuses, shown by `ipcctl --help` and documented in the README.
const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  any other failure
  2  bad input or usage (including INVALID_ARGUMENT from the server)
  3  no responders for the target
  4  deadline exceeded (no reply in time)
  5  the reply carried `error` (the reply is still printed)
  6  server unreachable
  7  permission denied or unauthenticated
  8  refused: `lock` not acquired or lost, `unlock` released nothing, `limit` over the rate,
     `gather`/`rollout` key in use by a run still going
  9  `gather`/`rollout`: some members failed or did not answer (the summary names them)
 10  `rollout`: stopped by its failure budget (--max-failures); the rest were not asked
`ipcctl lock NAME -- CMD` otherwise exits with CMD's status.";

mod exit {
    pub const OTHER: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const NO_RESPONDERS: u8 = 3;
    pub const DEADLINE: u8 = 4;
    pub const REPLY_ERROR: u8 = 5;
    pub const UNREACHABLE: u8 = 6;
    pub const DENIED: u8 = 7;
    pub const REFUSED: u8 = 8;
    pub const SOME_FAILED: u8 = 9;
    pub const STOPPED: u8 = 10;
}

/// Drive a fleet-ipc bus: broadcast, ask one process, tail channels, list members.
#[derive(Debug, Parser)]
#[command(name = "ipcctl", version, after_help = EXIT_CODES)]
struct Cli {
    /// Node to talk to: http://host:port, https://host:port, a Unix socket path or unix:PATH.
    #[arg(
        long,
        env = "IPC_ADDR",
        default_value = "http://127.0.0.1:7700",
        global = true
    )]
    addr: String,
    /// Your app id, sent as `ipc-app` metadata: a leading ':' in channels expands to it,
    /// and `members` lists only this app.
    #[arg(long, env = "IPC_APP", global = true)]
    app: Option<String>,
    /// Bearer token sent as `authorization` metadata.
    #[arg(long, env = "IPC_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
        common: fleetops::Common,
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
        common: fleetops::Common,
        /// How long each member has to answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        pace: fleetops::Pace,
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
enum TokenCommand {
    /// Make a new token: the secret (shown once) on stderr, its tokens-file entry on
    /// stdout — `ipcctl token new ops >> tokens.toml`, then fill in its grants.
    New {
        /// Token name: the `sender` of what its holder sends.
        name: String,
    },
}

/// Data and headers of an outgoing message.
#[derive(Debug, clap::Args)]
struct Payload {
    /// Payload as JSON: '{"grace":5}', '"text"', 42.
    #[arg(long, value_name = "JSON", value_parser = parse_json)]
    data: Option<serde_json::Value>,
    /// Header as key=value; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    headers: Vec<(String, String)>,
}

impl Payload {
    fn data(&self) -> serde_json::Value {
        self.data.clone().unwrap_or(serde_json::Value::Null)
    }
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

/// `500ms`, `2s`, `1.5s`, `1m`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 2s or 1m, got {text:?}"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// `ipcctl token new NAME`: the secret goes to stderr so that redirecting stdout
/// into the tokens file never writes it there.
fn new_token(name: &str) -> ExitCode {
    match ipc_proto::token::new_token(name) {
        Ok((secret, entry)) => {
            eprintln!(
                "secret (shown once; clients send `authorization: Bearer <secret>`): {secret}"
            );
            print!("{entry}");
            ExitCode::SUCCESS
        }
        Err(err) => fail(exit::BAD_INPUT, &err),
    }
}

/// `ipcctl inject`: reads the manifest, prints it injected; warnings on stderr.
fn inject(file: &str, sidecar: &ipc_inject::InjectConfig) -> ExitCode {
    let text = if file == "-" {
        io::read_to_string(io::stdin())
    } else {
        std::fs::read_to_string(file)
    };
    let text = match text {
        Ok(text) => text,
        Err(err) => return fail(exit::BAD_INPUT, &format!("reading {file}: {err}")),
    };
    match ipc_inject::inject_manifests_report(&text, sidecar) {
        Ok(out) => {
            for warning in &out.warnings {
                eprintln!("ipcctl: warning: {warning}");
            }
            print!("{}", out.yaml);
            ExitCode::SUCCESS
        }
        Err(err) => fail(exit::BAD_INPUT, &format!("{file}: {err}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(exit::OTHER, &format!("cannot start the runtime: {err}")),
    };
    runtime.block_on(run(cli))
}

/// Reconnection warnings of `subscribe` go to stderr; `RUST_LOG` can say more.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .init();
}

async fn run(cli: Cli) -> ExitCode {
    let Cli {
        addr,
        app,
        token,
        command,
    } = cli;
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ipcctl", &mut io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Inject { file, sidecar } => return inject(&file, &sidecar),
        Command::Token {
            command: TokenCommand::New { name },
        } => return new_token(&name),
        _ => {}
    }
    let mut builder = Client::builder(&addr);
    if let Some(app) = &app {
        builder = builder.app(app);
    }
    if let Some(token) = token {
        builder = builder.token(token);
    }
    let client = match builder.connect().await {
        Ok(client) => client,
        Err(err) => return report(&addr, &err),
    };
    let outcome = match command {
        Command::Broadcast {
            channel,
            op,
            payload,
            key,
        } => broadcast(&client, channel, op, payload, key).await,
        Command::Publish { channel, op } => match publish::run(&client, channel, op).await {
            Ok((_, _, publish::Input::Bad(line, why))) => {
                return fail(exit::BAD_INPUT, &format!("stdin line {line}: {why}"));
            }
            Ok((0, _, publish::Input::Done)) => Ok(()),
            Ok((refused, first, publish::Input::Done)) => {
                let code = first.as_ref().map_or(exit::OTHER, exit_code);
                let first = first.map(|e| e.to_string()).unwrap_or_default();
                return fail(
                    code,
                    &format!("{refused} message(s) refused; the first: {first}"),
                );
            }
            Err(err) => Err(Failure::Call(err)),
        },
        Command::Send {
            target,
            op,
            payload,
            timeout,
        } => send(&client, target, op, payload, timeout).await,
        Command::Subscribe {
            channels,
            role,
            tag,
            id,
            cursor,
            labels,
        } => {
            let options = SubscribeOptions {
                channels,
                id: id.unwrap_or_default(),
                role: role.unwrap_or_default(),
                tag: tag.unwrap_or_default(),
                labels: labels.into_iter().collect(),
                cursor: cursor.unwrap_or_default(),
                ..SubscribeOptions::default()
            };
            subscribe(&client, options).await
        }
        Command::Members {
            role,
            channel,
            labels,
            all_apps,
            json,
        } => {
            // Who a broadcast reaches is not limited to the sender's app (another
            // app's watcher may subscribe to it): --channel lists every app.
            let every_app = all_apps || channel.is_some();
            let filter = MembersFilter {
                app: if every_app {
                    String::new()
                } else {
                    app.unwrap_or_default()
                },
                role: role.unwrap_or_default(),
                labels: labels.into_iter().collect(),
                channel: channel.unwrap_or_default(),
            };
            members(&client, filter, json).await
        }
        Command::Gather { common, timeout } => {
            return fleetops::gather_command(&client, &addr, common, timeout).await;
        }
        Command::Rollout {
            common,
            timeout,
            pace,
        } => return fleetops::rollout_command(&client, &addr, common, timeout, pace).await,
        Command::Reply {
            reply_to,
            op,
            payload,
            error,
        } => reply(&client, reply_to, op, payload, error).await,
        Command::Lock {
            name,
            ttl,
            wait,
            command,
        } => return coord::lock_command(&client, &addr, name, ttl, wait, &command).await,
        Command::Unlock { name, fence } => {
            return coord::unlock_command(&client, &addr, name, fence).await;
        }
        Command::Limit {
            name,
            rate,
            interval,
            burst,
            cost,
        } => {
            let answer = client.limit(name, rate, interval, burst, cost).await;
            return coord::limit_command(&addr, answer);
        }
        Command::Completions { .. } | Command::Inject { .. } | Command::Token { .. } => Ok(()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Call(err)) => report(&addr, &err),
        Err(Failure::Deadline { target, timeout }) => fail(
            exit::DEADLINE,
            &format!("deadline exceeded: no reply from target {target:?} within {timeout:?}"),
        ),
        Err(Failure::Output(err)) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Output(err)) => fail(exit::OTHER, &format!("writing output: {err}")),
    }
}

/// Why a command failed.
enum Failure {
    Call(Error),
    /// `send` timed out: said with the target and the wait, which the bare error lacks.
    Deadline {
        target: String,
        timeout: Duration,
    },
    Output(io::Error),
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        Failure::Call(err)
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Self {
        Failure::Output(err)
    }
}

async fn broadcast(
    client: &Client,
    channel: String,
    op: String,
    payload: Payload,
    key: Option<String>,
) -> Result<(), Failure> {
    let mut call = client.broadcast(channel, op, payload.data());
    if let Some(key) = key {
        call = call.key(key);
    }
    for (key, value) in payload.headers {
        call = call.header(key, value);
    }
    let receipt = call.await?;
    print_json(&receipt)?;
    Ok(())
}

async fn send(
    client: &Client,
    target: String,
    op: String,
    payload: Payload,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut call = client.send_msg(&target, op, payload.data(), Some(timeout));
    for (key, value) in payload.headers {
        call = call.header(key, value);
    }
    match call.await {
        Ok(reply) => {
            print_json(&reply)?;
            Ok(())
        }
        Err(Error::ReplyError(reply)) => {
            // Scripts may want the whole reply, error included: it goes to stdout too.
            print_json(&reply)?;
            Err(Failure::Call(Error::ReplyError(reply)))
        }
        Err(Error::DeadlineExceeded(_)) => Err(Failure::Deadline { target, timeout }),
        Err(err) => Err(err.into()),
    }
}

async fn subscribe(client: &Client, options: SubscribeOptions) -> Result<(), Failure> {
    let mut messages = client.subscribe(options);
    while let Some(msg) = messages.next().await {
        print_json(&msg?)?;
    }
    Ok(())
}

async fn members(client: &Client, filter: MembersFilter, json: bool) -> Result<(), Failure> {
    let mut members = client.members(filter).await?;
    members.sort_by(|a, b| (&a.app, &a.role, &a.id).cmp(&(&b.app, &b.role, &b.id)));
    if json {
        print_json(&members)?;
    } else {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        io::stdout()
            .lock()
            .write_all(members_table(&members, now_ms).as_bytes())?;
    }
    Ok(())
}

async fn reply(
    client: &Client,
    reply_to: String,
    op: String,
    payload: Payload,
    error: Option<String>,
) -> Result<(), Failure> {
    let mut call = client.reply(reply_to, op, payload.data());
    if let Some(error) = error {
        call = call.error(error);
    }
    for (key, value) in payload.headers {
        call = call.header(key, value);
    }
    call.await?;
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> io::Result<()> {
    let line = serde_json::to_string(value).map_err(io::Error::other)?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// An aligned table: ID APP ROLE TAG NODE AGE LABELS.
fn members_table(members: &[Member], now_ms: i64) -> String {
    let header = ["ID", "APP", "ROLE", "TAG", "NODE", "AGE", "LABELS"].map(String::from);
    let mut rows = vec![header.to_vec()];
    for member in members {
        let labels: Vec<String> = member
            .labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        rows.push(vec![
            member.id.clone(),
            member.app.clone(),
            dash(&member.role),
            dash(&member.tag),
            member.node.clone(),
            age(now_ms.saturating_sub(member.connected_ms)),
            dash(&labels.join(",")),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns, two spaces apart, trailing spaces trimmed.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|col| {
            rows.iter()
                .map(|row| row[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

/// `45s`, `12m`, `3h`, `2d`, as `kubectl get` shows ages.
fn age(ms: i64) -> String {
    let seconds = ms.max(0) / 1000;
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Prints the one stderr line for a failed call and picks its exit status.
fn report(addr: &str, err: &Error) -> ExitCode {
    let message = match err {
        Error::Unreachable(detail) if !detail.contains(addr) => {
            format!("server unreachable at {addr}: {detail}")
        }
        other => other.to_string(),
    };
    fail(exit_code(err), &message)
}

fn exit_code(err: &Error) -> u8 {
    match err {
        // A FAILED_PRECONDITION is an operation key reused for another operation.
        Error::Config(_) | Error::InvalidArgument(_) | Error::FailedPrecondition(_) => {
            exit::BAD_INPUT
        }
        Error::NoResponders { .. } => exit::NO_RESPONDERS,
        Error::DeadlineExceeded(_) => exit::DEADLINE,
        Error::ReplyError(_) => exit::REPLY_ERROR,
        Error::Unreachable(_) => exit::UNREACHABLE,
        Error::PermissionDenied(_) | Error::Unauthenticated(_) => exit::DENIED,
        // `Error` is non-exhaustive: anything new is "another failure" until mapped.
        _ => exit::OTHER,
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    // One line, whatever the server put in its message.
    let message = message.replace(['\n', '\r'], " ");
    eprintln!("ipcctl: {message}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_error_has_its_documented_exit_status() {
        let msg = Box::new(ipc_client::Msg::default());
        let cases = [
            (Error::Config("bad addr".into()), 2),
            (Error::InvalidArgument("bad channel".into()), 2),
            (Error::NoResponders { target: "x".into() }, 3),
            (Error::DeadlineExceeded("late".into()), 4),
            (Error::ReplyError(msg), 5),
            (Error::Unreachable("refused".into()), 6),
            (Error::PermissionDenied("no".into()), 7),
            (Error::Unauthenticated("who".into()), 7),
            (Error::FailedPrecondition("key used before".into()), 2),
            (Error::Other(tonic::Status::not_found("late reply")), 1),
        ];
        for (err, code) in cases {
            assert_eq!(exit_code(&err), code, "{err}");
            assert!(
                EXIT_CODES.contains(&format!("  {code}  ")),
                "{code} undocumented"
            );
        }
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

    #[test]
    fn members_table_aligns_columns_and_shows_ages() {
        let member = Member {
            id: "w-1".into(),
            app: "shop".into(),
            role: "worker".into(),
            labels: BTreeMap::from([("zone".into(), "eu".into())]),
            node: "n1".into(),
            connected_ms: 1_000,
            ..Member::default()
        };
        let table = members_table(&[member], 1_000 + 3_600_000);
        assert_eq!(
            table,
            "ID   APP   ROLE    TAG  NODE  AGE  LABELS\n\
             w-1  shop  worker  -    n1    60m  zone=eu\n"
        );
    }
}
