//! The plumbing of every call to the control plane: the connection (TLS,
//! keepalive, frame limits), the metadata a call carries (the pod's app, the
//! sender, the token, re-read at each connection), and how a refusal reaches the
//! local caller.

use std::sync::Arc;
use std::time::Duration;

use ipc_core::NodeError;
use ipc_core::bus::BusError;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse};
use opentelemetry::KeyValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::Inner;

/// The control plane's unary calls, for modules that relay to it (leases).
#[derive(Clone)]
pub(crate) struct Upstream(pub(super) Arc<Inner>);

impl Upstream {
    /// The client and a request carrying the pod's metadata, bounded by `timeout`.
    pub(crate) fn call<T>(
        &self,
        body: T,
        timeout: Duration,
    ) -> Result<(IpcClient<Channel>, tonic::Request<T>), BusError> {
        let link = self
            .0
            .link_or_unavailable()
            .map_err(BusError::Unavailable)?;
        Ok((link.client, self.0.request(body, "", Some(timeout))))
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        self.0.config.call_timeout
    }
}

/// `ipc-app` and `ipc-sender` of the pod's own calls.
pub(super) struct PodMetadata {
    pub(super) app: Option<tonic::metadata::AsciiMetadataValue>,
    pub(super) sender: Option<tonic::metadata::AsciiMetadataValue>,
}

#[derive(Clone)]
pub(super) struct Link {
    pub(super) client: IpcClient<Channel>,
    pub(super) address: String,
    /// Which connection this is (one per successful connect, from 1).
    pub(super) id: u64,
}

/// The ids of [`Link`]s.
static NEXT_LINK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Inner {
    pub(super) fn link_or_unavailable(&self) -> Result<Link, String> {
        self.link.borrow().clone().ok_or_else(|| {
            format!(
                "the control plane is unreachable ({}); retry",
                self.last_error.lock()
            )
        })
    }

    /// Who a local sender is upstream: the fleet knows the pod, not the pid of one
    /// of its processes; a local process that names itself keeps its name.
    pub(super) fn upstream_sender<'a>(&'a self, sender: &'a str) -> &'a str {
        if sender.is_empty()
            || sender == "anonymous"
            || ipc_core::grpc::identify::LocalProcess::is_sender(sender)
        {
            self.config.identity.id.as_str()
        } else {
            sender
        }
    }

    /// A unary Broadcast upstream in the name of `sender`.
    pub(super) async fn broadcast_unary(
        &self,
        request: BroadcastRequest,
        sender: &str,
    ) -> Result<BroadcastResponse, BusError> {
        let link = self.link_or_unavailable().map_err(BusError::Unavailable)?;
        let request = self.request(request, sender, Some(self.config.call_timeout));
        Ok(link
            .client
            .clone()
            .broadcast(request)
            .await
            .map_err(|status| bus_error("broadcast", &status))?
            .into_inner())
    }

    /// What a span of a call to the control plane says about it.
    pub(super) fn upstream_attributes(&self) -> Vec<KeyValue> {
        let mut attributes = vec![
            KeyValue::new("ipc.node", self.config.node_name.clone()),
            KeyValue::new("rpc.system", "grpc"),
        ];
        if let Some(link) = self.link.borrow().as_ref() {
            attributes.push(KeyValue::new("ipc.upstream", link.address.clone()));
        }
        attributes
    }

    /// A request with the metadata every upstream call carries.
    pub(super) fn request<T>(
        &self,
        body: T,
        sender: &str,
        timeout: Option<Duration>,
    ) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        let sender = self.upstream_sender(sender);
        let metadata = request.metadata_mut();
        if let Some(app) = &self.pod_metadata.app {
            metadata.insert(ipc_core::grpc::identify::APP_METADATA, app.clone());
        }
        let sender = match &self.pod_metadata.sender {
            Some(pod) if sender == self.config.identity.id => Some(pod.clone()),
            _ => sender.parse().ok(),
        };
        if let Some(sender) = sender {
            metadata.insert(ipc_core::grpc::identify::SENDER_METADATA, sender);
        }
        if let Some(token) = self.token.read().clone() {
            metadata.insert("authorization", token);
        }
        request
    }

    pub(super) async fn connect(&self, address: &str) -> Result<Link, String> {
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| format!("bad address: {e}"))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.config.keepalive)
            .keep_alive_timeout(self.config.keepalive * 3)
            .keep_alive_while_idle(true);
        let endpoint = if address.starts_with("https://") {
            endpoint
                .tls_config(self.config.tls.clone())
                .map_err(|e| format!("TLS: {e}"))?
        } else {
            endpoint
        };
        let channel = tokio::time::timeout(self.config.connect_timeout, endpoint.connect())
            .await
            .map_err(|_| "connection timed out".to_string())?
            .map_err(|e| format!("cannot connect: {}", error_chain(&e)))?;
        self.refresh_token();
        let client = IpcClient::new(channel)
            .max_decoding_message_size(self.config.max_frame)
            .max_encoding_message_size(self.config.max_frame);
        Ok(Link {
            client,
            address: address.to_string(),
            id: NEXT_LINK.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn refresh_token(&self) {
        let Some(path) = &self.config.token_file else {
            return;
        };
        match std::fs::read_to_string(path) {
            Ok(token) => match format!("Bearer {}", token.trim()).parse() {
                Ok(value) => *self.token.write() = Some(value),
                Err(_) => {
                    tracing::warn!(file = %path.display(), "token file holds characters not allowed in metadata")
                }
            },
            Err(error) => {
                tracing::warn!(file = %path.display(), %error, "cannot read the token file")
            }
        }
    }
}

pub(super) fn describe(call: &str, status: &Status) -> String {
    format!("{call}: {:?}: {}", status.code(), status.message())
}

/// A failure of an upstream call as the local caller should see it: unavailable
/// when the control plane cannot be reached, else its refusal.
pub(crate) fn bus_error(call: &str, status: &Status) -> BusError {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Aborted => {
            BusError::Unavailable(format!("control plane {}", describe(call, status)))
        }
        // The pod's own credentials were refused: the sidecar's problem, not the caller's.
        Code::Unauthenticated => BusError::Unavailable(format!(
            "the control plane did not accept the sidecar's token (--token-file): {}",
            describe(call, status)
        )),
        code => {
            let refusal = format!("control plane refused {call}: {}", status.message());
            BusError::Refused(match code {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                    NodeError::InvalidArgument(refusal)
                }
                Code::PermissionDenied => NodeError::PermissionDenied(refusal),
                Code::ResourceExhausted => NodeError::TooLarge(refusal),
                Code::NotFound => NodeError::NotFound(refusal),
                _ => NodeError::Internal(refusal),
            })
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
