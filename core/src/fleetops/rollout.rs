//! Rollout: Gather in waves of `wave_size`, members in a stable order (id, then
//! node); the next wave only once every member of the current one answered (and,
//! with a ready timeout, came back); no further wave once more than
//! `max_failures` members are not OK. One event per outcome, the ledger last.
//!
//! The rollout runs on its own task, so that a caller that goes away is noticed
//! between waves (CANCELLED) and the ledger of a keyed rollout is still stored.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use futures::stream::{FuturesUnordered, StreamExt};
use ipc_proto::pb::ledger::State;
use ipc_proto::pb::outcome::Status;
use ipc_proto::pb::{Ledger, Outcome, RolloutEvent, RolloutRequest};
use prost::Message as _;
use tokio::sync::mpsc;

use super::claim::CLAIM_TTL;
use super::ledger::{self, Kind};
use super::{Asked, Fields};
use crate::auth::Caller;
use crate::error::NodeError;
use crate::node::Node;
use crate::telemetry::{self, Hop};
use opentelemetry::KeyValue;
use tracing::Instrument as _;

/// The events of a Rollout: one per outcome, then one with the ledger.
pub type RolloutStream = Pin<Box<dyn Stream<Item = Result<RolloutEvent, NodeError>> + Send>>;

/// How a rollout proceeds; a rerun with the key may change these.
#[derive(Debug, Clone, Copy)]
struct Pace {
    wave_size: usize,
    max_failures: u32,
    /// Per member: how long to wait for its answer.
    timeout: Duration,
    /// After an OK answer: how long to wait for the member to be back (zero: not).
    ready_timeout: Duration,
}

/// How much longer than [`CLAIM_TTL`] a rerun waits for the claim of an earlier
/// run, so that the claim of a coordinator that died has surely expired.
const CLAIM_GRACE: Duration = Duration::from_secs(1);

/// How often a member's return is looked for while waiting for it.
const READY_POLL: Duration = Duration::from_millis(50);

impl Node {
    /// Starts a Rollout; the stream reports each outcome and ends with the ledger.
    pub async fn rollout(
        self: &Arc<Self>,
        caller: &Caller,
        req: RolloutRequest,
    ) -> Result<RolloutStream, NodeError> {
        let hop = self.accept_operation("Rollout", caller, &req.headers, &req.target, &req.op);
        let log = telemetry::operation_log_span(hop.context(), None);
        self.start_rollout(caller, req, hop).instrument(log).await
    }

    /// Checks and plans a Rollout; its waves run on their own task, which keeps the
    /// call's span (`hop`) open until the ledger is final.
    async fn start_rollout(
        self: &Arc<Self>,
        caller: &Caller,
        req: RolloutRequest,
        mut hop: Hop,
    ) -> Result<RolloutStream, NodeError> {
        let fields = Fields {
            encoded_len: req.encoded_len(),
            target: req.target,
            op: req.op,
            data: req.data,
            headers: req.headers,
            labels: req.labels,
            key: req.key,
        };
        let mut asked = self
            .check_operation(caller, Kind::Rollout, fields)
            .inspect_err(|error| hop.fail(|| error.to_string()))?;
        hop.stamp(&mut asked.headers);
        let timeout = self
            .request_timeout(req.timeout_ms, None)
            .inspect_err(|error| hop.fail(|| error.to_string()))?;
        let ready_timeout = Duration::from_millis(u64::from(req.ready_timeout_ms));
        if ready_timeout > self.config().max_timeout {
            let error = NodeError::InvalidArgument(format!(
                "ready_timeout_ms {} is above the largest accepted, {} ms",
                req.ready_timeout_ms,
                self.config().max_timeout.as_millis()
            ));
            hop.fail(|| error.to_string());
            return Err(error);
        }
        let pace = Pace {
            wave_size: req.wave_size.max(1) as usize,
            max_failures: req.max_failures,
            timeout,
            ready_timeout,
        };
        if req.dry_run {
            let mut ledger = self
                .rollout_ledger(&asked, true)
                .await
                .inspect_err(|error| hop.fail(|| error.to_string()))?;
            plan_waves(&mut ledger, pace.wave_size);
            ledger.state = State::DryRun as i32;
            return Ok(last_event(0, ledger));
        }
        // Another run with this key: wait out the claim of a coordinator that died,
        // refuse while a live one holds it.
        let claim = self
            .claim(&asked, Instant::now() + CLAIM_TTL + CLAIM_GRACE)
            .await
            .inspect_err(|error| hop.fail(|| error.to_string()))?;
        let mut ledger = match self.rollout_ledger(&asked, false).await {
            Ok(ledger) => ledger,
            Err(error) => {
                hop.fail(|| error.to_string());
                self.release(claim).await;
                return Err(error);
            }
        };
        super::log_op_id(&ledger.id);
        hop.set(|| vec![KeyValue::new("ipc.op_id", ledger.id.clone())]);
        if ledger.state == State::Done as i32 {
            // Finished: the rerun's answer is the ledger.
            self.release(claim).await;
            return Ok(last_event(ledger.waves, ledger));
        }
        plan_waves(&mut ledger, pace.wave_size);
        let (tx, rx) = mpsc::channel(64);
        let node = self.clone();
        tokio::spawn(
            async move {
                let finished = node
                    .while_claimed(claim.as_ref(), node.run_rollout(&asked, ledger, pace, &tx))
                    .await;
                node.release(claim).await;
                // A Rollout that did not finish every wave is a failed operation in
                // its trace, with why (the ledger says who failed).
                if finished != State::Done {
                    hop.fail(|| format!("rollout {}", finished.as_str_name().to_lowercase()));
                }
                drop(hop);
            }
            .in_current_span(),
        );
        Ok(Box::pin(tokio_stream_from(rx)))
    }

