//! The bus conformance suite (`ipc_testkit::conformance`) on the upstream bus: two
//! sidecar nodes in this process, each on its own upstream subscription to one
//! real `ipc-server`, so that every rule is checked from pod to pod through the
//! control plane. The server's log and the sidecars' rings keep the suite's
//! retention.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ipc_core::{Node, NodeConfig};
use ipc_sidecar::PodIdentity;
use ipc_sidecar::hooks::Hooks;
use ipc_sidecar::ring::RingLimits;
use ipc_sidecar::upstream::{UpstreamBus, UpstreamConfig};
use ipc_testkit::ServerProcess;
use ipc_testkit::conformance::{self, Fleet, FleetSpec};

fn pod(server: &ServerProcess, name: &str, retention: usize) -> Arc<Node> {
    let bus = Arc::new(UpstreamBus::new(
        UpstreamConfig {
            addresses: vec![server.url()],
            identity: PodIdentity {
                id: name.into(),
                app: "conf".into(),
                role: None,
                tag: None,
                labels: HashMap::new(),
            },
            node_name: name.into(),
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(1),
            cover_wait: Duration::from_secs(10),
            buffer: RingLimits {
                messages: retention,
                bytes: 64 << 20,
            },
            token_file: None,
            tls: tonic::transport::ClientTlsConfig::new(),
            max_frame: ipc_core::mount::max_frame_bytes(1 << 20),
            default_request_wait: Duration::from_secs(300),
        },
        Arc::new(Hooks::new(&[], Duration::from_secs(10))),
    ));
    Node::with_own_member(
        NodeConfig {
            name: name.into(),
            default_app: Some("conf".into()),
            ..NodeConfig::default()
        },
        bus.clone(),
        bus.pod(),
    )
}

async fn upstream_fleet(spec: FleetSpec) -> Fleet {
    let retention = spec.retention.to_string();
    let server = ServerProcess::start(&["--app", "conf", "--retention", &retention]);
    let mut nodes = Vec::new();
    for name in ["conf-pod-a", "conf-pod-b"] {
        let node = pod(&server, name, spec.retention);
        conformance::serving(&node).await;
        nodes.push(node);
    }
    Fleet::new(nodes, server)
}

ipc_testkit::bus_conformance!(upstream_fleet);
