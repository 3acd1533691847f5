//! Offline injection of multi-document YAML manifests (`ipcctl inject -f FILE`).
//!
//! Each workload kind keeps its pod template in a known place; the same plan as the
//! webhook's is applied there. Documents that need no change are copied through
//! byte for byte (comments included); changed ones are re-serialized.

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use crate::InjectConfig;
use crate::error::InjectError;
use crate::plan::{Edit, Injection, plan};

/// What [`inject_manifests_report`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InjectedManifests {
    /// The manifests, with the sidecar added where asked for.
    pub yaml: String,
    /// `Kind/name` of each workload that got the sidecar.
    pub injected: Vec<String>,
    /// Things the user should know (e.g. a workload without an app id).
    pub warnings: Vec<String>,
}

/// Adds the sidecar to every workload in `yaml` whose pod template is annotated
/// `fleet-ipc.io/inject: "true"`, and returns the manifests.
pub fn inject_manifests(yaml: &str, config: &InjectConfig) -> Result<String, InjectError> {
    inject_manifests_report(yaml, config).map(|out| out.yaml)
}

/// [`inject_manifests`], also saying which workloads were injected and what to
/// warn about.
pub fn inject_manifests_report(
    yaml: &str,
    config: &InjectConfig,
) -> Result<InjectedManifests, InjectError> {
    let mut out = InjectedManifests::default();
    for (index, (separator, text)) in split_documents(yaml).into_iter().enumerate() {
        out.yaml.push_str(separator);
        let mut document: Yaml =
            serde_yaml::from_str(text).map_err(|source| InjectError::Yaml {
                index: index + 1,
                source,
            })?;
        if inject_object(&mut document, config, &mut out)? {
            let text = serde_yaml::to_string(&document).map_err(|source| InjectError::Yaml {
                index: index + 1,
                source,
            })?;
            out.yaml.push_str(&text);
        } else {
            out.yaml.push_str(text);
        }
    }
    Ok(out)
}

