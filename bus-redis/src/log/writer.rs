//! The writer: pending appends drained into pipelines (`SET epoch NX`, `GET
//! epoch`, an `XADD` or a keyed script each, `WAIT` with --redis-min-replicas),
//! several in flight, stored in the order they were queued.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt as _;
use ipc_core::bus::BusError;
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{EntryId, FIELD, bad_reply, parse_epoch, push_epoch};
use crate::dedup::{self, Keyed, Written};
use crate::keys::Keys;
use crate::link::Dedicated;

/// Most appends in one pipeline.
const MAX_BATCH: usize = 1024;
/// Most pipelines of appends waiting for Redis at once.
const MAX_IN_FLIGHT: usize = 4;
/// Most payload bytes in one pipeline (messages may be up to a few MiB each).
const MAX_BATCH_BYTES: usize = 8 << 20;

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
