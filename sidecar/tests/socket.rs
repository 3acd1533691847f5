//! The socket file: created with its directory and mode, a stale one replaced, a live
//! one or a file that is not a socket refused with a clear error, removed at exit.
//! The sidecar serves its pod even with no control plane to reach.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use ipc_proto::pb::SubscribeRequest;

/// Nothing listens there: the sidecar keeps trying in the background.
const NO_UPSTREAM: &str = "127.0.0.1:1";

fn start(socket: &Path, extra: &[&str]) -> Result<SidecarProcess, String> {
    let mut args = pod_args();
    args.extend(extra.iter().map(|a| a.to_string()));
    SidecarProcess::start_at(socket, NO_UPSTREAM, &args)
}

async fn pings(socket: &Path) -> bool {
    let mut client = uds_client(socket).await;
    send(&mut client, "", "ping", 5_000)
        .await
        .is_ok_and(|m| m.op == "pong")
}

#[tokio::test]
async fn the_socket_gets_its_directory_and_mode_and_goes_away_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a/b/ipc.sock");
    let sidecar = start(&socket, &[]).unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    assert!(pings(&socket).await);
    // Waiting in a blocking task lets this runtime close the client's connection.
    let status = tokio::task::spawn_blocking(move || {
        let mut sidecar = sidecar;
        sidecar.terminate()
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "socket file left behind");

    let other = dir.path().join("private.sock");
    let _sidecar = start(&other, &["--socket-mode", "0600"]).unwrap();
    let mode = std::fs::metadata(&other).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipc.sock");
    // What a killed sidecar leaves: the file, with nobody accepting on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let first = start(&socket, &[]).unwrap();
    assert!(pings(&socket).await);

    let error = start(&socket, &[])
        .err()
        .expect("a second sidecar on a live socket");
    assert!(error.contains("served by a live process"), "{error}");
    assert!(pings(&socket).await, "the first sidecar still serves");
    drop(first);
}

#[tokio::test]
async fn bad_socket_paths_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let error = start(&file, &[]).err().expect("a regular file as socket");
    assert!(error.contains("is not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    let long = dir.path().join("x".repeat(120)).join("ipc.sock");
    let error = start(&long, &[])
        .err()
        .expect("a path too long for a socket");
    assert!(error.contains("longer than"), "{error}");

    let blocked = file.join("ipc.sock");
    let error = start(&blocked, &[])
        .err()
        .expect("a directory that cannot exist");
    assert!(error.contains("creating the socket's directory"), "{error}");
}

#[tokio::test]
async fn the_socket_owner_can_be_set_for_apps_running_as_another_user() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipc.sock");
    let me = std::fs::metadata(dir.path()).unwrap();
    // Changing the owner to another user needs privileges; the group of our own
    // user is always allowed.
    let (uid, gid) = if me.uid() == 0 {
        (1234, 5678)
    } else {
        (me.uid(), me.gid())
    };
    let _sidecar = start(&socket, &["--socket-owner", &format!("{uid}:{gid}")]).unwrap();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    assert!(start(&dir.path().join("x.sock"), &["--socket-owner", "alice"]).is_err());
}

#[tokio::test]
async fn local_requests_carry_the_calling_process_as_sender() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ipc.sock");
    let _sidecar = start(&socket, &[]).unwrap();
    let mut worker = uds_client(&socket).await;
    let request = SubscribeRequest {
        id: "jobs".into(),
        ..Default::default()
    };
    let (mut stream, _) = subscribe(&mut worker, with_app(request)).await;
    let mut caller = uds_client(&socket).await;
    let asking = tokio::spawn(async move { send(&mut caller, "jobs", "job:run", 5_000).await });
    let request = next(&mut stream).await;
    // SO_PEERCRED of this test process, as the sidecar saw it.
    let expected = format!("local pid {} uid ", std::process::id());
    assert!(
        request.sender.starts_with(&expected),
        "{:?}",
        request.sender
    );
    reply(&mut worker, &request, "done", serde_json::json!(null)).await;
    assert_eq!(asking.await.unwrap().unwrap().op, "done");
}
