//! `ipcctl inject`: the webhook's patch applied offline to the example manifests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn ipcctl(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ipcctl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ipcctl");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/k8s/example")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn injects_the_sidecar_into_the_annotated_example_and_is_idempotent() {
    let out = ipcctl(&["inject", "-f", &example("worker.yaml")], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = injected
        .split("\n---")
        .filter(|d| !d.trim().is_empty() && d.trim() != "---")
        .map(|d| serde_yaml::from_str(d).expect("valid YAML out"))
        .collect();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the example has a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let sidecar = pod["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "ipc-sidecar"))
        .expect("sidecar injected as an init container");
    assert_eq!(sidecar["restartPolicy"], "Always");
    for container in pod["containers"].as_array().unwrap() {
        let env = container["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "IPC_SOCKET"), "{container}");
    }

    // Injecting the output again changes nothing; `-f -` reads standard input.
    let again = ipcctl(&["inject", "-f", "-"], Some(&injected));
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), injected);
}

#[test]
fn malformed_manifests_exit_with_the_bad_input_code() {
    let out = ipcctl(&["inject", "-f", "-"], Some("kind: [unclosed"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("ipcctl: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
