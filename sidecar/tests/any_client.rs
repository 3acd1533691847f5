//! Any gRPC client on the pod socket, with its defaults: stubs generated from
//! `proto/ipc/v1/ipc.proto` for Python (grpcio), Node (`@grpc/grpc-js`) and Go
//! (grpc-go, Debian's packages), and grpcurl `-unix` without `-authority`. Each runs
//! against a real `ipc-sidecar` relaying to a real `ipc-server`: it pings, subscribes,
//! broadcasts and gets its broadcast back, asks a responder on the control plane
//! (SendMsg) and answers a request from it (Reply).
//!
//! Several of these clients send the socket path as `:authority`; these tests fail
//! if the h2 patch that lets the socket accept it (vendor/h2/PATCH.md) is lost.
//! A missing toolchain fails the test with what to install (scripts/test installs it).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use ipc_proto::pb::SubscribeRequest;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

fn proto_root() -> PathBuf {
    root().join("proto")
}

/// A program on the `PATH`, or a failure naming what provides it.
fn tool(name: &str, install: &str) -> PathBuf {
    ipc_testkit::find_program(name)
        .unwrap_or_else(|| panic!("{name} not found: {install} (scripts/test does)"))
}

/// A control-plane worker of role `operator`: answers every request with
/// `operator:answer` and the request's data.
async fn operator(server: &ipc_testkit::ServerProcess) -> tokio::task::JoinHandle<()> {
    let mut client = server.client().await;
    let (mut stream, _) = subscribe(
        &mut client,
        with_app(SubscribeRequest {
            id: "operator-1".into(),
            role: "operator".into(),
            ..Default::default()
        }),
    )
    .await;
    tokio::spawn(async move {
        while let Ok(Some(request)) = stream.message().await {
            if !request.reply_to.is_empty() {
                let echo = data(&request);
                reply(&mut client, &request, "operator:answer", echo).await;
            }
        }
    })
}

/// Runs a client program (`python_client.py`, `node_client.js`, the Go binary)
/// named `name` against a fresh sidecar and control plane, and checks every step.
async fn drive(name: &str, mut command: Command) {
    let server = server();
    let _operator = operator(&server).await;
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let mut child = command
        .arg(&sidecar.socket)
        .arg(name)
        .arg(proto_root())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the {name} client: {e}"));
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(
                serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| panic!("not a JSON line: {line}")),
            );
        }
    });
    let mut line = async || {
        tokio::time::timeout(PATIENCE, lines.recv())
            .await
            .unwrap_or_else(|_| panic!("the {name} client said nothing"))
            .unwrap_or_else(|| panic!("the {name} client exited early (see its stderr)"))
    };
    assert_eq!(line().await, json!({"pong": "pong"}));
    assert_eq!(line().await, json!({"subscribed": "ipc:subscribed"}));
    assert_eq!(
        line().await,
        json!({"got": {"x": "one"}, "channel": format!("shop:{name}")})
    );
    assert_eq!(
        line().await,
        json!({"answer": "operator:answer", "data": {"n": "two"}})
    );

    let mut operator = server.client().await;
    let worker = format!(":{name}worker");
    let answer = send(&mut operator, &worker, &format!("{name}:ask"), 10_000)
        .await
        .unwrap();
    assert_eq!(answer.op, format!("{name}:answer"));
    assert_eq!(line().await, json!({"answered": format!("{name}:ask")}));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the {name} client exited with {status}");
}

#[tokio::test]
async fn python_grpcio_with_a_plain_insecure_channel() {
    let venv = root().join(".venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        tool("python3", "install grpcio and grpcio-tools")
    };
    let mut command = Command::new(python);
    command.arg(clients().join("python_client.py"));
    drive("py", command).await;
}

#[tokio::test]
async fn node_grpc_js_with_a_unix_target() {
    let modules = root().join("clients/node/node_modules/@grpc/grpc-js");
    assert!(
        modules.exists(),
        "{} missing: run `npm ci` in clients/node (scripts/test does)",
        modules.display()
    );
    let mut command = Command::new(tool("node", "install nodejs"));
    command.arg(clients().join("node_client.js"));
    drive("js", command).await;
}

