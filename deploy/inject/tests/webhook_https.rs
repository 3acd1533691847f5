//! The webhook served over HTTPS as the API server calls it: TLS with the CA of the
//! caBundle, HTTP/2 or HTTP/1.1, on the path of the MutatingWebhookConfiguration.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipc_inject::{AdmissionReview, InjectConfig, ServeError, router, serve_https};
use ipc_testkit::tls::{CertFiles, TestCa};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// The name the API server uses for the webhook Service.
const SERVICE_HOST: &str = "ipc-server.fleet-ipc.svc";

struct RunningWebhook {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl RunningWebhook {
    async fn start(cert: &Path, key: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let (cert, key) = (cert.to_owned(), key.to_owned());
        let task = tokio::spawn(async move {
            serve_https(
                listener,
                router(InjectConfig::default()),
                cert,
                key,
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
        // The listener is bound: connections queue until the loop accepts them.
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = (&mut self.task).await.expect("serve_https task");
        result.expect("serve_https returns Ok after shutdown");
    }
}

/// Writes a serving certificate and key as the webhook's `tls.crt` and `tls.key`.
fn write_pair(dir: &Path, pair: &CertFiles) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, &pair.cert_pem).expect("write cert");
    std::fs::write(&key_path, &pair.key_pem).expect("write key");
    (cert_path, key_path)
}

/// One request over a fresh TLS connection that trusts only `ca_pem`.
async fn request(
    addr: SocketAddr,
    ca_pem: &str,
    alpn: &[u8],
    method: http::Method,
    path: &str,
    body: Vec<u8>,
) -> Result<(StatusCode, Vec<u8>), String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let server_name = ServerName::try_from(SERVICE_HOST).expect("a DNS name");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(alpn),
        "negotiated protocol"
    );

    let builder = http::Request::builder()
        .method(method)
        .header("content-type", "application/json");
    let response = if alpn == b"h2" {
        let request = builder
            .uri(format!("https://{SERVICE_HOST}{path}"))
            .body(axum::body::Body::from(body))
            .expect("request");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(connection);
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("h2 request: {e}"))?
    } else {
        let request = builder
            .uri(path)
            .header("host", SERVICE_HOST)
            .body(axum::body::Body::from(body))
            .expect("request");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("http/1.1 handshake: {e}"))?;
        tokio::spawn(connection);
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("http/1.1 request: {e}"))?
    };
    let status = response.status();
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), 1 << 20)
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok((status, body.to_vec()))
}

/// The webhook path as deployed: from the rendered MutatingWebhookConfiguration.
fn deployed_webhook_path() -> String {
    let objects = common::render(&common::k8s_dir(""));
    let webhook = common::find(
        &objects,
        "MutatingWebhookConfiguration",
        "fleet-ipc-sidecar-injector",
    );
    webhook["webhooks"][0]["clientConfig"]["service"]["path"]
        .as_str()
        .expect("a path")
        .to_owned()
}

fn review_body() -> Vec<u8> {
    common::fixture("pod-create-review.json")
        .to_string()
        .into_bytes()
}

fn assert_injected(status: StatusCode, body: &[u8]) {
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(body));
    let review: AdmissionReview = serde_json::from_slice(body).expect("an AdmissionReview");
    assert!(review.response.allowed);
    assert_eq!(review.response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    let patch = review.decoded_patch().expect("a patch").expect("decodable");
    assert!(
        serde_json::to_string(&patch)
            .unwrap()
            .contains("ipc-sidecar")
    );
}

#[tokio::test]
async fn webhook_answers_over_h2_and_http1_on_the_deployed_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("webhook test CA");
    let (cert, key) = write_pair(dir.path(), &ca.server_cert_for(&[SERVICE_HOST]));
    let webhook = RunningWebhook::start(&cert, &key).await;
    let path = deployed_webhook_path();

    for alpn in [&b"h2"[..], b"http/1.1"] {
        let (status, body) = request(
            webhook.addr,
            &ca.cert_pem(),
            alpn,
            http::Method::POST,
            &path,
            review_body(),
        )
        .await
        .expect("request");
        assert_injected(status, &body);
    }
    let (status, body) = request(
        webhook.addr,
        &ca.cert_pem(),
        b"http/1.1",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect("healthz");
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ok\n"[..]));

    let addr = webhook.addr;
    webhook.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test]
