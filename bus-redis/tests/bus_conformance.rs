//! The bus conformance suite (`ipc_testkit::conformance`) on the Redis bus: two
//! replicas in this process sharing a private `redis-server`, so that every rule
//! is checked across replicas (published on one, received on the other).

use std::sync::Arc;
use std::time::Duration;

use ipc_bus_redis::{RedisBus, RedisBusConfig};
use ipc_core::{Node, NodeConfig};
use ipc_testkit::conformance::{self, Fleet, FleetSpec};
use ipc_testkit::redis::RedisServer;

async fn redis_fleet(spec: FleetSpec) -> Fleet {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for name in ["conf-replica-a", "conf-replica-b"] {
        let mut config = RedisBusConfig::new(redis.url());
        config.prefix = "conformance".into();
        config.retention = spec.retention;
        config.presence_ttl = Duration::from_millis(1500);
        let bus = RedisBus::connect(config).await.expect("the Redis bus");
        let node = Node::new(
            NodeConfig {
                name: name.into(),
                ..NodeConfig::default()
            },
            Arc::new(bus),
        );
        conformance::serving(&node).await;
        nodes.push(node);
    }
    Fleet::new(nodes, redis)
}

ipc_testkit::bus_conformance!(redis_fleet);
