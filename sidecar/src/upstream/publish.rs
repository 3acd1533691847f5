//! The pod's broadcasts relayed upstream on one `Publish` stream instead of one
//! unary Broadcast each.
//!
//! Every local Broadcast and every message of a local Publish stream is queued, in
//! the order the node submitted it, to one task that keeps a Publish stream open on
//! the current upstream connection. Answers come back in order; each local caller
//! is answered only once the control plane stored its message (or refused it, with
//! the status Broadcast would have given).
//!
//! A message always carries an idempotency key upstream: the caller's, else one the
//! sidecar makes (unique per sidecar process). When the stream or the connection is
//! lost, the messages sent and not yet answered are sent again, first and in order,
//! on the next stream: a message the control plane had stored is then a repeat of
//! its key and is not stored twice (a key the sidecar made is answered as stored,
//! with the first id and cursor; a caller's own key as `duplicate`, as any repeat
//! of it). A message that cannot be confirmed within `--upstream-timeout` of its
//! submission is answered UNAVAILABLE, like a unary call that timed out.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipc_core::bus::BusError;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::Inner;
use super::calls::{Link, bus_error, describe};
use super::session::reconnect_backoff;
use ipc_proto::backoff::Attempts;

/// Messages waiting for the relay task; a submitter waits (within its timeout)
/// when the queue is full.
const QUEUE: usize = 1024;
/// Most messages sent upstream and not yet answered (the control plane reads a
/// window of 256 ahead; the rest wait in the stream's buffers).
const IN_FLIGHT: usize = 1024;
/// Most bytes of messages sent and not yet answered (at least one message).
const IN_FLIGHT_BYTES: usize = 16 << 20;

/// Whether another message may be sent.
fn room(in_flight: &VecDeque<Relayed>, bytes: usize) -> bool {
    in_flight.is_empty() || (in_flight.len() < IN_FLIGHT && bytes < IN_FLIGHT_BYTES)
}

/// The Publish relay of one sidecar: where [`super::UpstreamBus::submit`] queues.
pub(crate) struct PublishRelay {
    queue: mpsc::Sender<Relayed>,
    receiver: parking_lot::Mutex<Option<mpsc::Receiver<Relayed>>>,
    /// Keys the sidecar makes: `relay-<random per process>-<counter>`.
    key_prefix: String,
    next_key: AtomicU64,
}

/// One message on its way upstream.
struct Relayed {
    request: BroadcastRequest,
    /// The key was made by the sidecar: a repeat of it means an earlier attempt
    /// was stored, which is what the local caller must hear.
    own_key: bool,
    size: usize,
    deadline: Instant,
    /// Taken once answered (or given up on at the deadline).
    answer: Option<oneshot::Sender<Result<BroadcastResponse, BusError>>>,
}

impl Relayed {
    fn finish(&mut self, result: Result<BroadcastResponse, BusError>) {
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(result);
        }
    }

    fn answered(&self) -> bool {
        self.answer.as_ref().is_none_or(oneshot::Sender::is_closed)
    }
}

impl Default for PublishRelay {
    fn default() -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        Self {
            queue,
            receiver: parking_lot::Mutex::new(Some(receiver)),
            key_prefix: format!("relay-{:016x}-", rand::random::<u64>()),
            next_key: AtomicU64::new(1),
        }
    }
}

impl PublishRelay {
    /// Starts the relay task (once).
    pub(crate) fn start(&self, inner: &Arc<Inner>) {
        if let Some(queue) = self.receiver.lock().take() {
            tokio::spawn(Relay::new(inner.clone(), queue).run());
        }
    }

    /// Queues `request` (its key, if any, is the caller's) in the order of the
    /// calls; the returned future completes with the control plane's answer.
    /// Refused at once, as a unary call would be, while the control plane is
    /// unreachable.
    pub(crate) async fn submit(
        &self,
        inner: &Inner,
        mut request: BroadcastRequest,
    ) -> Result<impl Future<Output = Result<BroadcastResponse, BusError>> + use<>, BusError> {
        inner.link_or_unavailable().map_err(BusError::Unavailable)?;
        let own_key = request.key.is_empty();
        if own_key {
            let n = self.next_key.fetch_add(1, Ordering::Relaxed);
            request.key = format!("{}{n}", self.key_prefix);
        }
        let timeout = inner.config.call_timeout;
        let (answer, answered) = oneshot::channel();
        let relayed = Relayed {
            size: request.encoded_len(),
            request,
            own_key,
            deadline: Instant::now() + timeout,
            answer: Some(answer),
        };
        match tokio::time::timeout(timeout, self.queue.send(relayed)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(BusError::Unavailable("the sidecar is stopping".into())),
            Err(_) => {
                return Err(BusError::Unavailable(format!(
                    "the control plane did not take the pod's broadcasts for {timeout:?}; retry"
                )));
            }
        }
        Ok(async move {
            answered
                .await
                .unwrap_or_else(|_| Err(BusError::Unavailable("the sidecar is stopping".into())))
        })
    }
}

