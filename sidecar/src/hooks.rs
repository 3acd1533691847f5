//! Hooks: shell commands run for ops, so that a process that speaks no gRPC still
//! obeys fleet commands (`worker:restart=kill -TERM 1`).
//!
//! A hook runs `/bin/sh -c COMMAND` in its own process group with the message as JSON
//! on stdin and `IPC_OP`, `IPC_CHANNEL`, `IPC_SENDER`, `IPC_MSG_ID` (and `TRACEPARENT`
//! when the message is part of a trace) in the environment. Past the timeout the
//! whole group is killed. Runs of one hook never
//! overlap: while one runs, the next broadcast waits its turn and any further
//! broadcast is skipped (logged) — a burst of `config:reload` runs the hook twice, not
//! N times; a request waits its turn until its deadline. A request is answered with
//! the exit code and the tail of the output.
//!
//! The node runs a request's hook ([`PodHooks`]) in its one order of who answers
//! (`ipc_core::node::answer`), for requests from the pod and from the fleet alike;
//! the upstream bus runs a broadcast's hook before its local subscribers see it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use ipc_core::metrics::{Exposition, Kind as MetricKind};
use ipc_core::telemetry::{Hop, Kind, TraceContext};
use ipc_proto::pb::Msg;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use opentelemetry::KeyValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Broadcast runs of one hook accepted at once: the running one and one waiting.
const MAX_ACCEPTED: usize = 2;

/// Bytes of output kept for the reply: the end of stdout and stderr, interleaved.
pub const OUTPUT_TAIL: usize = 4096;

/// How a run ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The last [`OUTPUT_TAIL`] bytes of stdout and stderr.
    pub output: String,
    /// Why the run failed (non-zero exit, signal, timeout, could not start, busy).
    pub error: Option<String>,
}

impl Outcome {
    /// How the run ended, the `status` label of `ipc_sidecar_hook_runs_total`: the
    /// exit code (`0`, `3`), or `timeout`, `signal`, `not_started`.
    pub fn status(&self) -> String {
        if self.timed_out {
            "timeout".into()
        } else if self.signal.is_some() {
            "signal".into()
        } else {
            match self.exit_code {
                Some(code) => code.to_string(),
                None => "not_started".into(),
            }
        }
    }

    /// The reply data: `{"exit_code", "output", "timed_out"}` (and `signal`).
    pub fn data(&self) -> serde_json::Value {
        let mut data = serde_json::json!({
            "exit_code": self.exit_code,
            "output": self.output,
            "timed_out": self.timed_out,
        });
        if let Some(signal) = self.signal {
            data["signal"] = signal.into();
        }
        data
    }
}

struct Hook {
    command: String,
    /// Held by the run in progress.
    running: tokio::sync::Mutex<()>,
    /// Broadcasts for their runs, in order.
    queue: mpsc::Sender<Arc<Msg>>,
    /// Broadcast runs accepted and not finished: the running one and at most one
    /// waiting behind it.
    accepted: AtomicUsize,
    /// Runs by how they ended ([`Outcome::status`]), for `/metrics`.
    runs: parking_lot::Mutex<BTreeMap<String, u64>>,
}

impl Hook {
    fn count(&self, status: String) {
        *self.runs.lock().entry(status).or_default() += 1;
    }
}

/// The configured hooks, by op.
pub struct Hooks {
    hooks: HashMap<String, Arc<Hook>>,
    timeout: Duration,
}

impl Hooks {
    /// Builds the hooks and starts, for each, the task that runs its broadcasts
    /// (call within a Tokio runtime).
    pub fn new(specs: &[(String, String)], timeout: Duration) -> Self {
        let hooks = specs
            .iter()
            .map(|(op, command)| {
                let (queue, runs) = mpsc::channel(MAX_ACCEPTED);
                let hook = Arc::new(Hook {
                    command: command.clone(),
                    running: tokio::sync::Mutex::new(()),
                    queue,
                    accepted: AtomicUsize::new(0),
                    runs: Default::default(),
                });
                tokio::spawn(run_broadcasts(Arc::downgrade(&hook), runs, timeout));
                (op.clone(), hook)
            })
            .collect();
        Self { hooks, timeout }
    }

