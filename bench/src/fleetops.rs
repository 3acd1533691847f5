//! Workload 10 (issue 13): fleet operations.
//!
//! - **Gather** across N responders of one role on one embedded `ipc-server`, 100
//!   `Serve` streams per HTTP/2 connection, each responder answering at once on its
//!   own Serve stream (as the Rust client's handlers do): the time from the Gather
//!   call until its ledger (the response) is back. Peer: NATS scatter-gather of the
//!   same — one request published to a subject with N subscribers (100 per
//!   connection), each answering at once to the request's inbox, all N replies
//!   collected on one inbox subscription.
//! - **Rollout**'s own overhead per wave: a Rollout over M responders in waves of
//!   `wave_size`, elapsed ÷ waves, against one Gather of a wave's size measured in
//!   the same run (interleaved with the rollouts).
//!
//! Every ledger is checked — all N named once, every one OK, nothing else. A ledger
//! that is not is a fault of fleet-ipc, not a slow run: the workload fails with
//! [`WrongLedger`], and the run exits non-zero after printing its table.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::ledger::State;
use ipc_proto::pb::outcome::Status;
use ipc_proto::pb::{GatherRequest, Ledger, ReplyRequest, RolloutRequest, SubscribeRequest};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::fleet::{Target, connect};
use crate::workloads::histogram;

/// The app of the benchmark's responders.
const APP: &str = "bench";
/// How long the node waits for each answer: far above any round on a loaded
/// machine, so that a NO_REPLY in a ledger is a fault, not a slow machine.
const ANSWER_TIMEOUT_MS: u32 = 120_000;
/// The label that puts a Rollout's responders in groups of a wave's size.
const GROUP_LABEL: &str = "group";

/// A ledger that does not name every responder as OK: fleet-ipc lost or
/// misreported an answer. Never a matter of speed.
#[derive(Debug)]
pub struct WrongLedger(pub String);

impl fmt::Display for WrongLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WRONG LEDGER: {}", self.0)
    }
}

impl std::error::Error for WrongLedger {}

