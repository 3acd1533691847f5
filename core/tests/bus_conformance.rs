//! The bus conformance suite (`ipc_testkit::conformance`) on the memory bus: a
//! node alone, its log a ring in memory.

use std::sync::Arc;

use ipc_core::memory::{MemoryBus, Retention};
use ipc_core::{Node, NodeConfig};
use ipc_testkit::conformance::{Fleet, FleetSpec};

async fn memory_fleet(spec: FleetSpec) -> Fleet {
    let retention = Retention {
        messages: spec.retention,
        ..Retention::default()
    };
    let node = Node::new(
        NodeConfig {
            name: "conf-memory".into(),
            ..NodeConfig::default()
        },
        Arc::new(MemoryBus::new(retention)),
    );
    Fleet::new(vec![node], ())
}

ipc_testkit::bus_conformance!(memory_fleet);