    /// Whether any hook is configured: then the pod itself answers requests to
    /// its role (for the hooks' ops).
    pub fn any(&self) -> bool {
        !self.hooks.is_empty()
    }

    /// Whether a hook is configured for `op`.
    pub fn has(&self, op: &str) -> bool {
        self.hooks.contains_key(op)
    }

    /// Queues the hook of a broadcast (see the module doc for overlapping runs).
    /// Does nothing for an op without a hook.
    pub fn on_broadcast(&self, msg: Arc<Msg>) {
        let Some(hook) = self.hooks.get(&msg.op) else {
            return;
        };
        if hook.accepted.fetch_add(1, Ordering::AcqRel) >= MAX_ACCEPTED {
            hook.accepted.fetch_sub(1, Ordering::AcqRel);
            hook.count("skipped".into());
            tracing::warn!(op = %msg.op, id = %msg.id, "hook busy with one run waiting; this one skipped");
            return;
        }
        // Never full: `accepted` bounds what is in the queue.
        if hook.queue.try_send(msg).is_err() {
            hook.accepted.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Runs the hook of a request and returns how it ended; waits for a running
    /// run of the same hook, but not past `deadline`.
    pub async fn on_request(&self, msg: &Msg, deadline: Instant) -> Outcome {
        let Some(hook) = self.hooks.get(&msg.op) else {
            return Outcome {
                error: Some(format!("no hook for op {:?}", msg.op)),
                ..Outcome::default()
            };
        };
        let Ok(_turn) = tokio::time::timeout_at(deadline, hook.running.lock()).await else {
            hook.count("skipped".into());
            return Outcome {
                error: Some(format!(
                    "the hook for {:?} was still busy with an earlier run at the deadline",
                    msg.op
                )),
                ..Outcome::default()
            };
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let outcome = run(&hook.command, msg, self.timeout.min(left)).await;
        hook.count(outcome.status());
        outcome
    }

    /// Writes `ipc_sidecar_hook_runs_total`.
    pub fn write_metrics(&self, out: &mut Exposition) {
        out.family(
            "ipc_sidecar_hook_runs_total",
            MetricKind::Counter,
            "Hook commands this sidecar ran for ops sent to the pod, by op and how they ended (exit code, timeout, signal, not_started, or skipped while busy).",
        );
        let mut ops: Vec<_> = self.hooks.iter().collect();
        ops.sort_by(|a, b| a.0.cmp(b.0));
        for (op, hook) in ops {
            for (status, runs) in hook.runs.lock().iter() {
                out.sample(
                    "ipc_sidecar_hook_runs_total",
                    &[("op", op), ("status", status)],
                    runs,
                );
            }
        }
    }
}

/// The hooks as the node answers requests to the pod with them: the reply is the
/// pod's, its data the run's outcome ([`Outcome::data`]) and its `error` the run's.
pub struct PodHooks {
    pub hooks: Arc<Hooks>,
    /// The pod's id: the sender of every reply.
    pub pod: String,
}

#[async_trait]
impl ipc_core::node::Hooks for PodHooks {
    fn has(&self, op: &str) -> bool {
        self.hooks.has(op)
    }

    async fn answer(&self, request: &Msg, deadline: std::time::Instant) -> Msg {
        let outcome = self.hooks.on_request(request, deadline.into()).await;
        Msg {
            op: request.op.clone(),
            data: Some(ipc_proto::json::to_value(&outcome.data())),
            error: outcome.error.unwrap_or_default(),
            sender: self.pod.clone(),
            ts_ms: ipc_core::now_ms(),
            ..Msg::default()
        }
    }
}

/// Runs a hook's broadcasts one after the other until the hook is dropped.
async fn run_broadcasts(hook: Weak<Hook>, mut queue: mpsc::Receiver<Arc<Msg>>, timeout: Duration) {
    while let Some(msg) = queue.recv().await {
        let Some(hook) = hook.upgrade() else { return };
        let outcome = {
            let _turn = hook.running.lock().await;
            run(&hook.command, &msg, timeout).await
        };
        hook.accepted.fetch_sub(1, Ordering::AcqRel);
        hook.count(outcome.status());
        match &outcome.error {
            None => tracing::info!(op = %msg.op, id = %msg.id, "hook ran"),
            Some(error) => {
                tracing::warn!(op = %msg.op, id = %msg.id, %error, output = %outcome.output, "hook failed")
            }
        }
    }
}

/// The message as the JSON a hook reads on stdin.
pub fn msg_json(msg: &Msg) -> serde_json::Value {
    serde_json::json!({
        "op": msg.op,
        "data": ipc_proto::json::from_optional(msg.data.as_ref()),
        "headers": msg.headers,
        "id": msg.id,
        "channel": msg.channel,
        "sender": msg.sender,
        "ts_ms": msg.ts_ms,
        "cursor": msg.cursor,
        "reply_to": msg.reply_to,
    })
}

/// Runs `command` for `msg`, killing its process group after `timeout`.
async fn run(command: &str, msg: &Msg, timeout: Duration) -> Outcome {
    let op = &msg.op;
    let mut hop = Hop::child("hook", Kind::Internal, &msg.headers, || {
        vec![
            KeyValue::new("ipc.op", op.clone()),
            KeyValue::new("ipc.msg_id", msg.id.clone()),
        ]
    });
    // The command is told its trace context (`TRACEPARENT`): its own spans nest
    // under the hook's.
    let traceparent = hop
        .context()
        .cloned()
        .or_else(|| TraceContext::from_headers(&msg.headers))
        .map(|context| context.traceparent());
    let outcome = run_traced(command, msg, timeout, traceparent.as_deref()).await;
    hop.set(|| vec![KeyValue::new("ipc.hook_status", outcome.status())]);
    if let Some(error) = &outcome.error {
        hop.fail(|| error.clone());
    }
    outcome
}

async fn run_traced(
    command: &str,
    msg: &Msg,
    timeout: Duration,
    traceparent: Option<&str>,
) -> Outcome {
    let op = &msg.op;
    match spawn_and_wait(command, msg, timeout, traceparent).await {
        Ok(mut outcome) => {
            outcome.error = if outcome.timed_out {
                Some(format!(
                    "hook for {op:?} timed out after {} ms and was killed",
                    timeout.as_millis()
                ))
            } else if let Some(signal) = outcome.signal {
                Some(format!("hook for {op:?} was killed by signal {signal}"))
            } else {
                match outcome.exit_code {
                    Some(0) => None,
                    Some(code) => Some(format!("hook for {op:?} exited with status {code}")),
                    None => Some(format!("hook for {op:?} ended without a status")),
                }
            };
            outcome
        }
        Err(e) => Outcome {
            error: Some(format!("hook for {op:?} could not start: {e}")),
            ..Outcome::default()
        },
    }
}

async fn spawn_and_wait(
    command: &str,
    msg: &Msg,
    timeout: Duration,
    traceparent: Option<&str>,
) -> std::io::Result<Outcome> {
    use std::os::unix::process::ExitStatusExt;

    // One pipe for stdout and stderr, so the tail interleaves them as they came.
    let (reader, writer) = std::io::pipe()?;
    let writer_err = writer.try_clone()?;
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("IPC_OP", &msg.op)
        .env("IPC_CHANNEL", &msg.channel)
        .env("IPC_SENDER", &msg.sender)
        .env("IPC_MSG_ID", &msg.id)
        .env_remove("TRACEPARENT")
        .stdin(Stdio::piped())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer_err))
        .process_group(0)
        .kill_on_drop(true);
    if let Some(traceparent) = traceparent {
        cmd.env("TRACEPARENT", traceparent);
    }
    let mut child = cmd.spawn()?;
    // Our copies of the write end must close, or the output never ends.
    drop(cmd);
    let group = child.id().map(|pid| Pid::from_raw(pid as i32));
    let mut output = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
    if let Some(mut stdin) = child.stdin.take() {
        let input = serde_json::to_vec(&msg_json(msg)).unwrap_or_default();
        // A command that does not read stdin must not block the hook.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        });
    }

    let deadline = Instant::now() + timeout;
    let mut tail = Tail::default();
    let mut buf = [0u8; 4096];
    let mut eof = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break Some(status?),
            read = output.read(&mut buf), if !eof => match read {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => tail.push(&buf[..n]),
            },
            () = tokio::time::sleep_until(deadline) => break None,
        }
    };
    let timed_out = status.is_none();
    let status = match status {
        Some(status) => status,
        None => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            child.wait().await?
        }
    };
    // What the command wrote before it ended is in the pipe; a background process it
    // left may keep the pipe open, so read on only briefly.
    if !eof {
        let drain = async {
            loop {
                match output.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => tail.push(&buf[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(100), drain).await;
    }
    Ok(Outcome {
        exit_code: status.code(),
        signal: if timed_out { None } else { status.signal() },
        timed_out,
        output: tail.text(),
        error: None,
    })
}

/// The last [`OUTPUT_TAIL`] bytes written.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > OUTPUT_TAIL {
            let cut = self.0.len() - OUTPUT_TAIL;
            self.0.drain(..cut);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(op: &str) -> Msg {
        Msg {
            op: op.into(),
            channel: "shop:worker".into(),
            id: "m-1".into(),
            ..Msg::default()
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test]
    async fn a_request_gets_the_exit_code_and_the_interleaved_output() {
        let hooks = Hooks::new(
            &[("t".into(), "cat; echo; echo oops >&2; exit 3".into())],
            Duration::from_secs(30),
        );
        let outcome = hooks.on_request(&msg("t"), far()).await;
        assert_eq!(outcome.exit_code, Some(3));
        assert!(outcome.output.contains(r#""op":"t""#), "{}", outcome.output);
        assert!(outcome.output.ends_with("oops\n"), "{}", outcome.output);
        assert_eq!(
            outcome.error.as_deref(),
            Some(r#"hook for "t" exited with status 3"#)
        );
    }

    #[tokio::test]
    async fn only_the_tail_of_a_long_output_is_kept() {
        let hooks = Hooks::new(
            &[("t".into(), "seq 1 5000; echo END".into())],
            Duration::from_secs(30),
        );
        let outcome = hooks.on_request(&msg("t"), far()).await;
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(outcome.error, None);
        assert!(outcome.output.len() <= OUTPUT_TAIL);
        assert!(outcome.output.ends_with("5000\nEND\n"));
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let hooks = Hooks::new(
            &[("t".into(), "echo started; sleep 600 & wait".into())],
            Duration::from_millis(300),
        );
        let outcome = hooks.on_request(&msg("t"), far()).await;
        assert!(outcome.timed_out);
        assert_eq!(outcome.output, "started\n");
        assert!(outcome.error.unwrap().contains("timed out"));
    }

    #[tokio::test]
    async fn the_environment_names_the_message() {
        let hooks = Hooks::new(
            &[("t".into(), "echo $IPC_OP $IPC_CHANNEL $IPC_MSG_ID".into())],
            Duration::from_secs(30),
        );
        let outcome = hooks.on_request(&msg("t"), far()).await;
        assert_eq!(outcome.output, "t shop:worker m-1\n");
    }
}
