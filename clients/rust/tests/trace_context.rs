//! The client sends the trace context it is called in (W3C `traceparent`) to a real
//! `ipc-server`: from the current OpenTelemetry context, or from the current
//! `tracing` span recorded by tracing-opentelemetry; the subscriber sees it on the
//! message, and a call made outside any trace carries none.

mod common;

use common::server;
use ipc_client::{Client, Msg, OP_SUBSCRIBED, SubscribeOptions};
use ipc_testkit::next;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use serde_json::json;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

async fn worker(
    client: &Client,
) -> impl futures::Stream<Item = Result<Msg, ipc_client::Error>> + Unpin {
    let mut stream = client.subscribe(SubscribeOptions::new().role("worker"));
    assert_eq!(next(&mut stream).await.op, OP_SUBSCRIBED);
    stream
}

fn trace_id(msg: &Msg) -> Option<&str> {
    msg.headers.get("traceparent")?.split('-').nth(1)
}

#[tokio::test]
async fn a_broadcast_carries_the_opentelemetry_context_it_is_made_in() {
    let server = server();
    let client = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .unwrap();
    let mut stream = worker(&client).await;

    let caller = SpanContext::new(
        TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
        SpanId::from(0x00f0_67aa_0ba9_02b7),
        TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    );
    let context = opentelemetry::Context::new().with_remote_span_context(caller);
    client
        .broadcast(":worker", "worker:restart", json!({}))
        .into_future()
        .with_context(context)
        .await
        .unwrap();
    let msg = next(&mut stream).await;
    assert_eq!(
        trace_id(&msg),
        Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        "{msg:?}"
    );

    // Outside any trace: nothing is made up.
    client
        .broadcast(":worker", "worker:restart", json!({}))
        .await
        .unwrap();
    let msg = next(&mut stream).await;
    assert!(!msg.headers.contains_key("traceparent"), "{msg:?}");
}

#[tokio::test]
async fn a_broadcast_carries_the_trace_of_the_current_tracing_span() {
    let server = server();
    let client = Client::builder(server.url())
        .app("shop")
        .connect()
        .await
        .unwrap();
    let mut stream = worker(&client).await;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _default = tracing::subscriber::set_default(subscriber);
    let span = tracing::info_span!("restart the workers");
    let expected = format!("{:032x}", span.context().span().span_context().trace_id());
    client
        .broadcast(":worker", "worker:restart", json!({}))
        .into_future()
        .instrument(span)
        .await
        .unwrap();
    let msg = next(&mut stream).await;
    assert_eq!(trace_id(&msg), Some(expected.as_str()), "{msg:?}");
}
