//! Workloads 3, 6 and 7: request round trips, the sidecar's hop, and Lock, Unlock
//! and Limit through a replica beside Redis directly.

use super::pubsub::floor_broker;
use super::{latency_figures, note, subject};
use crate::args::Sizes;
use crate::fleet::{self, Fleet, FleetRequests, Target};
use crate::floor::BareRelay;
use crate::peer::RequestReply;
use crate::procs::Sidecar;
use crate::report::{Report, peers, workloads as names};
use crate::systems::Systems;
use crate::workloads::{self, percentile_us};
use crate::{bare, coord, nats};

/// Round trips sequentially and with 64 in flight, reported under `workload`.
pub async fn request_cases(
    report: &mut Report,
    workload: &str,
    case_prefix: &str,
    name: &str,
    system: Result<&dyn RequestReply, String>,
    sizes: &Sizes,
) {
    let cases = [
        ("sequential", 1, sizes.sequential_requests),
        ("64 in flight", 64, sizes.concurrent_requests),
    ];
    let requester = match system {
        Ok(system) => system.start().await.map_err(|e| format!("failed: {e:#}")),
        Err(reason) => Err(reason),
    };
    for (label, in_flight, total) in cases {
        let case = format!("{case_prefix}{label}");
        let requester = match &requester {
            Ok(r) => r.clone(),
            Err(reason) => {
                report.skip(workload, &case, name, reason.clone());
                continue;
            }
        };
        eprintln!("ipc-bench: requests {case}, {name}: {total}");
        match workloads::round_trips(requester, total, in_flight, sizes.deadline).await {
            Ok(r) => report.add(
                workload,
                &case,
                name,
                vec![
                    ("p50", percentile_us(&r.histogram, 50.0), "µs"),
                    ("p99", percentile_us(&r.histogram, 99.0), "µs"),
                    ("requests/s", r.per_second, "/s"),
                ],
                None,
            ),
            Err(e) => report.skip(workload, &case, name, format!("failed: {e:#}")),
        }
    }
}

pub async fn run_requests(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    match systems.embedded() {
        Ok(server) => {
            let system = FleetRequests {
                request_from: Target::Tcp(server.grpc),
                respond_on: Target::Tcp(server.grpc),
                serve: false,
            };
            request_cases(report, names::REQUEST, "", peers::FLEET, Ok(&system), sizes).await;
            let serve = FleetRequests {
                serve: true,
                ..system
            };
            let name = peers::FLEET_SERVE;
            request_cases(report, names::REQUEST, "", name, Ok(&serve), sizes).await;
            let ping = fleet::FleetPing {
                target: Target::Tcp(server.grpc),
            };
            request_cases(
                report,
                names::REQUEST,
                "",
                peers::FLEET_PING,
                Ok(&ping),
                sizes,
            )
            .await;
        }
        Err(e) => {
            for name in [peers::FLEET, peers::FLEET_SERVE, peers::FLEET_PING] {
                request_cases(report, names::REQUEST, "", name, Err(e.clone()), sizes).await;
            }
        }
    }
    if let Some(broker) = floor_broker(systems).await {
        let system = broker.as_ref().map(|b| FleetRequests {
            request_from: b.target(),
            respond_on: b.target(),
            serve: true,
        });
        let system = as_system(&system);
        request_cases(report, names::REQUEST, "", peers::BARE_SERVE, system, sizes).await;
    }
    match systems.replicas() {
        Ok([a, b]) => {
            let system = FleetRequests {
                request_from: Target::Tcp(a.grpc),
                respond_on: Target::Tcp(b.grpc),
                serve: false,
            };
            let name = "fleet-ipc+Redis (across replicas)";
            request_cases(report, names::REQUEST, "", name, Ok(&system), sizes).await;
        }
        Err(e) => {
            let name = "fleet-ipc+Redis (across replicas)";
            request_cases(report, names::REQUEST, "", name, Err(e), sizes).await;
        }
    }
    let nats_system = systems
        .nats
        .as_ref()
        .map(|n| nats::NatsRequests { url: n.url() });
    let system = as_system(&nats_system);
    request_cases(
        report,
        names::REQUEST,
        "",
        peers::NATS_REQUEST,
        system,
        sizes,
    )
    .await;
}

/// Workload 6: requests and broadcasts through the sidecar against direct, then
/// the same hop's floor.
pub async fn run_sidecar(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    run_sidecar_hop(report, systems, sizes).await;
    run_relay_floor(report, systems, sizes).await;
}

