//! deploy/: every rendered manifest is a valid Kubernetes object, the manifests
//! agree with the code (ports, probe service, webhook path, image, binaries), and
//! offline injection works on the example application.

mod common;

use std::collections::BTreeSet;

use common::{find, k8s_dir, parse_strict, render, repo_root};
use ipc_inject::{INJECT_PATH, InjectConfig, inject_manifests_report};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::Value;

/// Parses each object strictly into its k8s-openapi type; an object of a kind this
/// test has no type for fails (add it here).
fn parse_all(objects: &[Value]) {
    for object in objects {
        let what = format!(
            "{}/{}",
            object["kind"].as_str().unwrap_or("?"),
            object["metadata"]["name"].as_str().unwrap_or("?")
        );
        match (object["apiVersion"].as_str(), object["kind"].as_str()) {
            (Some("v1"), Some("Namespace")) => drop(parse_strict::<Namespace>(object, &what)),
            (Some("v1"), Some("ServiceAccount")) => {
                drop(parse_strict::<ServiceAccount>(object, &what))
            }
            (Some("v1"), Some("Service")) => drop(parse_strict::<Service>(object, &what)),
            (Some("v1"), Some("ConfigMap")) => drop(parse_strict::<ConfigMap>(object, &what)),
            (Some("apps/v1"), Some("Deployment")) => {
                drop(parse_strict::<Deployment>(object, &what))
            }
            (Some("apps/v1"), Some("StatefulSet")) => {
                drop(parse_strict::<StatefulSet>(object, &what))
            }
            (Some("batch/v1"), Some("Job")) => drop(parse_strict::<Job>(object, &what)),
            (Some("policy/v1"), Some("PodDisruptionBudget")) => {
                drop(parse_strict::<PodDisruptionBudget>(object, &what))
            }
            (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) => {
                drop(parse_strict::<NetworkPolicy>(object, &what))
            }
            (Some("admissionregistration.k8s.io/v1"), Some("MutatingWebhookConfiguration")) => {
                drop(parse_strict::<MutatingWebhookConfiguration>(object, &what))
            }
            (api_version, kind) => panic!("{what}: no typed check for {api_version:?} {kind:?}"),
        }
    }
}

#[test]
fn every_manifest_of_the_base_is_a_valid_kubernetes_object() {
    let objects = render(&k8s_dir(""));
    let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for expected in [
        "Namespace",
        "StatefulSet",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ] {
        assert!(
            kinds.contains(expected),
            "no {expected} in deploy/k8s: {kinds:?}"
        );
    }
    parse_all(&objects);
    for object in &objects {
        let cluster_scoped = matches!(
            object["kind"].as_str(),
            Some("Namespace" | "MutatingWebhookConfiguration")
        );
        if !cluster_scoped {
            assert_eq!(
                object["metadata"]["namespace"], "fleet-ipc",
                "{}",
                object["metadata"]["name"]
            );
        }
    }
}

#[test]
fn the_strict_parse_catches_a_misspelt_field() {
    let mut objects = render(&k8s_dir(""));
    let deployment = objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment");
    let probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]
        .as_object_mut()
        .expect("grpc probe");
    let service = probe.remove("service").expect("service");
    probe.insert("servce".to_owned(), service);
    let result = std::panic::catch_unwind(|| parse_all(&objects));
    let message = *result
        .expect_err("a misspelt field fails")
        .downcast::<String>()
        .expect("message");
    assert!(message.contains("grpc.servce: no such field"), "{message}");
}

#[test]
fn every_manifest_of_the_laptop_overlay_is_valid_and_smaller() {
    let laptop = render(&k8s_dir("overlays/laptop"));
    parse_all(&laptop);
    let base = render(&k8s_dir(""));
    let server = |objects: &[Value]| {
        parse_strict::<Deployment>(find(objects, "Deployment", "ipc-server"), "ipc-server")
    };
    assert_eq!(server(&base).spec.replicas, Some(3));
    assert_eq!(server(&laptop).spec.replicas, Some(1));
    let storage = |objects: &[Value]| {
        find(objects, "StatefulSet", "redis")["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"].clone()
    };
    assert_eq!(storage(&laptop), "256Mi");
    assert_ne!(storage(&base), storage(&laptop));
    let memory_limit = |objects: &[Value]| {
        find(objects, "Deployment", "ipc-server")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"].clone()
    };
    assert_eq!(memory_limit(&laptop), "128Mi");
}

fn server_deployment() -> (Vec<Value>, Deployment, PodSpec, Container) {
    let objects = render(&k8s_dir(""));
    let deployment =
        parse_strict::<Deployment>(find(&objects, "Deployment", "ipc-server"), "ipc-server");
    let pod = deployment.spec.template.spec.clone().unwrap();
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == "ipc-server")
        .expect("container ipc-server")
        .clone();
    (objects, deployment, pod, container)
}

