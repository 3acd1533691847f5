//! The log: a Redis Stream of encoded messages, its epoch, the batching writer,
//! the tail that feeds the node, and replay for resuming subscribers.
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

/// The stream field holding the encoded message.
pub(crate) const FIELD: &str = "m";
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

/// The payload field of an entry's field list.
fn field_value(fields: Value) -> Option<Vec<u8>> {
    let pairs = pairs(fields)?;
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
            msg.cursor = id.cursor(epoch).text();
            Some(Arc::new(msg))
        }
        _ => {
            tracing::warn!(entry = %id, "skipping a log entry that is not an encoded message");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
