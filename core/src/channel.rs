//! Channel names and subscription patterns.
//!
//! A channel is `:`-separated segments of letters, digits and `_ . - /`, at most
//! [`MAX_CHANNEL_BYTES`] bytes. A leading `:` stands for the caller's app id. A
//! pattern may also use `*` (exactly one segment) and `>` (one or more trailing
//! segments, last position only).

use std::fmt;

use ipc_proto::names::is_name_char;
// One alphabet for every name, shared with the clients (see ipc_proto::names).
pub use ipc_proto::names::check_segment;

/// The longest channel name or pattern accepted, in bytes.
pub const MAX_CHANNEL_BYTES: usize = 256;

/// Why a channel or pattern was refused; the text is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel is empty")]
    Empty,
    #[error("channel {0:?} is longer than {MAX_CHANNEL_BYTES} bytes")]
    TooLong(String),
    #[error("channel {0:?} has an empty segment (check for '::' or a trailing ':')")]
    EmptySegment(String),
    #[error(
        "channel {channel:?} has invalid character {ch:?}: use letters, digits and _ . - / separated by ':'"
    )]
    BadChar { channel: String, ch: char },
    #[error("channel {0:?} is a pattern ('*' or '>'), but a channel name is needed here")]
    PatternNotAllowed(String),
    #[error(
        "pattern {0:?} has '>' before its last segment; '>' matches the rest and must come last"
    )]
    TailNotLast(String),
    #[error("channel {0:?} has '*' or '>' inside a segment; wildcards must be whole segments")]
    PartialWildcard(String),
    #[error(
        "channel {0:?} starts with ':' but no app id is known (set `ipc-app` metadata or the server's --app)"
    )]
    NoApp(String),
}

/// One segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `>`: one or more remaining segments.
    Rest,
}

