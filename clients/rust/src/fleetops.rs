//! Fleet operations: [`Client::gather`] (ask every responder of a target, a
//! [`Ledger`] naming each one's outcome) and [`Client::rollout`] (the same in waves
//! with a failure budget, a stream of [`RolloutEvent`]s ending with the ledger).
//!
//! Both are built the same way — [`Operation`] with its options, then `.await` —
//! and their values serialize to JSON with the proto's names, statuses and states
//! as their enum names (`"OK"`, `"NO_REPLY"`, `"STOPPED"`), as `ipcctl --json`
//! prints them.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use ipc_proto::pb;
use serde::{Deserialize, Serialize};

use crate::client::payload;
use crate::{Client, Error, Msg};

/// How a member's request ended, as its ledger line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutcomeStatus {
    /// Not asked (yet): a Rollout stopped before its wave, or a plan.
    Pending,
    Ok,
    /// Answered with `error` (or a sidecar hook exited non-zero).
    Failed,
    /// No answer in time, or gone.
    NoReply,
    /// Rollout with a ready timeout: answered, but did not come back in time.
    NotReady,
    /// A rerun with the key: answered OK in an earlier run, not asked again.
    Skipped,
}

impl OutcomeStatus {
    /// Counts against a Rollout's failure budget.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            OutcomeStatus::Failed | OutcomeStatus::NoReply | OutcomeStatus::NotReady
        )
    }
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LedgerState {
    Unspecified,
    Running,
    /// Every member was asked (whatever the outcomes: the counts tell).
    Done,
    /// A Rollout past its failure budget: members not asked stay PENDING.
    Stopped,
    /// A Rollout whose caller went away: stopped before the next wave.
    Cancelled,
    /// Nothing was sent: the members (and waves) that would be asked.
    DryRun,
}

/// One member's line in a ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Member id.
    pub member: String,
    /// The node (replica or sidecar) it is connected to.
    pub node: String,
    pub status: OutcomeStatus,
    /// The answer, if any (with `error` when FAILED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Msg>,
    /// Rollout: its 1-based wave (0: SKIPPED).
    pub wave: u32,
    pub duration_ms: i64,
    /// Why, in words: "replied with error: …", "no answer within 2000 ms".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Who was asked and how each one answered: one outcome per member resolved at
/// the start, none missing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// The operation id: the `ipc-op-id` header of its requests, the same on a rerun.
    pub id: String,
    /// The target, resolved (`:worker` → `shop:worker`).
    pub target: String,
    pub op: String,
    pub state: LedgerState,
    /// Members resolved at the start.
    pub expected: u32,
    pub ok: u32,
    pub failed: u32,
    pub no_reply: u32,
    pub not_ready: u32,
    pub skipped: u32,
    /// Sorted by member id.
    pub outcomes: Vec<Outcome>,
    /// Rollout: the number of waves.
    pub waves: u32,
}

impl Ledger {
    /// The outcomes with `status`, in ledger order.
    pub fn with_status(&self, status: OutcomeStatus) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(move |o| o.status == status)
    }

    /// Whether every member answered OK (or did in an earlier run of the key).
    pub fn all_ok(&self) -> bool {
        self.outcomes
            .iter()
            .all(|o| matches!(o.status, OutcomeStatus::Ok | OutcomeStatus::Skipped))
    }
}

/// One step of a Rollout: an outcome as it happens, or (last) the whole ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    pub wave: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<Ledger>,
}

/// Marks an [`Operation`] as a Gather.
#[derive(Debug)]
pub enum GatherKind {}
/// Marks an [`Operation`] as a Rollout.
#[derive(Debug)]
pub enum RolloutKind {}

/// A pending [`Client::gather`].
pub type Gather<'a> = Operation<'a, GatherKind>;
/// A pending [`Client::rollout`].
pub type Rollout<'a> = Operation<'a, RolloutKind>;

