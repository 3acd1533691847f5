//! W3C trace context through a real `ipc-server`: with tracing off, a caller's
//! `traceparent` metadata reaches subscribers as a header and comes back with the
//! reply, and a node starts no trace of its own; with `--otlp-endpoint`, a
//! broadcast without one starts a trace whose spans reach a real OTLP receiver.

mod support;

use futures::StreamExt as _;
use ipc_proto::pb::{
    BroadcastRequest, ReplyRequest, RolloutRequest, SendMsgRequest, SubscribeRequest,
};
use ipc_testkit::otlp::{OtlpReceiver, ReceivedSpan};
use support::*;
use tonic::Request;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn traced<T>(body: T, traceparent: &str) -> Request<T> {
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
        .metadata_mut()
        .insert("tracestate", "vendor=abc".parse().unwrap());
    request
}

#[tokio::test]
async fn with_tracing_off_the_callers_context_travels_unchanged_and_none_is_made_up() {
    let server = server(&["--app", "shop"]);
    let mut client = server.client().await;
    let (mut news, _) = subscribe(&mut client, subscription(&[":news"])).await;

    client
        .broadcast(traced(
            broadcast(":news", "a", serde_json::json!(1)),
            PARENT,
        ))
        .await
        .unwrap();
    let delivered = next(&mut news).await;
    assert_eq!(
        delivered.headers.get("traceparent").map(String::as_str),
        Some(PARENT)
    );
    assert_eq!(
        delivered.headers.get("tracestate").map(String::as_str),
        Some("vendor=abc")
    );

    // No context, or one that is malformed (ignored, as W3C says): none is added.
    client
        .broadcast(broadcast(":news", "b", serde_json::json!(2)))
        .await
        .unwrap();
    client
        .broadcast(traced(
            broadcast(":news", "c", serde_json::json!(3)),
            "00-zz-01",
        ))
        .await
        .unwrap();
    for op in ["b", "c"] {
        let delivered = next(&mut news).await;
        assert_eq!(delivered.op, op);
        assert!(
            !delivered.headers.contains_key("traceparent"),
            "{delivered:?}"
        );
    }

    // Publish: each message's own header is its context.
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let message = BroadcastRequest {
        headers: [("traceparent".to_string(), own.to_string())].into(),
        ..broadcast(":news", "d", serde_json::json!(4))
    };
    let mut answers = client
        .publish(futures::stream::iter([message]))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.next().await.unwrap().unwrap().error.is_empty());
    let delivered = next(&mut news).await;
    assert_eq!(
        delivered.headers.get("traceparent").map(String::as_str),
        Some(own)
    );

    // SendMsg: the request carries the caller's context, the reply brings it back.
    let (mut requests, _) = subscribe(
        &mut client,
        SubscribeRequest {
            id: "worker-1".into(),
            role: "worker".into(),
            ..SubscribeRequest::default()
        },
    )
    .await;
    let mut caller = server.client().await;
    let call = tokio::spawn(async move {
        let request = SendMsgRequest {
            target: ":worker".into(),
            op: "config:get".into(),
            timeout_ms: 5_000,
            ..SendMsgRequest::default()
        };
        caller.send_msg(traced(request, PARENT)).await
    });
    let request = next(&mut requests).await;
    assert_eq!(
        request.headers.get("traceparent").map(String::as_str),
        Some(PARENT)
    );
    client
        .reply(ReplyRequest {
            reply_to: request.reply_to.clone(),
            op: "config:get".into(),
            ..ReplyRequest::default()
        })
        .await
        .unwrap();
    let reply = call.await.unwrap().unwrap().into_inner().reply.unwrap();
    assert_eq!(
        reply.headers.get("traceparent").map(String::as_str),
        Some(PARENT)
    );
}

