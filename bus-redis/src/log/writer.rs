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

use super::{
    BATCH, EntryId, Expected, SLOTS, SharedOwnEntries, bad_reply, parse_epoch, push_epoch,
};
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
        let groups = groups(&batch);
        let pipe = pipeline(&writer, &keys, retention, &batch, &groups);
        // Registered before the pipeline is sent: the tail may read an entry before
        // its `XADD` reply comes back here.
        let (sent, entries) = expect(batch.drain(..), &groups, &own);
        match send(&writer, pipe, &groups, sent.len()).await {
            Ok((epoch, placed)) => answer(sent, entries, epoch, placed),
            Err(error) => {
                for entry in entries {
                    entry.failed();
                }
                for append in sent {
                    let _ = append.done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// An append on its way to Redis: a keyed one holds its message, a plain one's
/// is in its entry's [`Expected`].
struct Sent {
    done: oneshot::Sender<Result<Appended, BusError>>,
    keyed: Option<Arc<Msg>>,
}

/// Each entry of `batch` (in `groups`) registered for the tail, with its
/// payloads and messages; what is left of each append.
fn expect(
    mut batch: impl ExactSizeIterator<Item = Append>,
    groups: &[Group],
    own: &SharedOwnEntries,
) -> (Vec<Sent>, Vec<Expected>) {
    let mut sent = Vec::with_capacity(batch.len());
    let mut entries = Vec::new();
    for group in groups {
        match *group {
            Group::Keyed => {
                let append = batch.next().expect("groups cover the batch");
                sent.push(Sent {
                    done: append.done,
                    keyed: Some(append.msg),
                });
            }
            Group::Entry { messages } => {
                let mut payloads = Vec::with_capacity(messages);
                let mut held = Vec::with_capacity(messages);
                for append in batch.by_ref().take(messages) {
                    payloads.push(append.payload);
                    held.push(append.msg);
                    sent.push(Sent {
                        done: append.done,
                        keyed: None,
                    });
                }
                entries.push(own.lock().expect(payloads, held));
            }
        }
    }
    (sent, entries)
}

/// What a group's reply said.
enum Placed {
    Entry(EntryId),
    Keyed(Written),
}

/// Answers each append of a stored batch with its message (its cursor set); an
/// entry's messages come from its [`Expected`], settled for the tail first.
fn answer(sent: Vec<Sent>, entries: Vec<Expected>, epoch: u64, placed: Vec<Placed>) {
    let mut sent = sent.into_iter();
    let mut entries = entries.into_iter();
    for group in placed {
        match group {
            Placed::Entry(id) => {
                let entry = entries.next().expect("an entry per plain group");
                // `zip` asks `sent` only for a message it has.
                for (msg, append) in entry.stored(id, epoch).into_iter().zip(sent.by_ref()) {
                    let _ = append.done.send(Ok(Appended::Stored(msg)));
                }
            }
            Placed::Keyed(written) => {
                let Some(Sent {
                    done,
                    keyed: Some(mut msg),
                }) = sent.next()
                else {
                    unreachable!("a keyed group answers a keyed append");
                };
                let appended = match written {
                    Written::Stored(cursor) => {
                        // The writer holds the only reference: no copy.
                        Arc::make_mut(&mut msg).cursor = cursor.text();
                        Appended::Stored(msg)
                    }
                    Written::Duplicate {
                        id,
                        channel,
                        cursor,
                    } => Appended::Duplicate {
                        id,
                        channel,
                        cursor,
                    },
                };
                let _ = done.send(Ok(appended));
            }
        }
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

/// The pipeline of `batch`: `SET epoch NX`, `GET epoch`, a command per group,
/// `WAIT` with --redis-min-replicas.
fn pipeline(
    writer: &Dedicated,
    keys: &Keys,
    retention: usize,
    batch: &[Append],
    groups: &[Group],
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    push_epoch(&mut pipe, keys);
    let mut rest = batch;
    for group in groups {
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
    let replication = writer.link().replication();
    if replication.min_replicas > 0 {
        // Last in the pipeline: it answers once the replicas have every entry above.
        pipe.add_command(replication.wait());
    }
    pipe
}

/// Sends the pipeline of a batch of `appends` in `groups`: the epoch, and each
/// group's outcome in order.
async fn send(
    writer: &Dedicated,
    pipe: redis::Pipeline,
    groups: &[Group],
    appends: usize,
) -> Result<(u64, Vec<Placed>), BusError> {
    let replication = writer.link().replication();
    let metrics = writer.link().metrics();
    metrics.append_batch.observe(appends as u64);
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
    let mut placed = Vec::with_capacity(groups.len());
    for (reply, group) in replies.zip(groups) {
        placed.push(match group {
            Group::Keyed => Placed::Keyed(dedup::parse(&reply, epoch)?),
            Group::Entry { .. } => Placed::Entry(
                match reply {
                    Value::BulkString(id) => EntryId::parse(&id),
                    Value::SimpleString(id) => EntryId::parse(id.as_bytes()),
                    _ => None,
                }
                .ok_or_else(|| bad_reply("XADD"))?,
            ),
        });
    }
    Ok((epoch, placed))
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
