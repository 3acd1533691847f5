//! The memory a message really takes, for the limits that bound memory (the log's
//! retention, subscriber queues).
//!
//! The encoded size can be a poor guide: a 1 MiB message of half a million empty
//! values decodes into ~16 MiB of `prost_types::Value` trees (each value is a
//! 32-byte enum behind list or map bookkeeping). [`memory_size`] walks the message
//! and counts what its allocations hold: the struct itself, string and vector
//! capacities, and an estimate of the map nodes' overhead.

use std::mem::size_of;

use ipc_proto::pb::Msg;
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// Bookkeeping of one entry of a `HashMap` or `BTreeMap` beyond its key and value
/// (control bytes, node pointers, spare capacity), estimated.
const MAP_ENTRY_OVERHEAD: usize = 16;
/// An allocation's own bookkeeping in the allocator, estimated.
const ALLOCATION_OVERHEAD: usize = 16;

/// Bytes of memory `msg` holds, its `Arc` included.
pub fn memory_size(msg: &Msg) -> usize {
    let strings = [
        &msg.id,
        &msg.channel,
        &msg.op,
        &msg.sender,
        &msg.reply_to,
        &msg.cursor,
        &msg.error,
    ];
    let mut size = size_of::<Msg>() + 2 * size_of::<usize>() + ALLOCATION_OVERHEAD;
    size += strings.iter().map(|s| string_size(s)).sum::<usize>();
    size += msg
        .headers
        .iter()
        .map(|(k, v)| {
            2 * size_of::<String>() + string_size(k) + string_size(v) + MAP_ENTRY_OVERHEAD
        })
        .sum::<usize>();
    if let Some(data) = &msg.data {
        size += value_heap(data);
    }
    size
}

fn string_size(s: &String) -> usize {
    if s.capacity() == 0 {
        0
    } else {
        s.capacity() + ALLOCATION_OVERHEAD
    }
}

/// Heap bytes under a `Value` (not counting the `Value` itself).
fn value_heap(value: &Value) -> usize {
    match &value.kind {
        Some(Kind::StringValue(s)) => string_size(s),
        Some(Kind::ListValue(list)) => list_heap(list),
        Some(Kind::StructValue(s)) => struct_heap(s),
        _ => 0,
    }
}

fn list_heap(list: &ListValue) -> usize {
    let slots = list.values.capacity() * size_of::<Value>();
    let own = if slots == 0 {
        0
    } else {
        slots + ALLOCATION_OVERHEAD
    };
    own + list.values.iter().map(value_heap).sum::<usize>()
}

fn struct_heap(s: &Struct) -> usize {
    s.fields
        .iter()
        .map(|(k, v)| {
            size_of::<String>()
                + size_of::<Value>()
                + MAP_ENTRY_OVERHEAD
                + string_size(k)
                + value_heap(v)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn many_empty_values_cost_far_more_than_their_encoding() {
        let values = vec![
            Value {
                kind: Some(Kind::NullValue(0))
            };
            100_000
        ];
        let msg = Msg {
            op: "x".into(),
            data: Some(Value {
                kind: Some(Kind::ListValue(ListValue { values })),
            }),
            ..Msg::default()
        };
        let encoded = msg.encoded_len();
        let memory = memory_size(&msg);
        assert!(encoded < 500_000, "{encoded}");
        assert!(memory >= 100_000 * size_of::<Value>(), "{memory}");
        assert!(memory > 5 * encoded, "{memory} vs {encoded}");
    }

    #[test]
    fn a_small_message_costs_about_its_struct_and_strings() {
        let msg = Msg {
            op: "worker:restart".into(),
            channel: "shop:worker".into(),
            ..Msg::default()
        };
        let memory = memory_size(&msg);
        assert!(memory > size_of::<Msg>());
        assert!(memory < size_of::<Msg>() + 200, "{memory}");
    }
}
