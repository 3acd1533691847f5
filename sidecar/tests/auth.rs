//! A sidecar with a token (`--token-file`) against a control plane that requires
//! tokens: the pod acts with its token's grants, and a refusal reaches the local
//! caller with its status (not as an internal error).

mod common;

use common::{APP, SidecarProcess, broadcast, server_on};
use tonic::Code;

#[tokio::test]
async fn upstream_refusals_reach_local_callers_with_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, entry) = ipc_proto::token::new_token("pod-web").unwrap();
    let entry = entry
        .replace("# app = \"shop\"", &format!("app = \"{APP}\""))
        .replace("broadcast = []", &format!("broadcast = [\"{APP}:web\"]"))
        .replace("subscribe = []", "subscribe = [\">\"]");
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(&tokens, entry).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();

    let server = server_on(None, &["--tokens", tokens.to_str().unwrap()]);
    let sidecar = SidecarProcess::start(
        &server.grpc.to_string(),
        &["--token-file", token_file.to_str().unwrap()],
    );
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;

    let granted = broadcast(&mut local, ":web", "cache:clear", serde_json::json!(null)).await;
    assert!(granted.is_ok(), "{granted:?}");
    let refused = broadcast(&mut local, ":other", "x", serde_json::json!(null))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("shop:other"), "{refused:?}");
}
