//! The floors under issue 18's targets: what any server speaking `ipc.v1.Ipc` over
//! HTTP/2 costs on this machine, measured in the same run as fleet-ipc and NATS.
//!
//! The **bare broker** serves the few methods the workloads use (SendMsg, Subscribe,
//! Serve, Reply, Broadcast, Publish, Gather) on a plain tonic server, with as little
//! as each needs to work: a map of streams by channel, by id and by role, a map of
//! requests waiting for their reply. No log, cursor, queue bound, admission, identity, metrics or
//! limits. The **bare relay** serves SendMsg on a Unix socket and passes each call
//! upstream as one unary call on one connection, as a sidecar with nothing else to
//! do would. Each runs in a process of its own, as `ipc-server` and `ipc-sidecar`
//! do, and the bench's fleet-ipc clients talk to them unchanged. So a fleet-ipc row
//! minus its floor row is fleet-ipc's own cost, and a target the floor misses is out
//! of reach of any design that keeps the contract's HTTP/2 calls and streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::{Stream, StreamExt as _};
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::ipc_server::{Ipc, IpcServer};
use ipc_proto::pb::{
    BroadcastRequest, BroadcastResponse, GatherRequest, Ledger, LimitRequest, LimitResponse,
    LockRequest, LockResponse, MembersRequest, MembersResponse, Msg, Outcome, ReplyRequest,
    ReplyResponse, RolloutEvent, RolloutRequest, SendMsgRequest, SendMsgResponse, SendMsgsRequest,
    SendMsgsResponse, ServeRequest, SubscribeRequest, UnlockRequest, UnlockResponse, ledger,
    outcome::Status as Status_, serve_request,
};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::fleet::{self, Fleet, Target};

/// Set in the environment of the bench's own child: serve a bare broker.
pub const BROKER_ENV: &str = "IPC_BENCH_BARE_BROKER";
/// Set to a bare broker's address: serve a bare relay to it on a Unix socket.
pub const RELAY_ENV: &str = "IPC_BENCH_BARE_RELAY";

/// How long a request waits for its reply (SendMsg's default).
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// Starts this executable again with `env` set to `value`, as a server that prints
/// where it listens on its first line and serves until its stdin closes. Returns
/// the process (killed when dropped) and that line.
pub async fn start_child(env: &str, value: &str) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .env(env, value)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the bench's own {env} server"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).await?;
    anyhow::ensure!(
        !line.trim().is_empty(),
        "the {env} server printed no address"
    );
    Ok((child, line.trim().to_string()))
}

/// Resolves once this process's stdin closes (the bench that started it went away).
pub async fn stdin_closed() {
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}

/// The child's side of [`BROKER_ENV`]: a bare broker on a loopback port.
pub async fn serve_broker() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(IpcServer::new(Bare::default()))
        .serve_with_incoming_shutdown(incoming, stdin_closed())
        .await?;
    Ok(())
}

/// The child's side of [`RELAY_ENV`]: a bare relay to the broker at `upstream`.
pub async fn serve_relay(upstream: &str) -> anyhow::Result<()> {
    let upstream: SocketAddr = upstream.parse().context("the relay's upstream address")?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("relay.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let client = fleet::connect(&Target::Tcp(upstream)).await?;
    println!("{}", path.display());
    let relay = Bare {
        upstream: Some(client),
        ..Bare::default()
    };
    tonic::transport::Server::builder()
        .add_service(IpcServer::new(relay))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stdin_closed(),
        )
        .await?;
    Ok(())
}

/// A bare broker in a process of its own.
pub struct BareBroker {
    pub addr: SocketAddr,
    pub process: Child,
}

impl BareBroker {
    pub async fn start() -> anyhow::Result<Self> {
        let (process, line) = start_child(BROKER_ENV, "1").await?;
        let addr = line.parse().context("the bare broker's address")?;
        Ok(Self { addr, process })
    }

    pub fn target(&self) -> Target {
        Target::Tcp(self.addr)
    }

    /// The bench's fleet-ipc pub/sub peer, on this broker.
    pub fn fleet(&self) -> Fleet {
        Fleet {
            subscribe_to: vec![self.target()],
            publish_to: self.target(),
            pids: self.process.id().into_iter().collect(),
            publish_stream: false,
        }
    }
}

/// A bare relay to a bare broker, in a process of its own.
pub struct BareRelay {
    pub socket: PathBuf,
    _process: Child,
}

impl BareRelay {
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let (process, line) = start_child(RELAY_ENV, &upstream.to_string()).await?;
        Ok(Self {
            socket: PathBuf::from(line),
            _process: process,
        })
    }
}