#[tokio::test]
async fn with_tracing_on_a_broadcast_starts_a_trace_of_accept_store_and_fan_out() {
    let otlp = OtlpReceiver::start();
    let server = server(&["--app", "shop", "--otlp-endpoint", &otlp.endpoint()]);
    let mut client = server.client().await;
    let (mut news, _) = subscribe(&mut client, subscription(&[":news"])).await;
    let answer = client
        .broadcast(broadcast(":news", "restart", serde_json::json!(1)))
        .await
        .unwrap()
        .into_inner();
    let delivered = next(&mut news).await;
    let traceparent = delivered
        .headers
        .get("traceparent")
        .expect("the node started a trace");
    let trace_id = traceparent.split('-').nth(1).unwrap().to_string();

    let names = ["Broadcast", "store", "fanout"];
    let spans = otlp.wait_for(PATIENCE, |spans| {
        names.iter().all(|name| {
            spans
                .iter()
                .any(|s| s.name == *name && s.trace_id == trace_id)
        })
    });
    let span = |name: &str| -> &ReceivedSpan {
        spans
            .iter()
            .find(|s| s.name == name && s.trace_id == trace_id)
            .unwrap_or_else(|| panic!("no {name:?} span in {spans:#?}"))
    };
    let (accepted, store, fanout) = (span("Broadcast"), span("store"), span("fanout"));
    assert_eq!(accepted.service, "ipc-server");
    assert_eq!(accepted.parent_span_id, "", "a new trace");
    assert_eq!(accepted.attribute("ipc.msg_id"), Some(answer.id.as_str()));
    assert_eq!(store.parent_span_id, accepted.span_id);
    assert_eq!(fanout.parent_span_id, store.span_id);
    assert_eq!(fanout.attribute("ipc.deliveries"), Some("1"));
    // Subscribers get the stored hop's context: their work nests under it.
    assert!(
        traceparent.contains(&store.span_id),
        "{traceparent} vs {store:?}"
    );
}

/// The span named `name` in the trace of [`PARENT`], once the receiver has it.
fn span_of_parent_trace(otlp: &OtlpReceiver, name: &str) -> ReceivedSpan {
    let trace_id = PARENT.split('-').nth(1).unwrap();
    let spans = otlp.wait_for(PATIENCE, |spans| {
        spans
            .iter()
            .any(|s| s.name == name && s.trace_id == trace_id)
    });
    spans
        .into_iter()
        .find(|s| s.name == name && s.trace_id == trace_id)
        .unwrap_or_else(|| panic!("no {name} span in the caller's trace"))
}

#[tokio::test]
async fn with_tracing_on_a_broadcast_refused_by_validation_still_has_its_failed_span() {
    let otlp = OtlpReceiver::start();
    let server = server(&["--app", "shop", "--otlp-endpoint", &otlp.endpoint()]);
    let mut client = server.client().await;
    let refused = client
        .broadcast(traced(
            broadcast("no spaces allowed", "restart", serde_json::json!(1)),
            PARENT,
        ))
        .await
        .expect_err("an invalid channel is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let span = span_of_parent_trace(&otlp, "Broadcast");
    assert_eq!(
        span.parent_span_id, "00f067aa0ba902b7",
        "under the caller's span"
    );
    assert_eq!(span.error.as_deref(), Some(refused.message()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_on_a_stopped_rollout_has_a_failed_span() {
    let otlp = OtlpReceiver::start();
    let server = server(&["--app", "shop", "--otlp-endpoint", &otlp.endpoint()]);
    let mut client = server.client().await;
    // One worker, whose restart fails: a budget of no failures stops the rollout.
    let (mut requests, _) = subscribe(
        &mut client,
        SubscribeRequest {
            id: "w1".into(),
            role: "worker".into(),
            ..SubscribeRequest::default()
        },
    )
    .await;
    let mut worker = client.clone();
    tokio::spawn(async move {
        while let Ok(Some(msg)) = requests.message().await {
            if msg.reply_to.is_empty() {
                continue;
            }
            let _ = worker
                .reply(ReplyRequest {
                    reply_to: msg.reply_to,
                    error: "restart failed".into(),
                    ..ReplyRequest::default()
                })
                .await;
        }
    });
    let mut events = client
        .rollout(traced(
            RolloutRequest {
                target: ":worker".into(),
                op: "restart".into(),
                wave_size: 1,
                max_failures: 0,
                timeout_ms: 10_000,
                ..RolloutRequest::default()
            },
            PARENT,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(event) = events.next().await {
        last = event.unwrap().ledger.or(last);
    }
    let ledger = last.expect("the last event carries the ledger");
    assert_eq!(ledger.state(), ipc_proto::pb::ledger::State::Stopped);

    let span = span_of_parent_trace(&otlp, "Rollout");
    assert_eq!(span.error.as_deref(), Some("rollout stopped"));
}
