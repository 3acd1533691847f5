//! Gather: one request to every responder of a target at once, and a ledger naming
//! each as OK, FAILED or NO_REPLY when all answered or the time is up.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use ipc_proto::pb::ledger::State;
use ipc_proto::pb::{GatherRequest, Ledger, Member, Msg};
use prost::Message as _;

use super::ledger::{self, Kind};
use super::{Asked, Fields};
use crate::auth::Caller;
use crate::error::{NodeError, RequestError};
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
        let answers = self.ask_all(asked, &ledger.id, &members, deadline).await;
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

    /// Asks every member at once and waits until all answered or `deadline`:
    /// each one's result and when it came (since the first was asked). A member
    /// a local responder answers is handed its request at once and waited on
    /// by its reply's receiver alone, all under one timer; the others (hooks,
    /// members of other nodes, a relay that could not answer) go the whole way
    /// ([`Node::ask_member`]).
    async fn ask_all(
        &self,
        asked: &Asked,
        ledger_id: &str,
        members: &[Member],
        deadline: Instant,
    ) -> Vec<(Result<Msg, RequestError>, Duration)> {
        let started = Instant::now();
        let ask_fully = |i: usize| -> Asking<'_> {
            let member = members[i].id.as_str();
            Box::pin(async move {
                Answer::Asked(
                    i,
                    self.ask_member(asked, ledger_id, member, None, deadline)
                        .await,
                )
            })
        };
        let mut results: Vec<Option<(Result<Msg, RequestError>, Duration)>> =
            members.iter().map(|_| None).collect();
        // The `reply_to` counters of the requests handed to local responders.
        let mut handed: Vec<Option<u64>> = vec![None; members.len()];
        let mut asking: FuturesUnordered<Asking<'_>> = FuturesUnordered::new();
        let handing = self.operation_handing(asked, ledger_id, deadline);
        for (i, member) in members.iter().enumerate() {
            let handed_here = handing
                .as_ref()
                .and_then(|handing| self.hand_to_responder(handing, &member.id));
            match handed_here {
                Some(delivered) => {
                    handed[i] = Some(delivered.pending);
                    let reply = delivered.reply;
                    asking.push(Box::pin(async move { Answer::Handed(i, reply.await) }));
                }
                None => asking.push(ask_fully(i)),
            }
        }
        // The queued requests hold the shared part (and its charge) from here.
        drop(handing);
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        let mut late = false;
        loop {
            tokio::select! {
                answer = asking.next() => match answer {
                    None => break,
                    Some(Answer::Asked(i, result)) => results[i] = Some((result, started.elapsed())),
                    Some(Answer::Handed(i, Ok(reply))) if responders::cannot_answer(&reply) => {
                        handed[i] = None;
                        asking.push(ask_fully(i));
                    }
                    Some(Answer::Handed(i, received)) => {
                        let member = &members[i].id;
                        let result = received.map_err(|_| if late {
                            RequestError::DeadlineExceeded(member.clone())
                        } else {
                            RequestError::Unavailable(format!(
                                "the subscriber of {member:?} that had the request disconnected before replying"
                            ))
                        });
                        results[i] = Some((result, started.elapsed()));
                    }
                },
                () = &mut timer, if !late => {
                    // The requests still waiting are forgotten: their receivers
                    // end at once, as no reply.
                    late = true;
                    for (i, pending) in handed.iter().enumerate() {
                        if let Some(pending) = pending
                            && results[i].is_none()
                        {
                            self.hub().forget_request(*pending);
                        }
                    }
                }
            }
        }
        results
            .into_iter()
            .zip(members)
            .map(|(result, member)| {
                result.unwrap_or_else(|| {
                    (
                        Err(RequestError::DeadlineExceeded(member.id.clone())),
                        started.elapsed(),
                    )
                })
            })
            .collect()
    }
}

/// What came of asking one member of a Gather (by its index).
enum Answer {
    /// A request handed to a local responder: its reply, or its waiter forgotten
    /// (the responder left, or the deadline passed).
    Handed(usize, Result<Msg, tokio::sync::oneshot::error::RecvError>),
    /// A member asked the whole way.
    Asked(usize, Result<Msg, RequestError>),
}

type Asking<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'a>>;
