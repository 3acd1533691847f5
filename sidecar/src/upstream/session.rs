//! Keeping the pod's subscription to the control plane: connecting (addresses in
//! turn, with backoff), learning the token's grants, opening the stream after the
//! last handled cursor and switching to a new one when the union changes, handling
//! what arrives in log order (`ipc:gap` included), and fetching what the ring lacks
//! when a local subscriber resumes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipc_core::bus::Replay;
use ipc_core::channel::Pattern;
use ipc_core::cursor::Cursor;
use ipc_core::notice::{self, Gap, Subscribed};
use ipc_proto::backoff::{Attempts, Backoff};
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{Member, Msg, SubscribeRequest};
use std::time::Duration;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::calls::{Link, describe};
use super::{Inner, UpstreamConfig, replies};
use crate::grants::PodGrants;
use crate::ring::is_at_or_before;

/// A stream being read, and what its head means.
pub(super) struct Active {
    pub(super) stream: Streaming<Msg>,
    pub(super) union: Vec<Pattern>,
    /// The local members the stream relays to the control plane's Members.
    pub(super) relayed: Vec<Member>,
    /// Messages of the head still to come.
    pub(super) head_left: usize,
    /// The union acknowledged when the stream was opened: head entries of these
    /// patterns are delivered.
    pub(super) acked_at_open: Vec<Pattern>,
    /// The cursor the stream resumed after.
    pub(super) resumed_from: Option<Cursor>,
    /// Where the upstream stands after the head.
    pub(super) position: Option<Cursor>,
    pub(super) acknowledged: bool,
    /// Local subscribers were already told of a loss on this stream.
    pub(super) gap_notified: bool,
}

/// What `ipc:subscribed` of an upstream stream said.
struct Opened {
    stream: Streaming<Msg>,
    replayed: usize,
    position: Option<Cursor>,
    /// Where replies go, on a Serve stream.
    replies: Option<tokio::sync::mpsc::Sender<ipc_proto::pb::ServeRequest>>,
}

/// Why an upstream stream could not be opened.
pub(super) enum OpenError {
    /// The control plane answered with this refusal.
    Refused(Status),
    /// It could not be asked or did not answer as it should (unreachable, timed
    /// out, ended early, a first message other than `ipc:subscribed`).
    Failed(String),
}

impl From<OpenError> for String {
    fn from(error: OpenError) -> String {
        match error {
            OpenError::Refused(status) => describe("subscribe", &status),
            OpenError::Failed(reason) => reason,
        }
    }
}

/// How a session with one replica ended.
struct SessionEnd {
    acknowledged: bool,
    error: Option<String>,
}

