//! Workload 8 (issue 17): broadcasts through two replicas on a TLS-only Redis that
//! has one Redis replica — as they are without waiting, and with
//! `--redis-min-replicas 1` (each acknowledgement waits for the replica, `WAIT`) —
//! against the benchmark's own `XADD` over TLS on the same Redis, and `XADD` +
//! `WAIT 1 0`: what TLS and waiting for a replica cost, and how much fleet-ipc adds.
//!
//! The Redis pair is started with the testkit (a test CA, a certificate for
//! localhost), without persistence, so the figures are TLS and replication only.

use ipc_testkit::redis::RedisServer as TestRedis;
use ipc_testkit::tls::TestCa;

use crate::procs::{Binary, IpcServer};

/// A TLS primary, its TLS replica, and how to reach them.
pub struct TlsPair {
    pub ca: TestCa,
    pub primary: TestRedis,
    _replica: TestRedis,
}

impl TlsPair {
    /// Starts both and waits until the replica is attached (WAIT would answer 0
    /// before).
    pub async fn start() -> anyhow::Result<Self> {
        let ca = TestCa::new("ipc-bench CA");
        let no_persistence = ["--appendonly", "no"];
        let primary = start(|| TestRedis::start_tls(&ca, false, &no_persistence))?;
        let port = primary.port().to_string();
        let mut replica_args = vec![
            "--replicaof",
            "127.0.0.1",
            &port,
            "--tls-replication",
            "yes",
        ];
        replica_args.extend(no_persistence);
        let replica = start(|| TestRedis::start_tls(&ca, false, &replica_args))?;
        let pair = Self {
            ca,
            primary,
            _replica: replica,
        };
        let mut connection = pair.client()?.get_multiplexed_async_connection().await?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            // WAIT 1 with a short timeout answers 1 once the replica is in sync.
            let _: () = redis::cmd("SET")
                .arg("bench:replica-check")
                .arg(1)
                .query_async(&mut connection)
                .await?;
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(100)
                .query_async(&mut connection)
                .await?;
            if acked >= 1 {
                return Ok(pair);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the Redis replica did not attach within 15 s"
            );
        }
    }

    pub fn url(&self) -> String {
        format!("rediss://localhost:{}/", self.primary.port())
    }

    /// A client of the primary over TLS, trusting the test CA.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        Ok(redis::Client::build_with_tls(
            self.url(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(self.ca.cert_pem().into_bytes()),
            },
        )?)
    }

    /// Two `ipc-server` replicas on the primary, over TLS, waiting for `min_replicas`.
    pub fn servers(
        &self,
        binary: &Binary,
        min_replicas: u32,
        limits: &[&str],
    ) -> anyhow::Result<[IpcServer; 2]> {
        let url = self.url();
        let ca = self.ca.cert_path().display().to_string();
        let min_replicas = min_replicas.to_string();
        let start = |node: &str| {
            let mut args = vec![
                "--redis",
                &url,
                "--redis-ca",
                &ca,
                "--redis-min-replicas",
                &min_replicas,
                "--node",
                node,
            ];
            args.extend(limits);
            IpcServer::start(binary, &args)
        };
        Ok([start("bench-tls-a")?, start("bench-tls-b")?])
    }
}

/// A testkit Redis, whose start panics with the reason (redis-server missing, not
/// ready in time): the reason becomes this workload's skip note, not the run's end.
fn start(redis: impl FnOnce() -> TestRedis) -> anyhow::Result<TestRedis> {
    started("a TLS redis-server", redis)
}

/// Runs a testkit start (`what`: a redis-server, a redis-sentinel), which panics
/// with the reason it failed; the reason becomes an error, not the run's end.
pub fn started<T>(what: &str, start: impl FnOnce() -> T) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)).map_err(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown".into());
        anyhow::anyhow!("starting {what}: {reason}")
    })
}
