//! `ipcctl lock`, `ipcctl unlock`, `ipcctl limit`: fleet-wide leases and rate limits
//! for scripts. `lock` holds a lease while a command runs, like `consul lock`.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipc_client::{Client, Error, Lease, LimitAnswer};

use crate::exit::{self, fail, report};
use crate::output::print_json;

/// What `ipcctl lock` ended with.
enum Held {
    /// The lock was taken by someone else (and did not come free within the wait).
    NotAcquired(Lease),
    /// The command could not be started.
    Spawn(std::io::Error),
    /// The lease was lost while the command ran (not renewed in time, taken by
    /// another holder); the command was killed.
    Lost,
    /// The command's own exit status.
    Exited(ExitCode),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Takes the lock, runs `command` with `IPC_LOCK_FENCE` (and `IPC_LOCK_NAME`) in its
/// environment, renews the lease every ttl/3 while it runs, and unlocks when it ends.
async fn lock(
    client: &Client,
    name: String,
    ttl: Duration,
    wait: Duration,
    command: &[String],
) -> Result<Held, Error> {
    let lease = client.lock(name.clone(), ttl, wait).await?;
    if !lease.acquired {
        return Ok(Held::NotAcquired(lease));
    }
    let (program, args) = command.split_first().expect("clap requires a command");
    // Listening before the command starts: a signal that arrives as soon as it runs
    // must reach it too, not end ipcctl by default and leave the lock held.
    let mut signals = match Forwarded::new() {
        Ok(signals) => signals,
        Err(err) => {
            let _ = client.unlock(name, lease.fence).await;
            return Err(err);
        }
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("IPC_LOCK_FENCE", lease.fence.to_string())
        .env("IPC_LOCK_NAME", &name)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            let _ = client.unlock(name, lease.fence).await;
            return Ok(Held::Spawn(err));
        }
    };
    let mut expires_ms = lease.expires_ms;
    let mut renewals = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    renewals.tick().await; // the first tick is immediate
    let held = loop {
        tokio::select! {
            status = child.wait() => break match status {
                Ok(status) => Held::Exited(exit_status(status)),
                Err(err) => Held::Spawn(err),
            },
            signal = signals.next() => forward(&child, signal),
            _ = renewals.tick() => match client.renew(name.clone(), lease.fence, ttl).await {
                Ok(renewed) if renewed.acquired => expires_ms = renewed.expires_ms,
                Ok(_) => break lose(&mut child).await,
                // A transient failure: try again at the next tick, while the lease lasts.
                Err(err) if now_ms() < expires_ms => {
                    eprintln!("ipcctl: warning: renewing lock {name:?}: {err}");
                }
                Err(_) => break lose(&mut child).await,
            },
        }
    };
    if !matches!(held, Held::Lost)
        && let Err(err) = client.unlock(name.clone(), lease.fence).await
    {
        eprintln!("ipcctl: warning: unlocking {name:?} (it expires by itself): {err}");
    }
    Ok(held)
}

/// SIGINT, SIGTERM and SIGHUP sent to ipcctl go to the command, so that it ends (or
/// not) by its own rules and the lock is still released when it does.
struct Forwarded {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Forwarded {
    fn new() -> Result<Self, Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind| {
            signal(kind).map_err(|e| Error::Config(format!("cannot listen for signals: {e}")))
        };
        Ok(Self {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal;
        tokio::select! {
            _ = self.interrupt.recv() => Signal::SIGINT,
            _ = self.terminate.recv() => Signal::SIGTERM,
            _ = self.hangup.recv() => Signal::SIGHUP,
        }
    }
}

fn forward(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

async fn lose(child: &mut tokio::process::Child) -> Held {
    let _ = child.kill().await;
    Held::Lost
}

/// The command's status as ipcctl's own: its code, or 128 + the signal that ended it
/// (as shells report it).
fn exit_status(status: std::process::ExitStatus) -> ExitCode {
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return ExitCode::from(u8::try_from(128 + signal).unwrap_or(255));
    }
    let code = status.code().unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `ipcctl lock`'s refusal line: who holds the lock and until when.
fn held_by(name: &str, lease: &Lease) -> String {
    let left = Duration::from_millis(u64::try_from(lease.expires_ms - now_ms()).unwrap_or(0));
    format!(
        "lock {name:?} not acquired: held by {:?} for another {left:?} (unless renewed)",
        lease.holder
    )
}

/// `ipcctl lock`: its messages and exit status.
pub async fn lock_command(
    client: &Client,
    addr: &str,
    name: String,
    ttl: Duration,
    wait: Duration,
    command: &[String],
) -> ExitCode {
    match lock(client, name.clone(), ttl, wait, command).await {
        Ok(Held::Exited(status)) => status,
        Ok(Held::NotAcquired(lease)) => fail(exit::REFUSED, &held_by(&name, &lease)),
        Ok(Held::Lost) => fail(
            exit::REFUSED,
            &format!("lost lock {name:?} (not renewed in time); killed the command"),
        ),
        Ok(Held::Spawn(err)) => fail(exit::OTHER, &format!("running {:?}: {err}", command[0])),
        Err(err) => report(addr, &err),
    }
}

/// `ipcctl unlock`: prints {"released":bool}; 8 when nothing was released.
pub async fn unlock_command(client: &Client, addr: &str, name: String, fence: u64) -> ExitCode {
    match client.unlock(name, fence).await {
        Ok(released) => printed(&serde_json::json!({ "released": released }), released),
        Err(err) => report(addr, &err),
    }
}

/// `ipcctl limit`: prints the answer; 8 when not allowed.
pub fn limit_command(addr: &str, answer: Result<LimitAnswer, Error>) -> ExitCode {
    match answer {
        Ok(answer) => printed(
            &serde_json::json!({
                "allowed": answer.allowed,
                "remaining": answer.remaining,
                "retry_after_ms": answer.retry_after.as_millis(),
            }),
            answer.allowed,
        ),
        Err(err) => report(addr, &err),
    }
}

fn printed(json: &serde_json::Value, success: bool) -> ExitCode {
    match print_json(json) {
        Err(err) => fail(exit::OTHER, &format!("writing output: {err}")),
        Ok(()) if success => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(exit::REFUSED),
    }
}