    /// The ledger a Rollout starts from: the stored one of its key (a finished one
    /// as it is, else made ready to resume), or a new one of the responders now.
    async fn rollout_ledger(&self, asked: &Asked, dry_run: bool) -> Result<Ledger, NodeError> {
        if let Some(stored) = self.load_operation(asked).await? {
            let ledger = stored.ledger.unwrap_or_default();
            if ledger.state == State::Done as i32 && !dry_run {
                return Ok(ledger);
            }
            return Ok(resumed(ledger));
        }
        let members = self
            .resolve_responders(&asked.target, &asked.labels)
            .await?;
        if members.is_empty() && !dry_run {
            return Err(NodeError::NoResponders(format!(
                "no responders for {:?}{}",
                asked.target,
                if asked.labels.is_empty() {
                    ""
                } else {
                    " with those labels"
                }
            )));
        }
        Ok(ledger::new_ledger(
            self.new_id(),
            &asked.target,
            &asked.op,
            members,
        ))
    }

    async fn run_rollout(
        &self,
        asked: &Asked,
        mut ledger: Ledger,
        pace: Pace,
        tx: &mpsc::Sender<Result<RolloutEvent, NodeError>>,
    ) -> State {
        self.metrics().operation_started(Kind::Rollout);
        ledger.state = State::Running as i32;
        ledger::recount(&mut ledger);
        self.keep(asked, &ledger).await;
        for outcome in ledger
            .outcomes
            .iter()
            .filter(|o| o.status == Status::Skipped as i32)
        {
            self.metrics().outcome(outcome.status);
            let _ = tx
                .send(Ok(RolloutEvent {
                    wave: 0,
                    outcome: Some(outcome.clone()),
                    ledger: None,
                }))
                .await;
        }
        let mut state = State::Done;
        for wave in 1..=ledger.waves {
            if ledger::failures(&ledger) > pace.max_failures {
                state = State::Stopped;
                break;
            }
            if tx.is_closed() {
                state = State::Cancelled;
                break;
            }
            let started = Instant::now();
            self.run_wave(asked, &mut ledger, wave, pace, tx).await;
            self.metrics().wave(started.elapsed());
        }
        if state == State::Done && ledger::failures(&ledger) > pace.max_failures {
            state = State::Stopped;
        }
        ledger.state = state as i32;
        ledger::recount(&mut ledger);
        self.metrics().operation_finished(ledger.state);
        self.keep(asked, &ledger).await;
        let _ = tx
            .send(Ok(RolloutEvent {
                wave: ledger.waves,
                outcome: None,
                ledger: Some(ledger),
            }))
            .await;
        state
    }

