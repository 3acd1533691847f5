//! Idempotency keys in Redis: a keyed append is one Lua script in the writer's
//! pipeline, in its place among the plain `XADD`s. The script checks the key and,
//! if it is new, appends the entry and records the key (`P:dedup:APP:KEY`, a string
//! expiring after the window) — atomically, since Redis runs a script alone.
//!
//! So there is no moment when a key is reserved but its entry not yet appended: a
//! concurrent repeat on another replica runs before (and stores) or after (and sees
//! the record), never in between, and a replica that dies after sending the script
//! leaves either both the entry and the record or neither. A repeat answers the
//! first message's id, channel and cursor.

use ipc_core::bus::BusError;
use ipc_core::cursor::Cursor;
use redis::Value;

use crate::keys::Keys;
use crate::log::{BATCH, EntryId, Place};

/// KEYS: log, epoch, dedup key. ARGV: retention, payload (the message
/// length-delimited: an entry of one), message id, channel, window in ms, field. Returns `{1, entry id}` when stored, `{0, record}` for a repeat;
/// the record is `message id \n channel \n entry id \n epoch`.
const SCRIPT: &str = r"
local seen = redis.call('GET', KEYS[3])
if seen then return {0, seen} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[6], ARGV[2])
local epoch = redis.call('GET', KEYS[2]) or ''
redis.call('SET', KEYS[3], ARGV[3] .. '\n' .. ARGV[4] .. '\n' .. id .. '\n' .. epoch, 'PX', ARGV[5])
return {1, id}
";

/// A keyed append's key and what the record of a first message holds.
#[derive(Debug, Clone)]
pub(crate) struct Keyed {
    /// `app:key`.
    pub scoped: String,
    pub window_ms: u64,
    pub msg_id: String,
    pub channel: String,
}

/// What became of an append: stored with its cursor, or a repeat of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Written {
    Stored(Cursor),
    Duplicate {
        id: String,
        channel: String,
        cursor: String,
    },
}

/// Adds the script for one keyed append to `pipe`.
pub(crate) fn push(
    pipe: &mut redis::Pipeline,
    keys: &Keys,
    retention: usize,
    payload: &[u8],
    keyed: &Keyed,
) {
    pipe.cmd("EVAL")
        .arg(SCRIPT)
        .arg(3)
        .arg(&keys.log)
        .arg(&keys.epoch)
        .arg(keys.dedup(&keyed.scoped))
        .arg(retention)
        .arg(payload)
        .arg(&keyed.msg_id)
        .arg(&keyed.channel)
        .arg(keyed.window_ms.max(1))
        .arg(BATCH);
}

fn text(value: &Value) -> Option<&str> {
    match value {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}

/// The script's reply; `epoch` is the log's, read in the same pipeline.
pub(crate) fn parse(reply: &Value, epoch: u64) -> Result<Written, BusError> {
    let bad = || BusError::Internal("unexpected Redis reply to the idempotent append".into());
    let Value::Array(parts) = reply else {
        return Err(bad());
    };
    let (Some(Value::Int(stored)), Some(value)) = (parts.first(), parts.get(1)) else {
        return Err(bad());
    };
    let value = text(value).ok_or_else(bad)?;
    if *stored == 1 {
        return EntryId::parse(value.as_bytes())
            .map(|entry| Written::Stored(Place { entry, index: 0 }.cursor(epoch)))
            .ok_or_else(bad);
    }
    let mut fields = value.split('\n');
    let (Some(id), Some(channel), Some(entry), Some(epoch)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(bad());
    };
    let entry = EntryId::parse(entry.as_bytes()).ok_or_else(bad)?;
    let cursor = u64::from_str_radix(epoch, 16)
        .map(|epoch| Place { entry, index: 0 }.cursor(epoch).to_string())
        .unwrap_or_default();
    Ok(Written::Duplicate {
        id: id.to_string(),
        channel: channel.to_string(),
        cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn parses_a_stored_and_a_repeated_append() {
        let at_17_3 = Place {
            entry: EntryId { ms: 17, seq: 3 },
            index: 0,
        };
        let stored = Value::Array(vec![Value::Int(1), bulk("17-3")]);
        assert_eq!(
            parse(&stored, 5).unwrap(),
            Written::Stored(at_17_3.cursor(5))
        );
        let repeat = Value::Array(vec![Value::Int(0), bulk("abc-1\nshop:worker\n17-3\nff")]);
        let cursor = at_17_3.cursor(0xff).to_string();
        assert_eq!(
            parse(&repeat, 5).unwrap(),
            Written::Duplicate {
                id: "abc-1".into(),
                channel: "shop:worker".into(),
                cursor,
            }
        );
        assert!(parse(&bulk("17-3"), 5).is_err());
    }
}
