//! The admission webhook's answers to real AdmissionReview v1 requests, and the pods
//! its patches produce.

mod common;

use common::{fixture, parse_strict};
use ipc_inject::{AdmissionReview, InjectConfig, review};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// The API server's request for a pod of the example `worker` Deployment.
fn worker_pod_review() -> Value {
    fixture("pod-create-review.json")
}

fn answer(request: &Value) -> AdmissionReview {
    review(&InjectConfig::default(), request.to_string().as_bytes()).expect("a well-formed review")
}

/// The pod the API server would store: the request's object with the patch applied,
/// parsed strictly as a Kubernetes Pod.
fn admitted_pod(request: &Value, answer: &AdmissionReview) -> (Value, Pod) {
    let mut pod = request["request"]["object"].clone();
    if let Some(patch) = answer.decoded_patch() {
        json_patch::patch(&mut pod, &patch.expect("a decodable patch"))
            .expect("the patch applies to the pod");
    }
    let typed = parse_strict::<Pod>(&pod, "admitted pod");
    (pod, typed)
}

#[test]
fn annotated_pod_is_allowed_with_a_patch_that_adds_the_sidecar() {
    let request = worker_pod_review();
    let answer = answer(&request);
    assert_eq!(answer.api_version, "admission.k8s.io/v1");
    assert_eq!(answer.kind, "AdmissionReview");
    assert_eq!(answer.response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert!(answer.response.allowed);
    assert_eq!(answer.response.patch_type.as_deref(), Some("JSONPatch"));

    let (_, pod) = admitted_pod(&request, &answer);
    let spec = pod.spec.expect("spec");
    let init = spec.init_containers.expect("initContainers");
    assert_eq!(init.len(), 1);
    let sidecar = &init[0];
    assert_eq!(sidecar.name, "ipc-sidecar");
    assert_eq!(
        sidecar.restart_policy.as_deref(),
        Some("Always"),
        "a native sidecar"
    );
    assert_eq!(
        sidecar.image.as_deref(),
        Some(InjectConfig::default().image.as_str())
    );
    let args = sidecar.args.clone().expect("args");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].as_str())
    };
    assert_eq!(flag("--socket"), Some("/var/run/fleet-ipc/ipc.sock"));
    assert_eq!(flag("--upstream"), Some("ipc-server.fleet-ipc.svc:7700"));
    assert_eq!(flag("--app"), Some("shop"), "from the app label");
    assert_eq!(flag("--role"), Some("worker"));
    assert_eq!(flag("--tag"), None);
    assert_eq!(flag("--health-listen"), Some("0.0.0.0:7701"));
    let downward: Vec<(String, String)> = sidecar
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e.name.clone(),
                e.value_from
                    .as_ref()?
                    .field_ref
                    .as_ref()?
                    .field_path
                    .clone(),
            ))
        })
        .collect();
    assert_eq!(
        downward,
        [
            ("POD_NAME".to_owned(), "metadata.name".to_owned()),
            ("POD_NAMESPACE".to_owned(), "metadata.namespace".to_owned()),
            ("NODE_NAME".to_owned(), "spec.nodeName".to_owned()),
        ]
    );
    let startup = sidecar
        .startup_probe
        .as_ref()
        .expect("a startup probe, so the app starts after the socket");
    let health_port = startup.tcp_socket.as_ref().expect("tcp probe").port.clone();
    let ports = sidecar.ports.as_ref().expect("ports");
    assert!(
        ports.iter().any(|p| p.container_port == 7701
            && health_port
                == k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                    p.name.clone().unwrap_or_default()
                )),
        "the probe targets the health port"
    );

    let volumes = spec.volumes.expect("volumes");
    assert_eq!(
        volumes[0].name, "kube-api-access-9xk2p",
        "existing volumes kept first"
    );
    let socket = volumes
        .iter()
        .find(|v| v.name == "fleet-ipc-socket")
        .expect("socket volume");
    assert!(socket.empty_dir.is_some());

    let worker = &spec.containers[0];
    let mounts = worker.volume_mounts.as_ref().expect("mounts");
    assert_eq!(
        mounts[0].name, "kube-api-access-9xk2p",
        "existing mounts kept"
    );
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "fleet-ipc-socket" && m.mount_path == "/var/run/fleet-ipc")
    );
    let env = worker.env.as_ref().expect("env");
    assert!(env.iter().any(
        |e| e.name == "IPC_SOCKET" && e.value.as_deref() == Some("/var/run/fleet-ipc/ipc.sock")
    ));

    let annotations = pod.metadata.annotations.expect("annotations");
    assert_eq!(
        annotations.get("fleet-ipc.io/status").map(String::as_str),
        Some("injected")
    );
    assert_eq!(
        annotations.get("fleet-ipc.io/inject").map(String::as_str),
        Some("true")
    );
}

