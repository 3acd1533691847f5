//! One local process cannot cut its pod off (issue 15): with a pod token granted
//! only the pod's channels, a local subscription its token cannot cover is refused
//! at once (PERMISSION_DENIED naming the channel and the grants), a generated local
//! id never goes upstream where it would be refused, and the sidecar stays ready
//! and keeps delivering whatever a local process asks.

mod common;

use common::{APP, POD_ID, SidecarProcess, broadcast, http_get, next, server_on, subscribe_to};
use ipc_proto::pb::SubscribeRequest;
use tonic::Code;

#[tokio::test]
async fn a_local_subscription_beyond_the_pods_grants_is_refused_and_the_pod_stays_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, entry) = ipc_proto::token::new_token("pod-web").unwrap();
    let grants =
        format!("subscribe = [\"{APP}:web\", \"{APP}:web:*\", \"{POD_ID}\", \"{POD_ID}:>\"]");
    let entry = entry
        .replace("# app = \"shop\"", &format!("app = \"{APP}\""))
        .replace("broadcast = []", &format!("broadcast = [\"{APP}:>\"]"))
        .replace("subscribe = []", &grants);
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

    // An ungranted channel: refused at once, naming the channel and the grants.
    let refused = local
        .subscribe(common::with_app(SubscribeRequest {
            channels: vec![format!("{APP}:billing")],
            ..SubscribeRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains(&format!("{APP}:billing")),
        "{refused:?}"
    );
    assert!(
        refused.message().contains(&format!("{APP}:web:*")),
        "{refused:?}"
    );

    // A granted channel with a generated id: subscribed, and delivered to.
    let mut web = subscribe_to(&mut local, &[":web"]).await;
    let (status, _) = http_get(sidecar.health, "/readyz").await;
    assert_eq!(status, 200);
    let mut upstream = server.client().await;
    let mut request = tonic::Request::new(ipc_proto::pb::BroadcastRequest {
        channel: format!("{APP}:web"),
        op: "cache:clear".into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    upstream.broadcast(request).await.unwrap();
    assert_eq!(next(&mut web).await.op, "cache:clear");
    // Still ready, and local broadcasts still go upstream.
    let (status, _) = http_get(sidecar.health, "/readyz").await;
    assert_eq!(status, 200);
    broadcast(&mut local, ":web", "again", serde_json::json!(null))
        .await
        .unwrap();
    assert_eq!(next(&mut web).await.op, "again");
}
