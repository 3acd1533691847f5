//! Metrics of a node, served at `/metrics` in the Prometheus text format by the
//! server and the sidecar alike: [`scrape`] writes the build, the process, the
//! node's counters, the per-RPC metrics and whatever the bus adds.
//!
//! Plain atomics: the fan-out path adds once per message, not per delivery, and
//! nothing here allocates or locks on that path.
//!
//! # Layout
//! - [`text`]: the exposition writer and the lock-free histogram.
//! - [`process`]: `process_*` from `/proc`.
//! - [`rpc`]: calls by method and status code.

pub mod process;
pub mod rpc;
pub mod text;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use rpc::RpcMetrics;
pub use text::{Exposition, Histogram, Kind};

use crate::node::Node;

/// Which binary serves the metrics: help texts say what each one means there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `ipc-server`, a replica of the control plane.
    Server,
    /// `ipc-sidecar`, a pod's sidecar.
    Sidecar,
}

impl Role {
    /// The text for this role.
    pub fn pick(self, server: &'static str, sidecar: &'static str) -> &'static str {
        match self {
            Role::Server => server,
            Role::Sidecar => sidecar,
        }
    }

    /// How help texts name the binary: "replica" or "sidecar".
    pub fn binary(self) -> &'static str {
        self.pick("replica", "sidecar")
    }
}

/// The binary serving the metrics: its role and build.
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    pub role: Role,
    /// The crate version (`CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// The git commit it was built from, or `unknown`.
    pub commit: &'static str,
}

/// Everything `/metrics` serves for `node`, run as `binary`.
pub fn scrape(node: &Node, binary: &Binary) -> String {
    let role = binary.role;
    let mut out = Exposition::new();
    out.family(
        "ipc_build_info",
        Kind::Gauge,
        &format!(
            "Always 1: the version and git commit this {} was built from.",
            role.binary()
        ),
    );
    out.sample(
        "ipc_build_info",
        &[("version", binary.version), ("commit", binary.commit)],
        1,
    );
    if let Some(process) = process::ProcessStats::read() {
        process.write(&mut out, role.binary());
    }
    out.gauge(
        "ipc_bus_up",
        role.pick(
            "1 while this replica's bus works (Redis reachable, log tailed, presence kept) and it reports SERVING; else 0.",
            "1 while this sidecar is subscribed to the control plane and reports SERVING; else 0.",
        ),
        u8::from(*node.bus().health().borrow()),
    );
    node.metrics().write(&mut out, role);
    node.bus().write_metrics(&mut out);
    out.finish()
}

/// How a SendMsg ended.
#[derive(Debug, Clone, Copy)]
pub enum SendOutcome {
    Replied,
    NoResponders,
    DeadlineExceeded,
    Failed,
}

/// Why a request was refused by a limit or by authorization: the `reason` label of
/// `ipc_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A message above `--max-msg-bytes`.
    MsgBytes,
    /// More headers (or labels) than `--max-headers`.
    Headers,
    /// Headers (or labels) larger in total than `--max-header-bytes`.
    HeaderBytes,
    /// More channels in one subscription than `--max-channels`.
    Channels,
    /// More live subscriptions for one identity than `--max-subscriptions-per-identity`.
    Subscriptions,
    /// More live subscriber streams on the node than `--max-streams`.
    Streams,
    /// More requests per second from one identity than `--rate-limit`.
    Rate,
    /// A `timeout_ms` above `--max-timeout-ms`.
    Timeout,
    /// No credentials, or wrong ones.
    Unauthenticated,
    /// Authenticated, but the token's grants do not cover the request.
    PermissionDenied,
    /// A connection over `--max-connections`.
    Connections,
    /// A connection over `--max-connections-per-peer`.
    ConnectionsPerPeer,
    /// A request body not received within `--body-timeout-ms`.
    BodyTimeout,
    /// Request bodies being received over `--max-request-buffer-bytes`.
    RequestBuffer,
}

