//! Requests: a request handed to one local responder of its target (round robin,
//! the next one when a relay cannot answer), and its reply routed back by the
//! `reply_to` this node issued, from the identity it was handed to.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipc_proto::pb::Msg;
use opentelemetry::KeyValue;
use tokio::sync::oneshot;

use super::replies::{OperationReplies, Slot};
use super::{Hub, Registry, Subscriber, SubscriberSpec};
use crate::error::{ReplyError, RequestError};
use crate::outbound::{MemberRequest, OperationRequest, Outbound};
use crate::queue::{Charge, Delivery};
use crate::responders;
use crate::telemetry::{Hop, Kind, TRACEPARENT, TRACESTATE, TraceContext};

/// Header set on every request handed to a subscriber: its deadline, in ms since
/// the epoch. A node that relays the request (the sidecar) waits no longer.
pub const DEADLINE_HEADER: &str = "ipc-deadline-ms";

/// One way to hand a request to a member: through subscriber `key`.
#[derive(Debug, Clone)]
pub(super) struct Route {
    pub(super) key: u64,
    pub(super) member: Arc<str>,
}

/// The request channels of a subscriber and of the members it relays, each with
/// the member it reaches.
pub(super) fn request_routes(spec: &SubscriberSpec) -> Vec<(String, Arc<str>)> {
    let own: Arc<str> = Arc::from(spec.id.as_str());
    let mut routes: Vec<(String, Arc<str>)> = vec![(spec.id.clone(), own.clone())];
    if !spec.role_watcher {
        for channel in responders::role_channels(&spec.app, &spec.role, &spec.tag) {
            routes.push((channel, own.clone()));
        }
    }
    for member in &spec.relayed {
        let id: Arc<str> = Arc::from(member.id.as_str());
        for channel in responders::request_channels(member) {
            routes.push((channel.to_string(), id.clone()));
        }
    }
    routes
}

/// A request handed to a subscriber: where its reply will arrive.
pub struct Delivered {
    /// The subscriber it went to.
    pub key: u64,
    /// The member it is for (the subscriber, or a member it relays).
    pub member: Arc<str>,
    /// Its entry among the requests waiting for a reply (the counter of its
    /// `reply_to`).
    pub pending: u64,
    pub reply: oneshot::Receiver<Msg>,
    /// The member header the request had before this delivery set it; `None`
    /// when this delivery did not change it.
    member_header: Option<Option<String>>,
}

fn undo_member_header(request: &mut Arc<Msg>, member_header: Option<Option<String>>) {
    if let Some(previous) = member_header {
        set_or_remove(
            &mut Arc::make_mut(request).headers,
            responders::MEMBER_HEADER,
            previous,
        );
    }
}

fn set_or_remove(headers: &mut HashMap<String, String>, name: &str, value: Option<String>) {
    match value {
        Some(value) => {
            headers.insert(name.to_string(), value);
        }
        None => {
            headers.remove(name);
        }
    }
}

/// What became of a request asked of the local responders ([`Hub::ask_here`]).
pub enum LocalAnswer {
    /// A local responder took it: its reply, or why none came.
    Answered(Result<Msg, RequestError>),
    /// No local responder took it: the request as it was given.
    NoResponder(Msg),
}

/// What [`Hub::ask_here`] changes in a request beyond its deadline header, kept
/// to give back a request no local responder took as it was given.
struct Given {
    reply_to: String,
    /// The trace headers, while spans are recorded (a hop stamps its own).
    trace: Option<(Option<String>, Option<String>)>,
}

impl Given {
    fn keep(request: &mut Msg) -> Self {
        Self {
            reply_to: std::mem::take(&mut request.reply_to),
            trace: crate::telemetry::enabled().then(|| {
                (
                    request.headers.get(TRACEPARENT).cloned(),
                    request.headers.get(TRACESTATE).cloned(),
                )
            }),
        }
    }

    fn restore(self, request: &mut Msg, deadline_header: Option<String>) {
        request.reply_to = self.reply_to;
        let headers = &mut request.headers;
        set_or_remove(headers, DEADLINE_HEADER, deadline_header);
        if let Some((traceparent, tracestate)) = self.trace {
            set_or_remove(headers, TRACEPARENT, traceparent);
            set_or_remove(headers, TRACESTATE, tracestate);
        }
    }
}

