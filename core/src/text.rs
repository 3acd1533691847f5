//! Text a client sends that ends up in logs, terminals and other clients' screens
//! (ops, header names and values, labels): control characters and invisible
//! direction overrides are refused, so nobody can forge log lines or disguise
//! what they send.

/// Why `value` (the field `what`) is refused, if it is.
pub fn check_text(what: &str, value: &str) -> Result<(), String> {
    // Printable ASCII, what nearly all text is, has nothing forbidden: one pass
    // over the bytes instead of decoding characters.
    if value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    match value.chars().find(|c| is_forbidden(*c)) {
        Some(c) => Err(format!(
            "{what} has the control or direction-override character U+{:04X}; it is not allowed",
            c as u32
        )),
        None => Ok(()),
    }
}

/// C0 and C1 controls, DEL, and the Unicode bidirectional controls
/// (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069).
fn is_forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `text` cut to at most `max` bytes (on a character boundary), with `…` when cut:
/// for echoing client input in error messages.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_controls_and_direction_overrides() {
        for bad in [
            "a\0b",
            "a\nb",
            "a\u{7f}",
            "evil\u{202E}txt",
            "\u{2066}x",
            "\u{85}",
        ] {
            let error = check_text("op", bad).unwrap_err();
            assert!(error.starts_with("op has"), "{error}");
        }
        for good in [
            "worker:restart",
            "café",
            "日本",
            "a b\tc".replace('\t', " ").as_str(),
        ] {
            assert!(check_text("op", good).is_ok(), "{good:?}");
        }
    }

    proptest::proptest! {
        /// The pass over printable ASCII bytes refuses exactly what the walk over
        /// characters does.
        #[test]
        fn the_ascii_pass_agrees_with_the_character_walk(
            text in "(.|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{202e}]){0,24}"
        ) {
            proptest::prop_assert_eq!(
                check_text("op", &text).is_ok(),
                !text.chars().any(is_forbidden)
            );
        }
    }

    #[test]
    fn shortens_on_a_character_boundary() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("ééé", 3), "é…");
    }
}
