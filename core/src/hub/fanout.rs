//! Fan-out: a log entry to every local subscriber whose patterns match its channel,
//! a notice to every subscriber, each message's memory counted once; a subscriber
//! that cannot keep up (its queue, or the node's bound on all queues) is cut off.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipc_proto::pb::Msg;
use opentelemetry::KeyValue;

use super::{Closed, Hub};
use crate::outbound::Outbound;
use crate::queue::{Charge, Delivery, Held, PushError};
use crate::telemetry::{Hop, Kind};

impl Hub {
    /// Delivers a log entry to every local subscriber whose patterns match its
    /// channel. Buses call this in log order. Returns the number of deliveries.
    pub fn dispatch(&self, msg: &Arc<Msg>) -> usize {
        self.dispatch_sized(msg, None)
    }

    /// [`Hub::dispatch`] of an entry whose memory size
    /// ([`crate::msg_size::memory_size`]) the bus has computed already.
    pub fn dispatch_sized(&self, msg: &Arc<Msg>, size: Option<usize>) -> usize {
        let mut fanout = Hop::child("fanout", Kind::Internal, &msg.headers, || {
            vec![
                KeyValue::new("ipc.node", self.node.clone()),
                KeyValue::new("ipc.msg_id", msg.id.clone()),
                KeyValue::new("ipc.channel", msg.channel.clone()),
                KeyValue::new("ipc.cursor", msg.cursor.clone()),
            ]
        });
        let mut delivered = 0;
        let mut slow = Vec::new();
        {
            let reg = self.registry.read();
            let keys = reg.matching(&msg.channel);
            // With one subscriber, its stream encodes the message itself: keeping
            // the encoding for other streams would cost a copy and an allocation.
            let outbound = if keys.len() == 1 {
                Outbound::Sole
            } else {
                Outbound::Msg
            };
            // The message's memory, computed at most once, and the charge the
            // queues of a shared message hold together.
            let mut size = size;
            let mut shared = None;
            for &key in keys.iter() {
                let Some(sub) = reg.subs.get(&key) else {
                    continue;
                };
                let size = *size.get_or_insert_with(|| crate::msg_size::memory_size(msg));
                let item = outbound(msg.clone());
                let charge = if matches!(item, Outbound::Sole(_)) {
                    Held::Own(Charge::own(size, &self.queued_bytes))
                } else {
                    Held::Shared(
                        shared
                            .get_or_insert_with(|| Charge::new(size, &self.queued_bytes))
                            .clone(),
                    )
                };
                match sub.queue.push(Delivery { item, charge }) {
                    Ok(()) => delivered += 1,
                    Err(PushError::Full) => slow.push(key),
                    Err(PushError::Closed) => {}
                }
            }
        }
        for key in slow {
            tracing::warn!(node = %self.node, subscriber = key, channel = %msg.channel, "subscriber too slow, cut off");
            self.remove(key, Some(Closed::SlowConsumer));
        }
        self.enforce_total_bytes();
        self.metrics
            .delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        fanout.set(|| vec![KeyValue::new("ipc.deliveries", delivered as i64)]);
        delivered
    }

    /// Whether [`Hub::dispatch`] of a log entry on `channel` would reach a
    /// subscriber now. When it would not, the node-wide bound is enforced as that
    /// dispatch would have (requests may have been queued since), so that a bus
    /// which then leaves the entry undecoded changes nothing but the cost.
    pub fn wants(&self, channel: &str) -> bool {
        let wanted = self.registry.read().matches_any(channel);
        if !wanted {
            self.enforce_total_bytes();
        }
        wanted
    }

    /// Sends a notice that is not a log entry (no cursor), such as `ipc:gap`, to
    /// every subscriber whatever its channels. Returns the number reached.
    pub fn notify_all(&self, msg: &Arc<Msg>) -> usize {
        let mut reached = 0;
        let mut slow = Vec::new();
        {
            let reg = self.registry.read();
            let charge = self.charge(msg);
            for (key, sub) in &reg.subs {
                match sub.queue.push(Delivery {
                    item: Outbound::Msg(msg.clone()),
                    charge: Held::Shared(charge.clone()),
                }) {
                    Ok(()) => reached += 1,
                    Err(PushError::Full) => slow.push(*key),
                    Err(PushError::Closed) => {}
                }
            }
        }
        for key in slow {
            self.remove(key, Some(Closed::SlowConsumer));
        }
        reached
    }

    /// What `msg` costs while queued, counted in the node's total.
    pub(super) fn charge(&self, msg: &Msg) -> Arc<Charge> {
        Charge::new(crate::msg_size::memory_size(msg), &self.queued_bytes)
    }

