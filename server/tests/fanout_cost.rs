//! What wildcard subscriptions cost a broadcast, against a real `ipc-server`: many
//! streams with many wildcard patterns (the most one identity may open with the
//! default limits) still get exactly the messages their patterns match, and the
//! measurement behind docs/security.md's fan-out figure.

mod support;

use std::time::{Duration, Instant};

use ipc_proto::pb::Msg;
use serde_json::json;
use support::*;

/// `count` wildcard patterns that match nothing the tests broadcast to, distinct
/// per stream (`noise{stream}:{n}:*`, `noise{stream}:{n}:>` alternately).
fn noise(stream: usize, count: usize) -> Vec<String> {
    (0..count)
        .map(|n| match n % 2 {
            0 => format!("noise{stream}:{n}:*"),
            _ => format!("noise{stream}:{n}:>"),
        })
        .collect()
}

/// Opens `streams` Subscribe streams of `patterns` wildcard patterns each on one
/// connection; returns them greeted (they must stay open).
async fn noisy_streams(
    server: &ipc_testkit::ServerProcess,
    streams: usize,
    patterns: usize,
) -> Vec<tonic::Streaming<Msg>> {
    let mut client = server.client().await;
    let mut open = Vec::with_capacity(streams);
    for stream in 0..streams {
        let channels = noise(stream, patterns);
        let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
        let (opened, _) = subscribe(&mut client, subscription(&channels)).await;
        open.push(opened);
    }
    open
}

#[tokio::test]
async fn wildcard_subscribers_among_many_patterns_get_exactly_their_matches() {
    let server = server(&[]);
    let _noise = noisy_streams(&server, 20, 256).await;
    let mut client = server.client().await;
    // Each stream: its patterns (with noise around them), the channels broadcast
    // below it must receive, in order.
    let cases: [(&[&str], &[&str]); 5] = [
        (&["app:a:*"], &["app:a:x", "app:a:y"]),
        (&["app:>"], &["app:a:x", "app:a:y", "app:b", "app:a:x:deep"]),
        (&["*:b"], &["app:b"]),
        (
            &["app:*:x", "app:a:>"],
            &["app:a:x", "app:a:y", "app:a:x:deep"],
        ),
        (&["app:a:x:*", "other:>"], &["app:a:x:deep", "other:z"]),
    ];
    let mut streams = Vec::new();
    for (index, (patterns, _)) in cases.iter().enumerate() {
        let mut channels = noise(1000 + index, 200);
        channels.extend(patterns.iter().map(|p| p.to_string()));
        channels.push("app:end".into());
        let channels: Vec<&str> = channels.iter().map(String::as_str).collect();
        streams.push(subscribe(&mut client, subscription(&channels)).await.0);
    }
    let sent = [
        "app:a:x",
        "app:a:y",
        "app:b",
        "app:a:x:deep",
        "other:z",
        "app",
        "noise0:1",
    ];
    let mut publisher = server.client().await;
    for channel in sent {
        publisher
            .broadcast(broadcast(channel, "m", json!(channel)))
            .await
            .unwrap();
    }
    // A last message every stream receives marks the end of what was sent.
    publisher
        .broadcast(broadcast("app:end", "end", json!(null)))
        .await
        .unwrap();
    for ((patterns, expected), stream) in cases.iter().zip(&mut streams) {
        let mut received = Vec::new();
        loop {
            let msg = next(stream).await;
            if msg.channel == "app:end" {
                break;
            }
            received.push(msg.channel);
        }
        assert_eq!(received, *expected, "{patterns:?}");
    }
}

/// How many broadcasts a second reach one subscriber while 1,000 other streams
/// hold 256 wildcard patterns each (the default --max-subscriptions-per-identity
/// and --max-channels), each broadcast answered before the next is sent. Run by
/// hand: `cargo nextest run -p ipc-server --test fanout_cost --run-ignored only
/// --no-capture`.
#[tokio::test]
#[ignore = "a measurement, not a test: prints figures for docs/security.md"]
async fn measure_broadcasts_per_second_under_wildcard_load() {
    let server = server(&[]);
    let mut reader = server.client().await;
    let (mut target, _) = subscribe(&mut reader, subscription(&["app:target"])).await;
    let publisher = server.client().await;
    let rate = |count: usize, took: Duration| count as f64 / took.as_secs_f64();
    let run = |count: usize| {
        let mut publisher = publisher.clone();
        async move {
            let started = Instant::now();
            for n in 0..count {
                publisher
                    .broadcast(broadcast("app:target", "m", json!(n)))
                    .await
                    .unwrap();
            }
            started.elapsed()
        }
    };
    let quiet = run(200).await;
    for _ in 0..200 {
        next(&mut target).await;
    }
    let rss_before = rss(server.pid());
    let setup = Instant::now();
    let _noise = noisy_streams(&server, 1000, 256).await;
    let setup = setup.elapsed();
    let rss_after = rss(server.pid());
    let loaded = run(200).await;
    for _ in 0..200 {
        next(&mut target).await;
    }
    println!(
        "broadcasts/s: {:.0} without other streams, {:.0} with 1,000 streams × 256 wildcard patterns \
         (opening them took {:.1} s; server RSS {:.0} MiB before them, {:.0} MiB after)",
        rate(200, quiet),
        rate(200, loaded),
        setup.as_secs_f64(),
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
}
