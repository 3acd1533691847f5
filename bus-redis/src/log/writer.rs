//! The writer: pending appends drained into pipelines (`SET epoch NX`, `GET
//! epoch`, one `XADD` per run of plain appends and a script per keyed one, `WAIT`
//! with --redis-min-replicas), one at a time, stored in the order they were
//! queued.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipc_core::bus::{Appended, BusError};
use ipc_proto::pb::Msg;
use redis::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{BATCH, EntryId, Place, SLOTS, SharedOwnEntries, bad_reply, parse_epoch, push_epoch};
use crate::dedup::{self, Keyed, Written};
use crate::keys::Keys;
use crate::link::Dedicated;

/// Most appends in one pipeline.
const MAX_BATCH: usize = 1024;
/// Most payload bytes in one pipeline (messages may be up to a few MiB each).
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Most payload bytes in one entry, unless one message is larger: bounds what
/// the log holds per entry of `--retention` and what one tail read carries.
const MAX_ENTRY_BYTES: usize = 256 << 10;
/// Most messages in one entry: each needs a cursor of its own in it.
const MAX_ENTRY_MESSAGES: usize = SLOTS as usize;

/// An append waiting for its `XADD` (or, with a key, its script).
pub(crate) struct Append {
    /// The message (its cursor empty), answered back with its cursor once stored.
    /// In its `Arc` already, and the key boxed: an append is moved through the
    /// queue, the batch and the answer, and was ~400 bytes to copy each time.
    pub msg: Arc<Msg>,
    /// The message, length-delimited (how an entry holds it).
    pub payload: Vec<u8>,
    pub keyed: Option<Box<Keyed>>,
    pub done: oneshot::Sender<Result<Appended, BusError>>,
}

/// Drains pending appends into pipelines, in arrival order: `SET epoch NX`,
/// `GET epoch`, then one `XADD` per run of plain appends (an entry of up to
/// [`MAX_ENTRY_MESSAGES`] messages and [`MAX_ENTRY_BYTES`]) and one script per
/// keyed append. Each append learns its cursor (its entry and index) or the
/// failure; nothing is acknowledged that Redis did not answer.
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
    own: SharedOwnEntries,
    cancel: CancellationToken,
) {
    // Kept from one pipeline to the next: its room for MAX_BATCH appends was an
    // allocation per pipeline.
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = tokio::select! {
            () = cancel.cancelled() => return,
            next = pending.recv() => match next {
                Some(append) => append,
                None => return,
            },
        };
        let mut bytes = first.payload.len();
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
            Ok(stored) => answer(batch.drain(..), stored, &own),
            Err(error) => {
                for append in batch.drain(..) {
                    let _ = append.done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// What a pipeline stored: each append's outcome, in order, and the entries of
/// plain appends.
struct Stored {
    written: Vec<Written>,
    entries: Vec<OwnSpan>,
}

/// An entry of plain appends: `len` appends of the batch from `start`.
struct OwnSpan {
    entry: EntryId,
    epoch: u64,
    start: usize,
    len: usize,
}

/// Answers each append of a stored batch with its message (its cursor set), after
/// remembering the entries' messages for this replica's tail.
fn answer(batch: impl ExactSizeIterator<Item = Append>, stored: Stored, own: &SharedOwnEntries) {
    let mut answers = Vec::with_capacity(batch.len());
    let mut messages = Vec::with_capacity(batch.len());
    let mut payloads = Vec::with_capacity(batch.len());
    for (append, written) in batch.zip(stored.written) {
        let Append {
            mut msg,
            payload,
            done,
            ..
        } = append;
        let appended = match written {
            Written::Stored(cursor) => {
                // The writer holds the only reference: no copy.
                Arc::make_mut(&mut msg).cursor = cursor.text();
                messages.push(Some(msg.clone()));
                Appended::Stored(msg)
            }
            Written::Duplicate {
                id,
                channel,
                cursor,
            } => {
                messages.push(None);
                Appended::Duplicate {
                    id,
                    channel,
                    cursor,
                }
            }
        };
        payloads.push(payload);
        answers.push((done, appended));
    }
    {
        let mut own = own.lock();
        for span in stored.entries {
            let range = span.start..span.start + span.len;
            let entry_payloads = payloads[range.clone()]
                .iter_mut()
                .map(std::mem::take)
                .collect();
            let entry_messages = messages[range]
                .iter_mut()
                .filter_map(Option::take)
                .collect();
            own.remember(span.entry, span.epoch, entry_payloads, entry_messages);
        }
    }
    for (done, appended) in answers {
        let _ = done.send(Ok(appended));
    }
}

/// Consecutive plain appends stored as one entry, or one keyed append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Entry { messages: usize },
    Keyed,
}

/// The appends of `batch` in groups, in order.
fn groups(batch: &[Append]) -> Vec<Group> {
    let mut groups = Vec::new();
    let mut open: Option<(usize, usize)> = None; // (messages, bytes) of the entry being filled
    for append in batch {
        if append.keyed.is_some() {
            if let Some((messages, _)) = open.take() {
                groups.push(Group::Entry { messages });
            }
            groups.push(Group::Keyed);
            continue;
        }
        let size = append.payload.len();
        open = match open {
            Some((messages, bytes))
                if messages < MAX_ENTRY_MESSAGES && bytes + size <= MAX_ENTRY_BYTES =>
            {
                Some((messages + 1, bytes + size))
            }
            Some((messages, _)) => {
                groups.push(Group::Entry { messages });
                Some((1, size))
            }
            None => Some((1, size)),
        };
    }
    if let Some((messages, _)) = open {
        groups.push(Group::Entry { messages });
    }
    groups
}

/// The payloads of an entry's appends as one argument, written straight into the
/// command.
struct Payloads<'a>(&'a [Append]);

impl redis::ToRedisArgs for Payloads<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + redis::RedisWrite,
    {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        for append in self.0 {
            // Writing into the command's own buffer does not fail.
            let _ = arg.write_all(&append.payload);
        }
    }
}

