//! The `ipc.v1.Ipc` gRPC service as the server and the sidecar mount it: the
//! generated [`ipc_server::IpcServer`] for every method but Subscribe and Serve,
//! whose streams send each message encoded once for all its subscribers.
//!
//! The generated Subscribe handler needs an owned `Msg` per stream item, so every
//! delivery would deep-copy the shared `Arc<Msg>` (strings, headers, data) and
//! encode it again — per subscriber. At 100 subscribers that copying and encoding
//! was a fifth of the node's CPU. This route takes the node's `Arc<Msg>` as is and
//! writes bytes encoded once per message, found in a small cache keyed by the
//! message's allocation. The wire format, status codes and message limits are
//! those of the generated handler.

use std::sync::{Arc, Weak};
use std::time::Instant;

use futures::Stream;
use ipc_proto::pb::ipc_server;
use ipc_proto::pb::{BroadcastRequest, Msg, ServeRequest, SubscribeRequest};
use parking_lot::Mutex;
use prost::Message as _;
use prost::bytes::BufMut;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::{Request, Response, Status};

use super::publish::Ack;
use super::service::{AckStream, IpcService};
use crate::metrics::rpc::Method;
use crate::outbound::Outbound;

const SUBSCRIBE_PATH: &str = "/ipc.v1.Ipc/Subscribe";
const SERVE_PATH: &str = "/ipc.v1.Ipc/Serve";
const PUBLISH_PATH: &str = "/ipc.v1.Ipc/Publish";
/// The write buffer a Subscribe stream starts with: none. tonic allocates it when
/// the stream opens and keeps it for the stream's life, so an idle subscriber paid
/// for it (8 KiB by default; 1 KiB here before, still a fifth of an idle stream's
/// memory by heaptrack). Empty, the first message allocates what it needs and later
/// ones reuse that allocation once sent; a burst grows it.
const STREAM_BUFFER_BYTES: usize = 0;
/// Messages ready at once are sent together up to this many bytes (tonic's default).
const STREAM_YIELD_BYTES: usize = 32 << 10;

/// `ipc.v1.Ipc` for `tonic::transport::Server::add_service`, a drop-in for the
/// generated `IpcServer<IpcService>`.
#[derive(Clone)]
pub struct IpcServer {
    generated: ipc_server::IpcServer<IpcService>,
    service: Arc<IpcService>,
    max_decoding_message_size: Option<usize>,
    max_encoding_message_size: Option<usize>,
    encoded: Arc<EncodedCache>,
}

impl IpcServer {
    pub fn new(service: IpcService) -> Self {
        let service = Arc::new(service);
        Self {
            generated: ipc_server::IpcServer::from_arc(service.clone()),
            service,
            max_decoding_message_size: None,
            max_encoding_message_size: None,
            encoded: Arc::new(EncodedCache::new()),
        }
    }

    /// Limits the size of a decoded request (default 4 MiB).
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.generated = self.generated.max_decoding_message_size(limit);
        self.max_decoding_message_size = Some(limit);
        self
    }

    /// Limits the size of an encoded response (default unlimited).
    #[must_use]
    pub fn max_encoding_message_size(mut self, limit: usize) -> Self {
        self.generated = self.generated.max_encoding_message_size(limit);
        self.max_encoding_message_size = Some(limit);
        self
    }
}

impl tonic::server::NamedService for IpcServer {
    const NAME: &'static str = ipc_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for IpcServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = Method::of_path(req.uri().path());
        let metrics = self.service.node().metrics().clone();
        let path = req.uri().path();
        let call: Self::Future =
            if path != SUBSCRIBE_PATH && path != SERVE_PATH && path != PUBLISH_PATH {
                self.generated.call(req)
            } else {
                let limits = (
                    self.max_decoding_message_size,
                    self.max_encoding_message_size,
                );
                let service = self.service.clone();
                let encoded = self.encoded.clone();
                if path == PUBLISH_PATH {
                    Box::pin(async move {
                        let mut grpc = tonic::server::Grpc::new(AckCodec)
                            .apply_max_message_size_config(limits.0, limits.1);
                        Ok(grpc.streaming(PublishMethod(service), req).await)
                    })
                } else if path == SERVE_PATH {
                    Box::pin(async move {
                        let mut grpc =
                            tonic::server::Grpc::new(SharedCodec::<ServeRequest>::new(encoded))
                                .apply_max_message_size_config(limits.0, limits.1);
                        Ok(grpc.streaming(ServeMethod(service), req).await)
                    })
                } else {
                    Box::pin(async move {
                        let mut grpc =
                            tonic::server::Grpc::new(SharedCodec::<SubscribeRequest>::new(encoded))
                                .apply_max_message_size_config(limits.0, limits.1);
                        Ok(grpc.server_streaming(SubscribeMethod(service), req).await)
                    })
                }
            };
        Box::pin(async move {
            let response = call.await?;
            // An error is in the headers (trailers-only response); a unary success
            // or an opened stream has no status yet: OK.
            let code = response
                .headers()
                .get("grpc-status")
                .map_or(tonic::Code::Ok, |v| tonic::Code::from_bytes(v.as_bytes()));
            metrics.rpc.record(method, code, started.elapsed());
            Ok(response)
        })
    }
}