/// Where a pending request's reply goes.
enum Waiter {
    /// The one caller waiting on it.
    One(oneshot::Sender<Msg>),
    /// Its member's slot in an operation's replies.
    Slot(Slot),
}

impl Waiter {
    /// Hands `reply` to the waiter; if it is gone, the reply's `reply_to`.
    fn send(self, reply: Msg) -> Result<(), String> {
        match self {
            Waiter::One(tx) => tx.send(reply).map_err(|reply| reply.reply_to),
            Waiter::Slot(slot) => slot.send(reply),
        }
    }

    /// A waiter whose request was not handed out after all: an operation's slot
    /// stays open (the member is asked another way).
    fn disarm(self) {
        if let Waiter::Slot(slot) = self {
            slot.disarm();
        }
    }
}

/// A request waiting for its reply, under the counter of its `reply_to`.
pub(super) struct Pending {
    tx: Waiter,
    /// The random part of its `reply_to`: a reply must name it.
    secret: u64,
    /// The subscriber the request went to: if it leaves, the caller learns at once.
    pub(super) subscriber: u64,
    /// The authenticated identity of that subscriber: only it may reply.
    owner: Option<String>,
    /// The trace the request is part of: its reply's parent.
    trace: Option<TraceContext>,
    /// Its deadline ([`DEADLINE_HEADER`], ms since the epoch). A reply after it is
    /// not found even before the waiter's timer has fired: the caller has its
    /// answer (DEADLINE_EXCEEDED) by then, possibly from another node.
    deadline_ms: Option<i64>,
}

/// A request about to be handed out, as its waiter will be registered.
struct Awaited {
    /// The counter and secret of its `reply_to`.
    pending: u64,
    secret: u64,
    trace: Option<TraceContext>,
    deadline_ms: Option<i64>,
}

/// What every member's request of one operation shares as it is handed out
/// ([`Hub::deliver_operation_request`]).
#[derive(Clone, Copy)]
pub(crate) struct OperationHanding<'a> {
    /// The shared part of the request.
    pub operation: &'a Arc<OperationRequest>,
    /// Its memory, counted once in the node's queued bytes.
    pub charge: &'a Arc<Charge>,
    /// The operation's context (its requests' parent).
    pub trace: Option<&'a TraceContext>,
    /// Its deadline header, read once.
    pub deadline_ms: Option<i64>,
    /// Where the replies go, by member index.
    pub replies: &'a Arc<OperationReplies>,
}

/// A request's deadline header, if it has a readable one.
pub(crate) fn deadline_ms(headers: &HashMap<String, String>) -> Option<i64> {
    headers.get(DEADLINE_HEADER).and_then(|ms| ms.parse().ok())
}

impl Hub {
    /// Whether any local subscriber takes requests for `target` (its id or role
    /// channel, or one of a member it relays): watchers do not count.
    pub fn has_responder(&self, target: &str) -> bool {
        self.registry.read().responders.contains_key(target)
    }

    /// Hands a request to one local responder of `target` (round robin), skipping
    /// the subscribers in `tried`; `None` if there is none left. A request for a
    /// relayed member carries its id in [`responders::MEMBER_HEADER`].
    ///
    /// The queue shares `request` (no copy per try): it is changed in place, and
    /// a try that fails undoes its change at once; a delivered one keeps it until
    /// the caller asks another responder (a relay could not answer).
    pub fn deliver_request(
        &self,
        target: &str,
        request: &mut Arc<Msg>,
        tried: &[u64],
    ) -> Option<Delivered> {
        let reg = self.registry.read();
        for (route, sub) in self.routes_to_try(&reg, target, tried) {
            let (pending, secret, reply_to) = self.new_reply_to();
            let msg = Arc::make_mut(request);
            msg.reply_to = reply_to;
            let relayed = *route.member != *sub.spec.id;
            let member_header = (relayed
                && msg
                    .headers
                    .get(responders::MEMBER_HEADER)
                    .map(String::as_str)
                    != Some(&*route.member))
            .then(|| {
                msg.headers
                    .insert(responders::MEMBER_HEADER.into(), route.member.to_string())
            });
            let awaited = Awaited {
                pending,
                secret,
                trace: TraceContext::from_headers(&msg.headers),
                deadline_ms: deadline_ms(&msg.headers),
            };
            let delivery = Delivery {
                charge: self.charge(msg).into(),
                item: Outbound::Msg(request.clone()),
            };
            let (tx, rx) = oneshot::channel();
            if self.hand(route, sub, awaited, delivery, Waiter::One(tx)) {
                return Some(Delivered {
                    key: route.key,
                    member: route.member.clone(),
                    pending,
                    reply: rx,
                    member_header,
                });
            }
            undo_member_header(request, member_header);
        }
        None
    }

