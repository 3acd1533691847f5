//! `ipcctl`: the operator's CLI for fleet-ipc, on top of the `ipc-client` library.
//!
//! Prints results as JSON on stdout, one clear line on stderr on failure, and an exit
//! status that tells scripts what happened (see [`EXIT_CODES`]).
//!
//! # Layout
//! - [`cli`]: the commands, their flags and the parsers of their values.
//! - [`messaging`]: broadcast, send, subscribe, members, reply.
//! - [`publish`]: `publish`, JSON lines from stdin on one stream.
//! - [`fleetops`]: `gather` and `rollout`: a line per member, the progress bar, the
//!   summary.
//! - [`coord`]: `lock` (running a command under a lease), `unlock`, `limit`.
//! - [`offline`]: what needs no server: `token new`, `inject`.
//! - [`output`]: JSON lines, aligned tables.
//! - [`exit`]: the exit statuses and the one stderr line of a failure.
//! - here: `main`, and each command sent to its module.

use std::io::{self, IsTerminal};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use ipc_client::{Client, Error, MembersFilter, SubscribeOptions};

use crate::cli::{Cli, Command, TokenCommand};
use crate::exit::{exit_code, fail, report};

mod cli;
mod coord;
mod exit;
mod fleetops;
mod messaging;
mod offline;
mod output;
mod publish;

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
        Command::Inject { file, sidecar } => return offline::inject(&file, &sidecar),
        Command::Token {
            command: TokenCommand::New { name },
        } => return offline::new_token(&name),
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
        } => messaging::broadcast(&client, channel, op, payload, key).await,
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
        } => messaging::send(&client, target, op, payload, timeout).await,
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
            messaging::subscribe(&client, options).await
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
            messaging::members(&client, filter, json).await
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
        } => messaging::reply(&client, reply_to, op, payload, error).await,
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
pub enum Failure {
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
