//! Tracing across the fleet: a real redis-server, two `ipc-server` replicas and an
//! `ipc-sidecar`, each exporting spans (`--otlp-endpoint`) to a real OTLP/gRPC
//! receiver. A caller's W3C `traceparent` reaches the worker behind the sidecar as a
//! header, comes back with the reply, and every hop is a span of the caller's trace.

mod common;

use common::*;
use ipc_proto::pb::{GatherRequest, Msg, SendMsgRequest, SubscribeRequest};
use ipc_testkit::ServerProcess;
use ipc_testkit::otlp::{OtlpReceiver, ReceivedSpan};
use ipc_testkit::redis::RedisServer;
use serde_json::json;
use tonic::Streaming;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
}

fn replica(redis: &RedisServer, node: &str, otlp: &OtlpReceiver) -> ServerProcess {
    let endpoint = otlp.endpoint();
    ServerProcess::replica(
        &redis.url(),
        "traced",
        node,
        &["--otlp-endpoint", &endpoint],
    )
}

/// A worker of role `worker` behind the sidecar, subscribed through its socket.
async fn worker(sidecar: &SidecarProcess) -> (Client, Streaming<Msg>) {
    let mut client = sidecar.client().await;
    let (stream, _) = subscribe(
        &mut client,
        with_app(SubscribeRequest {
            id: "worker-1".into(),
            role: "worker".into(),
            ..Default::default()
        }),
    )
    .await;
    (client, stream)
}

/// `ipc-app: shop` and the caller's trace context on a request.
fn traced<T>(body: T) -> tonic::Request<T> {
    let mut request = with_app(body);
    request
        .metadata_mut()
        .insert("traceparent", traceparent().parse().unwrap());
    request
}

fn trace_id_of(headers: &std::collections::HashMap<String, String>) -> Option<&str> {
    headers.get("traceparent")?.split('-').nth(1)
}

/// The span of `service` named `name` (on replica `instance`, if given).
fn find<'a>(
    spans: &'a [ReceivedSpan],
    service: &str,
    instance: &str,
    name: &str,
) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .filter(|s| instance.is_empty() || s.instance == instance)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one span {name:?} of {service} {instance} expected, got {found:#?}\nall spans: {spans:#?}"
    );
    found[0]
}

