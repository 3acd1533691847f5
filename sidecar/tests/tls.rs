//! The sidecar's upstream over TLS: the control plane serves a certificate from a
//! CA made by the test, the sidecar trusts that CA (`--upstream-ca`), and the pod's
//! calls travel encrypted. A sidecar that does not trust the CA never connects.

mod common;

use common::{APP, SidecarProcess, broadcast, server_on};
use ipc_testkit::tls::TestCa;

#[tokio::test]
async fn the_sidecar_reaches_a_tls_control_plane_through_the_given_ca() {
    let ca = TestCa::new("fleet-ipc test CA");
    let cert = ca.server_cert();
    let server = server_on(
        None,
        &[
            "--tls-cert",
            cert.cert.to_str().unwrap(),
            "--tls-key",
            cert.key.to_str().unwrap(),
        ],
    );
    let upstream = format!("https://localhost:{}", server.grpc.port());
    let sidecar = SidecarProcess::start(
        &upstream,
        &["--upstream-ca", ca.cert_path().to_str().unwrap()],
    );
    sidecar.wait_upstream(true).await;
    let mut local = sidecar.client().await;
    let sent = broadcast(
        &mut local,
        ":news",
        "news:out",
        serde_json::json!({"app": APP}),
    )
    .await
    .expect("broadcast through the TLS upstream");
    assert_eq!(sent.channel, "shop:news");
    assert!(!sent.cursor.is_empty());

    // Without the CA, the system roots do not trust the test certificate.
    let untrusting = SidecarProcess::start(&upstream, &[]);
    let mut local = untrusting.client().await;
    let refused = broadcast(&mut local, ":news", "x", serde_json::json!(null))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
}

#[test]
fn a_missing_ca_file_stops_the_sidecar_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipc.sock");
    let mut args = common::pod_args();
    args.extend([
        "--upstream-ca".to_string(),
        "/nonexistent/ca.pem".to_string(),
    ]);
    let error = SidecarProcess::start_at(&socket, "https://localhost:1", &args)
        .err()
        .expect("the sidecar must refuse to start");
    assert!(error.contains("/nonexistent/ca.pem"), "{error}");
}
