//! [`Client`]: one connection (TCP or Unix socket) to a node, and the calls of the
//! `ipc.v1.Ipc` service with JSON payloads, metadata and typed errors.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use ipc_proto::json;
use ipc_proto::pb;
use ipc_proto::pb::ipc_client::IpcClient;
use tokio::net::UnixStream;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

use crate::addr::Address;
use crate::subscribe::{SubscribeOptions, Subscription};
use crate::{Broadcasted, Error, Member, Msg};

/// The wait of `send_msg` when the caller gives none; the node's own default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a unary call may outlive its own deadline before the client gives up on
/// the node: the node normally answers DEADLINE_EXCEEDED itself, this only guards
/// against a node that stopped answering.
const DEADLINE_GRACE: Duration = Duration::from_secs(2);

/// Metadata key carrying the caller's app id; a leading `:` in channels expands to it.
const APP_METADATA: &str = "ipc-app";

/// Replies waiting to be written on a Serve stream; a handler answering faster than
/// the connection takes them waits.
const SERVE_QUEUE: usize = 256;

/// A connection to a fleet-ipc node (server or sidecar).
///
/// Cheap to clone: clones share one HTTP/2 connection, which is re-established by
/// itself after a failure on the next call.
///
/// ```no_run
/// # async fn demo() -> Result<(), ipc_client::Error> {
/// use ipc_client::Client;
/// use serde_json::json;
///
/// let client = Client::builder("http://127.0.0.1:7700").app("shop").connect().await?;
/// client.broadcast(":worker", "worker:restart", json!({"grace": 5})).await?;
/// let reply = client.send_msg(":worker", "config:get", json!({"key": "db"}), None).await?;
/// println!("{}", reply.data);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) rpc: IpcClient<Channel>,
    pub(crate) settings: Arc<Settings>,
}

/// What every call needs besides the connection.
pub(crate) struct Settings {
    address: Address,
    app: Option<AsciiMetadataValue>,
    authorization: Option<AsciiMetadataValue>,
    pub(crate) timeout: Duration,
}

/// Configures a [`Client`]: `Client::builder(addr).app("shop").token(t).connect()`.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    address: String,
    app: Option<String>,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
}

impl ClientBuilder {
    /// The app id sent as `ipc-app` metadata on every call: it expands a leading `:`
    /// in channels and is the default app of subscriptions and member filters.
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = Some(app.into()).filter(|a| !a.is_empty());
        self
    }

    /// A bearer token, sent as `authorization: Bearer <token>` on every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into()).filter(|t| !t.is_empty());
        self
    }

    /// The `send_msg` wait when the call gives none, and the deadline of the other
    /// unary calls. Default [`DEFAULT_TIMEOUT`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long establishing the connection may take. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects now: an unreachable node is reported here as [`Error::Unreachable`].
    pub async fn connect(self) -> Result<Client, Error> {
        let (endpoint, settings) = self.prepare()?;
        let channel = match &settings.address {
            Address::Tcp(_) => endpoint.connect().await,
            Address::Unix(path) => endpoint.connect_with_connector(unix_connector(path)).await,
        }
        .map_err(|e| Error::Unreachable(format!("{}: {}", settings.address, deepest(&e))))?;
        Ok(Client::from_parts(channel, settings))
    }

    /// Connects on first use, so a worker may start before its node: subscriptions
    /// then keep retrying until it appears. Must be called within a Tokio runtime.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let (endpoint, settings) = self.prepare()?;
        let channel = match &settings.address {
            Address::Tcp(_) => endpoint.connect_lazy(),
            Address::Unix(path) => endpoint.connect_with_connector_lazy(unix_connector(path)),
        };
        Ok(Client::from_parts(channel, settings))
    }

    fn prepare(self) -> Result<(Endpoint, Settings), Error> {
        let ClientBuilder {
            address,
            app,
            token,
            timeout,
            connect_timeout,
        } = self;
        let address = Address::parse(&address)?;
        let app = app
            .map(|app| {
                app.parse::<AsciiMetadataValue>()
                    .map_err(|_| Error::Config(format!("invalid app id {app:?}")))
            })
            .transpose()?;
        let authorization = token
            .map(|token| {
                format!("Bearer {token}")
                    .parse::<AsciiMetadataValue>()
                    .map_err(|_| Error::Config("invalid token: not a valid header value".into()))
            })
            .transpose()?;
        let endpoint = match &address {
            Address::Tcp(uri) => endpoint_for(uri)?,
            // The URI only fills the `:authority` header; the connector ignores it.
            Address::Unix(_) => Endpoint::from_static("http://localhost"),
        }
        .connect_timeout(connect_timeout)
        // Pings notice a node that vanished without closing the connection (a
        // partition, a killed VM), which matters for long-lived subscriptions.
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
        let settings = Settings {
            address,
            app,
            authorization,
            timeout,
        };
        Ok((endpoint, settings))
    }
}