impl Inner {
    pub(super) async fn run(self: Arc<Self>) {
        let mut wanted = self.wanted.subscribe();
        let mut backoff = reconnect_backoff(&self.config);
        let mut index = 0usize;
        loop {
            let address = self.config.addresses[index % self.config.addresses.len()].clone();
            let attempt = async {
                match self.connect(&address).await {
                    Ok(link) => self.session(link, &mut wanted).await,
                    Err(error) => SessionEnd {
                        acknowledged: false,
                        error: Some(error),
                    },
                }
            };
            // Stopping does not wait for a connection attempt or a subscribe to time out.
            let end = tokio::select! {
                () = self.stop.cancelled() => SessionEnd { acknowledged: false, error: None },
                end = attempt => end,
            };
            self.link.send_replace(None);
            self.serve_replies.set(None);
            self.health.send_replace(false);
            if self.stop.is_cancelled() {
                return;
            }
            let Some(error) = end.error else { return };
            let error = format!("{address}: {error}");
            // Once per distinct failure, not at every attempt of a long outage.
            if end.acknowledged || *self.last_error.lock() != error {
                tracing::warn!(%error, "upstream unavailable; reconnecting");
            } else {
                tracing::debug!(%error, "upstream still unavailable");
            }
            *self.last_error.lock() = error;
            if end.acknowledged {
                backoff.reset();
            }
            index = index.wrapping_add(1);
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_pause()) => {}
            }
        }
    }

    /// Keeps the subscription on one replica until it breaks or the sidecar stops.
    async fn session(
        self: &Arc<Self>,
        link: Link,
        wanted: &mut watch::Receiver<u64>,
    ) -> SessionEnd {
        wanted.borrow_and_update();
        let mut client = link.client.clone();
        // Learn what the token may do before asking for anything it could be refused.
        let grants = PodGrants::fetch(
            &mut client,
            self.request(PodGrants::request(), "", Some(self.config.call_timeout)),
            self.config.call_timeout,
        )
        .await;
        *self.grants.write() = grants.map(Arc::new);
        let mut active = match self.open_subscription(&mut client, self.union()).await {
            Ok(active) => active,
            Err(error) => {
                return SessionEnd {
                    acknowledged: false,
                    error: Some(error),
                };
            }
        };
        self.link.send_replace(Some(link.clone()));
        self.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(upstream = %link.address, id = %self.config.identity.id, "subscribed upstream");
        let mut acknowledged = false;
        loop {
            if active.head_left == 0 && !active.acknowledged {
                self.acknowledge(&mut active);
                acknowledged = true;
            }
            tokio::select! {
                () = self.stop.cancelled() => return SessionEnd { acknowledged, error: None },
                item = active.stream.message() => match item {
                    Ok(Some(msg)) => self.handle(&mut active, msg),
                    Ok(None) => return SessionEnd {
                        acknowledged,
                        error: Some("the control plane ended the stream".into()),
                    },
                    Err(status) => return SessionEnd {
                        acknowledged,
                        error: Some(describe("subscription", &status)),
                    },
                },
                changed = wanted.changed() => {
                    if changed.is_err() {
                        return SessionEnd { acknowledged, error: None };
                    }
                    let union = self.union();
                    if union == active.union && self.relayed() == active.relayed {
                        continue;
                    }
                    match self.switch(&mut client, active, union).await {
                        Ok(next) => active = next,
                        Err(error) => return SessionEnd { acknowledged, error: Some(error) },
                    }
                }
            }
        }
    }

    /// Opens a stream for `union` after the last handled cursor.
    async fn open_subscription(
        &self,
        client: &mut IpcClient<Channel>,
        union: Vec<Pattern>,
    ) -> Result<Active, String> {
        let resumed_from = self.ring.lock().last;
        let acked_at_open = self.acked.borrow().as_ref().clone();
        let identity = &self.config.identity;
        let relayed = self.relayed();
        // The pod itself takes requests for its role only when a hook can answer
        // them; otherwise it is a watcher of its role, and requests for a role reach
        // it only through a local responder of that role (relayed below), while
        // there is one.
        let request = SubscribeRequest {
            channels: union.iter().map(|p| p.as_str().to_string()).collect(),
            id: identity.id.clone(),
            app: identity.app.clone(),
            role: identity.role.clone().unwrap_or_default(),
            tag: identity.tag.clone().unwrap_or_default(),
            role_watcher: !self.hooks.any(),
            labels: identity.labels.clone(),
            cursor: resumed_from.map(|c| c.to_string()).unwrap_or_default(),
            members: relayed.clone(),
        };
        let opened = self.open(client, request, true).await?;
        self.serve_replies.set(opened.replies);
        Ok(Active {
            stream: opened.stream,
            union,
            relayed,
            head_left: opened.replayed,
            acked_at_open,
            resumed_from,
            position: opened.position,
            acknowledged: false,
            gap_notified: false,
        })
    }

    /// Subscribes and reads `ipc:subscribed`: on a Serve stream (replies go back
    /// on it) when `serve`, else on a Subscribe stream.
    async fn open(
        &self,
        client: &mut IpcClient<Channel>,
        request: SubscribeRequest,
        serve: bool,
    ) -> Result<Opened, OpenError> {
        let mut replies = None;
        let opening = async {
            let opened = if serve {
                let (sender, outgoing) = replies::open_serve(request);
                replies = Some(sender);
                client.serve(self.request(outgoing, "", None)).await
            } else {
                client.subscribe(self.request(request, "", None)).await
            };
            let mut stream = opened.map_err(OpenError::Refused)?.into_inner();
            let hello = stream
                .message()
                .await
                .map_err(OpenError::Refused)?
                .ok_or_else(|| {
                    OpenError::Failed("the stream ended before ipc:subscribed".into())
                })?;
            let Some(subscribed) = Subscribed::from_msg(&hello) else {
                return Err(OpenError::Failed(format!(
                    "expected ipc:subscribed first, got op {:?}",
                    hello.op
                )));
            };
            Ok((
                stream,
                subscribed.replayed,
                subscribed.cursor.and_then(|c| c.parse().ok()),
            ))
        };
        let (stream, replayed, position) = tokio::time::timeout(self.config.call_timeout, opening)
            .await
            .map_err(|_| OpenError::Failed("subscribe timed out".into()))??;
        Ok(Opened {
            stream,
            replayed,
            position,
            replies,
        })
    }

    /// Replaces the stream with one for `union`, resuming after the last handled
    /// entry. Meanwhile the old stream is read for requests only: its entries after
    /// that cursor come again on the new stream.
    async fn switch(
        self: &Arc<Self>,
        client: &mut IpcClient<Channel>,
        old: Active,
        union: Vec<Pattern>,
    ) -> Result<Active, String> {
        tracing::debug!(channels = union.len(), "updating the upstream subscription");
        let mut old = Some(old.stream);
        let mut new_client = client.clone();
        let opening = self.open_subscription(&mut new_client, union);
        tokio::pin!(opening);
        let active = loop {
            tokio::select! {
                opened = &mut opening => break opened?,
                item = next_message(&mut old) => match item {
                    Ok(Some(msg)) if !msg.reply_to.is_empty() => self.spawn_request(msg),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => old = None,
                },
            }
        };
        // The control plane ends the old stream (replaced by the new subscription of
        // the same id) once it has sent what it held: requests among it are served.
        if let Some(mut stream) = old {
            let inner = self.clone();
            tokio::spawn(async move {
                let drain = async {
                    while let Ok(Some(msg)) = stream.message().await {
                        if !msg.reply_to.is_empty() {
                            inner.spawn_request(msg);
                        }
                    }
                };
                let _ = tokio::time::timeout(inner.config.call_timeout, drain).await;
            });
        }
        Ok(active)
    }

    fn handle(self: &Arc<Self>, active: &mut Active, msg: Msg) {
        if !msg.reply_to.is_empty() {
            self.spawn_request(msg);
            return;
        }
        let in_head = active.head_left > 0;
        if in_head {
            active.head_left -= 1;
        }
        if msg.cursor.is_empty() {
            match msg.op.as_str() {
                notice::GAP => {
                    let reason = Gap::from_msg(&msg)
                        .map(|gap| gap.reason)
                        .filter(|reason| !reason.is_empty())
                        .unwrap_or_else(|| "the control plane lost messages".into());
                    let last = {
                        let mut ring = self.ring.lock();
                        let last = ring.last;
                        ring.reset();
                        last
                    };
                    // Nothing carries over from the lost log: coverage starts anew.
                    active.resumed_from = None;
                    active.gap_notified = true;
                    self.upstream_gaps.fetch_add(1, Ordering::Relaxed);
                    self.notify_gap(last, &format!("upstream: {reason}"));
                }
                notice::SUBSCRIBED => {}
                ipc_core::grpc::service::REPLY_ERROR_OP => self.reply_not_delivered(&msg),
                _ => {
                    if let Some(local) = self.local() {
                        local.dispatch(&Arc::new(msg));
                    }
                }
            }
            return;
        }
        let Ok(cursor) = msg.cursor.parse::<Cursor>() else {
            tracing::warn!(cursor = %msg.cursor, "entry with a malformed cursor from upstream; delivered as is");
            if let Some(local) = self.local() {
                local.dispatch(&Arc::new(msg));
            }
            return;
        };
        if in_head {
            let wanted = active.acked_at_open.iter().any(|p| p.matches(&msg.channel))
                || self
                    .promised
                    .lock()
                    .values()
                    .any(|p| p.matches(&msg.channel));
            if !wanted {
                return;
            }
        }
        let msg = Arc::new(msg);
        {
            let mut ring = self.ring.lock();
            if ring
                .last
                .is_some_and(|last| is_at_or_before(&cursor, &last))
            {
                return;
            }
            ring.push(cursor, msg.clone());
        }
        // The hook is started (or queued, or skipped) before local subscribers can see
        // the message: whoever saw it can count on the hook's decision being made.
        if self.pod_channels.contains(&msg.channel) && self.hooks.has(&msg.op) {
            self.hooks.on_broadcast(msg.clone());
        }
        if let Some(local) = self.local() {
            local.dispatch(&msg);
        }
    }

    pub(super) fn notify_gap(&self, last: Option<Cursor>, reason: &str) {
        let Some(local) = self.local() else { return };
        let reached = local.gap(Gap::new(last, reason));
        tracing::warn!(reached, reason, "ipc:gap sent to local subscribers");
    }

    /// Reads what the control plane still has after `after` for `patterns`, on a
    /// short-lived stream of its own.
    pub(super) async fn fetch(
        self: &Arc<Self>,
        after: &Cursor,
        patterns: &[Pattern],
    ) -> Result<Replay, OpenError> {
        let link = self.link_or_unavailable().map_err(OpenError::Failed)?;
        let identity = &self.config.identity;
        let request = SubscribeRequest {
            channels: patterns.iter().map(|p| p.as_str().to_string()).collect(),
            id: format!("{}.replay-{:08x}", identity.id, rand::random::<u32>()),
            app: identity.app.clone(),
            labels: HashMap::from([("ipc-replay-for".to_string(), identity.id.clone())]),
            cursor: after.to_string(),
            ..SubscribeRequest::default()
        };
        let mut client = link.client.clone();
        let Opened {
            mut stream,
            replayed,
            ..
        } = self.open(&mut client, request, false).await?;
        let reading = async {
            let mut replay = Replay::default();
            let mut left = replayed;
            while left > 0 {
                let msg = stream
                    .message()
                    .await
                    .map_err(|status| describe("replay", &status))?
                    .ok_or("the replay stream ended early")?;
                if !msg.reply_to.is_empty() {
                    // Routed here because the patterns include role channels.
                    self.spawn_request(msg);
                    continue;
                }
                left -= 1;
                if let Some(gap) = Gap::from_msg(&msg) {
                    let reason = Some(gap.reason).filter(|r| !r.is_empty());
                    replay.gap = Some(format!(
                        "upstream: {}",
                        reason.as_deref().unwrap_or("messages were lost")
                    ));
                } else {
                    replay.messages.push(Arc::new(msg));
                }
            }
            Ok::<_, String>(replay)
        };
        tokio::time::timeout(self.config.call_timeout, reading)
            .await
            .map_err(|_| "reading the replay timed out".to_string())
            .and_then(|read| read)
            .map_err(OpenError::Failed)
    }
}

async fn next_message(stream: &mut Option<Streaming<Msg>>) -> Result<Option<Msg>, Status> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// The pauses between attempts to reach the control plane: 100 ms doubling up to
/// `reconnect_max` (never below 100 ms), equal jitter.
pub(super) fn reconnect_backoff(config: &UpstreamConfig) -> Attempts {
    let first = Duration::from_millis(100);
    Backoff::new(first, config.reconnect_max.max(first)).attempts()
}
