//! Unit tests of the injection plan.

use super::*;

fn pod(annotations: Value) -> Value {
    json!({
        "metadata": {"name": "web-1", "labels": {"app": "shop"}, "annotations": annotations},
        "spec": {"containers": [{"name": "web", "image": "nginx"}]}
    })
}

fn patched(template: &Value) -> Value {
    let injection = plan(template, &InjectConfig::default()).unwrap();
    let mut out = template.clone();
    json_patch::patch(&mut out, &injection.json_patch(&[])).unwrap();
    out
}

#[test]
fn without_the_annotation_nothing_happens() {
    for annotations in [
        json!({}),
        json!({"fleet-ipc.io/inject": "false"}),
        Value::Null,
    ] {
        assert_eq!(
            plan(&pod(annotations), &InjectConfig::default()).unwrap(),
            Injection::NotRequested
        );
    }
}

#[test]
fn injection_is_idempotent() {
    let once = patched(&pod(json!({"fleet-ipc.io/inject": "true"})));
    assert_eq!(
        plan(&once, &InjectConfig::default()).unwrap(),
        Injection::AlreadyInjected
    );
}

#[test]
fn sidecar_args_carry_the_identity() {
    let out = patched(&pod(json!({
        "fleet-ipc.io/inject": "true",
        "fleet-ipc.io/role": "worker",
        "fleet-ipc.io/tag": "eu-1",
        "fleet-ipc.io/hooks": "worker:restart=kill -TERM 1\n\nconfig:init=touch /tmp/reload\n",
    })));
    let args: Vec<&str> = out["spec"]["initContainers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "--socket",
            "/var/run/fleet-ipc/ipc.sock",
            "--upstream",
            crate::config::DEFAULT_UPSTREAM,
            "--health-listen",
            "0.0.0.0:7701",
            "--app",
            "shop",
            "--role",
            "worker",
            "--tag",
            "eu-1",
            "--id",
            "shop:pod:$(POD_NAMESPACE):$(POD_NAME)",
            "--hook",
            "worker:restart=kill -TERM 1",
            "--hook",
            "config:init=touch /tmp/reload",
        ]
    );
}

#[test]
fn app_annotation_wins_over_the_label() {
    let out = patched(&pod(
        json!({"fleet-ipc.io/inject": "true", "fleet-ipc.io/app": "billing"}),
    ));
    let args = out["spec"]["initContainers"][0]["args"].to_string();
    assert!(args.contains(r#""--app","billing""#), "{args}");
}

#[test]
fn a_bad_role_is_refused_with_the_annotation_named() {
    let err = plan(
        &pod(json!({"fleet-ipc.io/inject": "true", "fleet-ipc.io/role": "web workers"})),
        &InjectConfig::default(),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("fleet-ipc.io/role") && message.contains("web workers"),
        "{message}"
    );
}

#[test]
fn a_hook_without_an_op_is_refused() {
    let err = plan(
        &pod(json!({"fleet-ipc.io/inject": "true", "fleet-ipc.io/hooks": "kill -TERM 1"})),
        &InjectConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("OP=COMMAND"), "{err}");
}

#[test]
fn existing_init_containers_are_kept_after_the_sidecar_and_see_the_socket() {
    let mut template = pod(json!({"fleet-ipc.io/inject": "true"}));
    template["spec"]["initContainers"] =
        json!([{"name": "migrate", "image": "shop", "env": [{"name": "A", "value": "1"}]}]);
    let out = patched(&template);
    let init = out["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], SIDECAR_CONTAINER);
    assert_eq!(init[1]["name"], "migrate");
    assert_eq!(
        init[1]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "IPC_SOCKET", "value": "/var/run/fleet-ipc/ipc.sock"}])
    );
    assert_eq!(
        init[1]["volumeMounts"],
        json!([{"name": SOCKET_VOLUME, "mountPath": "/var/run/fleet-ipc"}])
    );
}

#[test]
fn users_own_ipc_socket_and_volume_are_left_alone() {
    let mut template = pod(json!({"fleet-ipc.io/inject": "true"}));
    template["spec"]["containers"][0]["env"] =
        json!([{"name": "IPC_SOCKET", "value": "/custom.sock"}]);
    template["spec"]["volumes"] =
        json!([{"name": SOCKET_VOLUME, "emptyDir": {"medium": "Memory"}}]);
    let out = patched(&template);
    assert_eq!(
        out["spec"]["containers"][0]["env"],
        json!([{"name": "IPC_SOCKET", "value": "/custom.sock"}])
    );
    // The user's socket volume is kept; the token volume is added after it.
    assert_eq!(
        out["spec"]["volumes"][0],
        json!({"name": SOCKET_VOLUME, "emptyDir": {"medium": "Memory"}})
    );
    assert_eq!(out["spec"]["volumes"][1]["name"], TOKEN_VOLUME);
}

#[test]
fn a_foreign_mount_on_the_socket_dir_is_reported() {
    let mut template = pod(json!({"fleet-ipc.io/inject": "true"}));
    template["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "run", "mountPath": "/var/run/fleet-ipc/"}]);
    let Injection::Patch { warnings, .. } = plan(&template, &InjectConfig::default()).unwrap()
    else {
        panic!("expected a patch");
    };
    assert!(
        warnings.iter().any(|w| w.contains("\"web\"")),
        "{warnings:?}"
    );
}

#[test]
fn the_namespace_token_is_mounted_into_the_sidecar_only_by_default() {
    let out = patched(&pod(json!({"fleet-ipc.io/inject": "true"})));
    assert_eq!(
        out["spec"]["volumes"][1]["secret"]["secretName"],
        crate::config::DEFAULT_TOKEN_SECRET
    );
    let sidecar_env = out["spec"]["initContainers"][0]["env"].to_string();
    assert!(
        sidecar_env.contains(r#""IPC_TOKEN_FILE","value":"/var/run/secrets/fleet-ipc/token""#),
        "{sidecar_env}"
    );
    assert!(
        !out["spec"]["containers"][0]
            .to_string()
            .contains(TOKEN_VOLUME)
    );
}

#[test]
fn without_a_token_secret_nothing_is_mounted() {
    let config = InjectConfig {
        token_secret: String::new(),
        ..Default::default()
    };
    let template = pod(json!({"fleet-ipc.io/inject": "true"}));
    let mut out = template.clone();
    json_patch::patch(&mut out, &plan(&template, &config).unwrap().json_patch(&[])).unwrap();
    assert_eq!(out["spec"]["volumes"].as_array().unwrap().len(), 1);
    assert!(!out.to_string().contains("IPC_TOKEN_FILE"));
}

#[test]
fn malformed_specs_are_errors_not_panics() {
    for template in [
        json!({"metadata": {"annotations": {"fleet-ipc.io/inject": "true"}}}),
        json!({"metadata": {"annotations": {"fleet-ipc.io/inject": "true"}}, "spec": {"containers": 3}}),
        json!({"metadata": {"annotations": {"fleet-ipc.io/inject": "true"}}, "spec": {"containers": [7]}}),
        json!({"metadata": {"annotations": {"fleet-ipc.io/inject": "true"}}, "spec": {"containers": [], "volumes": {}}}),
        json!({"metadata": {"annotations": ["x"]}}),
        json!({"metadata": {"annotations": {"fleet-ipc.io/inject": true}}}),
    ] {
        assert!(
            plan(&template, &InjectConfig::default()).is_err(),
            "{template}"
        );
    }
}
