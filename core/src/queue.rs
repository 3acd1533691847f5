//! A subscriber's queue, bounded by what it really costs: messages *and* bytes of
//! memory ([`crate::msg_size::memory_size`]), with a node-wide count of the
//! distinct bytes every queue holds.
//!
//! The hub pushes without ever waiting; a push over a bound fails and the hub
//! cuts the subscriber off. A cut-off queue drops what it holds at once: a
//! subscriber that never reads (its stream is never polled) does not keep its
//! messages alive until it disconnects.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::error::Closed;
use crate::outbound::Outbound;

/// Bounds of every subscriber queue of a hub.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Messages queued per subscriber.
    pub messages: usize,
    /// Bytes of memory queued per subscriber (each message counted whole).
    pub bytes: usize,
    /// Bytes of memory held by all the queues of the node together (a message
    /// queued for many subscribers counted once).
    pub total_bytes: usize,
}

impl QueueLimits {
    pub const DEFAULT_BYTES: usize = 16 << 20;
    pub const DEFAULT_TOTAL_BYTES: usize = 256 << 20;

    pub fn messages(messages: usize) -> Self {
        Self {
            messages,
            bytes: Self::DEFAULT_BYTES,
            total_bytes: Self::DEFAULT_TOTAL_BYTES,
        }
    }
}

/// The memory of one message while some queue holds it: counted in the node's
/// total once, however many queues hold it, until the last one lets it go.
pub(crate) struct Charge {
    size: usize,
    total: Arc<AtomicUsize>,
}

impl Charge {
    pub(crate) fn new(size: usize, total: &Arc<AtomicUsize>) -> Arc<Self> {
        Arc::new(Self::own(size, total))
    }

    /// A charge one queue holds alone, so not shared through an allocation.
    pub(crate) fn own(size: usize, total: &Arc<AtomicUsize>) -> Self {
        total.fetch_add(size, Ordering::AcqRel);
        Self {
            size,
            total: total.clone(),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.total.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// A message in a queue, with what it costs.
pub(crate) struct Delivery {
    pub item: Outbound,
    pub charge: Held,
}

/// How a queued message holds its charge.
pub(crate) enum Held {
    /// The message is in this queue alone (one subscriber took it): its charge
    /// is its own, which saves an allocation and its free per message.
    Own(Charge),
    /// One charge for every queue the message is in.
    Shared(Arc<Charge>),
}

impl Held {
    fn size(&self) -> usize {
        match self {
            Held::Own(charge) => charge.size,
            Held::Shared(charge) => charge.size,
        }
    }
}

impl From<Arc<Charge>> for Held {
    fn from(charge: Arc<Charge>) -> Self {
        Held::Shared(charge)
    }
}

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// Over the queue's message or byte bound.
    Full,
    /// The queue was closed.
    Closed,
}

#[derive(Default)]
struct State {
    items: VecDeque<Delivery>,
    bytes: usize,
    /// Set once the hub removed the subscriber; with the reason, if any.
    ended: Option<Option<Closed>>,
    /// The reader waiting for a message. Kept under the lock rather than in a
    /// `Notify`: the reader then needs no waiting future of its own, which an idle
    /// subscriber's stream would hold for its whole life.
    reader: Option<Waker>,
}

impl State {
    fn take_reader(&mut self) -> Option<Waker> {
        self.reader.take()
    }
}

/// One subscriber's queue, shared by the hub (pushes) and its subscription (reads).
pub(crate) struct Queue {
    state: Mutex<State>,
    limits: QueueLimits,
}

impl Queue {
    pub(crate) fn new(limits: QueueLimits) -> Self {
        Self {
            state: Mutex::default(),
            limits,
        }
    }

    pub(crate) fn push(&self, delivery: Delivery) -> Result<(), PushError> {
        let mut state = self.state.lock();
        if state.ended.is_some() {
            return Err(PushError::Closed);
        }
        let size = delivery.charge.size();
        // One message alone may exceed the byte bound: an empty queue takes it.
        if state.items.len() >= self.limits.messages
            || (!state.items.is_empty() && state.bytes + size > self.limits.bytes)
        {
            return Err(PushError::Full);
        }
        state.bytes += size;
        state.items.push_back(delivery);
        let reader = state.take_reader();
        drop(state);
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }

    /// Bytes queued now.
    pub(crate) fn bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// Ends the queue. A slow or revoked subscriber loses what is queued now
    /// (it resumes from its cursor); otherwise the queue is read to its end first.
    pub(crate) fn close(&self, reason: Option<Closed>) {
        let (dropped, reader) = {
            let mut state = self.state.lock();
            if state.ended.is_some() {
                return;
            }
            state.ended = Some(reason);
            let dropped = if matches!(reason, Some(Closed::SlowConsumer | Closed::Revoked)) {
                state.bytes = 0;
                std::mem::take(&mut state.items)
            } else {
                VecDeque::new()
            };
            (dropped, state.take_reader())
        };
        drop(dropped);
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    /// The next message; `Err` with the reason once the queue is ended and read,
    /// `Ok(None)` if it ended without one. Pending until a push or the end wakes
    /// the task of the last call (the queue has one reader).
    pub(crate) fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Result<Option<Outbound>, Closed>> {
        let mut state = self.state.lock();
        if let Some(delivery) = state.items.pop_front() {
            state.bytes -= delivery.charge.size();
            return Poll::Ready(Ok(Some(delivery.item)));
        }
        if let Some(reason) = state.ended {
            return Poll::Ready(reason.map_or(Ok(None), Err));
        }
        // Checked and registered under the lock: a push cannot slip in between.
        match &mut state.reader {
            Some(waker) => waker.clone_from(cx.waker()),
            none => *none = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// [`Queue::poll_recv`] as a future.
    pub(crate) async fn recv(&self) -> Result<Option<Outbound>, Closed> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(size: usize, total: &Arc<AtomicUsize>) -> Delivery {
        Delivery {
            item: Outbound::Msg(Arc::new(ipc_proto::pb::Msg::default())),
            charge: Charge::new(size, total).into(),
        }
    }

    #[tokio::test]
    async fn bounded_in_bytes_and_a_cut_off_queue_frees_its_messages() {
        let total = Arc::new(AtomicUsize::new(0));
        let queue = Queue::new(QueueLimits {
            messages: 100,
            bytes: 1000,
            total_bytes: usize::MAX,
        });
        queue.push(delivery(600, &total)).unwrap();
        assert_eq!(queue.push(delivery(600, &total)), Err(PushError::Full));
        queue.push(delivery(400, &total)).unwrap();
        assert_eq!(total.load(Ordering::Relaxed), 1000);
        assert!(queue.recv().await.unwrap().is_some());
        assert_eq!(queue.bytes(), 400);
        queue.close(Some(Closed::SlowConsumer));
        assert_eq!(total.load(Ordering::Relaxed), 0);
        assert!(matches!(queue.recv().await, Err(Closed::SlowConsumer)));
    }

    #[tokio::test]
    async fn a_replaced_queue_is_read_to_its_end() {
        let total = Arc::new(AtomicUsize::new(0));
        let queue = Queue::new(QueueLimits::messages(10));
        queue.push(delivery(10, &total)).unwrap();
        queue.close(Some(Closed::Replaced));
        assert!(queue.recv().await.unwrap().is_some());
        assert!(matches!(queue.recv().await, Err(Closed::Replaced)));
        assert_eq!(queue.push(delivery(10, &total)), Err(PushError::Closed));
    }
}