/// The relay task's state.
struct Relay {
    inner: Arc<Inner>,
    queue: mpsc::Receiver<Relayed>,
    /// Sent on a stream that was lost before answering: sent again first.
    resend: VecDeque<Relayed>,
    backoff: Attempts,
}

/// Why a stream was left.
enum Left {
    /// The connection changed or went away: carry on with the next one.
    Link,
    /// The stream failed on a connection still in use: open another after a pause.
    Failed(String),
    Stopped,
}

impl Relay {
    fn new(inner: Arc<Inner>, queue: mpsc::Receiver<Relayed>) -> Self {
        let backoff = reconnect_backoff(&inner.config);
        Self {
            inner,
            queue,
            resend: VecDeque::new(),
            backoff,
        }
    }

    async fn run(mut self) {
        let mut links = self.inner.link.subscribe();
        loop {
            let link = links.borrow_and_update().clone();
            let left = match link {
                Some(link) => self.stream(&link, &mut links).await,
                None => self.wait_for_link(&mut links).await,
            };
            match left {
                Left::Stopped => break,
                Left::Link => {}
                Left::Failed(error) => {
                    tracing::warn!(%error, "the pod's Publish stream upstream failed; reopening");
                    let pause = self.backoff.next_pause();
                    if self.idle_until(Instant::now() + pause, &mut links).await {
                        break;
                    }
                }
            }
        }
        let stopping = || Err(BusError::Unavailable("the sidecar is stopping".into()));
        for mut relayed in self.resend.drain(..) {
            relayed.finish(stopping());
        }
        self.queue.close();
        while let Some(mut relayed) = self.queue.recv().await {
            relayed.finish(stopping());
        }
    }

    /// Without a connection: messages already queued wait for one until their
    /// deadline. `Stopped` when the sidecar stops.
    async fn wait_for_link(
        &mut self,
        links: &mut tokio::sync::watch::Receiver<Option<Link>>,
    ) -> Left {
        loop {
            self.expire(Instant::now());
            let wake = self.resend.front().map(|r| r.deadline);
            tokio::select! {
                () = self.inner.stop.cancelled() => return Left::Stopped,
                changed = links.changed() => {
                    if changed.is_err() {
                        return Left::Stopped;
                    }
                    if links.borrow().is_some() {
                        return Left::Link;
                    }
                }
                relayed = self.queue.recv(), if self.resend.len() < IN_FLIGHT => match relayed {
                    Some(relayed) => self.resend.push_back(relayed),
                    None => return Left::Stopped,
                },
                () = sleep_until(wake) => {}
            }
        }
    }

    /// Pauses before reopening a stream; `true` when the sidecar stops meanwhile.
    async fn idle_until(
        &mut self,
        until: Instant,
        links: &mut tokio::sync::watch::Receiver<Option<Link>>,
    ) -> bool {
        loop {
            self.expire(Instant::now());
            if Instant::now() >= until {
                return false;
            }
            let wake = self.resend.front().map(|r| r.deadline.min(until));
            tokio::select! {
                () = self.inner.stop.cancelled() => return true,
                changed = links.changed() => return changed.is_err(),
                relayed = self.queue.recv(), if self.resend.len() < IN_FLIGHT => match relayed {
                    Some(relayed) => self.resend.push_back(relayed),
                    None => return true,
                },
                () = sleep_until(wake.or(Some(until))) => {}
            }
        }
    }

    /// Answers UNAVAILABLE every message waiting to be sent again whose deadline passed.
    fn expire(&mut self, now: Instant) {
        while self.resend.front().is_some_and(|r| r.deadline <= now) {
            if let Some(mut relayed) = self.resend.pop_front() {
                relayed.finish(Err(timed_out(&self.inner)));
            }
        }
    }