    /// Bytes of memory held by the subscriber queues now (each message once).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// Cuts off the subscribers holding the most bytes until the queues together
    /// hold no more than the node's bound: the slowest readers pay, not the node.
    fn enforce_total_bytes(&self) {
        while self.queued_bytes() > self.queue_limits.total_bytes {
            let largest = {
                let reg = self.registry.read();
                reg.subs
                    .iter()
                    .map(|(key, sub)| (sub.queue.bytes(), *key))
                    .filter(|(bytes, _)| *bytes > 0)
                    .max()
            };
            let Some((bytes, key)) = largest else {
                return;
            };
            tracing::warn!(node = %self.node, subscriber = key, queued_bytes = bytes, "subscriber queues over their node-wide bound; the largest is cut off");
            self.remove(key, Some(Closed::SlowConsumer));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll};

    use super::*;
    use crate::channel::Pattern;
    use crate::hub::Subscription;
    use crate::metrics::Metrics;

    fn subscribe(hub: &Arc<Hub>, id: &str, pattern: &str) -> Subscription {
        crate::hub::test_subscriber(hub, id, vec![Pattern::parse(pattern).unwrap()])
    }

    fn next(subscription: &mut Subscription) -> Outbound {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match subscription.poll_recv(&mut cx) {
            Poll::Ready(Ok(Some(item))) => item,
            _ => panic!("nothing delivered"),
        }
    }

    /// A message only one subscriber takes is encoded by its stream alone; one that
    /// several take is shared, to be encoded once for all.
    #[test]
    fn a_message_for_one_subscriber_is_its_own_and_for_several_shared() {
        let hub = Hub::new("n1".into(), 16, Arc::new(Metrics::default()));
        let mut alone = subscribe(&hub, "a", "app:solo");
        let mut first = subscribe(&hub, "b", "app:many");
        let mut second = subscribe(&hub, "c", "app:*");
        let msg = |channel: &str| {
            Arc::new(Msg {
                op: "x".into(),
                channel: channel.into(),
                ..Msg::default()
            })
        };
        assert_eq!(hub.dispatch(&msg("app:solo")), 2);
        assert!(matches!(next(&mut alone), Outbound::Msg(_)));
        assert!(matches!(next(&mut second), Outbound::Msg(_)));
        assert_eq!(hub.dispatch(&msg("app:other")), 1);
        assert!(matches!(next(&mut second), Outbound::Sole(_)));
        assert_eq!(hub.dispatch(&msg("app:many")), 2);
        assert!(matches!(next(&mut first), Outbound::Msg(_)));
        assert!(matches!(next(&mut second), Outbound::Msg(_)));
    }

    /// `wants` answers as a dispatch would deliver: exact channels, wildcard
    /// patterns, and no longer once the subscriber is gone.
    #[test]
    fn a_channel_is_wanted_exactly_when_a_dispatch_would_deliver_it() {
        let hub = Hub::new("n1".into(), 16, Arc::new(Metrics::default()));
        assert!(!hub.wants("app:solo"));
        let alone = subscribe(&hub, "a", "app:solo");
        let wild = subscribe(&hub, "b", "other:*");
        for channel in ["app:solo", "app:other", "other:x", "other:x:y", "app", ""] {
            let msg = Arc::new(Msg {
                channel: channel.into(),
                ..Msg::default()
            });
            assert_eq!(hub.wants(channel), hub.dispatch(&msg) > 0, "{channel:?}");
        }
        hub.remove(alone.key, None);
        hub.remove(wild.key, None);
        assert!(!hub.wants("app:solo") && !hub.wants("other:x"));
    }

    /// A message one queue holds alone (its charge its own) and one several
    /// queues share are each counted once in the node's queued bytes, until the
    /// last queue lets it go; a cut-off queue's messages leave the count at once.
    #[test]
    fn queued_bytes_count_sole_and_shared_messages_once() {
        let hub = Hub::new("n1".into(), 16, Arc::new(Metrics::default()));
        let mut alone = subscribe(&hub, "a", "app:solo");
        let mut first = subscribe(&hub, "b", "app:many");
        let mut second = subscribe(&hub, "c", "app:many");
        let msg = |channel: &str| {
            Arc::new(Msg {
                op: "x".into(),
                channel: channel.into(),
                ..Msg::default()
            })
        };
        let (solo, many) = (msg("app:solo"), msg("app:many"));
        let size = crate::msg_size::memory_size(&solo);
        hub.dispatch(&solo);
        hub.dispatch_sized(&solo, Some(size));
        assert_eq!(hub.queued_bytes(), 2 * size);
        next(&mut alone);
        assert_eq!(hub.queued_bytes(), size);
        hub.dispatch(&many);
        assert_eq!(hub.queued_bytes(), 2 * size);
        next(&mut first);
        assert_eq!(hub.queued_bytes(), 2 * size);
        next(&mut second);
        assert_eq!(hub.queued_bytes(), size);
        hub.remove(alone.key, Some(Closed::SlowConsumer));
        assert_eq!(hub.queued_bytes(), 0);
    }
}
