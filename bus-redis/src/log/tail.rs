//! The tail: the log followed on a dedicated connection and dispatched to the node
//! in stream order, reconnecting and continuing from the last entry dispatched;
//! a log that went backwards (a failover lost entries) reported as `ipc:gap`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipc_core::bus::BusError;
use ipc_core::cursor::Cursor;
use ipc_core::local::Local;
use ipc_core::notice::Gap;
use ipc_proto::pb::Msg;
use prost::Message as _;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;

use super::{
    BATCH, Body, EntryId, PAGE, Place, SharedOwnEntries, bad_reply, channel_of, decode_where,
    parse_entries, parse_epoch, parse_xread, push_epoch, push_newest_from,
};
use crate::keys::Keys;
use crate::link::{Link, Part, Replication, reconnect_backoff};
use crate::metrics::RedisMetrics;

/// How long one `XREAD` blocks; after an idle block the tail checks the stream
/// did not go backwards.
const TAIL_BLOCK: Duration = Duration::from_secs(2);

/// Where a tail is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub epoch: u64,
    /// The last message dispatched (of the last entry read).
    pub last: Place,
}

/// The epoch in force and the stream's last message: where a new tail starts.
pub(crate) async fn current_position(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
) -> Result<Position, BusError> {
    let mut pipe = redis::pipe();
    push_epoch(&mut pipe, keys);
    push_newest_from(&mut pipe, keys, "+");
    let (epoch, last): (Value, Value) = pipe
        .query_async(conn)
        .await
        .map_err(|e| crate::link::unavailable(&e))?;
    Ok(Position {
        epoch: parse_epoch(&epoch).ok_or_else(|| bad_reply("GET epoch"))?,
        last: parse_entries(last)
            .first()
            .map_or(Place::ZERO, Place::last_of),
    })
}

/// Where the tail is, shared with the bus for `head`. Updated *before* a batch is
/// dispatched: a subscriber registered before `head` was read gets, live, every
/// entry after the position it read.
pub(crate) type SharedPosition = Arc<parking_lot::Mutex<Option<Position>>>;

/// Follows the log from `position` (or from its end when `None`) on a dedicated
/// connection, dispatching every entry to the node in stream order; reconnects with
/// backoff and continues from the last entry it dispatched. `probe` is the command
/// link, told to check itself when the tail's connection breaks.
pub(crate) async fn run_tail(
    probe: Arc<Link>,
    keys: Keys,
    local: Local,
    position: SharedPosition,
    own: SharedOwnEntries,
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
                    local: &local,
                    shared: &position,
                    own: &own,
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
    local: &'a Local,
    shared: &'a SharedPosition,
    /// What this replica wrote: handed on without a decode.
    own: &'a SharedOwnEntries,
    metrics: &'a RedisMetrics,
    replication: Replication,
    /// Last surviving entries of losses this replica reported itself, so that the
    /// mark another replica left for the same loss is not reported twice.
    reported: &'a mut Vec<Place>,
}