#[test]
fn the_patch_only_adds() {
    let answer = answer(&worker_pod_review());
    let patch = serde_json::to_value(answer.decoded_patch().unwrap().unwrap()).unwrap();
    for operation in patch.as_array().unwrap() {
        assert_eq!(operation["op"], "add", "{operation}");
    }
}

#[test]
fn already_injected_pod_is_allowed_without_a_patch() {
    let mut request = worker_pod_review();
    let (injected, _) = admitted_pod(&request, &answer(&request));
    request["request"]["object"] = injected;
    let again = answer(&request);
    assert!(again.response.allowed);
    assert_eq!(again.response.patch, None);
    assert_eq!(again.response.patch_type, None);
}

#[test]
fn pod_without_the_annotation_is_allowed_untouched() {
    for annotations in [
        Value::Null,
        json!({"fleet-ipc.io/inject": "false"}),
        json!({"fleet-ipc.io/role": "worker"}),
    ] {
        let mut request = worker_pod_review();
        request["request"]["object"]["metadata"]["annotations"] = annotations.clone();
        let answer = answer(&request);
        assert!(answer.response.allowed, "{annotations}");
        assert_eq!(answer.response.patch, None, "{annotations}");
        assert_eq!(answer.response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    }
}

#[test]
fn other_operations_and_kinds_pass_through() {
    let mut update = worker_pod_review();
    update["request"]["operation"] = json!("UPDATE");
    let mut binding = worker_pod_review();
    binding["request"]["subResource"] = json!("binding");
    let mut deployment = worker_pod_review();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    for request in [update, binding, deployment] {
        let answer = answer(&request);
        assert!(answer.response.allowed);
        assert_eq!(answer.response.patch, None);
    }
}

#[test]
fn invalid_annotation_is_refused_with_a_message_naming_it() {
    let mut request = worker_pod_review();
    request["request"]["object"]["metadata"]["annotations"]["fleet-ipc.io/role"] =
        json!("web workers");
    let answer = answer(&request);
    assert!(!answer.response.allowed);
    let status = answer.response.status.expect("a status");
    assert_eq!(status.code, 400);
    assert!(
        status.message.contains("fleet-ipc.io/role") && status.message.contains("web workers"),
        "{}",
        status.message
    );
}

#[test]
fn malformed_requests_get_an_error_review_not_a_panic() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", Vec::new()),
        ("not JSON", b"\x00\xffnot json".to_vec()),
        ("wrong type", br#"[1, 2, 3]"#.to_vec()),
        ("v1beta1", json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}).to_string().into_bytes()),
        ("no request", json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string().into_bytes()),
        ("no uid", json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"operation": "CREATE"}}).to_string().into_bytes()),
        ("pod without object", {
            let mut r = worker_pod_review();
            r["request"]["object"] = Value::Null;
            r.to_string().into_bytes()
        }),
        ("request not an object", json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": "x"}).to_string().into_bytes()),
    ];
    for (what, body) in cases {
        let error = review(&InjectConfig::default(), &body).expect_err(what);
        let reply = error.to_review();
        assert!(!reply.response.allowed, "{what}");
        let status = reply.response.status.expect("status");
        assert_eq!(status.code, 400, "{what}");
        assert!(
            status.message.starts_with("malformed AdmissionReview: "),
            "{what}: {}",
            status.message
        );
    }
}

#[test]
fn a_pod_that_is_not_pod_shaped_is_refused_not_patched() {
    let mut request = worker_pod_review();
    request["request"]["object"]["spec"]["containers"] = json!("worker");
    let answer = answer(&request);
    assert!(!answer.response.allowed);
    assert!(
        answer
            .response
            .status
            .unwrap()
            .message
            .contains("spec.containers")
    );
}

#[test]
fn typed_pod_injection_matches_the_webhook() {
    let request = worker_pod_review();
    let (_, from_webhook) = admitted_pod(&request, &answer(&request));
    let pod: Pod = serde_json::from_value(request["request"]["object"].clone()).unwrap();
    let injected = ipc_inject::inject_pod(&pod, &InjectConfig::default())
        .unwrap()
        .expect("injected");
    assert_eq!(injected, from_webhook);
    assert_eq!(
        ipc_inject::inject_pod(&injected, &InjectConfig::default()).unwrap(),
        None,
        "idempotent"
    );
}
