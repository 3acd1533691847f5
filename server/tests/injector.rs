//! The sidecar-injection webhook served by `ipc-server --injector-listen`: a real
//! AdmissionReview over HTTPS (curl), with a certificate made by the test.

use std::path::Path;
use std::process::Command;

use ipc_testkit::ServerProcess;

const BINARY: &str = env!("CARGO_BIN_EXE_ipc-server");
const REVIEW: &str = include_str!("../../deploy/inject/tests/fixtures/pod-create-review.json");

fn self_signed(dir: &Path) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

#[test]
fn the_server_answers_admission_reviews_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let server = ServerProcess::start_binary(
        Path::new(BINARY),
        &[
            "--injector-listen",
            "127.0.0.1:0",
            "--injector-cert",
            &cert,
            "--injector-key",
            &key,
        ],
    );
    let injector = server
        .ready_line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("injector="))
        .expect("readiness line names the injector address")
        .to_string();
    let port = injector.rsplit(':').next().unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--cacert",
            &cert,
            "-H",
            "content-type: application/json",
        ])
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args([
            "--data-binary",
            "@-",
            &format!("https://localhost:{port}/inject"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(REVIEW.as_bytes())?;
            child.wait_with_output()
        })
        .expect("running curl (apt-get install -y curl)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