async fn malformed_review_gets_http_400_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("webhook test CA");
    let (cert, key) = write_pair(dir.path(), &ca.server_cert_for(&[SERVICE_HOST]));
    let webhook = RunningWebhook::start(&cert, &key).await;

    let (status, body) = request(
        webhook.addr,
        &ca.cert_pem(),
        b"h2",
        http::Method::POST,
        ipc_inject::INJECT_PATH,
        b"{\"kind\":".to_vec(),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let review: AdmissionReview =
        serde_json::from_slice(&body).expect("an AdmissionReview even for garbage");
    assert!(!review.response.allowed);
    assert!(
        review
            .response
            .status
            .unwrap()
            .message
            .contains("not an AdmissionReview")
    );

    // The server keeps serving well-formed requests.
    let (status, body) = request(
        webhook.addr,
        &ca.cert_pem(),
        b"h2",
        http::Method::POST,
        ipc_inject::INJECT_PATH,
        review_body(),
    )
    .await
    .expect("request");
    assert_injected(status, &body);
    webhook.stop().await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, stranger) = (
        TestCa::new("webhook test CA"),
        TestCa::new("webhook test CA"),
    );
    let (cert, key) = write_pair(dir.path(), &ca.server_cert_for(&[SERVICE_HOST]));
    let webhook = RunningWebhook::start(&cert, &key).await;

    let error = request(
        webhook.addr,
        &stranger.cert_pem(),
        b"h2",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect_err("untrusted certificate");
    assert!(error.starts_with("TLS:"), "{error}");
    request(
        webhook.addr,
        &ca.cert_pem(),
        b"h2",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect("a client trusting the CA gets in");
    webhook.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_ca, new_ca) = (
        TestCa::new("webhook test CA"),
        TestCa::new("webhook test CA"),
    );
    let (cert, key) = write_pair(dir.path(), &old_ca.server_cert_for(&[SERVICE_HOST]));
    let webhook = RunningWebhook::start(&cert, &key).await;
    request(
        webhook.addr,
        &old_ca.cert_pem(),
        b"h2",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect("old certificate served");

    write_pair(dir.path(), &new_ca.server_cert_for(&[SERVICE_HOST]));
    let (status, _) = request(
        webhook.addr,
        &new_ca.cert_pem(),
        b"h2",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect("new certificate served");
    assert_eq!(status, StatusCode::OK);
    request(
        webhook.addr,
        &old_ca.cert_pem(),
        b"h2",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect_err("old certificate no longer served");
    webhook.stop().await;
}

#[tokio::test]
async fn a_broken_replacement_keeps_the_last_good_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("webhook test CA");
    let (cert, key) = write_pair(dir.path(), &ca.server_cert_for(&[SERVICE_HOST]));
    let webhook = RunningWebhook::start(&cert, &key).await;
    // Serving (so past loading the files) before they are broken.
    request(
        webhook.addr,
        &ca.cert_pem(),
        b"http/1.1",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect("served");
    std::fs::write(&cert, "not a certificate").expect("write");
    let (status, _) = request(
        webhook.addr,
        &ca.cert_pem(),
        b"http/1.1",
        http::Method::GET,
        "/healthz",
        Vec::new(),
    )
    .await
    .expect("still served with the last good pair");
    assert_eq!(status, StatusCode::OK);
    webhook.stop().await;
}

#[tokio::test]
async fn the_cert_script_makes_a_certificate_the_api_server_would_accept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = common::k8s_dir("gen-webhook-cert.sh");
    let output = Command::new("bash")
        .arg(&script)
        .env("OUT_DIR", dir.path())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed (it needs openssl):\n{}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let ca = std::fs::read_to_string(dir.path().join("ca.crt")).expect("ca.crt");
    let webhook =
        RunningWebhook::start(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).await;
    let (status, body) = request(
        webhook.addr,
        &ca,
        b"h2",
        http::Method::POST,
        &deployed_webhook_path(),
        review_body(),
    )
    .await
    .expect("the script's certificate verifies for the Service name");
    assert_injected(status, &body);
    webhook.stop().await;
}

#[tokio::test]
async fn missing_or_bad_certificate_files_fail_at_start_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("webhook test CA");
    let (cert, key) = write_pair(dir.path(), &ca.server_cert_for(&[SERVICE_HOST]));
    let other_key = dir.path().join("other.key");
    // The key of another certificate: it does not match `cert`.
    let other = ca.server_cert_for(&[SERVICE_HOST]);
    std::fs::write(&other_key, other.key_pem).unwrap();
    let missing = dir.path().join("missing.crt");

    for (cert, key, named) in [
        (&missing, &key, &missing),
        (&cert, &cert, &cert),
        (&cert, &other_key, &other_key),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = serve_https(
            listener,
            router(InjectConfig::default()),
            cert,
            key,
            std::future::pending(),
        )
        .await
        .expect_err("bad certificate files");
        let message = error.to_string();
        assert!(message.contains(&named.display().to_string()), "{message}");
    }
}