    /// An operation's request to `member` handed to one of its local responders:
    /// the operation's shared part (charged once, `charge`) and this member's own
    /// fields, `id` a fresh message id per try. Its reply completes slot `index`
    /// of the operation's `replies`. `None` if no local responder took it (the
    /// slot stays open); otherwise the counter of its `reply_to`, to forget it.
    pub(crate) fn deliver_operation_request(
        &self,
        member: &str,
        handing: &OperationHanding<'_>,
        index: usize,
        mut id: impl FnMut() -> String,
    ) -> Option<u64> {
        let OperationHanding {
            operation,
            charge,
            trace,
            deadline_ms,
            replies,
        } = *handing;
        let reg = self.registry.read();
        for (route, sub) in self.routes_to_try(&reg, member, &[]) {
            let (pending, secret, reply_to) = self.new_reply_to();
            let request = MemberRequest {
                operation: operation.clone(),
                member: route.member.clone(),
                id: id(),
                reply_to,
            };
            let delivery = Delivery {
                item: Outbound::MemberRequest(Box::new(request)),
                charge: charge.clone().into(),
            };
            let awaited = Awaited {
                pending,
                secret,
                trace: trace.cloned(),
                deadline_ms,
            };
            let slot = Waiter::Slot(Slot::new(replies, index));
            if self.hand(route, sub, awaited, delivery, slot) {
                return Some(pending);
            }
        }
        None
    }

    /// The memory of an operation's shared part, counted once however many
    /// queues hold its members' requests.
    pub(crate) fn operation_charge(&self, operation: &OperationRequest) -> Arc<Charge> {
        Charge::new(operation.memory_size(), &self.queued_bytes)
    }

