//! Each workload group run against every system: its cases, one row per system in
//! the report, a skipped row naming why a system could not run.
//!
//! - [`pubsub`]: throughput, latency, fan-out, idle memory (workloads 1, 2, 4, 5).
//! - [`requests`]: round trips, the sidecar's hop, coordination (3, 6, 7).
//! - [`durability`]: a TLS Redis with a replica, a Sentinel failover (8, 9).
//! - [`fleet_operations`]: Gather and Rollout (10).

pub mod durability;
pub mod fleet_operations;
pub mod pubsub;
pub mod requests;

use crate::payload;
use crate::workloads::percentile_us;

/// A fresh subject per run, so runs never see each other's messages.
pub fn subject(kind: &str) -> String {
    format!("bench:{kind}{}", payload::now_ns())
}

pub fn note(incomplete: &Option<String>) -> Option<String> {
    incomplete.as_ref().map(|e| format!("INCOMPLETE: {e}"))
}

pub fn latency_figures(h: &hdrhistogram::Histogram<u64>) -> Vec<(&'static str, f64, &'static str)> {
    vec![
        ("p50", percentile_us(h, 50.0), "µs"),
        ("p99", percentile_us(h, 99.0), "µs"),
        ("p99.9", percentile_us(h, 99.9), "µs"),
    ]
}

pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
