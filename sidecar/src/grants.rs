//! What the pod's token may do upstream, learned from the control plane (the
//! `grants` built-in op) after each connection, so that no local process can get
//! the pod's upstream subscription refused:
//!
//! - a local subscription to a channel the token cannot cover is refused at once
//!   (PERMISSION_DENIED naming the channel and the token's subscribe grants);
//! - local subscriber ids (generated or chosen) and relayed members go upstream
//!   only when the token covers them; otherwise they stay local to the pod.
//!
//! Without a token, or against a control plane that does not answer `grants`,
//! nothing is known and nothing is filtered (as before).

use std::time::Duration;

use ipc_core::NodeError;
use ipc_core::auth::Grants;
use ipc_core::channel::Pattern;
use ipc_proto::json;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{Member, SendMsgRequest};
use tonic::transport::Channel;

/// The pod token's grants, as the control plane reported them.
#[derive(Debug, Clone)]
pub struct PodGrants {
    /// The token's name (the pod's `sender` upstream).
    pub name: String,
    /// The app its `:` channels expand with.
    pub app: String,
    pub grants: Grants,
}

impl PodGrants {
    /// Asks the control plane; `None` when the caller is not restricted (no
    /// token) or the control plane does not know the op.
    pub async fn fetch(
        client: &mut IpcClient<Channel>,
        request: tonic::Request<SendMsgRequest>,
        timeout: Duration,
    ) -> Option<Self> {
        let reply = tokio::time::timeout(timeout, client.send_msg(request))
            .await
            .ok()?
            .ok()?
            .into_inner()
            .reply?;
        let data = json::from_optional(reply.data.as_ref());
        if data["authenticated"].as_bool() != Some(true) {
            return None;
        }
        Some(Self {
            name: data["name"].as_str().unwrap_or_default().to_string(),
            app: data["app"].as_str().unwrap_or_default().to_string(),
            grants: Grants::from_json(&data),
        })
    }

    /// The request that asks for them.
    pub fn request() -> SendMsgRequest {
        SendMsgRequest {
            op: "grants".into(),
            ..SendMsgRequest::default()
        }
    }

    pub fn covers(&self, pattern: &Pattern) -> bool {
        self.grants.may_subscribe(pattern)
    }

    /// Refuses a local subscription with a pattern the token cannot cover; the
    /// subscriber's own `id` channel is not refused (it stays local if uncovered).
    pub fn check(&self, patterns: &[Pattern], id: &str) -> Result<(), NodeError> {
        match patterns
            .iter()
            .find(|p| p.as_str() != id && !self.covers(p))
        {
            None => Ok(()),
            Some(pattern) => {
                let granted: Vec<&str> =
                    self.grants.subscribe.iter().map(Pattern::as_str).collect();
                Err(NodeError::PermissionDenied(format!(
                    "this pod's token {:?} may not subscribe to {:?}, so the pod cannot receive it: \
                     its subscribe grants are {granted:?}",
                    self.name,
                    pattern.as_str()
                )))
            }
        }
    }

    /// Whether the pod may list `member` upstream (relayed by subscriber `relayer`).
    pub fn may_relay(&self, member: &Member, relayer: &str) -> bool {
        self.grants.may_relay(member, &self.app, relayer)
    }
}