    /// The routes to `target` to try in turn (round robin), skipping the
    /// subscribers in `tried`, each with its subscriber.
    fn routes_to_try<'r>(
        &self,
        reg: &'r Registry,
        target: &str,
        tried: &'r [u64],
    ) -> impl Iterator<Item = (&'r Route, &'r Subscriber)> + 'r {
        let routes: &[Route] = reg.responders.get(target).map_or(&[], Vec::as_slice);
        // A role's routes are as many as its responders: a first try picks one
        // by index, without a list of the candidates.
        let untried = move |route: &&Route| !tried.contains(&route.key);
        let candidates = if tried.is_empty() {
            routes.len()
        } else {
            routes.iter().filter(untried).count()
        };
        let start = if candidates == 0 {
            0
        } else {
            self.round_robin.fetch_add(1, Ordering::Relaxed)
        };
        (0..candidates).filter_map(move |i| {
            let n = (start + i) % candidates;
            let route = if tried.is_empty() {
                routes.get(n)
            } else {
                routes.iter().filter(untried).nth(n)
            }?;
            Some((route, reg.subs.get(&route.key)?))
        })
    }

    /// Registers a request's reply as awaited by `tx` (before sending it, so that
    /// even an instant reply finds it), then queues the request for `sub`; false,
    /// and nothing awaited, if its queue refused it.
    fn hand(
        &self,
        route: &Route,
        sub: &Subscriber,
        awaited: Awaited,
        delivery: Delivery,
        tx: Waiter,
    ) -> bool {
        let Awaited {
            pending,
            secret,
            trace,
            deadline_ms,
        } = awaited;
        self.pending.lock().insert(
            pending,
            Pending {
                tx,
                secret,
                subscriber: route.key,
                owner: sub.spec.verified_owner.then(|| sub.spec.owner.clone()),
                trace,
                deadline_ms,
            },
        );
        match sub.queue.push(delivery) {
            Ok(()) => true,
            Err(_) => {
                let removed = self.pending.lock().remove(&pending);
                if let Some(removed) = removed {
                    removed.tx.disarm();
                }
                false
            }
        }
    }

    /// Asks a local responder of `target` and waits for its reply until `deadline`
    /// (the node's one request path, [`crate::node::answer`], comes here for
    /// responders). The request carries its deadline
    /// ([`DEADLINE_HEADER`]); a relay that could not answer after all
    /// ([`responders::cannot_answer`]) is skipped and the next responder asked.
    pub async fn request(
        &self,
        target: &str,
        request: Msg,
        deadline: std::time::Instant,
    ) -> Result<Msg, RequestError> {
        match self.ask_here(target, request, deadline).await {
            LocalAnswer::Answered(result) => result,
            LocalAnswer::NoResponder(_) => Err(RequestError::NoResponders(target.to_string())),
        }
    }

    /// [`Hub::request`], but a request no local responder took is given back as it
    /// was passed in, for the bus to route elsewhere (the caller keeps no copy).
    pub async fn ask_here(
        &self,
        target: &str,
        mut request: Msg,
        deadline: std::time::Instant,
    ) -> LocalAnswer {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let given = Given::keep(&mut request);
        let previous_deadline = request.headers.insert(
            DEADLINE_HEADER.to_string(),
            (crate::now_ms() + left.as_millis() as i64).to_string(),
        );
        let mut hop = Hop::child("deliver", Kind::Producer, &request.headers, || {
            vec![
                KeyValue::new("ipc.node", self.node.clone()),
                KeyValue::new("ipc.target", target.to_string()),
                KeyValue::new("ipc.msg_id", request.id.clone()),
            ]
        });
        hop.stamp(&mut request.headers);
        let mut request = Arc::new(request);
        let result = self
            .ask_responders(target, &mut request, deadline, &mut hop)
            .await;
        if let Err(error) = &result {
            hop.fail(|| error.to_string());
        }
        match result {
            Err(RequestError::NoResponders(_)) => {
                let mut request = Arc::unwrap_or_clone(request);
                given.restore(&mut request, previous_deadline);
                LocalAnswer::NoResponder(request)
            }
            answered => LocalAnswer::Answered(answered),
        }
    }

    async fn ask_responders(
        &self,
        target: &str,
        request: &mut Arc<Msg>,
        deadline: std::time::Instant,
        hop: &mut Hop,
    ) -> Result<Msg, RequestError> {
        let mut tried = Vec::new();
        loop {
            let Some(delivered) = self.deliver_request(target, request, &tried) else {
                return Err(RequestError::NoResponders(target.to_string()));
            };
            tracing::debug!(target, member = %delivered.member, node = %self.node, "request handed to a responder");
            hop.set(|| vec![KeyValue::new("ipc.member", delivered.member.to_string())]);
            let Delivered {
                key,
                pending,
                reply,
                member_header,
                ..
            } = delivered;
            match tokio::time::timeout_at(deadline.into(), reply).await {
                Ok(Ok(reply)) if responders::cannot_answer(&reply) => {
                    tracing::debug!(target, node = %self.node, "a relay could not answer; asking another responder");
                    hop.event("relay could not answer");
                    tried.push(key);
                    undo_member_header(request, member_header);
                }
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(_)) => {
                    return Err(RequestError::Unavailable(format!(
                        "the subscriber of {target:?} that had the request disconnected before replying"
                    )));
                }
                Err(_) => {
                    self.pending.lock().remove(&pending);
                    return Err(RequestError::DeadlineExceeded(target.to_string()));
                }
            }
        }
    }

    /// The trace context of a request this node handed out and still waits on.
    pub fn request_trace(&self, reply_to: &str) -> Option<TraceContext> {
        let (counter, secret) = self.pending_key(reply_to)?;
        let pending = self.pending.lock();
        let request = pending.get(&counter).filter(|p| p.secret == secret)?;
        request.trace.clone()
    }

    /// Forgets the request waiting under `pending` (the counter of its
    /// `reply_to`): its waiter learns at once, and a late reply is not found.
    pub fn forget_request(&self, pending: u64) {
        self.pending.lock().remove(&pending);
    }

    /// Requests handed out and waiting for their reply, for tests.
    #[cfg(test)]
    pub(crate) fn pending_requests(&self) -> usize {
        self.pending.lock().len()
    }

    /// Forgets a request whose caller stopped waiting.
    pub fn cancel_request(&self, reply_to: &str) {
        if let Some((counter, secret)) = self.pending_key(reply_to) {
            let mut pending = self.pending.lock();
            if pending.get(&counter).is_some_and(|p| p.secret == secret) {
                pending.remove(&counter);
            }
        }
    }

    /// Completes a request that this node handed out. A request handed to an
    /// authenticated subscriber is completed only by a reply from that identity:
    /// to anyone else it does not exist (NOT_FOUND), and it stays pending. With
    /// `stamp_request_trace`, the request's trace context (if it had one) is
    /// written into the reply's headers.
    pub fn complete_request(
        &self,
        reply: Msg,
        stamp_request_trace: bool,
    ) -> Result<(), ReplyError> {
        let key = self
            .pending_key(&reply.reply_to)
            .map(|(counter, secret)| PendingKey { counter, secret });
        self.complete_pending(reply, key, stamp_request_trace)
    }

    /// Where a reply goes, its `reply_to` read once: `None` if it is not of the
    /// shape this fleet issues; [`ReplyRoute::Here`] if this node issued it.
    pub fn reply_route(&self, reply_to: &str) -> Option<ReplyRoute> {
        let (node, counter, secret) = parse_reply_to(reply_to)?;
        Some(if node == self.node {
            ReplyRoute::Here(PendingKey { counter, secret })
        } else {
            ReplyRoute::Elsewhere
        })
    }

    /// [`Hub::complete_request`] with its `reply_to` already read
    /// ([`Hub::reply_route`]); `None` is not found.
    pub fn complete_pending(
        &self,
        mut reply: Msg,
        key: Option<PendingKey>,
        stamp_request_trace: bool,
    ) -> Result<(), ReplyError> {
        let pending = key.and_then(|PendingKey { counter, secret }| {
            let mut pending = self.pending.lock();
            match pending.get(&counter) {
                Some(p) if p.secret != secret => None,
                Some(p) if p.owner.as_ref().is_some_and(|o| *o != reply.sender) => None,
                // Past its deadline: the waiter's own timer answers it.
                Some(p) if p.deadline_ms.is_some_and(|d| crate::now_ms() > d) => None,
                Some(_) => pending.remove(&counter),
                None => None,
            }
        });
        match pending {
            Some(pending) => {
                if stamp_request_trace && let Some(trace) = &pending.trace {
                    trace.write_headers(&mut reply.headers);
                }
                pending.tx.send(reply).map_err(ReplyError::NotFound)
            }
            None => Err(ReplyError::NotFound(reply.reply_to)),
        }
    }

    /// Whether a `reply_to` was issued by this node.
    pub fn owns_reply_to(&self, reply_to: &str) -> bool {
        reply_to
            .rsplit_once('#')
            .is_some_and(|(node, _)| node == self.node)
    }

    /// A new `reply_to`: `<node>#<counter>.<16 hex digits>`, with its counter and
    /// secret. The node routes the reply; the counter keeps it unique (and is its
    /// key among the pending requests); the 64 random bits make it impossible to
    /// guess, so one process cannot answer a request handed to another one sharing
    /// its token.
    fn new_reply_to(&self) -> (u64, u64, String) {
        let counter = self.next_request.fetch_add(1, Ordering::Relaxed);
        let secret = rand::random::<u64>();
        // Written directly (as `format!("{node}#{counter}.{secret:016x}")`): one
        // per request handed out.
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(counter);
        let mut reply_to = String::with_capacity(self.node.len() + digits.len() + 18);
        reply_to.push_str(&self.node);
        reply_to.push('#');
        reply_to.push_str(digits);
        reply_to.push('.');
        for shift in (0..16).rev() {
            let nibble = ((secret >> (shift * 4)) & 0xf) as u8;
            reply_to.push(char::from(b"0123456789abcdef"[usize::from(nibble)]));
        }
        (counter, secret, reply_to)
    }

    /// The counter and secret of a `reply_to` this node issued.
    fn pending_key(&self, reply_to: &str) -> Option<(u64, u64)> {
        let (node, counter, secret) = parse_reply_to(reply_to)?;
        (node == self.node).then_some((counter, secret))
    }

    /// The node of a `reply_to`, if it has the expected shape.
    pub fn reply_to_node(reply_to: &str) -> Option<&str> {
        parse_reply_to(reply_to).map(|(node, _, _)| node)
    }
}

