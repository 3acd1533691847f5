//! The log: a Redis Stream of encoded messages, its epoch, the batching writer,
//! the tail that feeds the hub, and replay for resuming subscribers.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;

use ipc_core::bus::{BusError, Replay};
use ipc_core::cursor::Cursor;
use ipc_core::hub::Hub;
use ipc_core::notice::Gap;
use ipc_proto::pb::Msg;
use prost::Message as _;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dedup::{self, Keyed, Written};
use crate::keys::Keys;
use crate::link::{Dedicated, Link, Part, Replication, reconnect_backoff};
use crate::metrics::RedisMetrics;

/// The stream field holding the encoded message.
pub(crate) const FIELD: &str = "m";
/// Most appends in one pipeline.
const MAX_BATCH: usize = 1024;
/// Most pipelines of appends waiting for Redis at once.
const MAX_IN_FLIGHT: usize = 4;
/// Most payload bytes in one pipeline (messages may be up to a few MiB each).
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Entries read per tail or replay round trip.
const PAGE: usize = 1000;
/// How long one `XREAD` blocks; after an idle block the tail checks the stream
/// did not go backwards.
const TAIL_BLOCK: Duration = Duration::from_secs(2);

/// A stream entry id, `MS-SEQ`: ordered like the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub(crate) struct EntryId {
    pub ms: u64,
    pub seq: u64,
}

impl EntryId {
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };

    pub fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let (ms, seq) = text.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    pub fn cursor(self, epoch: u64) -> Cursor {
        Cursor {
            epoch,
            hi: self.ms,
            lo: self.seq,
        }
    }

    pub fn of_cursor(cursor: &Cursor) -> Self {
        Self {
            ms: cursor.hi,
            seq: cursor.lo,
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A fresh random epoch, as stored (hex, never zero).
fn epoch_candidate() -> String {
    format!("{:x}", rand::random::<u64>().max(1))
}

fn parse_epoch(value: &Value) -> Option<u64> {
    match value {
        Value::BulkString(bytes) => u64::from_str_radix(std::str::from_utf8(bytes).ok()?, 16).ok(),
        Value::SimpleString(text) => u64::from_str_radix(text, 16).ok(),
        _ => None,
    }
}

/// Adds `SET epoch NX` (ignored) and `GET epoch` to `pipe`: the first user of a
/// log (or of a log Redis lost) draws its epoch; the `GET` reply is the epoch in
/// force, whoever drew it.
fn push_epoch(pipe: &mut redis::Pipeline, keys: &Keys) {
    pipe.cmd("SET")
        .arg(&keys.epoch)
        .arg(epoch_candidate())
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(&keys.epoch);
}

fn bad_reply(what: &str) -> BusError {
    BusError::Internal(format!("unexpected Redis reply to {what}"))
}

/// Entries of an `XRANGE`/`XREVRANGE` reply (or of one stream in `XREAD`).
fn parse_entries(value: Value) -> Vec<(EntryId, Option<Vec<u8>>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            continue;
        };
        if parts.len() != 2 {
            continue;
        }
        let fields = parts.pop().unwrap_or_default();
        let Some(id) = (match parts.pop() {
            Some(Value::BulkString(id)) => EntryId::parse(&id),
            Some(Value::SimpleString(id)) => EntryId::parse(id.as_bytes()),
            _ => None,
        }) else {
            continue;
        };
        entries.push((id, field_value(fields)));
    }
    entries
}

