//! The results of a run: rows of figures (or the reason a peer was skipped), the
//! table printed to stdout with ratios against fleet-ipc measured in the same run,
//! the targets of issues 2 and 8 checked, and the JSON file.

use std::fmt::Write as _;

use serde::Serialize;

/// Names of the peers, as rows and targets refer to them.
pub mod peers {
    pub const FLEET: &str = "fleet-ipc";
    pub const FLEET_REDIS: &str = "fleet-ipc+Redis";
    /// The same systems with the publisher on one Publish stream.
    pub const FLEET_PUBLISH: &str = "fleet-ipc Publish stream";
    pub const FLEET_REDIS_PUBLISH: &str = "fleet-ipc+Redis Publish stream";
    /// SendMsg to a responder that answers on its Serve stream.
    pub const FLEET_SERVE: &str = "fleet-ipc, replies on Serve";
    pub const NATS: &str = "NATS core";
    pub const REDIS_PUBSUB: &str = "Redis PUBLISH/SUBSCRIBE";
    pub const REDIS_XADD: &str = "Redis XADD+XREAD";
    pub const NATS_REQUEST: &str = "NATS request/reply";
    pub const FLEET_PING: &str = "fleet-ipc ping (node answers; 1 RPC)";
    pub const DIRECT: &str = "fleet-ipc direct (TCP)";
    pub const SIDECAR: &str = "fleet-ipc via sidecar";
    /// Lock, Unlock, Limit through one replica on Redis (workload 7).
    pub const FLEET_REDIS_REPLICA: &str = "fleet-ipc+Redis (one replica)";
    /// The same operations sent straight to Redis by the benchmark.
    pub const REDIS_DIRECT: &str = "Redis direct";
    /// The floors under them: one unary call on a bare tonic server (health
    /// `Check`, a process of its own), and one `PING` to the same Redis.
    pub const BARE_TONIC: &str = "bare tonic (health Check; 1 RPC)";
    pub const REDIS_PING: &str = "Redis PING";
    /// The floors of issue 18 (`floor.rs`): the same clients on a bare tonic
    /// broker, and through a bare relay to it.
    pub const BARE_PUBLISH: &str = "bare gRPC broker, Publish stream (floor)";
    pub const BARE_BROKER: &str = "bare gRPC broker (floor)";
    pub const BARE_SERVE: &str = "bare gRPC broker, replies on Serve (floor)";
    pub const BARE_DIRECT: &str = "bare gRPC broker direct (floor)";
    pub const BARE_RELAY: &str = "bare gRPC broker via bare relay (floor)";
    /// Workload 8: two replicas on a TLS Redis with one Redis replica.
    pub const FLEET_REDIS_TLS: &str = "fleet-ipc+Redis TLS";
    pub const FLEET_REDIS_TLS_WAIT: &str = "fleet-ipc+Redis TLS, --redis-min-replicas 1";
    pub const REDIS_XADD_TLS: &str = "Redis XADD+XREAD, TLS";
    pub const REDIS_XADD_WAIT_TLS: &str = "Redis XADD+WAIT 1 0+XREAD, TLS";
    /// Workload 9: one replica finding the primary through three Sentinels.
    pub const FLEET_SENTINEL: &str = "fleet-ipc via Sentinel";
    /// Workload 10: Gather to responders answering on their Serve streams.
    pub const FLEET_GATHER: &str = "fleet-ipc Gather, replies on Serve";
    /// One request to a subject with N subscribers, N replies on one inbox.
    pub const NATS_SCATTER: &str = "NATS scatter-gather";
    /// A Rollout, against one Gather of a wave's size.
    pub const FLEET_ROLLOUT: &str = "fleet-ipc Rollout";
    /// Issue 13's floor: the same Gather on the bare broker.
    pub const BARE_GATHER: &str = "bare gRPC broker, Gather on Serve (floor)";
}

