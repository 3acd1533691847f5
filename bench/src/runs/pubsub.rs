//! Workloads 1, 2, 4 and 5: throughput, latency, fan-out and idle memory, fleet-ipc
//! beside NATS and Redis.

use super::{latency_figures, note, subject, thousands};
use crate::args::{STREAMS_PER_CONNECTION, Sizes};
use crate::fleet::Fleet;
use crate::floor::BareBroker;
use crate::nats;
use crate::peer::PubSub;
use crate::procs::NatsServer;
use crate::report::{Report, peers, workloads as names};
use crate::systems::{Available, Systems, fleet_on, pubsub_peers};
use crate::workloads::{self, percentile_us};

pub async fn run_throughput(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let mut peers_now = pubsub_peers(systems, true);
    let broker = floor_broker(systems).await;
    if let Some(broker) = &broker {
        let peer = broker.as_ref().map_err(Clone::clone).map(|b| {
            Box::new(Fleet {
                publish_stream: true,
                ..b.fleet()
            }) as Box<dyn PubSub>
        });
        peers_now.peers.push((peers::BARE_PUBLISH.into(), peer));
    }
    for (subscribers, messages) in sizes.throughput_messages {
        if !sizes.throughput_only.is_empty() && !sizes.throughput_only.contains(&subscribers) {
            continue;
        }
        let case = if subscribers == 1 {
            "1 subscriber".to_string()
        } else {
            format!("{subscribers} subscribers")
        };
        for (name, peer) in &peers_now.peers {
            let peer = match peer {
                Ok(peer) => peer,
                Err(reason) => {
                    report.skip(names::THROUGHPUT, &case, name, reason.clone());
                    continue;
                }
            };
            eprintln!("ipc-bench: throughput {case}, {name}: {messages} messages");
            match workloads::throughput(
                peer.as_ref(),
                &subject("tp"),
                subscribers,
                messages,
                sizes.deadline,
            )
            .await
            {
                Ok(t) => {
                    let mut figures = vec![
                        ("deliveries/s", t.deliveries_per_s, "/s"),
                        ("publishes/s", t.publishes_per_s, "/s"),
                    ];
                    if let Some(cpu) = t.server_cpu_us_per_delivery {
                        figures.push(("server CPU/delivery", cpu, "µs"));
                    }
                    report.add(names::THROUGHPUT, &case, name, figures, note(&t.incomplete))
                }
                Err(e) => report.skip(names::THROUGHPUT, &case, name, format!("failed: {e:#}")),
            }
        }
    }
}

pub async fn run_latency(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let peers_now = pubsub_peers(systems, false);
    for rate in sizes.latency_rates {
        let case = format!("{}k msg/s, 1 subscriber", rate / 1000);
        for (name, peer) in &peers_now.peers {
            let peer = match peer {
                Ok(peer) => peer,
                Err(reason) => {
                    report.skip(names::LATENCY, &case, name, reason.clone());
                    continue;
                }
            };
            eprintln!("ipc-bench: latency {case}, {name}");
            match workloads::latency(
                peer.as_ref(),
                &subject("lat"),
                rate,
                sizes.latency_duration,
                sizes.deadline,
            )
            .await
            {
                Ok(l) => report.add(
                    names::LATENCY,
                    &case,
                    name,
                    latency_figures(&l.histogram),
                    note(&l.incomplete),
                ),
                Err(e) => report.skip(names::LATENCY, &case, name, format!("failed: {e:#}")),
            }
        }
    }
}