/// The value after `flag` in a container's args.
fn arg<'a>(container: &'a Container, flag: &str) -> &'a str {
    let args = container.args.as_deref().unwrap_or_default();
    let index = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(index + 1)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{flag} without a value"))
}

fn container_port(container: &Container, name: &str) -> i32 {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no container port {name}"))
        .container_port
}

#[test]
fn control_plane_ports_flags_and_probes_agree() {
    let (objects, deployment, pod, server) = server_deployment();
    let spec = &deployment.spec;
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        server.command.as_deref(),
        Some(&["ipc-server".to_owned()][..])
    );

    // Ports: what the server listens on, what the container declares.
    assert_eq!(arg(&server, "--listen"), "0.0.0.0:7700");
    assert_eq!(arg(&server, "--metrics-listen"), "0.0.0.0:9700");
    assert_eq!(arg(&server, "--injector-listen"), "0.0.0.0:8443");
    assert_eq!(container_port(&server, "grpc"), 7700);
    assert_eq!(container_port(&server, "metrics"), 9700);
    assert_eq!(container_port(&server, "webhook"), 8443);

    // Native gRPC probes against grpc.health.v1 for the service the server registers.
    let readiness = server
        .readiness_probe
        .as_ref()
        .and_then(|p| p.grpc.as_ref())
        .expect("gRPC readiness probe");
    assert_eq!(readiness.port, 7700);
    assert_eq!(
        readiness.service.as_deref(),
        Some(ipc_proto::pb::ipc_server::SERVICE_NAME)
    );
    assert_eq!(readiness.service.as_deref(), Some("ipc.v1.Ipc"));
    let liveness = server
        .liveness_probe
        .as_ref()
        .and_then(|p| p.grpc.as_ref())
        .expect("gRPC liveness probe");
    assert_eq!(
        (liveness.port, liveness.service.as_deref()),
        (7700, Some(""))
    );

    // Prometheus scrapes the metrics port.
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .expect("pod annotations");
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port").map(String::as_str),
        Some("9700")
    );

    // The certificate files are in the mounted Secret the script creates.
    let mount = server
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "webhook-tls")
        .expect("webhook-tls mount");
    for flag in ["--injector-cert", "--injector-key"] {
        assert!(
            arg(&server, flag).starts_with(&format!("{}/", mount.mount_path)),
            "{flag} outside the Secret mount"
        );
    }
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "webhook-tls")
        .expect("webhook-tls volume");
    let secret_name = volume
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .expect("a Secret volume");
    let script =
        std::fs::read_to_string(k8s_dir("gen-webhook-cert.sh")).expect("gen-webhook-cert.sh");
    assert!(
        script.contains(&format!("SECRET=${{SECRET:-{secret_name}}}")),
        "the script creates Secret {secret_name}"
    );

    // High availability: a disruption budget and spreading over nodes.
    let pdb = parse_strict::<PodDisruptionBudget>(
        find(&objects, "PodDisruptionBudget", "ipc-server"),
        "pdb",
    );
    let selector = pdb.spec.unwrap().selector.unwrap().match_labels.unwrap();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the PDB selects the server pods"
    );
    let anti_affinity = pod
        .affinity
        .and_then(|a| a.pod_anti_affinity)
        .expect("pod anti-affinity");
    assert!(
        anti_affinity
            .preferred_during_scheduling_ignored_during_execution
            .is_some()
    );
    let resources = server.resources.expect("resources");
    assert!(
        resources.requests.is_some() && resources.limits.is_some(),
        "requests and limits"
    );
}

