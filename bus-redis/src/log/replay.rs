//! Replay: the entries after a resuming subscriber's cursor, or the gap it
//! cannot be spared — the log of another epoch (Redis lost its data), a cursor
//! past the end, entries dropped by retention, or a loss mark on the way.

use std::sync::Arc;

use ipc_core::bus::{BusError, Replay};
use ipc_core::cursor::Cursor;
use ipc_proto::pb::Msg;
use redis::Value;

use super::tail::loss_mark;
use super::{
    EntryId, PAGE, Place, bad_reply, decode, pairs, parse_entries, parse_epoch, push_epoch,
};
use crate::keys::Keys;
use crate::link::Link;

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
    let pairs = pairs(value)?;
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
    let place = Place::of_cursor(after);
    let cursor = place.entry;

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
    let messages = read_range(link, keys, epoch, Some(place), info.last_generated).await?;
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

/// Messages after `after` (an entry and an index in it; from the log's start when
/// `None`) up to the entry `to`, a page per round trip.
async fn read_range(
    link: &Link,
    keys: &Keys,
    epoch: u64,
    after: Option<Place>,
    to: EntryId,
) -> Result<Vec<Arc<Msg>>, BusError> {
    let mut messages = Vec::new();
    // The first page starts at the cursor's own entry (its messages after the
    // index); each next one after the last entry read.
    let mut start = after.map_or_else(|| "-".to_string(), |place| place.entry.to_string());
    loop {
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
        for (id, body) in &entries {
            let skip = after.filter(|p| p.entry == *id).map(|p| p.index);
            decode(epoch, *id, body, skip, &mut messages);
        }
        match entries.last() {
            Some((last, _)) if full && *last < to => start = format!("({last}"),
            _ => return Ok(messages),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::BATCH;
    use crate::log::tests::entry;

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
            entry("7-1", vec![(BATCH, b"x")]),
            bulk("last-entry"),
            entry("9-3", vec![(BATCH, b"y")]),
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
}
