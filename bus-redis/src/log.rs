//! The log: a Redis Stream of encoded messages, its epoch, the batching writer,
//! the tail that feeds the node, and replay for resuming subscribers.
//!
//! # Entries and cursors
//! An entry holds the messages one writer round trip carried (field [`BATCH`]:
//! each message length-delimited, a varint length then the encoded `Msg`), so
//! Redis stores, and every replica's tail parses, one entry per round trip
//! instead of one per message: redis-rs spends ~1.4 k instructions on each value
//! of a reply, and an entry is five of them. Entries of one message (field
//! [`SINGLE`]), as versions before batched entries wrote them, are still read.
//!
//! A message's place is its entry and its index in it, and its cursor `MS-LO`
//! names both: `LO = SEQ × SLOTS + index`. Cursors therefore order like the
//! messages, and the end of an entry, `SEQ × SLOTS + SLOTS − 1`, is a cursor
//! too: "everything up to and including this entry".
//!
//! # Layout
//! - here: entry ids and cursors, the epoch, reading Redis' replies to stream
//!   commands, decoding entries.
//! - [`writer`]: appends batched into pipelines, in queue order.
//! - [`tail`]: following the log into the node, and losses from a failover
//!   reported as `ipc:gap` (with a mark in the log for the other replicas).
//! - [`replay`]: what a resuming subscriber missed, or the gap it cannot have.

use std::fmt;
use std::sync::Arc;

use ipc_core::bus::BusError;
use ipc_core::cursor::Cursor;
use ipc_core::grpc::decode::varint;
use ipc_proto::pb::Msg;
use prost::Message as _;
use redis::Value;

use crate::keys::Keys;

mod replay;
mod tail;
mod writer;

pub(crate) use replay::replay;
pub(crate) use tail::{SharedPosition, current_position, run_tail};
pub(crate) use writer::{Append, run_writer};

use std::collections::VecDeque;

/// The stream field of an entry of this version: its messages, each
/// length-delimited.
pub(crate) const BATCH: &str = "b";
/// The stream field of an entry holding one encoded message (earlier versions).
const SINGLE: &str = "m";
/// Cursor positions per entry, and the most messages an entry holds.
pub(crate) const SLOTS: u64 = 1024;
/// Entries read per tail or replay round trip.
const PAGE: usize = 1000;

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
}

/// A message's place in the log: its entry, and its index in the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub(crate) struct Place {
    pub entry: EntryId,
    pub index: u64,
}

impl Place {
    pub const ZERO: Place = Place {
        entry: EntryId::ZERO,
        index: 0,
    };

    /// The place of the last message of `entry` (its start when it holds none).
    pub fn last_of((id, body): &Entry) -> Self {
        Self {
            entry: *id,
            index: body.count().saturating_sub(1),
        }
    }

    pub fn cursor(self, epoch: u64) -> Cursor {
        debug_assert!(self.index < SLOTS);
        Cursor {
            epoch,
            hi: self.entry.ms,
            lo: self
                .entry
                .seq
                .saturating_mul(SLOTS)
                .saturating_add(self.index),
        }
    }

