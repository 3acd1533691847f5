//! The writer: pending appends drained into pipelines (`SET epoch NX`, `GET
//! epoch`, an `XADD` or a keyed script each, `WAIT` with --redis-min-replicas),
//! one at a time, stored in the order they were queued.

use std::sync::atomic::Ordering;

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
/// Most payload bytes in one pipeline (messages may be up to a few MiB each).
const MAX_BATCH_BYTES: usize = 8 << 20;

/// An append waiting for its `XADD` (or, with a key, its script).
pub(crate) struct Append {
    pub payload: Vec<u8>,
    pub keyed: Option<Keyed>,
    pub done: oneshot::Sender<Result<Written, BusError>>,
}

/// Drains pending appends into pipelines, in arrival order: `SET epoch NX`,
/// `GET epoch`, then one `XADD` per message. Each append learns its entry id (its
/// cursor) or the failure; nothing is acknowledged that Redis did not answer.
///
/// One pipeline at a time: what queues meanwhile goes in the next one, so a busy
/// writer sends fewer, larger pipelines. Several in flight stored a Publish stream's
/// messages out of order (about 1 run in 10 of
/// `a_publish_stream_is_stored_in_order_and_read_in_order_on_every_replica`): a
/// pipeline reaches redis-rs's connection only when its future gets that far, which
/// tokio's cooperative budget can put off after a later pipeline's, and redis-rs
/// gives no way to know a pipeline is on the connection before its answer comes.
pub(crate) async fn run_writer(
    writer: Dedicated,
    keys: Keys,
    retention: usize,
    mut pending: mpsc::Receiver<Append>,
    cancel: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            next = pending.recv() => match next {
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