#[test]
fn service_exposes_grpc_metrics_and_webhook_ports() {
    let (objects, _, _, server) = server_deployment();
    let service = parse_strict::<Service>(find(&objects, "Service", "ipc-server"), "service");
    let ports = service.spec.unwrap().ports.unwrap();
    let port = |name: &str| {
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no {name} port"))
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    for (name, service_port, container_port_value) in [
        ("grpc", 7700, 7700),
        ("metrics", 9700, 9700),
        ("webhook", 443, 8443),
    ] {
        let p = port(name);
        assert_eq!(p.port, service_port, "{name}");
        let target = match p.target_port.clone().expect("targetPort") {
            IntOrString::Int(n) => n,
            IntOrString::String(named) => container_port(&server, &named),
        };
        assert_eq!(
            target, container_port_value,
            "{name} reaches the container port"
        );
    }
}

#[test]
fn webhook_configuration_matches_the_router_and_the_service() {
    let (objects, _, _, _) = server_deployment();
    let config = parse_strict::<MutatingWebhookConfiguration>(
        find(
            &objects,
            "MutatingWebhookConfiguration",
            "fleet-ipc-sidecar-injector",
        ),
        "webhook",
    );
    let webhooks = config.webhooks.expect("webhooks");
    assert_eq!(webhooks.len(), 1);
    let webhook = &webhooks[0];
    let service_ref = webhook
        .client_config
        .service
        .as_ref()
        .expect("a Service reference");
    assert_eq!(
        service_ref.path.as_deref(),
        Some(INJECT_PATH),
        "the path the router serves"
    );
    assert_eq!(service_ref.name, "ipc-server");
    assert_eq!(service_ref.namespace, "fleet-ipc");
    let service = parse_strict::<Service>(find(&objects, "Service", &service_ref.name), "service");
    let webhook_port = service
        .spec
        .unwrap()
        .ports
        .unwrap()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("webhook"))
        .unwrap();
    assert_eq!(service_ref.port, Some(webhook_port.port));

    assert_eq!(
        webhook.failure_policy.as_deref(),
        Some("Ignore"),
        "a down injector must not block pods"
    );
    assert_eq!(webhook.side_effects, "None");
    assert_eq!(webhook.admission_review_versions, ["v1"]);
    assert!(
        webhook.timeout_seconds.is_some_and(|t| t <= 5),
        "a short timeout"
    );
    let rules = webhook.rules.as_ref().expect("rules");
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods".to_owned()][..])
    );
    assert_eq!(
        rules[0].operations.as_deref(),
        Some(&["CREATE".to_owned()][..])
    );
    let excluded = webhook
        .namespace_selector
        .as_ref()
        .and_then(|s| s.match_expressions.as_ref())
        .and_then(|e| {
            e.iter()
                .find(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
        })
        .and_then(|e| e.values.clone())
        .expect("namespaces excluded by name");
    for namespace in ["fleet-ipc", "kube-system"] {
        assert!(
            excluded.iter().any(|n| n == namespace),
            "{namespace} must never be injected"
        );
    }
}

#[test]
fn images_and_upstream_agree_with_the_injector_defaults() {
    let (objects, _, _, server) = server_deployment();
    let defaults = InjectConfig::default();
    assert_eq!(
        server.image.as_deref(),
        Some(defaults.image.as_str()),
        "control plane and sidecar run one image"
    );
    let dockerfile =
        std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains(&format!("-t {} ", defaults.image)),
        "the Dockerfile's build command tags {}",
        defaults.image
    );

    let service = find(&objects, "Service", "ipc-server");
    let grpc_port = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap()["port"]
        .clone();
    let upstream = format!(
        "{}.{}.svc:{}",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap(),
        grpc_port
    );
    assert_eq!(
        defaults.upstream, upstream,
        "sidecars reach the control plane Service"
    );

    // The server's --redis points at the Redis Service, whose pods run append-only.
    let redis_service = find(&objects, "Service", "redis");
    let redis_port = &redis_service["spec"]["ports"][0]["port"];
    assert_eq!(
        arg(&server, "--redis"),
        format!("redis://redis:{redis_port}")
    );
    let redis = parse_strict::<StatefulSet>(find(&objects, "StatefulSet", "redis"), "redis");
    let redis_spec = redis.spec;
    let redis_container = &redis_spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(arg(redis_container, "--appendonly"), "yes");
    let data_dir = arg(redis_container, "--dir");
    let claim = &redis_spec
        .volume_claim_templates
        .as_ref()
        .expect("a persistent volume claim")[0];
    let claim_name = claim.metadata.name.as_deref().unwrap();
    assert!(
        redis_container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == claim_name && m.mount_path == data_dir),
        "Redis writes its log to the persistent volume"
    );
}

#[test]
fn dockerfile_builds_and_copies_binaries_the_workspace_defines() {
    let dockerfile =
        std::fs::read_to_string(repo_root().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    let built: BTreeSet<String> = dockerfile
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1].to_owned())
        .collect();
    let copied: BTreeSet<String> = dockerfile
        .lines()
        .filter(|l| l.trim_start().starts_with("COPY --from=build"))
        .flat_map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.strip_prefix("/out/"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: BTreeSet<String> = ["ipc-server", "ipc-sidecar", "ipcctl"]
        .map(str::to_owned)
        .into();
    assert_eq!(built, expected, "cargo build --bin ...");
    assert_eq!(copied, expected, "COPY --from=build /out/...");
    assert!(
        dockerfile.lines().any(|l| l.trim() == "USER 65532:65532"),
        "runs as non-root"
    );

    let metadata = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo_root())
        .output()
        .expect("cargo metadata");
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).expect("metadata JSON");
    let packages = metadata["packages"].as_array().unwrap();
    let bins: BTreeSet<&str> = packages
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .filter_map(|t| t["name"].as_str())
        .collect();
    let package_names: BTreeSet<&str> =
        packages.iter().filter_map(|p| p["name"].as_str()).collect();
    for binary in &expected {
        // A package's src/main.rs builds a binary of the package's name.
        assert!(
            bins.contains(binary.as_str()) || package_names.contains(binary.as_str()),
            "{binary} is neither a [[bin]] nor a package of the workspace (bins: {bins:?})"
        );
    }
}