/// A Gather or Rollout being set up; `.await` it. Options common to both:
/// [`header`](Operation::header), [`label`](Operation::label),
/// [`dry_run`](Operation::dry_run), [`key`](Operation::key),
/// [`timeout`](Operation::timeout).
#[must_use = "an operation is sent only when awaited"]
pub struct Operation<'a, K> {
    client: &'a Client,
    target: String,
    op: String,
    data: serde_json::Value,
    headers: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    dry_run: bool,
    key: String,
    timeout: Duration,
    wave_size: u32,
    max_failures: u32,
    ready_timeout: Duration,
    deadline: Option<Duration>,
    kind: PhantomData<K>,
}

impl<K> Operation<'_, K> {
    /// Adds a header to every request of the operation.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Only responders labelled `key=value` (repeat for several: all must match).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Resolve the members (and, for a Rollout, the waves), ask nobody.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// The operation key: the ledger is kept (an hour, fleet-wide with Redis). A
    /// Gather repeated with its key answers the first ledger and asks nobody; a
    /// Rollout rerun with it resumes, members already OK are SKIPPED. One run of a
    /// key at a time: a second Rollout while the first runs is refused (ABORTED).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// How long to wait for answers: a Gather's whole wait, a Rollout member's own.
    /// Default: the client's timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Operation<'_, RolloutKind> {
    /// Members asked at once (default 1).
    pub fn wave_size(mut self, wave_size: u32) -> Self {
        self.wave_size = wave_size;
        self
    }

    /// No further wave once more than this many members are not OK (default 0).
    pub fn max_failures(mut self, max_failures: u32) -> Self {
        self.max_failures = max_failures;
        self
    }

    /// After its OK, wait until a member is back (subscribed again under its id)
    /// within this long, else NOT_READY. Zero (the default): an answer is enough.
    pub fn ready_timeout(mut self, ready_timeout: Duration) -> Self {
        self.ready_timeout = ready_timeout;
        self
    }

    /// A bound on the whole call (none by default: a rollout takes as long as its
    /// waves). Past it the stream ends with [`Error::DeadlineExceeded`] and the node
    /// stops before the next wave (CANCELLED).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

impl Client {
    /// Asks every responder of `target` (a role channel such as `:worker`, or a
    /// member id) for `op`, fleet-wide, and returns the [`Ledger`] once all answered
    /// or the timeout passed: each member OK, FAILED or NO_REPLY, by name.
    ///
    /// ```no_run
    /// # async fn demo(client: ipc_client::Client) -> Result<(), ipc_client::Error> {
    /// use ipc_client::OutcomeStatus;
    /// let ledger = client
    ///     .gather(":worker", "health", serde_json::json!(null))
    ///     .timeout(std::time::Duration::from_secs(2))
    ///     .await?;
    /// for silent in ledger.with_status(OutcomeStatus::NoReply) {
    ///     println!("{} on {} did not answer", silent.member, silent.node);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn gather(
        &self,
        target: impl Into<String>,
        op: impl Into<String>,
        data: serde_json::Value,
    ) -> Gather<'_> {
        self.operation(target.into(), op.into(), data)
    }

    /// Asks the responders of `target` in waves ([`Rollout::wave_size`], in member-id
    /// order), the next wave once the current one answered, none past the failure
    /// budget ([`Rollout::max_failures`]). `.await` opens it; the stream has one
    /// [`RolloutEvent`] per outcome as it happens and ends with the ledger
    /// ([`RolloutEvents::ledger`] waits for it).
    ///
    /// ```no_run
    /// # async fn demo(client: ipc_client::Client) -> Result<(), ipc_client::Error> {
    /// use futures::StreamExt;
    /// let mut events = client
    ///     .rollout(":worker", "worker:restart", serde_json::json!(null))
    ///     .wave_size(2)
    ///     .ready_timeout(std::time::Duration::from_secs(30))
    ///     .key("restart-2026-11-26")
    ///     .await?;
    /// while let Some(event) = events.next().await {
    ///     if let Some(outcome) = event?.outcome {
    ///         println!("{}: {:?}", outcome.member, outcome.status);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn rollout(
        &self,
        target: impl Into<String>,
        op: impl Into<String>,
        data: serde_json::Value,
    ) -> Rollout<'_> {
        self.operation(target.into(), op.into(), data)
    }

    fn operation<K>(
        &self,
        target: String,
        op: String,
        data: serde_json::Value,
    ) -> Operation<'_, K> {
        Operation {
            client: self,
            target,
            op,
            data,
            headers: BTreeMap::new(),
            labels: BTreeMap::new(),
            dry_run: false,
            key: String::new(),
            timeout: self.settings.timeout,
            wave_size: 1,
            max_failures: 0,
            ready_timeout: Duration::ZERO,
            deadline: None,
            kind: PhantomData,
        }
    }
}

