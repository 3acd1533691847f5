//! The input rules of docs/design.md that every operation checks before it acts:
//! message and header sizes, ops, timeouts, grants, the per-identity rate limit,
//! what a subscription may ask for, and the members a sidecar relays. Each refusal
//! names what is wrong and counts in the metrics.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ipc_proto::pb::{Member, SubscribeRequest};
use prost::Message as _;

use super::{Caller, Node, NodeError};
use crate::auth::Grants;
use crate::channel::{self, Pattern};
use crate::hub::SubscriberSpec;
use crate::metrics::Refusal;

impl Node {
    /// Admits one request of `caller` under the per-identity rate limit.
    pub fn admit(&self, caller: &Caller) -> Result<(), NodeError> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check(&caller.sender, Instant::now()).map_err(|wait| {
            self.metrics.refuse(Refusal::Rate);
            NodeError::TooLarge(format!(
                "rate limit: {} exceeds {} requests per second (--rate-limit); retry in {} ms",
                caller.sender,
                rate.per_second(),
                wait.as_millis().max(1)
            ))
        })
    }

    /// Refuses what an authenticated caller's grants do not cover.
    pub(crate) fn authorize(
        &self,
        caller: &Caller,
        verb: &str,
        what: &str,
        allowed: impl FnOnce(&Grants) -> bool,
    ) -> Result<(), NodeError> {
        match &caller.grants {
            Some(grants) if !allowed(grants) => {
                self.metrics.refuse(Refusal::PermissionDenied);
                Err(NodeError::PermissionDenied(format!(
                    "{} may not {verb} {what:?}: not in its grants",
                    caller.sender
                )))
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn app<'a>(&'a self, caller: &'a Caller) -> Option<&'a str> {
        caller
            .app
            .as_deref()
            .filter(|a| !a.is_empty())
            .or(self.config.default_app.as_deref())
    }

    /// How long a request may wait: `timeout_ms` (the default when 0), bounded by
    /// what is left of the gRPC deadline, minus a margin so that the caller sees
    /// our answer rather than tonic's own cancel at the deadline itself.
    pub(crate) fn request_timeout(
        &self,
        timeout_ms: u32,
        grpc_timeout: Option<Duration>,
    ) -> Result<Duration, NodeError> {
        let requested = Duration::from_millis(u64::from(timeout_ms));
        if requested > self.config.max_timeout {
            self.metrics.refuse(Refusal::Timeout);
            return Err(NodeError::InvalidArgument(format!(
                "timeout_ms {timeout_ms} is above the largest accepted, {} ms",
                self.config.max_timeout.as_millis()
            )));
        }
        let mut timeout = if timeout_ms == 0 {
            self.config.default_timeout
        } else {
            requested
        };
        if let Some(grpc) = grpc_timeout {
            timeout = timeout.min(before_grpc_deadline(grpc));
        }
        Ok(timeout)
    }

    /// The subscriber a SubscribeRequest asks for, once it passes every rule: its
    /// id, app and patterns (role, tag and its own id added), each within grants.
    pub(super) fn subscriber_spec(
        &self,
        caller: &Caller,
        req: &SubscribeRequest,
    ) -> Result<SubscriberSpec, NodeError> {
        let invalid = NodeError::InvalidArgument;
        self.check_size(req.encoded_len())?;
        if req.channels.len() > self.config.max_channels {
            self.metrics.refuse(Refusal::Channels);
            return Err(NodeError::TooLarge(format!(
                "{} channels in one subscription; at most {}",
                req.channels.len(),
                self.config.max_channels
            )));
        }
        self.check_map("labels", &req.labels)?;
        let app = match req.app.as_str() {
            "" => self.app(caller).unwrap_or_default().to_string(),
            app => {
                channel::check_segment("app", app).map_err(invalid)?;
                app.to_string()
            }
        };
        let app_ref = (!app.is_empty()).then_some(app.as_str());
        // A chosen id is a channel the subscriber receives requests on (and takes
        // over from an earlier subscriber with that id), so it needs a grant; a
        // generated one is unique and needs none.
        let chosen_id = !req.id.is_empty();
        let id = match req.id.as_str() {
            "" => format!("sub-{:012x}", rand::random::<u64>() >> 16),
            id => channel::parse_name(id, None)
                .map_err(|e| NodeError::InvalidArgument(format!("subscriber id: {e}")))?,
        };
        let mut patterns = Vec::new();
        for raw in &req.channels {
            patterns.push(channel::parse_pattern(raw, app_ref)?);
        }
        if !req.role.is_empty() {
            channel::check_segment("role", &req.role).map_err(invalid)?;
            let app = app_ref.ok_or_else(|| {
                NodeError::InvalidArgument(
                    "role given but no app id is known (set `app`, `ipc-app` metadata or the server's --app)".into(),
                )
            })?;
            patterns.push(Pattern::parse(&format!("{app}:{}", req.role))?);
            if !req.tag.is_empty() {
                channel::check_segment("tag", &req.tag).map_err(invalid)?;
                patterns.push(Pattern::parse(&format!("{app}:{}:{}", req.role, req.tag))?);
            }
        } else if !req.tag.is_empty() {
            return Err(invalid(
                "tag given without a role; the tag channel is app:role:tag".into(),
            ));
        }
        for pattern in &patterns {
            self.authorize(caller, "subscribe to", pattern.as_str(), |g| {
                g.may_subscribe(pattern)
            })?;
        }
        let id_pattern = Pattern::parse(&id)?;
        if chosen_id {
            self.authorize(caller, "subscribe with id", &id, |g| {
                g.may_subscribe(&id_pattern)
            })?;
        }
        patterns.push(id_pattern);
        let mut seen = std::collections::HashSet::new();
        patterns.retain(|p| seen.insert(p.as_str().to_string()));
        // Kept for the subscription's life: no room for more (pushes left 4 slots).
        patterns.shrink_to_fit();
        let relayed = self.relayed_members(caller, &id, &req.members)?;
        Ok(SubscriberSpec {
            id,
            app,
            role: req.role.clone(),
            tag: req.tag.clone(),
            labels: req.labels.clone(),
            patterns,
            owner: caller.sender.clone(),
            verified_owner: caller.is_authenticated(),
            relayed,
            role_watcher: req.role_watcher,
        })
    }

    /// Checks the members a subscriber relays (a sidecar's local subscribers). Each
    /// is listed fleet-wide under its id, so it needs what a subscriber choosing that
    /// id needs: a valid channel name and, for an authenticated caller, a grant to
    /// subscribe to it. `node` defaults to the relaying subscriber's id.
    fn relayed_members(
        &self,
        caller: &Caller,
        relayer: &str,
        members: &[Member],
    ) -> Result<Vec<Member>, NodeError> {
        if members.len() > self.config.max_channels {
            self.metrics.refuse(Refusal::Channels);
            return Err(NodeError::TooLarge(format!(
                "{} relayed members in one subscription; at most {}",
                members.len(),
                self.config.max_channels
            )));
        }
        let mut ids = std::collections::HashSet::new();
        let mut relayed = Vec::with_capacity(members.len());
        for member in members {
            let bad = |what: String| {
                let shown: String = member.id.chars().take(64).collect();
                NodeError::InvalidArgument(format!("relayed member {shown:?}: {what}"))
            };
            let id = channel::parse_name(&member.id, None).map_err(|e| bad(format!("id: {e}")))?;
            let node = match member.node.as_str() {
                "" => relayer.to_string(),
                node if node == self.config.name => {
                    return Err(bad(format!(
                        "node {node:?} is this node's name; give the relaying node's"
                    )));
                }
                node => channel::parse_name(node, None).map_err(|e| bad(format!("node: {e}")))?,
            };
            if !ids.insert((id.clone(), node.clone())) {
                return Err(bad(format!("listed twice for node {node:?}")));
            }
            for (what, value) in [
                ("app", &member.app),
                ("role", &member.role),
                ("tag", &member.tag),
            ] {
                if !value.is_empty() {
                    channel::check_segment(what, value).map_err(|e| bad(e.to_string()))?;
                }
            }
            self.check_map("labels", &member.labels)
                .map_err(|e| bad(e.to_string()))?;
            if member.channels.len() > self.config.max_channels {
                return Err(bad(format!(
                    "{} channels; at most {}",
                    member.channels.len(),
                    self.config.max_channels
                )));
            }
            for raw in &member.channels {
                Pattern::parse(raw).map_err(|e| bad(format!("channel: {e}")))?;
            }
            let id_pattern = Pattern::parse(&id).map_err(|e| bad(format!("id: {e}")))?;
            self.authorize(caller, "relay a member with id", &id, |g| {
                g.may_subscribe(&id_pattern)
            })?;
            self.authorize_relayed(caller, relayer, member, &node)
                .map_err(|e| match e {
                    NodeError::PermissionDenied(m) => {
                        NodeError::PermissionDenied(format!("relayed member {:?}: {m}", id))
                    }
                    other => other,
                })?;
            let member = crate::responders::with_roles(Member {
                id,
                node,
                connected_ms: if member.connected_ms > 0 {
                    member.connected_ms
                } else {
                    crate::now_ms()
                },
                ..member.clone()
            });
            relayed.push(member);
        }
        Ok(relayed)
    }

    /// What a relayed member claims must be within the relaying token's grants:
    /// its app is the caller's, its role and tag channels, its channels, and a
    /// node other than the relayer's own id are ones the token may subscribe to.
    /// Unauthenticated relayers (a pod's socket, loopback) are trusted.
    fn authorize_relayed(
        &self,
        caller: &Caller,
        relayer: &str,
        member: &Member,
        node: &str,
    ) -> Result<(), NodeError> {
        if !caller.is_authenticated() {
            return Ok(());
        }
        let caller_app = self.app(caller).unwrap_or_default();
        if !member.app.is_empty() && member.app != caller_app {
            self.metrics.refuse(Refusal::PermissionDenied);
            return Err(NodeError::PermissionDenied(format!(
                "{} may only relay members of its own app {caller_app:?}, not {:?}",
                caller.sender, member.app
            )));
        }
        for channel in crate::auth::relayed_claims(member, caller_app, relayer, node) {
            let pattern = Pattern::parse(&channel)?;
            self.authorize(caller, "relay a member of", &channel, |g| {
                g.may_subscribe(&pattern)
            })?;
        }
        Ok(())
    }

    pub(crate) fn check_size(&self, size: usize) -> Result<(), NodeError> {
        if size > self.config.max_msg_bytes {
            self.metrics.refuse(Refusal::MsgBytes);
            return Err(NodeError::TooLarge(format!(
                "message is {size} bytes; the limit is {} bytes (--max-msg-bytes)",
                self.config.max_msg_bytes
            )));
        }
        Ok(())
    }

    pub(crate) fn check_headers(&self, headers: &HashMap<String, String>) -> Result<(), NodeError> {
        self.check_map("headers", headers)
    }

    /// Headers of a message or labels of a subscriber: count, total size, names.
    pub(crate) fn check_map(
        &self,
        what: &str,
        map: &HashMap<String, String>,
    ) -> Result<(), NodeError> {
        if map.len() > self.config.max_headers {
            self.metrics.refuse(Refusal::Headers);
            return Err(NodeError::TooLarge(format!(
                "{} {what}; at most {} (--max-headers)",
                map.len(),
                self.config.max_headers
            )));
        }
        let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > self.config.max_header_bytes {
            self.metrics.refuse(Refusal::HeaderBytes);
            return Err(NodeError::TooLarge(format!(
                "{what} total {bytes} bytes; at most {} (--max-header-bytes)",
                self.config.max_header_bytes
            )));
        }
        for (key, value) in map {
            let shown = crate::text::shorten(key, 40);
            crate::text::check_text(&format!("{what} name {shown:?}"), key)
                .and_then(|()| crate::text::check_text(&format!("{what} {shown:?} value"), value))
                .map_err(NodeError::InvalidArgument)?;
        }
        if let Some(key) = map.keys().find(|k| k.is_empty() || k.len() > 128) {
            let shown: String = key.chars().take(40).collect();
            return Err(NodeError::InvalidArgument(format!(
                "{what}: name {shown:?} must be 1 to 128 bytes"
            )));
        }
        Ok(())
    }
}

/// How long a call may wait given what is left of its gRPC deadline: a little
/// less, because at the deadline itself tonic cancels the call (CANCELLED) and the
/// caller should see the node's own answer instead.
pub fn before_grpc_deadline(grpc: Duration) -> Duration {
    let margin = (grpc / 5).min(Duration::from_millis(100));
    grpc.saturating_sub(margin)
}

pub(crate) fn check_op(op: &str) -> Result<(), NodeError> {
    if op.is_empty() {
        return Err(NodeError::InvalidArgument(
            "op is empty: every message needs an op, like \"worker:restart\"".into(),
        ));
    }
    if op.len() > 256 {
        return Err(NodeError::InvalidArgument(format!(
            "op is {} bytes; at most 256",
            op.len()
        )));
    }
    crate::text::check_text("op", op).map_err(NodeError::InvalidArgument)?;
    Ok(())
}

#[cfg(test)]
mod tests;