/// Names of the workloads.
pub mod workloads {
    pub const THROUGHPUT: &str = "1 broadcast throughput";
    pub const LATENCY: &str = "2 publish→deliver latency";
    pub const REQUEST: &str = "3 request round trip";
    pub const FANOUT: &str = "4 fan-out of one broadcast";
    pub const MEMORY: &str = "5 memory per idle subscriber";
    pub const SIDECAR_HOP: &str = "6 sidecar hop";
    pub const COORD: &str = "7 lock and limit";
    /// Workload 7's case for the floors: one bare round trip, sequential.
    pub const ROUND_TRIP: &str = "one round trip, sequential";
    pub const DURABLE: &str = "8 TLS Redis with a replica";
    pub const FAILOVER: &str = "9 a killed Redis primary";
    pub const FLEET_OPS: &str = "10 Gather and Rollout";
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub metric: String,
    pub value: f64,
    pub unit: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    pub case: String,
    pub peer: String,
    pub figures: Vec<Figure>,
    /// Why there are no figures (the peer is unavailable, or the run failed).
    pub skipped: Option<String>,
    /// What else the reader should know about this measurement.
    pub note: Option<String>,
}

impl Row {
    pub fn figure(&self, metric: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.metric == metric)
            .map(|f| f.value)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    /// `None` when the figures it needs were not measured.
    pub met: Option<bool>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub command: String,
    pub quick: bool,
    pub machine: String,
    pub server_binary: String,
    pub sidecar_binary: String,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    /// Wrong answers (not slowness): the run exits non-zero when there are any.
    pub failures: Vec<String>,
}

impl Report {
    pub fn add(
        &mut self,
        workload: &str,
        case: &str,
        peer: &str,
        figures: Vec<(&str, f64, &str)>,
        note: Option<String>,
    ) {
        self.rows.push(Row {
            workload: workload.into(),
            case: case.into(),
            peer: peer.into(),
            figures: figures
                .into_iter()
                .map(|(metric, value, unit)| Figure {
                    metric: metric.into(),
                    value,
                    unit: unit.into(),
                })
                .collect(),
            skipped: None,
            note,
        });
    }

    pub fn skip(&mut self, workload: &str, case: &str, peer: &str, reason: impl Into<String>) {
        let reason = reason.into();
        eprintln!("ipc-bench: {workload} / {case} / {peer}: skipped: {reason}");
        self.rows.push(Row {
            workload: workload.into(),
            case: case.into(),
            peer: peer.into(),
            figures: Vec::new(),
            skipped: Some(reason),
            note: None,
        });
    }

    /// A wrong answer of the system under test: a row saying so, and the run
    /// fails.
    pub fn fail(&mut self, workload: &str, case: &str, peer: &str, reason: impl Into<String>) {
        let reason = reason.into();
        eprintln!("ipc-bench: {workload} / {case} / {peer}: FAILED: {reason}");
        self.failures
            .push(format!("{workload} / {case} / {peer}: {reason}"));
        self.rows.push(Row {
            workload: workload.into(),
            case: case.into(),
            peer: peer.into(),
            figures: Vec::new(),
            skipped: Some(format!("FAILED: {reason}")),
            note: None,
        });
    }

    fn find(&self, workload: &str, case: &str, peer: &str) -> Option<&Row> {
        self.rows.iter().find(|r| {
            r.workload == workload && r.case == case && r.peer == peer && r.skipped.is_none()
        })
    }

    fn figure(&self, workload: &str, case: &str, peer: &str, metric: &str) -> Option<f64> {
        self.find(workload, case, peer)?.figure(metric)
    }

