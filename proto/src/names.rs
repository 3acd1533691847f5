//! The alphabet of names: channel segments, app ids, roles, tags and token names are
//! letters, digits and `_ . - /`. The node checks its input with it, and `ipcctl`
//! the token names it writes into a tokens file.

/// Whether `c` may appear in a name segment.
pub const fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/')
}

/// Validates one name segment (an app id, a role, a tag): no `:` and no wildcard.
pub fn check_segment(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > 64 {
        return Err(format!("{what} {value:?} is longer than 64 bytes"));
    }
    match value.chars().find(|c| !is_name_char(*c)) {
        Some(ch) => Err(format!(
            "{what} {value:?} has invalid character {ch:?}: use letters, digits and _ . - /"
        )),
        None => Ok(()),
    }
}
