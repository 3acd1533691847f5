//! The replies of one operation (Gather): every member's request handed to a local
//! responder completes its slot, by the member's index, in one shared collector,
//! and the operation's task takes whatever arrived in one go.
//!
//! Replaces a oneshot channel and a boxed future per member (10,000 of each for a
//! Gather across 10,000) with one vector and one waker: a reply is a push under a
//! lock, and the task woken once drains every reply that came meanwhile.

use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use ipc_proto::pb::Msg;
use parking_lot::Mutex;

/// What came of one member's request: its reply, or `None` when its waiter was
/// forgotten (its subscriber left, or the operation stopped waiting for it).
pub type Arrival = (usize, Option<Msg>);

/// One operation's replies, by member index. Each index is completed at most once;
/// after [`OperationReplies::close`] nothing more is taken.
pub struct OperationReplies {
    inner: Mutex<Inner>,
}

struct Inner {
    arrived: Vec<Arrival>,
    /// A taken batch given back, emptied: the next one fills it without
    /// growing a new vector reply by reply.
    spare: Vec<Arrival>,
    /// Which indexes have been completed (a second reply for one is refused).
    completed: Vec<bool>,
    closed: bool,
    /// The operation's task, while it waits for a reply.
    waker: Option<Waker>,
}

impl OperationReplies {
    /// Slots for `members` members, none completed.
    pub fn new(members: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                arrived: Vec::new(),
                spare: Vec::new(),
                completed: vec![false; members],
                closed: false,
                waker: None,
            }),
        })
    }

    /// Completes slot `index` with what `reply` holds, taken from it (`None`: no
    /// reply will come). False, and `reply` left as it was, if the slot was
    /// completed before, is out of range, or the operation stopped taking replies.
    pub fn complete(&self, index: usize, reply: &mut Option<Msg>) -> bool {
        let waker = {
            let mut inner = self.inner.lock();
            if inner.closed || inner.completed.get(index) != Some(&false) {
                return false;
            }
            inner.completed[index] = true;
            inner.arrived.push((index, reply.take()));
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Every arrival since the last call, or pending (woken by the next one).
    pub fn poll_arrived(&self, cx: &mut Context<'_>) -> Poll<Vec<Arrival>> {
        let mut inner = self.inner.lock();
        if inner.arrived.is_empty() {
            // Registered under the lock: a reply pushed after the check wakes it.
            if !inner
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                inner.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let spare = mem::take(&mut inner.spare);
        Poll::Ready(mem::replace(&mut inner.arrived, spare))
    }

    /// Gives back a batch [`OperationReplies::arrived`] returned, once read: its
    /// room holds a later one.
    pub fn recycle(&self, mut spent: Vec<Arrival>) {
        spent.clear();
        let mut inner = self.inner.lock();
        if spent.capacity() > inner.spare.capacity() {
            inner.spare = spent;
        }
    }

    /// The arrivals since the last call, waiting for at least one.
    pub async fn arrived(&self) -> Vec<Arrival> {
        std::future::poll_fn(|cx| self.poll_arrived(cx)).await
    }

    /// Takes no more replies (a later one is refused, and so NOT_FOUND); returns
    /// those that arrived and were not taken yet.
    pub fn close(&self) -> Vec<Arrival> {
        let mut inner = self.inner.lock();
        inner.closed = true;
        inner.waker = None;
        mem::take(&mut inner.arrived)
    }
}

/// A member's slot in an operation's replies, held by its pending request.
/// Dropped without a reply (the request forgotten: its subscriber left, or the
/// operation stopped waiting), it completes the slot with `None`, as a dropped
/// oneshot sender ends its receiver.
pub(crate) struct Slot {
    replies: Option<Arc<OperationReplies>>,
    index: usize,
}

impl Slot {
    pub(crate) fn new(replies: &Arc<OperationReplies>, index: usize) -> Self {
        Self {
            replies: Some(replies.clone()),
            index,
        }
    }

    /// Completes the slot with `reply`; if the slot takes none, the reply's
    /// `reply_to` (not found).
    pub(crate) fn send(mut self, reply: Msg) -> Result<(), String> {
        let replies = self.replies.take().expect("a slot is completed once");
        let mut reply = Some(reply);
        if replies.complete(self.index, &mut reply) {
            Ok(())
        } else {
            Err(reply.map(|r| r.reply_to).unwrap_or_default())
        }
    }

    /// Lets the slot go without completing it (its request was never handed out).
    pub(crate) fn disarm(mut self) {
        self.replies = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(replies) = self.replies.take() {
            replies.complete(self.index, &mut None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn reply(op: &str) -> Msg {
        Msg {
            op: op.into(),
            ..Msg::default()
        }
    }

    fn take(replies: &OperationReplies) -> Option<Vec<Arrival>> {
        match replies.poll_arrived(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(arrived) => Some(arrived),
            Poll::Pending => None,
        }
    }

    #[test]
    fn each_index_is_completed_once_and_a_second_reply_is_refused() {
        let replies = OperationReplies::new(3);
        assert!(take(&replies).is_none(), "nothing arrived yet");
        Slot::new(&replies, 2)
            .send(reply("b"))
            .expect("first for 2");
        Slot::new(&replies, 0)
            .send(reply("a"))
            .expect("first for 0");
        let again = Slot::new(&replies, 2).send(Msg {
            reply_to: "n1#9.0123456789abcdef".into(),
            ..reply("again")
        });
        assert_eq!(
            again.expect_err("a second reply for 2"),
            "n1#9.0123456789abcdef"
        );
        let mut beyond = Some(reply("x"));
        assert!(!replies.complete(3, &mut beyond), "no index 3");
        assert!(beyond.is_some(), "a refused reply is left where it was");
        let arrived = take(&replies).expect("two arrived");
        let got: Vec<(usize, &str)> = arrived
            .iter()
            .map(|(i, r)| (*i, r.as_ref().unwrap().op.as_str()))
            .collect();
        assert_eq!(got, [(2, "b"), (0, "a")]);
        assert!(take(&replies).is_none(), "each arrival is taken once");
    }

    #[test]
    fn a_dropped_slot_completes_as_no_reply_and_a_disarmed_one_does_not() {
        let replies = OperationReplies::new(2);
        drop(Slot::new(&replies, 0));
        Slot::new(&replies, 1).disarm();
        let arrived = take(&replies).expect("the dropped slot arrived");
        assert_eq!(arrived.len(), 1);
        assert!(matches!(arrived[0], (0, None)));
        // The disarmed slot is still open.
        Slot::new(&replies, 1)
            .send(reply("late"))
            .expect("1 still open");
        // A dropped slot whose index was completed changes nothing.
        drop(Slot::new(&replies, 0));
        let arrived = take(&replies).expect("1 arrived");
        assert!(matches!(&arrived[..], [(1, Some(_))]));
    }

    #[test]
    fn after_close_replies_are_refused_and_those_not_taken_are_returned() {
        let replies = OperationReplies::new(3);
        Slot::new(&replies, 0).send(reply("in time")).unwrap();
        let left = replies.close();
        assert!(matches!(&left[..], [(0, Some(_))]));
        assert!(
            Slot::new(&replies, 1).send(reply("late")).is_err(),
            "closed"
        );
        drop(Slot::new(&replies, 2));
        assert!(take(&replies).is_none());
    }

    #[test]
    fn a_recycled_batch_holds_the_next_one() {
        let replies = OperationReplies::new(4);
        Slot::new(&replies, 0).send(reply("a")).unwrap();
        Slot::new(&replies, 1).send(reply("b")).unwrap();
        let first = take(&replies).unwrap();
        let room = first.capacity();
        replies.recycle(first);
        Slot::new(&replies, 2).send(reply("c")).unwrap();
        let second = take(&replies).unwrap();
        assert!(second.capacity() >= room);
        assert!(matches!(&second[..], [(2, Some(r))] if r.op == "c"));
    }

    #[test]
    fn a_waiting_task_is_woken_by_a_reply() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let replies = OperationReplies::new(2);
        assert!(
            replies
                .poll_arrived(&mut Context::from_waker(&waker))
                .is_pending()
        );
        Slot::new(&replies, 1).send(reply("r")).unwrap();
        Slot::new(&replies, 0).send(reply("s")).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken once for both");
        assert!(
            replies
                .poll_arrived(&mut Context::from_waker(&waker))
                .is_ready()
        );
    }
}
