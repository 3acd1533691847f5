//! Leases and token buckets in Redis, shared by every replica: one script per
//! operation, so that no decision is a read-modify-write race between replicas.
//! The rules are those of [`ipc_core::coord`]; the time is Redis's own (`TIME`),
//! so replicas with skewed clocks agree.
//!
//! - `P:lock:NAME` (hash `fence`, `holder`; expires with the lease) is the live lease.
//! - `P:fence` is the last fence granted, for all names; it never expires (with AOF
//!   it survives restarts), and a grant is also at least Redis's time in
//!   microseconds, so fences grow even if Redis lost it.
//! - `P:limit:NAME` (hash `tokens`, `ts`) is a bucket; it expires once it would be
//!   full again, which is the same as absent.
//! - Listing what is in use (for the admin console) is a SCAN of `P:lock:*` and
//!   `P:limit:*`, bounded in keys and in calls, then one script that reads them.
//! - A release publishes the name on `P:released`. Each replica listens there and
//!   wakes its waiters for that name; a waiter also tries again at the holder's
//!   expiry and at least every [`RECHECK`] (a notice lost while reconnecting).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use ipc_core::bus::BusError;
use ipc_core::coord::{
    Bucket, BucketInfo, InUse, LeaseInfo, LimitAnswer, LimitSpec, LockAnswer, LockSpec, RECHECK,
    UnlockSpec,
};
use parking_lot::Mutex;
use redis::Script;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;
use crate::link::{Link, reconnect_backoff};

/// KEYS: lease, fence counter. ARGV: ttl_ms, fence, holder, proven (0/1).
/// Returns {acquired, fence, holder, expires_ms}.
const LOCK_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local cur = redis.call('HMGET', KEYS[1], 'fence', 'holder')
if cur[1] then
  if ARGV[2] ~= '0' and cur[1] == ARGV[2] and (ARGV[4] == '0' or cur[2] == ARGV[3]) then
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {1, cur[1], cur[2], now + ttl}
  end
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 then left = 0 end
  return {0, '0', cur[2], now + left}
end
local fence = redis.call('INCR', KEYS[2])
local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
if fence < floor then
  fence = floor
  redis.call('SET', KEYS[2], string.format('%.0f', fence))
end
local text = string.format('%.0f', fence)
redis.call('HSET', KEYS[1], 'fence', text, 'holder', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, text, ARGV[3], now + ttl}
"#;

/// KEYS: lease. ARGV: fence, holder, proven (0/1), released channel, name.
/// Returns 1 if released.
const UNLOCK_SCRIPT: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'fence', 'holder')
if cur[1] and cur[1] == ARGV[1] and (ARGV[3] == '0' or cur[2] == ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
end
return 0
"#;

/// KEYS: bucket. ARGV: rate, interval_ms, burst, cost.
/// Returns {allowed, remaining, retry_after_ms}. The arithmetic of
/// `ipc_core::coord::Bucket`, in ms with fractions. The bucket also keeps its
/// rate, interval and burst, for listing.
/// Public so that `ipc-bench` runs the very same script directly on Redis.
pub const LIMIT_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
local burst, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local per_ms = rate / interval
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if not tokens or not ts then tokens = burst; ts = now end
if now > ts then
  tokens = tokens + (now - ts) * per_ms
  ts = now
end
if tokens > burst then tokens = burst end
local allowed, retry = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = math.ceil((cost - tokens) / per_ms)
  if retry < 1 then retry = 1 end
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.17g', ts),
  'rate', ARGV[1], 'interval', ARGV[2], 'burst', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / per_ms) + 1000)
return {allowed, math.floor(tokens), retry}
"#;

/// KEYS: leases, then buckets. ARGV: how many leases. Returns Redis's time
/// {seconds, microseconds}, then per lease {fence, holder, pttl} and per bucket
/// {tokens, ts, rate, interval, burst} (nil fields: gone since the SCAN).
const READ_IN_USE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local out = {{t[1], t[2]}}
local leases = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if i <= leases then
    local lease = redis.call('HMGET', key, 'fence', 'holder')
    out[#out + 1] = {lease[1], lease[2], tostring(redis.call('PTTL', key))}
  else
    out[#out + 1] = redis.call('HMGET', key, 'tokens', 'ts', 'rate', 'interval', 'burst')
  end
end
return out
"#;

/// Keys asked of Redis per SCAN call when listing what is in use.
const SCAN_COUNT: usize = 1000;
/// The most SCAN calls per kind of key: a keyspace larger than this many times
/// [`SCAN_COUNT`] is listed in part (`truncated`) rather than holding the caller.
const SCAN_CALLS: usize = 100;

/// This replica's side of coordination: the scripts and the waiters to wake.
pub(crate) struct Coordination {
    lock: Script,
    unlock: Script,
    limit: Script,
    read_in_use: Script,
    /// Lock names this replica has waiters for → what wakes them.
    waiters: Mutex<HashMap<String, Weak<Notify>>>,
}

/// A waiter's registration, removed when its wait ends.
struct Waiting<'a> {
    coordination: &'a Coordination,
    name: &'a str,
    released: Arc<Notify>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiters = self.coordination.waiters.lock();
        // Only this waiter holds the Notify besides the map's Weak: forget it.
        if Arc::strong_count(&self.released) == 1 {
            waiters.remove(self.name);
        }
    }
}