async fn run_sidecar_hop(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let request_case = "request, ";
    let latency_case = "broadcast latency 1k msg/s";
    let skip_all = |report: &mut Report, name: &str, reason: &str| {
        for case in [
            format!("{request_case}sequential"),
            format!("{request_case}64 in flight"),
            latency_case.to_string(),
        ] {
            report.skip(names::SIDECAR_HOP, &case, name, reason.to_string());
        }
    };
    let server = match systems.embedded() {
        Ok(server) => server,
        Err(e) => {
            skip_all(report, peers::DIRECT, &e);
            skip_all(report, peers::SIDECAR, &e);
            return;
        }
    };
    let sidecar = match &systems.sidecar {
        Ok(binary) => Sidecar::start(binary, &server.url()).map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("sidecar: {e}")),
    };
    let direct = Target::Tcp(server.grpc);
    let variants = [
        (peers::DIRECT, Ok(direct.clone())),
        (
            peers::SIDECAR,
            sidecar
                .as_ref()
                .map(|s| Target::Unix(s.socket.clone()))
                .map_err(Clone::clone),
        ),
    ];
    for (name, target) in variants {
        let target = match target {
            Ok(target) => target,
            Err(reason) => {
                skip_all(report, name, &reason);
                continue;
            }
        };
        // The requester (or subscriber) goes through `target`; the other side is
        // connected directly to the server, as a process in another pod would be.
        let system = FleetRequests {
            request_from: target.clone(),
            respond_on: direct.clone(),
            serve: false,
        };
        request_cases(
            report,
            names::SIDECAR_HOP,
            request_case,
            name,
            Ok(&system),
            sizes,
        )
        .await;
        let peer = Fleet {
            subscribe_to: vec![target],
            publish_to: direct.clone(),
            pids: vec![server.process.pid()],
            publish_stream: false,
        };
        eprintln!("ipc-bench: sidecar {latency_case}, {name}");
        match workloads::latency(
            &peer,
            &subject("side"),
            1_000,
            sizes.latency_duration,
            sizes.deadline,
        )
        .await
        {
            Ok(l) => report.add(
                names::SIDECAR_HOP,
                latency_case,
                name,
                latency_figures(&l.histogram),
                note(&l.incomplete),
            ),
            Err(e) => report.skip(
                names::SIDECAR_HOP,
                latency_case,
                name,
                format!("failed: {e:#}"),
            ),
        }
    }
}

/// Workload 6's floor: a request to a bare broker directly, and through a bare
/// relay (a hop that only passes the call on).
async fn run_relay_floor(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let Some(broker) = floor_broker(systems).await else {
        return;
    };
    let relay = match &broker {
        Ok(broker) => BareRelay::start(broker.addr)
            .await
            .map_err(|e| format!("{e:#}")),
        Err(e) => Err(e.clone()),
    };
    let variants = [
        (peers::BARE_DIRECT, broker.as_ref().map(|b| b.target())),
        (
            peers::BARE_RELAY,
            relay.as_ref().map(|r| Target::Unix(r.socket.clone())),
        ),
    ];
    for (name, target) in variants {
        let system = target.map_err(Clone::clone).and_then(|request_from| {
            let respond_on = broker.as_ref().map_err(Clone::clone)?.target();
            Ok(FleetRequests {
                request_from,
                respond_on,
                serve: true,
            })
        });
        let system = as_system(&system);
        request_cases(report, names::SIDECAR_HOP, "request, ", name, system, sizes).await;
    }
}

/// Workload 7: Lock+Unlock and Limit through one Redis-backed replica vs the same
/// operations directly on its Redis.
pub async fn run_coordination(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let replica = systems.replicas().map(|[a, _b]| a);
    let redis = systems
        .redis
        .as_ref()
        .map_err(|e| format!("no redis-server: {e}"))
        .and_then(|r| redis::Client::open(r.url()).map_err(|e| e.to_string()));
    for (prefix, operation) in [
        ("Lock+Unlock, ", coord::Operation::LockUnlock),
        ("Limit, ", coord::Operation::Limit),
    ] {
        let fleet = replica.as_ref().map(|server| coord::FleetCoord {
            target: Target::Tcp(server.grpc),
            operation,
        });
        let system = as_system(&fleet);
        let name = peers::FLEET_REDIS_REPLICA;
        request_cases(report, names::COORD, prefix, name, system, sizes).await;
        let direct = redis.as_ref().map(|client| coord::RedisCoord {
            client: client.clone(),
            operation,
        });
        let system = as_system(&direct);
        let name = peers::REDIS_DIRECT;
        request_cases(report, names::COORD, prefix, name, system, sizes).await;
    }
    // The floors, in the same run: one unary call on a bare tonic server, the same
    // on fleet-ipc (`ping`, answered by the node), one PING to the same Redis.
    let prefix = "one round trip, ";
    let bare = bare::BareTonic;
    request_cases(
        report,
        names::COORD,
        prefix,
        peers::BARE_TONIC,
        Ok(&bare),
        sizes,
    )
    .await;
    let ping = replica.as_ref().map(|server| fleet::FleetPing {
        target: Target::Tcp(server.grpc),
    });
    let system = as_system(&ping);
    request_cases(
        report,
        names::COORD,
        prefix,
        peers::FLEET_PING,
        system,
        sizes,
    )
    .await;
    let redis_ping = redis.as_ref().map(|client| coord::RedisPing {
        client: client.clone(),
    });
    let system = as_system(&redis_ping);
    request_cases(
        report,
        names::COORD,
        prefix,
        peers::REDIS_PING,
        system,
        sizes,
    )
    .await;
}

/// A system that may have failed to start, as `request_cases` takes it.
fn as_system<T: RequestReply, E: ToString>(
    system: &Result<T, E>,
) -> Result<&dyn RequestReply, String> {
    system
        .as_ref()
        .map(|s| s as &dyn RequestReply)
        .map_err(ToString::to_string)
}