    /// Asks the PENDING members of `wave` at once; each outcome is reported and
    /// stored as it comes.
    async fn run_wave(
        &self,
        asked: &Asked,
        ledger: &mut Ledger,
        wave: u32,
        pace: Pace,
        tx: &mpsc::Sender<Result<RolloutEvent, NodeError>>,
    ) {
        let indexes: Vec<usize> = ledger
            .outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| o.wave == wave && o.status == Status::Pending as i32)
            .map(|(i, _)| i)
            .collect();
        // Who is connected since when, before asking: a member is back once a
        // subscriber of its id connected later than this.
        let before: HashMap<String, i64> = if pace.ready_timeout.is_zero() {
            HashMap::new()
        } else {
            self.connected_since().await
        };
        let id = ledger.id.clone();
        let mut running: FuturesUnordered<_> = indexes
            .into_iter()
            .map(|index| {
                let member = ledger.outcomes[index].member.clone();
                let since = before.get(&member).copied().unwrap_or(0);
                let id = &id;
                async move {
                    let asked_at = Instant::now();
                    let deadline = asked_at + pace.timeout;
                    let result = self
                        .ask_member(asked, id, &member, Some(wave), deadline)
                        .await;
                    let mut outcome = Outcome::default();
                    ledger::settle(&mut outcome, result, pace.timeout.as_millis() as u64);
                    if outcome.status == Status::Ok as i32 && !pace.ready_timeout.is_zero() {
                        let until = Instant::now() + pace.ready_timeout;
                        if !self.wait_back(&member, since, until).await {
                            outcome.status = Status::NotReady as i32;
                            outcome.detail = format!(
                                "answered, but did not come back within {} ms",
                                pace.ready_timeout.as_millis()
                            );
                        }
                    }
                    outcome.duration_ms = asked_at.elapsed().as_millis() as i64;
                    (index, outcome)
                }
            })
            .collect();
        while let Some((index, settled)) = running.next().await {
            let outcome = &mut ledger.outcomes[index];
            outcome.status = settled.status;
            outcome.detail = settled.detail;
            outcome.reply = settled.reply;
            outcome.duration_ms = settled.duration_ms;
            let event = RolloutEvent {
                wave,
                outcome: Some(outcome.clone()),
                ledger: None,
            };
            self.metrics()
                .outcome(event.outcome.as_ref().map_or(0, |o| o.status));
            ledger::recount(ledger);
            self.keep(asked, ledger).await;
            let _ = tx.send(Ok(event)).await;
        }
    }

    /// Each member id with the latest time a subscriber of that id connected.
    async fn connected_since(&self) -> HashMap<String, i64> {
        let mut since = HashMap::new();
        if let Ok(members) = self.bus().members(self.hub().members()).await {
            for m in members {
                let entry = since.entry(m.id).or_insert(0);
                *entry = (*entry).max(m.connected_ms);
            }
        }
        since
    }

    /// Waits until a subscriber with id `member` connected after `since`.
    async fn wait_back(&self, member: &str, since: i64, until: Instant) -> bool {
        loop {
            if let Ok(members) = self.bus().members(self.hub().members()).await
                && members
                    .iter()
                    .any(|m| m.id == member && m.connected_ms > since)
            {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            tokio::time::sleep(READY_POLL.min(until - now)).await;
        }
    }

    /// Stores the ledger of a keyed rollout; a failure is logged, not fatal: the
    /// rollout goes on, a rerun would start over where the store last stood.
    async fn keep(&self, asked: &Asked, ledger: &Ledger) {
        if let Err(error) = self.store_operation(asked, ledger).await {
            tracing::warn!(%error, id = %ledger.id, "rollout ledger not stored under its key");
        }
    }
}

/// A stored ledger made ready to run again: its members frozen, those OK already
/// SKIPPED (their answer kept), every other one PENDING.
fn resumed(mut ledger: Ledger) -> Ledger {
    for outcome in &mut ledger.outcomes {
        if outcome.status == Status::Ok as i32 || outcome.status == Status::Skipped as i32 {
            outcome.status = Status::Skipped as i32;
            outcome.detail = "answered OK in an earlier run under this key".into();
        } else {
            *outcome = Outcome {
                member: std::mem::take(&mut outcome.member),
                node: std::mem::take(&mut outcome.node),
                ..Outcome::default()
            };
        }
    }
    ledger::recount(&mut ledger);
    ledger
}

/// Numbers the waves: the members still to ask, `wave_size` at a time in ledger
/// order; members SKIPPED are in wave 0.
fn plan_waves(ledger: &mut Ledger, wave_size: usize) {
    let mut next = 0usize;
    for outcome in &mut ledger.outcomes {
        if outcome.status == Status::Skipped as i32 {
            outcome.wave = 0;
        } else {
            outcome.wave = (next / wave_size) as u32 + 1;
            next += 1;
        }
    }
    ledger.waves = next.div_ceil(wave_size) as u32;
}

/// A Rollout stream of one event: the ledger.
fn last_event(wave: u32, ledger: Ledger) -> RolloutStream {
    Box::pin(futures::stream::iter([Ok(RolloutEvent {
        wave,
        outcome: None,
        ledger: Some(ledger),
    })]))
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(member: &str, status: Status) -> Outcome {
        Outcome {
            member: member.into(),
            status: status as i32,
            ..Outcome::default()
        }
    }

    #[test]
    fn waves_number_the_members_still_to_ask() {
        let mut ledger = Ledger {
            outcomes: vec![
                outcome("a", Status::Skipped),
                outcome("b", Status::Pending),
                outcome("c", Status::Pending),
                outcome("d", Status::Pending),
            ],
            ..Ledger::default()
        };
        plan_waves(&mut ledger, 2);
        let waves: Vec<u32> = ledger.outcomes.iter().map(|o| o.wave).collect();
        assert_eq!(waves, [0, 1, 1, 2]);
        assert_eq!(ledger.waves, 2);
    }

    #[test]
    fn a_resumed_ledger_skips_ok_and_asks_the_rest_again() {
        let ledger = resumed(Ledger {
            outcomes: vec![
                outcome("a", Status::Ok),
                outcome("b", Status::Failed),
                outcome("c", Status::Pending),
            ],
            ..Ledger::default()
        });
        let statuses: Vec<i32> = ledger.outcomes.iter().map(|o| o.status).collect();
        assert_eq!(
            statuses,
            [
                Status::Skipped as i32,
                Status::Pending as i32,
                Status::Pending as i32
            ]
        );
        assert_eq!(ledger.skipped, 1);
    }
}
