//! The memory bus: one node alone, its log a bounded ring in memory.
//!
//! Appending and fan-out happen under one lock, so every subscriber sees entries in
//! log order. The epoch is drawn at start: cursors from a previous run of the node
//! are recognised as stale and answered with `ipc:gap`. Idempotency keys live under
//! the same lock, so a key's check and its entry's append are one step.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipc_proto::pb::{Member, Msg};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::bus::{Appended, Bus, IdempotencyKey, PendingAppend, Replay, TrySubmit};
use crate::channel::Pattern;
use crate::cursor::Cursor;
use crate::error::{BusError, ReplyError, RequestError};
use crate::fleetops::store::LocalStore;
use crate::local::Local;

/// Bounds of the in-memory log.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Entries kept for resume.
    pub messages: usize,
    /// Bytes of memory kept for resume ([`crate::msg_size::memory_size`]); the
    /// oldest entries go first past this.
    pub bytes: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            messages: 10_000,
            bytes: 64 << 20,
        }
    }
}

/// Most idempotency keys remembered at once; past this the oldest are forgotten
/// before their window ends (a bound on memory).
const MAX_KEYS: usize = 1_000_000;

struct Log {
    entries: VecDeque<(u64, Arc<Msg>, usize)>,
    next_seq: u64,
    bytes: usize,
    /// Keys seen within their window, with the first message stored under each.
    keys: HashMap<String, (Instant, Arc<Msg>)>,
    /// Keys in the order they expire (every key of a node has the same window).
    expiry: VecDeque<(Instant, String)>,
}

impl Log {
    fn forget_expired(&mut self, now: Instant) {
        while let Some((expires, _)) = self.expiry.front() {
            if *expires > now && self.expiry.len() < MAX_KEYS {
                break;
            }
            if let Some((expires, key)) = self.expiry.pop_front()
                && self.keys.get(&key).is_some_and(|(e, _)| *e == expires)
            {
                self.keys.remove(&key);
            }
        }
    }
}

pub struct MemoryBus {
    epoch: u64,
    /// The text every cursor of this log starts with, `EPOCH.` (see [`Cursor::text`]).
    cursor_prefix: String,
    retention: Retention,
    log: Mutex<Log>,
    local: OnceLock<Local>,
    health: watch::Sender<bool>,
    operations: LocalStore,
}

impl MemoryBus {
    pub fn new(retention: Retention) -> Self {
        let epoch = rand::random::<u32>() as u64;
        Self {
            epoch,
            cursor_prefix: format!("{epoch:x}."),
            retention,
            log: Mutex::new(Log {
                entries: VecDeque::new(),
                next_seq: 1,
                bytes: 0,
                keys: HashMap::new(),
                expiry: VecDeque::new(),
            }),
            local: OnceLock::new(),
            health: watch::Sender::new(true),
            operations: LocalStore::default(),
        }
    }
}

impl MemoryBus {
    /// Stores a message now (or finds its key seen): the memory bus never waits.
    fn submit_now(&self, msg: Msg, key: Option<IdempotencyKey>) -> Result<PendingAppend, BusError> {
        let mut log = self.log.lock();
        let appended = match key {
            None => Appended::Stored(self.append_locked(&mut log, msg)?),
            Some(key) => {
                let now = Instant::now();
                log.forget_expired(now);
                match log.keys.get(&key.scoped) {
                    Some((_, first)) => Appended::Duplicate {
                        id: first.id.clone(),
                        channel: first.channel.clone(),
                        cursor: first.cursor.clone(),
                    },
                    None => {
                        let stored = self.append_locked(&mut log, msg)?;
                        let expires = now + key.window;
                        log.expiry.push_back((expires, key.scoped.clone()));
                        log.keys.insert(key.scoped, (expires, stored.clone()));
                        Appended::Stored(stored)
                    }
                }
            }
        };
        Ok(PendingAppend::done(Ok(appended)))
    }

    /// The text of entry `seq`'s cursor, `Cursor { epoch, hi: seq, lo: 0 }.text()`:
    /// from the epoch's text, written once, the entry's number and `-0`, in three
    /// copies instead of a character at a time (half the instructions).
    fn cursor_text(&self, seq: u64) -> String {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(seq);
        let mut text = String::with_capacity(self.cursor_prefix.len() + digits.len() + 2);
        text.push_str(&self.cursor_prefix);
        text.push_str(digits);
        text.push_str("-0");
        text
    }