/// The payload field of an entry's field list.
fn field_value(fields: Value) -> Option<Vec<u8>> {
    let pairs: Vec<(Value, Value)> = match fields {
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    pairs.into_iter().find_map(|(k, v)| match (k, v) {
        (Value::BulkString(k), Value::BulkString(v)) if k == FIELD.as_bytes() => Some(v),
        _ => None,
    })
}

/// Entries of an `XREAD` reply for one stream (RESP2 array or RESP3 map).
fn parse_xread(value: Value) -> Vec<(EntryId, Option<Vec<u8>>)> {
    let streams: Vec<Value> = match value {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    streams.into_iter().flat_map(parse_entries).collect()
}

/// The message of an entry, with its cursor; `None` (logged) if it is not ours.
fn decode(epoch: u64, id: EntryId, payload: Option<Vec<u8>>) -> Option<Arc<Msg>> {
    let decoded = payload.as_deref().map(Msg::decode);
    match decoded {
        Some(Ok(mut msg)) => {
            msg.cursor = id.cursor(epoch).to_string();
            Some(Arc::new(msg))
        }
        _ => {
            tracing::warn!(entry = %id, "skipping a log entry that is not an encoded message");
            None
        }
    }
}

// ---------------------------------------------------------------------------------
// Writer

/// An append waiting for its `XADD` (or, with a key, its script).
pub(crate) struct Append {
    pub payload: Vec<u8>,
    pub keyed: Option<Keyed>,
    pub done: oneshot::Sender<Result<Written, BusError>>,
}

/// Drains pending appends into pipelines, in arrival order: `SET epoch NX`,
/// `GET epoch`, then one `XADD` per message. Up to [`MAX_IN_FLIGHT`] pipelines are
/// on the wire at once, so Redis is kept busy while answers travel back. Each
/// append learns its entry id (its cursor) or the failure; nothing is acknowledged
/// that Redis did not answer.
///
/// Pipelines go out on one connection in the order their appends were queued, so
/// appends are stored in queue order even when several pipelines are in flight (a
/// Publish stream queues its next messages before the first is confirmed).
pub(crate) async fn run_writer(
    writer: Dedicated,
    keys: Keys,
    retention: usize,
    mut pending: mpsc::Receiver<Append>,
    cancel: CancellationToken,
) {
    let (writer, keys) = (Arc::new(writer), Arc::new(keys));
    let mut in_flight = futures::stream::FuturesUnordered::new();
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
            next = pending.recv(), if in_flight.len() < MAX_IN_FLIGHT => match next {
                Some(append) => append,
                None => return,
            },
        };
        let mut bytes = first.payload.len();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.push(first);
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match pending.try_recv() {
                Ok(append) => {
                    bytes += append.payload.len();
                    batch.push(append);
                }
                Err(_) => break,
            }
        }
        let (writer, keys) = (writer.clone(), keys.clone());
        in_flight.push(async move {
            match write_batch(&writer, &keys, retention, &batch).await {
                Ok(written) => {
                    for (append, written) in batch.into_iter().zip(written) {
                        let _ = append.done.send(Ok(written));
                    }
                }
                Err(error) => {
                    for append in batch {
                        let _ = append.done.send(Err(error.clone()));
                    }
                }
            }
        });
        // Put it on the wire now: Redis must get pipelines in the order their appends
        // came (a Publish stream has several in flight), and a pipeline is sent when
        // first polled.
        while let std::task::Poll::Ready(Some(())) = futures::poll!(in_flight.next()) {}
    }
}

async fn write_batch(
    writer: &Dedicated,
    keys: &Keys,
    retention: usize,
    batch: &[Append],
) -> Result<Vec<Written>, BusError> {
    let replication = writer.link().replication();
    let mut pipe = redis::pipe();
    push_epoch(&mut pipe, keys);
    for append in batch {
        if let Some(keyed) = &append.keyed {
            dedup::push(&mut pipe, keys, retention, &append.payload, keyed);
            continue;
        }
        pipe.cmd("XADD")
            .arg(&keys.log)
            .arg("MAXLEN")
            .arg("~")
            .arg(retention)
            .arg("*")
            .arg(FIELD)
            .arg(&append.payload);
    }
    if replication.min_replicas > 0 {
        // Last in the pipeline: it answers once the replicas have every entry above.
        pipe.add_command(replication.wait());
    }
    let metrics = writer.link().metrics();
    metrics.append_batch.observe(batch.len() as u64);
    let started = std::time::Instant::now();
    let mut replies: Vec<Value> = writer
        .call(|mut conn| async move { pipe.query_async(&mut conn).await })
        .await
        .inspect_err(|_| {
            metrics.append_failures.fetch_add(1, Ordering::Relaxed);
        })?;
    metrics.xadd_latency.observe_duration(started.elapsed());
    if replication.min_replicas > 0 {
        match replies.pop() {
            Some(Value::Int(confirmed)) => replication.check(confirmed).inspect_err(|_| {
                metrics.append_failures.fetch_add(1, Ordering::Relaxed);
            })?,
            _ => return Err(bad_reply("WAIT")),
        }
    }
    let mut replies = replies.into_iter();
    let epoch = replies
        .next()
        .as_ref()
        .and_then(parse_epoch)
        .ok_or_else(|| bad_reply("GET epoch"))?;
    let written: Vec<Written> = replies
        .zip(batch)
        .map(|(reply, append)| {
            if append.keyed.is_some() {
                return dedup::parse(&reply, epoch);
            }
            match reply {
                Value::BulkString(id) => EntryId::parse(&id),
                Value::SimpleString(id) => EntryId::parse(id.as_bytes()),
                _ => None,
            }
            .map(|id| Written::Stored(id.cursor(epoch)))
            .ok_or_else(|| bad_reply("XADD"))
        })
        .collect::<Result<_, _>>()?;
    if written.len() != batch.len() {
        return Err(bad_reply("XADD"));
    }
    Ok(written)
}

