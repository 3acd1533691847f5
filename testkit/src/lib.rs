//! Test harness for fleet-ipc, shared by every crate's tests and the bench: starts
//! real processes on free loopback ports and stops them on drop, so integration
//! tests exercise the real binaries over real sockets, and reads what they send
//! with a patience bound instead of sleeping.
//!
//! # Layout
//! - [`process`]: the workspace's binaries as processes: [`binary`] finds one,
//!   [`spawn_ready`] starts one and waits for its readiness line (`listening …`;
//!   the bench starts its processes with it too), [`ServerProcess`] (`ipc-server`,
//!   alone or as a replica on Redis) and [`SidecarProcess`] (`ipc-sidecar` of the
//!   usual test pod, with [`uds_client`] over its socket), [`find_program`] for
//!   system programs, [`grpcurl`].
//! - [`stream`]: [`next`], [`subscribe`] past `ipc:subscribed`, [`until`],
//!   [`wait_health`] on the health Watch stream, [`eventually`] for polled
//!   answers; all bounded by [`PATIENCE`].
//! - [`http`]: one HTTP/1.1 GET on a side port, Prometheus samples ([`metric`],
//!   [`wait_for_metric`]), a JSON POST over HTTPS with curl.
//! - [`redis`]: a private `redis-server` on a free port that can be stopped and
//!   restarted.
//! - [`tls`]: a test certificate authority and the certificates it signs.
//! - [`bad_input`]: the bad-input campaign's requests and the codes they get.
//! - [`otlp`]: an OTLP/gRPC trace receiver that keeps the spans it is sent.
//! - [`proxy`]: a TCP proxy that holds back a server's answers and cuts connections.
//! - [`conformance`]: the rules every bus must keep, written once, run in-process
//!   against each bus through [`bus_conformance!`].
//! - [`reached`] (here): who a broadcast on a channel would reach.

pub mod bad_input;
pub mod conformance;
pub mod http;
pub mod otlp;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod stream;
pub mod tls;

pub use http::{http_answer, http_get, metric, wait_for_metric};
pub use process::{
    POD_ID, READY_TIMEOUT, ServerProcess, SidecarProcess, binary, find_program, grpcurl, pod_args,
    run_grpcurl, spawn_ready, uds_client,
};
pub use stream::{
    PATIENCE, end_status, eventually, next, subscribe, subscriber_id, until, wait_health,
};

/// The app id of the test fleets (replicas, the usual test pod, workers).
pub const TEST_APP: &str = "shop";

/// The ids of every member a broadcast on `channel` would reach (Members with
/// `channel`), sorted; `app` goes as `ipc-app` metadata when given. Panics with the
/// status when the node refuses.
pub async fn reached(
    client: &mut ipc_proto::pb::ipc_client::IpcClient<tonic::transport::Channel>,
    app: Option<&str>,
    channel: &str,
) -> Vec<String> {
    let mut request = tonic::Request::new(ipc_proto::pb::MembersRequest {
        channel: channel.into(),
        ..Default::default()
    });
    if let Some(app) = app {
        request
            .metadata_mut()
            .insert("ipc-app", app.parse().expect("an app id"));
    }
    let mut reached: Vec<String> = client
        .members(request)
        .await
        .unwrap_or_else(|e| panic!("members of {channel}: {e}"))
        .into_inner()
        .members
        .into_iter()
        .map(|m| m.id)
        .collect();
    reached.sort();
    reached
}
