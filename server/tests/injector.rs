//! The sidecar-injection webhook served by `ipc-server --injector-listen`: a real
//! AdmissionReview over HTTPS (curl), with a certificate of a test CA.

use std::path::Path;
use std::process::Command;

use ipc_testkit::ServerProcess;
use ipc_testkit::http::curl_post_json;
use ipc_testkit::tls::TestCa;

const BINARY: &str = env!("CARGO_BIN_EXE_ipc-server");
const REVIEW: &str = include_str!("../../deploy/inject/tests/fixtures/pod-create-review.json");

#[test]
fn the_server_answers_admission_reviews_over_https() {
    let ca = TestCa::new("injector test CA");
    let pair = ca.server_cert();
    let (cert, key) = (pair.cert.to_str().unwrap(), pair.key.to_str().unwrap());
    let server = ServerProcess::start_binary(
        Path::new(BINARY),
        &[
            "--injector-listen",
            "127.0.0.1:0",
            "--injector-cert",
            cert,
            "--injector-key",
            key,
        ],
    );
    let injector = server
        .ready_line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("injector="))
        .expect("readiness line names the injector address")
        .to_string();
    let port: u16 = injector.rsplit(':').next().unwrap().parse().unwrap();
    let out = curl_post_json(&ca.cert_path(), port, "/inject", REVIEW, &[]);
    let review: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let patch = review["response"]["patch"]
        .as_str()
        .expect("a patch for an annotated pod");
    assert!(!patch.is_empty());
}

#[test]
fn an_unreadable_certificate_stops_the_server_with_a_reason() {
    let out = Command::new(BINARY)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--injector-listen", "127.0.0.1:0"])
        .args([
            "--injector-cert",
            "/nonexistent/tls.crt",
            "--injector-key",
            "/nonexistent/tls.key",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/tls.crt"), "{stderr}");
}