// ---------------------------------------------------------------------------------
// Tail

/// Where a tail is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub epoch: u64,
    pub last: EntryId,
}

/// The epoch in force and the stream's last entry id: where a new tail starts.
pub(crate) async fn current_position(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> Result<Position, BusError> {
    let mut pipe = redis::pipe();
    push_epoch(&mut pipe, keys);
    pipe.cmd("XREVRANGE")
        .arg(&keys.log)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
    let (epoch, last): (Value, Value) = pipe
        .query_async(conn)
        .await
        .map_err(|e| crate::link::unavailable(&e))?;
    Ok(Position {
        epoch: parse_epoch(&epoch).ok_or_else(|| bad_reply("GET epoch"))?,
        last: parse_entries(last)
            .first()
            .map_or(EntryId::ZERO, |(id, _)| *id),
    })
}

/// Where the tail is, shared with the bus for `head`. Updated *before* a batch is
/// dispatched: a subscriber registered before `head` was read gets, live, every
/// entry after the position it read.
pub(crate) type SharedPosition = Arc<parking_lot::Mutex<Option<Position>>>;

/// Follows the log from `position` (or from its end when `None`) on a dedicated
/// connection, dispatching every entry to the hub in stream order; reconnects with
/// backoff and continues from the last entry it dispatched. `probe` is the command
/// link, told to check itself when the tail's connection breaks.
pub(crate) async fn run_tail(
    probe: Arc<Link>,
    keys: Keys,
    hub: Arc<Hub>,
    position: SharedPosition,
    timeout: Duration,
    cancel: CancellationToken,
) {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(TAIL_BLOCK + timeout));
    let health = probe.health().clone();
    let mut backoff = reconnect_backoff();
    let mut ever_connected = false;
    let mut reported = Vec::new();
    loop {
        let tried = probe.endpoint().generation();
        let connected = tokio::select! {
            () = cancel.cancelled() => return,
            c = probe.open(&config) => c,
        };
        let error = match connected {
            Ok((mut conn, primary)) => {
                if std::mem::replace(&mut ever_connected, true) {
                    probe
                        .metrics()
                        .tail_reconnects
                        .fetch_add(1, Ordering::Relaxed);
                }
                backoff.reset();
                health.set(Part::Tail, true);
                let tailing = Tailing {
                    keys: &keys,
                    hub: &hub,
                    shared: &position,
                    metrics: probe.metrics(),
                    replication: probe.replication(),
                    reported: &mut reported,
                };
                tokio::select! {
                    e = tail_connection(&mut conn, tailing, &cancel) => e,
                    () = probe.endpoint().moved(primary) => {
                        BusError::Unavailable("the Redis primary moved".into())
                    }
                }
            }
            Err(e) => crate::link::unavailable(&e),
        };
        health.set(Part::Tail, false);
        probe.probe();
        if cancel.is_cancelled() {
            return;
        }
        tracing::debug!(%error, "log tail interrupted; reconnecting");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff.next_pause()) => {}
            () = probe.endpoint().changed_from(tried) => {}
        }
    }
}

/// What a tail needs besides its connection.
struct Tailing<'a> {
    keys: &'a Keys,
    hub: &'a Hub,
    shared: &'a SharedPosition,
    metrics: &'a RedisMetrics,
    replication: Replication,
    /// Last surviving entries of losses this replica reported itself, so that the
    /// mark another replica left for the same loss is not reported twice.
    reported: &'a mut Vec<EntryId>,
}

