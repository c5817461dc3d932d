//! Civil (proleptic Gregorian, UTC) dates as day numbers since 1970-01-01,
//! for the dates people type and read: trust-list validity, audit reports.
//!
//! ```
//! use careweave_protocol::civil::{civil_from_days, date, days_from_civil};
//!
//! let day = days_from_civil(2026, 11, 28);
//! assert_eq!(day, 20_785);
//! assert_eq!(civil_from_days(day), (2026, 11, 28));
//! assert_eq!(date(day), "2026-11-28");
//! ```

/// Days since 1970-01-01 for a civil date; negative before it.
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Howard Hinnant's days-from-civil: years run March to February, so the
    // leap day falls at the end of one.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let march_month = (month + 9) % 12;
    let day_of_year = (153 * march_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `YYYY-MM-DD` for a day number since 1970-01-01.
pub fn date(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(-1), "1969-12-31");
        assert_eq!(date(11_016), "2000-02-29");
        assert_eq!(date(1_800_000_000 / 86_400), "2027-01-15");
        assert_eq!(days_from_civil(2024, 2, 29), 1_709_164_800 / 86_400);
    }

    #[test]
    fn every_day_for_eight_centuries_round_trips() {
        // 1600-01-01 to 2400-12-31: every rule of the calendar, century
        // years that are and are not leap years included.
        let (first, last) = (days_from_civil(1600, 1, 1), days_from_civil(2400, 12, 31));
        let mut expected = (1600, 1, 1);
        for day in first..=last {
            let got = civil_from_days(day);
            assert_eq!(got, expected, "day {day}");
            assert_eq!(days_from_civil(got.0, got.1, got.2), day);
            expected = next_day(expected);
        }
    }

    fn next_day((year, month, day): (i64, i64, i64)) -> (i64, i64, i64) {
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let length = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        if day < length {
            (year, month, day + 1)
        } else if month < 12 {
            (year, month + 1, 1)
        } else {
            (year + 1, 1, 1)
        }
    }
}
