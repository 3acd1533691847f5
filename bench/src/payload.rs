//! Payloads and the clock they carry: every benchmark message is 128 bytes whose
//! first 20 are the send time in nanoseconds since the run started (decimal, so it
//! is also a valid JSON string for fleet-ipc's `data`).

use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;

/// Payload size of every benchmark message, in bytes.
pub const PAYLOAD_BYTES: usize = 128;
const STAMP_DIGITS: usize = 20;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the run started (monotonic; publishers and subscribers are in
/// this one process, so stamps compare exactly).
pub fn now_ns() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A 128-byte payload stamped with `stamp_ns`.
pub fn stamped(stamp_ns: u64) -> Bytes {
    let mut text = format!("{stamp_ns:0STAMP_DIGITS$}");
    text.extend(std::iter::repeat_n('x', PAYLOAD_BYTES - STAMP_DIGITS));
    Bytes::from(text)
}

/// The stamp of a payload made by [`stamped`].
pub fn stamp_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload.get(..STAMP_DIGITS)?)
        .ok()?
        .parse()
        .ok()
}

/// Nanoseconds from a payload's stamp until now.
pub fn age_ns(payload: &[u8]) -> Option<u64> {
    stamp_of(payload).map(|stamp| now_ns().saturating_sub(stamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_in_a_128_byte_utf8_payload() {
        let payload = stamped(123_456_789);
        assert_eq!(payload.len(), PAYLOAD_BYTES);
        assert!(std::str::from_utf8(&payload).is_ok());
        assert_eq!(stamp_of(&payload), Some(123_456_789));
        assert_eq!(stamp_of(b"short"), None);
    }
}
