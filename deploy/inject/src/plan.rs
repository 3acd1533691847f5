//! The injection itself: from a pod template to the list of additions that put the
//! sidecar into it.
//!
//! The plan reads a pod or a pod template as plain JSON (`{metadata, spec}`) rather
//! than as a typed `Pod`, and produces only JSON-Patch `add` operations relative to
//! that template. Working on the JSON as given means fields this crate's Kubernetes
//! model does not know are never dropped, and the same plan serves the webhook
//! (turned into an RFC 6902 patch) and the offline `inject` (applied to YAML).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

use crate::InjectConfig;
use crate::error::InjectError;

/// Annotation that asks for a sidecar; only the value `"true"` does.
pub const ANNOTATION_INJECT: &str = "fleet-ipc.io/inject";
/// Annotation set on an injected pod, so a second injection does nothing.
pub const ANNOTATION_STATUS: &str = "fleet-ipc.io/status";
/// The value of [`ANNOTATION_STATUS`] after injection.
pub const STATUS_INJECTED: &str = "injected";
/// The sidecar's `--app`; without it the pod's `app` label (then
/// `app.kubernetes.io/name`) is used.
pub const ANNOTATION_APP: &str = "fleet-ipc.io/app";
/// The sidecar's `--role`.
pub const ANNOTATION_ROLE: &str = "fleet-ipc.io/role";
/// The sidecar's `--tag`.
pub const ANNOTATION_TAG: &str = "fleet-ipc.io/tag";
/// Sidecar hooks, one `OP=COMMAND` per line, each becoming a `--hook`.
pub const ANNOTATION_HOOKS: &str = "fleet-ipc.io/hooks";

/// Name of the injected init container (a native sidecar).
pub const SIDECAR_CONTAINER: &str = "ipc-sidecar";
/// Name of the shared `emptyDir` that holds the socket.
pub const SOCKET_VOLUME: &str = "fleet-ipc-socket";
/// Environment variable that tells app containers where the socket is.
pub const SOCKET_ENV: &str = "IPC_SOCKET";
/// Name of the volume holding the sidecar's token, when a token Secret is configured.
pub const TOKEN_VOLUME: &str = "fleet-ipc-token";
/// Where the token Secret is mounted in the sidecar.
pub const TOKEN_DIR: &str = "/var/run/secrets/fleet-ipc";
/// The key of the token Secret that holds the bearer token (`IPC_TOKEN_FILE` is
/// `TOKEN_DIR/TOKEN_KEY`).
pub const TOKEN_KEY: &str = "token";
/// Name of the sidecar's health port.
pub const HEALTH_PORT_NAME: &str = "ipc-health";

/// What injecting a pod template comes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Injection {
    /// The template does not carry `fleet-ipc.io/inject: "true"`: left untouched.
    NotRequested,
    /// The template already has the sidecar: left untouched.
    AlreadyInjected,
    /// The additions to make, in order, and what the user should know about them.
    Patch {
        edits: Vec<Edit>,
        warnings: Vec<String>,
    },
}

/// One JSON-Patch `add`: `path` is a JSON pointer split into its (unescaped) tokens,
/// relative to the pod template; the last token `-` appends to an array.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    pub path: Vec<String>,
    pub value: Value,
}

impl Injection {
    /// The RFC 6902 patch, with every path under `prefix` (the template's location
    /// in the patched document: empty for a pod, `["spec", "template"]` for a
    /// Deployment). Empty when there is nothing to do.
    pub fn json_patch(&self, prefix: &[&str]) -> Patch {
        let Injection::Patch { edits, .. } = self else {
            return Patch(Vec::new());
        };
        let operations = edits
            .iter()
            .map(|edit| {
                let tokens = prefix
                    .iter()
                    .copied()
                    .chain(edit.path.iter().map(String::as_str));
                PatchOperation::Add(AddOperation {
                    path: PointerBuf::from_tokens(tokens),
                    value: edit.value.clone(),
                })
            })
            .collect();
        Patch(operations)
    }

    /// Whether anything would change.
    pub fn is_patch(&self) -> bool {
        matches!(self, Injection::Patch { .. })
    }
}

/// The pod identity and hooks read from a template's annotations and labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Identity {
    app: Option<String>,
    role: Option<String>,
    tag: Option<String>,
    hooks: Vec<String>,
}