    /// The place a cursor names. A cursor of a version before batched entries
    /// (`LO` = the entry's sequence) reads as a place at or before its entry in
    /// the same millisecond: a resume from it repeats messages, never skips one.
    pub fn of_cursor(cursor: &Cursor) -> Self {
        Self {
            entry: EntryId {
                ms: cursor.hi,
                seq: cursor.lo / SLOTS,
            },
            index: cursor.lo % SLOTS,
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Most entries [`OwnEntries`] keeps for the tail: it takes them back within a
/// read or two; more only piles up while the tail is away, and is then decoded.
const MAX_OWN_ENTRIES: usize = 1024;

/// Entries this replica is writing or wrote, with their messages as the node
/// accepted them: its tail hands these on instead of decoding them again (a
/// message's decode was ~4.5 k of the accepting replica's ~25 k instructions per
/// message).
///
/// The writer registers an entry before its pipeline is sent, because the tail
/// often reads it before the writer has its id (about half the entries, when the
/// writer registered them only after the `XADD` reply, and those were decoded).
/// Whichever side learns the entry's id first sets the cursors, the other takes
/// the messages as they are (see [`Slot`]). In write order; the oldest are
/// dropped past [`MAX_OWN_ENTRIES`], or once the tail matched a newer one.
#[derive(Default)]
pub(crate) struct OwnEntries {
    pending: VecDeque<Arc<OwnEntry>>,
}

/// [`OwnEntries`] shared by the writer and the tail.
pub(crate) type SharedOwnEntries = Arc<parking_lot::Mutex<OwnEntries>>;

/// One entry being written, shared by the writer (until it settles it) and the
/// tail's queue.
pub(crate) struct OwnEntry(parking_lot::Mutex<Slot>);

enum Slot {
    /// Sent, its id unknown to both sides; the cursors are not set.
    Sent {
        /// Each message as written (length-delimited): what the entry must hold.
        payloads: Vec<Vec<u8>>,
        messages: Vec<Arc<Msg>>,
    },
    /// The writer has its id: the messages (cursors set) wait for the tail.
    Stored {
        id: EntryId,
        epoch: u64,
        payloads: Vec<Vec<u8>>,
        messages: Vec<Arc<Msg>>,
    },
    /// The tail read it under `id` (its bytes matched) and set the cursors; the
    /// writer takes the messages if its `XADD` answered the same id and epoch.
    Read {
        id: EntryId,
        epoch: u64,
        messages: Vec<Arc<Msg>>,
    },
    /// Settled: taken by both sides, or the write failed.
    Closed,
}

/// The writer's hold on an entry it registered: settled once, as stored or as
/// failed.
pub(crate) struct Expected(Arc<OwnEntry>);

impl OwnEntries {
    /// Registers an entry about to be sent: `payloads` as the entry will hold them,
    /// `messages` with their cursors empty.
    pub fn expect(&mut self, payloads: Vec<Vec<u8>>, messages: Vec<Arc<Msg>>) -> Expected {
        let entry = Arc::new(OwnEntry(parking_lot::Mutex::new(Slot::Sent {
            payloads,
            messages,
        })));
        self.pending.push_back(entry.clone());
        while self.pending.len() > MAX_OWN_ENTRIES {
            self.pending.pop_front();
        }
        Expected(entry)
    }

    /// The messages of entry `id` of the log of `epoch`, with their cursors, if
    /// this replica wrote it and `body` is what it wrote (after a failover a new
    /// primary may give the id of a lost entry to another); forgets the entries
    /// written before it.
    ///
    /// An entry whose id the writer does not know yet is matched by its bytes
    /// alone: what is taken is then byte for byte what a decode would give, and
    /// the writer checks the id when it learns its own.
    pub fn take(&mut self, epoch: u64, id: EntryId, body: &[u8]) -> Option<Vec<Arc<Msg>>> {
        // Settled, or passed by the tail: forgotten.
        while self
            .pending
            .front()
            .is_some_and(|entry| match &*entry.0.lock() {
                Slot::Closed => true,
                Slot::Stored {
                    id: stored,
                    epoch: stored_epoch,
                    ..
                } => *stored_epoch == epoch && *stored < id,
                Slot::Sent { .. } | Slot::Read { .. } => false,
            })
        {
            self.pending.pop_front();
        }
        let mut found = None;
        for (at, entry) in self.pending.iter().enumerate() {
            let mut slot = entry.0.lock();
            match &mut *slot {
                Slot::Stored {
                    id: stored,
                    epoch: stored_epoch,
                    ..
                } if *stored_epoch == epoch && *stored > id => break,
                Slot::Stored {
                    id: stored,
                    epoch: stored_epoch,
                    payloads,
                    messages,
                } if *stored == id && *stored_epoch == epoch => {
                    let taken = holds(payloads, body).then(|| std::mem::take(messages));
                    *slot = Slot::Closed;
                    found = Some((at, taken));
                    break;
                }
                Slot::Sent { payloads, messages } if holds(payloads, body) => {
                    let messages = std::mem::take(messages);
                    let placed = place(epoch, id, messages);
                    let taken = placed.clone();
                    *slot = Slot::Read {
                        id,
                        epoch,
                        messages: placed,
                    };
                    found = Some((at, Some(taken)));
                    break;
                }
                _ => {}
            }
        }
        let (at, taken) = found?;
        // Entries written before this one were passed (or lost): forget them.
        self.pending.drain(..=at);
        taken
    }
}

impl Expected {
    /// The entry was stored as `id` in the log of `epoch`: its messages with their
    /// cursors, one per append in order, for the writer's answers.
    pub fn stored(self, id: EntryId, epoch: u64) -> Vec<Arc<Msg>> {
        let mut slot = self.0.0.lock();
        match std::mem::replace(&mut *slot, Slot::Closed) {
            Slot::Sent { payloads, messages } => {
                let messages = place(epoch, id, messages);
                *slot = Slot::Stored {
                    id,
                    epoch,
                    payloads,
                    messages: messages.clone(),
                };
                messages
            }
            Slot::Read {
                id: read,
                epoch: read_epoch,
                messages,
            } if read == id && read_epoch == epoch => messages,
            // The tail took another entry of the same bytes for this one: it keeps
            // its cursors, the publishers get theirs.
            // (`place` copies each message the tail still holds.)
            Slot::Read { messages, .. } => place(epoch, id, messages),
            Slot::Stored { .. } | Slot::Closed => {
                unreachable!("only the writer settles its entry, once")
            }
        }
    }

    /// The write failed: the entry is never handed to the tail.
    pub fn failed(self) {
        *self.0.0.lock() = Slot::Closed;
    }
}

/// `messages`, the messages of entry `id` of the log of `epoch` in order, with
/// their cursors.
fn place(epoch: u64, id: EntryId, mut messages: Vec<Arc<Msg>>) -> Vec<Arc<Msg>> {
    for (index, msg) in (0..).zip(&mut messages) {
        // In place when the entry alone holds it (all but a mismatch), else a copy.
        Arc::make_mut(msg).cursor = Place { entry: id, index }.cursor(epoch).text();
    }
    messages
}

/// Whether `body` is the entry of `payloads` as written.
fn holds(payloads: &[Vec<u8>], body: &[u8]) -> bool {
    let mut rest = body;
    for payload in payloads {
        match rest.strip_prefix(payload.as_slice()) {
            Some(after) => rest = after,
            None => return false,
        }
    }
    rest.is_empty()
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

/// Adds `XREVRANGE log START - COUNT 1` to `pipe`: the newest entry at or before
/// `start` (`+`: the newest of the log).
fn push_newest_from(pipe: &mut redis::Pipeline, keys: &Keys, start: &str) {
    pipe.cmd("XREVRANGE")
        .arg(&keys.log)
        .arg(start)
        .arg("-")
        .arg("COUNT")
        .arg(1);
}

fn bad_reply(what: &str) -> BusError {
    BusError::Internal(format!("unexpected Redis reply to {what}"))
}

/// What an entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// Length-delimited messages ([`BATCH`]).
    Batch(Vec<u8>),
    /// One encoded message ([`SINGLE`]).
    Single(Vec<u8>),
    /// Not an entry of ours.
    Unknown,
}

impl Body {
    /// How many messages the entry holds (up to the first that is not whole).
    fn count(&self) -> u64 {
        match self {
            Body::Single(_) => 1,
            Body::Unknown => 0,
            Body::Batch(payload) => Framed::new(payload).count() as u64,
        }
    }
}

/// The messages of a [`Body::Batch`], each a varint length then its encoding, up
/// to [`SLOTS`] of them and up to the first whose length is torn: the one framing
/// rule of an entry, so that counting and decoding agree on its cursors.
struct Framed<'a> {
    rest: &'a [u8],
    taken: u64,
    /// Set when bytes were left that do not frame a message.
    torn: bool,
}

impl<'a> Framed<'a> {
    fn new(payload: &'a [u8]) -> Self {
        Self {
            rest: payload,
            taken: 0,
            torn: false,
        }
    }
}

impl<'a> Iterator for Framed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() || self.taken == SLOTS || self.torn {
            return None;
        }
        match varint(&mut self.rest) {
            Some(len) if len <= self.rest.len() as u64 => {
                let (encoded, after) = self.rest.split_at(len as usize);
                self.rest = after;
                self.taken += 1;
                Some(encoded)
            }
            _ => {
                self.torn = true;
                None
            }
        }
    }
}

