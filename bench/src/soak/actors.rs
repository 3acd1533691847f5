//! The clients of a soak: one publisher that retries (with an idempotency key) until
//! a broadcast is acknowledged, and subscribers that record everything they see —
//! direct ones that resume on the next replica with their cursor, and processes of a
//! pod behind a sidecar that resume on its socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{BroadcastRequest, SubscribeRequest};
use parking_lot::Mutex;
use prost_types::value::Kind;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

/// The channel everything is published on (app `soak`).
pub const CHANNEL: &str = "soak:news";

/// A position in the log, as in a cursor `EPOCH.MS-LO`, ordered like the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub epoch: u64,
    pub ms: u64,
    pub lo: u64,
}

impl Pos {
    pub fn parse(cursor: &str) -> Option<Self> {
        let (epoch, id) = cursor.split_once('.')?;
        let (ms, lo) = id.split_once('-')?;
        Some(Self {
            epoch: u64::from_str_radix(epoch, 16).ok()?,
            ms: ms.parse().ok()?,
            lo: lo.parse().ok()?,
        })
    }
}

/// One acknowledged broadcast.
#[derive(Debug, Clone)]
pub struct Ack {
    pub number: u64,
    pub pos: Pos,
    pub at: Instant,
    pub duplicate: bool,
}

/// What a subscriber saw, in order.
#[derive(Debug, Clone)]
pub enum Seen {
    /// `ipc:subscribed`, with its cursor if any.
    Subscribed {
        pos: Option<Pos>,
    },
    Message {
        number: u64,
        pos: Pos,
        at: Instant,
    },
    /// `ipc:gap`: loss announced after `from` (the cursor the stream resumed from).
    Gap {
        from: Option<Pos>,
        reason: String,
    },
    /// The stream (or the attempt to open it) failed; the subscriber retries.
    Broken {
        why: String,
    },
}

#[derive(Debug)]
pub struct SubscriberLog {
    pub name: String,
    pub kind: &'static str,
    pub seen: Mutex<Vec<Seen>>,
}

async fn tcp_client(url: &str) -> anyhow::Result<IpcClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // A replica stopped with SIGSTOP is given up within seconds.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .connect()
        .await?;
    Ok(IpcClient::new(channel))
}

async fn unix_client(path: PathBuf) -> anyhow::Result<IpcClient<Channel>> {
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(IpcClient::new(channel))
}

fn number_of(data: Option<prost_types::Value>) -> Option<u64> {
    match data?.kind? {
        Kind::NumberValue(n) => Some(n as u64),
        _ => None,
    }
}

/// Where a subscriber connects: replicas in turn, or its pod's socket.
#[derive(Debug, Clone)]
pub enum Upstream {
    Replicas(Vec<String>),
    Socket(PathBuf),
}

/// Subscribes as `log.name` until `stop`, resuming after the last message seen.
pub async fn subscriber(
    log: Arc<SubscriberLog>,
    upstream: Upstream,
    mut stop: watch::Receiver<bool>,
) {
    let mut last: Option<String> = None;
    let mut attempt = 0usize;
    let record = |seen: Seen| log.seen.lock().push(seen);
    while !*stop.borrow() {
        let client = match &upstream {
            Upstream::Replicas(urls) => tcp_client(&urls[attempt % urls.len()]).await,
            Upstream::Socket(path) => unix_client(path.clone()).await,
        };
        attempt += 1;
        let request = SubscribeRequest {
            channels: vec![CHANNEL.into()],
            id: log.name.clone(),
            app: "soak".into(),
            cursor: last.clone().unwrap_or_default(),
            ..SubscribeRequest::default()
        };
        let opened = match client {
            Ok(mut client) => client.subscribe(request).await.map_err(|s| s.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut stream = match opened {
            Ok(stream) => stream.into_inner(),
            Err(why) => {
                record(Seen::Broken { why });
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
        };
        loop {
            let item = tokio::select! {
                _ = stop.changed() => return,
                item = stream.message() => item,
            };
            let msg = match item {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    record(Seen::Broken {
                        why: "stream ended".into(),
                    });
                    break;
                }
                Err(status) => {
                    record(Seen::Broken {
                        why: status.to_string(),
                    });
                    break;
                }
            };
            let at = Instant::now();
            match msg.op.as_str() {
                "ipc:subscribed" => {
                    let data = ipc_proto::json::from_optional(msg.data.as_ref());
                    let pos = data["cursor"].as_str().and_then(Pos::parse);
                    record(Seen::Subscribed { pos });
                }
                "ipc:gap" => {
                    let data = ipc_proto::json::from_optional(msg.data.as_ref());
                    record(Seen::Gap {
                        from: data["cursor"].as_str().and_then(Pos::parse),
                        reason: data["reason"].as_str().unwrap_or_default().to_string(),
                    });
                }
                "n" => {
                    if let (Some(number), Some(pos)) =
                        (number_of(msg.data), Pos::parse(&msg.cursor))
                    {
                        record(Seen::Message { number, pos, at });
                        last = Some(msg.cursor);
                    }
                }
                _ => {}
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// What the publisher did.
#[derive(Debug, Default)]
pub struct Published {
    pub acks: Vec<Ack>,
    /// Attempts refused or unanswered (retried).
    pub retries: u64,
    /// Messages given up after retrying for a long time (not acknowledged).
    pub abandoned: u64,
}

/// Publishes numbered messages at about `rate` per second until `stop`, each retried
/// on the replicas in turn (same idempotency key) until acknowledged.
pub async fn publisher(
    replicas: Vec<String>,
    rate: u32,
    published: Arc<Mutex<Published>>,
    mut stop: watch::Receiver<bool>,
) {
    let period = Duration::from_secs(1) / rate.max(1);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut clients: Vec<Option<IpcClient<Channel>>> = vec![None; replicas.len()];
    let mut next = 0usize;
    for number in 0u64.. {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if *stop.borrow() {
            return;
        }
        let request = BroadcastRequest {
            channel: CHANNEL.into(),
            op: "n".into(),
            data: Some(prost_types::Value {
                kind: Some(Kind::NumberValue(number as f64)),
            }),
            key: format!("soak-{number}"),
            ..BroadcastRequest::default()
        };
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let index = next % replicas.len();
            if clients[index].is_none() {
                clients[index] = tcp_client(&replicas[index]).await.ok();
            }
            let answer = match clients[index].clone() {
                Some(mut client) => {
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(Duration::from_secs(3));
                    client.broadcast(call).await.map_err(|s| s.to_string())
                }
                None => Err("unreachable".into()),
            };
            match answer {
                Ok(response) => {
                    let response = response.into_inner();
                    if let Some(pos) = Pos::parse(&response.cursor) {
                        published.lock().acks.push(Ack {
                            number,
                            pos,
                            at: Instant::now(),
                            duplicate: response.duplicate,
                        });
                    }
                    break;
                }
                Err(_) => {
                    clients[index] = None;
                    next += 1;
                    published.lock().retries += 1;
                    if Instant::now() > give_up || *stop.borrow() {
                        published.lock().abandoned += 1;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