/// Tails on one connection until it fails; returns the failure.
async fn tail_connection(
    conn: &mut MultiplexedConnection,
    mut tailing: Tailing<'_>,
    cancel: &CancellationToken,
) -> BusError {
    let Tailing {
        keys,
        hub,
        shared,
        metrics,
        replication,
        ..
    } = tailing;
    let set = |p: Position| *shared.lock() = Some(p);
    // A new connection may reach a new primary (a failover) that lacks the newest
    // entries this replica saw: say so before going on.
    let known = *shared.lock();
    if let Some(known) = known {
        match survivor(conn, keys, known).await {
            Ok(Some(survived)) => rewound(conn, &mut tailing, known, survived).await,
            Ok(None) => {}
            Err(e) => return e,
        }
    }
    loop {
        let known = *shared.lock();
        let Position { epoch, last } = match known {
            Some(p) => p,
            None => match current_position(conn, keys).await {
                Ok(p) => {
                    set(p);
                    p
                }
                Err(e) => return e,
            },
        };
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&keys.epoch);
        pipe.cmd("XREAD")
            .arg("COUNT")
            .arg(PAGE)
            .arg("BLOCK")
            .arg(TAIL_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys.log)
            .arg(last.to_string());
        let reply = tokio::select! {
            () = cancel.cancelled() => return BusError::Unavailable("stopped".into()),
            r = pipe.query_async::<(Value, Value)>(conn) => r,
        };
        let (epoch_now, read) = match reply {
            Ok(reply) => reply,
            Err(e) => return crate::link::unavailable(&e),
        };
        let epoch_now = match parse_epoch(&epoch_now) {
            Some(e) => e,
            // The epoch key is gone: Redis lost its data. Draw the new epoch now.
            None => match current_position(conn, keys).await {
                Ok(p) => p.epoch,
                Err(e) => return e,
            },
        };
        if epoch_now != epoch {
            let reason = format!(
                "the log was lost (Redis lost its data, epoch {epoch:x} → {epoch_now:x}); \
                 messages not yet delivered when it happened are gone"
            );
            tracing::warn!(%reason, "following the new log from its start");
            set(Position {
                epoch: epoch_now,
                last: EntryId::ZERO,
            });
            metrics.log_losses.fetch_add(1, Ordering::Relaxed);
            notify_gap(hub, Gap::new(Some(last.cursor(epoch)), reason));
            continue;
        }
        let entries = parse_xread(read);
        let Some((batch_last, _)) = entries.last() else {
            // Idle: make sure the stream did not go backwards under us (a failover
            // to a primary that lacks what we saw, or a restore from an older copy);
            // otherwise XREAD would skip new entries.
            let here = Position { epoch, last };
            match survivor(conn, keys, here).await {
                Ok(Some(survived)) => rewound(conn, &mut tailing, here, survived).await,
                Ok(None) => {}
                Err(e) => return e,
            }
            continue;
        };
        let batch_last = *batch_last;
        if replication.min_replicas > 0 {
            // Deliver only what a failover cannot take back: a write of ours after
            // the batch, then WAIT, covers every entry before it.
            match confirm(conn, keys, hub.node(), replication, batch_last).await {
                Ok(true) => {}
                // Not on enough replicas yet: read the same entries again.
                Ok(false) => continue,
                Err(e) => return e,
            }
        }
        set(Position {
            epoch,
            last: batch_last,
        });
        let lag = ipc_core::now_ms() - i64::try_from(batch_last.ms).unwrap_or(i64::MAX);
        metrics.tail_lag_ms.store(lag, Ordering::Relaxed);
        for (id, payload) in entries {
            let Some(msg) = decode(epoch, id, payload) else {
                continue;
            };
            match loss_mark(&msg) {
                Some((survived, gap)) => {
                    if !tailing.reported.contains(&survived) {
                        notify_gap(hub, gap);
                    }
                }
                None => {
                    hub.dispatch(&msg);
                }
            }
        }
    }
}

/// Sends `gap` to every subscriber of this replica.
fn notify_gap(hub: &Hub, gap: Gap) {
    let id = format!("{}-gap-{:x}", hub.node(), rand::random::<u64>());
    let reached = hub.notify_all(&Arc::new(gap.to_msg(id, hub.node())));
    hub.metrics()
        .gaps
        .fetch_add(reached as u64, Ordering::Relaxed);
}

