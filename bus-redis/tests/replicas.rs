//! Replicas of `ipc-server` on one real Redis behave as one service: broadcast,
//! requests, replies and members cross replicas; subscribers resume anywhere.

mod common;

use common::*;
use futures::future::join_all;
use ipc_proto::pb::{MembersRequest, SubscribeRequest};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_on_one_replica_reaches_subscribers_on_every_replica() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&mut ca, channels("sub-a", &["news"])).await.0;
    let mut on_b = subscribe(&mut cb, channels("sub-b", &["news"])).await.0;

    let mut acks = Vec::new();
    for body in ["one", "two", "three"] {
        acks.push(broadcast(&mut cb, "news", body).await.expect("broadcast"));
    }
    for stream in [&mut on_a, &mut on_b] {
        for (ack, body) in acks.iter().zip(["one", "two", "three"]) {
            let msg = next(stream).await;
            assert_eq!(
                (text_of(&msg).as_str(), &msg.channel),
                (body, &"news".to_string())
            );
            assert_eq!(
                msg.cursor, ack.cursor,
                "delivered with the acknowledged cursor"
            );
            assert_eq!(msg.id, ack.id);
        }
    }

    // A subscriber that saw "one" resumes on the other replica with its cursor.
    let mut resumed = subscribe(
        &mut ca,
        SubscribeRequest {
            cursor: acks[0].cursor.clone(),
            ..channels("sub-late", &["news"])
        },
    )
    .await
    .0;
    assert_eq!(texts(&mut resumed, 2).await, ["two", "three"]);
    broadcast(&mut ca, "news", "four").await.expect("broadcast");
    assert_eq!(
        texts(&mut resumed, 1).await,
        ["four"],
        "then live, without duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_msg_reaches_a_subscriber_on_another_replica_and_a_reply_through_any_replica_returns()
{
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut worker = subscribe(
        &mut ca,
        SubscribeRequest {
            role: "worker".into(),
            ..channels("w1", &[])
        },
    )
    .await
    .0;

    // Asked through B by id, answered through A (where the request was delivered).
    let mut asker = cb.clone();
    let asked = tokio::spawn(async move { send(&mut asker, "w1", "status", 10_000).await });
    let request = next(&mut worker).await;
    assert_eq!(
        (request.op.as_str(), request.channel.as_str()),
        ("status", "w1")
    );
    assert!(request.reply_to.starts_with("a#"), "{}", request.reply_to);
    reply(&mut ca, &request.reply_to, "fine")
        .await
        .expect("reply on A");
    let answer = asked.await.unwrap().expect("reply");
    assert_eq!(
        (answer.op.as_str(), text_of(&answer).as_str()),
        ("answer", "fine")
    );

    // Asked through B by role, answered through B: the reply crosses back to A.
    let mut asker = cb.clone();
    let asked = tokio::spawn(async move { send(&mut asker, ":worker", "status", 10_000).await });
    let request = next(&mut worker).await;
    assert_eq!(request.channel, "shop:worker");
    reply(&mut cb, &request.reply_to, "via b")
        .await
        .expect("reply on B");
    assert_eq!(text_of(&asked.await.unwrap().expect("reply")), "via b");

    // A reply with `error` set comes back as a reply.
    let mut asker = cb.clone();
    let asked = tokio::spawn(async move { send(&mut asker, "w1", "fail", 10_000).await });
    let request = next(&mut worker).await;
    ca.reply(ipc_proto::pb::ReplyRequest {
        reply_to: request.reply_to.clone(),
        op: "answer".into(),
        error: "disk full".into(),
        ..Default::default()
    })
    .await
    .expect("error reply");
    assert_eq!(asked.await.unwrap().expect("reply").error, "disk full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_is_decided_fleet_wide_at_once_and_a_deadline_is_distinct() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // Nobody anywhere: UNAVAILABLE although the caller would wait 60 s.
    assert_code(
        send(&mut cb, "nobody", "status", 60_000).await,
        Code::Unavailable,
        "no responders",
    );

    // A subscriber on A that never answers: the deadline, not "no responders". The
    // deadline leaves room for the request to reach it (B's route lookup and A's
    // inbox) on a loaded machine, since the test waits for it to arrive.
    let mut silent = subscribe(&mut ca, channels("silent", &[])).await.0;
    let mut asker = cb.clone();
    let asked = tokio::spawn(async move { send(&mut asker, "silent", "status", 2_000).await });
    let request = next(&mut silent).await;
    assert_code(asked.await.unwrap(), Code::DeadlineExceeded, "");
    // Its late reply is refused wherever it is given.
    assert_code(
        reply(&mut cb, &request.reply_to, "late").await,
        Code::NotFound,
        "no pending request",
    );
    assert_code(
        reply(&mut ca, &request.reply_to, "late").await,
        Code::NotFound,
        "no pending request",
    );

    // Once it left (the server notices the closed stream a moment later), nobody
    // answers again: "no responders" at once, on either replica.
    drop(silent);
    for client in [&ca, &cb] {
        eventually("no responders after the subscriber left", || {
            let mut client = client.clone();
            async move {
                match send(&mut client, "silent", "status", 5_000).await {
                    Err(status)
                        if status.code() == Code::Unavailable
                            && status.message().contains("no responders") =>
                    {
                        Some(())
                    }
                    _ => None,
                }
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_fleet_wide_and_a_killed_replicas_members_vanish_within_the_ttl() {
    let redis = redis();
    let mut a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let _on_a = subscribe(&mut ca, channels("m-a", &["news"])).await.0;
    let _on_b = subscribe(&mut cb, channels("m-b", &["news"])).await.0;

    let expected = vec![
        ("m-a".to_string(), "a".to_string()),
        ("m-b".into(), "b".into()),
    ];
    assert_eq!(member_ids(&members(&mut ca).await), expected);
    assert_eq!(member_ids(&members(&mut cb).await), expected);
    let from_b = members(&mut cb).await;
    assert_eq!(from_b[0].channels, ["news", "m-a"]);

    a.kill();
    // Before its presence expires, a request to its subscriber finds no listener.
    assert_code(
        send(&mut cb, "m-a", "status", 60_000).await,
        Code::Unavailable,
        "no responders",
    );
    let left = eventually("a's members to expire", || {
        let mut cb = cb.clone();
        async move {
            let left = member_ids(&members(&mut cb).await);
            (left.len() == 1).then_some(left)
        }
    })
    .await;
    assert_eq!(left, [("m-b".to_string(), "b".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_of_a_killed_replica_resumes_on_another_with_exactly_what_it_missed() {
    let redis = redis();
    let mut a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&mut ca, channels("roamer", &["jobs"])).await.0;
    for body in ["1", "2", "3"] {
        broadcast(&mut cb, "jobs", body).await.expect("broadcast");
    }
    let mut cursor = String::new();
    for body in ["1", "2", "3"] {
        let msg = next(&mut on_a).await;
        assert_eq!(text_of(&msg), body);
        cursor = msg.cursor;
    }

    a.kill();
    for body in ["4", "5", "6"] {
        broadcast(&mut cb, "jobs", body).await.expect("broadcast");
    }
    broadcast(&mut cb, "other", "not mine")
        .await
        .expect("broadcast");
    let mut on_b = subscribe(
        &mut cb,
        SubscribeRequest {
            cursor,
            ..channels("roamer", &["jobs"])
        },
    )
    .await
    .0;
    assert_eq!(texts(&mut on_b, 3).await, ["4", "5", "6"]);
    broadcast(&mut cb, "jobs", "7").await.expect("broadcast");
    assert_eq!(texts(&mut on_b, 1).await, ["7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_channel_order_is_the_same_on_every_replica_under_concurrent_publishers() {
    let redis = redis();
    let replicas = [
        replica(&redis.url(), "a"),
        replica(&redis.url(), "b"),
        replica(&redis.url(), "c"),
    ];
    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(r.client().await);
    }
    let mut streams = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        streams.push(
            subscribe(client, channels(&format!("o{i}"), &["orders"]))
                .await
                .0,
        );
    }
    const EACH: usize = 100;
    let publishers = clients.iter().enumerate().map(|(p, client)| {
        let mut client = client.clone();
        async move {
            for n in 0..EACH {
                broadcast(&mut client, "orders", &format!("{p}:{n}"))
                    .await
                    .expect("broadcast");
            }
        }
    });
    join_all(publishers).await;

    let mut seen = Vec::new();
    for stream in &mut streams {
        seen.push(texts(stream, EACH * replicas.len()).await);
    }
    assert_eq!(seen[0], seen[1], "replicas a and b disagree on the order");
    assert_eq!(seen[0], seen[2], "replicas a and c disagree on the order");
    for p in 0..replicas.len() {
        let own: Vec<&String> = seen[0]
            .iter()
            .filter(|t| t.starts_with(&format!("{p}:")))
            .collect();
        let expected: Vec<String> = (0..EACH).map(|n| format!("{p}:{n}")).collect();
        assert_eq!(
            own,
            expected.iter().collect::<Vec<_>>(),
            "publisher {p}'s order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_with_sigterm_withdraws_its_members_at_once() {
    let redis = redis();
    let mut a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let _on_a = subscribe(&mut ca, channels("leaving", &["news"])).await.0;
    let _on_b = subscribe(&mut cb, channels("staying", &["news"])).await.0;
    assert_eq!(members(&mut cb).await.len(), 2);

    assert!(a.terminate().success(), "replica a did not exit cleanly");
    assert_eq!(
        member_ids(&members(&mut cb).await),
        [("staying".to_string(), "b".to_string())],
        "without waiting for the presence TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_retention_gets_a_gap_then_what_is_kept() {
    let redis = redis();
    let a = replica_with(&redis.url(), "a", &["--retention", "10"]);
    let mut ca = a.client().await;
    let first = broadcast(&mut ca, "news", "first")
        .await
        .expect("broadcast");
    // Redis trims whole stream nodes (100 entries by default): go well past one.
    for n in 0..300 {
        broadcast(&mut ca, "news", &n.to_string())
            .await
            .expect("broadcast");
    }
    let mut resumed = subscribe(
        &mut ca,
        SubscribeRequest {
            cursor: first.cursor.clone(),
            ..channels("late", &["news"])
        },
    )
    .await
    .0;
    let gap = next(&mut resumed).await;
    assert_eq!(gap.op, "ipc:gap", "{gap:?}");
    let kept = next(&mut resumed).await;
    assert_ne!(
        text_of(&kept),
        "0",
        "the oldest messages should have been trimmed"
    );
    let kept: usize = text_of(&kept).parse().expect("a numbered message");
    let rest = texts(&mut resumed, 299 - kept).await;
    assert_eq!(rest.last().map(String::as_str), Some("299"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_channel_are_who_a_broadcast_would_reach_on_every_replica() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let worker = |id: &str| SubscribeRequest {
        id: id.into(),
        role: "worker".into(),
        ..SubscribeRequest::default()
    };
    let _w1 = subscribe(&mut ca, worker("w1")).await.0;
    let _w2 = subscribe(&mut cb, worker("w2")).await.0;
    let _tail = subscribe(&mut cb, channels("tail", &["shop:>"])).await.0;
    let _orders = subscribe(&mut ca, channels("orders", &["shop:orders"]))
        .await
        .0;

    // w1 is on replica a, tail and w2 on b.
    let expected = ["tail", "w1", "w2"];
    // Either replica answers for the whole fleet (presence is written in the
    // background: poll until both see all four subscribers).
    for (client, name) in [(&ca, "a"), (&cb, "b")] {
        let want = expected.len();
        let seen = eventually(&format!("replica {name} to see every worker"), || {
            let mut client = client.clone();
            async move {
                let seen = ipc_testkit::reached(&mut client, None, ":worker").await;
                (seen.len() == want).then_some(seen)
            }
        })
        .await;
        assert_eq!(seen, expected, "from replica {name}");
    }
    assert_eq!(
        ipc_testkit::reached(&mut cb, None, "shop:orders").await,
        ["orders", "tail"]
    );
    let refused = ca
        .members(MembersRequest {
            channel: "shop:*".into(),
            ..MembersRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
}
