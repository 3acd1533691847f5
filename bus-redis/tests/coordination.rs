//! Lock, Unlock and Limit across two `ipc-server` replicas on one real Redis:
//! mutual exclusion checked by the holders themselves (fence-stamped entries in a
//! shared log), fences that only grow (across a Redis restart too), a waiter woken
//! by the release on another replica, expiry, renewal, and one token bucket shared
//! by callers on both replicas.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ipc_proto::pb::{LimitRequest, LockRequest, UnlockRequest};
use parking_lot::Mutex;
use tonic_health::pb::health_check_response::ServingStatus;

fn lock(name: &str, ttl_ms: u32, wait_ms: u32) -> LockRequest {
    LockRequest {
        name: name.into(),
        ttl_ms,
        wait_ms,
        fence: 0,
    }
}

async fn release(client: &mut Client, name: &str, fence: u64) -> bool {
    client
        .unlock(UnlockRequest {
            name: name.into(),
            fence,
        })
        .await
        .expect("unlock")
        .into_inner()
        .released
}

/// One event of the shared log: a holder starting or ending its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Start(u64),
    End(u64),
}

/// The resource the lock protects: it refuses writes stamped with a fence older
/// than one it already accepted, as a fenced resource should.
#[derive(Default)]
struct FencedLog {
    events: Vec<Event>,
    highest: u64,
}

impl FencedLog {
    fn write(&mut self, event: Event) {
        let fence = match event {
            Event::Start(f) | Event::End(f) => f,
        };
        assert!(
            fence >= self.highest,
            "write with fence {fence} after {}",
            self.highest
        );
        self.highest = fence;
        self.events.push(event);
    }
}

#[tokio::test]
async fn concurrent_acquirers_on_two_replicas_never_overlap_and_fences_grow() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let log = Arc::new(Mutex::new(FencedLog::default()));
    const WORKERS: usize = 8;
    const ROUNDS: usize = 5;
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let mut client = if worker % 2 == 0 {
            a.client().await
        } else {
            b.client().await
        };
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let granted = client
                    .lock(lock(":critical", 20_000, 25_000))
                    .await
                    .expect("lock")
                    .into_inner();
                assert!(
                    granted.acquired,
                    "waited 25 s without the lock: {granted:?}"
                );
                log.lock().write(Event::Start(granted.fence));
                // Work while holding: let every other task run meanwhile.
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                log.lock().write(Event::End(granted.fence));
                assert!(release(&mut client, ":critical", granted.fence).await);
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(PATIENCE * 4, task)
            .await
            .expect("every worker done")
            .expect("worker succeeded");
    }
    let events = log.lock().events.clone();
    assert_eq!(events.len(), WORKERS * ROUNDS * 2);
    let mut last = 0;
    for pair in events.chunks(2) {
        match pair {
            [Event::Start(s), Event::End(e)] if s == e => {
                assert!(
                    *s > last,
                    "fence {s} after {last}: fences must strictly grow"
                );
                last = *s;
            }
            other => panic!("two holders at once: {other:?} in {events:?}"),
        }
    }
}

#[tokio::test]
async fn a_waiter_on_another_replica_acquires_right_after_the_release() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let mut ca = a.client().await;
    let held = ca
        .lock(lock(":nightly", 60_000, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);
    let mut cb = b.client().await;
    let waiter = tokio::spawn(async move { cb.lock(lock(":nightly", 60_000, 50_000)).await });
    eventually("the waiter is waiting on replica b", || async {
        (metric(&b, "ipc_lock_waiters").await == 1).then_some(())
    })
    .await;
    assert!(!waiter.is_finished());
    let released = Instant::now();
    assert!(release(&mut ca, ":nightly", held.fence).await);
    let granted = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("granted long before the 60 s lease would end")
        .unwrap()
        .expect("lock")
        .into_inner();
    let handover = released.elapsed();
    assert!(granted.acquired && granted.fence > held.fence);
    assert_eq!(granted.holder.split(':').next(), Some("127.0.0.1"));
    eprintln!("hand-over across replicas: {handover:?}");
    assert_eq!(metric(&b, "ipc_lock_waiters").await, 0);
}

