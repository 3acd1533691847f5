//! Fan-out: a log entry to every local subscriber whose patterns match its channel,
//! a notice to every subscriber, each message's memory counted once; a subscriber
//! that cannot keep up (its queue, or the node's bound on all queues) is cut off.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipc_proto::pb::Msg;
use opentelemetry::KeyValue;

use super::{Closed, Hub};
use crate::outbound::Outbound;
use crate::queue::{Charge, Delivery, PushError};
use crate::telemetry::{Hop, Kind};

impl Hub {
    /// Delivers a log entry to every local subscriber whose patterns match its
    /// channel. Buses call this in log order. Returns the number of deliveries.
    pub fn dispatch(&self, msg: &Arc<Msg>) -> usize {
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
            let mut charge = None;
            for &key in keys.iter() {
                let Some(sub) = reg.subs.get(&key) else {
                    continue;
                };
                let charge = charge.get_or_insert_with(|| self.charge(msg));
                match sub.queue.push(Delivery {
                    item: Outbound::Msg(msg.clone()),
                    charge: Arc::clone(charge),
                }) {
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
                    charge: charge.clone(),
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