/// Tails on one connection until it fails; returns the failure.
async fn tail_connection(
    conn: &mut MultiplexedConnection,
    mut tailing: Tailing<'_>,
    cancel: &CancellationToken,
) -> BusError {
    let Tailing {
        keys,
        local,
        shared,
        own,
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
            .arg(last.entry.to_string());
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
                last: Place::ZERO,
            });
            metrics.log_losses.fetch_add(1, Ordering::Relaxed);
            local.gap(Gap::new(Some(last.cursor(epoch)), reason));
            continue;
        }
        let entries = parse_xread(read);
        let Some(batch_last) = entries.last().map(Place::last_of) else {
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
        if replication.min_replicas > 0 {
            // Deliver only what a failover cannot take back: a write of ours after
            // the batch, then WAIT, covers every entry before it.
            match confirm(conn, keys, local.node_name(), replication, batch_last.entry).await {
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
        let lag = ipc_core::now_ms() - i64::try_from(batch_last.entry.ms).unwrap_or(i64::MAX);
        metrics.tail_lag_ms.store(lag, Ordering::Relaxed);
        // An entry at a time: a read may carry many messages, and decoded they
        // take more memory than in the reply.
        let mut messages = Vec::new();
        for (id, body) in entries {
            let written = match &body {
                Body::Batch(bytes) => own.lock().take(epoch, id, bytes),
                _ => None,
            };
            match written {
                Some(written) => messages.extend(written),
                // Only what a local subscriber may want (a decode was most of
                // a replica's cost per message it then dropped). Asked after
                // `set` above, as a dispatch would be: a subscriber registering
                // after a "no" reads a head at or past this entry (or replays
                // it, with a cursor), so it is owed none of it.
                None => decode_where(
                    epoch,
                    id,
                    &body,
                    |_, m| worth_decoding(local, m),
                    &mut messages,
                ),
            }
            drop(body);
            for msg in messages.drain(..) {
                match loss_mark(&msg) {
                    Some((survived, gap)) => {
                        if !tailing.reported.contains(&survived) {
                            local.gap(gap);
                        }
                    }
                    None => {
                        local.dispatch(&msg);
                    }
                }
            }
        }
    }
}

/// Whether the tail must decode `encoded`: a local subscriber wants its channel,
/// or it has none (a loss mark is on no channel), or only a decode can tell.
fn worth_decoding(local: &Local, encoded: &[u8]) -> bool {
    match channel_of(encoded) {
        Some("") | None => true,
        Some(channel) => local.wants(channel),
    }
}

/// `None` when the log still holds `known.last`'s entry (or is another epoch: the
/// tail's epoch check handles that); else the last message before it that
/// survived (`ZERO` when none did).
async fn survivor(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    known: Position,
) -> Result<Option<Place>, BusError> {
    if known.last == Place::ZERO {
        return Ok(None);
    }
    let last = known.last.entry.to_string();
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(&keys.epoch);
    pipe.cmd("XRANGE").arg(&keys.log).arg(&last).arg(&last);
    push_newest_from(&mut pipe, keys, &last);
    push_newest_from(&mut pipe, keys, "+");
    let (epoch, exact, before, newest): (Value, Value, Value, Value) = pipe
        .query_async(conn)
        .await
        .map_err(|e| crate::link::unavailable(&e))?;
    if parse_epoch(&epoch) != Some(known.epoch) || !parse_entries(exact).is_empty() {
        return Ok(None);
    }
    let first = |v: Value| parse_entries(v).first().map(Place::last_of);
    match (first(before), first(newest)) {
        // Entries around ours are there but ours is not: taken back.
        (Some(survived), _) => Ok(Some(survived)),
        // Nothing up to ours, and the log ends before it: taken back entirely.
        (None, newest) if newest.is_none_or(|n| n.entry < known.last.entry) => {
            Ok(Some(Place::ZERO))
        }
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
    survived: Place,
) {
    let reason = format!(
        "a Redis failover lost the log's entries after {} up to {} (the new \
         primary had not received them; without --redis-min-replicas replication is \
         asynchronous): messages after the cursor may be missing, and those received \
         after it are no longer in the log",
        survived.entry, known.last.entry
    );
    tracing::warn!(%reason, "the Redis log went backwards");
    let gap = Gap::new(Some(survived.cursor(known.epoch)), reason);
    tailing.reported.push(survived);
    tailing.metrics.log_losses.fetch_add(1, Ordering::Relaxed);
    tailing.local.gap(gap.clone());
    *tailing.shared.lock() = Some(Position {
        epoch: known.epoch,
        last: survived,
    });
    // The mark: a message of op ipc:gap on no channel, which no subscriber matches;
    // tails and replays that pass it report the loss.
    let mark = gap.to_msg(
        format!(
            "{}-loss-{:x}",
            tailing.local.node_name(),
            rand::random::<u64>()
        ),
        tailing.local.node_name(),
    );
    let written = redis::cmd("XADD")
        .arg(&tailing.keys.log)
        .arg("*")
        .arg(BATCH)
        .arg(mark.encode_length_delimited_to_vec())
        .query_async::<Value>(conn)
        .await;
    if let Err(error) = written {
        tracing::warn!(%error, "could not leave the mark of a loss in the log");
    }
}

/// A loss mark's last surviving message and its gap, if `msg` is one.
pub(super) fn loss_mark(msg: &Msg) -> Option<(Place, Gap)> {
    if !msg.channel.is_empty() || msg.op != ipc_core::notice::GAP {
        return None;
    }
    let mut notice = msg.clone();
    notice.cursor.clear();
    let gap = Gap::from_msg(&notice)?;
    let survived = gap
        .cursor
        .parse::<Cursor>()
        .map(|c| Place::of_cursor(&c))
        .unwrap_or(Place::ZERO);
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