/// The stream a subscriber reads.
type Outbox = mpsc::UnboundedSender<Result<Msg, Status>>;
type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Both bare servers: a broker, or with `upstream` a relay of SendMsg to one.
#[derive(Default)]
struct Bare {
    broker: Arc<Broker>,
    upstream: Option<IpcClient<tonic::transport::Channel>>,
}

#[derive(Default)]
struct Broker {
    /// Subscribers by channel.
    channels: Mutex<HashMap<String, Vec<Outbox>>>,
    /// Subscribers by id: where requests to that id go.
    responders: Mutex<HashMap<String, Outbox>>,
    /// Subscribers by `app:role`, with their ids: whom a Gather asks.
    roles: Mutex<HashMap<String, Vec<(String, Outbox)>>>,
    /// Requests waiting for their reply, by the number in their `reply_to`.
    waiting: Mutex<HashMap<u64, Waiter>>,
    next: AtomicU64,
}

/// Where a reply goes: the one SendMsg waiting for it, or the Gather that asked
/// (with the member's place in its ledger).
enum Waiter {
    One(oneshot::Sender<Msg>),
    Gather(mpsc::UnboundedSender<usize>, usize),
}

impl Broker {
    fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// A subscriber's stream, opened with the notice the clients wait for.
    fn open(&self, request: SubscribeRequest) -> UnboundedReceiverStream<Result<Msg, Status>> {
        let (outbox, stream) = mpsc::unbounded_channel();
        let _ = outbox.send(Ok(Msg {
            op: "ipc:subscribed".into(),
            ..Msg::default()
        }));
        if !request.role.is_empty() {
            let role = format!("{}:{}", request.app, request.role);
            let member = (request.id.clone(), outbox.clone());
            self.roles.lock().entry(role).or_default().push(member);
        }
        if !request.id.is_empty() {
            self.responders.lock().insert(request.id, outbox.clone());
        }
        let mut channels = self.channels.lock();
        for channel in request.channels {
            channels.entry(channel).or_default().push(outbox.clone());
        }
        UnboundedReceiverStream::new(stream)
    }

    fn deliver(&self, request: BroadcastRequest) -> BroadcastResponse {
        let msg = Msg {
            id: self.next().to_string(),
            channel: request.channel,
            op: request.op,
            data: request.data,
            headers: request.headers,
            ..Msg::default()
        };
        if let Some(subscribers) = self.channels.lock().get(&msg.channel) {
            for subscriber in subscribers {
                let _ = subscriber.send(Ok(msg.clone()));
            }
        }
        BroadcastResponse {
            id: msg.id,
            ..BroadcastResponse::default()
        }
    }

    fn settle(&self, reply: ReplyRequest) {
        let Ok(number) = reply.reply_to.parse::<u64>() else {
            return;
        };
        match self.waiting.lock().remove(&number) {
            Some(Waiter::One(waiter)) => {
                let _ = waiter.send(Msg {
                    op: reply.op,
                    data: reply.data,
                    headers: reply.headers,
                    error: reply.error,
                    ..Msg::default()
                });
            }
            Some(Waiter::Gather(answered, index)) => {
                let _ = answered.send(index);
            }
            None => {}
        }
    }

    /// Asks every subscriber of the target role at once and waits for all their
    /// replies (or the timeout): a ledger of who answered.
    async fn gather(&self, request: GatherRequest) -> Ledger {
        let members = self
            .roles
            .lock()
            .get(&request.target)
            .cloned()
            .unwrap_or_default();
        let (answered, mut answers) = mpsc::unbounded_channel();
        for (index, (_, outbox)) in members.iter().enumerate() {
            let number = self.next();
            self.waiting
                .lock()
                .insert(number, Waiter::Gather(answered.clone(), index));
            let _ = outbox.send(Ok(Msg {
                channel: request.target.clone(),
                op: request.op.clone(),
                data: request.data.clone(),
                headers: request.headers.clone(),
                reply_to: number.to_string(),
                ..Msg::default()
            }));
        }
        let mut ok = vec![false; members.len()];
        let mut left = members.len();
        let wait = Duration::from_millis(u64::from(request.timeout_ms.max(1)));
        let _ = tokio::time::timeout(wait, async {
            while left > 0 {
                let Some(index) = answers.recv().await else {
                    return;
                };
                if !std::mem::replace(&mut ok[index], true) {
                    left -= 1;
                }
            }
        })
        .await;
        let outcomes: Vec<Outcome> = members
            .into_iter()
            .zip(&ok)
            .map(|((member, _), &ok)| Outcome {
                member,
                status: if ok { Status_::Ok } else { Status_::NoReply } as i32,
                ..Outcome::default()
            })
            .collect();
        let answered = ok.iter().filter(|ok| **ok).count() as u32;
        Ledger {
            target: request.target,
            op: request.op,
            state: ledger::State::Done as i32,
            expected: outcomes.len() as u32,
            ok: answered,
            no_reply: outcomes.len() as u32 - answered,
            outcomes,
            ..Ledger::default()
        }
    }

