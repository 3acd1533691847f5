//! The control plane's Kubernetes Deployment must start: its arguments are parsed by
//! the real `Config` and pass the server's security rule (a manifest whose flags the
//! server refuses would crash-loop in the cluster).

use clap::Parser;
use ipc_server::Config;
use ipc_server::security::Security;
use serde::Deserialize as _;

#[test]
fn the_deployment_arguments_are_accepted_by_the_server() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/k8s/base/server.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let deployment = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "Deployment")
        .expect("server.yaml has the Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"][0], "ipc-server");
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let config = Config::try_parse_from(std::iter::once("ipc-server".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("the Deployment's args are refused by ipc-server:\n{e}"));
    assert!(
        !config.listen.ip().is_loopback(),
        "the Service must reach the pod"
    );
    Security::load(&config.security, config.listen)
        .unwrap_or_else(|e| panic!("the Deployment would not start: {e:#}"));
    assert!(config.redis.is_some(), "replicas need --redis");
    assert!(
        config.injector.injector_listen.is_some(),
        "the webhook is served by the control plane"
    );
}
