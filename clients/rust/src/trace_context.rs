//! The caller's trace context on every call: W3C `traceparent` (and `tracestate`)
//! metadata taken from the current `tracing` span when tracing-opentelemetry
//! records it, else from the current OpenTelemetry context. The fleet's spans then
//! join the caller's trace, and the requests and broadcasts it causes carry it to
//! their subscribers (feature `opentelemetry`, on by default; the application must
//! use the same `opentelemetry` version, 0.33).

use tonic::metadata::MetadataMap;

/// Adds the current trace context to a call's metadata; nothing without one.
#[cfg(feature = "opentelemetry")]
pub(crate) fn inject(metadata: &mut MetadataMap) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let mut context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        context = opentelemetry::Context::current();
    }
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return;
    }
    let traceparent = format!(
        "00-{:032x}-{:016x}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    );
    if let Ok(value) = traceparent.parse() {
        metadata.insert("traceparent", value);
    }
    let state = span_context.trace_state().header();
    if let Ok(value) = state.parse()
        && !state.is_empty()
    {
        metadata.insert("tracestate", value);
    }
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn inject(_metadata: &mut MetadataMap) {}