impl Coordination {
    pub fn new() -> Self {
        Self {
            lock: Script::new(LOCK_SCRIPT),
            unlock: Script::new(UNLOCK_SCRIPT),
            limit: Script::new(LIMIT_SCRIPT),
            read_in_use: Script::new(READ_IN_USE_SCRIPT),
            waiters: Mutex::default(),
        }
    }

    fn register<'a>(&'a self, name: &'a str) -> Waiting<'a> {
        let mut waiters = self.waiters.lock();
        let released = match waiters.get(name).and_then(Weak::upgrade) {
            Some(notify) => notify,
            None => {
                let notify = Arc::new(Notify::new());
                waiters.insert(name.to_string(), Arc::downgrade(&notify));
                notify
            }
        };
        Waiting {
            coordination: self,
            name,
            released,
        }
    }

    fn wake(&self, name: &str) {
        let notify = self.waiters.lock().get(name).and_then(Weak::upgrade);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Grants, renews or refuses; with `wait_until`, tries again on each release
    /// notice, at the holder's expiry, and every [`RECHECK`], until then.
    pub async fn lock(
        &self,
        link: &Link,
        keys: &Keys,
        spec: &LockSpec,
    ) -> Result<LockAnswer, BusError> {
        let Some(until) = spec.wait_until else {
            return self.try_lock(link, keys, spec).await;
        };
        let waiting = self.register(&spec.name);
        let mut counted = None;
        loop {
            // Armed before the attempt: a notice arriving during it still wakes us.
            let notified = waiting.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let answer = self.try_lock(link, keys, spec).await?;
            let now = Instant::now();
            if answer.acquired || now >= until {
                return Ok(answer);
            }
            if counted.is_none() {
                counted = Some(spec.count_waiting());
            }
            let expiry = (answer.expires_ms - ipc_core::now_ms()).max(0) as u64;
            let next = until
                .min(now + Duration::from_millis(expiry))
                .min(now + RECHECK);
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    async fn try_lock(
        &self,
        link: &Link,
        keys: &Keys,
        spec: &LockSpec,
    ) -> Result<LockAnswer, BusError> {
        let script = &self.lock;
        let lease = keys.lock(&spec.name);
        // A grant lost in a failover could be granted again, with the same fence.
        let (acquired, fence, holder, expires_ms): (i64, String, String, i64) = link
            .call_replicated(|mut conn| async move {
                script
                    .key(lease)
                    .key(&keys.fence)
                    .arg(spec.ttl_ms)
                    .arg(spec.fence)
                    .arg(&spec.holder)
                    .arg(u8::from(spec.proven))
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let fence = fence
            .parse()
            .map_err(|_| BusError::Internal(format!("the lock script answered fence {fence:?}")))?;
        Ok(LockAnswer {
            acquired: acquired == 1,
            fence,
            holder,
            expires_ms,
        })
    }

    pub async fn unlock(
        &self,
        link: &Link,
        keys: &Keys,
        spec: &UnlockSpec,
    ) -> Result<bool, BusError> {
        let script = &self.unlock;
        let lease = keys.lock(&spec.name);
        let released: i64 = link
            .call(|mut conn| async move {
                script
                    .key(lease)
                    .arg(spec.fence)
                    .arg(&spec.holder)
                    .arg(u8::from(spec.proven))
                    .arg(&keys.released)
                    .arg(&spec.name)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(released == 1)
    }

    pub async fn limit(
        &self,
        link: &Link,
        keys: &Keys,
        name: &str,
        spec: &LimitSpec,
    ) -> Result<LimitAnswer, BusError> {
        let script = &self.limit;
        let bucket = keys.limit(name);
        let (allowed, remaining, retry_after_ms): (i64, i64, i64) = link
            .call(|mut conn| async move {
                script
                    .key(bucket)
                    .arg(spec.rate)
                    .arg(spec.interval_ms)
                    .arg(spec.burst)
                    .arg(spec.cost)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(LimitAnswer {
            allowed: allowed == 1,
            remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
            retry_after_ms: retry_after_ms.clamp(0, i64::from(u32::MAX)) as u32,
        })
    }

    /// The live leases and the buckets not full: a bounded SCAN of `P:lock:*` and
    /// `P:limit:*`, then one script reads them all at Redis's time.
    pub async fn in_use(&self, link: &Link, keys: &Keys, max: usize) -> Result<InUse, BusError> {
        let lock_prefix = keys.lock("");
        let limit_prefix = keys.limit("");
        let (mut lease_keys, mut truncated) = scan(link, &lock_prefix, max).await?;
        let (bucket_keys, cut) = scan(link, &limit_prefix, max).await?;
        truncated |= cut;
        let leases = lease_keys.len();
        lease_keys.extend(bucket_keys);
        let script = &self.read_in_use;
        let all_keys = &lease_keys;
        let rows: Vec<Vec<Option<String>>> = link
            .call(|mut conn| async move {
                let mut invocation = script.prepare_invoke();
                for key in all_keys {
                    invocation.key(key);
                }
                invocation.arg(leases).invoke_async(&mut conn).await
            })
            .await?;
        let number = |field: &Option<String>| field.as_deref().and_then(|v| v.parse::<f64>().ok());
        let (time, rows) = rows
            .split_first()
            .ok_or_else(|| BusError::Internal("the listing script answered nothing".into()))?;
        let now_ms = match time.as_slice() {
            [Some(seconds), Some(micros)] => {
                let seconds: f64 = seconds.parse().unwrap_or_default();
                let micros: f64 = micros.parse().unwrap_or_default();
                seconds * 1000.0 + micros / 1000.0
            }
            _ => {
                return Err(BusError::Internal(
                    "the listing script answered no time".into(),
                ));
            }
        };
        let mut in_use = InUse {
            truncated,
            ..InUse::default()
        };
        for (index, (key, row)) in lease_keys.iter().zip(rows).enumerate() {
            if index < leases {
                let name = key.strip_prefix(&lock_prefix).unwrap_or(key);
                if let [Some(fence), Some(holder), ttl] = row.as_slice()
                    && let (Ok(fence), Some(ttl)) = (fence.parse(), number(ttl))
                    && ttl >= 0.0
                {
                    in_use.locks.push(LeaseInfo {
                        name: name.to_string(),
                        holder: holder.clone(),
                        fence,
                        expires_ms: (now_ms + ttl) as i64,
                    });
                }
            } else {
                let name = key.strip_prefix(&limit_prefix).unwrap_or(key);
                // A bucket written by a replica from before buckets kept their
                // rate (or gone since the SCAN) cannot be told; it is left out.
                if let [tokens, ts, rate, interval, burst] = row.as_slice()
                    && let (Some(tokens), Some(at_ms)) = (number(tokens), number(ts))
                    && let (Some(rate), Some(interval_ms), Some(burst)) =
                        (number(rate), number(interval), number(burst))
                    && rate >= 1.0
                    && interval_ms >= 1.0
                {
                    let spec = LimitSpec {
                        rate: rate as u32,
                        interval_ms: interval_ms as u32,
                        burst: burst as u32,
                        cost: 1,
                    };
                    let bucket = Bucket { tokens, at_ms };
                    in_use
                        .limits
                        .extend(BucketInfo::of(name, &spec, &bucket, now_ms));
                }
            }
        }
        Ok(in_use.finish(max))
    }

    /// Listens for release notices until cancelled, reconnecting with backoff.
    /// While it is disconnected, waiters still try again every [`RECHECK`].
    pub async fn listen(self: Arc<Self>, link: Arc<Link>, keys: Keys, cancel: CancellationToken) {
        let mut backoff = reconnect_backoff();
        loop {
            let tried = link.endpoint().generation();
            let subscribed = tokio::select! {
                () = cancel.cancelled() => return,
                s = tokio::time::timeout(link.timeout(), link.subscribe(&keys.released)) => s,
            };
            match subscribed {
                Ok(Ok((pubsub, primary))) => {
                    backoff.reset();
                    let mut notices = pubsub.into_on_message();
                    let moved = link.endpoint().moved(primary);
                    tokio::pin!(moved);
                    loop {
                        let notice = tokio::select! {
                            () = cancel.cancelled() => return,
                            () = &mut moved => None,
                            n = notices.next() => n,
                        };
                        match notice {
                            Some(notice) => match std::str::from_utf8(notice.get_payload_bytes()) {
                                Ok(name) => self.wake(name),
                                Err(_) => {
                                    tracing::debug!("ignoring a release notice that is not UTF-8")
                                }
                            },
                            None => break,
                        }
                    }
                    tracing::debug!("release notices connection closed; reconnecting");
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "release notices not subscribed; retrying")
                }
                Err(_) => tracing::debug!("release notices subscription timed out; retrying"),
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff.next_pause()) => {}
                () = link.endpoint().changed_from(tried) => {}
            }
        }
    }
}

/// Keys starting with `prefix`, sorted, at most `max`; `true` when there were
/// more, or when the bound on SCAN calls stopped the search early.
async fn scan(link: &Link, prefix: &str, max: usize) -> Result<(Vec<String>, bool), BusError> {
    let pattern = format!("{}*", escape_glob(prefix));
    let pattern = &pattern;
    let mut found = Vec::new();
    let mut cursor: u64 = 0;
    let mut ended = false;
    for _ in 0..SCAN_CALLS {
        let (next, keys): (u64, Vec<String>) = link
            .call(|mut conn| async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        found.extend(keys);
        cursor = next;
        if cursor == 0 {
            ended = true;
            break;
        }
        if found.len() > max {
            break;
        }
    }
    // SCAN may return a key twice.
    found.sort();
    found.dedup();
    let truncated = !ended || found.len() > max;
    found.truncate(max);
    Ok((found, truncated))
}

/// `text` matched literally by a Redis glob pattern.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_with_glob_characters_is_matched_literally() {
        assert_eq!(escape_glob("ipc:lock:"), "ipc:lock:");
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
