//! A real OTLP/gRPC trace receiver on a free loopback port: the `TraceService` of
//! the OpenTelemetry collector protocol, built from `opentelemetry-proto`, keeping
//! every span it is sent so that a test can read the traces the binaries export
//! (`--otlp-endpoint`).
//!
//! It runs on a thread of its own, so it works in any test, and stops on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One span as the receiver got it, with its resource's service name and instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    /// `service.name` of the process that sent it (`ipc-server`, `ipc-sidecar`).
    pub service: String,
    /// `service.instance.id` (the node's name).
    pub instance: String,
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits; empty for a trace's root.
    pub parent_span_id: String,
    /// `SpanKind` as numbered by OTLP (2 server, 3 client, 4 producer, …).
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Attributes, values as text.
    pub attributes: HashMap<String, String>,
    /// The status message when the span ended in error.
    pub error: Option<String>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct Received {
    spans: Mutex<Vec<ReceivedSpan>>,
    arrived: Condvar,
    /// Spans received, kept or not.
    count: std::sync::atomic::AtomicU64,
    /// Only count them (a benchmark's sink).
    count_only: bool,
}

struct Collector(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.count_only {
            let count: usize = request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0
                .count
                .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
            return Ok(tonic::Response::new(ExportTraceServiceResponse::default()));
        }
        let mut spans = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            let instance = resource
                .get("service.instance.id")
                .cloned()
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(ReceivedSpan {
                    service: service.clone(),
                    instance: instance.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    attributes: attributes(&span.attributes),
                    // OTLP status code 2 is ERROR.
                    error: span.status.filter(|s| s.code == 2).map(|s| s.message),
                    name: span.name,
                });
            }
        }
        self.0
            .count
            .fetch_add(spans.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.0.spans.lock().unwrap().extend(spans);
        self.0.arrived.notify_all();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(text).unwrap_or_default(),
            )
        })
        .collect()
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A running OTLP trace receiver.
pub struct OtlpReceiver {
    addr: SocketAddr,
    received: Arc<Received>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Binds a free loopback port and serves the OTLP `TraceService` on it.
    pub fn start() -> Self {
        Self::serve(Received::default())
    }

    /// A receiver that only counts the spans it is sent ([`OtlpReceiver::count`]):
    /// a sink for benchmarks, whose memory stays flat.
    pub fn start_counting() -> Self {
        Self::serve(Received {
            count_only: true,
            ..Received::default()
        })
    }

    fn serve(received: Received) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind OTLP receiver");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("bound address");
        let received = Arc::new(received);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let collector = Collector(received.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("OTLP receiver runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let served = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(collector))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(error) = served {
                    eprintln!("OTLP receiver stopped: {error}");
                }
            });
        });
        Self {
            addr,
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// What to pass as `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many spans were received so far.
    pub fn count(&self) -> u64 {
        self.received
            .count
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every span received so far (none for a counting receiver).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.spans.lock().unwrap().clone()
    }

    /// Waits until the spans received satisfy `done` (checked on each export) or
    /// `timeout` passes; returns the spans either way.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        let mut spans = self.received.spans.lock().unwrap();
        while !done(&spans) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            spans = self.received.arrived.wait_timeout(spans, left).unwrap().0;
        }
        spans.clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