pub async fn run_fanout(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let case = format!(
        "{} subscribers, {} per connection",
        thousands(sizes.fanout_subscribers),
        STREAMS_PER_CONNECTION
    );
    let fleet_server = systems.embedded();
    let fleet_peer = fleet_server
        .as_ref()
        .map(|s| Box::new(fleet_on(s)) as Box<dyn PubSub>)
        .map_err(Clone::clone);
    let nats_peer = systems.nats_peer();
    let broker = floor_broker(systems).await;
    let mut runs = vec![(peers::FLEET, fleet_peer), (peers::NATS, nats_peer)];
    if let Some(broker) = &broker {
        let peer = broker.as_ref().map_err(Clone::clone);
        runs.push((
            peers::BARE_BROKER,
            peer.map(|b| Box::new(b.fleet()) as Box<dyn PubSub>),
        ));
    }
    for (name, peer) in runs {
        let peer = match peer {
            Ok(peer) => peer,
            Err(reason) => {
                report.skip(names::FANOUT, &case, name, reason);
                continue;
            }
        };
        eprintln!("ipc-bench: fan-out {case}, {name}");
        match workloads::fanout(
            peer.as_ref(),
            &subject("fan"),
            sizes.fanout_subscribers,
            STREAMS_PER_CONNECTION,
            sizes.fanout_rounds,
            sizes.deadline,
        )
        .await
        {
            Ok(f) => {
                let mut text = format!(
                    "{} rounds; subscribing took {:.1} s",
                    sizes.fanout_rounds, f.open_seconds
                );
                if let Some(e) = &f.incomplete {
                    text = format!("INCOMPLETE: {e}; {text}");
                }
                let mut figures = vec![
                    ("p50", percentile_us(&f.histogram, 50.0), "µs"),
                    ("p99", percentile_us(&f.histogram, 99.0), "µs"),
                    ("max", f.histogram.max() as f64 / 1000.0, "µs"),
                ];
                if let Some(cpu) = f.server_cpu_us_per_round {
                    figures.push(("server CPU/fan-out", cpu, "µs"));
                }
                report.add(names::FANOUT, &case, name, figures, Some(text));
            }
            Err(e) => report.skip(names::FANOUT, &case, name, format!("failed: {e:#}")),
        }
    }
}

pub async fn run_memory(report: &mut Report, systems: &Systems, sizes: &Sizes) {
    let cases: Vec<String> = sizes
        .memory_counts
        .iter()
        .map(|n| format!("{} subscribers", thousands(*n)))
        .collect();
    // A fresh process per system, so the growth is the subscribers' alone.
    let fleet = systems.embedded();
    let nats_server = NatsServer::start().map_err(|e| format!("{e:#}"));
    // Each system with the pid whose memory is read.
    type Measured = Available<(Box<dyn PubSub>, u32)>;
    let runs: [(&str, Measured); 2] = [
        (
            peers::FLEET,
            fleet
                .as_ref()
                .map(|s| (Box::new(fleet_on(s)) as Box<dyn PubSub>, s.process.pid()))
                .map_err(Clone::clone),
        ),
        (
            peers::NATS,
            nats_server
                .as_ref()
                .map(|n| {
                    (
                        Box::new(nats::Nats {
                            url: n.url(),
                            pid: n.process.pid(),
                        }) as Box<dyn PubSub>,
                        n.process.pid(),
                    )
                })
                .map_err(Clone::clone),
        ),
    ];
    for (name, run) in runs {
        let (peer, pid) = match run {
            Ok(run) => run,
            Err(reason) => {
                for case in &cases {
                    report.skip(names::MEMORY, case, name, reason.clone());
                }
                continue;
            }
        };
        eprintln!("ipc-bench: idle memory, {name}");
        let (points, failure) = workloads::idle_memory(
            peer.as_ref(),
            pid,
            &subject("idle"),
            &sizes.memory_counts,
            STREAMS_PER_CONNECTION,
        )
        .await;
        let measured = points.len();
        for ((count, per, total), case) in points.into_iter().zip(&cases) {
            report.add(
                names::MEMORY,
                case,
                name,
                vec![
                    ("per subscriber", per, "KiB"),
                    ("total growth", total / 1024.0, "MiB"),
                ],
                Some(format!(
                    "RSS growth over {} connections",
                    count.div_ceil(STREAMS_PER_CONNECTION)
                )),
            );
        }
        if let Some(e) = failure {
            for case in &cases[measured..] {
                report.skip(names::MEMORY, case, name, format!("failed: {e}"));
            }
        }
    }
}

/// The bare broker of the floors, when `--peers` wants it (`floor`), or why it
/// did not start.
pub async fn floor_broker(systems: &Systems) -> Option<Available<BareBroker>> {
    systems.wants("floor").then_some(())?;
    Some(BareBroker::start().await.map_err(|e| format!("{e:#}")))
}