/// `None` when the log still holds `known.last` (or is another epoch: the tail's
/// epoch check handles that); else the last entry before it that survived
/// (`ZERO` when none did).
async fn survivor(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    known: Position,
) -> Result<Option<EntryId>, BusError> {
    if known.last == EntryId::ZERO {
        return Ok(None);
    }
    let last = known.last.to_string();
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(&keys.epoch);
    pipe.cmd("XRANGE").arg(&keys.log).arg(&last).arg(&last);
    pipe.cmd("XREVRANGE")
        .arg(&keys.log)
        .arg(&last)
        .arg("-")
        .arg("COUNT")
        .arg(1);
    pipe.cmd("XREVRANGE")
        .arg(&keys.log)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
    let (epoch, exact, before, newest): (Value, Value, Value, Value) = pipe
        .query_async(conn)
        .await
        .map_err(|e| crate::link::unavailable(&e))?;
    if parse_epoch(&epoch) != Some(known.epoch) || !parse_entries(exact).is_empty() {
        return Ok(None);
    }
    let first_id = |v: Value| parse_entries(v).first().map(|(id, _)| *id);
    match (first_id(before), first_id(newest)) {
        // Entries around ours are there but ours is not: taken back.
        (Some(survived), _) => Ok(Some(survived)),
        // Nothing up to ours, and the log ends before it: taken back entirely.
        (None, newest) if newest.is_none_or(|n| n < known.last) => Ok(Some(EntryId::ZERO)),
        // Only newer entries: retention trimmed ours, nothing went backwards.
        (None, _) => Ok(None),
    }
}

/// The log lost the entries after `survived` up to `known.last` (a failover to a
/// primary that had not received them): tell this replica's subscribers, leave a
/// mark in the log for the other replicas and for later replays, and go on from
/// `survived` so that nothing the new primary appends is skipped.
async fn rewound(
    conn: &mut MultiplexedConnection,
    tailing: &mut Tailing<'_>,
    known: Position,
    survived: EntryId,
) {
    let reason = format!(
        "a Redis failover lost the log's entries after {survived} up to {} (the new \
         primary had not received them; without --redis-min-replicas replication is \
         asynchronous): messages after the cursor may be missing, and those received \
         after it are no longer in the log",
        known.last
    );
    tracing::warn!(%reason, "the Redis log went backwards");
    let gap = Gap::new(Some(survived.cursor(known.epoch)), reason);
    tailing.reported.push(survived);
    tailing.metrics.log_losses.fetch_add(1, Ordering::Relaxed);
    notify_gap(tailing.hub, gap.clone());
    *tailing.shared.lock() = Some(Position {
        epoch: known.epoch,
        last: survived,
    });
    // The mark: a message of op ipc:gap on no channel, which no subscriber matches;
    // tails and replays that pass it report the loss.
    let mark = gap.to_msg(
        format!("{}-loss-{:x}", tailing.hub.node(), rand::random::<u64>()),
        tailing.hub.node(),
    );
    let written = redis::cmd("XADD")
        .arg(&tailing.keys.log)
        .arg("*")
        .arg(FIELD)
        .arg(mark.encode_to_vec())
        .query_async::<Value>(conn)
        .await;
    if let Err(error) = written {
        tracing::warn!(%error, "could not leave the mark of a loss in the log");
    }
}

/// A loss mark's last surviving entry and its gap, if `msg` is one.
fn loss_mark(msg: &Msg) -> Option<(EntryId, Gap)> {
    if !msg.channel.is_empty() || msg.op != ipc_core::notice::GAP {
        return None;
    }
    let mut notice = msg.clone();
    notice.cursor.clear();
    let gap = Gap::from_msg(&notice)?;
    let survived = gap
        .cursor
        .parse::<Cursor>()
        .map(|c| EntryId::of_cursor(&c))
        .unwrap_or(EntryId::ZERO);
    Some((survived, gap))
}

/// Whether `min_replicas` Redis replicas hold every entry up to `last`: a small
/// write of this replica's after them (`P:tail:NODE`), then `WAIT`.
async fn confirm(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    node: &str,
    replication: Replication,
    last: EntryId,
) -> Result<bool, BusError> {
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(keys.tail_mark(node))
        .arg(last.to_string())
        .arg("PX")
        .arg(60_000)
        .ignore();
    pipe.add_command(replication.wait());
    let (confirmed,): (i64,) = pipe
        .query_async(conn)
        .await
        .map_err(|e| crate::link::unavailable(&e))?;
    Ok(confirmed >= i64::from(replication.min_replicas))
}

