//! deploy/'s Kubernetes set-up end to end, with real processes: tokens issued by
//! `deploy/k8s/issue-token.sh`, a control plane that requires them and re-reads
//! its tokens file when it changes (as the Deployment runs it), and a sidecar run
//! exactly as the injector configures it in the example app's pods — its
//! arguments, its environment, its namespace's token file. The pod is admitted
//! with its namespace's token, an operator reaches it, another namespace's token
//! is refused the app, and revoking the namespace's token cuts the pod off.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use ipc_inject::plan::{SIDECAR_CONTAINER, TOKEN_DIR};
use ipc_inject::{InjectConfig, inject_manifests_report};
use ipc_proto::pb::{MembersRequest, SubscribeRequest};
use tonic::Code;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Runs `deploy/k8s/issue-token.sh ARGS` with `OUT_DIR=out`; returns its stdout.
fn issue_token(out: &Path, args: &[&str]) -> String {
    let output = Command::new(deploy("k8s/issue-token.sh"))
        .args(args)
        .env("OUT_DIR", out)
        .stderr(Stdio::inherit())
        .output()
        .expect("running issue-token.sh (bash, openssl)");
    assert!(output.status.success(), "issue-token.sh {args:?} failed");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// `message` with `authorization: Bearer <secret>`.
fn authed<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        ipc_core::grpc::identify::bearer(secret).unwrap(),
    );
    request
}

/// The injected sidecar of the example's worker Deployment: its arguments and its
/// literal environment, `$(VAR)` references expanded as the kubelet does with the
/// downward-API values `pod`.
fn injected_sidecar(pod: &HashMap<&str, &str>) -> (Vec<String>, Vec<(String, String)>) {
    let worker = std::fs::read_to_string(deploy("k8s/example/worker.yaml")).unwrap();
    let injected = inject_manifests_report(&worker, &InjectConfig::default()).unwrap();
    // worker.yaml is one document: the Deployment.
    let deployment: serde_json::Value = serde_yaml::from_str(&injected.yaml).unwrap();
    assert_eq!(deployment["kind"], "Deployment");
    let sidecar = &deployment["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], SIDECAR_CONTAINER);
    let mut env = Vec::new();
    for var in sidecar["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = match var["value"].as_str() {
            Some(value) => value,
            None => pod
                .get(name)
                .unwrap_or_else(|| panic!("no downward-API value for {name}")),
        };
        env.push((name.to_string(), value.to_string()));
    }
    let expand = |text: &str| {
        env.iter().fold(text.to_string(), |text, (name, value)| {
            text.replace(&format!("$({name})"), value)
        })
    };
    let args = sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| expand(a.as_str().unwrap()))
        .collect();
    (args, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_sidecar_joins_with_its_namespace_token_and_no_other() {
    let out = tempfile::tempdir().unwrap();
    issue_token(out.path(), &["shop", "shop"]);
    issue_token(out.path(), &["billing", "billing"]);
    let ops = issue_token(out.path(), &["--operator", "ops", "shop"]);
    let billing = std::fs::read_to_string(out.path().join("billing.token")).unwrap();
    let billing = billing.trim();

    let tokens = out.path().join("tokens.toml");
    let server = server_on(
        None,
        &[
            "--tokens",
            tokens.to_str().unwrap(),
            "--tokens-watch",
            "100ms",
        ],
    );

    // The pod's sidecar as Kubernetes runs it: the namespace's Secret mounted at
    // TOKEN_DIR, the downward API, and the injected arguments (but for the
    // addresses, which are the test's).
    let pod = HashMap::from([
        ("POD_NAME", "worker-7d9f8-abcde"),
        ("POD_NAMESPACE", "shop"),
        ("NODE_NAME", "node-1"),
    ]);
    let (args, env) = injected_sidecar(&pod);
    let secret_dir = out.path().join("mounted-secret");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::copy(out.path().join("shop.token"), secret_dir.join("token")).unwrap();
    let env: Vec<(String, String)> = env
        .into_iter()
        .map(|(name, value)| {
            let value = match value.strip_prefix(TOKEN_DIR) {
                Some(rest) => format!("{}{rest}", secret_dir.display()),
                None => value,
            };
            (name, value)
        })
        .collect();
    assert!(env.iter().any(|(name, _)| name == "IPC_TOKEN_FILE"));
    let mut kept = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" | "--upstream" => drop(args.next()),
            "--health-listen" => {
                args.next();
                kept.extend(["--health-listen".to_string(), "127.0.0.1:0".to_string()]);
            }
            _ => kept.push(arg),
        }
    }
    let pod_id = "shop:pod:shop:worker-7d9f8-abcde";
    assert!(kept.iter().any(|a| a == pod_id), "{kept:?}");
    let socket = out.path().join("run").join("ipc.sock");
    let sidecar = SidecarProcess::start_with_env(&socket, &server.url(), &kept, &env)
        .unwrap_or_else(|e| panic!("{e}"));
    sidecar.wait_upstream(true).await;

    // An operator sees the pod under its id and reaches its processes.
    let mut control = server.client().await;
    let members = control
        .members(authed(
            MembersRequest {
                app: "shop".into(),
                ..MembersRequest::default()
            },
            &ops,
        ))
        .await
        .expect("ops may list members")
        .into_inner()
        .members;
    assert!(
        members.iter().any(|m| m.id == pod_id && m.role == "worker"),
        "{members:?}"
    );
    let mut local = sidecar.client().await;
    let mut worker = subscribe_to(&mut local, &[":worker"]).await;
    control
        .broadcast(authed(
            ipc_proto::pb::BroadcastRequest {
                channel: "shop:worker".into(),
                op: "worker:restart".into(),
                ..Default::default()
            },
            &ops,
        ))
        .await
        .expect("ops may broadcast to shop");
    assert_eq!(next(&mut worker).await.op, "worker:restart");

    // Another namespace's token may neither listen to the app, nor take the pod's
    // place, nor broadcast to it.
    for request in [
        SubscribeRequest {
            channels: vec!["shop:worker".into()],
            ..Default::default()
        },
        SubscribeRequest {
            id: pod_id.into(),
            ..Default::default()
        },
    ] {
        let refused = control
            .subscribe(authed(request, billing))
            .await
            .expect_err("another namespace's token");
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }
    let refused = control
        .broadcast(authed(
            ipc_proto::pb::BroadcastRequest {
                channel: "shop:worker".into(),
                op: "worker:restart".into(),
                ..Default::default()
            },
            billing,
        ))
        .await
        .expect_err("another namespace's token");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Revoked (the tokens file rewritten, as the kubelet updates the mounted
    // Secret; no signal): the pod's upstream stream ends and cannot come back.
    issue_token(out.path(), &["--revoke", "ns-shop"]);
    sidecar.wait_upstream(false).await;
}