/// Plans the injection of the sidecar into `template`, a pod or a pod template as
/// JSON (`{"metadata": ..., "spec": ...}`).
pub fn plan(template: &Value, config: &InjectConfig) -> Result<Injection, InjectError> {
    let metadata = template.get("metadata").filter(|m| !m.is_null());
    let annotations = string_map(metadata, "annotations")?;
    if annotations.get(ANNOTATION_INJECT).map(String::as_str) != Some("true") {
        return Ok(Injection::NotRequested);
    }
    let spec = template
        .get("spec")
        .and_then(Value::as_object)
        .ok_or_else(|| InjectError::malformed("spec", "missing or not an object"))?;
    let containers = array_field(spec, "containers", "spec.containers")?
        .ok_or_else(|| InjectError::malformed("spec.containers", "missing"))?;
    let init_containers = array_field(spec, "initContainers", "spec.initContainers")?;
    let has_sidecar = containers
        .iter()
        .chain(init_containers.into_iter().flatten())
        .any(|c| c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER));
    if annotations.get(ANNOTATION_STATUS).map(String::as_str) == Some(STATUS_INJECTED)
        || has_sidecar
    {
        return Ok(Injection::AlreadyInjected);
    }

    let labels = string_map(metadata, "labels")?;
    let identity = read_identity(&annotations, &labels)?;
    let mut warnings = Vec::new();
    if identity.app.is_none() {
        warnings.push(format!(
            "fleet-ipc: no app for the sidecar (set the {ANNOTATION_APP} annotation or an `app` label); it uses its default, which its namespace's token does not cover"
        ));
    }

    let mut edits = Vec::new();
    // App containers first, by their original indices: the sidecar is inserted at
    // the front of initContainers last, which shifts those indices.
    for (list, containers) in [
        ("initContainers", init_containers),
        ("containers", Some(containers)),
    ] {
        for (index, container) in containers.into_iter().flatten().enumerate() {
            let at = vec!["spec".to_owned(), list.to_owned(), index.to_string()];
            share_socket(container, at, config, &mut edits, &mut warnings)?;
        }
    }
    let mut volumes = vec![socket_volume()];
    if !config.token_secret.is_empty() {
        volumes.push(token_volume(&config.token_secret));
    }
    add_volumes(spec, volumes, &mut edits)?;
    let sidecar = to_json(&sidecar_container(config, &identity));
    match init_containers {
        None => edits.push(edit(["spec", "initContainers"], json!([sidecar]))),
        Some(_) => edits.push(edit(["spec", "initContainers", "0"], sidecar)),
    }
    // The inject annotation is there, so the annotations object exists.
    edits.push(edit(
        ["metadata", "annotations", ANNOTATION_STATUS],
        json!(STATUS_INJECTED),
    ));
    Ok(Injection::Patch { edits, warnings })
}

/// Mounts the socket volume into one app container and tells it the socket path,
/// unless the container already has its own mount there or its own `IPC_SOCKET`.
fn share_socket(
    container: &Value,
    at: Vec<String>,
    config: &InjectConfig,
    edits: &mut Vec<Edit>,
    warnings: &mut Vec<String>,
) -> Result<(), InjectError> {
    let location = || at.join(".");
    let container = container
        .as_object()
        .ok_or_else(|| InjectError::malformed(location(), "not an object"))?;
    let name = container.get("name").and_then(Value::as_str).unwrap_or("?");

    let mounts = array_field(
        container,
        "volumeMounts",
        &format!("{}.volumeMounts", location()),
    )?;
    let socket_dir = config.socket_dir.trim_end_matches('/');
    let clash = mounts.into_iter().flatten().find(|m| {
        m.get("name").and_then(Value::as_str) == Some(SOCKET_VOLUME)
            || m.get("mountPath")
                .and_then(Value::as_str)
                .map(|p| p.trim_end_matches('/'))
                == Some(socket_dir)
    });
    match clash {
        Some(m) if m.get("name").and_then(Value::as_str) != Some(SOCKET_VOLUME) => warnings.push(format!(
            "fleet-ipc: container {name:?} already mounts another volume at {socket_dir}; it will not see the sidecar's socket"
        )),
        Some(_) => {}
        None => edits.push(append(&at, "volumeMounts", mounts.is_some(), to_json(&socket_mount(config)))),
    }

    let env = array_field(container, "env", &format!("{}.env", location()))?;
    let has_socket_env = env
        .into_iter()
        .flatten()
        .any(|e| e.get("name").and_then(Value::as_str) == Some(SOCKET_ENV));
    if !has_socket_env {
        let var = json!({"name": SOCKET_ENV, "value": config.socket_path()});
        edits.push(append(&at, "env", env.is_some(), var));
    }
    Ok(())
}