/// A role of its own per measurement, so that no responder of another one answers.
fn fresh_role(kind: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{kind}{}-{}",
        crate::payload::now_ns(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// fleet-ipc responders of `APP:role`, each answering every request at once on its
/// own Serve stream. They end when this is dropped.
struct Responders {
    ids: Vec<String>,
    open_seconds: f64,
    _connections: Vec<IpcClient<Channel>>,
    _answering: JoinSet<()>,
}

/// Opens `count` responders of `APP:role` on `target`, `per_connection` Serve
/// streams per HTTP/2 connection (at most 256 being opened at a time). With
/// `group_size`, responder `i` has the label `group` = `i / group_size`.
async fn open_responders(
    target: &Target,
    role: &str,
    count: usize,
    per_connection: usize,
    group_size: Option<usize>,
) -> anyhow::Result<Responders> {
    let opening = Instant::now();
    let connections: Vec<IpcClient<Channel>> =
        futures::stream::iter(0..count.div_ceil(per_connection))
            .map(|_| connect(target))
            .buffered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
    let ids: Vec<String> = (0..count).map(|i| format!("{role}-{i:05}")).collect();
    let loops = futures::stream::iter(0..count)
        .map(|i| {
            let client = connections[i / per_connection].clone();
            let subscribe = SubscribeRequest {
                id: ids[i].clone(),
                app: APP.into(),
                role: role.into(),
                labels: group_size
                    .map(|size| [(GROUP_LABEL.to_string(), (i / size).to_string())].into())
                    .unwrap_or_default(),
                ..SubscribeRequest::default()
            };
            async move {
                crate::streams::serve(&client, subscribe, |msg| ReplyRequest {
                    reply_to: msg.reply_to,
                    op: "bench:ok".into(),
                    ..ReplyRequest::default()
                })
                .await
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let mut answering = JoinSet::new();
    for answer in loops {
        answering.spawn(answer.context("opening a responder's Serve stream")?);
    }
    Ok(Responders {
        ids,
        open_seconds: opening.elapsed().as_secs_f64(),
        _connections: connections,
        _answering: answering,
    })
}

/// Checks that `ledger` names each of `ids` exactly once, every one OK.
fn check_ledger(what: &str, ledger: &Ledger, ids: &[String]) -> Result<(), WrongLedger> {
    let n = ids.len();
    let named: HashSet<&str> = ledger.outcomes.iter().map(|o| o.member.as_str()).collect();
    let missing: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| !named.contains(id))
        .take(3)
        .collect();
    let not_ok: Vec<String> = ledger
        .outcomes
        .iter()
        .filter(|o| o.status != Status::Ok as i32)
        .take(3)
        .map(|o| {
            let status = Status::try_from(o.status).map_or("?", |s| s.as_str_name());
            format!("{} {status} ({})", o.member, o.detail)
        })
        .collect();
    let right = ledger.expected as usize == n
        && ledger.outcomes.len() == n
        && named.len() == n
        && missing.is_empty()
        && ledger.ok as usize == n
        && not_ok.is_empty();
    if right {
        return Ok(());
    }
    Err(WrongLedger(format!(
        "{what}: {n} responders answering at once, but the ledger expected {}, has {} outcomes \
         ({} distinct members), {} OK, {} failed, {} no reply; missing e.g. {missing:?}; not OK e.g. {not_ok:?}",
        ledger.expected,
        ledger.outcomes.len(),
        named.len(),
        ledger.ok,
        ledger.failed,
        ledger.no_reply,
    )))
}

/// Times of one operation per round, and what the server spent on them.
#[derive(Debug)]
pub struct Rounds {
    /// Nanoseconds from the call until the whole answer was in, per round.
    pub histogram: Histogram<u64>,
    /// Seconds taken to open the responders.
    pub open_seconds: f64,
    /// Server CPU per round, in µs.
    pub server_cpu_us_per_round: Option<f64>,
}

fn cpu_of(pid: u32) -> Option<f64> {
    crate::procs::cpu_seconds(pid).ok()
}

async fn gather_once(
    client: &IpcClient<Channel>,
    request: &GatherRequest,
    deadline: Instant,
) -> anyhow::Result<Ledger> {
    let mut client = client.clone();
    let call = client.gather(request.clone());
    match tokio::time::timeout_at(deadline.into(), call).await {
        Ok(answer) => Ok(answer.context("Gather")?.into_inner()),
        Err(_) => bail!("deadline passed before the Gather answered"),
    }
}

/// Gather across `responders` responders on the server at `target` (process
/// `pid`): one unrecorded warm-up, then `rounds` timed rounds, each ledger checked.
pub async fn fleet_gather(
    target: &Target,
    pid: u32,
    responders: usize,
    per_connection: usize,
    rounds: usize,
    deadline: Duration,
) -> anyhow::Result<Rounds> {
    let deadline = Instant::now() + deadline;
    let role = fresh_role("g");
    let opened = open_responders(target, &role, responders, per_connection, None).await?;
    let client = connect(target).await?;
    let request = GatherRequest {
        target: format!("{APP}:{role}"),
        op: "bench:gather".into(),
        timeout_ms: ANSWER_TIMEOUT_MS,
        ..GatherRequest::default()
    };
    let ledger = gather_once(&client, &request, deadline).await?;
    check_ledger("warm-up Gather", &ledger, &opened.ids)?;
    let mut histogram = histogram();
    let cpu_before = cpu_of(pid);
    for round in 0..rounds {
        let started = Instant::now();
        let ledger = gather_once(&client, &request, deadline)
            .await
            .with_context(|| format!("round {round}"))?;
        histogram.saturating_record((started.elapsed().as_nanos() as u64).max(1));
        check_ledger(&format!("Gather round {round}"), &ledger, &opened.ids)?;
    }
    Ok(Rounds {
        histogram,
        open_seconds: opened.open_seconds,
        server_cpu_us_per_round: cpu_before
            .zip(cpu_of(pid))
            .map(|(before, after)| (after - before) * 1e6 / rounds.max(1) as f64),
    })
}

/// NATS scatter-gather of the same: `responders` subscriptions to one subject,
/// `per_connection` per connection, each answering at once to the request's
/// inbox from its own connection; one request per round, timed until all
/// replies arrived on the requester's inbox subscription. Each reply names its
/// round and responder, and every round must have each responder's once.
pub async fn nats_scatter_gather(
    url: &str,
    pid: u32,
    responders: usize,
    per_connection: usize,
    rounds: usize,
    deadline: Duration,
) -> anyhow::Result<Rounds> {
    let deadline = Instant::now() + deadline;
    let subject = format!("bench.gather.{}", fresh_role("n"));
    let opening = Instant::now();
    let mut answering = JoinSet::new();
    let mut connections = Vec::new();
    for first in (0..responders).step_by(per_connection) {
        let client = crate::nats::connect(url).await?;
        for index in first..(first + per_connection).min(responders) {
            let mut requests = client.subscribe(subject.clone()).await?;
            let client = client.clone();
            answering.spawn(async move {
                while let Some(msg) = requests.next().await {
                    let Some(inbox) = msg.reply else { continue };
                    let mut reply = msg.payload.to_vec();
                    reply.extend_from_slice(format!(" {index}").as_bytes());
                    if client.publish(inbox, reply.into()).await.is_err() {
                        return;
                    }
                }
            });
        }
        // The server has every SUB of this connection once this comes back.
        crate::nats::round_trip(&client).await?;
        connections.push(client);
    }
    let open_seconds = opening.elapsed().as_secs_f64();
    let requester = crate::nats::connect(url).await?;
    let inbox = requester.new_inbox();
    let mut replies = requester.subscribe(inbox.clone()).await?;
    crate::nats::round_trip(&requester).await?;
    let mut histogram = histogram();
    let mut cpu_before = None;
    // Round 0 is the warm-up, unrecorded.
    for round in 0..=rounds {
        if round == 1 {
            cpu_before = cpu_of(pid);
        }
        let started = Instant::now();
        requester
            .publish_with_reply(subject.clone(), inbox.clone(), round.to_string().into())
            .await?;
        requester.flush().await?;
        let mut seen = vec![false; responders];
        let mut arrived = 0;
        while arrived < responders {
            let reply = match tokio::time::timeout_at(deadline.into(), replies.next()).await {
                Ok(Some(reply)) => reply,
                Ok(None) => bail!("the inbox subscription ended"),
                Err(_) => {
                    bail!("round {round}: {arrived} of {responders} replies before the deadline")
                }
            };
            let (answered_round, index) = parse_reply(&reply.payload)?;
            ensure!(
                answered_round == round,
                "a reply of round {answered_round} in round {round}"
            );
            ensure!(index < responders, "a reply from responder {index}");
            ensure!(
                !std::mem::replace(&mut seen[index], true),
                "responder {index} answered twice in round {round}"
            );
            arrived += 1;
        }
        if round > 0 {
            histogram.saturating_record((started.elapsed().as_nanos() as u64).max(1));
        }
    }
    drop(connections);
    Ok(Rounds {
        histogram,
        open_seconds,
        server_cpu_us_per_round: cpu_before
            .zip(cpu_of(pid))
            .map(|(before, after)| (after - before) * 1e6 / rounds.max(1) as f64),
    })
}

/// `"<round> <responder>"`.
fn parse_reply(payload: &Bytes) -> anyhow::Result<(usize, usize)> {
    let text = std::str::from_utf8(payload).context("reply is not text")?;
    let (round, index) = text
        .split_once(' ')
        .with_context(|| format!("reply {text:?}"))?;
    Ok((round.parse()?, index.parse()?))
}

/// A Rollout's timings against one Gather of a wave's size, in the same run.
#[derive(Debug)]
pub struct RolloutRounds {
    /// Nanoseconds from the Rollout call until its last event (the ledger).
    pub rollout: Histogram<u64>,
    /// Nanoseconds of one Gather over a wave's members (one group's label).
    pub gather_of_wave: Histogram<u64>,
    pub waves: u32,
}

/// `rounds` Rollouts over `members` responders in waves of `wave_size` (each
/// answering at once, no ready timeout), each followed by Gathers of one wave's
/// members (by their group label) — up to 10 per round, the reference a wave is
/// compared with. One unrecorded warm-up of each first; every ledger checked.
pub async fn fleet_rollout(
    target: &Target,
    members: usize,
    wave_size: usize,
    per_connection: usize,
    rounds: usize,
    deadline: Duration,
) -> anyhow::Result<RolloutRounds> {
    let deadline = Instant::now() + deadline;
    let role = fresh_role("r");
    let opened = open_responders(target, &role, members, per_connection, Some(wave_size)).await?;
    let client = connect(target).await?;
    let waves = members.div_ceil(wave_size);
    let rollout = RolloutRequest {
        target: format!("{APP}:{role}"),
        op: "bench:rollout".into(),
        timeout_ms: ANSWER_TIMEOUT_MS,
        wave_size: wave_size as u32,
        max_failures: 0,
        ..RolloutRequest::default()
    };
    let gather_of = |group: usize| GatherRequest {
        target: format!("{APP}:{role}"),
        op: "bench:gather".into(),
        timeout_ms: ANSWER_TIMEOUT_MS,
        labels: [(GROUP_LABEL.to_string(), group.to_string())].into(),
        ..GatherRequest::default()
    };
    let group_ids = |group: usize| {
        opened.ids[group * wave_size..((group + 1) * wave_size).min(members)].to_vec()
    };
    let mut rollout_times = histogram();
    let mut gather_times = histogram();
    let gathers_per_round = waves.min(10);
    for round in 0..=rounds {
        let started = Instant::now();
        let (ledger, events) = rollout_once(&client, &rollout, deadline)
            .await
            .with_context(|| format!("Rollout round {round}"))?;
        let took = started.elapsed();
        check_rollout(round, &ledger, events, waves, &opened.ids)?;
        if round > 0 {
            rollout_times.saturating_record((took.as_nanos() as u64).max(1));
        }
        for k in 0..gathers_per_round {
            let group = (round * gathers_per_round + k) % waves;
            let started = Instant::now();
            let ledger = gather_once(&client, &gather_of(group), deadline).await?;
            let took = started.elapsed();
            check_ledger(
                &format!("Gather of wave group {group}"),
                &ledger,
                &group_ids(group),
            )?;
            if round > 0 {
                gather_times.saturating_record((took.as_nanos() as u64).max(1));
            }
        }
    }
    Ok(RolloutRounds {
        rollout: rollout_times,
        gather_of_wave: gather_times,
        waves: waves as u32,
    })
}

/// Runs one Rollout to its end: its ledger and the number of outcome events.
async fn rollout_once(
    client: &IpcClient<Channel>,
    request: &RolloutRequest,
    deadline: Instant,
) -> anyhow::Result<(Ledger, usize)> {
    let run = async {
        let mut events = client
            .clone()
            .rollout(request.clone())
            .await
            .context("Rollout")?
            .into_inner();
        let mut outcomes = 0;
        while let Some(event) = events.message().await.context("Rollout stream")? {
            if let Some(ledger) = event.ledger {
                return Ok((ledger, outcomes));
            }
            outcomes += usize::from(event.outcome.is_some());
        }
        bail!("the Rollout stream ended without a ledger")
    };
    match tokio::time::timeout_at(deadline.into(), run).await {
        Ok(done) => done,
        Err(_) => bail!("deadline passed before the Rollout finished"),
    }
}

fn check_rollout(
    round: usize,
    ledger: &Ledger,
    events: usize,
    waves: usize,
    ids: &[String],
) -> Result<(), WrongLedger> {
    let what = format!("Rollout round {round}");
    check_ledger(&what, ledger, ids)?;
    if ledger.state != State::Done as i32 || ledger.waves as usize != waves || events != ids.len() {
        return Err(WrongLedger(format!(
            "{what}: state {:?}, {} waves (planned {waves}), {events} outcome events for {} members",
            State::try_from(ledger.state).map_or("?", |s| s.as_str_name()),
            ledger.waves,
            ids.len()
        )));
    }
    Ok(())
}