impl Refusal {
    pub const ALL: [Refusal; 14] = [
        Refusal::MsgBytes,
        Refusal::Headers,
        Refusal::HeaderBytes,
        Refusal::Channels,
        Refusal::Subscriptions,
        Refusal::Streams,
        Refusal::Rate,
        Refusal::Timeout,
        Refusal::Unauthenticated,
        Refusal::PermissionDenied,
        Refusal::Connections,
        Refusal::ConnectionsPerPeer,
        Refusal::BodyTimeout,
        Refusal::RequestBuffer,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MsgBytes => "msg_bytes",
            Refusal::Headers => "headers",
            Refusal::HeaderBytes => "header_bytes",
            Refusal::Channels => "channels",
            Refusal::Subscriptions => "subscriptions_per_identity",
            Refusal::Streams => "streams",
            Refusal::Rate => "rate",
            Refusal::Timeout => "timeout",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::PermissionDenied => "permission_denied",
            Refusal::Connections => "connections",
            Refusal::ConnectionsPerPeer => "connections_per_peer",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::RequestBuffer => "request_buffer",
        }
    }
}

pub struct Metrics {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub subscribers: AtomicI64,
    pub slow_cutoffs: AtomicU64,
    pub rejected: AtomicU64,
    send_replied: AtomicU64,
    send_no_responders: AtomicU64,
    send_deadline: AtomicU64,
    send_failed: AtomicU64,
    send_latency: Histogram,
    refusals: [AtomicU64; Refusal::ALL.len()],
    /// Tokens-file reloads that took effect.
    pub token_reloads: AtomicU64,
    /// Tokens-file reloads refused (the previous file stays in force).
    pub token_reload_failures: AtomicU64,
    /// Open client connections (TCP listeners guarded by [`crate::connections`]).
    pub connections: AtomicI64,
    /// Connections closed because they were idle past their deadline.
    pub idle_closes: AtomicU64,
    /// Streams ended because their token was removed or changed (SIGHUP).
    pub revoked_streams: AtomicU64,
    /// Lock calls on this node waiting for a lease now.
    pub lock_waiters: AtomicI64,
    /// Gather and Rollout operations finished, by `Ledger.State` (index = the
    /// enum's number).
    ops_finished: [AtomicU64; LEDGER_STATES.len()],
    /// Gather, Rollout started.
    ops_started: [AtomicU64; 2],
    /// Members' outcomes, by `Outcome.Status` (index = the enum's number).
    op_outcomes: [AtomicU64; OUTCOME_STATUSES.len()],
    wave_count: AtomicU64,
    wave_sum_micros: AtomicU64,
    /// `ipc:gap` notices handed to subscribers.
    pub gaps: AtomicU64,
    /// Calls of `ipc.v1.Ipc` by method and code.
    pub rpc: RpcMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            accepted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            subscribers: AtomicI64::new(0),
            slow_cutoffs: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            send_replied: AtomicU64::new(0),
            send_no_responders: AtomicU64::new(0),
            send_deadline: AtomicU64::new(0),
            send_failed: AtomicU64::new(0),
            send_latency: Histogram::latency(),
            refusals: Default::default(),
            token_reloads: AtomicU64::new(0),
            token_reload_failures: AtomicU64::new(0),
            connections: AtomicI64::new(0),
            idle_closes: AtomicU64::new(0),
            revoked_streams: AtomicU64::new(0),
            lock_waiters: AtomicI64::new(0),
            ops_finished: Default::default(),
            ops_started: Default::default(),
            op_outcomes: Default::default(),
            wave_count: AtomicU64::new(0),
            wave_sum_micros: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            rpc: RpcMetrics::default(),
        }
    }
}

/// Label values of `Ledger.State`, by number (`ipc_operations_finished_total{state}`).
const LEDGER_STATES: [&str; 6] = [
    "unspecified",
    "running",
    "done",
    "stopped",
    "cancelled",
    "dry_run",
];

/// Label values of `Outcome.Status`, by number.
const OUTCOME_STATUSES: [&str; 6] = [
    "pending",
    "ok",
    "failed",
    "no_reply",
    "not_ready",
    "skipped",
];

