//! The sidecar as a pod sees it: a real `ipc-server` as the control plane, a real
//! `ipc-sidecar` process, clients over its Unix socket.

mod common;

use common::*;
use ipc_proto::pb::{MembersRequest, SubscribeRequest};
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn a_broadcast_from_the_pod_goes_through_the_control_plane_to_everyone() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut remote = server.client().await;
    let mut local = sidecar.client().await;
    let mut remote_stream = subscribe_to(&mut remote, &[":news"]).await;
    let mut local_stream = subscribe_to(&mut local, &[":news"]).await;

    let mut acks = Vec::new();
    for n in 0..20 {
        let ack = broadcast(&mut local, ":news", "news:out", json!({"n": n}))
            .await
            .unwrap();
        assert_eq!(ack.channel, "shop:news");
        assert!(!ack.cursor.is_empty());
        acks.push(ack);
    }
    for stream in [&mut remote_stream, &mut local_stream] {
        for (n, ack) in acks.iter().enumerate() {
            let msg = next(stream).await;
            assert_eq!((msg.op.as_str(), data(&msg)), ("news:out", json!({"n": n})));
            assert_eq!(
                (&msg.id, &msg.cursor),
                (&ack.id, &ack.cursor),
                "one message, one log position"
            );
            assert_eq!(msg.sender, POD_ID, "the fleet sees which pod sent it");
        }
    }
}

#[tokio::test]
async fn a_broadcast_from_grpcurl_on_the_control_plane_reaches_a_new_local_subscriber() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    // A channel nobody in the pod listened to: once `ipc:subscribed` arrives, the
    // upstream subscription includes it.
    let mut stream = subscribe_to(&mut local, &[":deploys"]).await;
    let body = r#"{"channel":":deploys","op":"deploy:done","data":{"version":"1.2"}}"#;
    let addr = server.grpc.to_string();
    run_grpcurl(&[
        "-plaintext",
        "-H",
        "ipc-app: shop",
        "-d",
        body,
        &addr,
        "ipc.v1.Ipc/Broadcast",
    ]);
    let msg = next(&mut stream).await;
    assert_eq!(
        (msg.op.as_str(), msg.channel.as_str()),
        ("deploy:done", "shop:deploys")
    );
    assert_eq!(data(&msg), json!({"version": "1.2"}));
}

#[tokio::test]
async fn local_requests_are_answered_in_the_pod_even_without_the_control_plane() {
    let mut server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut worker = sidecar.client().await;
    let request = SubscribeRequest {
        id: "worker-1".into(),
        role: "worker".into(),
        ..Default::default()
    };
    let (mut requests, _) = subscribe(&mut worker, with_app(request)).await;
    let answering = tokio::spawn(async move {
        loop {
            let msg = next(&mut requests).await;
            if !msg.reply_to.is_empty() {
                reply(&mut worker, &msg, "answer", json!({"to": msg.op})).await;
            }
        }
    });

    server.kill();
    sidecar.wait_upstream(false).await;
    let mut caller = sidecar.client().await;
    for target in ["worker-1", ":worker"] {
        let reply = send(&mut caller, target, "work:do", 5_000).await.unwrap();
        assert_eq!(
            (reply.op.as_str(), data(&reply)),
            ("answer", json!({"to": "work:do"}))
        );
    }
    let pong = send(&mut caller, "", "ping", 5_000).await.unwrap();
    assert_eq!(pong.op, "pong");
    assert_eq!(data(&pong)["node"], POD_ID);

    // What needs the control plane fails at once, never with a false success.
    let refused = broadcast(&mut caller, ":news", "news:out", json!({}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("unreachable"),
        "{}",
        refused.message()
    );
    let refused = send(&mut caller, "elsewhere", "work:do", 5_000)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    answering.abort();
}

#[tokio::test]
async fn requests_from_the_control_plane_reach_the_pod_and_its_subscribers() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut worker = sidecar.client().await;
    let request = SubscribeRequest {
        id: "w1".into(),
        role: "worker".into(),
        ..Default::default()
    };
    let (mut requests, _) = subscribe(&mut worker, with_app(request)).await;
    let mut operator = server.client().await;

    for target in [":worker", "w1"] {
        let asking = {
            let mut operator = operator.clone();
            let target = target.to_string();
            tokio::spawn(async move { send(&mut operator, &target, "stats:get", 10_000).await })
        };
        let msg = next(&mut requests).await;
        assert_eq!(
            (msg.op.as_str(), msg.channel.as_str()),
            (
                "stats:get",
                if target == "w1" { "w1" } else { "shop:worker" }
            )
        );
        assert!(!msg.reply_to.is_empty());
        let deadline: i64 = msg.headers["ipc-deadline-ms"].parse().unwrap();
        assert!(
            deadline - msg.ts_ms <= 10_000,
            "the deadline travelled with the request"
        );
        reply(&mut worker, &msg, "stats", json!({"load": 3})).await;
        let answer = asking.await.unwrap().unwrap();
        assert_eq!(
            (answer.op.as_str(), data(&answer)),
            ("stats", json!({"load": 3}))
        );
    }

    // The pod itself answers its built-in ops.
    let pong = send(&mut operator, POD_ID, "ping", 5_000).await.unwrap();
    assert_eq!(
        (pong.op.as_str(), data(&pong)["node"].as_str()),
        ("pong", Some(POD_ID))
    );
    // The pod's role with nobody behind it in the pod (and no hook): the pod is a
    // watcher of its role, so there is no responder fleet-wide — at once.
    let nobody = send(&mut operator, ":web", "stats:get", 5_000)
        .await
        .unwrap_err();
    assert_eq!(nobody.code(), Code::Unavailable, "{nobody:?}");
    assert!(nobody.message().contains("no responders"), "{nobody:?}");

    // A local subscriber that does not answer: the control plane's caller gets
    // DEADLINE_EXCEEDED, and the sidecar drops the request at the same deadline.
    let late = send(&mut operator, "w1", "stats:get", 300)
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
}