type SharedStream = std::pin::Pin<Box<dyn Stream<Item = Result<Outbound, Status>> + Send>>;

struct SubscribeMethod(Arc<IpcService>);

impl tonic::server::ServerStreamingService<SubscribeRequest> for SubscribeMethod {
    type Response = Outbound;
    type ResponseStream = SharedStream;
    type Future = BoxFuture<Response<SharedStream>, Status>;

    fn call(&mut self, request: Request<SubscribeRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            let stream = service.subscribe_shared(request).await?;
            Ok(Response::new(stream))
        })
    }
}

struct ServeMethod(Arc<IpcService>);

impl tonic::server::StreamingService<ServeRequest> for ServeMethod {
    type Response = Outbound;
    type ResponseStream = SharedStream;
    type Future = BoxFuture<Response<SharedStream>, Status>;

    fn call(&mut self, request: Request<tonic::Streaming<ServeRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            let stream = service.serve_shared(request).await?;
            Ok(Response::new(stream))
        })
    }
}

struct PublishMethod(Arc<IpcService>);

impl tonic::server::StreamingService<BroadcastRequest> for PublishMethod {
    type Response = Ack;
    type ResponseStream = AckStream;
    type Future = BoxFuture<Response<AckStream>, Status>;

    fn call(&mut self, request: Request<tonic::Streaming<BroadcastRequest>>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { Ok(Response::new(service.publish_acks(request).await?)) })
    }
}

/// Publish's codec: requests decoded as the generated codec does, answers written
/// from the stored messages ([`Ack::encode`]).
struct AckCodec;

struct AckEncoder;

impl Codec for AckCodec {
    type Encode = Ack;
    type Decode = BroadcastRequest;
    type Encoder = AckEncoder;
    type Decoder = PublishDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        AckEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        PublishDecoder
    }
}

/// Decodes a Publish stream's requests, the plain ones without prost
/// ([`super::decode`]), to the same requests and errors as the generated codec.
struct PublishDecoder;

impl Decoder for PublishDecoder {
    type Item = BroadcastRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<BroadcastRequest>, Status> {
        use prost::bytes::Buf as _;
        let len = src.remaining();
        let decoded = if src.chunk().len() == len {
            let decoded = super::decode::broadcast_request(&src.chunk()[..len]);
            src.advance(len);
            decoded
        } else {
            BroadcastRequest::decode(src)
        };
        decoded
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl Encoder for AckEncoder {
    type Item = Ack;
    type Error = Status;

    fn encode(&mut self, item: Ack, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }
}

/// Decodes the request type `D` as the generated codec does; encodes a shared
/// `Arc<Msg>` through the [`EncodedCache`], a member's request from its parts.
struct SharedCodec<D> {
    encoded: Arc<EncodedCache>,
    request: std::marker::PhantomData<fn() -> D>,
}

impl<D> SharedCodec<D> {
    fn new(encoded: Arc<EncodedCache>) -> Self {
        Self {
            encoded,
            request: std::marker::PhantomData,
        }
    }
}

struct SharedMsgEncoder(Arc<EncodedCache>);

struct RequestDecoder<D>(std::marker::PhantomData<fn() -> D>);

impl<D: prost::Message + Default + Send + 'static> Codec for SharedCodec<D> {
    type Encode = Outbound;
    type Decode = D;
    type Encoder = SharedMsgEncoder;
    type Decoder = RequestDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        SharedMsgEncoder(self.encoded.clone())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(std::marker::PhantomData)
    }
}

impl Encoder for SharedMsgEncoder {
    type Item = Outbound;
    type Error = Status;

    fn encode(&mut self, item: Outbound, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Outbound::Msg(msg) => self.0.write(&msg, dst),
            Outbound::Sole(msg) => msg.encode_raw(dst),
            Outbound::MemberRequest(request) => request.encode(dst),
        }
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(STREAM_BUFFER_BYTES, STREAM_YIELD_BYTES)
    }
}

