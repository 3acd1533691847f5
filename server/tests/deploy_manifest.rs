//! The control plane's Kubernetes Deployment must start: its arguments and
//! environment are parsed by the real `Config` and pass the server's security rule
//! with a tokens file that `deploy/k8s/issue-token.sh` wrote (a manifest whose
//! flags the server refuses would crash-loop in the cluster).

use std::path::Path;
use std::process::Command;

use clap::{CommandFactory as _, Parser};
use ipc_server::Config;
use ipc_server::security::Security;
use serde::Deserialize as _;

fn deploy(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// The Deployment's arguments, then its literal environment variables as the
/// flags they stand for (clap takes a variable only when its flag is absent).
fn deployment_command_line() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("k8s/base/server.yaml")).unwrap();
    let deployment = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "Deployment")
        .expect("server.yaml has the Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"][0], "ipc-server");
    let mut line: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let flags = Config::command();
    for var in container["env"].as_array().into_iter().flatten() {
        let (Some(name), Some(value)) = (var["name"].as_str(), var["value"].as_str()) else {
            continue; // from the downward API
        };
        let flag = flags
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name))
            .and_then(|a| a.get_long())
            .unwrap_or_else(|| panic!("{name} is no variable of ipc-server"));
        if !line.iter().any(|a| *a == format!("--{flag}")) {
            line.push(format!("--{flag}={value}"));
        }
    }
    line
}

#[test]
fn the_deployment_starts_with_a_tokens_file_the_script_wrote() {
    let mut args = deployment_command_line();
    assert!(
        !args.iter().any(|a| a.starts_with("--insecure")),
        "the base authenticates"
    );
    // The tokens file as issue-token.sh writes it, where the Secret is mounted.
    let out = tempfile::tempdir().unwrap();
    for issue in [&["shop", "shop"][..], &["--operator", "ops", "shop"]] {
        let status = Command::new(deploy("k8s/issue-token.sh"))
            .args(issue)
            .env("OUT_DIR", out.path())
            .stdout(std::process::Stdio::null())
            .status()
            .expect("running issue-token.sh (bash, openssl)");
        assert!(status.success(), "issue-token.sh {issue:?}");
    }
    let tokens_at = args.iter().position(|a| a == "--tokens").expect("--tokens") + 1;
    args[tokens_at] = out.path().join("tokens.toml").display().to_string();

    let config = Config::try_parse_from(std::iter::once("ipc-server".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("the Deployment's args are refused by ipc-server:\n{e}"));
    assert!(
        !config.listen.ip().is_loopback(),
        "the Service must reach the pod"
    );
    let security = Security::load(&config.security, config.listen)
        .unwrap_or_else(|e| panic!("the Deployment would not start: {e:#}"));
    let tokens = security.tokens.expect("callers need a token");
    let names: Vec<String> = tokens
        .table()
        .entries()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names, ["ns-shop", "ops"]);
    assert!(
        config.security.tokens_watch.is_some(),
        "the mounted Secret is re-read when it changes"
    );
    assert!(config.redis.is_some(), "replicas need --redis");
    assert!(
        config.injector.injector_listen.is_some(),
        "the webhook is served by the control plane"
    );
    assert_eq!(
        config.injector.sidecar.token_secret, "fleet-ipc-token",
        "injected sidecars mount their namespace's token"
    );
}