fn endpoint_for(uri: &http::Uri) -> Result<Endpoint, Error> {
    let endpoint = Endpoint::from(uri.clone());
    #[cfg(feature = "tls")]
    if uri.scheme_str() == Some("https") {
        let tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        return endpoint
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("TLS setup for {uri}: {e}")));
    }
    Ok(endpoint)
}

/// Dials the Unix socket at `path` for every (re)connection of the channel.
fn unix_connector(
    path: &std::path::Path,
) -> impl tower::Service<
    http::Uri,
    Response = TokioIo<UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<TokioIo<UnixStream>>> + Send,
> + Send
+ 'static {
    let path = path.to_path_buf();
    tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) }
    })
}

/// The innermost cause, which names what failed ("Connection refused").
fn deepest(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        last = cause.to_string();
        next = cause.source();
    }
    last
}

impl Client {
    /// Connects to `addr` with default options; see [`ClientBuilder`] for the others.
    pub async fn connect(addr: impl Into<String>) -> Result<Client, Error> {
        Client::builder(addr).connect().await
    }

    /// Starts configuring a client for `addr`: `http://host:port`, `https://host:port`,
    /// `host:port`, a socket path or `unix:PATH` (see [`Address`]).
    pub fn builder(addr: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            address: addr.into(),
            app: None,
            token: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
        }
    }

    fn from_parts(channel: Channel, settings: Settings) -> Client {
        Client {
            rpc: IpcClient::new(channel),
            settings: Arc::new(settings),
        }
    }

    /// The address this client connects to.
    pub fn address(&self) -> &Address {
        &self.settings.address
    }

    /// Publishes `op` with `data` on `channel` (a leading `:` adds the app id). Add
    /// headers with [`Broadcast::header`], then `.await` it.
    pub fn broadcast(
        &self,
        channel: impl Into<String>,
        op: impl Into<String>,
        data: serde_json::Value,
    ) -> Broadcast<'_> {
        Broadcast {
            client: self,
            retry: true,
            request: pb::BroadcastRequest {
                channel: channel.into(),
                op: op.into(),
                data: payload(&data),
                headers: Default::default(),
                ..Default::default()
            },
        }
    }

    /// Asks one subscriber of `target` (a subscriber id or a role channel such as
    /// `:worker`; empty for the node's built-ins `ping` and `members`) and waits up to
    /// `timeout` (default: the client's) for its reply.
    ///
    /// A reply that carries `error` is returned as [`Error::ReplyError`].
    pub fn send_msg(
        &self,
        target: impl Into<String>,
        op: impl Into<String>,
        data: serde_json::Value,
        timeout: Option<Duration>,
    ) -> SendMsg<'_> {
        SendMsg {
            client: self,
            timeout: timeout.unwrap_or(self.settings.timeout),
            request: pb::SendMsgRequest {
                target: target.into(),
                op: op.into(),
                data: payload(&data),
                headers: Default::default(),
                timeout_ms: 0,
            },
        }
    }

    /// Answers the request whose `reply_to` is given; set [`Reply::error`] to report a
    /// failure instead.
    pub fn reply(
        &self,
        reply_to: impl Into<String>,
        op: impl Into<String>,
        data: serde_json::Value,
    ) -> Reply<'_> {
        Reply {
            client: self,
            request: pb::ReplyRequest {
                reply_to: reply_to.into(),
                op: op.into(),
                data: payload(&data),
                headers: Default::default(),
                error: String::new(),
            },
        }
    }

    /// Lists the subscribers connected anywhere in the fleet that match `filter`.
    pub async fn members(&self, filter: MembersFilter) -> Result<Vec<Member>, Error> {
        let MembersFilter {
            app,
            role,
            labels,
            channel,
        } = filter;
        let request = pb::MembersRequest {
            app,
            role,
            labels: labels.into_iter().collect(),
            channel,
        };
        let mut rpc = self.rpc.clone();
        let timeout = self.settings.timeout;
        let response = self
            .unary(timeout, "", rpc.members(self.request(request, timeout)))
            .await?;
        Ok(response.members.into_iter().map(Member::from).collect())
    }

    /// Subscribes, and keeps the subscription alive: the stream reconnects by itself
    /// and resumes where it stopped; see [`Subscription`].
    pub fn subscribe(&self, options: SubscribeOptions) -> Subscription {
        Subscription::new(self.clone(), options)
    }

    /// Opens a Publish stream over `requests`, without a deadline.
    pub(crate) async fn open_publish(
        &self,
        requests: impl futures::Stream<Item = pb::BroadcastRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<pb::BroadcastResponse>, Error> {
        let mut rpc = self.rpc.clone();
        let mut request = tonic::Request::new(requests);
        self.add_metadata(request.metadata_mut());
        rpc.publish(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::from_status(status, ""))
    }

    /// Opens one Subscribe stream, without any reconnection.
    pub(crate) async fn open_subscription(
        &self,
        request: pb::SubscribeRequest,
    ) -> Result<tonic::Streaming<pb::Msg>, Error> {
        let mut rpc = self.rpc.clone();
        let mut request = tonic::Request::new(request);
        self.add_metadata(request.metadata_mut());
        rpc.subscribe(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::from_status(status, ""))
    }

    /// Opens a Serve stream for `request`: the messages of the subscription, and
    /// the sender its replies go on.
    pub(crate) async fn open_serve(
        &self,
        request: pb::SubscribeRequest,
    ) -> Result<
        (
            tonic::Streaming<pb::Msg>,
            tokio::sync::mpsc::Sender<pb::ServeRequest>,
        ),
        Error,
    > {
        let (replies, mut outgoing) = tokio::sync::mpsc::channel(SERVE_QUEUE);
        replies
            .try_send(pb::ServeRequest {
                kind: Some(pb::serve_request::Kind::Subscribe(request)),
            })
            .expect("a new channel has room for its first message");
        let outgoing = futures::stream::poll_fn(move |cx| outgoing.poll_recv(cx));
        let mut rpc = self.rpc.clone();
        let mut request = tonic::Request::new(outgoing);
        self.add_metadata(request.metadata_mut());
        let stream = rpc
            .serve(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::from_status(status, ""))?;
        Ok((stream, replies))
    }

    pub(crate) fn request<T>(&self, message: T, timeout: Duration) -> tonic::Request<T> {
        let mut request = self.request_without_deadline(message);
        request.set_timeout(timeout);
        request
    }

    /// A request with the client's metadata and no deadline (long-lived streams).
    pub(crate) fn request_without_deadline<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        self.add_metadata(request.metadata_mut());
        request
    }

    fn add_metadata(&self, metadata: &mut MetadataMap) {
        if let Some(app) = &self.settings.app {
            metadata.insert(APP_METADATA, app.clone());
        }
        if let Some(authorization) = &self.settings.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        crate::trace_context::inject(metadata);
    }

    /// Runs a unary call with a local guard on its deadline, classifying failures.
    pub(crate) async fn unary<T>(
        &self,
        timeout: Duration,
        target: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(timeout + DEADLINE_GRACE, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(Error::from_status(status, target)),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "no answer from {} within {timeout:?}",
                self.settings.address
            ))),
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.settings.address)
            .field("app", &self.settings.app)
            .field("timeout", &self.settings.timeout)
            .finish_non_exhaustive()
    }
}