#[tokio::test]
async fn expiry_and_renewal() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    let mut ca = a.client().await;
    let mut cb = b.client().await;

    // Renewal with the fence keeps the lease (and its fence) past its first TTL.
    let first = ca
        .lock(lock(":renewed", 1500, 0))
        .await
        .unwrap()
        .into_inner();
    let mut expires = first.expires_ms;
    let until = first.expires_ms + 1500;
    while ipc_core::now_ms() < until {
        let renewed = ca
            .lock(LockRequest {
                fence: first.fence,
                ..lock(":renewed", 1500, 0)
            })
            .await
            .unwrap()
            .into_inner();
        assert!(renewed.acquired, "renewal refused: {renewed:?}");
        assert_eq!(renewed.fence, first.fence);
        assert!(renewed.expires_ms >= expires);
        expires = renewed.expires_ms;
        let other = cb
            .lock(lock(":renewed", 1500, 0))
            .await
            .unwrap()
            .into_inner();
        assert!(!other.acquired, "taken while renewed: {other:?}");
        tokio::time::sleep(Duration::from_millis(300)).await; // the renewal period
    }
    // A wrong fence is a fresh attempt, refused while the lease lives.
    let wrong = ca
        .lock(LockRequest {
            fence: first.fence + 1,
            ..lock(":renewed", 1500, 0)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!wrong.acquired);

    // Not renewed, it expires: a waiter on the other replica gets it.
    let short = ca.lock(lock(":short", 300, 0)).await.unwrap().into_inner();
    assert!(short.acquired);
    let next = cb
        .lock(lock(":short", 5000, 20_000))
        .await
        .unwrap()
        .into_inner();
    assert!(next.acquired && next.fence > short.fence);
    assert!(
        !release(&mut ca, ":short", short.fence).await,
        "the expired holder frees nothing"
    );
    assert!(
        !ca.lock(LockRequest {
            fence: short.fence,
            ..lock(":short", 5000, 0)
        })
        .await
        .unwrap()
        .into_inner()
        .acquired,
        "nor renews"
    );
    assert!(release(&mut cb, ":short", next.fence).await);
}

#[tokio::test]
async fn fences_keep_growing_across_a_redis_restart() {
    let mut redis = redis();
    let a = replica(&redis.url(), "a");
    let mut ca = a.client().await;
    let first = ca.lock(lock(":job", 60_000, 0)).await.unwrap().into_inner();
    assert!(release(&mut ca, ":job", first.fence).await);

    redis.restart();
    a.wait_health(ServingStatus::Serving).await;
    // The counter itself came back from the append-only file.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let kept: u64 = redis::cmd("GET")
        .arg("test:fence")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, first.fence);
    let second = eventually("a lock after the restart", || {
        let mut ca = ca.clone();
        async move { ca.lock(lock(":job", 60_000, 0)).await.ok() }
    })
    .await
    .into_inner();
    assert!(second.acquired && second.fence > first.fence);

    // Even a Redis that lost everything grants larger fences (they are at least
    // the grant's time in microseconds).
    redis.restart_empty();
    a.wait_health(ServingStatus::Serving).await;
    let third = eventually("a lock after losing the data", || {
        let mut ca = ca.clone();
        async move { ca.lock(lock(":job", 60_000, 0)).await.ok() }
    })
    .await
    .into_inner();
    assert!(third.acquired && third.fence > second.fence);
}

#[tokio::test]
async fn callers_on_two_replicas_share_one_bucket() {
    let redis = redis();
    let a = replica(&redis.url(), "a");
    let b = replica(&redis.url(), "b");
    const INTERVAL_MS: u32 = 2000;
    const RATE: u32 = 4;
    const BURST: u32 = 6;
    const CALLERS: usize = 6;
    let call = LimitRequest {
        name: ":mail".into(),
        rate: RATE,
        interval_ms: INTERVAL_MS,
        burst: BURST,
        cost: 1,
    };
    let interval = Duration::from_millis(u64::from(INTERVAL_MS));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..CALLERS {
        let mut client = if caller % 2 == 0 {
            a.client().await
        } else {
            b.client().await
        };
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            // Allowed calls by the interval they were made in: [0, I) and [I, 2I).
            let mut allowed = [0u32; 2];
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            loop {
                pace.tick().await;
                let sent = start.elapsed();
                let window = (sent.as_millis() / interval.as_millis()) as usize;
                if window >= 2 {
                    return allowed;
                }
                let answer = client
                    .limit(call.clone())
                    .await
                    .expect("limit")
                    .into_inner();
                if answer.allowed {
                    allowed[window] += 1;
                } else {
                    assert!(answer.retry_after_ms > 0);
                }
            }
        }));
    }
    let mut total = [0u32; 2];
    for task in tasks {
        let allowed = task.await.expect("caller");
        total[0] += allowed[0];
        total[1] += allowed[1];
    }
    eprintln!("allowed per interval: {total:?}");
    assert!(
        total[0].abs_diff(BURST + RATE) <= 1,
        "first interval: {} allowed, expected burst + rate = {}",
        total[0],
        BURST + RATE
    );
    assert!(
        total[1].abs_diff(RATE) <= 1,
        "second interval: {} allowed, expected rate = {RATE}",
        total[1]
    );
}