fn example_file(name: &str) -> String {
    std::fs::read_to_string(k8s_dir("example").join(name))
        .unwrap_or_else(|e| panic!("example/{name}: {e}"))
}

#[test]
fn example_manifests_are_valid_and_get_the_sidecar_offline() {
    parse_all(&render(&k8s_dir("example")));
    for (file, kind, name, role) in [
        ("worker.yaml", "Deployment", "worker", "worker"),
        ("config-init-job.yaml", "Job", "config-init", "deployer"),
    ] {
        let out =
            inject_manifests_report(&example_file(file), &InjectConfig::default()).expect(file);
        assert_eq!(out.injected, [format!("{kind}/{name}")], "{file}");
        assert!(out.warnings.is_empty(), "{file}: {:?}", out.warnings);
        let objects = common::yaml_documents(&out.yaml);
        parse_all(&objects);
        let template = &find(&objects, kind, name)["spec"]["template"];
        let spec: PodSpec = parse_strict(&template["spec"], file);
        let sidecar = &spec.init_containers.as_ref().expect("initContainers")[0];
        assert_eq!(sidecar.name, "ipc-sidecar");
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        let args = sidecar.args.clone().unwrap();
        let role_at = args.iter().position(|a| a == "--role").expect("--role");
        assert_eq!(args[role_at + 1], role);
        let app_at = args.iter().position(|a| a == "--app").expect("--app");
        assert_eq!(args[app_at + 1], "shop");
        for container in &spec.containers {
            assert!(
                container
                    .env
                    .iter()
                    .flatten()
                    .any(|e| e.name == "IPC_SOCKET"),
                "{file}: {}",
                container.name
            );
            // The app reaches the socket through $(IPC_SOCKET), which must now resolve.
            assert!(
                container
                    .args
                    .iter()
                    .flatten()
                    .any(|a| a == "$(IPC_SOCKET)"),
                "{file}: {}",
                container.name
            );
        }
        assert_eq!(
            template["metadata"]["annotations"]["fleet-ipc.io/status"],
            "injected"
        );

        let again =
            inject_manifests_report(&out.yaml, &InjectConfig::default()).expect("second pass");
        assert!(
            again.injected.is_empty(),
            "{file}: injecting twice adds nothing"
        );
        assert_eq!(again.yaml, out.yaml);
    }
}

#[test]
fn the_whole_example_kustomization_injects_only_the_annotated_workloads() {
    let rendered = render(&k8s_dir("example"));
    let yaml: String = rendered
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap()))
        .collect();
    let out = inject_manifests_report(&yaml, &InjectConfig::default()).expect("inject");
    assert_eq!(out.injected, ["Deployment/worker", "Job/config-init"]);
    let objects = common::yaml_documents(&out.yaml);
    assert_eq!(
        find(&objects, "Namespace", "shop"),
        find(&rendered, "Namespace", "shop"),
        "the Namespace is untouched"
    );
}

#[test]
fn the_base_itself_is_left_untouched_by_injection() {
    let rendered = render(&k8s_dir(""));
    let yaml: String = rendered
        .iter()
        .map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap()))
        .collect();
    let out = inject_manifests_report(&yaml, &InjectConfig::default()).expect("inject");
    assert!(out.injected.is_empty());
    assert_eq!(out.yaml, yaml);
}

// ---- overlays/sentinel: Redis with Sentinel and TLS ----

/// The sentinel overlay, rendered and checked strictly.
fn sentinel_overlay() -> Vec<Value> {
    let objects = render(&k8s_dir("overlays/sentinel"));
    parse_all(&objects);
    objects
}

fn statefulset(objects: &[Value], name: &str) -> (StatefulSet, PodSpec, Container) {
    let set = parse_strict::<StatefulSet>(find(objects, "StatefulSet", name), name);
    let pod = set.spec.template.spec.clone().unwrap();
    let container = pod.containers[0].clone();
    (set, pod, container)
}

fn the_server(objects: &[Value]) -> (PodSpec, Container) {
    let deployment =
        parse_strict::<Deployment>(find(objects, "Deployment", "ipc-server"), "ipc-server");
    let pod = deployment.spec.template.spec.unwrap();
    let container = pod.containers[0].clone();
    (pod, container)
}

fn env<'a>(container: &'a Container, name: &str) -> &'a str {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{}: no env {name}", container.name))
}

/// The Secret and key a file path is read from: the path must be
/// `MOUNT/KEY` of a Secret volume mounted in `container`.
fn secret_file(pod: &PodSpec, container: &Container, path: &str) -> (String, String) {
    let (dir, key) = path.rsplit_once('/').expect("an absolute path");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {dir} for {path}", container.name));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {}", mount.name));
    let secret = volume
        .secret
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| panic!("{path}: volume {} is not a Secret", volume.name));
    (secret, key.to_owned())
}