    /// Appends under the log lock (held by the caller) and fans the entry out.
    fn append_locked(&self, log: &mut Log, mut msg: Msg) -> Result<Arc<Msg>, BusError> {
        let local = self
            .local
            .get()
            .ok_or_else(|| BusError::Internal("memory bus used before attach".into()))?;
        let seq = log.next_seq;
        log.next_seq += 1;
        msg.cursor = self.cursor_text(seq);
        let size = crate::msg_size::memory_size(&msg);
        let msg = Arc::new(msg);
        log.entries.push_back((seq, msg.clone(), size));
        log.bytes += size;
        while log.entries.len() > self.retention.messages
            || (log.bytes > self.retention.bytes && log.entries.len() > 1)
        {
            if let Some((_, _, size)) = log.entries.pop_front() {
                log.bytes -= size;
            }
        }
        // Fan-out under the log lock: concurrent appends reach subscribers in log order.
        local.dispatch_sized(&msg, size);
        Ok(msg)
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn attach(&self, local: Local) {
        let _ = self.local.set(local);
    }

    async fn append(&self, msg: Msg) -> Result<Arc<Msg>, BusError> {
        let mut log = self.log.lock();
        self.append_locked(&mut log, msg)
    }

    async fn submit(
        &self,
        msg: Msg,
        key: Option<IdempotencyKey>,
    ) -> Result<PendingAppend, BusError> {
        self.submit_now(msg, key)
    }

    fn try_submit(&self, msg: Msg, key: Option<IdempotencyKey>) -> TrySubmit {
        TrySubmit::Done(self.submit_now(msg, key))
    }

    async fn replay(&self, after: &Cursor, _patterns: &[Pattern]) -> Result<Replay, BusError> {
        let log = self.log.lock();
        let last = log.next_seq - 1;
        let first = log.entries.front().map_or(log.next_seq, |(seq, _, _)| *seq);
        let all = || log.entries.iter().map(|(_, m, _)| m.clone()).collect();
        if after.epoch != self.epoch {
            return Ok(Replay {
                messages: all(),
                gap: Some("the cursor is from an earlier run of the node; its log is gone".into()),
            });
        }
        if after.hi > last || after.lo != 0 {
            return Err(BusError::BadCursor(format!(
                "cursor {after} is ahead of the log (last entry is {})",
                Cursor {
                    epoch: self.epoch,
                    hi: last,
                    lo: 0
                }
            )));
        }
        if after.hi + 1 < first {
            return Ok(Replay {
                messages: all(),
                gap: Some(format!(
                    "{} messages after the cursor were dropped by retention",
                    first - after.hi - 1
                )),
            });
        }
        let messages = log
            .entries
            .iter()
            .filter(|(seq, _, _)| *seq > after.hi)
            .map(|(_, m, _)| m.clone())
            .collect();
        Ok(Replay {
            messages,
            gap: None,
        })
    }

    async fn head(&self) -> Result<Option<Cursor>, BusError> {
        let log = self.log.lock();
        Ok(Some(Cursor {
            epoch: self.epoch,
            hi: log.next_seq - 1,
            lo: 0,
        }))
    }

    async fn request(
        &self,
        target: &str,
        _request: Msg,
        _deadline: Instant,
    ) -> Result<Msg, RequestError> {
        Err(RequestError::NoResponders(target.to_string()))
    }

    async fn forward_reply(&self, reply: Msg) -> Result<(), ReplyError> {
        Err(ReplyError::NotFound(reply.reply_to))
    }

    async fn members(&self, local: Vec<Member>) -> Result<Vec<Member>, BusError> {
        Ok(local)
    }

    async fn store_operation(
        &self,
        key: &str,
        record: Vec<u8>,
        ttl: Duration,
    ) -> Result<(), BusError> {
        self.operations.store(key, record, ttl);
        Ok(())
    }

    async fn load_operation(&self, key: &str) -> Result<Option<Vec<u8>>, BusError> {
        Ok(self.operations.load(key))
    }

    fn health(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_cursor_is_the_cursor_text() {
        let bus = MemoryBus::new(Retention::default());
        for seq in [0, 1, 9, 10, 12_345, u64::MAX] {
            let cursor = Cursor {
                epoch: bus.epoch,
                hi: seq,
                lo: 0,
            };
            let text = bus.cursor_text(seq);
            assert_eq!(text, cursor.text());
            // No spare capacity: retention counts a message's allocations.
            assert_eq!(text.capacity(), text.len());
        }
    }
}