/// A node on the Redis of `redis_url` under `prefix`, in this process: what the
/// admin console of a replica asks (the listing of what is in use is no RPC; the
/// console's HTTP API shows it, tests/e2e/test_console.py).
async fn node_on(redis_url: &str, prefix: &str) -> Arc<ipc_core::Node> {
    let bus = ipc_bus_redis::RedisBus::connect(ipc_bus_redis::RedisBusConfig {
        prefix: prefix.into(),
        ..ipc_bus_redis::RedisBusConfig::new(redis_url)
    })
    .await
    .expect("redis bus");
    ipc_core::Node::new(ipc_core::NodeConfig::default(), Arc::new(bus))
}

#[tokio::test]
async fn leases_and_buckets_in_use_are_listed_from_any_replica() {
    use ipc_core::auth::Grants;
    use ipc_core::channel::Pattern;
    use ipc_core::coord::LeaseInfo;

    let redis = redis();
    let a = replica(&redis.url(), "a");
    let mut ca = a.client().await;
    let lease = ca
        .lock(lock(":db-migrate", 60_000, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(lease.acquired);
    let mail = LimitRequest {
        name: ":mail".into(),
        rate: 1,
        interval_ms: 60_000,
        burst: 5,
        cost: 2,
    };
    assert!(ca.limit(mail).await.unwrap().into_inner().allowed);

    let other_replica = node_on(&redis.url(), "test").await;
    let everyone = ipc_core::Caller::default();
    let in_use = other_replica.in_use(&everyone).await.expect("listing");
    let [listed] = in_use.locks.as_slice() else {
        panic!("one lease expected: {in_use:?}");
    };
    assert_eq!(
        (listed.name.as_str(), listed.holder.as_str(), listed.fence),
        ("shop:db-migrate", lease.holder.as_str(), lease.fence)
    );
    assert!(
        listed.expires_ms.abs_diff(lease.expires_ms) < 1000,
        "expiry {} vs {} granted",
        listed.expires_ms,
        lease.expires_ms
    );
    let [bucket] = in_use.limits.as_slice() else {
        panic!("one bucket expected: {in_use:?}");
    };
    assert_eq!(
        (
            bucket.name.as_str(),
            bucket.tokens,
            bucket.burst,
            bucket.rate
        ),
        ("shop:mail", 3, 5, 1)
    );
    assert!(bucket.interval_ms == 60_000 && bucket.full_in_ms > 100_000);
    assert!(!in_use.truncated);

    // A token sees only the names its lock and limit grants cover.
    let narrow = ipc_core::Caller {
        grants: Some(Arc::new(Grants {
            lock: vec![Pattern::parse("shop:*").unwrap()],
            limit: vec![Pattern::parse("billing:>").unwrap()],
            ..Grants::default()
        })),
        ..ipc_core::Caller::default()
    };
    let seen = other_replica.in_use(&narrow).await.unwrap();
    assert_eq!(seen.locks.len(), 1);
    assert!(seen.limits.is_empty());

    // Another deployment on the same Redis (another prefix) lists none of it.
    let elsewhere = node_on(&redis.url(), "other").await;
    assert_eq!(
        elsewhere.in_use(&everyone).await.unwrap(),
        Default::default()
    );

    // Released, the lease is gone from the listing.
    assert!(release(&mut ca, ":db-migrate", lease.fence).await);
    let after = other_replica.in_use(&everyone).await.unwrap();
    assert_eq!(after.locks, Vec::<LeaseInfo>::new());
}
