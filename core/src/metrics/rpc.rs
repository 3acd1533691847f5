//! Per-RPC metrics of `ipc.v1.Ipc`: a count and a latency histogram per method and
//! status code, recorded by [`crate::grpc::server::IpcServer`] around every call.
//!
//! Unary methods are timed from the request's arrival to the response (the whole
//! handling); streaming methods (Subscribe, Publish, Rollout, Serve, SendMsgs) to the opening
//! of the stream, with the code it opened with (OK) or was refused with.

use std::time::Duration;

use super::text::{Exposition, Histogram, Kind};
use ipc_proto::code_name;

/// The methods of `ipc.v1.Ipc`, the `method` label; anything else counts as `other`.
pub const METHODS: [&str; 13] = [
    "Broadcast",
    "SendMsg",
    "Subscribe",
    "Reply",
    "Members",
    "Publish",
    "Gather",
    "Rollout",
    "Lock",
    "Unlock",
    "Limit",
    "Serve",
    "SendMsgs",
];

const SERVICE_PREFIX: &str = "/ipc.v1.Ipc/";
const OTHER: &str = "other";
/// gRPC status codes 0..=16.
const CODES: usize = 17;

/// One histogram per (method, code), fixed in advance: recording is a few relaxed
/// atomic adds, no lock, no allocation.
#[derive(Debug)]
pub struct RpcMetrics {
    calls: Box<[Histogram]>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self {
            calls: (0..(METHODS.len() + 1) * CODES)
                .map(|_| Histogram::latency())
                .collect(),
        }
    }
}

/// A method of the service, by its index in [`METHODS`] (or `other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method(usize);

impl Method {
    /// The method a request path names (`/ipc.v1.Ipc/SendMsg`).
    pub fn of_path(path: &str) -> Self {
        let name = path.strip_prefix(SERVICE_PREFIX).unwrap_or("");
        Self(
            METHODS
                .iter()
                .position(|m| *m == name)
                .unwrap_or(METHODS.len()),
        )
    }

    pub fn name(self) -> &'static str {
        METHODS.get(self.0).copied().unwrap_or(OTHER)
    }
}

impl RpcMetrics {
    /// Records one call of `method` that ended (or opened its stream) with `code`.
    pub fn record(&self, method: Method, code: tonic::Code, elapsed: Duration) {
        let code = (code as usize).min(CODES - 1);
        self.calls[method.0 * CODES + code].observe_duration(elapsed);
    }

    /// How many calls of `method` ended with `code`.
    pub fn count(&self, method: Method, code: tonic::Code) -> u64 {
        self.calls[method.0 * CODES + code as usize].count()
    }

    /// Writes `ipc_rpc_requests_total` and `ipc_rpc_duration_seconds`, with a series
    /// per (method, code) seen so far.
    pub fn write(&self, out: &mut Exposition, binary: &str) {
        let seen = || {
            self.calls
                .iter()
                .enumerate()
                .filter(|(_, h)| h.count() > 0)
                .map(|(i, h)| {
                    let method = Method(i / CODES).name();
                    let code = code_name(tonic::Code::from_i32((i % CODES) as i32));
                    (method, code, h)
                })
        };
        out.family(
            "ipc_rpc_requests_total",
            Kind::Counter,
            &format!(
                "ipc.v1.Ipc calls this {binary} answered, by method and gRPC status code (streams count when opened)."
            ),
        );
        for (method, code, h) in seen() {
            out.sample(
                "ipc_rpc_requests_total",
                &[("method", method), ("code", code)],
                h.count(),
            );
        }
        out.family(
            "ipc_rpc_duration_seconds",
            Kind::Histogram,
            &format!(
                "Time this {binary} took to answer ipc.v1.Ipc calls (to open the stream for streaming methods), by method and code."
            ),
        );
        for (method, code, h) in seen() {
            out.histogram(
                "ipc_rpc_duration_seconds",
                &[("method", method), ("code", code)],
                h,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_named_by_their_path() {
        assert_eq!(Method::of_path("/ipc.v1.Ipc/SendMsg").name(), "SendMsg");
        assert_eq!(Method::of_path("/ipc.v1.Ipc/Serve").name(), "Serve");
        assert_eq!(Method::of_path("/ipc.v1.Ipc/Nope").name(), "other");
        assert_eq!(
            Method::of_path("/grpc.health.v1.Health/Check").name(),
            "other"
        );
    }

    #[test]
    fn only_seen_series_are_written() {
        let rpc = RpcMetrics::default();
        let send = Method::of_path("/ipc.v1.Ipc/SendMsg");
        rpc.record(send, tonic::Code::Ok, Duration::from_millis(2));
        rpc.record(send, tonic::Code::Unavailable, Duration::from_millis(1));
        rpc.record(send, tonic::Code::Ok, Duration::from_millis(3));
        assert_eq!(rpc.count(send, tonic::Code::Ok), 2);
        let mut out = Exposition::new();
        rpc.write(&mut out, "replica");
        let text = out.finish();
        assert!(text.contains("ipc_rpc_requests_total{method=\"SendMsg\",code=\"OK\"} 2\n"));
        assert!(
            text.contains("ipc_rpc_requests_total{method=\"SendMsg\",code=\"UNAVAILABLE\"} 1\n")
        );
        assert!(!text.contains("Broadcast"));
    }
}