    /// Relays on one Publish stream of `link` until it or the link is lost.
    async fn stream(
        &mut self,
        link: &Link,
        links: &mut tokio::sync::watch::Receiver<Option<Link>>,
    ) -> Left {
        let (outgoing, requests) = mpsc::channel::<BroadcastRequest>(IN_FLIGHT);
        let request = self.inner.request(ReceiverStream::new(requests), "", None);
        let mut client = link.client.clone();
        let opening = tokio::time::timeout(self.inner.config.call_timeout, client.publish(request));
        let mut answers = tokio::select! {
            () = self.inner.stop.cancelled() => return Left::Stopped,
            opened = opening => match opened {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    if refuses_the_pod(&status) {
                        // Sending again would be refused again: the callers hear why.
                        for mut relayed in self.resend.drain(..) {
                            relayed.finish(Err(bus_error("publish", &status)));
                        }
                    }
                    return Left::Failed(describe("publish", &status));
                }
                Err(_) => return Left::Failed("opening the Publish stream timed out".into()),
            },
        };
        let mut in_flight: VecDeque<Relayed> = VecDeque::new();
        let mut bytes = 0usize;
        self.expire(Instant::now());
        let left = loop {
            // What a lost stream left unanswered goes first, in its order.
            while room(&in_flight, bytes)
                && let Some(relayed) = self.resend.pop_front()
            {
                if relayed.answered() {
                    continue;
                }
                if outgoing.try_send(relayed.request.clone()).is_err() {
                    self.resend.push_front(relayed);
                    break;
                }
                bytes += relayed.size;
                in_flight.push_back(relayed);
            }
            let open = self.resend.is_empty() && room(&in_flight, bytes);
            let wake = in_flight
                .iter()
                .find(|r| r.answer.is_some())
                .map(|r| r.deadline);
            tokio::select! {
                biased;
                () = self.inner.stop.cancelled() => break Left::Stopped,
                answer = answers.message() => match answer {
                    Ok(Some(answer)) => {
                        let Some(mut relayed) = in_flight.pop_front() else {
                            break Left::Failed("the control plane answered a message never sent".into());
                        };
                        bytes -= relayed.size;
                        let own_key = relayed.own_key;
                        relayed.finish(outcome(answer, own_key));
                        self.backoff.reset();
                    }
                    Ok(None) => break Left::Failed("the control plane ended the Publish stream".into()),
                    Err(status) => break Left::Failed(describe("publish", &status)),
                },
                changed = links.changed() => {
                    if changed.is_err() {
                        break Left::Stopped;
                    }
                    break Left::Link;
                }
                relayed = self.queue.recv(), if open => match relayed {
                    Some(relayed) => {
                        if outgoing.send(relayed.request.clone()).await.is_err() {
                            self.resend.push_back(relayed);
                            break Left::Failed("the Publish stream closed".into());
                        }
                        bytes += relayed.size;
                        in_flight.push_back(relayed);
                    }
                    None => break Left::Stopped,
                },
                () = sleep_until(wake) => {
                    // Given up on, but kept in place: answers are matched by order.
                    let now = Instant::now();
                    for relayed in in_flight.iter_mut().filter(|r| r.deadline <= now) {
                        relayed.finish(Err(timed_out(&self.inner)));
                    }
                }
            }
        };
        // Unanswered messages go again, before anything queued after them.
        for relayed in in_flight.into_iter().rev() {
            if !relayed.answered() {
                self.resend.push_front(relayed);
            }
        }
        left
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn timed_out(inner: &Inner) -> BusError {
    BusError::Unavailable(format!(
        "the control plane did not acknowledge the broadcast within {:?} (--upstream-timeout); it may or may not be stored: retry with a key",
        inner.config.call_timeout
    ))
}

/// A refusal of the pod itself (its token, its grants, an old control plane):
/// sending again would not help.
fn refuses_the_pod(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::InvalidArgument
    )
}

/// What the local caller hears of an answer on the Publish stream.
fn outcome(mut answer: BroadcastResponse, own_key: bool) -> Result<BroadcastResponse, BusError> {
    if answer.code != Code::Ok as i32 || !answer.error.is_empty() {
        let code = if answer.code == Code::Ok as i32 {
            Code::Internal
        } else {
            Code::from(answer.code)
        };
        return Err(bus_error("broadcast", &Status::new(code, answer.error)));
    }
    if own_key {
        // A repeat of the sidecar's own key: an earlier attempt was stored.
        answer.duplicate = false;
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_core::NodeError;

    #[test]
    fn refusals_keep_their_status_and_own_repeats_are_stored() {
        let refused = BroadcastResponse {
            error: "channel \"a b\" is not a name".into(),
            code: Code::InvalidArgument as i32,
            ..BroadcastResponse::default()
        };
        assert!(matches!(
            outcome(refused, true),
            Err(BusError::Refused(NodeError::InvalidArgument(m))) if m.contains("a b")
        ));
        let busy = BroadcastResponse {
            error: "redis down".into(),
            code: Code::Unavailable as i32,
            ..BroadcastResponse::default()
        };
        assert!(matches!(outcome(busy, true), Err(BusError::Unavailable(_))));
        let repeat = BroadcastResponse {
            id: "first".into(),
            cursor: "1-0".into(),
            duplicate: true,
            ..BroadcastResponse::default()
        };
        assert!(!outcome(repeat.clone(), true).unwrap().duplicate);
        assert!(outcome(repeat, false).unwrap().duplicate);
    }
}
