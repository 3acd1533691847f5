//! What a call must pass before the `ipc.v1.Ipc` service sees it: a tower layer
//! in front of the gRPC router.
//!
//! - **Credentials from the headers, before any body is read.** A call to
//!   `ipc.v1.Ipc` that its [`Identify`] refuses is answered at once with a
//!   trailers-only UNAUTHENTICATED response; its body is never polled, so a caller
//!   without credentials cannot make the node buffer a byte of it. (Health and
//!   reflection stay open, as documented.) The caller identified here travels
//!   with the request ([`AdmittedCaller`]): the service does not identify it again.
//! - **A deadline on the request body.** Calls with one request message have
//!   `body_timeout` to send all of it, and the node buffers at most
//!   `max_buffered_bytes` of such bodies at once across all calls; over either,
//!   the call ends (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) naming the flag.
//!   Client-streaming calls (Publish, Serve, SendMsgs) pass their body through: tonic
//!   decodes it one bounded message at a time.
//! - **Calls in progress** are reported to [`Connections`], so a connection with
//!   a call open is never closed as idle.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::metadata::MetadataMap;
use tower::{Layer, Service};

use crate::auth::Caller;
use crate::connections::{CallGuard, Connections};
use crate::grpc::identify::{Identify, Peer};
use crate::metrics::{Metrics, Refusal};

const IPC_PREFIX: &str = "/ipc.v1.Ipc/";
/// Methods whose request is a stream of messages.
const CLIENT_STREAMING: [&str; 3] = [
    "/ipc.v1.Ipc/Publish",
    "/ipc.v1.Ipc/Serve",
    "/ipc.v1.Ipc/SendMsgs",
];

/// The layer's settings.
#[derive(Clone)]
pub struct Admission {
    pub identity: Arc<dyn Identify>,
    pub metrics: Arc<Metrics>,
    pub connections: Option<Arc<Connections>>,
    /// Time a single-message request has to arrive whole.
    pub body_timeout: Duration,
    /// Largest request body (a gRPC frame: 5 bytes and the message).
    pub max_body_bytes: usize,
    /// Most bytes of request bodies buffered at once on the node.
    pub max_buffered_bytes: usize,
    buffered: Arc<AtomicUsize>,
}

impl Admission {
    pub fn new(
        identity: Arc<dyn Identify>,
        metrics: Arc<Metrics>,
        connections: Option<Arc<Connections>>,
        body_timeout: Duration,
        max_body_bytes: usize,
        max_buffered_bytes: usize,
    ) -> Self {
        Self {
            identity,
            metrics,
            connections,
            body_timeout,
            max_body_bytes,
            max_buffered_bytes,
            buffered: Arc::default(),
        }
    }

    /// Bytes of request bodies buffered now.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for Admission {
    type Service = Admitted<S>;

    fn layer(&self, inner: S) -> Admitted<S> {
        Admitted {
            inner,
            admission: Arc::new(self.clone()),
        }
    }
}

/// The service behind an [`Admission`] layer.
#[derive(Clone)]
pub struct Admitted<S> {
    inner: S,
    admission: Arc<Admission>,
}

type Request = http::Request<Body>;
type Response = http::Response<Body>;

impl<S> Service<Request> for Admitted<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let admission = self.admission.clone();
        let peer = Peer::of(request.extensions());
        let call = admission
            .connections
            .as_ref()
            .and_then(|c| c.call_started(peer.addr));
        // The clone that is ready is the one to call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if !path.starts_with(IPC_PREFIX) {
            return Box::pin(async move { Ok(guarded(inner.call(request).await?, call)) });
        }
        let streaming = CLIENT_STREAMING.contains(&path);
        // The headers are lent to the identity as metadata and put back: no copy.
        let metadata = MetadataMap::from_headers(std::mem::take(request.headers_mut()));
        let identified = admission.identity.identify(&metadata, &peer);
        *request.headers_mut() = metadata.into_headers();
        match identified {
            Ok(caller) => {
                if let Some(process) = &peer.process {
                    tracing::debug!(pid = ?process.pid, uid = process.uid, gid = process.gid, "local request");
                }
                request.extensions_mut().insert(AdmittedCaller(caller));
            }
            Err(status) => {
                if status.code() == tonic::Code::Unauthenticated {
                    admission.metrics.refuse(Refusal::Unauthenticated);
                }
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        if streaming {
            return Box::pin(async move { Ok(guarded(inner.call(request).await?, call)) });
        }
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let mut reservation = Reservation {
                admission: &admission,
                bytes: 0,
            };
            let body = match reservation.collect(body).await {
                Ok(bytes) => bytes,
                Err(status) => return Ok(status.into_http()),
            };
            let response = inner
                .call(http::Request::from_parts(
                    parts,
                    Body::new(http_body_util::Full::new(body)),
                ))
                .await?;
            // The message is decoded once the response starts: its bytes are free.
            drop(reservation);
            Ok(guarded(response, call))
        })
    }
}

/// The caller the layer identified, in the request's extensions: the service takes
/// it rather than identifying the call a second time.
#[derive(Clone)]
pub struct AdmittedCaller(pub Caller);

/// Bytes of one body counted in the node's buffered total until dropped.
struct Reservation<'a> {
    admission: &'a Admission,
    bytes: usize,
}

impl Reservation<'_> {
    fn reserve(&mut self, more: usize) -> Result<(), Status> {
        let admission = self.admission;
        if self.bytes + more > admission.max_body_bytes {
            admission.metrics.refuse(Refusal::MsgBytes);
            return Err(Status::resource_exhausted(format!(
                "request too large: over {} bytes; see --max-msg-bytes",
                admission.max_body_bytes
            )));
        }
        let before = admission.buffered.fetch_add(more, Ordering::AcqRel);
        self.bytes += more;
        if before + more > admission.max_buffered_bytes {
            admission.metrics.refuse(Refusal::RequestBuffer);
            return Err(Status::resource_exhausted(format!(
                "the node is receiving {} bytes of requests, its limit (--max-request-buffer-bytes); retry shortly",
                admission.max_buffered_bytes
            )));
        }
        Ok(())
    }

    /// The whole body, within the body timeout and the size limits.
    async fn collect(&mut self, mut body: Body) -> Result<Bytes, Status> {
        let timeout = self.admission.body_timeout;
        let mut data = BytesMut::new();
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| Status::cancelled(format!("request body: {e}")))?;
                if let Ok(chunk) = frame.into_data() {
                    self.reserve(chunk.len())?;
                    data.extend_from_slice(&chunk);
                }
            }
            Ok::<(), Status>(())
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(result) => result?,
            Err(_) => {
                self.admission.metrics.refuse(Refusal::BodyTimeout);
                return Err(Status::deadline_exceeded(format!(
                    "the request body did not arrive whole within {} ms (--body-timeout-ms)",
                    timeout.as_millis()
                )));
            }
        }
        Ok(data.freeze())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.admission
            .buffered
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The response, its body holding the call's place on its connection until the
/// body ends or is dropped (a Subscribe stream's lifetime).
fn guarded(response: Response, call: Option<CallGuard>) -> Response {
    match call {
        None => response,
        Some(call) => response.map(|body| Body::new(GuardedBody { body, _call: call })),
    }
}

struct GuardedBody {
    body: Body,
    _call: CallGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
