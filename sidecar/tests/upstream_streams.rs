//! The pod's traffic to the control plane rides on streams (issue 18): its
//! broadcasts on one Publish stream, its answers to the fleet's requests on the
//! upstream subscription's Serve stream. Counted from outside, by the control
//! plane's own per-RPC metrics: no unary Broadcast or Reply reaches it from the
//! pod, and a request between two processes of the pod never reaches it at all.
//! A broadcast whose acknowledgement is lost with the connection is sent again
//! with its key and stored once.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use futures::StreamExt;
use ipc_proto::pb::{BroadcastRequest, SubscribeRequest};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How many calls of `method` the server's `/metrics` counts as OK (0 when it has
/// not served one: the family lists only what happened).
async fn calls(metrics: SocketAddr, method: &str) -> f64 {
    let (status, text) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200);
    let series = format!("ipc_rpc_requests_total{{method=\"{method}\",code=\"OK\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0.0, |value| value.parse().expect("a number"))
}

fn job(n: i64) -> BroadcastRequest {
    BroadcastRequest {
        channel: ":jobs".into(),
        op: "job:run".into(),
        data: json(json!(n)),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_pod_publishes_and_answers_on_streams_and_keeps_its_own_requests() {
    let server = server();
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut remote = server.client().await;
    let mut jobs = subscribe_to(&mut remote, &[":jobs"]).await;

    // A worker of the pod, and another process of the pod that asks it.
    let mut worker = sidecar.client().await;
    let (mut requests, _) = subscribe(
        &mut worker,
        SubscribeRequest {
            id: "worker-1".into(),
            ..Default::default()
        },
    )
    .await;
    let answering = tokio::spawn(async move {
        while let Ok(Some(request)) = requests.message().await {
            if !request.reply_to.is_empty() {
                let n = data(&request);
                reply(&mut worker, &request, "echo", n).await;
            }
        }
    });
    let mut local = sidecar.client().await;

    const UNARY: i64 = 20;
    const STREAMED: i64 = 20;
    for n in 0..UNARY {
        broadcast(&mut local, ":jobs", "job:run", json!(n))
            .await
            .expect("broadcast");
    }
    let answers: Vec<_> = local
        .publish(with_app(futures::stream::iter(
            (UNARY..UNARY + STREAMED).map(job),
        )))
        .await
        .expect("publish")
        .into_inner()
        .collect()
        .await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|a| a.error.is_empty()))
    );
    for n in 0..UNARY + STREAMED {
        assert_eq!(data(&next(&mut jobs).await), json!(n), "order or loss");
    }

    const ASKED: usize = 10;
    for n in 0..ASKED {
        let answer = send_with(&mut remote, "worker-1", json!(n)).await;
        assert_eq!(data(&answer), json!(n));
    }
    let metrics = server.metrics;
    // The pod's own requests: the server sees none of them.
    let before = calls(metrics, "SendMsg").await;
    assert!(before >= ASKED as f64);
    for n in 0..5 {
        let answer = send_with(&mut local, "worker-1", json!(n)).await;
        assert_eq!(data(&answer), json!(n));
    }
    assert_eq!(
        calls(metrics, "SendMsg").await,
        before,
        "a request between two processes of the pod left the pod"
    );
    assert_eq!(
        calls(metrics, "Broadcast").await,
        0.0,
        "the pod's broadcasts came as unary Broadcast calls"
    );
    assert_eq!(
        calls(metrics, "Reply").await,
        0.0,
        "the pod's answers came as unary Reply calls"
    );
    assert_eq!(
        calls(metrics, "Publish").await,
        1.0,
        "one Publish stream carries all the pod's broadcasts"
    );
    assert!(calls(metrics, "Serve").await >= 1.0, "no Serve stream");
    answering.abort();
}

async fn send_with(
    client: &mut Client,
    target: &str,
    value: serde_json::Value,
) -> ipc_proto::pb::Msg {
    let request = ipc_proto::pb::SendMsgRequest {
        target: target.into(),
        op: "ask".into(),
        data: json(value),
        timeout_ms: 20_000,
        ..Default::default()
    };
    client
        .send_msg(with_app(request))
        .await
        .expect("send_msg")
        .into_inner()
        .reply
        .expect("a reply")
}

#[tokio::test]
async fn a_broadcast_whose_acknowledgement_was_lost_is_stored_once() {
    let server = server();
    let proxy = HoldingProxy::start(server.grpc).await;
    let sidecar = SidecarProcess::start(&format!("http://{}", proxy.addr), &[]);
    sidecar.wait_upstream(true).await;
    let mut remote = server.client().await;
    let mut jobs = subscribe_to(&mut remote, &[":jobs"]).await;
    let mut local = sidecar.client().await;
    // The pod's Publish stream is open and answering.
    broadcast(&mut local, ":jobs", "job:run", json!("before"))
        .await
        .expect("broadcast");
    assert_eq!(data(&next(&mut jobs).await), json!("before"));

    // The control plane stores the broadcast, but its answer never reaches the pod
    // before the connection is lost.
    proxy.hold_answers(true);
    let sending =
        tokio::spawn(async move { broadcast(&mut local, ":jobs", "job:run", json!("once")).await });
    let stored = next(&mut jobs).await;
    assert_eq!(data(&stored), json!("once"));
    proxy.cut();
    proxy.hold_answers(false);

    let answer = tokio::time::timeout(PATIENCE, sending)
        .await
        .expect("no answer after the reconnect")
        .expect("the broadcasting task")
        .expect("the broadcast is acknowledged once the sidecar is back");
    assert_eq!(
        (answer.id.as_str(), answer.cursor.as_str(), answer.duplicate),
        (stored.id.as_str(), stored.cursor.as_str(), false),
        "acknowledged as the message that was stored"
    );
    // The sidecar may still be reconnecting its subscription: retried with a key,
    // as clients do.
    let mut local = sidecar.client().await;
    let after = BroadcastRequest {
        key: "after".into(),
        data: json(json!("after")),
        ..job(0)
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(status) = local.broadcast(with_app(after.clone())).await {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        sidecar.wait_upstream(true).await;
    }
    assert_eq!(
        data(&next(&mut jobs).await),
        json!("after"),
        "the broadcast was delivered twice"
    );
}

/// A TCP proxy to the control plane that can hold back what the control plane
/// sends (its answers) and cut every connection.
struct HoldingProxy {
    addr: SocketAddr,
    hold: watch::Sender<bool>,
    /// Bumped to cut the connections open now.
    cuts: watch::Sender<u64>,
    _task: tokio::task::JoinHandle<()>,
}

impl HoldingProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let hold = watch::Sender::new(false);
        let cuts = watch::Sender::new(0u64);
        let (hold_rx, cuts_rx) = (Arc::new(hold.subscribe()), Arc::new(cuts.subscribe()));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut cut = (*cuts_rx).clone();
                cut.borrow_and_update();
                let hold = (*hold_rx).clone();
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let up = tokio::io::copy(&mut from_client, &mut to_server);
                    let down = async {
                        let mut hold = hold;
                        let mut buffer = vec![0u8; 64 << 10];
                        loop {
                            let n = from_server.read(&mut buffer).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            // Read, then held: nothing read after `hold` is passed on.
                            while *hold.borrow_and_update() {
                                if hold.changed().await.is_err() {
                                    return Ok(());
                                }
                            }
                            to_client.write_all(&buffer[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            hold,
            cuts,
            _task: task,
        }
    }

    fn hold_answers(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    /// Closes every connection open now (the next ones pass).
    fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}