// ---------------------------------------------------------------------------------
// Replay

/// What `XINFO STREAM` tells about the log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct StreamInfo {
    length: u64,
    /// Entries ever added (Redis 7+): more than `length` means some were trimmed.
    entries_added: Option<u64>,
    last_generated: EntryId,
    first: Option<EntryId>,
}

fn parse_stream_info(value: Value) -> Option<StreamInfo> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        _ => return None,
    };
    let mut info = StreamInfo::default();
    for (key, value) in pairs {
        let key = match key {
            Value::BulkString(k) => String::from_utf8(k).ok()?,
            Value::SimpleString(k) => k,
            _ => continue,
        };
        match (key.as_str(), value) {
            ("length", Value::Int(n)) => info.length = n.max(0) as u64,
            ("entries-added", Value::Int(n)) => info.entries_added = Some(n.max(0) as u64),
            ("last-generated-id", Value::BulkString(id)) => {
                info.last_generated = EntryId::parse(&id)?;
            }
            ("last-generated-id", Value::SimpleString(id)) => {
                info.last_generated = EntryId::parse(id.as_bytes())?;
            }
            ("first-entry", entry @ Value::Array(_)) => {
                info.first = parse_entries(Value::Array(vec![entry]))
                    .first()
                    .map(|(id, _)| *id);
            }
            _ => {}
        }
    }
    Some(info)
}

/// Entries after `after` up to the current end of the log, or a gap when the
/// cursor's epoch is not the log's (Redis lost its data) or retention passed it.
pub(crate) async fn replay(link: &Link, keys: &Keys, after: &Cursor) -> Result<Replay, BusError> {
    let mut pipe = redis::pipe();
    // XINFO fails on a log never written to; that is an answer, not a failure.
    pipe.ignore_errors();
    push_epoch(&mut pipe, keys);
    pipe.cmd("XINFO").arg("STREAM").arg(&keys.log);
    let replies: Vec<redis::RedisResult<Value>> = link
        .call(|mut conn| async move { pipe.query_async(&mut conn).await })
        .await?;
    let mut replies = replies.into_iter();
    let epoch = replies
        .next()
        .and_then(Result::ok)
        .as_ref()
        .and_then(parse_epoch)
        .ok_or_else(|| bad_reply("GET epoch"))?;
    let info = replies
        .next()
        .and_then(Result::ok)
        .and_then(parse_stream_info)
        .unwrap_or_default();
    let cursor = EntryId::of_cursor(after);

    if after.epoch != epoch {
        let messages = match info.length {
            0 => Vec::new(),
            _ => read_range(link, keys, epoch, None, info.last_generated).await?,
        };
        let messages = without_marks(messages).messages;
        return Ok(Replay {
            messages,
            gap: Some(
                "the log the cursor belongs to is gone (Redis lost its data); \
                 these are all messages of the new log"
                    .into(),
            ),
        });
    }
    if cursor > info.last_generated {
        return Ok(Replay {
            messages: Vec::new(),
            gap: Some(format!(
                "the cursor is past the end of the log (last entry {}): Redis lost recent messages",
                info.last_generated
            )),
        });
    }
    let Some(first) = info.first else {
        return Ok(Replay::default());
    };
    let trimmed = info.entries_added.is_none_or(|added| added > info.length);
    if cursor < first && trimmed {
        let kept = without_marks(read_range(link, keys, epoch, None, info.last_generated).await?);
        return Ok(Replay {
            messages: kept.messages,
            gap: Some(format!(
                "messages after the cursor were dropped by retention (oldest kept is {first}); \
                 these are all messages kept"
            )),
        });
    }
    let messages = read_range(link, keys, epoch, Some(cursor), info.last_generated).await?;
    Ok(without_marks(messages))
}

/// `messages` without the marks of losses among them; the first mark's gap, when
/// there is one, is the replay's: the stream crosses a loss.
fn without_marks(messages: Vec<Arc<Msg>>) -> Replay {
    let mut gap = None;
    let messages = messages
        .into_iter()
        .filter(|msg| match loss_mark(msg) {
            Some((_, mark)) => {
                gap.get_or_insert(mark.reason);
                false
            }
            None => true,
        })
        .collect();
    Replay { messages, gap }
}