/// `null` is sent as an absent payload, which subscribers read back as `null`.
pub(crate) fn payload(data: &serde_json::Value) -> Option<ipc_proto::prost_types::Value> {
    (!data.is_null()).then(|| json::to_value(data))
}

/// Which members to list; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembersFilter {
    /// Only this app; empty: every app.
    pub app: String,
    /// Only this role; empty: every role.
    pub role: String,
    /// Only members carrying all these labels.
    pub labels: BTreeMap<String, String>,
    /// Only members a broadcast on this channel would reach (`:` adds the app);
    /// empty: no such filter. Nothing is sent.
    pub channel: String,
}

impl MembersFilter {
    /// Every member of every app.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only members of `app`.
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    /// Only members of `role`.
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.role = role.into();
        self
    }

    /// Only members labelled `key=value`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Only members a broadcast on `channel` would reach: role and tag subscribers,
    /// the subscriber with that id, watchers whose patterns match. A dry run of a
    /// broadcast: nothing is sent.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channel = channel.into();
        self
    }
}

/// A pending [`Client::broadcast`]; `.await` it.
///
/// A broadcast that fails with UNAVAILABLE (node unreachable, Redis down, a
/// replica shutting down) is retried, within the client's timeout, up to
/// [`BROADCAST_ATTEMPTS`] times in all. So that a retry never delivers twice, it
/// carries an idempotency key from the first attempt (a random one unless
/// [`Broadcast::key`] gave one): the node stores a repeat of the key only once.
#[must_use = "a broadcast is sent only when awaited"]
pub struct Broadcast<'a> {
    client: &'a Client,
    request: pb::BroadcastRequest,
    retry: bool,
}

/// Attempts of a [`Client::broadcast`] that keeps failing with UNAVAILABLE.
pub const BROADCAST_ATTEMPTS: u32 = 3;

