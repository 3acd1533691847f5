//! Kubernetes `admission.k8s.io/v1` AdmissionReview: the mutating webhook's wire format.
//!
//! k8s-openapi does not model the admission API (it is not served as a resource), so
//! the few fields the webhook reads and writes are declared here.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::InjectConfig;
use crate::plan::{Injection, plan};

/// The route the MutatingWebhookConfiguration calls (`clientConfig.service.path`).
pub const INJECT_PATH: &str = "/inject";
/// A liveness route for the webhook listener.
pub const HEALTHZ_PATH: &str = "/healthz";

/// `apiVersion` of the only AdmissionReview version the webhook speaks.
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";

/// An AdmissionReview as the webhook returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    pub api_version: String,
    pub kind: String,
    pub response: AdmissionResponse,
}

/// The webhook's verdict on one request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's uid, echoed (empty when the request had none).
    pub uid: String,
    pub allowed: bool,
    /// `"JSONPatch"` when `patch` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// The RFC 6902 patch, base64-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Shown to the user by kubectl.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Why the request was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AdmissionStatus>,
}

/// The subset of `meta/v1 Status` a webhook sets when it refuses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdmissionStatus {
    pub code: u16,
    pub message: String,
}

impl AdmissionReview {
    fn new(response: AdmissionResponse) -> Self {
        Self {
            api_version: ADMISSION_API_VERSION.to_owned(),
            kind: "AdmissionReview".to_owned(),
            response,
        }
    }

    /// The decoded JSONPatch, when the response carries one.
    pub fn decoded_patch(&self) -> Option<Result<json_patch::Patch, String>> {
        let encoded = self.response.patch.as_deref()?;
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| format!("patch is not base64: {e}"))
                .and_then(|bytes| {
                    serde_json::from_slice(&bytes)
                        .map_err(|e| format!("patch is not a JSON patch: {e}"))
                }),
        )
    }
}

/// A request the webhook cannot even answer properly: not an AdmissionReview v1,
/// or one without a request or uid. The API server never sends these; the HTTP
/// handler answers them with status 400, which the API server treats as a failed
/// call (and `failurePolicy: Ignore` admits the pod unchanged).
#[derive(Debug, thiserror::Error)]
#[error("malformed AdmissionReview: {0}")]
pub struct ReviewError(String);

impl ReviewError {
    /// The AdmissionReview to send back with the HTTP 400.
    pub fn to_review(&self) -> AdmissionReview {
        AdmissionReview::new(AdmissionResponse {
            allowed: false,
            status: Some(AdmissionStatus {
                code: 400,
                message: self.to_string(),
            }),
            ..Default::default()
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IncomingReview {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<AdmissionRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionRequest {
    uid: Option<String>,
    kind: Option<GroupVersionKind>,
    sub_resource: Option<String>,
    namespace: Option<String>,
    operation: Option<String>,
    object: Option<Value>,
}

#[derive(Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Answers one AdmissionReview v1 request body.
///
/// Pods created with `fleet-ipc.io/inject: "true"` are allowed with a JSONPatch that
/// adds the sidecar; every other object is allowed unchanged; a pod whose
/// `fleet-ipc.io/*` annotations are invalid is refused with a message naming the
/// annotation (better than a pod whose sidecar can never start).
pub fn review(config: &InjectConfig, body: &[u8]) -> Result<AdmissionReview, ReviewError> {
    let incoming: IncomingReview = serde_json::from_slice(body)
        .map_err(|e| ReviewError(format!("body is not an AdmissionReview: {e}")))?;
    let (api_version, kind) = (
        incoming.api_version.unwrap_or_default(),
        incoming.kind.unwrap_or_default(),
    );
    if api_version != ADMISSION_API_VERSION || kind != "AdmissionReview" {
        return Err(ReviewError(format!(
            "expected apiVersion {ADMISSION_API_VERSION} kind AdmissionReview, got {api_version:?} {kind:?}"
        )));
    }
    let request = incoming
        .request
        .ok_or_else(|| ReviewError("no request".to_owned()))?;
    let uid = request
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| ReviewError("request has no uid".to_owned()))?;
    let allow = |warnings: Vec<String>| {
        AdmissionReview::new(AdmissionResponse {
            uid: uid.clone(),
            allowed: true,
            warnings,
            ..Default::default()
        })
    };

    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod");
    let is_create = request.operation.as_deref() == Some("CREATE");
    if !is_pod || !is_create || request.sub_resource.is_some_and(|s| !s.is_empty()) {
        return Ok(allow(Vec::new()));
    }
    let Some(pod) = request.object else {
        return Err(ReviewError(
            "pod CREATE request without an object".to_owned(),
        ));
    };
    let namespace = request.namespace.unwrap_or_default();
    let pod_name = pod_display_name(&pod);

    let injection = match plan(&pod, config) {
        Ok(injection) => injection,
        Err(error) => {
            tracing::warn!(%namespace, pod = %pod_name, %error, "sidecar injection refused");
            return Ok(AdmissionReview::new(AdmissionResponse {
                uid,
                allowed: false,
                status: Some(AdmissionStatus {
                    code: 400,
                    message: format!("fleet-ipc sidecar injection: {error}"),
                }),
                ..Default::default()
            }));
        }
    };
    let patch = injection.json_patch(&[]);
    match injection {
        Injection::NotRequested => Ok(allow(Vec::new())),
        Injection::AlreadyInjected => {
            tracing::debug!(%namespace, pod = %pod_name, "already injected");
            Ok(allow(Vec::new()))
        }
        Injection::Patch { warnings, .. } => {
            // A Patch of plain JSON values always serializes.
            let patch_json = serde_json::to_vec(&patch).unwrap_or_default();
            tracing::info!(%namespace, pod = %pod_name, operations = patch.0.len(), "sidecar injected");
            Ok(AdmissionReview::new(AdmissionResponse {
                uid,
                allowed: true,
                patch_type: Some("JSONPatch".to_owned()),
                patch: Some(base64::engine::general_purpose::STANDARD.encode(patch_json)),
                warnings,
                status: None,
            }))
        }
    }
}

/// A pod's name for logs: pods made by controllers only have a `generateName`.
fn pod_display_name(pod: &Value) -> String {
    let metadata = &pod["metadata"];
    match (metadata["name"].as_str(), metadata["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => name.to_owned(),
        (_, Some(prefix)) => format!("{prefix}*"),
        _ => String::new(),
    }
}