/// Milliseconds for a request field, at least 1 (0 would mean the node's default);
/// anything too long is sent as `u32::MAX`, which the node refuses naming the field.
fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis())
        .unwrap_or(u32::MAX)
        .max(1)
}

impl<K> Operation<'_, K> {
    /// The fields Gather and Rollout share, as a GatherRequest.
    fn gather_request(&self) -> pb::GatherRequest {
        pb::GatherRequest {
            target: self.target.clone(),
            op: self.op.clone(),
            data: payload(&self.data),
            headers: self.headers.clone().into_iter().collect(),
            timeout_ms: millis(self.timeout),
            labels: self.labels.clone().into_iter().collect(),
            dry_run: self.dry_run,
            key: self.key.clone(),
        }
    }
}

impl<'a> IntoFuture for Operation<'a, GatherKind> {
    type Output = Result<Ledger, Error>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let client = self.client;
            let request = self.gather_request();
            // Slack over `timeout_ms`, so that the node (which names who did not
            // answer) answers, not the transport.
            let deadline = self.timeout + Duration::from_millis(500);
            let mut rpc = client.rpc.clone();
            let ledger = client
                .unary(
                    deadline,
                    &self.target,
                    rpc.gather(client.request(request, deadline)),
                )
                .await?;
            Ok(Ledger::from(ledger))
        })
    }
}

impl<'a> IntoFuture for Operation<'a, RolloutKind> {
    type Output = Result<RolloutEvents, Error>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let client = self.client;
            let pb::GatherRequest {
                target,
                op,
                data,
                headers,
                timeout_ms,
                labels,
                dry_run,
                key,
            } = self.gather_request();
            let request = pb::RolloutRequest {
                target,
                op,
                data,
                headers,
                timeout_ms,
                labels,
                dry_run,
                key,
                wave_size: self.wave_size,
                max_failures: self.max_failures,
                ready_timeout_ms: if self.ready_timeout.is_zero() {
                    0
                } else {
                    millis(self.ready_timeout)
                },
            };
            let mut request = client.request_without_deadline(request);
            if let Some(deadline) = self.deadline {
                request.set_timeout(deadline);
            }
            let mut rpc = client.rpc.clone();
            let stream = rpc
                .rollout(request)
                .await
                .map_err(|status| Error::from_status(status, &self.target))?
                .into_inner();
            Ok(RolloutEvents {
                stream,
                target: self.target,
            })
        })
    }
}

/// The events of a Rollout: one per outcome as it happens, the ledger last.
/// Dropping it cancels the rollout before its next wave.
pub struct RolloutEvents {
    stream: tonic::Streaming<pb::RolloutEvent>,
    target: String,
}

impl RolloutEvents {
    /// Reads the rest of the events and returns the ledger of the last one.
    pub async fn ledger(mut self) -> Result<Ledger, Error> {
        use futures::StreamExt;
        let mut last = None;
        while let Some(event) = self.next().await {
            if let Some(ledger) = event?.ledger {
                last = Some(ledger);
            }
        }
        last.ok_or_else(|| {
            Error::Other(tonic::Status::internal(
                "the rollout stream ended without its ledger",
            ))
        })
    }
}