/// The entry of a request this node handed out, as its `reply_to` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingKey {
    counter: u64,
    secret: u64,
}

/// Where a reply goes, by its `reply_to` ([`Hub::reply_route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRoute {
    /// To a request this node handed out.
    Here(PendingKey),
    /// To another node's.
    Elsewhere,
}

/// The node, counter and secret of a `reply_to` of the expected shape.
fn parse_reply_to(reply_to: &str) -> Option<(&str, u64, u64)> {
    // Read from the end, once (every reply is read here): 16 hex digits, a dot,
    // the counter, back to the last `#`.
    let bytes = reply_to.as_bytes();
    let dot = bytes.len().checked_sub(17)?;
    if bytes[dot] != b'.' {
        return None;
    }
    let mut secret = 0u64;
    for &b in &bytes[dot + 1..] {
        let nibble = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        secret = secret << 4 | u64::from(nibble);
    }
    // An ASCII byte: `dot` is a char boundary.
    let (node, counter) = reply_to[..dot].rsplit_once('#')?;
    if node.is_empty() {
        return None;
    }
    Some((node, counter.parse().ok()?, secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn hub_with_responder(id: &str) -> (Arc<Hub>, crate::hub::Subscription) {
        let hub = Hub::new("n1".into(), 16, Arc::new(Metrics::default()));
        let subscription = add_responder(&hub, id);
        (hub, subscription)
    }

    fn add_responder(hub: &Arc<Hub>, id: &str) -> crate::hub::Subscription {
        crate::hub::test_subscriber(hub, id, Vec::new())
    }

    /// A request to `target` due at `deadline_ms`, handed to its responder: the
    /// `reply_to` it was given, and where its reply arrives.
    fn hand_over(hub: &Hub, target: &str, deadline_ms: i64) -> (String, Delivered) {
        let mut request = Arc::new(Msg {
            op: "status".into(),
            headers: HashMap::from([(DEADLINE_HEADER.to_string(), deadline_ms.to_string())]),
            ..Msg::default()
        });
        let delivered = hub
            .deliver_request(target, &mut request, &[])
            .expect("a responder took it");
        (request.reply_to.clone(), delivered)
    }

    fn reply_to(reply_to: String) -> Msg {
        Msg {
            op: "answer".into(),
            reply_to,
            ..Msg::default()
        }
    }

    /// An operation's request to `member` (index `index`) handed to its
    /// responder, due at `deadline_ms`: the `reply_to` the responder got.
    fn hand_operation(
        hub: &Hub,
        member: &str,
        replies: &Arc<OperationReplies>,
        index: usize,
        deadline_ms: i64,
    ) -> String {
        let operation = Arc::new(OperationRequest::new(Msg {
            op: "status".into(),
            ..Msg::default()
        }));
        let charge = hub.operation_charge(&operation);
        let handing = OperationHanding {
            operation: &operation,
            charge: &charge,
            trace: None,
            deadline_ms: Some(deadline_ms),
            replies,
        };
        hub.deliver_operation_request(member, &handing, index, || format!("id-{index}"))
            .expect("a responder took it");
        let key = hub.registry.read().by_id[member];
        let queue = hub.registry.read().subs[&key].queue.clone();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let std::task::Poll::Ready(Ok(Some(item))) = queue.poll_recv(&mut cx) else {
            panic!("the request is queued");
        };
        item.into_msg().reply_to
    }

    fn arrivals(replies: &OperationReplies) -> Vec<crate::hub::Arrival> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match replies.poll_arrived(&mut cx) {
            std::task::Poll::Ready(arrived) => arrived,
            std::task::Poll::Pending => Vec::new(),
        }
    }

    /// An operation's replies complete their members' slots once: a second reply
    /// to the same request, and one past the deadline, are not found.
    #[test]
    fn an_operations_reply_completes_its_slot_once_and_a_late_one_is_not_found() {
        let (hub, _w1) = hub_with_responder("w1");
        let replies = OperationReplies::new(2);
        let due = crate::now_ms() + 60_000;
        let first = hand_operation(&hub, "w1", &replies, 1, due);
        hub.complete_request(reply_to(first.clone()), false)
            .expect("the first reply completes slot 1");
        assert!(matches!(
            hub.complete_request(reply_to(first), false),
            Err(ReplyError::NotFound(_))
        ));
        let late = hand_operation(&hub, "w1", &replies, 0, crate::now_ms() - 1);
        assert!(matches!(
            hub.complete_request(reply_to(late), false),
            Err(ReplyError::NotFound(_))
        ));
        let arrived = arrivals(&replies);
        assert_eq!(arrived.len(), 1);
        assert!(matches!(&arrived[0], (1, Some(reply)) if reply.op == "answer"));
    }

    /// A responder that leaves with an operation's request completes its slot at
    /// once, as no reply; a reply after the operation closed is not found.
    #[test]
    fn a_leaving_responder_completes_its_slot_as_no_reply() {
        let (hub, w1) = hub_with_responder("w1");
        let _w2 = add_responder(&hub, "w2");
        let replies = OperationReplies::new(2);
        let due = crate::now_ms() + 60_000;
        hand_operation(&hub, "w1", &replies, 0, due);
        let to_w2 = hand_operation(&hub, "w2", &replies, 1, due);
        drop(w1);
        let arrived = arrivals(&replies);
        assert!(matches!(&arrived[..], [(0, None)]));
        assert!(replies.close().is_empty());
        assert!(matches!(
            hub.complete_request(reply_to(to_w2), false),
            Err(ReplyError::NotFound(_))
        ));
    }

    /// The reading every reply goes through, as it was written with splits.
    #[test]
    fn a_reply_to_is_read_as_node_counter_and_secret() {
        let split = |reply_to: &str| -> Option<(String, u64, u64)> {
            let (node, rest) = reply_to.rsplit_once('#')?;
            let (counter, secret) = rest.split_once('.')?;
            let ok = !node.is_empty()
                && secret.len() == 16
                && secret.bytes().all(|b| b.is_ascii_hexdigit());
            ok.then_some(())?;
            Some((
                node.to_string(),
                counter.parse().ok()?,
                u64::from_str_radix(secret, 16).ok()?,
            ))
        };
        for reply_to in [
            "n1#7.0123456789abcdef",
            "a#b#18446744073709551615.FFFFFFFFFFFFFFFF",
            "n1#18446744073709551616.0123456789abcdef",
            "#7.0123456789abcdef",
            "n1#.0123456789abcdef",
            "n1#+7.0123456789abcdef",
            "n1#7.0123456789abcdeg",
            "n1#7.0123456789abcde",
            "n1#7.1.0123456789abcdef",
            "n1#7x0123456789abcdef",
            "n1#7.é123456789abcdef",
            "né#7.0123456789abcdef",
            "n1.7.0123456789abcdef",
            "",
        ] {
            let read = parse_reply_to(reply_to).map(|(n, c, s)| (n.to_string(), c, s));
            assert_eq!(read, split(reply_to), "{reply_to:?}");
        }
    }

    #[test]
    fn a_reply_to_is_node_counter_and_sixteen_hex_digits() {
        let (hub, _w1) = hub_with_responder("w1");
        for _ in 0..50 {
            let (counter, secret, reply_to) = hub.new_reply_to();
            assert_eq!(reply_to, format!("n1#{counter}.{secret:016x}"));
            assert_eq!(parse_reply_to(&reply_to), Some(("n1", counter, secret)));
            assert_eq!(
                hub.reply_route(&reply_to),
                Some(ReplyRoute::Here(PendingKey { counter, secret }))
            );
        }
        assert_eq!(
            hub.reply_route("n2#1.0123456789abcdef"),
            Some(ReplyRoute::Elsewhere)
        );
        assert_eq!(hub.reply_route("n1#1.xyz"), None);
    }

    /// The waiter's timer may fire late on a loaded node, and on another node than
    /// the caller's: a reply past the deadline is refused all the same, since the
    /// caller has had DEADLINE_EXCEEDED by then.
    #[test]
    fn a_reply_past_the_requests_deadline_is_not_found_before_any_timer_fires() {
        let (hub, _responder) = hub_with_responder("w1");
        let (late, _waiting) = hand_over(&hub, "w1", crate::now_ms() - 1);
        assert!(matches!(
            hub.complete_request(reply_to(late), false),
            Err(ReplyError::NotFound(_))
        ));
        let (in_time, mut waiting) = hand_over(&hub, "w1", crate::now_ms() + 60_000);
        hub.complete_request(reply_to(in_time), false)
            .expect("a reply in time completes its request");
        assert_eq!(waiting.reply.try_recv().expect("the reply").op, "answer");
    }
}
