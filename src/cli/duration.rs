//! The one grammar of every command-line flag that takes a duration (`--timeout`, …):
//! jiff's "friendly" format (`90s`, `5m`, `1h30m`, `1h 30m`, `500ms`, `2 minutes`), or a
//! bare number of seconds as older scripts write it. Hours are the largest unit: a day
//! is not always 24 hours, and no Ferro wait is that long.
//!
//! [`parse_duration`] is a clap value parser, so a bad value fails while the arguments
//! are parsed, with clap's message naming the flag:
//! `invalid value 'soon' for '--timeout <DURATION>': …`.

use std::time::Duration;

use jiff::SignedDuration;

/// Parses a flag's duration; the error says what to write instead.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // jiff's own messages speak of its parser; say what to write instead.
    let bad =
        || format!("`{text}` is not a duration: write e.g. 90s, 5m or 1h30m (units h, m, s, ms)");
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map(Duration::from_secs).map_err(|_| bad());
    }
    let parsed: SignedDuration = text.parse().map_err(|_| bad())?;
    Duration::try_from(parsed).map_err(|_| bad())
}

/// A duration as the flags are written: `1m 30s`, `500ms`.
pub fn show_duration(duration: Duration) -> String {
    match SignedDuration::try_from(duration) {
        Ok(d) => format!("{d:#}"),
        Err(_) => format!("{duration:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_combined_or_alone() {
        for (text, want) in [
            ("90s", Duration::from_secs(90)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("1h 30m", Duration::from_secs(5400)),
            ("2 minutes", Duration::from_secs(120)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("7", Duration::from_secs(7)),
            (" 60s ", Duration::from_secs(60)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations_say_what_to_write() {
        for text in ["", "soon", "5x", "-5s", "5d", "s", "1h-"] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("write e.g. 90s"), "{text}: {err}");
        }
    }

    #[test]
    fn durations_print_as_they_are_written() {
        assert_eq!(show_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(show_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(show_duration(Duration::from_secs(2)), "2s");
        for d in [Duration::from_secs(5400), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&show_duration(d)), Ok(d));
        }
    }
}
