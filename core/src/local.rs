//! [`Local`]: what a bus may do to the node it carries messages for — the narrow
//! handle [`crate::Bus::attach`] hands a bus instead of the whole node.
//!
//! A bus delivers through it and nothing else: log entries to the matching local
//! subscribers, `ipc:gap` to all of them, a request from another node answered here
//! through the node's one request path (hooks, local responders and built-ins in one
//! order, see [`crate::node::answer`]), a reply to a request this node handed out,
//! and the local members a bus publishes or relays. What is the bus's own — the
//! transport, its log, its presence — stays in the bus.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use ipc_proto::pb::{Member, Msg};

use crate::auth::Caller;
use crate::error::{ReplyError, RequestError};
use crate::hub::Hub;
use crate::node::Node;
use crate::notice::Gap;

/// A bus's handle on its node. Cheap to clone: a bus hands copies to its tasks.
#[derive(Clone)]
pub struct Local {
    hub: Arc<Hub>,
    /// Weak: the node owns its bus, which owns this handle.
    node: Weak<Node>,
}

impl Local {
    pub(crate) fn new(hub: Arc<Hub>, node: Weak<Node>) -> Self {
        Self { hub, node }
    }

    /// The node's name: in `reply_to`, `Member.node` and the notices it sends.
    pub fn node_name(&self) -> &str {
        self.hub.node()
    }

    /// Delivers a log entry to every local subscriber whose patterns match its
    /// channel. A bus calls this in log order. Returns the number of deliveries.
    pub fn dispatch(&self, msg: &Arc<Msg>) -> usize {
        self.hub.dispatch(msg)
    }

    /// Whether [`Local::dispatch`] of a log entry on `channel` would do anything
    /// now: reach a local subscriber, or (tracing on) record its `fanout` span.
    /// When it would not, a bus may leave the entry undecoded, provided it asks
    /// no earlier than a dispatch would be allowed to: after the bus's
    /// [`crate::bus::Bus::head`] reads past the entry, so that a subscriber registering
    /// after this answer is owed nothing of it (see `Node::subscribe_outbound`:
    /// register, then read the head).
    pub fn wants(&self, channel: &str) -> bool {
        crate::telemetry::enabled() || self.hub.wants(channel)
    }

    /// [`Local::dispatch`] of an entry whose memory size the bus knows (the
    /// memory bus counts it for retention): not computed again for the queues.
    pub fn dispatch_sized(&self, msg: &Arc<Msg>, size: usize) -> usize {
        self.hub.dispatch_sized(msg, Some(size))
    }

    /// Tells every local subscriber that messages were lost (`ipc:gap`: after
    /// the gap's cursor, if known, and why). Returns how many it reached (counted
    /// in `ipc_gaps_total`).
    pub fn gap(&self, gap: Gap) -> usize {
        let id = match self.node.upgrade() {
            Some(node) => node.new_id(),
            None => format!("{}-gap-{:016x}", self.node_name(), rand::random::<u64>()),
        };
        let notice = gap.to_msg(id, self.node_name());
        let reached = self.hub.notify_all(&Arc::new(notice));
        self.hub
            .metrics()
            .gaps
            .fetch_add(reached as u64, Ordering::Relaxed);
        reached
    }

    /// Answers a request that another node routed here, for `target`, and waits
    /// until `deadline`: the node's one path for requests, in its one order (see
    /// [`crate::node::answer`]). `NoResponders` when nothing here answers it.
    pub async fn request(
        &self,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        let Some(node) = self.node.upgrade() else {
            return Err(RequestError::Unavailable(format!(
                "node {} is shutting down",
                self.node_name()
            )));
        };
        // Built-ins answer a request from another node as they answer any caller
        // the node did not authenticate itself.
        let caller = Caller {
            sender: request.sender.clone(),
            ..Caller::default()
        };
        node.answer_here(&caller, target, request, deadline).await
    }

    /// Completes a request this node handed to one of its subscribers, with a
    /// reply that reached another node.
    pub fn complete(&self, reply: Msg) -> Result<(), ReplyError> {
        self.hub.complete_request(reply, false)
    }

    /// The local subscribers as members, each followed by the members it relays:
    /// what a bus publishes as this node's presence.
    pub fn members(&self) -> Vec<Member> {
        self.hub.members()
    }

    /// The local subscribers alone (not what they relay): their channels are what a
    /// relaying bus asks its upstream for.
    pub fn subscribers(&self) -> Vec<Member> {
        self.hub.subscribers()
    }
}