/// Messages with ids in `(after, to]` (from the start when `after` is `None`),
/// a page per round trip.
async fn read_range(
    link: &Link,
    keys: &Keys,
    epoch: u64,
    mut after: Option<EntryId>,
    to: EntryId,
) -> Result<Vec<Arc<Msg>>, BusError> {
    let mut messages = Vec::new();
    loop {
        let start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
        let log = keys.log.clone();
        let to_text = to.to_string();
        let page: Value = link
            .call(|mut conn| async move {
                redis::cmd("XRANGE")
                    .arg(log)
                    .arg(start)
                    .arg(to_text)
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let entries = parse_entries(page);
        let full = entries.len() == PAGE;
        for (id, payload) in entries {
            after = Some(id);
            messages.extend(decode(epoch, id, payload));
        }
        if !full || after >= Some(to) {
            return Ok(messages);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fields: Vec<(&str, &[u8])>) -> Value {
        let flat = fields
            .into_iter()
            .flat_map(|(k, v)| [Value::BulkString(k.into()), Value::BulkString(v.to_vec())])
            .collect();
        Value::Array(vec![Value::BulkString(id.into()), Value::Array(flat)])
    }

    #[test]
    fn entry_ids_order_like_the_stream_and_round_trip() {
        let a = EntryId::parse(b"1700000000000-0").unwrap();
        let b = EntryId::parse(b"1700000000000-12").unwrap();
        let c = EntryId::parse(b"1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-12");
        assert_eq!(EntryId::of_cursor(&b.cursor(7)), b);
        for bad in [&b""[..], b"12", b"a-1", b"1-", b"-1", b"1-2-3"] {
            assert_eq!(EntryId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parses_range_and_read_replies() {
        let msg = Msg {
            op: "x".into(),
            ..Msg::default()
        };
        let payload = msg.encode_to_vec();
        let range = Value::Array(vec![
            entry("5-0", vec![(FIELD, &payload)]),
            entry("5-1", vec![("other", b"zz")]),
            Value::Nil,
        ]);
        let entries = parse_entries(range.clone());
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].1.as_deref(), Some(&payload[..]));
        assert_eq!(entries[1].1, None);

        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"p:log".to_vec()),
            range.clone(),
        ])]);
        assert_eq!(parse_xread(resp2).len(), 2);
        let resp3 = Value::Map(vec![(Value::BulkString(b"p:log".to_vec()), range)]);
        assert_eq!(parse_xread(resp3).len(), 2);
        assert!(parse_xread(Value::Nil).is_empty());

        let decoded = decode(0xab, entries[0].0, entries[0].1.clone()).unwrap();
        assert_eq!(decoded.op, "x");
        assert_eq!(decoded.cursor, "ab.5-0");
        assert!(decode(0xab, entries[1].0, None).is_none());
        assert!(decode(0xab, entries[1].0, Some(vec![0xff, 0xff])).is_none());
    }

    #[test]
    fn parses_stream_info() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            bulk("length"),
            Value::Int(100),
            bulk("last-generated-id"),
            bulk("9-3"),
            bulk("entries-added"),
            Value::Int(300),
            bulk("first-entry"),
            entry("7-1", vec![(FIELD, b"x")]),
            bulk("last-entry"),
            entry("9-3", vec![(FIELD, b"y")]),
        ]);
        let info = parse_stream_info(reply).unwrap();
        assert_eq!(
            info,
            StreamInfo {
                length: 100,
                entries_added: Some(300),
                last_generated: EntryId { ms: 9, seq: 3 },
                first: Some(EntryId { ms: 7, seq: 1 }),
            }
        );
        assert_eq!(parse_stream_info(Value::Nil), None);
    }

    #[test]
    fn epochs_are_hex() {
        assert_eq!(
            parse_epoch(&Value::BulkString(b"3f2a".to_vec())),
            Some(0x3f2a)
        );
        assert_eq!(parse_epoch(&Value::Nil), None);
        assert_eq!(parse_epoch(&Value::BulkString(b"zz".to_vec())), None);
        let candidate = epoch_candidate();
        assert!(u64::from_str_radix(&candidate, 16).unwrap() > 0);
    }
}
