//! Presence: this replica's subscribers and their channel patterns in Redis, kept
//! alive by heartbeats; fleet-wide members and request routes read back in one
//! script call each.
//!
//! A replica's keys (see `keys`) expire together `presence_ttl` after its last
//! heartbeat, so the members of a replica that died vanish within that time. Writes
//! are diffs in one `MULTI`; after a reconnect, or when a heartbeat finds the keys
//! gone (Redis restarted empty, or this replica was cut off longer than the TTL),
//! the whole state is written again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipc_core::bus::{BusError, Replica};
use ipc_core::channel::Pattern;
use ipc_core::local::Local;
use ipc_core::responders;
use ipc_proto::pb::Member;
use prost::Message as _;
use redis::Script;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;
use crate::link::{Link, Part};

/// Pause before retrying a presence write that failed.
const RETRY: Duration = Duration::from_millis(200);

/// Members of every live replica; drops replicas whose presence expired from the
/// set of nodes. KEYS[1] = nodes set, ARGV[1] = prefix.
const MEMBERS_SCRIPT: &str = r"
local prefix = ARGV[1]
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local base = prefix .. ':node:' .. name
  if redis.call('EXISTS', base .. ':alive') == 0 then
    redis.call('SREM', KEYS[1], name)
  else
    for _, member in ipairs(redis.call('HVALS', base .. ':members')) do
      out[#out + 1] = member
    end
  end
end
return out
";

/// For every live replica but ARGV[3] that may have a subscriber of channel
/// ARGV[2]: `{name, exact (0|1), wildcard patterns...}`. KEYS[1] = nodes set,
/// ARGV[1] = prefix.
const ROUTE_SCRIPT: &str = r"
local prefix, target, me = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if name ~= me then
    local base = prefix .. ':node:' .. name
    if redis.call('EXISTS', base .. ':alive') == 1 then
      local entry = {name, redis.call('HEXISTS', base .. ':exact', target)}
      for _, pattern in ipairs(redis.call('HKEYS', base .. ':wild')) do
        entry[#entry + 1] = pattern
      end
      if entry[2] == 1 or #entry > 2 then
        out[#out + 1] = entry
      end
    end
  end
end
return out
";

/// `{name, milliseconds its presence still lives, number of members}` for every
/// live replica. Read-only. KEYS[1] = nodes set, ARGV[1] = prefix.
const REPLICAS_SCRIPT: &str = r"
local prefix = ARGV[1]
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local base = prefix .. ':node:' .. name
  local left = redis.call('PTTL', base .. ':alive')
  if left > 0 then
    out[#out + 1] = {name, left, redis.call('HLEN', base .. ':members')}
  end
end
return out
";

/// Signals between the node (subscribers changed) and the presence task.
pub(crate) struct PresenceSignals {
    /// Bumped on every subscribe/unsubscribe.
    changes: AtomicU64,
    wake: Notify,
    /// The last value of `changes` that is visible in Redis.
    published: watch::Sender<u64>,
}

impl PresenceSignals {
    pub fn new() -> Self {
        Self {
            changes: AtomicU64::new(0),
            wake: Notify::new(),
            published: watch::Sender::new(0),
        }
    }

    pub fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Waits until every change made so far is visible in Redis, or `timeout`.
    pub async fn synced(&self, timeout: Duration) -> Result<(), BusError> {
        let wanted = self.changes.load(Ordering::Acquire);
        let mut published = self.published.subscribe();
        let wait = published.wait_for(|p| *p >= wanted);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(BusError::Unavailable(
                "cannot publish the subscription to the fleet: Redis is unreachable".into(),
            )),
        }
    }
}

/// What this replica last wrote, to write only differences.
#[derive(Default)]
struct Written {
    /// Link generation the state was written on; another one means rewrite all.
    generation: Option<u64>,
    members: HashMap<String, Vec<u8>>,
    exact: HashMap<String, usize>,
    wild: HashMap<String, usize>,
}

/// Keeps this replica's presence in Redis until cancelled.
pub(crate) async fn run_presence(
    link: Arc<Link>,
    keys: Keys,
    local: Local,
    signals: Arc<PresenceSignals>,
    ttl: Duration,
    cancel: CancellationToken,
) {
    let node = local.node_name().to_string();
    let mut written = Written::default();
    let mut heartbeat = tokio::time::interval(ttl / 3);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connections = link.connections();
    let mut retry = false;
    loop {
        let pause = async {
            if retry {
                tokio::time::sleep(RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = signals.wake.notified() => {}
            // A new connection (maybe a Redis that lost everything): write it all.
            _ = connections.changed() => {}
            _ = heartbeat.tick() => {}
            () = pause => {}
        }
        let change = signals.changes.load(Ordering::Acquire);
        let members = local.members();
        retry = match write(&link, &keys, &node, ttl, &members, &mut written).await {
            Ok(()) => {
                link.health().set(Part::Presence, true);
                signals.published.send_if_modified(|p| {
                    let newer = change > *p;
                    *p = (*p).max(change);
                    newer
                });
                false
            }
            Err(error) => {
                link.health().set(Part::Presence, false);
                tracing::debug!(%error, "presence not written; retrying");
                true
            }
        };
    }
}

/// Writes the difference between `members` and what was written (everything when
/// the connection changed or the keys expired).
async fn write(
    link: &Link,
    keys: &Keys,
    node: &str,
    ttl: Duration,
    members: &[Member],
    written: &mut Written,
) -> Result<(), BusError> {
    let generation = link.get()?.generation;
    // Members relayed by a subscriber (a sidecar's local ones) carry their own node
    // and may share an id with a member of another node: keyed by both.
    let encoded: HashMap<String, Vec<u8>> = members
        .iter()
        .map(|m| {
            let field = if m.node == node {
                m.id.clone()
            } else {
                format!("{}#{}", m.id, m.node)
            };
            (field, m.encode_to_vec())
        })
        .collect();
    // Request routes: the channels responders take requests on (ids and role
    // channels, relayed members' included: they are reached through this replica).
    // Watchers' patterns route no request; the wildcard table stays empty.
    let exact = routes(members);
    let wild = HashMap::new();
    let mut full = written.generation != Some(generation);
    loop {
        let previous = if full {
            Written::default()
        } else {
            std::mem::take(written)
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("PEXPIRE")
            .arg(keys.node_alive(node))
            .arg(ttl.as_millis() as u64);
        if full {
            pipe.cmd("DEL")
                .arg(keys.node_members(node))
                .arg(keys.node_exact(node))
                .arg(keys.node_wild(node))
                .ignore();
        }
        diff_hash(
            &mut pipe,
            &keys.node_members(node),
            &previous.members,
            &encoded,
        );
        diff_hash(&mut pipe, &keys.node_exact(node), &previous.exact, &exact);
        diff_hash(&mut pipe, &keys.node_wild(node), &previous.wild, &wild);
        pipe.cmd("SET")
            .arg(keys.node_alive(node))
            .arg(ipc_core::now_ms())
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .ignore();
        for key in [
            keys.node_members(node),
            keys.node_exact(node),
            keys.node_wild(node),
        ] {
            pipe.cmd("PEXPIRE")
                .arg(key)
                .arg(ttl.as_millis() as u64)
                .ignore();
        }
        pipe.cmd("SADD").arg(&keys.nodes).arg(node).ignore();
        let result: Result<(i64,), BusError> = link
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await;
        let (alive_before,) = match result {
            Ok(r) => r,
            Err(e) => {
                // Unknown what was applied: write everything next time.
                *written = Written::default();
                return Err(e);
            }
        };
        *written = Written {
            generation: Some(generation),
            members: encoded.clone(),
            exact: exact.clone(),
            wild: wild.clone(),
        };
        if alive_before == 0 && !full {
            // Our keys had expired or were lost: the diff went onto nothing.
            tracing::info!(node, "presence was gone from Redis; writing it again");
            full = true;
            continue;
        }
        return Ok(());
    }
}

/// The request channels of `members` (see `ipc_core::responders`), each with the
/// number of members taking requests on it.
fn routes(members: &[Member]) -> HashMap<String, usize> {
    let mut exact = HashMap::new();
    for member in members {
        let unique: HashSet<&str> = responders::request_channels(member).collect();
        for channel in unique {
            *exact.entry(channel.to_string()).or_insert(0) += 1;
        }
    }
    exact
}

fn diff_hash<V: PartialEq + redis::ToRedisArgs>(
    pipe: &mut redis::Pipeline,
    key: &str,
    before: &HashMap<String, V>,
    after: &HashMap<String, V>,
) {
    let removed: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    if !removed.is_empty() {
        pipe.cmd("HDEL").arg(key).arg(removed).ignore();
    }
    let changed: Vec<(&String, &V)> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .collect();
    if !changed.is_empty() {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key);
        for (k, v) in changed {
            cmd.arg(k).arg(v);
        }
        pipe.add_command(cmd).ignore();
    }
}

/// Removes this replica's presence (clean shutdown): its members vanish at once.
pub(crate) async fn withdraw(link: &Link, keys: &Keys, node: &str) -> Result<(), BusError> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("DEL")
        .arg(keys.node_alive(node))
        .arg(keys.node_members(node))
        .arg(keys.node_exact(node))
        .arg(keys.node_wild(node))
        .ignore()
        .cmd("SREM")
        .arg(&keys.nodes)
        .arg(node)
        .ignore();
    link.call(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
        .await
}

/// Fleet-wide presence queries.
pub(crate) struct Directory {
    members: Script,
    route: Script,
    replicas: Script,
}

impl Directory {
    pub fn new() -> Self {
        Self {
            members: Script::new(MEMBERS_SCRIPT),
            route: Script::new(ROUTE_SCRIPT),
            replicas: Script::new(REPLICAS_SCRIPT),
        }
    }

    /// Every live replica. Its heartbeat age is reckoned with this replica's `ttl`
    /// (replicas of one deployment share `--presence-ttl-ms`).
    pub async fn replicas(
        &self,
        link: &Link,
        keys: &Keys,
        ttl: Duration,
    ) -> Result<Vec<Replica>, BusError> {
        let script = &self.replicas;
        let raw: Vec<(String, i64, i64)> = link
            .call(|mut conn| async move {
                script
                    .key(&keys.nodes)
                    .arg(keys.prefix())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let mut replicas: Vec<Replica> = raw
            .into_iter()
            .map(|(name, left_ms, members)| Replica {
                name,
                members: members.max(0) as u64,
                heartbeat_age_ms: (ttl.as_millis() as i64 - left_ms).max(0) as u64,
            })
            .collect();
        replicas.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(replicas)
    }

    /// Members of every live replica.
    pub async fn members(&self, link: &Link, keys: &Keys) -> Result<Vec<Member>, BusError> {
        let script = &self.members;
        let raw: Vec<Vec<u8>> = link
            .call(|mut conn| async move {
                script
                    .key(&keys.nodes)
                    .arg(keys.prefix())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw
            .iter()
            .filter_map(|bytes| Member::decode(bytes.as_slice()).ok())
            .collect())
    }

    /// Replicas other than `me` with a subscriber whose patterns match `target`.
    pub async fn route(
        &self,
        link: &Link,
        keys: &Keys,
        me: &str,
        target: &str,
    ) -> Result<Vec<String>, BusError> {
        let script = &self.route;
        let raw: Vec<redis::Value> = link
            .call(|mut conn| async move {
                script
                    .key(&keys.nodes)
                    .arg(keys.prefix())
                    .arg(target)
                    .arg(me)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|entry| routable(entry, target))
            .collect())
    }
}

/// The node of one route-script entry if it has a subscriber of `target`.
fn routable(entry: redis::Value, target: &str) -> Option<String> {
    let redis::Value::Array(parts) = entry else {
        return None;
    };
    let mut parts = parts.into_iter();
    let name = text(parts.next()?)?;
    let exact = matches!(parts.next()?, redis::Value::Int(1));
    let matched = exact
        || parts.any(|p| {
            text(p)
                .and_then(|p| Pattern::parse(&p).ok())
                .is_some_and(|p| p.matches(target))
        });
    matched.then_some(name)
}

fn text(value: redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn member(id: &str, role: &str, channels: &[&str]) -> Member {
        responders::with_roles(Member {
            id: id.into(),
            app: "shop".into(),
            role: role.into(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            ..Member::default()
        })
    }

    #[test]
    fn routes_are_ids_and_role_channels_never_watched_patterns() {
        let members = [
            member("a", "worker", &["shop:worker", "a", "shop:>"]),
            member("b", "worker", &["shop:worker", "b"]),
            member("tail", "", &["shop:>", "shop:orders", "tail"]),
        ];
        let exact = routes(&members);
        assert_eq!(exact.get("shop:worker"), Some(&2));
        assert_eq!(exact.get("a"), Some(&1));
        assert_eq!(exact.get("tail"), Some(&1));
        assert_eq!(exact.get("shop:orders"), None);
        assert_eq!(exact.get("shop:>"), None);
    }

    #[test]
    fn route_entries_match_by_pattern() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let exact = Value::Array(vec![bulk("n1"), Value::Int(1)]);
        assert_eq!(routable(exact, "shop:worker").as_deref(), Some("n1"));
        let wild = Value::Array(vec![bulk("n2"), Value::Int(0), bulk("shop:*"), bulk("x:>")]);
        assert_eq!(routable(wild.clone(), "shop:worker").as_deref(), Some("n2"));
        assert_eq!(routable(wild, "other:worker"), None);
        assert_eq!(routable(Value::Nil, "x"), None);
    }

    #[test]
    fn diffs_write_only_changes() {
        let before: HashMap<String, usize> = [("a".into(), 1), ("b".into(), 1)].into();
        let after: HashMap<String, usize> = [("b".into(), 1), ("c".into(), 2)].into();
        let mut pipe = redis::pipe();
        diff_hash(&mut pipe, "k", &before, &after);
        let commands: Vec<String> = pipe
            .cmd_iter()
            .map(|c| String::from_utf8_lossy(&c.get_packed_command()).into_owned())
            .collect();
        assert_eq!(commands.len(), 2);
        assert!(commands[0].contains("HDEL") && commands[0].contains("\r\na\r\n"));
        assert!(commands[1].contains("HSET") && commands[1].contains("\r\nc\r\n"));
        assert!(!commands[1].contains("\r\nb\r\n"));
    }
}
