//! A Publish stream's requests decoded without prost's general machinery, for the
//! request almost every publisher sends: a channel, an op, a key and a string
//! payload, each once, and nothing else.
//!
//! prost decodes each string by growing an empty `Vec` to the field's length
//! (a `reserve` that goes through the general growth path) and merges `data`
//! through a second decode loop: 1.5 k instructions per message, a sixth of the
//! node's work per published and delivered message. Here each string is checked
//! and copied into an allocation of its exact size: 1.25 k, most of it the UTF-8
//! check, the allocations and the copies, which any decoder pays. Anything else
//! — headers, another kind of payload, a field given twice, an unknown field, a
//! malformed one — is decoded by prost from the start, so its result (and its
//! error) is prost's in every case.

use ipc_proto::pb::BroadcastRequest;
use prost::Message as _;
use prost_types::Value;
use prost_types::value::Kind;

/// Field numbers of `ipc.v1.BroadcastRequest`.
const CHANNEL: u64 = 1;
const OP: u64 = 2;
const DATA: u64 = 3;
const KEY: u64 = 5;
/// `google.protobuf.Value.string_value`.
const STRING_VALUE: u64 = 3;
/// Protobuf's length-delimited wire type.
const LENGTH_DELIMITED: u64 = 2;

/// Decodes `bytes` as prost decodes a `BroadcastRequest`.
pub fn broadcast_request(bytes: &[u8]) -> Result<BroadcastRequest, prost::DecodeError> {
    match plain(bytes) {
        Some(request) => Ok(request),
        None => BroadcastRequest::decode(bytes),
    }
}

/// The request if it is a plain one (see the module); `None` for anything else.
fn plain(mut bytes: &[u8]) -> Option<BroadcastRequest> {
    let mut request = BroadcastRequest::default();
    let mut seen = 0u8;
    while !bytes.is_empty() {
        let (field, value) = length_delimited(&mut bytes)?;
        // A field seen twice is merged by prost's rules: left to prost.
        let bit = 1u8 << field;
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        match field {
            CHANNEL => request.channel = text(value)?,
            OP => request.op = text(value)?,
            DATA => request.data = Some(string_value(value)?),
            KEY => request.key = text(value)?,
            _ => return None,
        }
    }
    Some(request)
}

/// A `Value` holding only a string (exactly one field, `string_value`).
fn string_value(mut bytes: &[u8]) -> Option<Value> {
    let (field, value) = length_delimited(&mut bytes)?;
    if field != STRING_VALUE || !bytes.is_empty() {
        return None;
    }
    Some(Value {
        kind: Some(Kind::StringValue(text(value)?)),
    })
}

/// The next field of `bytes` if it is length-delimited with a number from 1 to 7:
/// its number and its bytes, `bytes` moved past it.
fn length_delimited<'a>(bytes: &mut &'a [u8]) -> Option<(u64, &'a [u8])> {
    let key = varint(bytes)?;
    let field = key >> 3;
    if key & 7 != LENGTH_DELIMITED || !(1..=7).contains(&field) {
        return None;
    }
    let len = usize::try_from(varint(bytes)?).ok()?;
    if len > bytes.len() {
        return None;
    }
    let (value, rest) = bytes.split_at(len);
    *bytes = rest;
    Some((field, value))
}