/// Adds `new` to `spec.volumes`, skipping any whose name is taken (the user's own
/// definition wins, e.g. an `emptyDir` with `medium: Memory`).
fn add_volumes(
    spec: &Map<String, Value>,
    new: Vec<Volume>,
    edits: &mut Vec<Edit>,
) -> Result<(), InjectError> {
    let volumes = array_field(spec, "volumes", "spec.volumes")?;
    let taken = |name: &str| {
        volumes
            .into_iter()
            .flatten()
            .any(|v| v.get("name").and_then(Value::as_str) == Some(name))
    };
    let new: Vec<Value> = new
        .iter()
        .filter(|v| !taken(&v.name))
        .map(to_json)
        .collect();
    match volumes {
        // One edit creating the array: two would each replace it.
        None if !new.is_empty() => edits.push(edit(["spec", "volumes"], Value::Array(new))),
        None => {}
        Some(_) => {
            for volume in new {
                edits.push(edit(["spec", "volumes", "-"], volume));
            }
        }
    }
    Ok(())
}

/// The edit that appends `item` to the array `field` of the object at `at`, creating
/// the array when it does not exist yet.
fn append(at: &[String], field: &str, array_exists: bool, item: Value) -> Edit {
    let mut path = at.to_vec();
    path.push(field.to_owned());
    if array_exists {
        path.push("-".to_owned());
        Edit { path, value: item }
    } else {
        Edit {
            path,
            value: Value::Array(vec![item]),
        }
    }
}

fn edit<const N: usize>(path: [&str; N], value: Value) -> Edit {
    Edit {
        path: path.iter().map(|s| (*s).to_owned()).collect(),
        value,
    }
}

