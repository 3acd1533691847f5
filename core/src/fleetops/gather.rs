//! Gather: one request to every responder of a target at once, and a ledger naming
//! each as OK, FAILED or NO_REPLY when all answered or the time is up.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use ipc_proto::pb::ledger::State;
use ipc_proto::pb::{GatherRequest, Ledger, Msg, Outcome};
use prost::Message as _;

use super::ledger::{self, Kind};
use super::{Asked, Fields};
use crate::auth::Caller;
use crate::error::{NodeError, RequestError};
use crate::hub::OperationReplies;
use crate::node::Node;
use crate::responders;
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
            let mut ledger = ledger::new_ledger(self.new_id(), &asked.target, &asked.op, members);
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
        let mut ledger = ledger::new_ledger(self.new_id(), &asked.target, &asked.op, members);
        super::log_op_id(&ledger.id);
        if ledger.outcomes.is_empty() {
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
        let answers = self
            .ask_all(asked, &ledger.id, &ledger.outcomes, deadline)
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

    /// Asks every member (the ledger's outcomes, in order) at once and waits until
    /// all answered or `deadline`: each one's result and when it came (since the
    /// first was asked). A member a local responder answers is handed its request
    /// at once, and its reply completes the member's slot in the operation's one
    /// collector of replies (no channel or future per member), all under one
    /// timer; the others (hooks, members of other nodes, a relay that could not
    /// answer) go the whole way ([`Node::ask_member`]).
    async fn ask_all(
        &self,
        asked: &Asked,
        ledger_id: &str,
        members: &[Outcome],
        deadline: Instant,
    ) -> Vec<(Result<Msg, RequestError>, Duration)> {
        let started = Instant::now();
        let ask_fully = |i: usize| -> Asking<'_> {
            let member = members[i].member.as_str();
            Box::pin(async move {
                (
                    i,
                    self.ask_member(asked, ledger_id, member, None, deadline)
                        .await,
                )
            })
        };
        let mut results: Vec<Option<(Result<Msg, RequestError>, Duration)>> =
            members.iter().map(|_| None).collect();
        let replies = OperationReplies::new(members.len());
        // The `reply_to` counters of the requests handed to local responders, to
        // forget those unanswered at the deadline (or if this Gather is dropped).
        let mut handed = Handed {
            hub: self.hub(),
            pending: vec![None; members.len()],
        };
        let mut waiting = 0usize;
        let mut asking: FuturesUnordered<Asking<'_>> = FuturesUnordered::new();
        let handing = self.operation_handing(asked, ledger_id, deadline);
        for (i, member) in members.iter().enumerate() {
            let handed_here = handing
                .as_ref()
                .and_then(|handing| self.hand_to_responder(handing, &replies, &member.member, i));
            match handed_here {
                Some(pending) => {
                    handed.pending[i] = Some(pending);
                    waiting += 1;
                }
                None => asking.push(ask_fully(i)),
            }
        }
        // The queued requests hold the shared part (and its charge) from here.
        drop(handing);
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        let mut late = false;
        while waiting > 0 || !asking.is_empty() {
            let mut arrived = tokio::select! {
                Some((i, result)) = asking.next(), if !asking.is_empty() => {
                    results[i] = Some((result, started.elapsed()));
                    continue;
                }
                arrived = replies.arrived(), if waiting > 0 => arrived,
                () = &mut timer, if !late => {
                    // The requests still waiting are forgotten (a late reply is
                    // not found); those that came in time are still taken.
                    late = true;
                    waiting = 0;
                    let arrived = replies.close();
                    handed.forget_unanswered(&arrived);
                    arrived
                }
            };
            for (i, reply) in arrived.drain(..) {
                waiting = waiting.saturating_sub(1);
                handed.pending[i] = None;
                match reply {
                    Some(reply) if responders::cannot_answer(&reply) => {
                        asking.push(ask_fully(i));
                    }
                    Some(reply) => results[i] = Some((Ok(reply), started.elapsed())),
                    None => {
                        let member = &members[i].member;
                        results[i] = Some((
                            Err(RequestError::Unavailable(format!(
                                "the subscriber of {member:?} that had the request disconnected before replying"
                            ))),
                            started.elapsed(),
                        ));
                    }
                }
            }
            replies.recycle(arrived);
        }
        results
            .into_iter()
            .zip(members)
            .map(|(result, member)| {
                result.unwrap_or_else(|| {
                    (
                        Err(RequestError::DeadlineExceeded(member.member.clone())),
                        started.elapsed(),
                    )
                })
            })
            .collect()
    }
}

/// The requests of a Gather handed to local responders and not answered yet, by
/// member index (the counters of their `reply_to`): forgotten at the deadline, or
/// when the Gather is dropped (its caller gone), so that no entry outlives it.
struct Handed<'a> {
    hub: &'a crate::hub::Hub,
    pending: Vec<Option<u64>>,
}

impl Handed<'_> {
    /// Forgets every handed request still unanswered but those in `answered`.
    fn forget_unanswered(&mut self, answered: &[crate::hub::Arrival]) {
        for (i, _) in answered {
            self.pending[*i] = None;
        }
        for pending in self.pending.iter_mut().filter_map(Option::take) {
            self.hub.forget_request(pending);
        }
    }
}

impl Drop for Handed<'_> {
    fn drop(&mut self) {
        self.forget_unanswered(&[]);
    }
}

/// A member asked the whole way (by its index), and its answer.
type Asking<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (usize, Result<Msg, RequestError>)> + Send + 'a>,
>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NodeConfig;
    use crate::memory::{MemoryBus, Retention};
    use ipc_proto::pb::SubscribeRequest;
    use std::sync::Arc;

    /// A Gather its caller drops (the call cancelled) forgets the requests it
    /// handed out: no entry is left waiting for a reply nobody will read.
    #[tokio::test]
    async fn a_dropped_gather_forgets_the_requests_it_handed_out() {
        let node = Node::new(
            NodeConfig::default(),
            Arc::new(MemoryBus::new(Retention::default())),
        );
        let worker = SubscribeRequest {
            id: "w1".into(),
            app: "shop".into(),
            role: "worker".into(),
            ..SubscribeRequest::default()
        };
        let mut worker = node.subscribe(&Caller::default(), worker).await.unwrap();
        let hello = worker.next().await.unwrap().unwrap();
        assert_eq!(hello.op, "ipc:subscribed");
        let gathering = tokio::spawn({
            let node = node.clone();
            async move {
                let request = GatherRequest {
                    target: "shop:worker".into(),
                    op: "status".into(),
                    timeout_ms: 60_000,
                    ..GatherRequest::default()
                };
                node.gather(&Caller::default(), request, None).await
            }
        });
        let request = worker.next().await.unwrap().unwrap();
        assert!(!request.reply_to.is_empty(), "{request:?}");
        assert_eq!(node.hub().pending_requests(), 1);
        gathering.abort();
        assert!(gathering.await.unwrap_err().is_cancelled());
        assert_eq!(node.hub().pending_requests(), 0, "the request is forgotten");
    }
}
