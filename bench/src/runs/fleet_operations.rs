//! Workload 10: Gather across many responders beside NATS scatter-gather, and a
//! Rollout's own overhead per wave.

use super::pubsub::floor_broker;
use super::thousands;
use crate::args::{STREAMS_PER_CONNECTION, Sizes};
use crate::fleet::Target;
use crate::fleetops;
use crate::report::{Report, peers, workloads as names};
use crate::systems::Systems;
use crate::workloads::percentile_us;

/// Workload 10 (issue 13): Gather across many responders answering on their Serve
/// streams vs NATS scatter-gather, then a Rollout's own overhead per wave. Each
/// case gets a fresh embedded server. A wrong ledger fails the run.
pub async fn run_fleet_operations(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    for &responders in &sizes.gather_responders {
        let case = gather_case(responders);
        let rounds = sizes.gather_rounds;
        match systems.embedded() {
            Err(reason) => report.skip(names::FLEET_OPS, &case, peers::FLEET_GATHER, reason),
            Ok(server) => {
                let target = Target::Tcp(server.grpc);
                let pid = server.process.pid();
                gather_row(
                    report,
                    &case,
                    peers::FLEET_GATHER,
                    &target,
                    pid,
                    responders,
                    sizes,
                )
                .await;
            }
        }
        match &systems.nats {
            Err(reason) => report.skip(names::FLEET_OPS, &case, peers::NATS_SCATTER, reason),
            Ok(nats_server) => {
                eprintln!("ipc-bench: {case}, {}", peers::NATS_SCATTER);
                match fleetops::nats_scatter_gather(
                    &nats_server.url(),
                    nats_server.process.pid(),
                    responders,
                    STREAMS_PER_CONNECTION,
                    rounds,
                    sizes.deadline,
                )
                .await
                {
                    Ok(r) => report.add(
                        names::FLEET_OPS,
                        &case,
                        peers::NATS_SCATTER,
                        rounds_figures(&r),
                        Some(format!(
                            "{rounds} rounds, every reply once; subscribing took {:.1} s",
                            r.open_seconds
                        )),
                    ),
                    Err(e) => report.skip(
                        names::FLEET_OPS,
                        &case,
                        peers::NATS_SCATTER,
                        format!("failed: {e:#}"),
                    ),
                }
            }
        }
    }
    if let Some(broker) = floor_broker(systems).await {
        for &responders in &sizes.gather_responders {
            let case = gather_case(responders);
            match &broker {
                Err(reason) => {
                    report.skip(names::FLEET_OPS, &case, peers::BARE_GATHER, reason.clone())
                }
                Ok(broker) => {
                    let pid = broker.process.id().unwrap_or_default();
                    let target = broker.target();
                    gather_row(
                        report,
                        &case,
                        peers::BARE_GATHER,
                        &target,
                        pid,
                        responders,
                        sizes,
                    )
                    .await;
                }
            }
        }
    }
    for &(members, wave_size) in &sizes.rollout_cases {
        let waves = members.div_ceil(wave_size);
        let case = format!("Rollout, {members} members, wave_size {wave_size} ({waves} waves)");
        let name = peers::FLEET_ROLLOUT;
        let server = match systems.embedded() {
            Ok(server) => server,
            Err(reason) => {
                report.skip(names::FLEET_OPS, &case, name, reason);
                continue;
            }
        };
        eprintln!("ipc-bench: {case}, {name}");
        match fleetops::fleet_rollout(
            &Target::Tcp(server.grpc),
            members,
            wave_size,
            STREAMS_PER_CONNECTION,
            sizes.rollout_rounds,
            sizes.deadline,
        )
        .await
        {
            Ok(r) => {
                let rollout = percentile_us(&r.rollout, 50.0);
                let per_wave = rollout / f64::from(r.waves.max(1));
                let gather = percentile_us(&r.gather_of_wave, 50.0);
                report.add(
                    names::FLEET_OPS,
                    &case,
                    name,
                    vec![
                        ("Rollout p50", rollout, "µs"),
                        ("per wave", per_wave, "µs"),
                        ("one Gather of a wave p50", gather, "µs"),
                        ("overhead per wave", per_wave - gather, "µs"),
                    ],
                    Some(format!(
                        "{} Rollouts, {} Gathers of {wave_size} members in between; every ledger all OK",
                        sizes.rollout_rounds,
                        r.gather_of_wave.len()
                    )),
                );
            }
            Err(e) => record_failure(report, &case, name, e),
        }
    }
}

fn gather_case(responders: usize) -> String {
    format!(
        "Gather, {} responders, {} per connection",
        thousands(responders),
        STREAMS_PER_CONNECTION
    )
}

/// Gathers across `responders` on the server at `target` (process `pid`) and adds
/// the row `name` of `case`.
async fn gather_row(
    report: &mut Report,
    case: &str,
    name: &str,
    target: &Target,
    pid: u32,
    responders: usize,
    sizes: &Sizes,
) {
    let rounds = sizes.gather_rounds;
    eprintln!("ipc-bench: {case}, {name}");
    match fleetops::fleet_gather(
        target,
        pid,
        responders,
        STREAMS_PER_CONNECTION,
        rounds,
        sizes.deadline,
    )
    .await
    {
        Ok(r) => report.add(
            names::FLEET_OPS,
            case,
            name,
            rounds_figures(&r),
            Some(format!(
                "{rounds} rounds, every ledger all OK; opening took {:.1} s",
                r.open_seconds
            )),
        ),
        Err(e) => record_failure(report, case, name, e),
    }
}

/// A wrong ledger fails the run; any other error skips the row, saying why.
fn record_failure(report: &mut Report, case: &str, name: &str, e: anyhow::Error) {
    if let Some(wrong) = e.downcast_ref::<fleetops::WrongLedger>() {
        report.fail(names::FLEET_OPS, case, name, wrong.to_string());
    } else {
        report.skip(names::FLEET_OPS, case, name, format!("failed: {e:#}"));
    }
}

fn rounds_figures(r: &fleetops::Rounds) -> Vec<(&'static str, f64, &'static str)> {
    let mut figures = vec![
        ("p50", percentile_us(&r.histogram, 50.0), "µs"),
        ("p99", percentile_us(&r.histogram, 99.0), "µs"),
        ("max", r.histogram.max() as f64 / 1000.0, "µs"),
    ];
    if let Some(cpu) = r.server_cpu_us_per_round {
        figures.push(("server CPU/round", cpu, "µs"));
    }
    figures
}
