//! What only the injector's tests need: the repository's files, kustomize
//! rendering, and strict parsing of Kubernetes objects. (The test CA and the
//! process and stream helpers every crate's tests share are in `ipc_testkit`.)
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// `deploy/k8s/...` in the repository.
pub fn k8s_dir(sub: &str) -> PathBuf {
    repo_root().join("deploy/k8s").join(sub)
}

/// A JSON file from `tests/fixtures`.
pub fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a YAML stream, as JSON values (empty documents dropped).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let value: serde_yaml::Value =
                serde::Deserialize::deserialize(doc).expect("valid YAML");
            serde_json::to_value(value).expect("YAML representable as JSON")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `value` as `T` and fails when any field is lost on the way — a field
/// that the Kubernetes API does not have (misspelt, misplaced) — or changed.
/// Nulls count as absent on both sides.
pub fn parse_strict<T: DeserializeOwned + Serialize>(value: &Value, what: &str) -> T {
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{what}: not a valid {}: {e}", std::any::type_name::<T>()));
    let round_trip = serde_json::to_value(&typed).expect("typed objects serialize");
    let mut problems = Vec::new();
    differences(
        "",
        &without_nulls(value),
        &without_nulls(&round_trip),
        &mut problems,
    );
    assert!(
        problems.is_empty(),
        "{what}: not a valid {}:\n  {}",
        std::any::type_name::<T>(),
        problems.join("\n  ")
    );
    typed
}

fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

fn differences(path: &str, given: &Value, typed: &Value, out: &mut Vec<String>) {
    match (given, typed) {
        (Value::Object(given), Value::Object(typed)) => {
            for (key, value) in given {
                let at = format!("{path}.{key}");
                match typed.get(key) {
                    None => out.push(format!("{at}: no such field in the Kubernetes API")),
                    Some(kept) => differences(&at, value, kept, out),
                }
            }
            for key in typed.keys().filter(|k| !given.contains_key(*k)) {
                out.push(format!("{path}.{key}: appeared in the typed object"));
            }
        }
        (Value::Array(given), Value::Array(typed)) if given.len() == typed.len() => {
            for (index, (g, t)) in given.iter().zip(typed).enumerate() {
                differences(&format!("{path}[{index}]"), g, t, out);
            }
        }
        (given, typed) if given != typed => out.push(format!("{path}: {given} became {typed}")),
        _ => {}
    }
}

/// The kubectl binary: `$KUBECTL`, else `kubectl` on the PATH.
fn kubectl() -> Option<PathBuf> {
    match std::env::var_os("KUBECTL") {
        Some(path) => Some(PathBuf::from(path)),
        None => ipc_testkit::find_program("kubectl"),
    }
}

/// The objects a kustomization directory renders to: `kubectl kustomize DIR` where
/// kubectl exists; otherwise (said on stderr) the same resources read directly,
/// with the namespace and JSON6902 patches that deploy/k8s uses applied here.
pub fn render(dir: &Path) -> Vec<Value> {
    match kubectl() {
        Some(kubectl) => {
            let output = Command::new(&kubectl)
                .arg("kustomize")
                .arg(dir)
                .output()
                .unwrap_or_else(|e| panic!("running {} kustomize: {e}", kubectl.display()));
            assert!(
                output.status.success(),
                "kubectl kustomize {} failed:\n{}",
                dir.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            yaml_documents(&String::from_utf8(output.stdout).expect("UTF-8 output"))
        }
        None => {
            eprintln!(
                "NOTE: kubectl not found (set KUBECTL or install it): rendering {} by reading its resources directly",
                dir.display()
            );
            render_without_kubectl(dir)
        }
    }
}

fn render_without_kubectl(dir: &Path) -> Vec<Value> {
    let kustomization_path = dir.join("kustomization.yaml");
    let text = std::fs::read_to_string(&kustomization_path)
        .unwrap_or_else(|e| panic!("{}: {e}", kustomization_path.display()));
    let kustomization = yaml_documents(&text).remove(0);
    let mut objects = Vec::new();
    for resource in kustomization["resources"].as_array().into_iter().flatten() {
        let path = dir.join(resource.as_str().expect("resource paths are strings"));
        if path.is_dir() {
            objects.extend(render_without_kubectl(&path));
        } else {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            objects.extend(yaml_documents(&text));
        }
    }
    if let Some(namespace) = kustomization["namespace"].as_str() {
        for object in &mut objects {
            if !matches!(
                object["kind"].as_str(),
                Some("Namespace" | "MutatingWebhookConfiguration")
            ) {
                object["metadata"]["namespace"] = Value::from(namespace);
            }
        }
    }
    for patch in kustomization["patches"].as_array().into_iter().flatten() {
        let (kind, name) = (&patch["target"]["kind"], &patch["target"]["name"]);
        let operations: json_patch::Patch = serde_json::from_value(
            yaml_documents(patch["patch"].as_str().expect("inline patch")).remove(0),
        )
        .expect("a JSON6902 patch");
        let target = objects
            .iter_mut()
            .find(|o| &o["kind"] == kind && &o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("patch target {kind}/{name} not found"));
        json_patch::patch(target, &operations).expect("patch applies");
    }
    objects
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} among the rendered objects"))
}