#[tokio::test]
async fn a_send_msg_through_two_replicas_and_a_sidecar_is_one_trace_with_every_hop() {
    let otlp = OtlpReceiver::start();
    let redis = RedisServer::start();
    let a = replica(&redis, "a", &otlp);
    let b = replica(&redis, "b", &otlp);
    let sidecar = SidecarProcess::start(&b.url(), &["--otlp-endpoint", &otlp.endpoint()]);
    sidecar.wait_upstream(true).await;
    let (mut worker_client, mut requests) = worker(&sidecar).await;

    // The caller asks through replica a; the worker is on b, behind the sidecar.
    let mut caller = a.client().await;
    let call = tokio::spawn(async move {
        let request = SendMsgRequest {
            target: ":worker".into(),
            op: "config:get".into(),
            timeout_ms: 10_000,
            ..Default::default()
        };
        caller.send_msg(traced(request)).await
    });
    let request = next(&mut requests).await;
    assert_eq!(request.op, "config:get");
    assert_eq!(
        trace_id_of(&request.headers),
        Some(TRACE_ID),
        "the request reaches the worker with the caller's trace: {:?}",
        request.headers
    );
    reply(
        &mut worker_client,
        &request,
        "config:get",
        json!({"db": "pg"}),
    )
    .await;
    let answer = call.await.unwrap().expect("SendMsg answered");
    let answered = answer.into_inner().reply.expect("a reply");
    assert_eq!(data(&answered), json!({"db": "pg"}));
    assert_eq!(
        trace_id_of(&answered.headers),
        Some(TRACE_ID),
        "the reply comes back with the trace: {:?}",
        answered.headers
    );

    // Every hop, in order: each span's parent is the hop before it.
    let chain = [
        ("ipc-server", "a", "SendMsg"),
        ("ipc-server", "a", "route"),
        ("ipc-server", "a", "redis inbox request"),
        ("ipc-server", "b", "redis inbox serve"),
        ("ipc-server", "b", "deliver"),
        ("ipc-sidecar", "", "sidecar request"),
        ("ipc-sidecar", "", "deliver"),
        ("ipc-sidecar", "", "Reply"),
    ];
    let also = [
        ("ipc-sidecar", "", "upstream Reply"),
        ("ipc-server", "b", "Reply"),
    ];
    let wanted = |spans: &[ReceivedSpan]| {
        chain.iter().chain(&also).all(|(service, instance, name)| {
            spans.iter().any(|s| {
                s.trace_id == TRACE_ID
                    && s.service == *service
                    && s.name == *name
                    && (instance.is_empty() || s.instance == *instance)
            })
        })
    };
    let spans = otlp.wait_for(PATIENCE, wanted);
    assert!(wanted(&spans), "spans missing: {spans:#?}");
    // The sidecar's own questions to the node (its grants) are traces of their own.
    let others: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id != TRACE_ID && s.attribute("ipc.target") != Some(""))
        .collect();
    assert!(others.is_empty(), "one trace only, also got {others:#?}");

    let mut parent = CALLER_SPAN.to_string();
    let mut previous_start = 0;
    for (service, instance, name) in chain {
        let span = find(&spans, service, instance, name);
        assert_eq!(
            span.parent_span_id, parent,
            "{name:?} of {service} {instance} is under the hop before it; spans: {spans:#?}"
        );
        assert!(
            span.start_ns >= previous_start,
            "{name:?} starts after its parent"
        );
        assert!(span.error.is_none(), "{name:?} failed: {span:?}");
        parent = span.span_id.clone();
        previous_start = span.start_ns;
    }
    assert_eq!(
        find(&spans, "ipc-sidecar", "", "deliver").attribute("ipc.member"),
        Some("worker-1")
    );
    assert_eq!(
        find(&spans, "ipc-server", "a", "redis inbox request").attribute("ipc.replica"),
        Some("b")
    );
    // The reply goes back upstream from the sidecar's hop, to replica b.
    let sidecar_hop = find(&spans, "ipc-sidecar", "", "sidecar request");
    let upstream_reply = find(&spans, "ipc-sidecar", "", "upstream Reply");
    assert_eq!(upstream_reply.parent_span_id, sidecar_hop.span_id);
    let replied = find(&spans, "ipc-server", "b", "Reply");
    assert_eq!(replied.parent_span_id, upstream_reply.span_id);
    // The subscriber's reply lies inside the caller's call.
    let call_span = find(&spans, "ipc-server", "a", "SendMsg");
    let worker_reply = find(&spans, "ipc-sidecar", "", "Reply");
    assert!(call_span.start_ns <= worker_reply.start_ns);
    assert!(
        worker_reply.end_ns <= call_span.end_ns,
        "{worker_reply:?} within {call_span:?}"
    );
    assert!(replied.end_ns <= call_span.end_ns);
}

#[tokio::test]
async fn log_lines_of_a_gather_carry_its_trace_id_and_op_id() {
    let redis = RedisServer::start();
    let otlp = OtlpReceiver::start();
    // Tracing off on the sidecar: the caller's context still reaches the logs.
    let a = replica(&redis, "a", &otlp);
    let mut sidecar = SidecarProcess::start_logging(
        &a.url(),
        &["--log-json"],
        Some("warn,ipc_core=debug,ipc_sidecar=debug"),
    );
    sidecar.wait_upstream(true).await;
    let (mut worker_client, mut requests) = worker(&sidecar).await;

    let mut caller = a.client().await;
    let call = tokio::spawn(async move {
        let request = GatherRequest {
            target: ":worker".into(),
            op: "health".into(),
            timeout_ms: 10_000,
            ..Default::default()
        };
        caller.gather(traced(request)).await
    });
    let request = next(&mut requests).await;
    let op_id = request
        .headers
        .get("ipc-op-id")
        .cloned()
        .expect("ipc-op-id");
    assert_eq!(trace_id_of(&request.headers), Some(TRACE_ID));
    reply(&mut worker_client, &request, "health", json!("ok")).await;
    let ledger = call.await.unwrap().expect("Gather answered").into_inner();
    assert_eq!(ledger.id, op_id);
    assert_eq!(ledger.ok, 1);

    let logs = sidecar.terminate_for_logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let of_request: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|line| line["fields"]["message"] == "request handed to a responder")
        .collect();
    assert!(
        !of_request.is_empty(),
        "the sidecar logged the request: {logs}"
    );
    for line in of_request {
        assert_eq!(line["span"]["trace_id"], TRACE_ID, "{line}");
        assert_eq!(line["span"]["op_id"], op_id.as_str(), "{line}");
    }
}