async fn write_batch(
    writer: &Dedicated,
    keys: &Keys,
    retention: usize,
    batch: &[Append],
) -> Result<Stored, BusError> {
    let replication = writer.link().replication();
    let groups = groups(batch);
    let mut pipe = redis::pipe();
    push_epoch(&mut pipe, keys);
    let mut rest = batch;
    for group in &groups {
        match *group {
            Group::Keyed => {
                let (append, after) = rest.split_first().expect("groups cover the batch");
                let keyed = append.keyed.as_ref().expect("a keyed group");
                dedup::push(&mut pipe, keys, retention, &append.payload, keyed);
                rest = after;
            }
            Group::Entry { messages } => {
                let (entry, after) = rest.split_at(messages);
                pipe.cmd("XADD")
                    .arg(&keys.log)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(retention)
                    .arg("*")
                    .arg(BATCH)
                    .arg(Payloads(entry));
                rest = after;
            }
        }
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
    if replies.len() != groups.len() {
        return Err(bad_reply("XADD"));
    }
    let mut written = Vec::with_capacity(batch.len());
    let mut entries = Vec::new();
    for (reply, group) in replies.zip(groups) {
        match group {
            Group::Keyed => written.push(dedup::parse(&reply, epoch)?),
            Group::Entry { messages } => {
                let entry = match reply {
                    Value::BulkString(id) => EntryId::parse(&id),
                    Value::SimpleString(id) => EntryId::parse(id.as_bytes()),
                    _ => None,
                }
                .ok_or_else(|| bad_reply("XADD"))?;
                entries.push(OwnSpan {
                    entry,
                    epoch,
                    start: written.len(),
                    len: messages,
                });
                written.extend(
                    (0..messages as u64)
                        .map(|index| Written::Stored(Place { entry, index }.cursor(epoch))),
                );
            }
        }
    }
    Ok(Stored { written, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(bytes: usize, keyed: bool) -> Append {
        Append {
            msg: Arc::default(),
            payload: vec![0; bytes],
            keyed: keyed.then(|| {
                Box::new(Keyed {
                    scoped: "app:k".into(),
                    window_ms: 1,
                    msg_id: "m".into(),
                    channel: "c".into(),
                })
            }),
            done: oneshot::channel().0,
        }
    }

    #[test]
    fn plain_appends_share_an_entry_and_keyed_ones_keep_their_place() {
        let batch = [
            append(10, false),
            append(10, false),
            append(10, true),
            append(10, false),
        ];
        assert_eq!(
            groups(&batch),
            [
                Group::Entry { messages: 2 },
                Group::Keyed,
                Group::Entry { messages: 1 },
            ]
        );
    }

    #[test]
    fn an_entry_is_bounded_in_messages_and_bytes() {
        let many: Vec<Append> = (0..MAX_ENTRY_MESSAGES + 1)
            .map(|_| append(1, false))
            .collect();
        assert_eq!(
            groups(&many),
            [
                Group::Entry {
                    messages: MAX_ENTRY_MESSAGES
                },
                Group::Entry { messages: 1 },
            ]
        );
        let big = [
            append(MAX_ENTRY_BYTES / 2, false),
            append(MAX_ENTRY_BYTES / 2, false),
            append(1, false),
            append(MAX_ENTRY_BYTES * 2, false),
        ];
        assert_eq!(
            groups(&big),
            [
                Group::Entry { messages: 2 },
                Group::Entry { messages: 1 },
                Group::Entry { messages: 1 },
            ]
        );
    }
}
