//! Distributed tracing: the W3C trace context (`traceparent`, `tracestate`) carried
//! from a caller's gRPC metadata into the headers of the messages it causes, and
//! spans for every hop, exported over OTLP/gRPC when an endpoint is set.
//!
//! The headers are the carrier everywhere: a request or broadcast carries its
//! `traceparent` through the hub, Redis (log entries and the inbox between
//! replicas) and the sidecar, to the subscriber, and a reply carries it back. Each
//! hop that records a span rewrites the header to its own span, so the next hop
//! nests under it.
//!
//! Off by default: with no exporter started, [`Hop::child`] is one atomic load and
//! records nothing; [`Hop::accept`] only passes the caller's context on (a node
//! starts no trace of its own), so a caller's `traceparent` still reaches the
//! subscriber and comes back with the reply.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tonic::metadata::MetadataMap;

/// Header (and gRPC metadata) carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header (and gRPC metadata) carrying the W3C trace state, vendor data passed on as is.
pub const TRACESTATE: &str = "tracestate";
/// Longest `tracestate` passed on (the W3C limit is 32 entries of at most 256 bytes;
/// 512 is what the spec asks every hop to propagate at least).
const MAX_TRACESTATE: usize = 512;

/// Where an operation is in a trace: the trace and the span that is its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
    /// `tracestate`, passed on unchanged.
    pub state: Option<String>,
}

impl TraceContext {
    /// Reads a `traceparent` (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`)
    /// and its `tracestate`. Malformed input yields `None`: by the W3C rule the
    /// receiver then behaves as if none was sent (never an error to the caller).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let text = traceparent.trim();
        let fields: Vec<&str> = text.splitn(5, '-').collect();
        let [version, trace, span, flags, rest @ ..] = fields.as_slice() else {
            return None;
        };
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        // Version 00 has exactly four fields; later versions may append more.
        if !lower_hex(version, 2)
            || *version == "ff"
            || (*version == "00" && !rest.is_empty())
            || !lower_hex(trace, 32)
            || !lower_hex(span, 16)
            || !lower_hex(flags, 2)
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        let state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .filter(|s| s.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map(str::to_string);
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
            state,
        })
    }

    /// The context a message's headers carry, if any.
    pub fn from_headers(headers: &HashMap<String, String>) -> Option<Self> {
        if headers.is_empty() {
            return None;
        }
        let parent = headers.get(TRACEPARENT)?;
        Self::parse(parent, headers.get(TRACESTATE).map(String::as_str))
    }

    /// The context a call's gRPC metadata carries, if any.
    pub fn from_metadata(metadata: &MetadataMap) -> Option<Self> {
        let parent = metadata.get(TRACEPARENT)?.to_str().ok()?;
        let state = metadata.get(TRACESTATE).and_then(|v| v.to_str().ok());
        Self::parse(parent, state)
    }

    /// The `traceparent` text.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// The trace id as logs and trace viewers show it (32 hex digits).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// Writes `traceparent` (and `tracestate`) into message headers.
    pub fn write_headers(&self, headers: &mut HashMap<String, String>) {
        headers.insert(TRACEPARENT.into(), self.traceparent());
        match &self.state {
            Some(state) => {
                headers.insert(TRACESTATE.into(), state.clone());
            }
            None => {
                headers.remove(TRACESTATE);
            }
        }
    }

    /// Writes `traceparent` (and `tracestate`) into a call's gRPC metadata.
    pub fn write_metadata(&self, metadata: &mut MetadataMap) {
        if let Ok(value) = self.traceparent().parse() {
            metadata.insert(TRACEPARENT, value);
        }
        if let Some(Ok(value)) = self.state.as_deref().map(str::parse) {
            metadata.insert(TRACESTATE, value);
        }
    }

    fn span_context(&self) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = self
            .state
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.span_id),
            flags,
            true,
            state,
        )
    }
}

/// How long finished spans wait to be exported together (the OTel default of 5 s
/// unless `OTEL_BSP_SCHEDULE_DELAY` says otherwise): an operator looking for a
/// request's trace finds it a second later.
const EXPORT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The process's exporter, once [`start`] set it up.
struct Exporting {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
}

static EXPORTING: OnceLock<Exporting> = OnceLock::new();

/// Whether this process records and exports spans.
pub fn enabled() -> bool {
    EXPORTING.get().is_some()
}

/// Flushes the spans still queued when dropped (at the end of `serve`).
#[must_use = "dropping the guard flushes and stops the exporter"]
pub struct ExportGuard(());

