//! Cursors: positions in a bus log, handed to subscribers so they can resume.
//!
//! A cursor is `EPOCH.HI-LO`: the epoch names one incarnation of the log (it changes
//! when the log is lost, so a stale cursor is detected), `HI-LO` is the position
//! within it (a Redis Stream entry id, or a sequence number and 0 for the memory
//! bus). Positions of one epoch are totally ordered.

use std::fmt;
use std::str::FromStr;

/// A position in a bus log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cursor {
    pub epoch: u64,
    pub hi: u64,
    pub lo: u64,
}

impl Cursor {
    /// The position within the epoch, for ordering.
    pub fn position(&self) -> (u64, u64) {
        (self.hi, self.lo)
    }

    /// The cursor as text, `EPOCH.HI-LO` with the epoch in hex. Every stored
    /// message gets one, so it is written directly rather than through `format!`
    /// (a third of the cost of the formatting machinery).
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(16 + 1 + 20 + 1 + 20);
        push_hex(&mut text, self.epoch);
        text.push('.');
        text.push_str(itoa::Buffer::new().format(self.hi));
        text.push('-');
        text.push_str(itoa::Buffer::new().format(self.lo));
        text
    }
}

/// Appends `value` in lowercase hex without leading zeros, as `{:x}` does.
fn push_hex(text: &mut String, value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (64 - value.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        text.push(DIGITS[((value >> (shift * 4)) & 0xf) as usize] as char);
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// A cursor string that is not one this system produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed cursor {0:?}: expected the `cursor` of a received message, like \"3f2a.17-0\"")]
pub struct CursorError(pub String);

impl FromStr for Cursor {
    type Err = CursorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || {
            let mut shown = text.chars().take(64).collect::<String>();
            if shown.len() < text.len() {
                shown.push('…');
            }
            CursorError(shown)
        };
        let (epoch, position) = text.split_once('.').ok_or_else(err)?;
        let (hi, lo) = position.split_once('-').ok_or_else(err)?;
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if epoch.is_empty() || epoch.len() > 16 || !digits(hi) || !digits(lo) {
            return Err(err());
        }
        Ok(Cursor {
            epoch: u64::from_str_radix(epoch, 16).map_err(|_| err())?,
            hi: hi.parse().map_err(|_| err())?,
            lo: lo.parse().map_err(|_| err())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_through_text() {
        let c = Cursor {
            epoch: 0x3f2a,
            hi: 1_700_000_000_000,
            lo: 7,
        };
        assert_eq!(c.to_string(), "3f2a.1700000000000-7");
        let zero = Cursor {
            epoch: 0,
            hi: 0,
            lo: 0,
        };
        assert_eq!(zero.text(), "0.0-0");
        assert_eq!(c.to_string().parse::<Cursor>().unwrap(), c);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "", "abc", "1.2", "x.1-2", "1.-2", "1.2-", "1.2-3-4", "1.+2-3", "zz.1-1",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in ".{0,80}") {
            let _ = text.parse::<Cursor>();
        }

        #[test]
        fn text_is_hex_epoch_dot_hi_dash_lo(epoch in any::<u64>(), hi in any::<u64>(), lo in any::<u64>()) {
            let c = Cursor { epoch, hi, lo };
            prop_assert_eq!(c.text(), format!("{epoch:x}.{hi}-{lo}"));
        }

        #[test]
        fn any_cursor_round_trips(epoch in any::<u64>(), hi in any::<u64>(), lo in any::<u64>()) {
            let c = Cursor { epoch, hi, lo };
            prop_assert_eq!(c.to_string().parse::<Cursor>().unwrap(), c);
        }
    }
}