    /// The comparison column of a row: fleet-ipc's figure ÷ this peer's, per metric
    /// (throughput: > 1 means fleet-ipc is faster; latency and memory: < 1 means
    /// fleet-ipc is better). The sidecar row shows what the hop adds.
    fn versus(&self, row: &Row) -> String {
        if row.skipped.is_some() {
            return String::new();
        }
        let mut parts = Vec::new();
        let mut compare = |reference: &str, label: &str, difference: bool| {
            let Some(base) = self.find(&row.workload, &row.case, reference) else {
                return;
            };
            let mut out = Vec::new();
            for figure in &row.figures {
                let Some(base_value) = base.figure(&figure.metric) else {
                    continue;
                };
                if difference {
                    out.push(format!(
                        "{} {}",
                        figure.metric,
                        signed(figure.value - base_value, &figure.unit)
                    ));
                } else if figure.value > 0.0 {
                    out.push(format!(
                        "{} {:.2}",
                        figure.metric,
                        base_value / figure.value
                    ));
                }
            }
            if !out.is_empty() {
                parts.push(format!("{label}: {}", out.join(", ")));
            }
        };
        match row.peer.as_str() {
            peers::FLEET | peers::DIRECT => {}
            peers::SIDECAR => compare(peers::DIRECT, "added by the hop", true),
            peers::REDIS_PUBSUB | peers::REDIS_XADD => {
                compare(peers::FLEET_REDIS, "fleet-ipc+Redis ÷ this", false);
                compare(
                    peers::FLEET_REDIS_PUBLISH,
                    "fleet-ipc+Redis Publish ÷ this",
                    false,
                );
                compare(peers::FLEET, "fleet-ipc ÷ this", false);
            }
            peers::NATS => {
                compare(peers::FLEET, "fleet-ipc ÷ this", false);
                compare(peers::FLEET_PUBLISH, "fleet-ipc Publish ÷ this", false);
            }
            peers::FLEET_REDIS_TLS_WAIT => compare(
                peers::FLEET_REDIS_TLS,
                "fleet-ipc TLS without waiting ÷ this",
                false,
            ),
            peers::REDIS_XADD_TLS => compare(peers::FLEET_REDIS_TLS, "fleet-ipc TLS ÷ this", false),
            peers::REDIS_XADD_WAIT_TLS => compare(
                peers::FLEET_REDIS_TLS_WAIT,
                "fleet-ipc TLS min-replicas 1 ÷ this",
                false,
            ),
            peers::REDIS_DIRECT => {
                compare(peers::FLEET_REDIS_REPLICA, "fleet-ipc+Redis ÷ this", false)
            }
            peers::NATS_SCATTER => compare(peers::FLEET_GATHER, "fleet-ipc ÷ this", false),
            peers::NATS_REQUEST => {
                compare(peers::FLEET, "fleet-ipc ÷ this", false);
                compare(peers::FLEET_SERVE, "fleet-ipc Serve ÷ this", false);
            }
            _ => compare(peers::FLEET, "fleet-ipc ÷ this", false),
        }
        parts.join("; ")
    }