#[tokio::test]
async fn members_show_local_subscribers_with_the_pod_identity() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &["--label", "zone=eu-1"]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let request = SubscribeRequest {
        id: "w1".into(),
        role: "worker".into(),
        labels: [("version".to_string(), "7".to_string())].into(),
        ..Default::default()
    };
    let (_stream, _) = subscribe(&mut local, with_app(request)).await;

    let members = local
        .members(with_app(MembersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .members;
    let w1 = members
        .iter()
        .find(|m| m.id == "w1")
        .expect("the local subscriber");
    assert_eq!(w1.role, "worker");
    for (key, value) in [
        ("version", "7"),
        ("pod", "web-1"),
        ("namespace", "prod"),
        ("node", "n1"),
        ("zone", "eu-1"),
    ] {
        assert_eq!(
            w1.labels.get(key).map(String::as_str),
            Some(value),
            "label {key} of {w1:?}"
        );
    }
    assert!(
        members.iter().any(|m| m.id == POD_ID),
        "the pod, from upstream: {members:?}"
    );

    // On the control plane: the pod, with its identity and the channels of the pod.
    let mut operator = server.client().await;
    let members = operator
        .members(with_app(MembersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .members;
    let pod = members
        .iter()
        .find(|m| m.id == POD_ID)
        .expect("the pod on the control plane");
    assert_eq!((pod.app.as_str(), pod.role.as_str()), ("shop", "web"));
    assert_eq!(
        pod.labels.get("namespace").map(String::as_str),
        Some("prod")
    );
    assert_eq!(pod.labels.get("node").map(String::as_str), Some("n1"));
    for channel in ["w1", "shop:worker", "shop:web"] {
        assert!(
            pod.channels.iter().any(|c| c == channel),
            "{channel} in {:?}",
            pod.channels
        );
    }
}

#[tokio::test]
async fn a_local_subscriber_keeps_its_stream_across_a_control_plane_restart() {
    let port = ipc_testkit::redis::free_port();
    let mut server = server_on(Some(port), &[]);
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut stream = subscribe_to(&mut local, &[":news"]).await;
    let mut operator = server.client().await;
    broadcast(&mut operator, ":news", "news:1", json!({}))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.op, "news:1");

    server.kill();
    sidecar.wait_upstream(false).await;
    // Probes: alive, not ready.
    assert_eq!(http_get(sidecar.health, "/healthz").await.0, 200);
    let (status, reason) = http_get(sidecar.health, "/readyz").await;
    assert_eq!(status, 503, "{reason}");
    let server = server_on(Some(port), &[]);
    sidecar.wait_upstream(true).await;
    assert_eq!(http_get(sidecar.health, "/readyz").await.0, 200);
    let (status, metrics) = http_get(sidecar.health, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("ipc_subscribers 1"), "{metrics}");
    // The restarted server's memory log is a new one: the loss is reported.
    let gap = next(&mut stream).await;
    assert_eq!(gap.op, "ipc:gap");
    assert!(
        data(&gap)["reason"].as_str().unwrap().contains("upstream"),
        "{gap:?}"
    );
    let mut operator = server.client().await;
    broadcast(&mut operator, ":news", "news:2", json!({}))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.op, "news:2");
}

#[tokio::test]
async fn subscribers_coming_and_going_in_the_pod_lose_nothing_for_the_others() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut steady = subscribe_to(&mut local, &[":seq"]).await;
    let total = 400u64;
    let publisher = {
        let mut operator = server.client().await;
        tokio::spawn(async move {
            for n in 0..total {
                broadcast(&mut operator, ":seq", "n", json!(n))
                    .await
                    .unwrap();
            }
        })
    };
    // Every subscribe and unsubscribe changes the pod's upstream subscription.
    let churn = {
        let sidecar_client = sidecar.client().await;
        tokio::spawn(async move {
            for i in 0..12 {
                let mut client = sidecar_client.clone();
                let channel = format!(":other-{i}");
                let stream = subscribe_to(&mut client, &[&channel]).await;
                drop(stream);
            }
        })
    };
    let mut seen = Vec::new();
    while (seen.len() as u64) < total {
        let msg = next(&mut steady).await;
        seen.push(data(&msg).as_u64().unwrap());
    }
    publisher.await.unwrap();
    churn.await.unwrap();
    assert_eq!(seen, (0..total).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_resuming_local_subscriber_gets_what_it_missed() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let mut operator = server.client().await;

    // Another subscriber keeps the channel in the pod: the sidecar's buffer answers.
    let mut keeper = subscribe_to(&mut local, &[":feed"]).await;
    let resumer = |cursor: &str| SubscribeRequest {
        id: "resumer".into(),
        channels: vec![":feed".into(), ":solo".into()],
        cursor: cursor.into(),
        ..Default::default()
    };
    let (mut stream, _) = subscribe(&mut local, with_app(resumer(""))).await;
    broadcast(&mut operator, ":feed", "a1", json!({}))
        .await
        .unwrap();
    let cursor = next(&mut stream).await.cursor;
    assert_eq!(next(&mut keeper).await.op, "a1");
    drop(stream);
    broadcast(&mut operator, ":feed", "a2", json!({}))
        .await
        .unwrap();
    broadcast(&mut operator, ":solo", "s1", json!({}))
        .await
        .unwrap();
    broadcast(&mut operator, ":feed", "a3", json!({}))
        .await
        .unwrap();
    assert_eq!(next(&mut keeper).await.op, "a2");
    assert_eq!(next(&mut keeper).await.op, "a3");
    // `:solo` left the pod's subscription with the resumer: its message is fetched
    // from the control plane's log.
    let (mut stream, hello) = subscribe(&mut local, with_app(resumer(&cursor))).await;
    assert_eq!(hello["replayed"], 3, "{hello}");
    let ops: Vec<String> = [
        next(&mut stream).await,
        next(&mut stream).await,
        next(&mut stream).await,
    ]
    .into_iter()
    .map(|m| m.op)
    .collect();
    assert_eq!(ops, ["a2", "s1", "a3"]);
    broadcast(&mut operator, ":solo", "s2", json!({}))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.op, "s2", "live after the replay");
}

