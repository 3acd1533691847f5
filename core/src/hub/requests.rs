//! Requests: a request handed to one local responder of its target (round robin,
//! the next one when a relay cannot answer), and its reply routed back by the
//! `reply_to` this node issued, from the identity it was handed to.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipc_proto::pb::Msg;
use opentelemetry::KeyValue;
use tokio::sync::oneshot;

use super::{Hub, SubscriberSpec};
use crate::error::{ReplyError, RequestError};
use crate::queue::Delivery;
use crate::responders;
use crate::telemetry::{Hop, Kind, TraceContext};

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
    pub reply_to: String,
    pub reply: oneshot::Receiver<Msg>,
}

pub(super) struct Pending {
    tx: oneshot::Sender<Msg>,
    /// The subscriber the request went to: if it leaves, the caller learns at once.
    pub(super) subscriber: u64,
    /// The authenticated identity of that subscriber: only it may reply.
    owner: Option<String>,
    /// The trace the request is part of: its reply's parent.
    trace: Option<TraceContext>,
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
    pub fn deliver_request(
        &self,
        target: &str,
        mut request: Msg,
        tried: &[u64],
    ) -> Option<Delivered> {
        let reg = self.registry.read();
        let candidates: Vec<&Route> = reg
            .responders
            .get(target)?
            .iter()
            .filter(|r| !tried.contains(&r.key))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        for i in 0..candidates.len() {
            let route = candidates[(start + i) % candidates.len()];
            let Some(sub) = reg.subs.get(&route.key) else {
                continue;
            };
            let reply_to = self.new_reply_to();
            request.reply_to = reply_to.clone();
            if *route.member != *sub.spec.id {
                request
                    .headers
                    .insert(responders::MEMBER_HEADER.into(), route.member.to_string());
            }
            let (tx, rx) = oneshot::channel();
            // Registered before sending so that even an instant reply finds it.
            self.pending.lock().insert(
                reply_to.clone(),
                Pending {
                    tx,
                    subscriber: route.key,
                    owner: sub.spec.verified_owner.then(|| sub.spec.owner.clone()),
                    trace: TraceContext::from_headers(&request.headers),
                },
            );
            let request = Arc::new(request.clone());
            let charge = self.charge(&request);
            match sub.queue.push(Delivery {
                msg: request,
                charge,
            }) {
                Ok(()) => {
                    return Some(Delivered {
                        key: route.key,
                        member: route.member.clone(),
                        reply_to,
                        reply: rx,
                    });
                }
                Err(_) => {
                    self.pending.lock().remove(&reply_to);
                }
            }
        }
        None
    }

    /// Asks a local responder of `target` and waits for its reply until `deadline`
    /// (the node's one request path, [`crate::node::answer`], comes here for
    /// responders). The request carries its deadline
    /// ([`DEADLINE_HEADER`]); a relay that could not answer after all
    /// ([`responders::cannot_answer`]) is skipped and the next responder asked.
    pub async fn request(
        &self,
        target: &str,
        mut request: Msg,
        deadline: std::time::Instant,
    ) -> Result<Msg, RequestError> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        request.headers.insert(
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
        let result = self
            .ask_responders(target, request, deadline, &mut hop)
            .await;
        if let Err(error) = &result {
            hop.fail(|| error.to_string());
        }
        result
    }

    async fn ask_responders(
        &self,
        target: &str,
        request: Msg,
        deadline: std::time::Instant,
        hop: &mut Hop,
    ) -> Result<Msg, RequestError> {
        let mut tried = Vec::new();
        loop {
            let Some(delivered) = self.deliver_request(target, request.clone(), &tried) else {
                return Err(RequestError::NoResponders(target.to_string()));
            };
            tracing::debug!(target, member = %delivered.member, node = %self.node, "request handed to a responder");
            hop.set(|| vec![KeyValue::new("ipc.member", delivered.member.to_string())]);
            match tokio::time::timeout_at(deadline.into(), delivered.reply).await {
                Ok(Ok(reply)) if responders::cannot_answer(&reply) => {
                    tracing::debug!(target, node = %self.node, "a relay could not answer; asking another responder");
                    hop.event("relay could not answer");
                    tried.push(delivered.key);
                }
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(_)) => {
                    return Err(RequestError::Unavailable(format!(
                        "the subscriber of {target:?} that had the request disconnected before replying"
                    )));
                }
                Err(_) => {
                    self.cancel_request(&delivered.reply_to);
                    return Err(RequestError::DeadlineExceeded(target.to_string()));
                }
            }
        }
    }

    /// The trace context of a request this node handed out and still waits on.
    pub fn request_trace(&self, reply_to: &str) -> Option<TraceContext> {
        self.pending.lock().get(reply_to)?.trace.clone()
    }

    /// Forgets a request whose caller stopped waiting.
    pub fn cancel_request(&self, reply_to: &str) {
        self.pending.lock().remove(reply_to);
    }

    /// Completes a request that this node handed out. A request handed to an
    /// authenticated subscriber is completed only by a reply from that identity:
    /// to anyone else it does not exist (NOT_FOUND), and it stays pending.
    pub fn complete_request(&self, reply: Msg) -> Result<(), ReplyError> {
        let pending = {
            let mut pending = self.pending.lock();
            match pending.get(&reply.reply_to) {
                Some(p) if p.owner.as_ref().is_some_and(|o| *o != reply.sender) => None,
                Some(_) => pending.remove(&reply.reply_to),
                None => None,
            }
        };
        match pending {
            Some(pending) => {
                let reply_to = reply.reply_to.clone();
                pending
                    .tx
                    .send(reply)
                    .map_err(|_| ReplyError::NotFound(reply_to))
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

    /// A new `reply_to`: `<node>#<counter>.<16 hex digits>`. The node routes the
    /// reply; the counter keeps it unique; the 64 random bits make it impossible
    /// to guess, so one process cannot answer a request handed to another one
    /// sharing its token.
    fn new_reply_to(&self) -> String {
        format!(
            "{}#{}.{:016x}",
            self.node,
            self.next_request.fetch_add(1, Ordering::Relaxed),
            rand::random::<u64>()
        )
    }

    /// The node of a `reply_to`, if it has the expected shape.
    pub fn reply_to_node(reply_to: &str) -> Option<&str> {
        let (node, rest) = reply_to.rsplit_once('#')?;
        let (counter, secret) = rest.split_once('.')?;
        let well_formed = !node.is_empty()
            && counter.parse::<u64>().is_ok()
            && secret.len() == 16
            && secret.bytes().all(|b| b.is_ascii_hexdigit());
        well_formed.then_some(node)
    }
}