    /// The table as Markdown (readable as plain text too).
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("| workload | case | peer | figures | ratios |\n");
        out.push_str("|---|---|---|---|---|\n");
        for row in &self.rows {
            let figures = match &row.skipped {
                Some(reason) => format!("skipped: {reason}"),
                None => {
                    let mut text = row
                        .figures
                        .iter()
                        .map(|f| format!("{} {}", f.metric, human(f.value, &f.unit)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    if let Some(note) = &row.note {
                        let _ = write!(text, " ({note})");
                    }
                    text
                }
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                row.workload,
                row.case,
                row.peer,
                figures,
                self.versus(row)
            );
        }
        out
    }

    /// Checks the targets of issues 2 and 8 against this run's figures.
    pub fn check_targets(&mut self) {
        use peers::*;
        use workloads::*;
        let mut targets = Vec::new();
        let mut ratio_target = |target: &str,
                                value: Option<(f64, f64)>,
                                at_least: Option<f64>,
                                at_most: Option<f64>| {
            let (measured, met) = match value {
                Some((a, b)) if b > 0.0 => {
                    let r = a / b;
                    let met = at_least.is_none_or(|t| r >= t) && at_most.is_none_or(|t| r <= t);
                    (format!("{r:.2}"), Some(met))
                }
                _ => ("not measured".into(), None),
            };
            targets.push(Target {
                target: target.into(),
                measured,
                met,
            });
        };
        let tp = |peer: &str, case: &str| self.figure(THROUGHPUT, case, peer, "deliveries/s");
        let both = |a: Option<f64>, b: Option<f64>| a.zip(b);
        ratio_target(
            "embedded throughput ≥ 0.5 × NATS core at 100 subscribers",
            both(tp(FLEET, "100 subscribers"), tp(NATS, "100 subscribers")),
            Some(0.5),
            None,
        );
        for case in ["1 subscriber", "10 subscribers", "100 subscribers"] {
            ratio_target(
                &format!("fleet-ipc+Redis ≥ 0.8 × raw Redis XADD, {case}"),
                both(tp(FLEET_REDIS, case), tp(REDIS_XADD, case)),
                Some(0.8),
                None,
            );
            ratio_target(
                &format!("fleet-ipc+Redis ≥ 1.0 × Redis PUBLISH, {case}"),
                both(tp(FLEET_REDIS, case), tp(REDIS_PUBSUB, case)),
                Some(1.0),
                None,
            );
        }
        ratio_target(
            "embedded ≥ 500,000 deliveries/s at 100 subscribers (issue 2; ratio to 500k)",
            tp(FLEET, "100 subscribers").map(|v| (v, 500_000.0)),
            Some(1.0),
            None,
        );
        for case in ["sequential", "64 in flight"] {
            ratio_target(
                &format!("SendMsg p50 ≤ 2 × NATS request/reply, {case}"),
                both(
                    self.figure(REQUEST, case, FLEET, "p50"),
                    self.figure(REQUEST, case, NATS_REQUEST, "p50"),
                ),
                None,
                Some(2.0),
            );
        }
        // Issue 18: the streams.
        for (case, at_least) in [("1 subscriber", 0.5), ("100 subscribers", 0.7)] {
            ratio_target(
                &format!("Publish stream ≥ {at_least} × NATS core, {case}"),
                both(tp(FLEET_PUBLISH, case), tp(NATS, case)),
                Some(at_least),
                None,
            );
        }
        for case in ["1 subscriber", "10 subscribers", "100 subscribers"] {
            ratio_target(
                &format!("fleet-ipc+Redis Publish stream ≥ 1.0 × Redis PUBLISH, {case}"),
                both(tp(FLEET_REDIS_PUBLISH, case), tp(REDIS_PUBSUB, case)),
                Some(1.0),
                None,
            );
        }
        for (case, at_most) in [("sequential", 1.5), ("64 in flight", 2.0)] {
            ratio_target(
                &format!("SendMsg, replies on Serve, p50 ≤ {at_most} × NATS request/reply, {case}"),
                both(
                    self.figure(REQUEST, case, FLEET_SERVE, "p50"),
                    self.figure(REQUEST, case, NATS_REQUEST, "p50"),
                ),
                None,
                Some(at_most),
            );
        }
        // Issue 16: coordination through a replica vs Redis directly.
        for operation in ["Lock+Unlock", "Limit"] {
            let case = format!("{operation}, sequential");
            ratio_target(
                &format!("{operation} p50 ≤ 1.5 × the same on Redis directly, sequential"),
                both(
                    self.figure(COORD, &case, FLEET_REDIS_REPLICA, "p50"),
                    self.figure(COORD, &case, REDIS_DIRECT, "p50"),
                ),
                None,
                Some(1.5),
            );
        }
        let mut floors = Vec::new();
        // The floor of any relay between client and Redis: per call one gRPC round
        // trip (bare tonic) and one Redis round trip (PING); a Lock+Unlock is two.
        // Not a target: how far fleet-ipc is above what a relay could reach.
        let floor = both(
            self.figure(COORD, ROUND_TRIP, BARE_TONIC, "p50"),
            self.figure(COORD, ROUND_TRIP, REDIS_PING, "p50"),
        )
        .map(|(grpc, redis)| grpc + redis);
        for (operation, calls) in [("Lock+Unlock", 2.0), ("Limit", 1.0)] {
            let case = format!("{operation}, sequential");
            let value = both(
                self.figure(COORD, &case, FLEET_REDIS_REPLICA, "p50"),
                floor.map(|f| f * calls),
            );
            floors.push(Target {
                target: format!(
                    "(not a target) {operation} p50 ÷ the floor of a relay, {calls} × (bare tonic + Redis PING), sequential"
                ),
                measured: value.map_or("not measured".into(), |(a, b)| format!("{:.2}", a / b)),
                met: None,
            });
        }
        // Issue 18's floors: the same clients on a bare gRPC broker (and through a
        // bare relay), against the peer of each target and against fleet-ipc.
        let mut floor_line = |line: String, value: Option<(f64, f64)>| {
            floors.push(Target {
                target: format!("(not a target) {line}"),
                measured: value
                    .filter(|(_, b)| *b > 0.0)
                    .map_or("not measured".into(), |(a, b)| format!("{:.2}", a / b)),
                met: None,
            });
        };
        let case = "1 subscriber";
        floor_line(
            format!("floor: bare broker Publish stream ÷ NATS core, {case} (target ≥ 0.5)"),
            both(tp(BARE_PUBLISH, case), tp(NATS, case)),
        );
        floor_line(
            format!("fleet-ipc Publish stream ÷ its floor, {case}"),
            both(tp(FLEET_PUBLISH, case), tp(BARE_PUBLISH, case)),
        );
        for (case, at_most) in [("sequential", 1.5), ("64 in flight", 2.0)] {
            let p50 = |peer| self.figure(REQUEST, case, peer, "p50");
            floor_line(
                format!(
                    "floor: bare broker SendMsg, replies on Serve, p50 ÷ NATS request/reply, {case} (target ≤ {at_most})"
                ),
                both(p50(BARE_SERVE), p50(NATS_REQUEST)),
            );
            floor_line(
                format!("fleet-ipc SendMsg, replies on Serve, p50 ÷ its floor, {case}"),
                both(p50(FLEET_SERVE), p50(BARE_SERVE)),
            );
        }
        let hop = |via, direct| {
            let p50 = |peer| self.figure(SIDECAR_HOP, "request, sequential", peer, "p50");
            both(p50(via), p50(direct)).map(|(v, d)| v - d)
        };
        floor_line(
            "floor: a bare relay's hop added to a request p50 ÷ 100 µs (target ≤ 1)".into(),
            hop(BARE_RELAY, BARE_DIRECT).map(|h| (h, 100.0)),
        );
        floor_line(
            "the sidecar's hop ÷ the bare relay's hop".into(),
            both(hop(SIDECAR, DIRECT), hop(BARE_RELAY, BARE_DIRECT)),
        );
        if let Some(case) = self
            .rows
            .iter()
            .find(|r| r.workload == FANOUT && r.peer == BARE_BROKER && r.skipped.is_none())
            .map(|r| r.case.clone())
        {
            let p99 = |peer| self.figure(FANOUT, &case, peer, "p99");
            floor_line(
                format!("floor: bare broker fan-out p99 ÷ NATS core, {case} (target ≤ 2)"),
                both(p99(BARE_BROKER), p99(NATS)),
            );
            floor_line(
                format!("fleet-ipc fan-out p99 ÷ its floor, {case}"),
                both(p99(FLEET), p99(BARE_BROKER)),
            );
        }
        // Issue 13's floor: Gather on the bare broker.
        let gather_floor_cases: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.workload == FLEET_OPS && r.peer == BARE_GATHER && r.skipped.is_none())
            .map(|r| r.case.clone())
            .collect();
        for case in gather_floor_cases {
            let p50 = |peer| self.figure(FLEET_OPS, &case, peer, "p50");
            floor_line(
                format!("floor: bare broker Gather p50 ÷ NATS scatter-gather, {case} (target ≤ 2)"),
                both(p50(BARE_GATHER), p50(NATS_SCATTER)),
            );
            floor_line(
                format!("fleet-ipc Gather p50 ÷ its floor, {case}"),
                both(p50(FLEET_GATHER), p50(BARE_GATHER)),
            );
        }
        // Issue 17: the outage a killed primary causes, against Sentinel's own.
        let worst_failover = self
            .rows
            .iter()
            .filter(|r| r.workload == FAILOVER && r.peer == FLEET_SENTINEL)
            .filter_map(|r| {
                let first_ack = r.figure("first acknowledged broadcast")?;
                let switch = r.figure("Sentinel +switch-master")?;
                Some((first_ack, switch + 1_000_000.0))
            })
            .max_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
        ratio_target(
            "first broadcast acknowledged after a killed Redis primary ≤ Sentinel's +switch-master + 1 s (worst round; ratio to it)",
            worst_failover,
            None,
            Some(1.0),
        );
        ratio_target(
            "SendMsg p50 ≤ 200 µs, sequential (issue 2; ratio to 200 µs)",
            self.figure(REQUEST, "sequential", FLEET, "p50")
                .map(|v| (v, 200.0)),
            None,
            Some(1.0),
        );
        ratio_target(
            "sidecar hop adds ≤ 100 µs p50 to a request (ratio of the added time to 100 µs)",
            both(
                self.figure(SIDECAR_HOP, "request, sequential", SIDECAR, "p50"),
                self.figure(SIDECAR_HOP, "request, sequential", DIRECT, "p50"),
            )
            .map(|(s, d)| (s - d, 100.0)),
            None,
            Some(1.0),
        );
        let fanout_case = self
            .rows
            .iter()
            .find(|r| r.workload == FANOUT && r.peer == FLEET && r.skipped.is_none())
            .map(|r| r.case.clone());
        if let Some(case) = fanout_case {
            ratio_target(
                &format!("fan-out p99 ≤ 100 ms, {case} (ratio to 100 ms)"),
                self.figure(FANOUT, &case, FLEET, "p99")
                    .map(|v| (v, 100_000.0)),
                None,
                Some(1.0),
            );
        } else {
            ratio_target("fan-out to 10,000 p99 ≤ 100 ms", None, None, None);
        }
        for case in ["1,000 subscribers", "10,000 subscribers"] {
            ratio_target(
                &format!("≤ 16 KiB RSS per idle subscriber stream, {case} (ratio to 16 KiB)"),
                self.figure(MEMORY, case, FLEET, "per subscriber")
                    .map(|v| (v, 16.0)),
                None,
                Some(1.0),
            );
        }
        // Issue 13: Gather and Rollout.
        let cases_of = |peer: &str| -> Vec<String> {
            self.rows
                .iter()
                .filter(|r| r.workload == FLEET_OPS && r.peer == peer && r.skipped.is_none())
                .map(|r| r.case.clone())
                .collect()
        };
        let gather_cases = cases_of(FLEET_GATHER);
        if gather_cases.is_empty() {
            ratio_target("Gather ≤ 2 × NATS scatter-gather", None, None, None);
        }
        for case in gather_cases {
            for metric in ["p50", "p99"] {
                ratio_target(
                    &format!("Gather {metric} ≤ 2 × NATS scatter-gather, {case}"),
                    both(
                        self.figure(FLEET_OPS, &case, FLEET_GATHER, metric),
                        self.figure(FLEET_OPS, &case, NATS_SCATTER, metric),
                    ),
                    None,
                    Some(2.0),
                );
            }
        }
        let rollout_cases = cases_of(FLEET_ROLLOUT);
        if rollout_cases.is_empty() {
            ratio_target("a Rollout's own overhead per wave ≤ 5 ms", None, None, None);
        }
        for case in rollout_cases {
            ratio_target(
                &format!("a Rollout's own overhead per wave ≤ 5 ms, {case} (ratio to 5 ms)"),
                self.figure(FLEET_OPS, &case, FLEET_ROLLOUT, "overhead per wave")
                    .map(|v| (v.max(0.0), 5_000.0)),
                None,
                Some(1.0),
            );
        }
        targets.extend(floors);
        self.targets = targets;
    }

    /// The targets as a Markdown table.
    pub fn targets_table(&self) -> String {
        let mut out = String::from("| target | measured ratio | met |\n|---|---|---|\n");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "—",
            };
            let _ = writeln!(out, "| {} | {} | {} |", t.target, t.measured, met);
        }
        out
    }
}

/// A value with its unit, scaled for reading (µs → ms, /s → k/s).
pub fn human(value: f64, unit: &str) -> String {
    match unit {
        "µs" if value >= 10_000.0 => format!("{:.1} ms", value / 1000.0),
        "µs" if value < 10.0 => format!("{value:.2} µs"),
        "µs" => format!("{value:.0} µs"),
        "/s" if value >= 1_000_000.0 => format!("{:.2} M/s", value / 1e6),
        "/s" if value >= 1_000.0 => format!("{:.1} k/s", value / 1e3),
        "/s" => format!("{value:.0} /s"),
        "KiB" => format!("{value:.1} KiB"),
        "MiB" => format!("{value:.1} MiB"),
        other => format!("{value:.2} {other}"),
    }
}

fn signed(value: f64, unit: &str) -> String {
    let text = human(value.abs(), unit);
    if value < 0.0 {
        format!("−{text}")
    } else {
        format!("+{text}")
    }
}