impl Drop for ExportGuard {
    fn drop(&mut self) {
        if let Some(exporting) = EXPORTING.get()
            && let Err(error) = exporting.provider.shutdown()
        {
            tracing::warn!(%error, "spans not all exported at shutdown");
        }
    }
}

/// What a binary tells the trace backend about itself.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    /// `service.name`: `ipc-server` or `ipc-sidecar`.
    pub name: &'static str,
    /// `service.instance.id`: the node's name.
    pub instance: String,
    pub version: &'static str,
}

/// Starts exporting every span of this process to the OTLP/gRPC collector at
/// `endpoint` (`http://host:4317`), batched in the background. Call it inside the
/// Tokio runtime, once per process. Spans are sent every second (or
/// `OTEL_BSP_SCHEDULE_DELAY` ms); the other standard `OTEL_BSP_*` variables tune the
/// batching and `OTEL_TRACES_SAMPLER` the sampling (default: every trace a caller
/// did not mark unsampled).
pub fn start(endpoint: &str, service: ServiceInfo) -> Result<ExportGuard, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let endpoint = endpoint.trim();
    let uri = endpoint
        .parse::<http::Uri>()
        .map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "--otlp-endpoint {endpoint:?}: give the collector's OTLP/gRPC address as http://HOST:PORT (usually port 4317)"
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.name)
        .with_attributes([
            KeyValue::new("service.instance.id", service.instance),
            KeyValue::new("service.version", service.version),
        ])
        .build();
    let mut batch = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
        batch = batch.with_scheduled_delay(EXPORT_DELAY);
    }
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("fleet-ipc");
    EXPORTING
        .set(Exporting { tracer, provider })
        .map_err(|_| "tracing was already started in this process".to_string())?;
    Ok(ExportGuard(()))
}

/// One hop of an operation in this process: a span while tracing is on, and the
/// trace context the hop passes on.
///
/// One pointer wide, and nothing allocated for a hop with neither span nor
/// context (tracing off, the caller sent none): a hop lives in the futures of
/// every call, which are moved whole at each `.await` they are built for, and a
/// broadcast's futures moved ~1 KiB of empty spans and contexts before.
#[derive(Debug, Default)]
pub struct Hop(Option<Box<HopParts>>);

#[derive(Debug)]
struct HopParts {
    span: Option<opentelemetry_sdk::trace::Span>,
    context: Option<TraceContext>,
}

impl Hop {
    /// A hop that records nothing and passes nothing on.
    pub const NONE: Hop = Hop(None);

    fn new(span: Option<opentelemetry_sdk::trace::Span>, context: Option<TraceContext>) -> Self {
        if span.is_none() && context.is_none() {
            return Self::NONE;
        }
        Self(Some(Box::new(HopParts { span, context })))
    }

    fn span(&mut self) -> Option<&mut opentelemetry_sdk::trace::Span> {
        self.0.as_mut().and_then(|parts| parts.span.as_mut())
    }

    /// Where a call enters the node (`Broadcast`, `SendMsg`, …) under the caller's
    /// context. With tracing on, a span (a new trace when the caller sent none);
    /// with tracing off, the caller's context is passed on as is.
    pub fn accept(
        name: &'static str,
        parent: Option<TraceContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        match EXPORTING.get() {
            Some(exporting) => Self::record(exporting, name, SpanKind::Server, parent, attributes),
            None => Self::new(None, parent),
        }
    }

    /// A further hop of a message whose headers carry its context: a span under it
    /// while tracing is on; nothing otherwise (the headers pass on unchanged).
    pub fn child(
        name: &'static str,
        kind: SpanKind,
        headers: &HashMap<String, String>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        let Some(exporting) = EXPORTING.get() else {
            return Self::NONE;
        };
        match TraceContext::from_headers(headers) {
            Some(parent) => Self::record(exporting, name, kind, Some(parent), attributes),
            None => Self::NONE,
        }
    }