impl Broadcast<'_> {
    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.insert(key.into(), value.into());
        self
    }

    /// The idempotency key: a broadcast with a key the node saw within its window
    /// (10 minutes by default) is not stored again, and answers the first one's id
    /// and cursor with `duplicate` set — also from another replica.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.request.key = key.into();
        self
    }

    /// One attempt only, and no automatic key.
    pub fn no_retry(mut self) -> Self {
        self.retry = false;
        self
    }
}

impl<'a> IntoFuture for Broadcast<'a> {
    type Output = Result<Broadcasted, Error>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let Broadcast {
                client,
                mut request,
                retry,
            } = self;
            if retry && request.key.is_empty() {
                request.key = format!("auto-{:016x}", rand::random::<u64>());
            }
            let timeout = client.settings.timeout;
            let started = tokio::time::Instant::now();
            let mut attempt = 1;
            loop {
                let left = timeout.saturating_sub(started.elapsed());
                let mut rpc = client.rpc.clone();
                let result = client
                    .unary(
                        left,
                        "",
                        rpc.broadcast(client.request(request.clone(), left)),
                    )
                    .await;
                let pause = Duration::from_millis(100 << attempt);
                match result {
                    Err(Error::Unreachable(why))
                        if retry
                            && attempt < BROADCAST_ATTEMPTS
                            && started.elapsed() + pause < timeout =>
                    {
                        tracing::debug!(%why, attempt, "broadcast unavailable; retrying with its key");
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                    }
                    result => return result.map(Broadcasted::from),
                }
            }
        })
    }
}

/// A pending [`Client::send_msg`]; `.await` it for the reply.
#[must_use = "a request is sent only when awaited"]
pub struct SendMsg<'a> {
    client: &'a Client,
    timeout: Duration,
    request: pb::SendMsgRequest,
}

impl SendMsg<'_> {
    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.insert(key.into(), value.into());
        self
    }
}

impl<'a> IntoFuture for SendMsg<'a> {
    type Output = Result<Msg, Error>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let SendMsg {
                client,
                timeout,
                mut request,
            } = self;
            // 0 would mean "the node's default": the smallest wait we can ask for is 1 ms.
            request.timeout_ms = u32::try_from(timeout.as_millis())
                .unwrap_or(u32::MAX)
                .max(1);
            let target = request.target.clone();
            // The gRPC deadline gets a little slack over `timeout_ms`, so that the node
            // (which knows whether anyone is there) reports the timeout, not the transport.
            let deadline = timeout + Duration::from_millis(500);
            let mut rpc = client.rpc.clone();
            let response = client
                .unary(
                    deadline,
                    &target,
                    rpc.send_msg(client.request(request, deadline)),
                )
                .await?;
            let Some(reply) = response.reply else {
                return Err(Error::Other(tonic::Status::internal(
                    "the node answered SendMsg without a reply",
                )));
            };
            let reply = Msg::from(reply);
            if reply.error.is_empty() {
                Ok(reply)
            } else {
                Err(Error::ReplyError(Box::new(reply)))
            }
        })
    }
}

/// A pending [`Client::reply`]; `.await` it.
#[must_use = "a reply is sent only when awaited"]
pub struct Reply<'a> {
    client: &'a Client,
    request: pb::ReplyRequest,
}

impl Reply<'_> {
    /// Reports a failure to the requester (which gets [`Error::ReplyError`]).
    pub fn error(mut self, error: impl Into<String>) -> Self {
        self.request.error = error.into();
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.insert(key.into(), value.into());
        self
    }
}

impl<'a> IntoFuture for Reply<'a> {
    type Output = Result<(), Error>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let Reply { client, request } = self;
            let timeout = client.settings.timeout;
            let mut rpc = client.rpc.clone();
            client
                .unary(timeout, "", rpc.reply(client.request(request, timeout)))
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_app_or_token_is_a_config_error() {
        let err = Client::builder("http://127.0.0.1:1")
            .app("shop\n")
            .connect_lazy()
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("app id")),
            "{err}"
        );
        let err = Client::builder("http://127.0.0.1:1")
            .token("tok\n")
            .connect_lazy()
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("token")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn metadata_carries_app_and_bearer_token() {
        let client = Client::builder("/tmp/none.sock")
            .app("shop")
            .token("s3cret")
            .connect_lazy()
            .unwrap();
        let request = client.request((), Duration::from_secs(1));
        assert_eq!(request.metadata().get("ipc-app").unwrap(), "shop");
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(client.address().to_string(), "unix:/tmp/none.sock");
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let err = Client::connect(path.display().to_string())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unreachable(m) if m.contains("absent.sock")),
            "{err}"
        );
    }
}
