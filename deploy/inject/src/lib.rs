//! Kubernetes sidecar injection for fleet-ipc, shared by the admission webhook that
//! `ipc-server --injector-listen` serves and by the offline `ipcctl inject -f FILE`.
//!
//! A pod (or a workload's pod template) annotated `fleet-ipc.io/inject: "true"` gets:
//! - the `ipc-sidecar` container as a native sidecar (an init container with
//!   `restartPolicy: Always`, first in `initContainers`, with a startup probe so the
//!   app starts once the socket is served), whose `--app`, `--role`, `--tag` and
//!   `--hook` come from the `fleet-ipc.io/{app,role,tag,hooks}` annotations (app
//!   defaulting to the `app` label) and which reads `POD_NAME`, `POD_NAMESPACE`,
//!   `NODE_NAME` from the downward API;
//! - an `emptyDir` volume `fleet-ipc-socket` mounted at `/var/run/fleet-ipc` in every
//!   other container, and `IPC_SOCKET=/var/run/fleet-ipc/ipc.sock` in their env;
//! - the annotation `fleet-ipc.io/status: injected`, so a second injection (webhook
//!   after `ipcctl inject`, or a re-invoked webhook) does nothing.
//!
//! Anything else passes through untouched.
//!
//! # Layout
//! - [`config`]: [`InjectConfig`], the sidecar's image, upstream, socket and
//!   resources (serde, and clap flags with the `clap` feature).
//! - [`mod@plan`]: the injection proper, as a list of JSON-Patch `add` edits on a pod
//!   template; the annotation and name constants.
//! - [`admission`]: AdmissionReview v1 in and out, [`review`].
//! - `webhook` (feature `webhook`, on by default): the axum `router` (`POST /inject`,
//!   `GET /healthz`) and `serve_https`, its rustls listener with certificate
//!   reloading. `ipcctl inject` can do without it (`default-features = false`).
//! - [`manifests`]: [`inject_manifests`] for multi-document YAML.

pub mod admission;
pub mod config;
mod error;
pub mod manifests;
pub mod plan;
#[cfg(feature = "webhook")]
pub mod webhook;

pub use admission::{AdmissionResponse, AdmissionReview, INJECT_PATH, ReviewError, review};
pub use config::InjectConfig;
pub use error::InjectError;
pub use manifests::{InjectedManifests, inject_manifests, inject_manifests_report};
pub use plan::{Injection, plan};
#[cfg(feature = "webhook")]
pub use webhook::{ServeError, router, serve_https};

use k8s_openapi::api::core::v1::Pod;

/// Injects the sidecar into a typed pod: `Ok(None)` when the pod is not annotated
/// for injection or already has the sidecar.
pub fn inject_pod(pod: &Pod, config: &InjectConfig) -> Result<Option<Pod>, InjectError> {
    let mut json =
        serde_json::to_value(pod).map_err(|e| InjectError::malformed("pod", e.to_string()))?;
    let injection = plan(&json, config)?;
    if !injection.is_patch() {
        return Ok(None);
    }
    json_patch::patch(&mut json, &injection.json_patch(&[]))
        .map_err(|e| InjectError::malformed("pod", format!("patch did not apply: {e}")))?;
    serde_json::from_value(json)
        .map(Some)
        .map_err(|e| InjectError::malformed("pod", format!("injected pod does not parse: {e}")))
}