/// Each `--redis-sentinel` address, as `(StatefulSet pod, Service, port)`.
fn sentinel_addresses(server: &Container) -> Vec<(String, String, i32)> {
    arg(server, "--redis-sentinel")
        .split(',')
        .map(|address| {
            let (host, port) = address.rsplit_once(':').expect("HOST:PORT");
            let labels: Vec<&str> = host.split('.').collect();
            assert!(
                matches!(labels[..], [_, _, "fleet-ipc", "svc"]),
                "{address}: not POD.SERVICE.fleet-ipc.svc"
            );
            (
                labels[0].to_owned(),
                labels[1].to_owned(),
                port.parse().expect("a port"),
            )
        })
        .collect()
}

#[test]
fn the_sentinel_overlay_runs_a_tls_redis_primary_with_replicas_and_three_sentinels() {
    let objects = sentinel_overlay();
    let (redis, redis_pod, redis_container) = statefulset(&objects, "redis");
    let (sentinels, sentinel_pod, sentinel) = statefulset(&objects, "redis-sentinel");
    let redis_replicas = redis.spec.replicas.unwrap();
    let sentinel_replicas = sentinels.spec.replicas.unwrap();
    assert_eq!(redis_replicas, 3, "a primary and two replicas");
    assert_eq!(sentinel_replicas, 3);

    // TLS only, on the port the Service names; the bus log stays append-only.
    let redis_service = parse_strict::<Service>(find(&objects, "Service", "redis"), "redis");
    let redis_port = redis_service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    assert_eq!(arg(&redis_container, "--port"), "0", "no plain-text port");
    assert_eq!(arg(&redis_container, "--tls-port"), redis_port.to_string());
    assert_eq!(container_port(&redis_container, "redis"), redis_port);
    assert_eq!(arg(&redis_container, "--appendonly"), "yes");
    for container in [&redis_container, &sentinel] {
        for flag in ["--tls-auth-clients", "--tls-replication"] {
            assert_eq!(arg(container, flag), "yes", "{}: {flag}", container.name);
        }
        let pod = if container.name == "redis" {
            &redis_pod
        } else {
            &sentinel_pod
        };
        for flag in ["--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"] {
            let (secret, _) = secret_file(pod, container, arg(container, flag));
            assert_eq!(secret, "redis-tls", "{}: {flag}", container.name);
        }
        // The scripts find the other pods by these.
        assert_eq!(env(container, "REDIS_REPLICAS"), redis_replicas.to_string());
        assert_eq!(
            env(container, "SENTINEL_REPLICAS"),
            sentinel_replicas.to_string()
        );
        assert_eq!(env(container, "SENTINEL_SERVICE"), "redis-sentinel");
    }
    assert_eq!(
        arg(&sentinel, "--tls-port"),
        env(&sentinel, "SENTINEL_PORT")
    );
    // A failover needs a majority of the Sentinels to agree.
    let quorum: i32 = env(&sentinel, "SENTINEL_QUORUM").parse().unwrap();
    assert_eq!(quorum, sentinel_replicas / 2 + 1);

    // The start scripts exist where the pods run them and are valid shell.
    let scripts = parse_strict::<ConfigMap>(
        find(&objects, "ConfigMap", "redis-scripts"),
        "redis-scripts",
    )
    .data
    .expect("scripts");
    for container in [&redis_container, &sentinel] {
        let command = container.command.clone().unwrap();
        let script = command[1].strip_prefix("/scripts/").expect("/scripts/...");
        assert!(scripts.contains_key(script), "{script}");
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in &scripts {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let check = std::process::Command::new("sh")
            .arg("-n")
            .arg(&path)
            .output()
            .expect("sh");
        assert!(
            check.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    // Replication and Sentinel may reach Redis; only those and the server may.
    let policy = find(&objects, "NetworkPolicy", "redis");
    let allowed: BTreeSet<&str> = policy["spec"]["ingress"][0]["from"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str())
        .collect();
    assert_eq!(
        allowed,
        BTreeSet::from(["ipc-server", "redis", "redis-sentinel"])
    );
}

#[test]
fn the_sentinel_overlay_server_flags_name_sentinels_files_and_replicas_that_exist() {
    let objects = sentinel_overlay();
    let (pod, server) = the_server(&objects);
    let args = server.args.clone().unwrap();
    assert!(
        !args.iter().any(|a| a == "--redis"),
        "--redis and --redis-sentinel exclude each other"
    );

    // Every Sentinel address is a pod of the Sentinel StatefulSet behind its
    // headless Service, on the port Sentinel listens on.
    let addresses = sentinel_addresses(&server);
    let (sentinels, _, sentinel) = statefulset(&objects, "redis-sentinel");
    let sentinels = sentinels.spec;
    assert_eq!(addresses.len() as i32, sentinels.replicas.unwrap());
    for (index, (pod_name, service_name, port)) in addresses.iter().enumerate() {
        assert_eq!(pod_name, &format!("redis-sentinel-{index}"));
        assert_eq!(service_name, &sentinels.service_name.clone().unwrap());
        let service =
            parse_strict::<Service>(find(&objects, "Service", service_name), service_name)
                .spec
                .unwrap();
        assert_eq!(
            service.cluster_ip.as_deref(),
            Some("None"),
            "pods have DNS names"
        );
        assert!(
            service.ports.unwrap().iter().any(|p| p.port == *port),
            "Service {service_name} has port {port}"
        );
        assert_eq!(container_port(&sentinel, "sentinel"), *port);
    }
    assert_eq!(
        arg(&server, "--redis-master"),
        env(&sentinel, "REDIS_MASTER")
    );
    let (redis, redis_pod, redis_container) = statefulset(&objects, "redis");
    assert_eq!(
        arg(&server, "--redis-master"),
        env(&redis_container, "REDIS_MASTER")
    );

    // TLS: the CA and client certificate come from the server's Secret, whose CA is
    // the one Redis checks clients with (same file name in both Secrets).
    let (ca_secret, ca_key) = secret_file(&pod, &server, arg(&server, "--redis-ca"));
    assert_eq!(
        (ca_secret.as_str(), ca_key.as_str()),
        ("ipc-server-redis-tls", "ca.crt")
    );
    for (flag, key) in [("--redis-cert", "tls.crt"), ("--redis-key", "tls.key")] {
        assert_eq!(
            secret_file(&pod, &server, arg(&server, flag)),
            ("ipc-server-redis-tls".to_owned(), key.to_owned()),
            "{flag}"
        );
    }
    let redis_ca = arg(&redis_container, "--tls-ca-cert-file");
    assert_eq!(
        secret_file(&redis_pod, &redis_container, redis_ca).1,
        ca_key
    );
    // The password Redis is given (the script reads /etc/redis/auth/password) is
    // the one the server sends.
    let password = secret_file(&pod, &server, arg(&server, "--redis-password-file"));
    assert_eq!(
        secret_file(&redis_pod, &redis_container, "/etc/redis/auth/password"),
        password
    );
    // The Sentinels' own password: the file the server reads is the Secret the
    // Sentinels' requirepass comes from, which the Redis pods' start script also
    // reads to ask the Sentinels for the primary; it is not Redis's password.
    let sentinel_password = secret_file(
        &pod,
        &server,
        arg(&server, "--redis-sentinel-password-file"),
    );
    assert_eq!(
        sentinel_password,
        ("redis-sentinel-auth".to_owned(), "password".to_owned())
    );
    assert_ne!(sentinel_password.0, password.0);
    let (_, sentinel_pod, sentinel) = statefulset(&objects, "redis-sentinel");
    for (pod, container) in [(&sentinel_pod, &sentinel), (&redis_pod, &redis_container)] {
        assert_eq!(
            secret_file(pod, container, "/etc/redis/sentinel-auth/password"),
            sentinel_password,
            "{}",
            container.name
        );
    }
    let scripts = parse_strict::<ConfigMap>(
        find(&objects, "ConfigMap", "redis-scripts"),
        "redis-scripts",
    )
    .data
    .expect("scripts");
    assert!(scripts["common.sh"].contains("$(cat /etc/redis/sentinel-auth/password)"));
    assert!(scripts["sentinel.sh"].contains("requirepass \"$SENTINEL_AUTH\""));

    // Acknowledged once a replica holds it, with a replica to spare.
    let min_replicas: i32 = arg(&server, "--redis-min-replicas").parse().unwrap();
    assert_eq!(min_replicas, 1);
    assert!(redis.spec.replicas.unwrap() > min_replicas + 1);

    // What the secrets script creates is what the pods mount.
    let script = std::fs::read_to_string(k8s_dir("overlays/sentinel/gen-redis-secrets.sh"))
        .expect("gen-redis-secrets.sh");
    for secret in [
        "redis-tls",
        "ipc-server-redis-tls",
        "redis-auth",
        "redis-sentinel-auth",
    ] {
        assert!(script.contains(secret), "the script makes {secret}");
    }
}

/// The secrets script's certificates, checked the way ipc-server (rustls) and
/// Redis check them: Redis's and Sentinel's for every name in use, the server's as
/// a client certificate of the same CA.
#[cfg(feature = "webhook")]
#[test]
fn the_redis_secrets_script_certifies_every_name_the_overlay_uses() {
    use std::sync::Arc;
    use tokio_rustls::rustls::RootCertStore;
    use tokio_rustls::rustls::client::WebPkiServerVerifier;
    use tokio_rustls::rustls::client::danger::ServerCertVerifier;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::rustls::server::WebPkiClientVerifier;

    let dir = tempfile::tempdir().expect("tempdir");
    let script = k8s_dir("overlays/sentinel/gen-redis-secrets.sh");
    let output = std::process::Command::new("bash")
        .arg(&script)
        .env("OUT_DIR", dir.path())
        .output()
        .expect("bash");
    assert!(
        output.status.success(),
        "{} failed (it needs openssl):\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let certificate =
        |path: std::path::PathBuf| CertificateDer::from_pem_file(&path).expect("a PEM certificate");
    let ca = certificate(dir.path().join("ipc-server-redis-tls/ca.crt"));
    assert_eq!(ca, certificate(dir.path().join("redis-tls/ca.crt")));
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    let roots = Arc::new(roots);
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());

    let objects = sentinel_overlay();
    let (_, server) = the_server(&objects);
    let mut names: Vec<String> = sentinel_addresses(&server)
        .into_iter()
        .map(|(pod, service, _)| format!("{pod}.{service}.fleet-ipc.svc"))
        .collect();
    // The primary and replicas as Sentinel names them (redis.sh's replica-announce-ip).
    names.extend((0..3).map(|i| format!("redis-{i}.redis.fleet-ipc.svc")));
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let redis = certificate(dir.path().join("redis-tls/tls.crt"));
    for name in &names {
        verifier
            .verify_server_cert(
                &redis,
                &[],
                &ServerName::try_from(name.clone()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let outsider = ServerName::try_from("redis-0.elsewhere.fleet-ipc.svc").unwrap();
    assert!(
        verifier
            .verify_server_cert(&redis, &[], &outsider, &[], UnixTime::now())
            .is_err()
    );

    // Redis and Sentinel (tls-auth-clients yes) accept the server's certificate,
    // and each other's (replication, Sentinel to Redis).
    let clients = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap();
    for client in ["ipc-server-redis-tls", "redis-tls"] {
        clients
            .verify_client_cert(
                &certificate(dir.path().join(client).join("tls.crt")),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{client}: {e}"));
    }
    let password = std::fs::read_to_string(dir.path().join("redis-auth/password")).unwrap();
    assert!(password.len() >= 32 && !password.contains('\n'));
    let sentinel_password =
        std::fs::read_to_string(dir.path().join("redis-sentinel-auth/password")).unwrap();
    assert!(sentinel_password.len() >= 32 && !sentinel_password.contains('\n'));
    assert_ne!(sentinel_password, password);
}

// ---- authentication: tokens, and the laptop overlay's opt-out ----

/// The default a script gives to `VAR`, from its `VAR=${VAR:-default}` line.
fn script_default(script: &str, var: &str) -> String {
    let text = std::fs::read_to_string(k8s_dir(script)).unwrap_or_else(|e| panic!("{script}: {e}"));
    let prefix = format!("{var}=${{{var}:-");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix)?.strip_suffix('}'))
        .unwrap_or_else(|| panic!("{script} has no {prefix}...}} line"))
        .to_owned()
}

/// Every YAML file under deploy/ (recursively), but those under `except`.
fn yaml_files(dir: &std::path::Path, except: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        if path.starts_with(except) {
            continue;
        }
        if path.is_dir() {
            yaml_files(&path, except, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Whether a rendered object turns authentication off anywhere: an `--insecure`
/// argument or an `IPC_INSECURE` variable.
fn runs_insecure(object: &Value) -> bool {
    match object {
        Value::String(s) => s == "--insecure" || s.starts_with("--insecure="),
        Value::Array(items) => items.iter().any(runs_insecure),
        Value::Object(map) => {
            map.get("name").and_then(Value::as_str) == Some("IPC_INSECURE")
                || map.values().any(runs_insecure)
        }
        _ => false,
    }
}

#[test]
fn no_shipped_manifest_but_the_laptop_overlay_turns_authentication_off() {
    let deploy = repo_root().join("deploy");
    let laptop = k8s_dir("overlays/laptop");
    let mut files = Vec::new();
    yaml_files(&deploy, &laptop, &mut files);
    assert!(files.len() >= 8, "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for word in ["--insecure", "IPC_INSECURE"] {
            assert!(
                !text.contains(word),
                "{} mentions {word}: only the laptop overlay may turn authentication off",
                file.display()
            );
        }
    }
    for dir in ["", "example"] {
        let objects = render(&k8s_dir(dir));
        assert!(
            !objects.iter().any(runs_insecure),
            "deploy/k8s/{dir} renders a manifest without authentication"
        );
    }
    // The one exception says so loudly, and is what it says.
    let overlay = std::fs::read_to_string(laptop.join("kustomization.yaml")).unwrap();
    assert!(overlay.contains("WARNING: INSECURE"), "{overlay}");
    let rendered = render(&laptop);
    let server = find(&rendered, "Deployment", "ipc-server");
    assert!(runs_insecure(server), "the laptop overlay runs --insecure");
    let readme = std::fs::read_to_string(deploy.join("README.md")).unwrap();
    assert!(
        readme.contains("overlays/laptop") && readme.contains("**insecure**"),
        "deploy/README.md warns about the laptop overlay"
    );
}

#[test]
fn the_control_plane_requires_tokens_from_the_secret_the_script_writes() {
    let (_, _, pod, server) = server_deployment();
    assert!(
        !arg(&server, "--tokens-watch").is_empty(),
        "a Secret volume changes without a signal"
    );
    let (secret, key) = secret_file(&pod, &server, arg(&server, "--tokens"));
    assert_eq!(
        (secret.as_str(), key.as_str()),
        (
            script_default("issue-token.sh", "TOKENS_SECRET").as_str(),
            "tokens.toml"
        ),
        "the Secret and key issue-token.sh writes"
    );
    let optional = pod
        .volumes
        .iter()
        .flatten()
        .find_map(|v| {
            v.secret
                .as_ref()
                .filter(|s| s.secret_name.as_ref() == Some(&secret))
        })
        .and_then(|s| s.optional);
    assert_ne!(optional, Some(true), "no tokens, no start");

    // The injector gives sidecars the namespace Secret the script writes.
    let token_secret = env(&server, "IPC_SIDECAR_TOKEN_SECRET");
    assert_eq!(token_secret, InjectConfig::default().token_secret);
    assert_eq!(
        token_secret,
        script_default("issue-token.sh", "TOKEN_SECRET")
    );
    let script = std::fs::read_to_string(k8s_dir("issue-token.sh")).unwrap();
    assert!(
        script.contains(&format!(
            "apply_secret \"$subject\" \"$TOKEN_SECRET\" {} ",
            ipc_inject::plan::TOKEN_KEY
        )),
        "the script writes the key the sidecar reads"
    );
}

/// The injection config the control plane of `objects` runs its webhook with: the
/// defaults and the `IPC_SIDECAR_*` variables of its Deployment that this test knows.
fn injector_config(objects: &[Value]) -> InjectConfig {
    let deployment =
        parse_strict::<Deployment>(find(objects, "Deployment", "ipc-server"), "ipc-server");
    let container = deployment.spec.template.spec.unwrap().containers.remove(0);
    let mut config = InjectConfig::default();
    for var in container.env.into_iter().flatten() {
        match var.name.as_str() {
            "IPC_SIDECAR_TOKEN_SECRET" => config.token_secret = var.value.unwrap_or_default(),
            name if name.starts_with("IPC_SIDECAR_") => panic!("{name}: teach this test"),
            _ => {}
        }
    }
    config
}

#[test]
fn injected_sidecars_mount_their_namespace_token_and_only_they() {
    use ipc_inject::plan::{TOKEN_DIR, TOKEN_KEY, TOKEN_VOLUME, pod_id};
    let config = injector_config(&render(&k8s_dir("")));
    for (file, kind, name) in [
        ("worker.yaml", "Deployment", "worker"),
        ("config-init-job.yaml", "Job", "config-init"),
    ] {
        let out = inject_manifests_report(&example_file(file), &config).expect(file);
        let objects = common::yaml_documents(&out.yaml);
        let template = &find(&objects, kind, name)["spec"]["template"];
        let spec: PodSpec = parse_strict(&template["spec"], file);
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == TOKEN_VOLUME)
            .expect("the token volume");
        assert_eq!(
            volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some(config.token_secret.as_str()),
            "{file}"
        );
        let sidecar = &spec.init_containers.as_ref().unwrap()[0];
        let mount = sidecar
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == TOKEN_VOLUME)
            .expect("the sidecar mounts its token");
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (TOKEN_DIR, Some(true))
        );
        let env: Vec<(&str, Option<&str>)> = sidecar
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        let token_file = format!("{TOKEN_DIR}/{TOKEN_KEY}");
        assert!(
            env.contains(&("IPC_TOKEN_FILE", Some(token_file.as_str()))),
            "{env:?}"
        );
        // Its id is within the app's channels, which the namespace's token is
        // granted (`shop:>`); the variables it names are the sidecar's own.
        let args = sidecar.args.clone().unwrap();
        let id_at = args.iter().position(|a| a == "--id").expect("--id");
        assert_eq!(args[id_at + 1], pod_id("shop"));
        assert!(args[id_at + 1].starts_with("shop:"));
        for var in ["POD_NAMESPACE", "POD_NAME"] {
            assert!(env.iter().any(|(n, _)| *n == var), "{var} for $({var})");
        }
        for container in &spec.containers {
            assert!(
                !container
                    .volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == TOKEN_VOLUME),
                "{file}: {} must not see the pod's token",
                container.name
            );
        }
    }

    // The laptop overlay's injector gives sidecars no token.
    let laptop = injector_config(&render(&k8s_dir("overlays/laptop")));
    assert_eq!(laptop.token_secret, "");
    let out = inject_manifests_report(&example_file("worker.yaml"), &laptop).unwrap();
    assert!(!out.yaml.contains(TOKEN_VOLUME) && !out.yaml.contains("IPC_TOKEN_FILE"));
}