#[tokio::test]
async fn a_subscriber_resumes_across_a_sidecar_restart() {
    let server = server();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipc.sock");
    let sidecar = SidecarProcess::start_at(&socket, &server.url(), &pod_args()).unwrap();
    let mut local = sidecar.client().await;
    let resumer = |cursor: &str| SubscribeRequest {
        id: "resumer".into(),
        channels: vec![":feed".into()],
        cursor: cursor.into(),
        ..Default::default()
    };
    let (mut stream, _) = subscribe(&mut local, with_app(resumer(""))).await;
    let mut operator = server.client().await;
    broadcast(&mut operator, ":feed", "f1", json!({}))
        .await
        .unwrap();
    let cursor = next(&mut stream).await.cursor;

    drop(sidecar); // SIGKILL: the socket file stays behind
    broadcast(&mut operator, ":feed", "f2", json!({}))
        .await
        .unwrap();
    let sidecar = SidecarProcess::start_at(&socket, &server.url(), &pod_args()).unwrap();
    let mut local = sidecar.client().await;
    let (mut stream, _) = subscribe(&mut local, with_app(resumer(&cursor))).await;
    assert_eq!(
        next(&mut stream).await.op,
        "f2",
        "from the control plane's log"
    );
    broadcast(&mut operator, ":feed", "f3", json!({}))
        .await
        .unwrap();
    assert_eq!(next(&mut stream).await.op, "f3");
}

#[tokio::test]
async fn grpcurl_works_over_the_socket() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let socket = sidecar.socket.to_str().unwrap().to_string();
    let services = run_grpcurl(&["-plaintext", "-unix", &socket, "list"]);
    assert!(services.contains("ipc.v1.Ipc"), "{services}");
    let pong = run_grpcurl(&[
        "-plaintext",
        "-unix",
        "-d",
        r#"{"op":"ping"}"#,
        &socket,
        "ipc.v1.Ipc/SendMsg",
    ]);
    assert!(pong.contains("pong"), "{pong}");
}
