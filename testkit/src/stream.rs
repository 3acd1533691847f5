//! Reading what a node sends, with a patience bound: the next message of a stream,
//! a subscription past its `ipc:subscribed` greeting, a health status, a condition
//! polled on real answers. Every wait fails the test after [`PATIENCE`] instead of
//! hanging; none is a speed assertion.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ipc_proto::json::from_optional;
use ipc_proto::pb::ipc_client::IpcClient;
use ipc_proto::pb::{Msg, SubscribeRequest};
use tonic::Streaming;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest wait for anything a test expects to happen: a failure guard, not
/// synchronisation.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The next item of a stream of results (a gRPC stream, the Rust client's
/// subscription, a node's stream in-process); fails the test if the stream ends,
/// errs or stays silent.
pub async fn next<T, E: Debug>(stream: &mut (impl Stream<Item = Result<T, E>> + Unpin)) -> T {
    match tokio::time::timeout(PATIENCE, stream.next()).await {
        Ok(Some(Ok(item))) => item,
        Ok(Some(Err(error))) => panic!("the stream failed: {error:?}"),
        Ok(None) => panic!("the stream ended"),
        Err(_) => panic!("no message within {PATIENCE:?}"),
    }
}

/// Skips items until one for which `wanted` holds; returns the skipped ones and it.
pub async fn until<T, E: Debug>(
    stream: &mut (impl Stream<Item = Result<T, E>> + Unpin),
    mut wanted: impl FnMut(&T) -> bool,
) -> (Vec<T>, T) {
    let mut skipped = Vec::new();
    loop {
        let item = next(stream).await;
        if wanted(&item) {
            return (skipped, item);
        }
        skipped.push(item);
    }
}

/// Opens a stream and consumes its `ipc:subscribed` greeting; returns the stream
/// and the greeting's data (`id`, `cursor`, …).
pub async fn subscribe(
    client: &mut IpcClient<Channel>,
    request: impl tonic::IntoRequest<SubscribeRequest>,
) -> (Streaming<Msg>, serde_json::Value) {
    let mut stream = client
        .subscribe(request)
        .await
        .unwrap_or_else(|e| panic!("subscribe refused: {e}"))
        .into_inner();
    let hello = next(&mut stream).await;
    assert_eq!(hello.op, "ipc:subscribed", "{hello:?}");
    (stream, from_optional(hello.data.as_ref()))
}

/// The subscriber id in the data of an `ipc:subscribed` greeting.
pub fn subscriber_id(hello: &serde_json::Value) -> String {
    hello["id"]
        .as_str()
        .unwrap_or_else(|| panic!("ipc:subscribed without an id: {hello}"))
        .to_string()
}

/// Waits, on the gRPC health Watch stream of `url` (service `ipc.v1.Ipc`), until
/// it reports `want`.
pub async fn wait_health(url: &str, want: ServingStatus) {
    let watching = async {
        let channel = Channel::from_shared(url.to_string())
            .expect("health address")
            .connect()
            .await
            .expect("connecting for health");
        let mut updates = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "ipc.v1.Ipc".into(),
            })
            .await
            .expect("health watch")
            .into_inner();
        while let Some(update) = updates.message().await.expect("health stream") {
            if update.status == want as i32 {
                return;
            }
        }
        panic!("health stream ended");
    };
    tokio::time::timeout(PATIENCE, watching)
        .await
        .unwrap_or_else(|_| panic!("{url} not {want:?} within {PATIENCE:?}"));
}

/// Polls `check` until it returns `Some`, at most [`PATIENCE`]: for a state that
/// only a fresh answer shows (no stream announces it).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a stream until it ends with an error status (items before it are
/// skipped); returns the status. Fails the test if it ends without one.
pub async fn end_status<T>(stream: &mut Streaming<T>) -> tonic::Status {
    loop {
        match tokio::time::timeout(PATIENCE, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!("the stream neither ended nor delivered within {PATIENCE:?}")
            }) {
            Some(Ok(_)) => continue,
            Some(Err(status)) => return status,
            None => panic!("the stream ended without a status"),
        }
    }
}