/// Where a kind keeps its pod template, from the object's root.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "PodTemplate" => &["template"],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// Injects one object (or each item of a `List`); true when something changed.
fn inject_object(
    object: &mut Yaml,
    config: &InjectConfig,
    out: &mut InjectedManifests,
) -> Result<bool, InjectError> {
    let kind = object
        .get("kind")
        .and_then(Yaml::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind == "List" {
        let mut changed = false;
        if let Some(items) = object.get_mut("items").and_then(Yaml::as_sequence_mut) {
            for item in items {
                changed |= inject_object(item, config, out)?;
            }
        }
        return Ok(changed);
    }
    let Some(path) = template_path(&kind) else {
        return Ok(false);
    };
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Yaml::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut template = &mut *object;
    for key in path {
        match template.get_mut(*key) {
            Some(inner) => template = inner,
            None => return Ok(false),
        }
    }
    let template_json: Json = serde_json::to_value(&*template).map_err(|e| {
        InjectError::malformed(
            format!("{kind}/{name}"),
            format!("not representable as JSON: {e}"),
        )
    })?;
    let with_context = |error: InjectError| match error {
        InjectError::Malformed { what, reason } => {
            InjectError::malformed(format!("{kind}/{name}: {what}"), reason)
        }
        InjectError::InvalidAnnotation { key, value, reason } => InjectError::malformed(
            format!("{kind}/{name}"),
            format!("annotation {key}: {value:?}: {reason}"),
        ),
        other => other,
    };
    match plan(&template_json, config).map_err(with_context)? {
        Injection::NotRequested | Injection::AlreadyInjected => Ok(false),
        Injection::Patch { edits, warnings } => {
            for edit in &edits {
                apply_add(template, edit)
                    .map_err(|reason| InjectError::malformed(format!("{kind}/{name}"), reason))?;
            }
            out.injected.push(format!("{kind}/{name}"));
            out.warnings
                .extend(warnings.into_iter().map(|w| format!("{kind}/{name}: {w}")));
            Ok(true)
        }
    }
}

/// JSON-Patch `add` on a YAML value: sets a mapping key, or inserts into a sequence
/// at an index or at the end (`-`).
fn apply_add(root: &mut Yaml, edit: &Edit) -> Result<(), String> {
    let Some((last, parents)) = edit.path.split_last() else {
        return Err("empty patch path".to_owned());
    };
    let mut target = root;
    for token in parents {
        target = match target {
            Yaml::Mapping(map) => map.get_mut(token.as_str()),
            Yaml::Sequence(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("no {token:?} in {}", edit.path.join("/")))?;
    }
    let value = name_first(serde_yaml::to_value(&edit.value).map_err(|e| e.to_string())?);
    match target {
        Yaml::Mapping(map) => {
            map.insert(Yaml::String(last.clone()), value);
        }
        Yaml::Sequence(items) if last == "-" => items.push(value),
        Yaml::Sequence(items) => match last.parse::<usize>() {
            Ok(index) if index <= items.len() => items.insert(index, value),
            _ => return Err(format!("bad index {last:?} in {}", edit.path.join("/"))),
        },
        _ => {
            return Err(format!(
                "{} is not inside a mapping or sequence",
                edit.path.join("/")
            ));
        }
    }
    Ok(())
}

/// Puts `name` first in every mapping, as people write Kubernetes objects
/// (`- name: ipc-sidecar` rather than `- args:` ... `name:` further down); the other
/// keys keep their order.
fn name_first(value: Yaml) -> Yaml {
    match value {
        Yaml::Mapping(map) => {
            let name_key = Yaml::String("name".to_owned());
            let (mut named, mut rest) = (serde_yaml::Mapping::new(), serde_yaml::Mapping::new());
            for (key, value) in map {
                let target = if key == name_key {
                    &mut named
                } else {
                    &mut rest
                };
                target.insert(key, name_first(value));
            }
            named.extend(rest);
            Yaml::Mapping(named)
        }
        Yaml::Sequence(items) => Yaml::Sequence(items.into_iter().map(name_first).collect()),
        other => other,
    }
}

/// Splits a YAML stream into (separator line, document text) pairs, so untouched
/// documents are copied exactly. A separator is a line starting with `---` followed
/// by nothing or whitespace; inside block scalars such a line cannot appear at
/// column 0, so this agrees with a YAML parser. Documents that are empty or only
/// comments are kept as text (they parse to null and are never changed).
fn split_documents(yaml: &str) -> Vec<(&str, &str)> {
    let mut documents = Vec::new();
    let mut separator = "";
    let mut start = 0;
    let mut offset = 0;
    for line in yaml.split_inclusive('\n') {
        let is_separator = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        if is_separator {
            documents.push((separator, &yaml[start..offset]));
            separator = line;
            start = offset + line.len();
        }
        offset += line.len();
    }
    documents.push((separator, &yaml[start..]));
    documents
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = "\
# the web tier
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        fleet-ipc.io/inject: \"true\"
    spec:
      containers:
      - name: web
        image: nginx
";

    const SERVICE: &str = "\
apiVersion: v1   # kept as is, comment included
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
";

    #[test]
    fn documents_split_on_separator_lines_only() {
        let text = "a: 1\n---\nb: |\n  ---x\n--- # two\nc: 3\n---";
        let docs = split_documents(text);
        assert_eq!(
            docs,
            vec![
                ("", "a: 1\n"),
                ("---\n", "b: |\n  ---x\n"),
                ("--- # two\n", "c: 3\n"),
                ("---", "")
            ]
        );
        let joined: String = docs.iter().flat_map(|(s, d)| [*s, *d]).collect();
        assert_eq!(joined, text);
    }

    #[test]
    fn untouched_documents_are_copied_byte_for_byte() {
        let input = format!("---\n{SERVICE}---\n{DEPLOYMENT}");
        let out = inject_manifests_report(&input, &InjectConfig::default()).unwrap();
        assert!(
            out.yaml.starts_with(&format!("---\n{SERVICE}---\n")),
            "{}",
            out.yaml
        );
        assert_eq!(out.injected, ["Deployment/web"]);
        let injected: Yaml =
            serde_yaml::from_str(out.yaml.rsplit("---\n").next().unwrap()).unwrap();
        let init = &injected["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(init["name"].as_str(), Some("ipc-sidecar"));
        assert_eq!(init["restartPolicy"].as_str(), Some("Always"));
        let sidecar_yaml = serde_yaml::to_string(init).unwrap();
        assert!(
            sidecar_yaml.starts_with("name: ipc-sidecar\n"),
            "{sidecar_yaml}"
        );
    }

    #[test]
    fn injecting_twice_changes_nothing_the_second_time() {
        let once = inject_manifests(DEPLOYMENT, &InjectConfig::default()).unwrap();
        let twice = inject_manifests_report(&once, &InjectConfig::default()).unwrap();
        assert_eq!(twice.yaml, once);
        assert!(twice.injected.is_empty());
    }

    #[test]
    fn a_list_of_workloads_is_injected_item_by_item() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: batch/v1\n  kind: CronJob\n  metadata: {name: nightly}\n  spec:\n    schedule: '@daily'\n    jobTemplate:\n      spec:\n        template:\n          metadata:\n            annotations: {fleet-ipc.io/inject: 'true'}\n          spec:\n            restartPolicy: Never\n            containers: [{name: job, image: busybox}]\n";
        let out = inject_manifests_report(list, &InjectConfig::default()).unwrap();
        assert_eq!(out.injected, ["CronJob/nightly"]);
        assert!(
            out.warnings
                .iter()
                .any(|w| w.starts_with("CronJob/nightly: ")),
            "{:?}",
            out.warnings
        );
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let err = inject_manifests("a: 1\n---\nb: [\n", &InjectConfig::default()).unwrap_err();
        assert!(err.to_string().starts_with("YAML document 2"), "{err}");
    }

    #[test]
    fn a_bad_annotation_names_the_workload() {
        let bad = DEPLOYMENT.replace(
            "fleet-ipc.io/inject: \"true\"",
            "fleet-ipc.io/inject: \"true\"\n        fleet-ipc.io/tag: \"a b\"",
        );
        let err = inject_manifests(&bad, &InjectConfig::default()).unwrap_err();
        assert!(
            err.to_string().contains("Deployment/web")
                && err.to_string().contains("fleet-ipc.io/tag"),
            "{err}"
        );
    }
}
