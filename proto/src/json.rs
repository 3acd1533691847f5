//! Conversions between `google.protobuf.Value` (the payload type of `Msg.data`) and
//! `serde_json::Value`, following the protobuf JSON mapping.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// Converts JSON to a protobuf `Value`. Numbers become doubles, as in the JSON mapping.
pub fn to_value(json: &serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// Converts a protobuf `Value` to JSON. A `Value` without a kind is `null`; a
/// non-finite number (not representable in JSON) is `null` as well.
pub fn from_value(value: &Value) -> serde_json::Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(from_value).collect())
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), from_value(v)))
                .collect(),
        ),
    }
}

/// Integral doubles print as integers (`3`, not `3.0`), as a JSON user expects.
fn number(n: f64) -> serde_json::Value {
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

/// Converts an optional payload (`Msg.data`) to JSON: absent is `null`.
pub fn from_optional(value: Option<&Value>) -> serde_json::Value {
    value.map_or(serde_json::Value::Null, from_value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_json_documents() {
        let doc = serde_json::json!({"a": [1, 2.5, "x", null, true], "b": {"c": -3}});
        assert_eq!(from_value(&to_value(&doc)), doc);
    }

    #[test]
    fn absent_payload_is_null() {
        assert_eq!(from_optional(None), serde_json::Value::Null);
        assert_eq!(from_value(&Value { kind: None }), serde_json::Value::Null);
    }
}
