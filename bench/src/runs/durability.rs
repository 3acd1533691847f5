//! Workloads 8 and 9: broadcasts on a TLS Redis with a replica, and the time to the
//! first acknowledged broadcast after a Sentinel failover.

use std::time::Duration;

use super::{latency_figures, note, subject};
use crate::args::Sizes;
use crate::fleet::{Fleet, Target};
use crate::peer::PubSub;
use crate::report::{Report, peers, workloads as names};
use crate::systems::{Available, Systems};
use crate::{durable, failover, procs, redis_peers, workloads};

/// Workload 8: broadcast throughput (1 subscriber) and latency (1k msg/s) on a TLS
/// Redis with one replica: two replicas without and with `--redis-min-replicas 1`,
/// and `XADD`, `XADD`+`WAIT 1 0` over TLS on the same Redis.
pub async fn run_durable(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let pair = durable::TlsPair::start()
        .await
        .map_err(|e| format!("TLS Redis pair: {e:#}"));
    let binary = systems.server.as_ref().map_err(Clone::clone);
    let limits = systems.server_limits();
    let mut servers = Vec::new();
    let mut systems_now: Vec<(&str, Available<Box<dyn PubSub>>)> = Vec::new();
    for (name, min_replicas) in [
        (peers::FLEET_REDIS_TLS, 0),
        (peers::FLEET_REDIS_TLS_WAIT, 1),
    ] {
        let started = match (&pair, &binary) {
            (Ok(pair), Ok(binary)) => pair
                .servers(binary, min_replicas, &limits)
                .map_err(|e| format!("{e:#}")),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        systems_now.push((
            name,
            started.map(|[a, b]| {
                let fleet = Fleet {
                    subscribe_to: vec![Target::Tcp(b.grpc)],
                    publish_to: Target::Tcp(a.grpc),
                    pids: [a.process.pid(), b.process.pid()]
                        .into_iter()
                        .chain(pair.as_ref().ok().and_then(|p| p.primary.pid()))
                        .collect(),
                    publish_stream: false,
                };
                servers.extend([a, b]);
                Box::new(fleet) as Box<dyn PubSub>
            }),
        ));
    }
    for (name, wait_replicas) in [(peers::REDIS_XADD_TLS, 0), (peers::REDIS_XADD_WAIT_TLS, 1)] {
        let stream = pair.as_ref().map_err(Clone::clone).and_then(|pair| {
            Ok(Box::new(redis_peers::RedisStream {
                client: pair.client().map_err(|e| format!("{e:#}"))?,
                pid: pair.primary.pid().unwrap_or_default(),
                wait_replicas,
            }) as Box<dyn PubSub>)
        });
        systems_now.push((name, stream));
    }
    let messages = sizes.durable_messages;
    let rate = sizes.latency_rates[0];
    let throughput_case = "throughput, 1 subscriber";
    let latency_case = format!("latency at {}k msg/s, 1 subscriber", rate / 1000);
    for (name, system) in &systems_now {
        let system = match system {
            Ok(system) => system,
            Err(reason) => {
                report.skip(names::DURABLE, throughput_case, name, reason.clone());
                report.skip(names::DURABLE, &latency_case, name, reason.clone());
                continue;
            }
        };
        eprintln!("ipc-bench: durable {throughput_case}, {name}: {messages} messages");
        match workloads::throughput(
            system.as_ref(),
            &subject("tls"),
            1,
            messages,
            sizes.deadline,
        )
        .await
        {
            Ok(t) => report.add(
                names::DURABLE,
                throughput_case,
                name,
                vec![
                    ("deliveries/s", t.deliveries_per_s, "/s"),
                    ("publishes/s", t.publishes_per_s, "/s"),
                ],
                note(&t.incomplete),
            ),
            Err(e) => report.skip(
                names::DURABLE,
                throughput_case,
                name,
                format!("failed: {e:#}"),
            ),
        }
        eprintln!("ipc-bench: durable {latency_case}, {name}");
        match workloads::latency(
            system.as_ref(),
            &subject("tls-lat"),
            rate,
            sizes.latency_duration,
            sizes.deadline,
        )
        .await
        {
            Ok(l) => report.add(
                names::DURABLE,
                &latency_case,
                name,
                latency_figures(&l.histogram),
                note(&l.incomplete),
            ),
            Err(e) => report.skip(
                names::DURABLE,
                &latency_case,
                name,
                format!("failed: {e:#}"),
            ),
        }
    }
    drop(servers);
}

/// Workload 9: a killed Redis primary under Sentinel — the time from the kill to
/// the first acknowledged broadcast, beside Sentinel's `+odown` and
/// `+switch-master`, one fresh cluster per round.
pub async fn run_failover(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let rounds = sizes.failover_rounds;
    let case = |n: usize| format!("SIGKILL of the primary, round {n} of {rounds}");
    let binary = match &systems.server {
        Ok(binary) if procs::server_has_flag(binary, "--redis-sentinel") => binary,
        Ok(_) => {
            let reason = "ipc-server has no --redis-sentinel flag";
            for n in 1..=rounds {
                report.skip(names::FAILOVER, &case(n), peers::FLEET_SENTINEL, reason);
            }
            return;
        }
        Err(e) => {
            for n in 1..=rounds {
                report.skip(names::FAILOVER, &case(n), peers::FLEET_SENTINEL, e.clone());
            }
            return;
        }
    };
    let limits = systems.server_limits();
    for n in 1..=rounds {
        eprintln!("ipc-bench: failover {}", case(n));
        match failover::round(binary, &limits).await {
            Ok(round) => {
                let micros = |d: Duration| d.as_secs_f64() * 1e6;
                let mut figures = Vec::new();
                if let Some(odown) = round.odown {
                    figures.push(("Sentinel +odown", micros(odown), "µs"));
                }
                figures.extend([
                    ("Sentinel +switch-master", micros(round.switch_master), "µs"),
                    (
                        "first acknowledged broadcast",
                        micros(round.first_ack),
                        "µs",
                    ),
                    (
                        "ack after +switch-master",
                        (round.first_ack.as_secs_f64() - round.switch_master.as_secs_f64()) * 1e3,
                        "ms",
                    ),
                ]);
                report.add(
                    names::FAILOVER,
                    &case(n),
                    peers::FLEET_SENTINEL,
                    figures,
                    Some(format!(
                        "times from the kill; down-after-milliseconds 1000; a refused broadcast is sent again after {} ms",
                        failover::RETRY_PAUSE.as_millis()
                    )),
                );
            }
            Err(e) => report.skip(
                names::FAILOVER,
                &case(n),
                peers::FLEET_SENTINEL,
                format!("failed: {e:#}"),
            ),
        }
    }
}
