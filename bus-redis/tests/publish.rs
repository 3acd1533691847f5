//! Publish streams and idempotent Broadcast through replicas on one real Redis:
//! a stream's messages are stored in order and seen in that order on every
//! replica; a burst shares log entries and a resume from any of its messages gets
//! exactly what follows; a key repeated on any replica, even concurrently, is
//! stored once.

mod common;

use common::*;
use futures::StreamExt;
use futures::future::join_all;
use ipc_proto::pb::{BroadcastRequest, BroadcastResponse, SubscribeRequest};

fn keyed(key: &str, body: &str) -> BroadcastRequest {
    BroadcastRequest {
        channel: "jobs".into(),
        op: "job:run".into(),
        data: Some(text(body)),
        key: key.into(),
        ..BroadcastRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_is_stored_in_order_and_read_in_order_on_every_replica() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut on_b = subscribe(&mut cb, channels("reader", &["news"])).await.0;
    // Several streams one after the other: an order broken now and then (the
    // writer's pipelines once overtook each other, ~1 stream in 10) shows in one.
    for round in 0..4 {
        let bodies: Vec<String> = (0..500).map(|n| format!("r{round} m{n}")).collect();
        let requests: Vec<_> = bodies
            .iter()
            .map(|body| BroadcastRequest {
                channel: "news".into(),
                op: "note".into(),
                data: Some(text(body)),
                ..BroadcastRequest::default()
            })
            .collect();
        let acked = publish_all(&mut ca, requests).await;
        assert!(
            acked.iter().all(|a| a.code == 0 && !a.cursor.is_empty()),
            "{acked:?}"
        );
        assert_eq!(acked.len(), bodies.len());
        for (answer, body) in acked.iter().zip(&bodies) {
            let msg = next(&mut on_b).await;
            assert_eq!(
                (&text_of(&msg), &msg.id, &msg.cursor),
                (body, &answer.id, &answer.cursor)
            );
        }
    }
}

/// Every answer of one Publish stream of `requests`, in order.
async fn publish_all(
    client: &mut Client,
    requests: Vec<BroadcastRequest>,
) -> Vec<BroadcastResponse> {
    let mut answers = client
        .publish(futures::stream::iter(requests))
        .await
        .expect("publish opens")
        .into_inner();
    let mut acked = Vec::new();
    while let Some(answer) = tokio::time::timeout(PATIENCE, answers.next())
        .await
        .expect("answers come")
    {
        acked.push(answer.expect("the stream goes on"));
    }
    acked
}

fn query<T: redis::FromRedisValue>(
    redis: &ipc_testkit::redis::RedisServer,
    cmd: &mut redis::Cmd,
) -> T {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = client.get_connection().expect("connecting to redis");
    cmd.query(&mut conn).expect("redis command")
}

/// A burst on a Publish stream is stored several messages to a log entry (one
/// entry per write round trip, a keyed message an entry of its own in its place):
/// a cursor names a message inside its entry, so a subscriber resuming from any
/// message's cursor, on either replica, gets exactly the messages after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_any_message_of_a_burst_gets_exactly_the_messages_after_it() {
    const N: usize = 300;
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let bodies: Vec<String> = (0..N).map(|n| format!("m{n}")).collect();
    let requests = bodies
        .iter()
        .enumerate()
        .map(|(n, body)| BroadcastRequest {
            channel: "news".into(),
            op: "note".into(),
            data: Some(text(body)),
            key: if n % 50 == 7 {
                format!("k{n}")
            } else {
                String::new()
            },
            ..BroadcastRequest::default()
        })
        .collect();
    let answers = publish_all(&mut ca, requests).await;
    assert_eq!(answers.len(), N);
    assert!(
        answers.iter().all(|a| a.code == 0 && !a.duplicate),
        "{answers:?}"
    );
    let entries: usize = query(&redis, redis::cmd("XLEN").arg("test:log"));
    assert!(
        entries < N,
        "a burst's messages share log entries: {entries} entries for {N} messages"
    );

    for from in (0..N).step_by(23).chain([N - 1]) {
        let client = if from % 2 == 0 { &mut ca } else { &mut cb };
        let request = SubscribeRequest {
            cursor: answers[from].cursor.clone(),
            ..channels(&format!("resumed-{from}"), &["news"])
        };
        let (mut resumed, hello) = subscribe(client, request).await;
        let replayed = hello["replayed"]
            .as_u64()
            .expect("replayed in the greeting");
        assert_eq!(
            replayed as usize,
            N - 1 - from,
            "resuming after m{from}: {hello}"
        );
        let mut seen = Vec::new();
        for _ in 0..replayed {
            let msg = next(&mut resumed).await;
            seen.push((text_of(&msg), msg.cursor));
        }
        let want: Vec<_> = (from + 1..N)
            .map(|n| (bodies[n].clone(), answers[n].cursor.clone()))
            .collect();
        assert_eq!(seen, want, "resuming after m{from}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_repeated_on_any_replica_even_at_once_is_delivered_once() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&mut ca, channels("reader", &["jobs"])).await.0;

    let first = ca
        .broadcast(keyed("restart-1", "first"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    let repeat = cb
        .broadcast(keyed("restart-1", "again"))
        .await
        .unwrap()
        .into_inner();
    assert!(repeat.duplicate, "{repeat:?}");
    assert_eq!(
        (&repeat.id, &repeat.cursor, &repeat.channel),
        (&first.id, &first.cursor, &first.channel)
    );

    // Twenty callers race with one new key through both replicas.
    let racers = (0..20).map(|n| {
        let mut client = if n % 2 == 0 { ca.clone() } else { cb.clone() };
        async move {
            client
                .broadcast(keyed("restart-2", &format!("racer {n}")))
                .await
                .expect("broadcast")
                .into_inner()
        }
    });
    let answers = join_all(racers).await;
    let stored: Vec<_> = answers.iter().filter(|a| !a.duplicate).collect();
    assert_eq!(stored.len(), 1, "exactly one stored: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|a| a.id == stored[0].id && a.cursor == stored[0].cursor)
    );

    // A Publish stream honours keys as well.
    let mut publish = ca
        .publish(futures::stream::iter(vec![keyed("restart-1", "streamed")]))
        .await
        .unwrap()
        .into_inner();
    let streamed = publish.next().await.unwrap().unwrap();
    assert!(streamed.duplicate && streamed.id == first.id);

    cb.broadcast(BroadcastRequest {
        key: String::new(),
        ..keyed("", "marker")
    })
    .await
    .unwrap();
    let winner = text_of(&stored_msg(&answers, stored[0].id.as_str()));
    assert_eq!(
        texts(&mut on_a, 3).await,
        ["first".to_string(), winner, "marker".to_string()],
        "each key delivered once, then the marker"
    );
}

/// The racer whose message was stored, by its answer's id (racers' bodies differ).
fn stored_msg(answers: &[ipc_proto::pb::BroadcastResponse], id: &str) -> ipc_proto::pb::Msg {
    let n = answers
        .iter()
        .position(|a| a.id == id && !a.duplicate)
        .unwrap();
    ipc_proto::pb::Msg {
        data: Some(text(&format!("racer {n}"))),
        ..Default::default()
    }
}

/// A replica leaves undecoded what none of its subscribers wants: subscribers
/// appearing on it while a stream of messages is being read, each the first
/// taker of its channel there (by name, pattern, role and tag, or resuming with
/// a cursor), still get exactly the messages after their start, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_appearing_mid_stream_gets_every_message_after_its_start() {
    const ROUNDS: usize = 8;
    const PER_ROUND: usize = 450;
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    // Channel k < ROUNDS is round k's subscriber's; the last, nobody's.
    let channel = |n: usize| match n % (ROUNDS + 1) {
        ROUNDS => "nobody:here".to_string(),
        k => format!("shop:c{k}:x"),
    };
    let (feed, requests) = tokio::sync::mpsc::unbounded_channel();
    let mut answers_stream = ca
        .publish(tokio_stream::wrappers::UnboundedReceiverStream::new(
            requests,
        ))
        .await
        .expect("publish opens")
        .into_inner();
    let mut answers: Vec<BroadcastResponse> = Vec::new();
    let mut late = Vec::new();
    for round in 0..ROUNDS {
        for n in round * PER_ROUND..(round + 1) * PER_ROUND {
            feed.send(BroadcastRequest {
                channel: channel(n),
                op: "note".into(),
                data: Some(text(&format!("m{n}"))),
                ..BroadcastRequest::default()
            })
            .expect("the stream is open");
        }
        // Registered while b's tail reads this round's entries.
        let id = format!("late-{round}");
        let mine = format!("shop:c{round}:x");
        let resume_from = answers.len().checked_sub(PER_ROUND / 3);
        let request = match round % 4 {
            0 => channels(&id, &[&mine]),
            1 => channels(&id, &[&format!("shop:c{round}:*")]),
            2 => SubscribeRequest {
                id,
                role: format!("c{round}"),
                tag: "x".into(),
                ..SubscribeRequest::default()
            },
            _ => SubscribeRequest {
                cursor: answers[resume_from.expect("a round before")].cursor.clone(),
                ..channels(&id, &[&mine])
            },
        };
        let (stream, hello) = subscribe(&mut cb, request.clone()).await;
        let start = match round % 4 {
            3 => request.cursor,
            _ => hello["cursor"]
                .as_str()
                .expect("a start cursor")
                .to_string(),
        };
        late.push((stream, mine, start));
        while answers.len() < (round + 1) * PER_ROUND {
            let answer = tokio::time::timeout(PATIENCE, answers_stream.next())
                .await
                .expect("answers come")
                .expect("the stream goes on")
                .expect("an answer");
            assert!(answer.code == 0 && !answer.cursor.is_empty(), "{answer:?}");
            answers.push(answer);
        }
    }
    drop(feed);

    let position = |cursor: &str| {
        cursor
            .parse::<ipc_core::cursor::Cursor>()
            .expect("a cursor")
            .position()
    };
    for (round, (mut stream, mine, start)) in late.into_iter().enumerate() {
        let want: Vec<(String, String)> = answers
            .iter()
            .enumerate()
            .filter(|(n, answer)| {
                channel(*n) == mine && position(&answer.cursor) > position(&start)
            })
            .map(|(n, answer)| (format!("m{n}"), answer.cursor.clone()))
            .collect();
        assert!(
            !want.is_empty(),
            "round {round} subscribed after the last message"
        );
        let mut seen = Vec::new();
        while seen.len() < want.len() {
            let msg = next(&mut stream).await;
            // Registered just before the tail published the position of a read
            // and reading it just after, a subscriber without a cursor also gets
            // that read's messages up to its start (main does this too): left
            // aside, what a skip could lose is after the start.
            if seen.is_empty() && round % 4 != 3 && position(&msg.cursor) <= position(&start) {
                continue;
            }
            seen.push((text_of(&msg), msg.cursor));
        }
        assert_eq!(seen, want, "round {round}'s subscriber, from {start}");
    }
}
