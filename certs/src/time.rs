//! Times and durations as coordinators type them.
//!
//! Durations: `90s`, `30m`, `12h`, `14d`, `52w`. Times: Unix seconds,
//! `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SSZ`.

use careweave_protocol::civil::{civil_from_days, days_from_civil};

/// Why text is not a duration or time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("{0:?} is not a duration (use a number and s, m, h, d or w, e.g. 14d)")]
    Duration(String),
    #[error("{0:?} is not a time (use YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds)")]
    Time(String),
}

/// Parses a duration into seconds.
pub fn parse_duration(text: &str) -> Result<u64, TimeError> {
    let err = || TimeError::Duration(text.to_owned());
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number.parse().map_err(|_| err())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(err()),
    };
    n.checked_mul(scale).filter(|s| *s > 0).ok_or_else(err)
}

/// Parses a time into Unix seconds.
pub fn parse_time(text: &str) -> Result<u64, TimeError> {
    let err = || TimeError::Time(text.to_owned());
    if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() {
        return text.parse().map_err(|_| err());
    }
    let field = |range: std::ops::Range<usize>| -> Result<i64, TimeError> {
        text.get(range).and_then(|t| t.parse().ok()).ok_or_else(err)
    };
    let (y, m, d) = (field(0..4)?, field(5..7)?, field(8..10)?);
    if text.get(4..5) != Some("-")
        || text.get(7..8) != Some("-")
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
    {
        return Err(err());
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    match text.len() {
        10 => {}
        20 if text.get(10..11) == Some("T") && text.ends_with('Z') => {
            let (h, mi, s) = (field(11..13)?, field(14..16)?, field(17..19)?);
            if h > 23 || mi > 59 || s > 60 {
                return Err(err());
            }
            secs += h * 3600 + mi * 60 + s;
        }
        _ => return Err(err()),
    }
    u64::try_from(secs).map_err(|_| err())
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("14d"), Ok(14 * 86_400));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert!(parse_duration("14").is_err());
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("1y").is_err());
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(parse_time("1970-01-01"), Ok(0));
        assert_eq!(parse_time("2027-01-15T08:00:00Z"), Ok(1_800_000_000));
        assert_eq!(format_time(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(parse_time("1800000000"), Ok(1_800_000_000));
        assert_eq!(parse_time("2024-02-29"), Ok(1_709_164_800));
        for bad in [
            "2026-13-01",
            "2026/01/01",
            "tomorrow",
            "2026-01-01T25:00:00Z",
            "",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
