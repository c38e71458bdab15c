//! The few date formats the API needs: `X-Sdk-Date`, HTTP `Date`, IAM `expires_at`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date of a day count since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_unix(secs: i64) -> Option<SystemTime> {
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

/// Calendar date and time of day of a Unix time: (year, month, day, hour, minute, second).
fn civil(secs: i64) -> (i64, u32, u32, i64, i64, i64) {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let r = secs.rem_euclid(86_400);
    (y, m, d, r / 3600, r % 3600 / 60, r % 60)
}

/// `YYYYMMDDTHHMMSSZ` in UTC, the `X-Sdk-Date` format.
pub fn sdk_date(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss) = civil(unix_secs(t));
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// Parses an `X-Sdk-Date` value.
pub fn parse_sdk_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    civil_to_time(
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    )
}

fn civil_to_time(y: u32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> Option<SystemTime> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    from_unix(days * 86_400 + i64::from(h * 3600 + mi * 60 + s))
}

/// Parses an RFC 7231 `Date` header (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    let mut w = s.split_whitespace();
    let _weekday = w.next()?;
    let d: u32 = w.next()?.parse().ok()?;
    let mon = w.next()?;
    let y: u32 = w.next()?.parse().ok()?;
    let hms = w.next()?;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mo = u32::try_from(MONTHS.iter().position(|m| *m == mon)? + 1).ok()?;
    let mut t = hms.split(':').map(|x| x.parse::<u32>().ok());
    civil_to_time(y, mo, d, t.next()??, t.next()??, t.next()??)
}

/// Parses `2026-11-23T16:20:40.123000Z` (IAM `expires_at`).
pub fn parse_iso8601(s: &str) -> Option<SystemTime> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    civil_to_time(
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    )
}

/// Local clock minus the server's `Date`, in seconds.
pub fn skew_seconds(local: SystemTime, server_date: &str) -> Option<i64> {
    let server = parse_http_date(server_date)?;
    Some(unix_secs(local) - unix_secs(server))
}

/// Local wall-clock time `YYYY-MM-DD HH:MM:SS` (UTC here; the daemon passes local offsets).
pub fn agent_time(t: SystemTime, utc_offset_secs: i64) -> String {
    let (y, m, d, hh, mm, ss) = civil(unix_secs(t) + utc_offset_secs);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_dates_round_trip() {
        let t = from_unix(1_136_214_245).unwrap(); // 2006-01-02T15:04:05Z
        assert_eq!(sdk_date(t), "20060102T150405Z");
        assert_eq!(parse_sdk_date("20060102T150405Z"), Some(t));
        assert_eq!(parse_sdk_date("20060102T150405"), None);
        assert_eq!(parse_sdk_date("20061302T150405Z"), None);
        assert_eq!(
            sdk_date(from_unix(951_782_400).unwrap()),
            "20000229T000000Z"
        );
    }

    #[test]
    fn http_dates() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(sdk_date(t), "19941106T084937Z");
        assert!(parse_http_date("yesterday").is_none());
        assert_eq!(
            skew_seconds(
                t + Duration::from_secs(1000),
                "Sun, 06 Nov 1994 08:49:37 GMT"
            ),
            Some(1000)
        );
    }

    #[test]
    fn iso_and_agent_time() {
        let t = parse_iso8601("2026-11-23T16:20:40.123000Z").unwrap();
        assert_eq!(sdk_date(t), "20261123T162040Z");
        assert_eq!(agent_time(t, 8 * 3600), "2026-11-24 00:20:40");
    }
}