    /// A hop under another hop of this process.
    pub fn under(
        &self,
        name: &'static str,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        match (EXPORTING.get(), self.context()) {
            (Some(exporting), Some(parent)) => {
                Self::record(exporting, name, kind, Some(parent.clone()), attributes)
            }
            (_, context) => Self::new(None, context.cloned()),
        }
    }

    fn record(
        exporting: &Exporting,
        name: &'static str,
        kind: SpanKind,
        parent: Option<TraceContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        let parent_cx = match &parent {
            Some(parent) => Context::new().with_remote_span_context(parent.span_context()),
            None => Context::new(),
        };
        let span = exporting
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&exporting.tracer, &parent_cx);
        let own = span.span_context();
        let context = own.is_valid().then(|| TraceContext {
            trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(own.span_id().to_bytes()),
            sampled: own.is_sampled(),
            state: parent.and_then(|p| p.state),
        });
        Self::new(Some(span), context)
    }

    /// The context this hop passes on: its span, or the caller's when not recording.
    pub fn context(&self) -> Option<&TraceContext> {
        self.0.as_ref().and_then(|parts| parts.context.as_ref())
    }

    /// Writes this hop's context into the headers of the message it passes on.
    /// Without one, leaves them as they are.
    pub fn stamp(&self, headers: &mut HashMap<String, String>) {
        if let Some(context) = self.context() {
            context.write_headers(headers);
        }
    }

    /// Writes this hop's context into the metadata of a call it makes.
    pub fn stamp_metadata(&self, metadata: &mut MetadataMap) {
        if let Some(context) = self.context() {
            context.write_metadata(metadata);
        }
    }

    /// Adds attributes known only later (computed only while recording).
    pub fn set(&mut self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(span) = self.span() {
            span.set_attributes(attributes());
        }
    }

    /// Marks the hop failed, with why.
    pub fn fail(&mut self, why: impl FnOnce() -> String) {
        if let Some(span) = self.span() {
            span.set_status(Status::error(why()));
        }
    }

    /// Records a moment in the hop (`"retry"`, …).
    pub fn event(&mut self, name: &'static str) {
        if let Some(span) = self.span() {
            span.add_event(name, Vec::new());
        }
    }

    /// The `tracing` span that puts this hop's trace id (and `op_id`) on every log
    /// line inside it; no span when there is neither.
    pub fn log_span(&self, op_id: Option<&str>) -> tracing::Span {
        log_span(self.context(), op_id)
    }
}

/// A `tracing` span named `ipc` with `trace_id` and `op_id` (the Gather/Rollout
/// ledger id) for the log lines of an operation. `op_id` can be recorded later
/// (`Span::record`); without a trace or an op id there is no span, so untraced
/// calls pay nothing.
pub fn log_span(context: Option<&TraceContext>, op_id: Option<&str>) -> tracing::Span {
    if context.is_none() && op_id.is_none() {
        return tracing::Span::none();
    }
    operation_log_span(context, op_id)
}

/// [`log_span`] made even without a trace: for operations that will get an op id.
pub fn operation_log_span(context: Option<&TraceContext>, op_id: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "ipc",
        trace_id = tracing::field::Empty,
        op_id = tracing::field::Empty
    );
    if let Some(context) = context {
        span.record("trace_id", context.trace_id_hex().as_str());
    }
    if let Some(op_id) = op_id {
        span.record("op_id", op_id);
    }
    span
}

/// The kind of a hop's span (server, client, producer, internal).
pub use opentelemetry::trace::SpanKind as Kind;

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let context = TraceContext::parse(PARENT, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id, 0x00f0_67aa_0ba9_02b7);
        assert!(context.sampled);
        assert_eq!(context.traceparent(), PARENT);
        let mut headers = HashMap::new();
        context.write_headers(&mut headers);
        assert_eq!(TraceContext::from_headers(&headers), Some(context));
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
        // A later version may add fields; the first four are read.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what";
        assert!(!TraceContext::parse(later, None).unwrap().sampled);
    }

    #[test]
    fn oversized_or_binary_tracestate_is_dropped() {
        let long = "a=".to_string() + &"b".repeat(600);
        assert_eq!(
            TraceContext::parse(PARENT, Some(&long)).unwrap().state,
            None
        );
        assert_eq!(
            TraceContext::parse(PARENT, Some("a=\u{1}")).unwrap().state,
            None
        );
    }

    #[test]
    fn without_an_exporter_hops_pass_the_callers_context_on() {
        let parent = TraceContext::parse(PARENT, None);
        let hop = Hop::accept("SendMsg", parent.clone(), || unreachable!("not recording"));
        assert_eq!(hop.context(), parent.as_ref());
        assert!(hop.0.as_ref().is_some_and(|parts| parts.span.is_none()));
        let mut headers = HashMap::new();
        hop.stamp(&mut headers);
        assert_eq!(headers.get(TRACEPARENT).map(String::as_str), Some(PARENT));
        // A further hop records nothing and leaves the headers as they are.
        let child = Hop::child("deliver", Kind::Producer, &headers, || {
            unreachable!("not recording")
        });
        assert!(child.context().is_none());
        // No caller context: nothing is started, nothing allocated.
        assert!(Hop::accept("Broadcast", None, Vec::new).0.is_none());
    }
}