impl<D: prost::Message + Default + Send + 'static> Decoder for RequestDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        use prost::bytes::Buf as _;
        // Decoded from the message's bytes as one slice (tonic gathers a message
        // into one buffer): prost reads a slice several times faster than
        // through the buffer's `Buf`, whose every advance is a call.
        let len = src.remaining();
        let decoded = if src.chunk().len() == len {
            let decoded = D::decode(&src.chunk()[..len]);
            src.advance(len);
            decoded
        } else {
            D::decode(src)
        };
        // As tonic-prost: a request that does not parse is INTERNAL.
        decoded
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// Slots of the cache. Subscribers of one message may be far apart (each has a
/// queue of up to `--subscriber-queue` messages): with too few slots a message's
/// encoding is evicted before its last subscriber is sent it (measured: 256 slots
/// encoded each message 17 times at 100 lagging subscribers). At most
/// `CACHE_SLOTS × CACHE_MAX_BYTES` (4 MiB) stay cached.
const CACHE_SLOTS: usize = 2048;
/// Larger messages are encoded per stream rather than pinned in the cache.
const CACHE_MAX_BYTES: usize = 2 << 10;

/// Encodings of recently sent messages, keyed by the address of their `Arc`
/// allocation (direct-mapped, one small lock per slot). A hit is copied out under
/// the slot's lock: cheaper than sharing a reference-counted buffer whose count
/// every stream of every core would bounce.
///
/// A slot holds a `Weak` to the message it encodes, which keeps that allocation
/// from being freed and reused: a live `Arc<Msg>` at the same address is therefore
/// the same message, and a message behind a `Weak` cannot be mutated
/// (`Arc::get_mut` refuses while weak references exist), so the bytes stay right.
pub(crate) struct EncodedCache {
    slots: Box<[Mutex<Option<Encoded>>]>,
}

/// A message (by its allocation) and its encoding.
type Encoded = (Weak<Msg>, Vec<u8>);

impl EncodedCache {
    fn new() -> Self {
        Self {
            slots: (0..CACHE_SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Writes the encoding of `msg` to `dst`, encoding it only if it is not cached.
    fn write(&self, msg: &Arc<Msg>, dst: &mut impl BufMut) {
        // A request (it has a `reply_to` of its own) goes to one stream only:
        // caching it would cost a copy and evict a broadcast's encoding.
        if !msg.reply_to.is_empty() {
            msg.encode_raw(dst);
            return;
        }
        let address = Arc::as_ptr(msg) as usize;
        // Fibonacci hashing of the address (allocations are 16-byte aligned).
        let index = ((address >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % CACHE_SLOTS;
        let slot = &self.slots[index];
        if let Some((cached, bytes)) = &*slot.lock()
            && std::ptr::eq(cached.as_ptr(), Arc::as_ptr(msg))
        {
            dst.put_slice(bytes);
            return;
        }
        if msg.encoded_len() > CACHE_MAX_BYTES {
            msg.encode_raw(dst);
            return;
        }
        let bytes = msg.encode_to_vec();
        dst.put_slice(&bytes);
        *slot.lock() = Some((Arc::downgrade(msg), bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(op: &str) -> Arc<Msg> {
        Arc::new(Msg {
            op: op.into(),
            channel: "app:worker".into(),
            ..Msg::default()
        })
    }

    fn written(cache: &EncodedCache, msg: &Arc<Msg>) -> Vec<u8> {
        let mut out = Vec::new();
        cache.write(msg, &mut out);
        out
    }

    fn cached(cache: &EncodedCache, msg: &Arc<Msg>) -> bool {
        cache.slots.iter().any(|slot| {
            slot.lock()
                .as_ref()
                .is_some_and(|(weak, _)| std::ptr::eq(weak.as_ptr(), Arc::as_ptr(msg)))
        })
    }

    #[test]
    fn writes_the_message_encoding_from_the_cache_after_the_first_time() {
        let cache = EncodedCache::new();
        let a = msg("a");
        assert_eq!(written(&cache, &a), a.encode_to_vec());
        assert!(cached(&cache, &a));
        assert_eq!(written(&cache, &a), a.encode_to_vec());
    }

    #[test]
    fn a_new_message_never_gets_an_old_encoding() {
        let cache = EncodedCache::new();
        for i in 0..10_000 {
            let m = msg(&format!("op-{i}"));
            assert_eq!(written(&cache, &m), m.encode_to_vec());
            assert_eq!(written(&cache, &m), m.encode_to_vec());
        }
    }

    #[test]
    fn requests_are_written_but_not_cached() {
        let cache = EncodedCache::new();
        let request = Arc::new(Msg {
            op: "restart".into(),
            reply_to: "node-a#1.0123456789abcdef".into(),
            ..Msg::default()
        });
        assert_eq!(written(&cache, &request), request.encode_to_vec());
        assert!(!cached(&cache, &request));
    }

    #[test]
    fn large_messages_are_written_but_not_cached() {
        let cache = EncodedCache::new();
        let big = Arc::new(Msg {
            op: "x".repeat(CACHE_MAX_BYTES + 1),
            ..Msg::default()
        });
        assert_eq!(written(&cache, &big), big.encode_to_vec());
        assert!(!cached(&cache, &big));
    }
}
