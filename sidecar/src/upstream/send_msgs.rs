//! The pod's requests upstream on one `SendMsgs` stream instead of one unary
//! SendMsg each.
//!
//! A unary call costs both ends an HTTP/2 stream of its own: HEADERS encoded and
//! decoded, a stream opened and closed, a task and the tower/hyper layers of a call
//! on the control plane, trailers — about half of the sidecar's work for a relayed
//! request and one more write (HEADERS and DATA leave separately). On the stream a
//! request is one DATA frame each way.
//!
//! The stream is opened on the current upstream connection by the first request
//! that needs it and kept while that connection lasts. Each request gets a number;
//! the reader task hands each answer to the request with its number. When the
//! stream ends, every request still waiting is answered UNAVAILABLE (as a unary call
//! cut by the same failure would be; a request is not sent twice) and the next
//! request opens a new one. A control plane without SendMsgs (UNIMPLEMENTED) is
//! asked with unary calls for as long as the connection lasts.
//!
//! Only the pod's own requests go on the stream (the stream's metadata names the
//! pod); a request whose sender named itself keeps its unary call, which names it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ipc_proto::pb::{Msg, SendMsgRequest, SendMsgsRequest, SendMsgsResponse};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use super::Inner;
use super::calls::Link;

/// Requests queued for the stream and not yet taken by its body.
const QUEUE: usize = 1024;

/// The pod's SendMsgs stream, per upstream connection.
#[derive(Default)]
pub(super) struct RequestStreams {
    /// The stream of the current connection; opened by the first request that
    /// needs one (the others wait for it).
    current: tokio::sync::Mutex<Option<Arc<Open>>>,
    /// The connection whose control plane has no SendMsgs.
    unary_only: AtomicU64,
}

type Answer = oneshot::Sender<Result<Msg, Status>>;

/// One open stream.
struct Open {
    link: u64,
    outgoing: mpsc::Sender<SendMsgsRequest>,
    waiting: Mutex<HashMap<u64, Answer>>,
    next_seq: AtomicU64,
    ended: AtomicBool,
}

impl Open {
    fn usable(&self, link: &Link) -> bool {
        self.link == link.id && !self.ended.load(Ordering::Acquire)
    }

    /// Ends the stream for its requests: each still waiting hears `why`.
    fn end(&self, why: &Status) {
        self.ended.store(true, Ordering::Release);
        let waiting: Vec<Answer> = self.waiting.lock().drain().map(|(_, a)| a).collect();
        for answer in waiting {
            let _ = answer.send(Err(why.clone()));
        }
    }
}

/// Removes a request from the waiting ones when its caller gives up.
struct Waiting<'a> {
    open: &'a Open,
    seq: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.open.waiting.lock().remove(&self.seq);
    }
}

impl Inner {
    /// Asks the control plane on the pod's SendMsgs stream; the request is given
    /// back when this connection's control plane has none (ask with a unary call
    /// instead). `wait` bounds the wait for the answer.
    pub(super) async fn send_on_stream(
        &self,
        link: &Link,
        request: SendMsgRequest,
        wait: Duration,
    ) -> Result<Result<Msg, Status>, SendMsgRequest> {
        let give_up = Instant::now() + wait;
        let open = match self.request_stream(link).await {
            Ok(Some(open)) => open,
            Ok(None) => return Err(request),
            Err(status) => return Ok(Err(status)),
        };
        let seq = open.next_seq.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        open.waiting.lock().insert(seq, answer);
        let _waiting = Waiting { open: &open, seq };
        // Ended meanwhile (after its waiting requests were answered): not sent.
        if open.ended.load(Ordering::Acquire) {
            return Ok(Err(Status::unavailable(
                "the pod's SendMsgs stream upstream ended; retry",
            )));
        }
        let message = SendMsgsRequest {
            seq,
            request: Some(request),
        };
        let deadline = tokio::time::Instant::from_std(give_up);
        let sent = match open.outgoing.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(message)) => {
                match tokio::time::timeout_at(deadline, open.outgoing.send(message)).await {
                    Ok(sent) => sent.map_err(|_| ()),
                    Err(_) => {
                        return Ok(Err(Status::deadline_exceeded(
                            "the pod's requests upstream are backed up",
                        )));
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        };
        if sent.is_err() {
            return Ok(Err(Status::unavailable(
                "the pod's SendMsgs stream upstream ended; retry",
            )));
        }
        Ok(match tokio::time::timeout_at(deadline, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable(
                "the pod's SendMsgs stream upstream ended; retry",
            )),
            Err(_) => Err(Status::deadline_exceeded(
                "no answer from the control plane before the deadline",
            )),
        })
    }

    /// The open stream of `link`, opened now if there is none; `None` when its
    /// control plane has no SendMsgs.
    async fn request_stream(&self, link: &Link) -> Result<Option<Arc<Open>>, Status> {
        let streams = &self.request_streams;
        if streams.unary_only.load(Ordering::Relaxed) == link.id {
            return Ok(None);
        }
        let mut current = streams.current.lock().await;
        if let Some(open) = current.as_ref().filter(|open| open.usable(link)) {
            return Ok(Some(open.clone()));
        }
        let (outgoing, requests) = mpsc::channel(QUEUE);
        let call = self.request(ReceiverStream::new(requests), "", None);
        let mut client = link.client.clone();
        let answers = match tokio::time::timeout(self.config.call_timeout, client.send_msgs(call))
            .await
        {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                tracing::info!(
                    upstream = %link.address,
                    "the control plane has no SendMsgs stream; the pod's requests go as unary calls"
                );
                streams.unary_only.store(link.id, Ordering::Relaxed);
                return Ok(None);
            }
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "the control plane did not open the pod's SendMsgs stream within {:?}",
                    self.config.call_timeout
                )));
            }
        };
        let open = Arc::new(Open {
            link: link.id,
            outgoing,
            waiting: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(1),
            ended: AtomicBool::new(false),
        });
        tokio::spawn(read_answers(open.clone(), answers, self.stop.clone()));
        *current = Some(open.clone());
        Ok(Some(open))
    }
}

/// Hands each answer of the stream to the request with its number, until the
/// stream ends (or the sidecar stops).
async fn read_answers(
    open: Arc<Open>,
    mut answers: tonic::Streaming<SendMsgsResponse>,
    stop: tokio_util::sync::CancellationToken,
) {
    let why = loop {
        let next = tokio::select! {
            () = stop.cancelled() => break Status::unavailable("the sidecar is stopping"),
            next = answers.message() => next,
        };
        match next {
            Ok(Some(answer)) => {
                let Some(waiting) = open.waiting.lock().remove(&answer.seq) else {
                    continue;
                };
                let _ = waiting.send(answered(answer));
            }
            Ok(None) => {
                break Status::unavailable(
                    "the control plane ended the pod's SendMsgs stream; retry",
                );
            }
            Err(status) => {
                tracing::debug!(%status, "the pod's SendMsgs stream upstream failed");
                break Status::unavailable(format!(
                    "the pod's SendMsgs stream upstream failed ({:?}: {}); retry",
                    status.code(),
                    status.message()
                ));
            }
        }
    };
    open.end(&why);
}

/// An answer as the unary SendMsg would have ended.
fn answered(answer: SendMsgsResponse) -> Result<Msg, Status> {
    match answer.reply {
        Some(reply) if answer.code == 0 => Ok(reply),
        None if answer.code == 0 => {
            Err(Status::unavailable("the control plane sent an empty reply"))
        }
        _ => Err(Status::new(Code::from_i32(answer.code), answer.error)),
    }
}
