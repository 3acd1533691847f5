//! The pod socket answers bad input as the control plane's port does: every input of
//! the bad-input campaign (`ipc_testkit::bad_input`, run in full against the server
//! by `server/tests/bad_input.rs`) is sent to a server's TCP port and to a sidecar's
//! socket, both mounted by the core's `Mount` with the same `--max-msg-bytes`, and
//! must get the same status code from both.

mod common;

use common::*;
use ipc_testkit::bad_input::{self, noise, raw_call};
use ipc_testkit::process::uds_channel;
use tonic::transport::Channel;
use tonic::{Code, Status};

const MAX_MSG_BYTES: &str = "65536";

fn code<T>(result: Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Collects every input's status on both; reports all differences at once.
#[derive(Default)]
struct Differences(Vec<String>);

impl Differences {
    fn compare(&mut self, what: String, port: Code, socket: Code) {
        if port != socket {
            self.0
                .push(format!("{what}: port {port:?}, socket {socket:?}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_and_the_port_answer_each_bad_input_alike() {
    let server = server_on(None, &["--max-msg-bytes", MAX_MSG_BYTES]);
    let sidecar = SidecarProcess::start(&server.url(), &["--max-msg-bytes", MAX_MSG_BYTES]);
    sidecar.wait_upstream(true).await;
    let port_channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let socket_channel = uds_channel(&sidecar.socket).await;
    let mut port = Client::new(port_channel.clone());
    let mut socket = Client::new(socket_channel.clone());
    let mut differences = Differences::default();

    for (what, request, _) in bad_input::broadcasts().into_iter().chain([(
        "nested 200 deep",
        bad_input::too_deep(),
        Code::InvalidArgument,
    )]) {
        differences.compare(
            format!("Broadcast {what}"),
            code(port.broadcast(with_app(request.clone())).await),
            code(socket.broadcast(with_app(request)).await),
        );
    }
    for method in bad_input::METHODS {
        let payloads = bad_input::undecodable()
            .into_iter()
            .chain((0..5).map(|seed| ("noise", noise(seed, 64))));
        for (what, payload) in payloads {
            differences.compare(
                format!("{method} {what}"),
                code(raw_call(&port_channel, method, with_app(payload.clone())).await),
                code(raw_call(&socket_channel, method, with_app(payload)).await),
            );
        }
    }
    for (what, request, _) in bad_input::sends() {
        // Short deadlines: a request that reaches no one must not hold the test.
        let request = ipc_proto::pb::SendMsgRequest {
            timeout_ms: if request.timeout_ms == 0 {
                2_000
            } else {
                request.timeout_ms
            },
            ..request
        };
        differences.compare(
            format!("SendMsg {what}"),
            code(port.send_msg(with_app(request.clone())).await),
            code(socket.send_msg(with_app(request)).await),
        );
    }
    // The control plane's epoch: the sidecar resumes against the same log.
    let head = broadcast(&mut port, ":probe", "x", serde_json::json!(null))
        .await
        .unwrap()
        .cursor;
    let epoch = head.split('.').next().unwrap().to_string();
    for (what, request, _) in bad_input::subscribes(&epoch) {
        let first = |client: &mut Client, request| {
            let mut client = client.clone();
            async move {
                let mut stream = client.subscribe(with_app(request)).await?.into_inner();
                // A refusal may also end the stream after `ipc:subscribed`.
                for _ in 0..2 {
                    match tokio::time::timeout(std::time::Duration::from_secs(1), stream.message())
                        .await
                    {
                        Ok(Ok(Some(msg))) if msg.op == "ipc:subscribed" => continue,
                        Ok(result) => return result.map(|_| ()),
                        Err(_) => return Ok(()),
                    }
                }
                Ok(())
            }
        };
        differences.compare(
            format!("Subscribe {what}"),
            code(first(&mut port, request.clone()).await),
            code(first(&mut socket, request).await),
        );
    }
    for (what, request, _) in bad_input::replies() {
        differences.compare(
            format!("Reply {what}"),
            code(port.reply(with_app(request.clone())).await),
            code(socket.reply(with_app(request)).await),
        );
    }
    assert!(
        differences.0.is_empty(),
        "the socket and the port disagree:\n{}",
        differences.0.join("\n")
    );
}
