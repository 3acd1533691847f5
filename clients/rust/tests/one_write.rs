//! A unary call from a Rust client leaves in one write: its HEADERS and DATA frames
//! together, so the server reads the whole call on one wake-up instead of two (the
//! patch of vendor/h2, "Streams opened at once"). Counted on the client's socket:
//! every write the connection makes to it.

mod common;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use common::server;
use hyper_util::rt::TokioIo;
use ipc_proto::pb::SendMsgRequest;
use ipc_proto::pb::ipc_client::IpcClient;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Endpoint, Uri};

/// A TCP stream that counts the writes made to it.
struct CountingWrites {
    tcp: TcpStream,
    writes: Arc<AtomicUsize>,
}

impl CountingWrites {
    fn counted<T>(&self, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Ok(_)) = &written {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        written
    }
}

impl AsyncRead for CountingWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountingWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.counted(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.counted(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

fn ping() -> SendMsgRequest {
    SendMsgRequest {
        op: "ping".into(),
        timeout_ms: 5_000,
        ..SendMsgRequest::default()
    }
}

#[tokio::test]
async fn a_unary_call_leaves_the_client_in_one_write() {
    let server = server();
    let address = server.grpc;
    let writes = Arc::new(AtomicUsize::new(0));
    let counter = writes.clone();
    let channel = Endpoint::from_static("http://fleet-ipc.test")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let writes = counter.clone();
            async move {
                let tcp = TcpStream::connect(address).await?;
                tcp.set_nodelay(true)?;
                Ok::<_, io::Error>(TokioIo::new(CountingWrites { tcp, writes }))
            }
        }))
        .await
        .expect("connecting to the server");
    let mut client = IpcClient::new(channel);

    // The connection's preface and settings exchange are behind us after a first call.
    for _ in 0..5 {
        client.send_msg(ping()).await.expect("warm-up ping");
    }
    let calls = 100;
    let before = writes.load(Ordering::Relaxed);
    for _ in 0..calls {
        let pong = client.send_msg(ping()).await.expect("ping").into_inner();
        assert_eq!(pong.reply.expect("a reply").op, "pong");
    }
    let per_call = (writes.load(Ordering::Relaxed) - before) as f64 / calls as f64;
    // Unpatched h2 writes HEADERS, then DATA once the body task ran: 2 per call.
    assert!(
        per_call < 1.1,
        "{per_call:.2} writes per unary call: HEADERS and DATA should leave together"
    );
}
