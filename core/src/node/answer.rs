//! Requests answered in this node, in one order whichever way they arrive — a local
//! caller's SendMsg, Gather and Rollout, or a request a bus brings from another node
//! ([`crate::local::Local::request`]):
//!
//! 1. a hook of the node's own member for the op, when the target is one of that
//!    member's channels (a sidecar's `--hook`s, on its pod's id and role channels);
//! 2. a local responder of the target ([`crate::hub`]: round robin, the next one
//!    when a relay cannot answer);
//! 3. a built-in op sent to the own member's id (a sidecar's pod id), answered as
//!    for an empty target, a failure coming back as the reply's `error`.
//!
//! Else nothing here answers: a local request goes through the bus, a request
//! from another node is told `NoResponders`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use ipc_proto::pb::Msg;

use super::{BUILTIN_OPS, Caller, Node, NodeError};
use crate::error::RequestError;
use crate::hub::LocalAnswer;

/// Ops a node answers for its own member by running something of its own: a
/// sidecar's hooks.
#[async_trait]
pub trait Hooks: Send + Sync + 'static {
    /// Whether a hook answers `op`.
    fn has(&self, op: &str) -> bool;

    /// Runs the hook of `request.op` and returns its reply, waiting no longer
    /// than `deadline` for a run of the same hook to end first.
    async fn answer(&self, request: &Msg, deadline: Instant) -> Msg;
}

/// The node as a member of the fleet in its own right, beside its subscribers: a
/// sidecar is its pod. A node without one (the server) answers built-in ops only
/// for an empty target.
pub struct OwnMember {
    /// Its member id: built-in ops sent to it are answered by the node.
    pub id: String,
    /// Its channels (its id, `app:role`, `app:role:tag`): where its hooks answer.
    pub channels: HashSet<String>,
    pub hooks: Arc<dyn Hooks>,
}

impl OwnMember {
    fn hook_for(&self, target: &str, op: &str) -> bool {
        self.channels.contains(target) && self.hooks.has(op)
    }

    fn builtin_for(&self, target: &str, op: &str) -> bool {
        target == self.id && BUILTIN_OPS.contains(&op)
    }
}

impl Node {
    /// Whether something in this node answers `op` sent to `target`.
    pub(crate) fn answers_here(&self, target: &str, op: &str) -> bool {
        let own = self.own.as_ref();
        own.is_some_and(|own| own.hook_for(target, op))
            || self.hub.has_responder(target)
            || own.is_some_and(|own| own.builtin_for(target, op))
    }

    /// Whether a hook of the node's own member answers `op` sent to `target`
    /// (before any local responder).
    pub(crate) fn hook_answers(&self, target: &str, op: &str) -> bool {
        self.own
            .as_ref()
            .is_some_and(|own| own.hook_for(target, op))
    }

    /// Answers a request for `target` in this node, in the order of the module
    /// doc, and waits until `deadline`. `NoResponders` when nothing here answers.
    pub(crate) async fn answer_here(
        &self,
        caller: &Caller,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        match self
            .answer_or_give_back(caller, target, request, deadline)
            .await
        {
            LocalAnswer::Answered(answer) => answer,
            LocalAnswer::NoResponder(_) => Err(RequestError::NoResponders(target.to_string())),
        }
    }

    /// [`Node::answer_here`], but a request nothing here answers is given back as
    /// it was passed in (no copy kept for the bus meanwhile).
    async fn answer_or_give_back(
        &self,
        caller: &Caller,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> LocalAnswer {
        let own = self.own.as_ref();
        if let Some(own) = own.filter(|own| own.hook_for(target, &request.op)) {
            return LocalAnswer::Answered(Ok(own.hooks.answer(&request, deadline).await));
        }
        let request = if self.hub.has_responder(target) {
            match self.hub.ask_here(target, request, deadline).await {
                LocalAnswer::Answered(answer) => return LocalAnswer::Answered(answer),
                // The responder left meanwhile: a built-in may still answer.
                LocalAnswer::NoResponder(request) => request,
            }
        } else {
            request
        };
        if own.is_some_and(|own| own.builtin_for(target, &request.op)) {
            return LocalAnswer::Answered(match self.builtin(caller, &request.op).await {
                Ok(reply) => Ok(reply),
                Err(NodeError::DeadlineExceeded(_)) => {
                    Err(RequestError::DeadlineExceeded(target.to_string()))
                }
                Err(error) => Ok(Msg {
                    op: request.op,
                    error: error.to_string(),
                    ts_ms: crate::now_ms(),
                    ..Msg::default()
                }),
            });
        }
        LocalAnswer::NoResponder(request)
    }

    /// A request answered in this node when something here answers it, else
    /// through the bus.
    pub(crate) async fn route_request(
        &self,
        caller: &Caller,
        target: &str,
        request: Msg,
        deadline: Instant,
    ) -> Result<Msg, RequestError> {
        let request = match self
            .answer_or_give_back(caller, target, request, deadline)
            .await
        {
            LocalAnswer::Answered(answer) => return answer,
            LocalAnswer::NoResponder(request) => request,
        };
        self.bus.request(target, request, deadline).await
    }
}
