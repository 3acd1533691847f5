//! The faults a soak injects, one at a time or overlapping, drawn from a seed.

use std::time::{Duration, Instant};

use crate::cluster::{Redis, Replica, Sidecar};

/// A small deterministic generator (xorshift64*), so that a seed replays a run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A duration in `[lo, hi]` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

/// Every kind of fault; the last three overlap two faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    KillReplica,
    TermReplica,
    PauseReplica,
    KillRedis,
    KillSidecar,
    TermSidecar,
    /// Redis down; a replica restarted meanwhile (it starts without reaching Redis).
    ReplicaStartedDuringRedisOutage,
    /// Redis down; a sidecar restarted meanwhile (its pod's processes resume).
    SidecarRestartedDuringRedisOutage,
    /// A replica paused (SIGSTOP) while Redis restarts.
    RedisRestartedWhileReplicaPaused,
}

pub const ALL: [Fault; 9] = [
    Fault::KillReplica,
    Fault::TermReplica,
    Fault::PauseReplica,
    Fault::KillRedis,
    Fault::KillSidecar,
    Fault::TermSidecar,
    Fault::ReplicaStartedDuringRedisOutage,
    Fault::SidecarRestartedDuringRedisOutage,
    Fault::RedisRestartedWhileReplicaPaused,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillReplica => "SIGKILL replica",
            Fault::TermReplica => "SIGTERM replica",
            Fault::PauseReplica => "SIGSTOP replica",
            Fault::KillRedis => "SIGKILL Redis",
            Fault::KillSidecar => "SIGKILL sidecar",
            Fault::TermSidecar => "SIGTERM sidecar",
            Fault::ReplicaStartedDuringRedisOutage => "replica started during Redis outage",
            Fault::SidecarRestartedDuringRedisOutage => "sidecar restarted during Redis outage",
            Fault::RedisRestartedWhileReplicaPaused => "Redis restarted while a replica is paused",
        }
    }

    pub fn overlapping(self) -> bool {
        matches!(
            self,
            Fault::ReplicaStartedDuringRedisOutage
                | Fault::SidecarRestartedDuringRedisOutage
                | Fault::RedisRestartedWhileReplicaPaused
        )
    }
}

/// One fault as it happened: when it began and when everything was back.
#[derive(Debug, Clone)]
pub struct Injected {
    pub fault: Fault,
    pub started: Instant,
    pub healed: Instant,
}

/// The processes faults act on.
pub struct Targets<'a> {
    pub redis: &'a mut Redis,
    pub replicas: &'a mut [Replica],
    pub sidecars: &'a mut [Sidecar],
}

async fn pause(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Injects `fault` and heals it; blocking process control runs on this task (the
/// clients run on other worker threads).
pub async fn inject(fault: Fault, t: &mut Targets<'_>, rng: &mut Rng) -> anyhow::Result<Injected> {
    let started = Instant::now();
    let r = rng.below(t.replicas.len());
    let s = rng.below(t.sidecars.len());
    match fault {
        Fault::KillReplica | Fault::TermReplica => {
            if fault == Fault::KillReplica {
                t.replicas[r].kill();
            } else {
                t.replicas[r].terminate();
            }
            pause(rng.millis(1000, 3000)).await;
            t.replicas[r].launch()?;
        }
        Fault::PauseReplica => {
            t.replicas[r].pause();
            pause(rng.millis(3000, 8000)).await;
            t.replicas[r].resume();
        }
        Fault::KillRedis => {
            t.redis.kill();
            pause(rng.millis(500, 3000)).await;
            t.redis.launch()?;
        }
        Fault::KillSidecar | Fault::TermSidecar => {
            if fault == Fault::KillSidecar {
                t.sidecars[s].kill();
            } else {
                t.sidecars[s].terminate();
            }
            pause(rng.millis(500, 2000)).await;
            t.sidecars[s].launch()?;
        }
        Fault::ReplicaStartedDuringRedisOutage => {
            t.redis.kill();
            pause(rng.millis(300, 1000)).await;
            t.replicas[r].kill();
            pause(rng.millis(300, 1000)).await;
            t.replicas[r].launch()?;
            pause(rng.millis(1000, 3000)).await;
            t.redis.launch()?;
        }
        Fault::SidecarRestartedDuringRedisOutage => {
            t.redis.kill();
            pause(rng.millis(300, 1000)).await;
            t.sidecars[s].kill();
            pause(rng.millis(300, 1000)).await;
            t.sidecars[s].launch()?;
            pause(rng.millis(1000, 3000)).await;
            t.redis.launch()?;
        }
        Fault::RedisRestartedWhileReplicaPaused => {
            t.replicas[r].pause();
            pause(rng.millis(500, 1500)).await;
            t.redis.kill();
            pause(rng.millis(500, 2000)).await;
            t.redis.launch()?;
            pause(rng.millis(1000, 3000)).await;
            t.replicas[r].resume();
        }
    }
    Ok(Injected {
        fault,
        started,
        healed: Instant::now(),
    })
}

/// The order of faults: every kind once (shuffled by the seed) so that even a short
/// run has the overlapping ones, then random kinds.
pub fn plan(rng: &mut Rng, count: usize) -> Vec<Fault> {
    let mut first = ALL.to_vec();
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i + 1));
    }
    (0..count)
        .map(|i| {
            first
                .get(i)
                .copied()
                .unwrap_or_else(|| ALL[rng.below(ALL.len())])
        })
        .collect()
}
