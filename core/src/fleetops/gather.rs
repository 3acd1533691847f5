//! Gather: one request to every responder of a target at once, and a ledger naming
//! each as OK, FAILED or NO_REPLY when all answered or the time is up.

use std::time::{Duration, Instant};

use futures::future::join_all;
use ipc_proto::pb::ledger::State;
use ipc_proto::pb::{GatherRequest, Ledger};
use prost::Message as _;

use super::ledger::{self, Kind};
use super::{Asked, Fields};
use crate::auth::Caller;
use crate::error::NodeError;
use crate::node::Node;
use crate::telemetry::{self, Hop};
use opentelemetry::KeyValue;
use tracing::Instrument as _;

impl Node {
    /// Asks every responder of the target and returns the ledger. `grpc_timeout`
    /// is what is left of the caller's gRPC deadline: the ledger comes back just
    /// before it, the silent members NO_REPLY.
    pub async fn gather(
        &self,
        caller: &Caller,
        req: GatherRequest,
        grpc_timeout: Option<Duration>,
    ) -> Result<Ledger, NodeError> {
        let mut hop = self.accept_operation("Gather", caller, &req.headers, &req.target, &req.op);
        let log = telemetry::operation_log_span(hop.context(), None);
        let result = self
            .gather_traced(caller, req, grpc_timeout, &mut hop)
            .instrument(log)
            .await;
        match &result {
            Ok(ledger) => hop.set(|| vec![KeyValue::new("ipc.op_id", ledger.id.clone())]),
            Err(error) => hop.fail(|| error.to_string()),
        }
        result
    }

    async fn gather_traced(
        &self,
        caller: &Caller,
        req: GatherRequest,
        grpc_timeout: Option<Duration>,
        hop: &mut Hop,
    ) -> Result<Ledger, NodeError> {
        let fields = Fields {
            encoded_len: req.encoded_len(),
            target: req.target,
            op: req.op,
            data: req.data,
            headers: req.headers,
            labels: req.labels,
            key: req.key,
        };
        let mut asked = self.check_operation(caller, Kind::Gather, fields)?;
        hop.stamp(&mut asked.headers);
        let timeout = self.request_timeout(req.timeout_ms, grpc_timeout)?;
        let deadline = Instant::now() + timeout;
        if req.dry_run {
            let members = self
                .resolve_responders(&asked.target, &asked.labels)
                .await?;
            let mut ledger = ledger::new_ledger(self.new_id(), &asked.target, &asked.op, &members);
            ledger.state = State::DryRun as i32;
            return Ok(ledger);
        }
        // Checked before the claim too, so that a finished key answers at once and a
        // key used differently is refused at once.
        if let Some(stored) = self.load_operation(&asked).await? {
            return Ok(stored.ledger.unwrap_or_default());
        }
        // A Gather with the same key running elsewhere: wait for it, then its
        // ledger is the answer.
        let claim = self.claim(&asked, deadline).await?;
        let ledger = self
            .while_claimed(
                claim.as_ref(),
                self.gather_claimed(&asked, timeout, deadline),
            )
            .await;
        self.release(claim).await;
        ledger
    }

    /// The Gather itself, once its key (if any) is claimed.
    async fn gather_claimed(
        &self,
        asked: &Asked,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<Ledger, NodeError> {
        if let Some(stored) = self.load_operation(asked).await? {
            // A repeat sends nothing: the first ledger is the answer.
            return Ok(stored.ledger.unwrap_or_default());
        }
        let members = self
            .resolve_responders(&asked.target, &asked.labels)
            .await?;
        let mut ledger = ledger::new_ledger(self.new_id(), &asked.target, &asked.op, &members);
        super::log_op_id(&ledger.id);
        if members.is_empty() {
            return Err(NodeError::NoResponders(format!(
                "no responders for {:?}{}",
                asked.target,
                if asked.labels.is_empty() {
                    String::new()
                } else {
                    " with those labels".into()
                }
            )));
        }
        self.metrics().operation_started(Kind::Gather);
        let waited_ms = timeout.as_millis() as u64;
        let answers = join_all(members.iter().map(|member| {
            let id = ledger.id.clone();
            async move {
                let asked_at = Instant::now();
                let result = self
                    .ask_member(asked, &id, &member.id, None, deadline)
                    .await;
                (result, asked_at.elapsed())
            }
        }))
        .await;
        for (outcome, (result, took)) in ledger.outcomes.iter_mut().zip(answers) {
            ledger::settle(outcome, result, waited_ms);
            outcome.duration_ms = took.as_millis() as i64;
            self.metrics().outcome(outcome.status);
        }
        ledger::recount(&mut ledger);
        ledger.state = State::Done as i32;
        self.metrics().operation_finished(ledger.state);
        if let Err(error) = self.store_operation(asked, &ledger).await {
            tracing::warn!(%error, id = %ledger.id, "gather ledger not stored under its key");
        }
        Ok(ledger)
    }
}