fn read_identity(
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Result<Identity, InjectError> {
    let segment =
        |key: &'static str, value: Option<&String>| -> Result<Option<String>, InjectError> {
            let Some(value) = value.map(|v| v.trim()).filter(|v| !v.is_empty()) else {
                return Ok(None);
            };
            validate_segment(value).map_err(|reason| InjectError::InvalidAnnotation {
                key,
                value: value.to_owned(),
                reason,
            })?;
            Ok(Some(value.to_owned()))
        };
    let app = match annotations
        .get(ANNOTATION_APP)
        .filter(|v| !v.trim().is_empty())
    {
        Some(app) => segment(ANNOTATION_APP, Some(app))?,
        // A label value that is no valid app id (possible: labels allow fewer
        // characters, not more, so this is defensive) is ignored, not fatal.
        None => ["app", "app.kubernetes.io/name"]
            .iter()
            .filter_map(|key| labels.get(*key))
            .map(|v| v.trim())
            .find(|v| validate_segment(v).is_ok())
            .map(str::to_owned),
    };
    let hooks = match annotations.get(ANNOTATION_HOOKS) {
        None => Vec::new(),
        Some(text) => text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(|line| match line.split_once('=') {
                Some((op, command)) if !op.trim().is_empty() && !command.trim().is_empty() => {
                    Ok(line.to_owned())
                }
                _ => Err(InjectError::InvalidAnnotation {
                    key: ANNOTATION_HOOKS,
                    value: line.to_owned(),
                    reason: "each line must be OP=COMMAND",
                }),
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Identity {
        app,
        role: segment(ANNOTATION_ROLE, annotations.get(ANNOTATION_ROLE))?,
        tag: segment(ANNOTATION_TAG, annotations.get(ANNOTATION_TAG))?,
        hooks,
    })
}

/// A channel segment as docs/design.md defines names: letters, digits and `_ . - /`.
fn validate_segment(value: &str) -> Result<(), &'static str> {
    if value.len() > 256 {
        return Err("longer than 256 bytes");
    }
    if value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
    {
        Ok(())
    } else {
        Err("a channel name allows only letters, digits and _ . - /")
    }
}

/// The pod's subscriber id upstream, `APP:pod:NAMESPACE:POD` (the kubelet expands
/// the downward-API variables): inside the app's channels, so that the token of
/// the pod's namespace, granted `APP:>`, covers it; with the namespace, so that
/// pods of one name in two namespaces never take each other's place.
pub fn pod_id(app: &str) -> String {
    format!("{app}:pod:$(POD_NAMESPACE):$(POD_NAME)")
}

/// The sidecar: a native sidecar (an init container with `restartPolicy: Always`),
/// started before the app containers and, thanks to its startup probe, serving the
/// socket before they start.
fn sidecar_container(config: &InjectConfig, identity: &Identity) -> Container {
    let mut args = vec![
        "--socket".to_owned(),
        config.socket_path(),
        "--upstream".to_owned(),
        config.upstream.clone(),
        "--health-listen".to_owned(),
        format!("0.0.0.0:{}", config.health_port),
    ];
    for (flag, value) in [
        ("--app", &identity.app),
        ("--role", &identity.role),
        ("--tag", &identity.tag),
    ] {
        if let Some(value) = value {
            args.extend([flag.to_owned(), value.clone()]);
        }
    }
    if let Some(app) = &identity.app {
        args.extend(["--id".to_owned(), pod_id(app)]);
    }
    for hook in &identity.hooks {
        args.extend(["--hook".to_owned(), hook.clone()]);
    }

    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("NODE_NAME", "spec.nodeName"),
    ];
    let mut volume_mounts = vec![socket_mount(config)];
    if !config.token_secret.is_empty() {
        env.push(EnvVar {
            name: "IPC_TOKEN_FILE".to_owned(),
            value: Some(format!("{TOKEN_DIR}/{TOKEN_KEY}")),
            ..Default::default()
        });
        volume_mounts.push(VolumeMount {
            name: TOKEN_VOLUME.to_owned(),
            mount_path: TOKEN_DIR.to_owned(),
            read_only: Some(true),
            ..Default::default()
        });
    }

    let health = || TCPSocketAction {
        port: IntOrString::String(HEALTH_PORT_NAME.to_owned()),
        ..Default::default()
    };
    Container {
        name: SIDECAR_CONTAINER.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: non_empty(&config.image_pull_policy),
        command: Some(vec!["ipc-sidecar".to_owned()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some(HEALTH_PORT_NAME.to_owned()),
            container_port: i32::from(config.health_port),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        restart_policy: Some("Always".to_owned()),
        // The kubelet starts the app containers once this succeeds.
        startup_probe: Some(Probe {
            tcp_socket: Some(health()),
            period_seconds: Some(1),
            failure_threshold: Some(30),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(health()),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(resources(config)),
        // No runAsUser: the sidecar takes the pod's user and group when the pod sets
        // them (so the socket, mode 0660, is the app's), else the image's 65532.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(volume_mounts),
        ..Default::default()
    }
}

fn resources(config: &InjectConfig) -> ResourceRequirements {
    let quantities = |pairs: [(&str, &String); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_owned(), Quantity(v.clone())))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    ResourceRequirements {
        requests: quantities([
            ("cpu", &config.cpu_request),
            ("memory", &config.memory_request),
        ]),
        limits: quantities([("cpu", &config.cpu_limit), ("memory", &config.memory_limit)]),
        ..Default::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn socket_mount(config: &InjectConfig) -> VolumeMount {
    VolumeMount {
        name: SOCKET_VOLUME.to_owned(),
        mount_path: config.socket_dir.clone(),
        ..Default::default()
    }
}

fn socket_volume() -> Volume {
    Volume {
        name: SOCKET_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

fn token_volume(secret: &str) -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn non_empty(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    // k8s-openapi types always serialize to JSON (no maps with non-string keys).
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// `metadata.<field>` as a string map; absent or null is empty.
fn string_map(
    metadata: Option<&Value>,
    field: &str,
) -> Result<BTreeMap<String, String>, InjectError> {
    let Some(value) = metadata.and_then(|m| m.get(field)).filter(|v| !v.is_null()) else {
        return Ok(BTreeMap::new());
    };
    let object = value
        .as_object()
        .ok_or_else(|| InjectError::malformed(format!("metadata.{field}"), "not an object"))?;
    object
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(InjectError::malformed(
                format!("metadata.{field}.{k}"),
                format!("must be a string, found {other}"),
            )),
        })
        .collect()
}

/// `object.<field>` as an array: `None` when absent or null, an error when it is
/// something else.
fn array_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    what: &str,
) -> Result<Option<&'a Vec<Value>>, InjectError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(InjectError::malformed(what, "not an array")),
    }
}

#[cfg(test)]
mod tests;
