//! Memory a client can make the node hold through subscriptions and the log,
//! against a real `ipc-server`: queues and retention count what a message takes
//! in memory (a list of many empty values costs far more than its encoding), a
//! subscriber that never reads is cut off with RESOURCE_EXHAUSTED (resumable)
//! once over its byte bound, and the queues together stay under a node-wide bound.

mod support;

use ipc_proto::json::from_optional;
use serde_json::json;
use support::*;
use tonic::Code;

/// ~200 KB encoded, ~1.6 MB in memory: 50,000 empty values.
fn heavy() -> serde_json::Value {
    json!(vec![serde_json::Value::Null; 50_000])
}

#[tokio::test]
async fn a_subscriber_that_never_reads_is_cut_off_by_bytes_not_message_count() {
    let server = server(&["--subscriber-queue-bytes", "8000000"]);
    let mut reader = server.client().await;
    // Never read while the broadcasts go out: the queue fills by bytes long
    // before its 4,096 messages.
    let (mut stalled, _) = subscribe(&mut reader, subscription(&["app:big"])).await;
    let mut publisher = server.client().await;
    let message = broadcast("app:big", "x", heavy());
    for _ in 0..20 {
        publisher.broadcast(message.clone()).await.unwrap();
    }
    wait_for_metric(&server, "ipc_slow_subscriber_cutoffs_total", |n| n >= 1).await;
    let status = end_status(&mut stalled).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("cursor"), "{status:?}");
}

#[tokio::test]
async fn the_queues_together_stay_under_the_node_bound() {
    let server = server(&[
        "--subscriber-queue-bytes",
        "100000000",
        "--max-queued-bytes",
        "8000000",
    ]);
    let mut reader = server.client().await;
    let (mut one, _) = subscribe(&mut reader, subscription(&["app:big"])).await;
    let mut other_reader = server.client().await;
    let (mut two, _) = subscribe(&mut other_reader, subscription(&["app:big"])).await;
    let mut publisher = server.client().await;
    let message = broadcast("app:big", "x", heavy());
    for _ in 0..20 {
        publisher.broadcast(message.clone()).await.unwrap();
    }
    wait_for_metric(&server, "ipc_slow_subscriber_cutoffs_total", |n| n >= 1).await;
    let statuses = [end_status(&mut one).await, end_status(&mut two).await];
    assert!(
        statuses.iter().all(|s| s.code() == Code::ResourceExhausted),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn retention_counts_memory_not_encoded_bytes() {
    // Ten ~1.6 MB messages (2 MB encoded in all) do not fit 8 MB of memory.
    let server = server(&["--retention-bytes", "8000000"]);
    let mut client = server.client().await;
    let first = client
        .broadcast(broadcast("app:log", "x", heavy()))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..9 {
        client
            .broadcast(broadcast("app:log", "x", heavy()))
            .await
            .unwrap();
    }
    let mut request = subscription(&["app:log"]);
    request.cursor = first.cursor;
    let (mut stream, _) = subscribe(&mut client, request).await;
    let gap = next(&mut stream).await;
    assert_eq!(gap.op, "ipc:gap", "{gap:?}");
    assert!(
        from_optional(gap.data.as_ref())["reason"]
            .as_str()
            .unwrap()
            .contains("retention")
    );
}

/// The worst case documented in docs/security.md, measured: default limits, one
/// subscriber that never reads, 150 broadcasts of ~1 MiB of empty values (the
/// shape that costs the most memory per encoded byte). Prints RSS before, at the
/// peak and after. Run by hand: `cargo nextest run -p ipc-server --test
/// memory_bounds --run-ignored only --no-capture`.
#[tokio::test]
#[ignore = "a measurement, not a test: prints figures for docs/security.md"]
async fn measure_worst_case_rss() {
    let server = server(&[]);
    let pid = server.pid();
    let before = rss(pid);
    let mut reader = server.client().await;
    let (_stalled, _) = subscribe(&mut reader, subscription(&["app:big"])).await;
    let mut publisher = server.client().await;
    // 260,000 nulls encode to ~1,040,000 bytes: just under --max-msg-bytes.
    let message = broadcast(
        "app:big",
        "x",
        json!(vec![serde_json::Value::Null; 260_000]),
    );
    let mut peak = before;
    for _ in 0..150 {
        publisher.broadcast(message.clone()).await.unwrap();
        peak = peak.max(rss(pid));
    }
    let cutoffs = metric(&server, "ipc_slow_subscriber_cutoffs_total").await;
    let after = rss(pid);
    println!(
        "RSS before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB; slow-subscriber cut-offs: {cutoffs}",
        before as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
}
