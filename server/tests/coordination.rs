//! Lock, Unlock and Limit on one `ipc-server` with the memory bus, over real gRPC:
//! the lease rules, a waiter woken by the release, the errors naming the field,
//! the `lock` and `limit` grants, and the token bucket.

mod support;

use std::time::{Duration, Instant};

use ipc_proto::pb::{LimitRequest, LockRequest, UnlockRequest};
use support::*;
use tonic::Code;

fn lock(name: &str, ttl_ms: u32) -> LockRequest {
    LockRequest {
        name: name.into(),
        ttl_ms,
        ..LockRequest::default()
    }
}

fn unlock(name: &str, fence: u64) -> UnlockRequest {
    UnlockRequest {
        name: name.into(),
        fence,
    }
}

#[tokio::test]
async fn one_holder_renewal_and_release() {
    let server = server(&["--app", "shop"]);
    let mut a = server.client().await;
    let mut b = server.client().await;

    let first = a.lock(lock(":migrate", 60_000)).await.unwrap().into_inner();
    assert!(first.acquired);
    assert!(first.fence > 0);
    assert!(first.expires_ms > ipc_core::now_ms());

    let refused = b
        .lock(lock("shop:migrate", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(!refused.acquired, "the name expands to the same lock");
    assert_eq!(refused.holder, first.holder);
    assert_eq!(refused.fence, 0);

    let mut renew = lock(":migrate", 120_000);
    renew.fence = first.fence;
    let renewed = a.lock(renew).await.unwrap().into_inner();
    assert!(renewed.acquired);
    assert_eq!(renewed.fence, first.fence);
    assert!(renewed.expires_ms > first.expires_ms);

    let stale = b.unlock(unlock(":migrate", first.fence - 1)).await.unwrap();
    assert!(!stale.into_inner().released, "a stale fence frees nothing");
    assert!(
        !b.lock(lock(":migrate", 1000))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );

    assert!(
        a.unlock(unlock(":migrate", first.fence))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let next = b.lock(lock(":migrate", 1000)).await.unwrap().into_inner();
    assert!(next.acquired && next.fence > first.fence);
}

#[tokio::test]
async fn a_waiter_acquires_when_the_holder_releases() {
    let server = server(&[]);
    let mut a = server.client().await;
    let mut b = server.client().await;
    let held = a
        .lock(lock("jobs:nightly", 60_000))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);

    let mut waiting = lock("jobs:nightly", 60_000);
    waiting.wait_ms = 60_000;
    let waiter = tokio::spawn(async move { b.lock(waiting).await });
    // Release only once the waiter is known to wait, then time the hand-over.
    wait_for_metric(&server, "ipc_lock_waiters", |n| n == 1).await;
    let released_at = Instant::now();
    assert!(
        a.unlock(unlock("jobs:nightly", held.fence))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    let answer = tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("woken by the release, long before the 60 s lease or wait")
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(answer.acquired && answer.fence > held.fence);
    eprintln!("hand-over took {:?}", released_at.elapsed());
}

#[tokio::test]
async fn a_wait_ends_at_the_grpc_deadline_and_an_expired_lease_is_granted() {
    let server = server(&[]);
    let mut a = server.client().await;
    let held = a.lock(lock("x", 60_000)).await.unwrap().into_inner();
    let mut waiting = tonic::Request::new(LockRequest {
        wait_ms: 60_000,
        ..lock("x", 1000)
    });
    waiting.set_timeout(Duration::from_millis(500));
    let answer = a.lock(waiting).await.unwrap().into_inner();
    assert!(
        !answer.acquired,
        "answered before the deadline, not granted"
    );
    assert_eq!(answer.expires_ms, held.expires_ms);

    let short = a.lock(lock("y", 50)).await.unwrap().into_inner();
    let mut waiting = lock("y", 1000);
    waiting.wait_ms = 30_000;
    let next = a.lock(waiting).await.unwrap().into_inner();
    assert!(
        next.acquired && next.fence > short.fence,
        "granted once the TTL ran out"
    );
    assert!(
        !a.unlock(unlock("y", short.fence))
            .await
            .unwrap()
            .into_inner()
            .released
    );
}

fn assert_invalid(status: tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(field),
        "{field} not named in {status:?}"
    );
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let server = server(&[]);
    let mut c = server.client().await;
    assert_invalid(c.lock(lock("", 1000)).await.unwrap_err(), "name");
    assert_invalid(c.lock(lock("a:*", 1000)).await.unwrap_err(), "name");
    assert_invalid(c.lock(lock("x:", 1000)).await.unwrap_err(), "name");
    assert_invalid(c.lock(lock("x", 0)).await.unwrap_err(), "ttl_ms");
    assert_invalid(c.lock(lock("x", 3_600_001)).await.unwrap_err(), "ttl_ms");
    let mut long_wait = lock("x", 1000);
    long_wait.wait_ms = 3_600_000;
    assert_invalid(c.lock(long_wait).await.unwrap_err(), "wait_ms");
    assert_invalid(c.unlock(unlock("x", 0)).await.unwrap_err(), "fence");
    assert_invalid(c.unlock(unlock("a b", 1)).await.unwrap_err(), "name");
    let limit = |rate, burst, cost| LimitRequest {
        name: "mail".into(),
        rate,
        burst,
        cost,
        ..LimitRequest::default()
    };
    assert_invalid(c.limit(limit(0, 0, 0)).await.unwrap_err(), "rate");
    assert_invalid(c.limit(limit(5, 2, 3)).await.unwrap_err(), "cost");
    let mut long = limit(1, 0, 0);
    long.interval_ms = u32::MAX;
    assert_invalid(c.limit(long).await.unwrap_err(), "interval_ms");
}

#[tokio::test]
async fn limit_allows_the_burst_then_the_rate() {
    let server = server(&[]);
    let mut c = server.client().await;
    let call = LimitRequest {
        name: "mail:out".into(),
        rate: 1,
        interval_ms: 60_000,
        burst: 5,
        cost: 1,
    };
    let mut allowed = 0;
    for _ in 0..8 {
        let answer = c.limit(call.clone()).await.unwrap().into_inner();
        if answer.allowed {
            allowed += 1;
            assert_eq!(answer.retry_after_ms, 0);
        } else {
            assert_eq!(answer.remaining, 0);
            assert!(answer.retry_after_ms > 50_000 && answer.retry_after_ms <= 60_000);
        }
    }
    assert_eq!(allowed, 5);
    let other = LimitRequest {
        name: "mail:other".into(),
        ..call
    };
    assert!(c.limit(other).await.unwrap().into_inner().allowed);
}

#[tokio::test]
async fn lock_and_limit_grants() {
    let (ops, ops_entry) = token("ops", "shop", "lock = [\":jobs:>\"]\nlimit = [\":mail\"]");
    let (other, other_entry) = token("other", "shop", "lock = [\":jobs:>\"]");
    let (idle, idle_entry) = token("idle", "shop", "");
    let file = TokensFile::new(&format!("{ops_entry}\n{other_entry}\n{idle_entry}"));
    let server = server(&["--tokens", file.arg()]);
    let mut c = server.client().await;

    let held = c
        .lock(authed(lock(":jobs:nightly", 60_000), &ops))
        .await
        .unwrap()
        .into_inner();
    assert!(held.acquired);
    assert_eq!(held.holder, "ops", "the holder is the token's name");

    // Another identity with the right fence neither renews nor frees the lease.
    let mut renew = lock(":jobs:nightly", 60_000);
    renew.fence = held.fence;
    assert!(
        !c.lock(authed(renew, &other))
            .await
            .unwrap()
            .into_inner()
            .acquired
    );
    let stolen = c
        .unlock(authed(unlock(":jobs:nightly", held.fence), &other))
        .await;
    assert!(!stolen.unwrap().into_inner().released);

    let denied = c
        .lock(authed(lock(":other", 1000), &ops))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("lock") && denied.message().contains("shop:other"));
    let denied = c
        .unlock(authed(unlock(":jobs:nightly", held.fence), &idle))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    let mail = LimitRequest {
        name: ":mail".into(),
        rate: 10,
        ..LimitRequest::default()
    };
    assert!(
        c.limit(authed(mail.clone(), &ops))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let denied = c.limit(authed(mail, &other)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("limit"));

    assert!(
        c.unlock(authed(unlock(":jobs:nightly", held.fence), &ops))
            .await
            .unwrap()
            .into_inner()
            .released
    );
}