/// One entry of a stream reply.
pub(crate) type Entry = (EntryId, Body);

/// Entries of an `XRANGE`/`XREVRANGE` reply (or of one stream in `XREAD`).
fn parse_entries(value: Value) -> Vec<Entry> {
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
        entries.push((id, body(fields)));
    }
    entries
}

/// A reply of keys and values as pairs: a RESP2 flat array or a RESP3 map.
fn pairs(value: Value) -> Option<Vec<(Value, Value)>> {
    match value {
        Value::Array(flat) => {
            let mut it = flat.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            Some(pairs)
        }
        Value::Map(pairs) => Some(pairs),
        _ => None,
    }
}

/// The body of an entry's field list.
fn body(fields: Value) -> Body {
    let Some(pairs) = pairs(fields) else {
        return Body::Unknown;
    };
    pairs
        .into_iter()
        .find_map(|(k, v)| match (k, v) {
            (Value::BulkString(k), Value::BulkString(v)) if k == BATCH.as_bytes() => {
                Some(Body::Batch(v))
            }
            (Value::BulkString(k), Value::BulkString(v)) if k == SINGLE.as_bytes() => {
                Some(Body::Single(v))
            }
            _ => None,
        })
        .unwrap_or(Body::Unknown)
}

/// Entries of an `XREAD` reply for one stream (RESP2 array or RESP3 map).
fn parse_xread(value: Value) -> Vec<Entry> {
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

/// Appends the messages of entry `id` with an index above `after` (all when
/// `None`) to `out`, with their cursors. What is not ours is logged and skipped:
/// see [`decode_where`].
fn decode(epoch: u64, id: EntryId, body: &Body, after: Option<u64>, out: &mut Vec<Arc<Msg>>) {
    decode_where(
        epoch,
        id,
        body,
        |index, _| after.is_none_or(|after| index > after),
        out,
    );
}

/// Appends the messages of entry `id` that `keep` selects (by index and
/// encoding, before they are decoded) to `out`, with their cursors. What is not
/// ours is logged and skipped: an entry that is not, a message that does not
/// decode (alone: its length still frames the next, so that whether a message
/// is decoded at all changes nothing for the others), the rest of a batch from
/// a torn length on (the framing [`Body::count`] counts by: [`Framed`]).
fn decode_where(
    epoch: u64,
    id: EntryId,
    body: &Body,
    mut keep: impl FnMut(u64, &[u8]) -> bool,
    out: &mut Vec<Arc<Msg>>,
) {
    let mut one = |index: u64, encoded: &[u8]| {
        if !keep(index, encoded) {
            return;
        }
        match Msg::decode(encoded) {
            Ok(mut msg) => {
                msg.cursor = Place { entry: id, index }.cursor(epoch).text();
                out.push(Arc::new(msg));
            }
            Err(_) => {
                tracing::warn!(entry = %id, index, "skipping a message of a log entry: not an encoded message")
            }
        }
    };
    match body {
        Body::Single(payload) => one(0, payload),
        Body::Batch(payload) => {
            let mut framed = Framed::new(payload);
            for (index, encoded) in (0..).zip(&mut framed) {
                one(index, encoded);
            }
            if framed.torn {
                let index = framed.taken;
                tracing::warn!(entry = %id, index, "skipping the rest of a log entry: a torn length");
            }
        }
        Body::Unknown => {
            tracing::warn!(entry = %id, "skipping a log entry that is not an encoded message");
        }
    }
}

/// The channel of an encoded `Msg` (field 5, its last occurrence, as a decode
/// keeps), read without decoding the message or allocating. `None` when the
/// bytes are not plainly a message (a torn field, a group, a channel of another
/// wire type or not UTF-8): a full decode judges those.
fn channel_of(mut encoded: &[u8]) -> Option<&str> {
    const CHANNEL: u64 = 5;
    let mut channel: &[u8] = &[];
    while !encoded.is_empty() {
        let key = varint(&mut encoded)?;
        if key > u64::from(u32::MAX) || key >> 3 == 0 {
            return None;
        }
        let len = match key & 7 {
            // A varint's value is not needed: its end is the first byte < 0x80.
            0 => encoded.iter().take(10).position(|b| *b < 0x80)? + 1,
            1 => 8,
            2 => usize::try_from(varint(&mut encoded)?).ok()?,
            5 => 4,
            _ => return None,
        };
        if len > encoded.len() || (key >> 3 == CHANNEL && key & 7 != 2) {
            return None;
        }
        let (field, rest) = encoded.split_at(len);
        if key >> 3 == CHANNEL {
            channel = field;
        }
        encoded = rest;
    }
    std::str::from_utf8(channel).ok()
}

/// The messages of one log entry as `XRANGE` returns it (its id and its field and
/// value pairs), each with its cursor; `epoch` is the log's. For tools that audit
/// the log straight from Redis, such as the soak test.
pub fn entry_messages(epoch: u64, id: &str, fields: Vec<(String, Vec<u8>)>) -> Vec<Arc<Msg>> {
    let Some(id) = EntryId::parse(id.as_bytes()) else {
        return Vec::new();
    };
    let flat = fields
        .into_iter()
        .flat_map(|(k, v)| [Value::BulkString(k.into_bytes()), Value::BulkString(v)])
        .collect();
    let mut out = Vec::new();
    decode(epoch, id, &body(Value::Array(flat)), None, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(super) fn entry(id: &str, fields: Vec<(&str, &[u8])>) -> Value {
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
        for bad in [&b""[..], b"12", b"a-1", b"1-", b"-1", b"1-2-3"] {
            assert_eq!(EntryId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_cursor_names_an_entry_and_an_index_and_orders_like_the_messages() {
        let a = EntryId { ms: 5, seq: 0 };
        let b = EntryId { ms: 5, seq: 1 };
        let c = EntryId { ms: 6, seq: 0 };
        let at = |entry, index| Place { entry, index };
        let places = [
            at(a, 0),
            at(a, 1),
            at(a, SLOTS - 1),
            at(b, 0),
            at(b, 7),
            at(c, 0),
        ];
        for place in places {
            assert_eq!(Place::of_cursor(&place.cursor(9)), place);
        }
        assert!(
            places
                .windows(2)
                .all(|w| w[0] < w[1] && w[0].cursor(9).position() < w[1].cursor(9).position())
        );
        assert_eq!(at(a, 2).cursor(0xab).text(), "ab.5-2");
        assert_eq!(at(b, 2).cursor(0xab).text(), format!("ab.5-{}", SLOTS + 2));
        // A cursor of an earlier version (`LO` = the entry's sequence) reads as a
        // place at or before its entry: a resume repeats, never skips.
        let old = Place::of_cursor(&Cursor {
            epoch: 9,
            hi: 5,
            lo: 3,
        });
        assert!(old.entry <= EntryId { ms: 5, seq: 3 });
    }

    #[test]
    fn the_last_place_of_an_entry_counts_its_messages() {
        let id = EntryId { ms: 5, seq: 1 };
        let last = |body| Place::last_of(&(id, body));
        assert_eq!(last(Body::Batch(delimited(&["x", "y", "z"]))).index, 2);
        assert_eq!(last(Body::Single(vec![1])).index, 0);
        assert_eq!(last(Body::Unknown).index, 0);
        let mut torn = delimited(&["x"]);
        torn.extend([0x05, 0xff]);
        assert_eq!(last(Body::Batch(torn)).index, 0);
    }

    fn delimited(ops: &[&str]) -> Vec<u8> {
        ops.iter()
            .flat_map(|op| {
                Msg {
                    op: (*op).into(),
                    ..Msg::default()
                }
                .encode_length_delimited_to_vec()
            })
            .collect()
    }

    fn decoded(epoch: u64, entry: &Entry, after: Option<u64>) -> Vec<(String, String)> {
        let mut out = Vec::new();
        decode(epoch, entry.0, &entry.1, after, &mut out);
        out.iter()
            .map(|m| (m.op.clone(), m.cursor.clone()))
            .collect()
    }

    #[test]
    fn parses_range_and_read_replies() {
        let batch = delimited(&["x", "y"]);
        let single = Msg {
            op: "old".into(),
            ..Msg::default()
        }
        .encode_to_vec();
        let range = Value::Array(vec![
            entry("5-0", vec![(BATCH, &batch)]),
            entry("5-1", vec![(SINGLE, &single)]),
            entry("5-2", vec![("other", b"zz")]),
            Value::Nil,
        ]);
        let entries = parse_entries(range.clone());
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].1, Body::Batch(batch));
        assert_eq!(entries[1].1, Body::Single(single));
        assert_eq!(entries[2].1, Body::Unknown);

        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"p:log".to_vec()),
            range.clone(),
        ])]);
        assert_eq!(parse_xread(resp2).len(), 3);
        let resp3 = Value::Map(vec![(Value::BulkString(b"p:log".to_vec()), range)]);
        assert_eq!(parse_xread(resp3).len(), 3);
        assert!(parse_xread(Value::Nil).is_empty());
    }

    #[test]
    fn an_entry_decodes_into_its_messages_each_with_its_cursor() {
        let id = EntryId { ms: 5, seq: 1 };
        let entry = (id, Body::Batch(delimited(&["x", "y", "z"])));
        let cursor = |index| Place { entry: id, index }.cursor(0xab).text();
        assert_eq!(
            decoded(0xab, &entry, None),
            [
                ("x".into(), cursor(0)),
                ("y".into(), cursor(1)),
                ("z".into(), cursor(2))
            ]
        );
        // A resume inside the entry gets the messages after its index.
        assert_eq!(decoded(0xab, &entry, Some(1)), [("z".into(), cursor(2))]);
        assert!(decoded(0xab, &entry, Some(SLOTS - 1)).is_empty());

        let single = Msg {
            op: "old".into(),
            ..Msg::default()
        }
        .encode_to_vec();
        let old = (id, Body::Single(single));
        assert_eq!(decoded(0xab, &old, None), [("old".into(), cursor(0))]);
        assert!(decoded(0xab, &old, Some(0)).is_empty());

        // What is not ours is skipped: a foreign entry, a batch from its first
        // bad message on.
        assert!(decoded(0xab, &(id, Body::Unknown), None).is_empty());
        assert!(decoded(0xab, &(id, Body::Single(vec![0xff, 0xff])), None).is_empty());
        let mut torn = delimited(&["x"]);
        torn.extend([0x05, 0xff]);
        assert_eq!(
            decoded(0xab, &(id, Body::Batch(torn)), None),
            [("x".into(), cursor(0))]
        );
    }

    #[test]
    fn a_message_that_does_not_decode_is_skipped_alone() {
        let id = EntryId { ms: 5, seq: 1 };
        let mut body = delimited(&["x"]);
        body.extend([2, 0xff, 0xff]);
        body.extend(delimited(&["z"]));
        let entry = (id, Body::Batch(body));
        let cursor = |index| Place { entry: id, index }.cursor(0xab).text();
        assert_eq!(Place::last_of(&entry).index, 2);
        assert_eq!(
            decoded(0xab, &entry, None),
            [("x".into(), cursor(0)), ("z".into(), cursor(2))]
        );
        // Left undecoded, a message changes nothing for the others.
        let mut out = Vec::new();
        decode_where(0xab, id, &entry.1, |index, _| index != 0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].op.as_str(), &out[0].cursor), ("z", &cursor(2)));
    }

    fn msg_on(channel: &str, op: &str) -> Msg {
        Msg {
            op: op.into(),
            channel: channel.into(),
            id: "n-1".into(),
            ts_ms: 1_700_000_000_000,
            headers: [("traceparent".to_string(), "00-x".to_string())].into(),
            data: Some(prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("body".into())),
            }),
            ..Msg::default()
        }
    }

    #[test]
    fn the_channel_is_read_without_a_decode() {
        let encoded = msg_on("shop:worker", "x").encode_to_vec();
        assert_eq!(channel_of(&encoded), Some("shop:worker"));
        assert_eq!(channel_of(&msg_on("", "x").encode_to_vec()), Some(""));
        assert_eq!(channel_of(&[]), Some(""));
        // Concatenated encodings merge: the last channel wins, as in a decode.
        let mut merged = encoded.clone();
        merged.extend(msg_on("shop:other", "y").encode_to_vec());
        assert_eq!(channel_of(&merged), Some("shop:other"));
        // Not plainly a message: left to a decode.
        assert_eq!(channel_of(&encoded[..encoded.len() - 1]), None);
        assert_eq!(channel_of(&[5 << 3, 1]), None, "a channel as a varint");
        assert_eq!(channel_of(&[5 << 3 | 2, 1, 0xff]), None, "not UTF-8");
        assert_eq!(channel_of(&[9 << 3 | 3, 9 << 3 | 4]), None, "a group");
        assert_eq!(channel_of(&[0, 0]), None, "field 0");
    }

    /// Fields as a message may hold them, known or not, of any wire type prost
    /// reads (groups aside): often not a valid `Msg` (a field of the wrong type,
    /// a channel that is not UTF-8), which prost then refuses.
    fn field_soup() -> impl Strategy<Value = Vec<u8>> {
        let field = (
            1u32..12,
            0u8..4,
            proptest::collection::vec(any::<u8>(), 0..12),
            "[a-z:]{0,8}",
        );
        proptest::collection::vec(field, 0..8).prop_map(|fields| {
            let mut out = Vec::new();
            for (number, kind, bytes, text) in fields {
                let wire = [0u64, 1, 2, 5][usize::from(kind)];
                prost::encoding::encode_varint(u64::from(number) << 3 | wire, &mut out);
                match wire {
                    0 => prost::encoding::encode_varint(bytes.len() as u64 * 977, &mut out),
                    1 => out.extend([7; 8]),
                    5 => out.extend([7; 4]),
                    _ => {
                        let value = if bytes.len() % 2 == 0 {
                            text.as_bytes()
                        } else {
                            &bytes[..]
                        };
                        prost::encoding::encode_varint(value.len() as u64, &mut out);
                        out.extend(value);
                    }
                }
            }
            out
        })
    }

    /// What the scan may answer for bytes prost decodes: that message's channel,
    /// or "cannot tell" (never another channel); for bytes prost refuses, anything
    /// (the tail then decodes or skips a message that would be skipped anyway).
    fn agrees_with_prost(bytes: &[u8], exact: bool) -> Result<(), TestCaseError> {
        if let Ok(msg) = Msg::decode(bytes) {
            match channel_of(bytes) {
                Some(channel) => prop_assert_eq!(channel, msg.channel.as_str()),
                None => prop_assert!(!exact, "a decodable message's channel not read"),
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn the_channel_scan_reads_what_prost_decodes(
            channel in "[a-z:]{0,12}",
            op in "[a-z]{0,6}",
            other in "[a-z]{0,6}",
            cut in any::<proptest::sample::Index>(),
        ) {
            let encoded = msg_on(&channel, &op).encode_to_vec();
            prop_assert_eq!(channel_of(&encoded), Some(channel.as_str()));
            agrees_with_prost(&encoded, true)?;
            let mut merged = encoded.clone();
            merged.extend(msg_on(&other, &op).encode_to_vec());
            agrees_with_prost(&merged, true)?;
            let cut = cut.index(encoded.len() + 1);
            agrees_with_prost(&encoded[..cut], true)?;
        }

        #[test]
        fn the_channel_scan_agrees_with_prost_on_any_fields(bytes in field_soup()) {
            agrees_with_prost(&bytes, true)?;
        }

        #[test]
        fn the_channel_scan_agrees_with_prost_on_any_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            agrees_with_prost(&bytes, false)?;
        }
    }

    #[test]
    fn an_audit_reads_an_entry_as_xrange_returns_it() {
        let messages = entry_messages(0xab, "5-1", vec![(BATCH.into(), delimited(&["x", "y"]))]);
        let read: Vec<_> = messages
            .iter()
            .map(|m| (m.op.as_str(), m.cursor.as_str()))
            .collect();
        let second = format!("ab.5-{}", SLOTS + 1);
        assert_eq!(read, [("x", &*format!("ab.5-{SLOTS}")), ("y", &*second)]);
        assert!(entry_messages(0xab, "bad", vec![]).is_empty());
    }

    /// Messages as the writer holds them (cursors empty), and their payloads.
    fn written(ops: &[&str]) -> (Vec<Vec<u8>>, Vec<Arc<Msg>>) {
        ops.iter()
            .map(|op| {
                let msg = Msg {
                    op: (*op).into(),
                    ..Msg::default()
                };
                (msg.encode_length_delimited_to_vec(), Arc::new(msg))
            })
            .unzip()
    }

    fn same(a: &[Arc<Msg>], b: &[Arc<Msg>]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
    }

    fn cursors(messages: &[Arc<Msg>]) -> Vec<&str> {
        messages.iter().map(|m| m.cursor.as_str()).collect()
    }

    const A: EntryId = EntryId { ms: 5, seq: 0 };
    const B: EntryId = EntryId { ms: 5, seq: 1 };

    #[test]
    fn the_tail_takes_back_an_entry_the_writer_placed_once_and_only_as_written() {
        let mut own = OwnEntries::default();
        let (payloads, messages) = written(&["x", "y"]);
        let expected = own.expect(payloads, messages);
        let answered = expected.stored(A, 9);
        assert_eq!(cursors(&answered), ["9.5-0", "9.5-1"]);
        let taken = own.take(9, A, &delimited(&["x", "y"])).expect("ours");
        assert!(same(&taken, &answered), "the writer's messages, not copies");
        assert_eq!(own.take(9, A, &delimited(&["x", "y"])), None, "taken once");

        // Another replica's entry under an id this one wrote (a failover gave it
        // again), a shorter or longer body, another epoch: decoded instead.
        for (epoch, body) in [
            (9, delimited(&["q"])),
            (9, delimited(&["z", "z"])),
            (9, Vec::new()),
            (8, delimited(&["z"])),
        ] {
            let mut own = OwnEntries::default();
            let (payloads, messages) = written(&["z"]);
            own.expect(payloads, messages).stored(B, 9);
            assert_eq!(own.take(epoch, B, &body), None, "{epoch} {body:?}");
        }
    }

    #[test]
    fn the_tail_takes_an_entry_it_reads_before_the_writer_knows_its_id() {
        let mut own = OwnEntries::default();
        let (payloads, messages) = written(&["x", "y"]);
        let expected = own.expect(payloads, messages);
        // Only these bytes are ours.
        assert_eq!(own.take(9, A, &delimited(&["x"])), None);
        let taken = own.take(9, B, &delimited(&["x", "y"])).expect("ours");
        assert_eq!(cursors(&taken), ["9.5-1024", "9.5-1025"]);
        assert_eq!(own.take(9, B, &delimited(&["x", "y"])), None, "taken once");
        // The writer's reply names the same entry: its answers are the tail's.
        let answered = expected.stored(B, 9);
        assert!(same(&answered, &taken));

        // The tail matched another entry of the same bytes (or the log's epoch
        // changed): each side keeps the cursors of the entry it saw.
        for (id, epoch) in [(A, 9), (B, 8)] {
            let mut own = OwnEntries::default();
            let (payloads, messages) = written(&["x"]);
            let expected = own.expect(payloads, messages);
            let taken = own.take(9, B, &delimited(&["x"])).expect("the same bytes");
            let answered = expected.stored(id, epoch);
            assert_eq!(cursors(&taken), ["9.5-1024"]);
            assert_eq!(
                cursors(&answered),
                [Place {
                    entry: id,
                    index: 0
                }
                .cursor(epoch)
                .text()]
            );
            assert_eq!(answered[0].op, "x");
        }
    }

    #[test]
    fn a_failed_write_is_never_taken() {
        let mut own = OwnEntries::default();
        let (payloads, messages) = written(&["x"]);
        own.expect(payloads, messages).failed();
        assert_eq!(own.take(9, A, &delimited(&["x"])), None);
        // Nor an entry of the same bytes written since, under the failed one's id.
        let (payloads, messages) = written(&["x"]);
        let expected = own.expect(payloads, messages);
        let taken = own
            .take(9, B, &delimited(&["x"]))
            .expect("the second write");
        assert!(same(&expected.stored(B, 9), &taken));
    }

    #[test]
    fn passing_an_entry_forgets_those_before_it_and_memory_stays_bounded() {
        let mut own = OwnEntries::default();
        let (payloads, messages) = written(&["x"]);
        own.expect(payloads, messages).stored(A, 9);
        let (payloads, messages) = written(&["y"]);
        let _pending = own.expect(payloads, messages);
        assert!(own.take(9, B, &delimited(&["y"])).is_some());
        assert!(own.pending.is_empty(), "A was passed: forgotten");

        for seq in 0..MAX_OWN_ENTRIES as u64 + 10 {
            let (payloads, messages) = written(&["w"]);
            own.expect(payloads, messages)
                .stored(EntryId { ms: 7, seq }, 9);
        }
        assert_eq!(own.pending.len(), MAX_OWN_ENTRIES);
        assert!(own.take(9, EntryId { ms: 8, seq: 0 }, &[]).is_none());
        assert!(own.pending.is_empty(), "all passed: forgotten");
        // Entries never settled (a writer that hangs) are bounded too.
        let held: Vec<Expected> = (0..MAX_OWN_ENTRIES + 10)
            .map(|_| {
                let (payloads, messages) = written(&["w"]);
                own.expect(payloads, messages)
            })
            .collect();
        assert_eq!(own.pending.len(), MAX_OWN_ENTRIES);
        drop(held);
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
