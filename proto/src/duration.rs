//! The one way durations are written on every command line of the project
//! (`ipc-server`, `ipc-sidecar`, `ipcctl`): `500ms`, `2s`, `1.5s`, `10m`, `1h`, or
//! a bare number of seconds.

use std::time::Duration;

/// Reads a duration: a number (decimals allowed) followed by `ms`, `s`, `m` or `h`,
/// or by nothing for seconds. Zero is a duration; a flag that needs more says so
/// itself (see `at_least_1ms`).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 30s, 2m or 1h"))?;
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?}; use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(number * seconds_per_unit)
        .map_err(|_| format!("{text:?} is too long a duration"))
}

/// [`parse`], refusing anything under a millisecond (windows, intervals).
pub fn at_least_1ms(text: &str) -> Result<Duration, String> {
    let duration = parse(text)?;
    if duration < Duration::from_millis(1) {
        return Err(format!("{text:?}: must be at least 1 ms"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_unit() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(" 3 "), Ok(Duration::from_secs(3)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn what_is_not_a_duration_is_named() {
        for bad in [
            "",
            "s",
            "2 weeks",
            "1d",
            "-1s",
            "1e999s",
            "99999999999999999999h",
        ] {
            let error = parse(bad).expect_err(bad);
            assert!(error.contains(&format!("{:?}", bad.trim())), "{error}");
        }
        assert!(at_least_1ms("0s").is_err());
        assert!(at_least_1ms("0.1ms").is_err());
        assert_eq!(at_least_1ms("1ms"), Ok(Duration::from_millis(1)));
    }
}