/// A varint of at most 10 bytes whose value fits in 64 bits, as prost reads it;
/// the one-byte ones (keys, most lengths) without a loop. The Redis bus's scan of
/// a log message's channel reads its fields with it too.
pub fn varint(bytes: &mut &[u8]) -> Option<u64> {
    // Keys and the lengths of short fields: one byte.
    if let Some((&byte, rest)) = bytes.split_first()
        && byte < 0x80
    {
        *bytes = rest;
        return Some(u64::from(byte));
    }
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            // The tenth byte may only carry the 64th bit.
            if i == 9 && byte > 1 {
                return None;
            }
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

/// `bytes` as an owned string of its exact size, if they are UTF-8.
fn text(bytes: &[u8]) -> Option<String> {
    std::str::from_utf8(bytes).ok().map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn string_data(text: &str) -> Option<Value> {
        Some(Value {
            kind: Some(Kind::StringValue(text.into())),
        })
    }

    /// Decoded here and by prost alike: the same request, or both an error.
    fn same_as_prost(bytes: &[u8]) -> Result<(), TestCaseError> {
        let ours = broadcast_request(bytes);
        let prost = BroadcastRequest::decode(bytes);
        match (&ours, &prost) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "ours {ours:?}, prost {prost:?}"),
        }
        Ok(())
    }

    #[test]
    fn a_plain_request_is_decoded_here() {
        let request = BroadcastRequest {
            channel: "shop:worker".into(),
            op: "worker:restart".into(),
            data: string_data("now"),
            key: "k-1".into(),
            ..BroadcastRequest::default()
        };
        let bytes = request.encode_to_vec();
        assert_eq!(plain(&bytes), Some(request.clone()));
        assert_eq!(broadcast_request(&bytes).unwrap(), request);
    }

    #[test]
    fn anything_else_is_left_to_prost() {
        let with_headers = BroadcastRequest {
            op: "x".into(),
            headers: [("traceparent".to_string(), "00-1-2-01".to_string())].into(),
            ..BroadcastRequest::default()
        };
        let number = BroadcastRequest {
            op: "x".into(),
            data: Some(Value {
                kind: Some(Kind::NumberValue(1.5)),
            }),
            ..BroadcastRequest::default()
        };
        for request in [with_headers, number] {
            let bytes = request.encode_to_vec();
            assert_eq!(plain(&bytes), None);
            assert_eq!(broadcast_request(&bytes).unwrap(), request);
        }
        // A field given twice: the last one wins, by prost's rules.
        let mut twice = BroadcastRequest {
            op: "first".into(),
            ..BroadcastRequest::default()
        }
        .encode_to_vec();
        twice.extend(
            BroadcastRequest {
                op: "second".into(),
                ..BroadcastRequest::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(plain(&twice), None);
        assert_eq!(broadcast_request(&twice).unwrap().op, "second");
        // Not UTF-8: prost's error.
        let bad = [0x12, 0x01, 0xff];
        assert_eq!(plain(&bad), None);
        assert!(broadcast_request(&bad).is_err());
    }

    fn text_strategy() -> impl Strategy<Value = String> {
        prop_oneof!["", "[a-z:]{1,12}", ".{0,20}"]
    }

    fn data_strategy() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            text_strategy().prop_map(|t| string_data(&t)),
            any::<f64>().prop_map(|n| Some(Value {
                kind: Some(Kind::NumberValue(n))
            })),
            any::<bool>().prop_map(|b| Some(Value {
                kind: Some(Kind::BoolValue(b))
            })),
            Just(Some(Value { kind: None })),
        ]
    }

    fn request_strategy() -> impl Strategy<Value = BroadcastRequest> {
        (
            text_strategy(),
            text_strategy(),
            data_strategy(),
            proptest::collection::hash_map("[a-z]{1,4}", "[a-z]{0,4}", 0..2),
            text_strategy(),
        )
            .prop_map(|(channel, op, data, headers, key)| BroadcastRequest {
                channel,
                op,
                data,
                headers,
                key,
            })
    }

    proptest! {
        #[test]
        fn requests_decode_as_prost_decodes_them(request in request_strategy()) {
            let bytes = request.encode_to_vec();
            prop_assert_eq!(broadcast_request(&bytes).unwrap(), request);
        }

        /// Requests run together (fields repeated), cut short or with a byte
        /// changed: the same result as prost's, request or error.
        #[test]
        fn damaged_requests_decode_as_prost_decodes_them(
            first in request_strategy(),
            second in request_strategy(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = first.encode_to_vec();
            bytes.extend(second.encode_to_vec());
            same_as_prost(&bytes)?;
            if !bytes.is_empty() {
                let mut changed = bytes.clone();
                changed[flip.index(bytes.len())] = byte;
                same_as_prost(&changed)?;
                same_as_prost(&bytes[..cut.index(bytes.len())])?;
            }
        }

        #[test]
        fn any_bytes_decode_as_prost_decodes_them(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            same_as_prost(&bytes)?;
        }
    }
}