impl Stream for RolloutEvents {
    type Item = Result<RolloutEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        Pin::new(&mut this.stream).poll_next(cx).map(|item| {
            item.map(|event| {
                event
                    .map(RolloutEvent::from)
                    .map_err(|status| Error::from_status(status, &this.target))
            })
        })
    }
}

impl std::fmt::Debug for RolloutEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RolloutEvents")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl From<pb::outcome::Status> for OutcomeStatus {
    fn from(status: pb::outcome::Status) -> Self {
        use pb::outcome::Status as S;
        match status {
            S::Pending => OutcomeStatus::Pending,
            S::Ok => OutcomeStatus::Ok,
            S::Failed => OutcomeStatus::Failed,
            S::NoReply => OutcomeStatus::NoReply,
            S::NotReady => OutcomeStatus::NotReady,
            S::Skipped => OutcomeStatus::Skipped,
        }
    }
}

impl From<pb::ledger::State> for LedgerState {
    fn from(state: pb::ledger::State) -> Self {
        use pb::ledger::State as S;
        match state {
            S::Unspecified => LedgerState::Unspecified,
            S::Running => LedgerState::Running,
            S::Done => LedgerState::Done,
            S::Stopped => LedgerState::Stopped,
            S::Cancelled => LedgerState::Cancelled,
            S::DryRun => LedgerState::DryRun,
        }
    }
}

impl From<pb::Outcome> for Outcome {
    fn from(outcome: pb::Outcome) -> Self {
        Outcome {
            status: outcome.status().into(),
            member: outcome.member,
            node: outcome.node,
            reply: outcome.reply.map(Msg::from),
            wave: outcome.wave,
            duration_ms: outcome.duration_ms,
            detail: outcome.detail,
        }
    }
}

impl From<pb::Ledger> for Ledger {
    fn from(ledger: pb::Ledger) -> Self {
        Ledger {
            state: ledger.state().into(),
            id: ledger.id,
            target: ledger.target,
            op: ledger.op,
            expected: ledger.expected,
            ok: ledger.ok,
            failed: ledger.failed,
            no_reply: ledger.no_reply,
            not_ready: ledger.not_ready,
            skipped: ledger.skipped,
            outcomes: ledger.outcomes.into_iter().map(Outcome::from).collect(),
            waves: ledger.waves,
        }
    }
}

impl From<pb::RolloutEvent> for RolloutEvent {
    fn from(event: pb::RolloutEvent) -> Self {
        RolloutEvent {
            wave: event.wave,
            outcome: event.outcome.map(Outcome::from),
            ledger: event.ledger.map(Ledger::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_statuses_and_states_as_the_proto_does() {
        let ledger = Ledger::from(pb::Ledger {
            id: "op-1".into(),
            state: pb::ledger::State::Stopped as i32,
            expected: 2,
            outcomes: vec![
                pb::Outcome {
                    member: "w1".into(),
                    status: pb::outcome::Status::NoReply as i32,
                    detail: "no answer within 2000 ms".into(),
                    ..Default::default()
                },
                pb::Outcome {
                    member: "w2".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        let json = serde_json::to_value(&ledger).unwrap();
        assert_eq!(json["state"], "STOPPED");
        assert_eq!(json["outcomes"][0]["status"], "NO_REPLY");
        assert_eq!(json["outcomes"][1]["status"], "PENDING");
        assert!(json["outcomes"][1].get("detail").is_none());
        let back: Ledger = serde_json::from_value(json).unwrap();
        assert_eq!(back, ledger);
        assert!(!ledger.all_ok());
        assert_eq!(ledger.with_status(OutcomeStatus::NoReply).count(), 1);
        assert!(OutcomeStatus::NotReady.is_failure() && !OutcomeStatus::Skipped.is_failure());
    }
}