impl Metrics {
    /// Counts a Gather or Rollout that starts asking.
    pub fn operation_started(&self, kind: crate::fleetops::ledger::Kind) {
        let index = match kind {
            crate::fleetops::ledger::Kind::Gather => 0,
            crate::fleetops::ledger::Kind::Rollout => 1,
        };
        self.ops_started[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one member's outcome (an `Outcome.Status` number).
    pub fn outcome(&self, status: i32) {
        if let Some(c) = usize::try_from(status)
            .ok()
            .and_then(|i| self.op_outcomes.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the time a Rollout wave took, from its first request to its last
    /// member answered (and back, with a ready timeout).
    pub fn wave(&self, took: Duration) {
        self.wave_count.fetch_add(1, Ordering::Relaxed);
        self.wave_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Gather and Rollout families besides `ipc_operations_finished_total`.
    fn write_operations(&self, out: &mut Exposition) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.family(
            "ipc_operations_started_total",
            Kind::Counter,
            "Gather and Rollout operations coordinated here, by kind.",
        );
        for (kind, c) in ["gather", "rollout"].iter().zip(&self.ops_started) {
            out.sample("ipc_operations_started_total", &[("kind", kind)], get(c));
        }
        out.family(
            "ipc_operation_outcomes_total",
            Kind::Counter,
            "Members' outcomes in Gather and Rollout ledgers, by status.",
        );
        for (status, c) in OUTCOME_STATUSES.iter().zip(&self.op_outcomes).skip(1) {
            out.sample(
                "ipc_operation_outcomes_total",
                &[("status", status)],
                get(c),
            );
        }
        out.counter(
            "ipc_rollout_wave_seconds_total",
            "Time spent in Rollout waves, first request to last member answered (and back); divide by ipc_rollout_waves_total for the mean.",
            get(&self.wave_sum_micros) as f64 / 1e6,
        );
        out.counter(
            "ipc_rollout_waves_total",
            "Rollout waves run here.",
            get(&self.wave_count),
        );
    }

    /// Counts a Gather or Rollout finished in `state` (a `Ledger.State` number).
    pub fn operation_finished(&self, state: i32) {
        if let Some(c) = usize::try_from(state)
            .ok()
            .and_then(|i| self.ops_finished.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request refused for `reason`.
    pub fn refuse(&self, reason: Refusal) {
        self.refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests were refused for `reason`.
    pub fn refusals(&self, reason: Refusal) -> u64 {
        self.refusals[reason as usize].load(Ordering::Relaxed)
    }

    pub fn record_send(&self, outcome: SendOutcome, elapsed: Duration) {
        let counter = match outcome {
            SendOutcome::Replied => &self.send_replied,
            SendOutcome::NoResponders => &self.send_no_responders,
            SendOutcome::DeadlineExceeded => &self.send_deadline,
            SendOutcome::Failed => &self.send_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.send_latency.observe_duration(elapsed);
    }

    /// The node's own families, with help texts for the binary that serves them.
    pub fn write(&self, out: &mut Exposition, role: Role) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.counter(
            "ipc_messages_accepted_total",
            role.pick(
                "Broadcasts this replica stored in the bus log for its callers.",
                "Broadcasts of this pod's processes that the control plane accepted.",
            ),
            get(&self.accepted),
        );
        out.counter(
            "ipc_messages_delivered_total",
            role.pick(
                "Messages this replica handed to its subscriber streams (clients and sidecars).",
                "Messages this sidecar handed to subscriber streams of the pod's processes.",
            ),
            get(&self.delivered),
        );
        out.counter(
            "ipc_slow_subscriber_cutoffs_total",
            role.pick(
                "Subscriber streams of this replica cut off because their queue was full (they resume with their cursor).",
                "Subscriber streams of the pod's processes cut off because their queue was full (they resume with their cursor).",
            ),
            get(&self.slow_cutoffs),
        );
        out.counter(
            "ipc_requests_rejected_total",
            role.pick(
                "Broadcast and SendMsg calls this replica refused for bad input or a size limit.",
                "Broadcast and SendMsg calls of the pod's processes this sidecar refused for bad input or a size limit.",
            ),
            get(&self.rejected),
        );
        out.counter(
            "ipc_idle_connections_closed_total",
            role.pick(
                "Connections to this replica closed with no call in progress past --handshake-timeout-ms or --idle-timeout-ms.",
                "Connections to this sidecar closed with no call in progress past their idle deadline.",
            ),
            get(&self.idle_closes),
        );
        out.counter(
            "ipc_revoked_streams_total",
            role.pick(
                "Streams of this replica ended because their token was removed or changed in the tokens file.",
                "Streams of this sidecar ended because their token was removed or changed.",
            ),
            get(&self.revoked_streams),
        );
        out.family(
            "ipc_refusals_total",
            Kind::Counter,
            role.pick(
                "Requests this replica refused by a limit or by authorization, by reason.",
                "Requests of the pod's processes this sidecar refused by a limit, by reason.",
            ),
        );
        for reason in Refusal::ALL {
            out.sample(
                "ipc_refusals_total",
                &[("reason", reason.as_str())],
                self.refusals(reason),
            );
        }
        out.family(
            "ipc_token_reloads_total",
            Kind::Counter,
            role.pick(
                "Reloads of this replica's tokens file (SIGHUP) by result; on error the previous file stays in force.",
                "Reloads of the sidecar's upstream token file by result.",
            ),
        );
        out.sample(
            "ipc_token_reloads_total",
            &[("result", "ok")],
            get(&self.token_reloads),
        );
        out.sample(
            "ipc_token_reloads_total",
            &[("result", "error")],
            get(&self.token_reload_failures),
        );
        out.counter(
            "ipc_gaps_total",
            role.pick(
                "ipc:gap notices this replica sent to subscribers: messages they may have missed (retention passed their cursor, or the log was lost).",
                "ipc:gap notices this sidecar sent to the pod's subscribers: messages they may have missed (its buffer or the control plane's log no longer had them).",
            ),
            get(&self.gaps),
        );
        out.gauge(
            "ipc_connections",
            role.pick(
                "Open client connections to this replica's gRPC port.",
                "Open connections to this sidecar.",
            ),
            self.connections.load(Ordering::Relaxed),
        );
        out.gauge(
            "ipc_subscribers",
            role.pick(
                "Live subscriber streams on this replica (a sidecar's whole pod is one).",
                "Live subscriber streams of the pod's processes on this sidecar's socket.",
            ),
            self.subscribers.load(Ordering::Relaxed),
        );
        out.family(
            "ipc_sendmsg_total",
            Kind::Counter,
            role.pick(
                "SendMsg calls made to this replica, by outcome.",
                "SendMsg calls of the pod's processes, by outcome.",
            ),
        );
        for (outcome, c) in [
            ("replied", &self.send_replied),
            ("no_responders", &self.send_no_responders),
            ("deadline_exceeded", &self.send_deadline),
            ("failed", &self.send_failed),
        ] {
            out.sample("ipc_sendmsg_total", &[("outcome", outcome)], get(c));
        }
        out.family(
            "ipc_sendmsg_duration_seconds",
            Kind::Histogram,
            role.pick(
                "SendMsg latency seen by callers of this replica, from request to reply (or failure).",
                "SendMsg latency seen by the pod's processes, from request to reply (or failure).",
            ),
        );
        out.histogram("ipc_sendmsg_duration_seconds", &[], &self.send_latency);
        out.gauge(
            "ipc_lock_waiters",
            role.pick(
                "Lock calls waiting for a lease on this replica.",
                "Lock calls of the pod's processes waiting for a lease.",
            ),
            self.lock_waiters.load(Ordering::Relaxed),
        );
        out.family(
            "ipc_operations_finished_total",
            Kind::Counter,
            role.pick(
                "Gather and Rollout operations started on this replica that finished, by ledger state (stopped: a rollout halted part-way).",
                "Gather and Rollout operations of the pod's processes that finished, by ledger state (stopped: a rollout halted part-way).",
            ),
        );
        // Only final states: unspecified and running are never a finish.
        for (state, c) in LEDGER_STATES.iter().zip(&self.ops_finished).skip(2) {
            out.sample("ipc_operations_finished_total", &[("state", state)], get(c));
        }
        self.write_operations(out);
        self.rpc.write(out, role.binary());
    }
}