    async fn ask(&self, request: SendMsgRequest) -> Result<Msg, Status> {
        if request.target.is_empty() {
            return Ok(Msg {
                op: "pong".into(),
                ..Msg::default()
            });
        }
        let responder = self.responders.lock().get(&request.target).cloned();
        let responder = responder.ok_or_else(|| Status::unavailable("no responders"))?;
        let number = self.next();
        let (waiter, reply) = oneshot::channel();
        self.waiting.lock().insert(number, Waiter::One(waiter));
        let sent = responder.send(Ok(Msg {
            channel: request.target,
            op: request.op,
            data: request.data,
            headers: request.headers,
            reply_to: number.to_string(),
            ..Msg::default()
        }));
        if sent.is_err() {
            self.waiting.lock().remove(&number);
            return Err(Status::unavailable("the responder left"));
        }
        match tokio::time::timeout(REPLY_WAIT, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(Status::unavailable("the responder left")),
            Err(_) => {
                self.waiting.lock().remove(&number);
                Err(Status::deadline_exceeded("no reply in time"))
            }
        }
    }
}

fn not_here<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not served by the bare broker"))
}

#[tonic::async_trait]
impl Ipc for Bare {
    async fn broadcast(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        Ok(Response::new(self.broker.deliver(request.into_inner())))
    }

    async fn send_msg(
        &self,
        request: Request<SendMsgRequest>,
    ) -> Result<Response<SendMsgResponse>, Status> {
        if let Some(upstream) = &self.upstream {
            return upstream.clone().send_msg(request.into_inner()).await;
        }
        let reply = self.broker.ask(request.into_inner()).await?;
        Ok(Response::new(SendMsgResponse { reply: Some(reply) }))
    }

    type SubscribeStream = Boxed<Msg>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Ok(Response::new(Box::pin(
            self.broker.open(request.into_inner()),
        )))
    }

    async fn reply(
        &self,
        request: Request<ReplyRequest>,
    ) -> Result<Response<ReplyResponse>, Status> {
        self.broker.settle(request.into_inner());
        Ok(Response::new(ReplyResponse {}))
    }

    async fn members(
        &self,
        _request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        not_here()
    }

    type PublishStream = Boxed<BroadcastResponse>;

    async fn publish(
        &self,
        request: Request<Streaming<BroadcastRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        // Each publish is delivered as it is read and answered in order.
        let broker = self.broker.clone();
        let answers = request
            .into_inner()
            .map(move |publish| publish.map(|publish| broker.deliver(publish)));
        Ok(Response::new(Box::pin(answers)))
    }

    async fn gather(&self, request: Request<GatherRequest>) -> Result<Response<Ledger>, Status> {
        Ok(Response::new(
            self.broker.gather(request.into_inner()).await,
        ))
    }

    type RolloutStream = Boxed<RolloutEvent>;

    async fn rollout(
        &self,
        _request: Request<RolloutRequest>,
    ) -> Result<Response<Self::RolloutStream>, Status> {
        not_here()
    }

    async fn lock(&self, _request: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        not_here()
    }

    async fn unlock(
        &self,
        _request: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        not_here()
    }

    async fn limit(
        &self,
        _request: Request<LimitRequest>,
    ) -> Result<Response<LimitResponse>, Status> {
        not_here()
    }

    type SendMsgsStream = Boxed<SendMsgsResponse>;

    async fn send_msgs(
        &self,
        _request: Request<Streaming<SendMsgsRequest>>,
    ) -> Result<Response<Self::SendMsgsStream>, Status> {
        not_here()
    }

    type ServeStream = Boxed<Msg>;

    async fn serve(
        &self,
        request: Request<Streaming<ServeRequest>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        let mut incoming = request.into_inner();
        let Some(serve_request::Kind::Subscribe(subscribe)) =
            incoming.message().await?.and_then(|first| first.kind)
        else {
            return Err(Status::invalid_argument("Serve opens with a subscribe"));
        };
        let stream = self.broker.open(subscribe);
        // Replies arrive on the same stream, answered as they are read.
        let broker = self.broker.clone();
        tokio::spawn(async move {
            while let Ok(Some(next)) = incoming.message().await {
                if let Some(serve_request::Kind::Reply(reply)) = next.kind {
                    broker.settle(reply);
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