/// A validated subscription pattern; a plain channel name is a pattern without
/// wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses a pattern that has already been expanded (no leading `:`).
    pub fn parse(text: &str) -> Result<Self, ChannelError> {
        check_length(text)?;
        let parts: Vec<&str> = text.split(':').collect();
        // Exactly as long as needed: a subscriber's patterns live as long as it.
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => return Err(ChannelError::EmptySegment(text.to_string())),
                "*" => Segment::One,
                ">" if i + 1 == parts.len() => Segment::Rest,
                ">" => return Err(ChannelError::TailNotLast(text.to_string())),
                literal => {
                    check_literal(text, literal)?;
                    Segment::Literal(literal.to_string())
                }
            };
            segments.push(segment);
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Its segments, for indexes of patterns ([`crate::pattern_index`]).
    pub(crate) fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// True when the pattern is a plain channel name.
    pub fn is_exact(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// Whether `channel` (a valid name) matches this pattern.
    pub fn matches(&self, channel: &str) -> bool {
        let mut parts = channel.split(':');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return parts.next().is_some(),
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Whether every channel `other` matches is also matched by `self`: the
    /// inclusion test of authorization grants (a grant `shop:>` includes a
    /// subscription to `shop:worker:*`, but `shop:*` does not include `shop:>`).
    ///
    /// Exact for one grant: `false` means some valid channel is matched by `other`
    /// and not by `self`, because a literal segment can always be chosen outside
    /// the finite set of literals `self` names.
    pub fn includes(&self, other: &Pattern) -> bool {
        segments_include(&self.segments, &other.segments)
    }
}

fn segments_include(grant: &[Segment], requested: &[Segment]) -> bool {
    match (grant.first(), requested.first()) {
        (None, None) => true,
        // Every segment kind consumes at least one channel segment, so a pattern
        // with segments left never matches where the other has ended.
        (None, Some(_)) | (Some(_), None) => false,
        // `>` takes any one-or-more remaining segments: whatever `requested` still
        // needs (at least one segment) is covered.
        (Some(Segment::Rest), Some(_)) => true,
        // A requested `>` matches tails of every length; only a `>` (handled above)
        // covers all of them.
        (Some(_), Some(Segment::Rest)) => false,
        (Some(Segment::One), Some(_)) => segments_include(&grant[1..], &requested[1..]),
        (Some(Segment::Literal(g)), Some(Segment::Literal(r))) if g == r => {
            segments_include(&grant[1..], &requested[1..])
        }
        (Some(Segment::Literal(_)), Some(_)) => false,
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Expands a leading `:` with `app` (`:worker` → `shop:worker`).
pub fn expand(raw: &str, app: Option<&str>) -> Result<String, ChannelError> {
    match raw.strip_prefix(':') {
        Some(rest) => match app {
            Some(app) if !app.is_empty() => {
                let mut name = String::with_capacity(app.len() + 1 + rest.len());
                name.push_str(app);
                name.push(':');
                name.push_str(rest);
                Ok(name)
            }
            _ => Err(ChannelError::NoApp(raw.to_string())),
        },
        None if raw.is_empty() => Err(ChannelError::Empty),
        None => Ok(raw.to_string()),
    }
}

/// Expands and validates a channel name (no wildcards allowed).
pub fn parse_name(raw: &str, app: Option<&str>) -> Result<String, ChannelError> {
    let name = expand(raw, app)?;
    check_name(&name)?;
    Ok(name)
}

/// [`parse_name`] of a name the caller owns: returned as it is when there is
/// nothing to expand (a broadcast's channel, which is then not copied).
pub fn parse_owned_name(raw: String, app: Option<&str>) -> Result<String, ChannelError> {
    let name = if raw.starts_with(':') {
        expand(&raw, app)?
    } else {
        raw
    };
    check_name(&name)?;
    Ok(name)
}

/// The rules of [`Pattern::parse`] and then [`Pattern::is_exact`], with the same
/// errors in the same order, without building the pattern: every broadcast's
/// channel passes here, and the pattern's strings were most of its cost.
fn check_name(text: &str) -> Result<(), ChannelError> {
    check_length(text)?;
    if is_plain_name(text) {
        return Ok(());
    }
    let segments = text.split(':').count();
    let mut wildcard = false;
    for (i, part) in text.split(':').enumerate() {
        match part {
            "" => return Err(ChannelError::EmptySegment(text.to_string())),
            "*" => wildcard = true,
            ">" if i + 1 == segments => wildcard = true,
            ">" => return Err(ChannelError::TailNotLast(text.to_string())),
            literal => check_literal(text, literal)?,
        }
    }
    if wildcard {
        return Err(ChannelError::PatternNotAllowed(text.to_string()));
    }
    Ok(())
}

/// [`is_name_char`] for every byte: a name character is ASCII.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 128 {
        table[byte] = is_name_char(byte as u8 as char);
        byte += 1;
    }
    table
};

/// Whether `text` is non-empty segments of name characters joined by `:` — what
/// nearly every broadcast's channel is — in one pass over its bytes. Anything else
/// (a wildcard, an empty segment, a bad character) takes the walk above, which
/// names what is wrong.
fn is_plain_name(text: &str) -> bool {
    let mut segment_empty = true;
    for &byte in text.as_bytes() {
        if byte == b':' {
            if segment_empty {
                return false;
            }
            segment_empty = true;
        } else if NAME_BYTES[usize::from(byte)] {
            segment_empty = false;
        } else {
            return false;
        }
    }
    !segment_empty
}

/// Expands and validates a subscription pattern.
pub fn parse_pattern(raw: &str, app: Option<&str>) -> Result<Pattern, ChannelError> {
    Pattern::parse(&expand(raw, app)?)
}

fn check_length(text: &str) -> Result<(), ChannelError> {
    if text.is_empty() {
        return Err(ChannelError::Empty);
    }
    if text.len() > MAX_CHANNEL_BYTES {
        return Err(ChannelError::TooLong(truncate(text)));
    }
    Ok(())
}

fn check_literal(channel: &str, literal: &str) -> Result<(), ChannelError> {
    if let Some(ch) = literal.chars().find(|c| !is_name_char(*c)) {
        if ch == '*' || ch == '>' {
            return Err(ChannelError::PartialWildcard(channel.to_string()));
        }
        return Err(ChannelError::BadChar {
            channel: channel.to_string(),
            ch,
        });
    }
    Ok(())
}

/// Keeps error messages about huge inputs short.
fn truncate(text: &str) -> String {
    let mut end = 40.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Small patterns and channels for property tests of matching.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    /// A pattern over the literals `a` and `b` (so that `c` is a name neither
    /// side mentions), 1 to 4 segments, `>` only last.
    pub(crate) fn small_pattern() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(prop_oneof!["a", "b", Just("*".to_string())], 0..4),
            prop_oneof!["a", "b", Just("*".to_string()), Just(">".to_string())],
        )
            .prop_map(|(mut head, last)| {
                head.push(last);
                head.join(":")
            })
    }

    /// Every channel of 1 to 5 segments over `a`, `b`, `c`: enough to find a
    /// counterexample to the inclusion of patterns of at most 4 segments.
    pub(crate) fn small_channels() -> Vec<String> {
        let mut all = Vec::new();
        let mut layer = vec![String::new()];
        for _ in 0..5 {
            layer = layer
                .iter()
                .flat_map(|prefix| {
                    ["a", "b", "c"].map(|s| {
                        if prefix.is_empty() {
                            s.to_string()
                        } else {
                            format!("{prefix}:{s}")
                        }
                    })
                })
                .collect();
            all.extend(layer.iter().cloned());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::{small_channels, small_pattern};
    use super::*;
    use proptest::prelude::*;

    fn matches(pattern: &str, channel: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(channel)
    }

    #[test]
    fn star_matches_exactly_one_segment() {
        assert!(matches("shop:*", "shop:worker"));
        assert!(!matches("shop:*", "shop:worker:blue"));
        assert!(!matches("shop:*", "shop"));
        assert!(matches("*:worker", "shop:worker"));
    }

    #[test]
    fn tail_matches_one_or_more_segments() {
        assert!(matches("shop:>", "shop:worker"));
        assert!(matches("shop:>", "shop:worker:blue"));
        assert!(!matches("shop:>", "shop"));
        assert!(!matches("shop:>", "other:worker"));
    }

    #[test]
    fn exact_names_match_only_themselves() {
        assert!(matches("shop:worker", "shop:worker"));
        assert!(!matches("shop:worker", "shop:worker:x"));
        assert!(!matches("shop:worker", "shop:work"));
    }

    #[test]
    fn leading_colon_expands_with_the_app() {
        assert_eq!(expand(":worker", Some("shop")).unwrap(), "shop:worker");
        assert_eq!(expand("a:b", Some("shop")).unwrap(), "a:b");
        assert_eq!(
            expand(":worker", None),
            Err(ChannelError::NoApp(":worker".into()))
        );
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        assert_eq!(parse_name("", None), Err(ChannelError::Empty));
        assert!(matches!(
            parse_name("a::b", None),
            Err(ChannelError::EmptySegment(_))
        ));
        assert!(matches!(
            parse_name("a:b c", None),
            Err(ChannelError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            parse_name("a:*", None),
            Err(ChannelError::PatternNotAllowed(_))
        ));
        assert!(matches!(
            parse_pattern("a:>:b", None),
            Err(ChannelError::TailNotLast(_))
        ));
        assert!(matches!(
            parse_pattern("a:w*", None),
            Err(ChannelError::PartialWildcard(_))
        ));
        assert!(matches!(
            parse_name(&"a".repeat(257), None),
            Err(ChannelError::TooLong(_))
        ));
    }

    fn includes(grant: &str, requested: &str) -> bool {
        Pattern::parse(grant)
            .unwrap()
            .includes(&Pattern::parse(requested).unwrap())
    }

    #[test]
    fn inclusion_of_patterns() {
        assert!(includes("shop:>", "shop:worker"));
        assert!(includes("shop:>", "shop:worker:*"));
        assert!(includes("shop:>", "shop:>"));
        assert!(includes("shop:>", "shop:*:>"));
        assert!(includes(">", "a:b:c"));
        assert!(includes("shop:*", "shop:worker"));
        assert!(includes("shop:*", "shop:*"));
        assert!(includes("*:worker", "shop:worker"));
        assert!(includes("shop:worker", "shop:worker"));
        assert!(!includes("shop:*", "shop:>"));
        assert!(!includes("shop:*", "shop:worker:blue"));
        assert!(!includes("shop:worker", "shop:*"));
        assert!(!includes("shop:>", "shop"));
        assert!(!includes("shop:>", "*:worker"));
        assert!(!includes("shop:>", ">"));
        assert!(!includes("shop:*:>", "shop:>"));
        assert!(!includes("shop:worker", "shop:worker:x"));
    }

    proptest! {
        #[test]
        fn inclusion_agrees_with_matching(grant in small_pattern(), requested in small_pattern()) {
            let g = Pattern::parse(&grant).unwrap();
            let r = Pattern::parse(&requested).unwrap();
            let counterexample = small_channels()
                .into_iter()
                .find(|c| r.matches(c) && !g.matches(c));
            // Sound: included means no channel escapes the grant. Exact: not
            // included means a channel that escapes exists.
            prop_assert_eq!(g.includes(&r), counterexample.is_none(), "{:?}", counterexample);
        }

        #[test]
        fn every_pattern_includes_itself_and_is_included_by_its_tail_grant(
            segs in proptest::collection::vec(prop_oneof!["[a-z0-9_./-]{1,8}", Just("*".to_string())], 1..6)
        ) {
            let text = segs.join(":");
            let p = Pattern::parse(&text).unwrap();
            prop_assert!(p.includes(&p));
            prop_assert!(Pattern::parse(">").unwrap().includes(&p));
        }

        #[test]
        fn a_name_is_checked_as_an_exact_pattern(
            text in prop_oneof![".{0,40}", "[a-z*>:]{0,12}", "[a-z0-9_./:-]{0,20}"]
        ) {
            let as_pattern = Pattern::parse(&text).and_then(|p| {
                if p.is_exact() {
                    Ok(())
                } else {
                    Err(ChannelError::PatternNotAllowed(text.clone()))
                }
            });
            prop_assert_eq!(check_name(&text), as_pattern);
        }

        #[test]
        fn an_owned_name_parses_as_a_borrowed_one(
            text in prop_oneof![".{0,40}", ":[a-z0-9_./:-]{0,20}", "[a-z0-9_./:-]{0,20}"]
        ) {
            for app in [None, Some("shop")] {
                prop_assert_eq!(parse_owned_name(text.clone(), app), parse_name(&text, app));
            }
        }

        #[test]
        fn parsing_never_panics(text in ".{0,300}") {
            let _ = parse_pattern(&text, Some("app"));
            let _ = parse_name(&text, None);
        }

        #[test]
        fn every_valid_name_matches_itself_and_its_tail_pattern(
            segs in proptest::collection::vec("[a-z0-9_./-]{1,8}", 1..6)
        ) {
            let name = segs.join(":");
            let p = Pattern::parse(&name).unwrap();
            prop_assert!(p.matches(&name));
            let tail = format!("{}:>", segs[0]);
            prop_assert_eq!(Pattern::parse(&tail).unwrap().matches(&name), segs.len() > 1);
        }
    }
}