/// Generates the Go package with protoc (the proto's `go_package`, no `M` flags) into
/// a GOPATH of its own and builds the client against Debian's grpc-go, offline.
#[tokio::test]
async fn go_grpc_with_a_unix_target() {
    const PACKAGES: &str = "install golang-go golang-google-grpc-dev \
         golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler";
    let go = tool("go", PACKAGES);
    let protoc = tool("protoc", PACKAGES);
    tool("protoc-gen-go", PACKAGES);
    tool("protoc-gen-go-grpc", PACKAGES);
    let gopath = tempfile::tempdir().unwrap();
    let src = gopath.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let generated = Command::new(&protoc)
        .arg("-I")
        .arg(proto_root())
        .arg(format!("--go_out={}", src.display()))
        .arg(format!("--go-grpc_out={}", src.display()))
        .arg("ipc/v1/ipc.proto")
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "protoc --go_out: {}",
        String::from_utf8_lossy(&generated.stderr)
    );
    assert!(
        src.join("github.com/fleet-ipc/fleet-ipc/gen/go/ipc/v1/ipc_grpc.pb.go")
            .exists(),
        "the generated package is not where go_package says"
    );
    let main_dir = src.join("ipc-any-client");
    std::fs::create_dir_all(&main_dir).unwrap();
    std::fs::copy(clients().join("go/main.go"), main_dir.join("main.go")).unwrap();
    let binary = gopath.path().join("any-client");
    // GOPATH mode: our generated package, then Debian's Go sources; nothing fetched.
    let built = Command::new(&go)
        .current_dir(&main_dir)
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", gopath.path().display()),
        )
        .arg("build")
        .arg("-o")
        .arg(&binary)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    drive("go", Command::new(binary)).await;
}

/// grpcurl `-unix` with no `-authority`: reflection, health, and the same steps,
/// a Subscribe stream read as it comes. Two threads: grpcurl runs blocking while the
/// operator task answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_no_authority_flag() {
    let server = server();
    let _operator = operator(&server).await;
    let sidecar = SidecarProcess::start(&server.url(), &[]);
    sidecar.wait_upstream(true).await;
    let socket = sidecar.socket.to_str().unwrap().to_string();
    let unix = |args: &[&str]| {
        let mut all = vec!["-plaintext", "-unix", "-H", "ipc-app: shop"];
        all.extend_from_slice(args);
        all.insert(all.len() - 1, &socket);
        run_grpcurl(&all)
    };
    // Reflection and health, as on the control plane's port.
    let services = unix(&["list"]);
    for service in ["ipc.v1.Ipc", "grpc.health.v1.Health"] {
        assert!(services.contains(service), "{services}");
    }
    let health = unix(&["grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    let pong = unix(&["-d", r#"{"op":"ping"}"#, "ipc.v1.Ipc/SendMsg"]);
    assert!(pong.contains("pong"), "{pong}");

    let mut subscriber = Command::new(grpcurl())
        .args(["-plaintext", "-unix", "-H", "ipc-app: shop", "-d"])
        .arg(r#"{"channels":[":curl"],"id":"curl-1","role":"curlworker"}"#)
        .arg(&socket)
        .arg("ipc.v1.Ipc/Subscribe")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (msgs_tx, mut msgs) = tokio::sync::mpsc::unbounded_channel();
    let stdout = subscriber.stdout.take().unwrap();
    std::thread::spawn(move || {
        // grpcurl prints each message as an indented JSON object.
        for msg in serde_json::Deserializer::from_reader(stdout).into_iter::<Value>() {
            let Ok(msg) = msg else { return };
            let _ = msgs_tx.send(msg);
        }
    });
    let mut next_msg = async || {
        tokio::time::timeout(PATIENCE, msgs.recv())
            .await
            .expect("grpcurl's stream said nothing")
            .expect("grpcurl's stream ended")
    };
    assert_eq!(next_msg().await["op"], "ipc:subscribed");
    unix(&[
        "-d",
        r#"{"channel":":curl","op":"curl:hello","data":{"x":"one"}}"#,
        "ipc.v1.Ipc/Broadcast",
    ]);
    let got = next_msg().await;
    assert_eq!(
        (&got["op"], &got["channel"], &got["data"]),
        (
            &json!("curl:hello"),
            &json!("shop:curl"),
            &json!({"x": "one"})
        )
    );
    let answer = unix(&[
        "-d",
        r#"{"target":":operator","op":"curl:ask","data":{"n":"two"},"timeoutMs":10000}"#,
        "ipc.v1.Ipc/SendMsg",
    ]);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (&answer["reply"]["op"], &answer["reply"]["data"]),
        (&json!("operator:answer"), &json!({"n": "two"}))
    );

    let mut operator = server.client().await;
    let asked =
        tokio::spawn(async move { send(&mut operator, ":curlworker", "curl:ask", 10_000).await });
    let request = next_msg().await;
    assert_eq!(request["op"], "curl:ask");
    let reply_to = request["replyTo"].as_str().expect("a request has replyTo");
    unix(&[
        "-d",
        &json!({"replyTo": reply_to, "op": "curl:answer"}).to_string(),
        "ipc.v1.Ipc/Reply",
    ]);
    assert_eq!(asked.await.unwrap().unwrap().op, "curl:answer");
    let _ = subscriber.kill();
    let _ = subscriber.wait();
}

/// The exception is the sidecar's alone: the control plane's TCP port still refuses
/// a path as `:authority`, as stock h2 does.
#[tokio::test]
async fn the_control_plane_port_keeps_the_strict_authority_check() {
    let server = server();
    let output = Command::new(grpcurl())
        .args(["-plaintext", "-authority", "/var/run/fleet-ipc/ipc.sock"])
        .arg(server.grpc.to_string())
        .arg("list")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("PROTOCOL_ERROR"), "{stderr}");
}
