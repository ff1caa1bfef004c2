//! Wall-clock time for everything that is stored or compared with stored times (consent
//! windows, call limits). Behind a trait so tests can move time by days without sleeping.

use std::time::{SystemTime, UNIX_EPOCH};

pub const MS_PER_HOUR: i64 = 3_600_000;
pub const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

pub trait Clock: Send + Sync {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
    }
}

/// `2026-11-22T02:48:51Z`: the UTC time people and clients read in error messages.
pub fn rfc3339(unix_ms: i64) -> String {
    let (date, seconds) = utc(unix_ms);
    format!("{date}:{seconds:02}Z")
}

/// `2026-11-22T02:48:51.123Z`: as `rfc3339`, to the millisecond, for the timestamps of events
/// (two events of one call may be less than a second apart).
pub fn rfc3339_millis(unix_ms: i64) -> String {
    let (date, seconds) = utc(unix_ms);
    format!("{date}:{seconds:02}.{:03}Z", unix_ms.rem_euclid(1000))
}

/// `2026-11-22T02:48` and the seconds of the minute, in UTC.
fn utc(unix_ms: i64) -> (String, i64) {
    let seconds = unix_ms.div_euclid(1000);
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let date = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}",
        of_day / 3600,
        of_day % 3600 / 60
    );
    (date, of_day % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_315_731_999), "2026-11-22T02:48:51Z");
        assert_eq!(rfc3339(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn event_timestamps_keep_the_milliseconds() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_795_315_731_999),
            "2026-11-22T02:48:51.999Z"
        );
        assert_eq!(
            rfc3339_millis(1_795_315_731_005),
            "2026-11-22T02:48:51.005Z"
        );
    }

    #[test]
    fn the_system_clock_is_in_this_century() {
        let now = SystemClock.now_ms();
        assert!(rfc3339(now).starts_with("20"));
    }
}
