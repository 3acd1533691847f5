//! A TCP proxy for tests that lose a server's answer: it holds back what the server
//! sends and cuts connections on demand, so a client sees its request stored but
//! never acknowledged (the case idempotency keys are for).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy to a server that can hold back what the server sends (its answers)
/// and cut every connection.
pub struct HoldingProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    hold: watch::Sender<bool>,
    /// Bumped to cut the connections open now.
    cuts: watch::Sender<u64>,
    _task: tokio::task::JoinHandle<()>,
}

impl HoldingProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let hold = watch::Sender::new(false);
        let cuts = watch::Sender::new(0u64);
        let (hold_rx, cuts_rx) = (Arc::new(hold.subscribe()), Arc::new(cuts.subscribe()));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut cut = (*cuts_rx).clone();
                cut.borrow_and_update();
                let hold = (*hold_rx).clone();
                // The answer path's own view of the cuts: see below.
                let cut_before_release = cut.clone();
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let up = tokio::io::copy(&mut from_client, &mut to_server);
                    let down = async {
                        let mut hold = hold;
                        let mut buffer = vec![0u8; 64 << 10];
                        loop {
                            let n = from_server.read(&mut buffer).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            // Read, then held: nothing read after `hold` is passed on.
                            while *hold.borrow_and_update() {
                                if hold.changed().await.is_err() {
                                    return Ok(());
                                }
                            }
                            // A test cuts, then releases. The select below may be in
                            // the middle of a poll when both happen (a multi-threaded
                            // runtime), past its check of the cut: the release seen
                            // here comes after the cut, so the cut is seen too.
                            if cut_before_release.has_changed().unwrap_or(true) {
                                return Ok(());
                            }
                            to_client.write_all(&buffer[..n]).await?;
                        }
                    };
                    // A cut wins over answers released at the same time: a test
                    // cuts, then releases, and the held answer must be lost.
                    tokio::select! {
                        biased;
                        _ = cut.changed() => {}
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Self {
            addr,
            hold,
            cuts,
            _task: task,
        }
    }

    /// While true, nothing the server sends reaches the clients (it is read and
    /// held, then passed on once released, unless the connection is cut first).
    pub fn hold_answers(&self, hold: bool) {
        self.hold.send_replace(hold);
    }

    /// Closes every connection open now (the next ones pass).
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}
