//! Windows aligned to the wall clock (UTC: a window of P seconds starts at a multiple of P
//! since 1970, so 5min windows start at :00, :05, …) and the object key of each.

use std::time::{Duration, UNIX_EPOCH};

use super::lts::{LogTransfer, StorageFormat};

/// `[start, end)` in seconds since 1970.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First second of the window.
    pub start: u64,
    /// First second after it.
    pub end: u64,
}

/// The window holding second `t`.
pub fn window_of(t: u64, period: Duration) -> Window {
    let p = period.as_secs().max(1);
    let start = t - t % p;
    Window {
        start,
        end: start + p,
    }
}

/// `YYYYMMDDTHHMMSSZ` of second `t`.
pub fn stamp(t: u64) -> String {
    crate::api::time::sdk_date(UNIX_EPOCH + Duration::from_secs(t))
}

/// The object key of window `w`, in LTS's layout with the agent's source and task in place of
/// the log group and stream: `[DIR_PREFIX/]LogTanks/REGION/YYYY/MM/DD/SOURCE/TASK/
/// [PREFIX_]START_END.log` (`.json` for JSON), the date that of the window's start (UTC).
/// The API reference used does not spell the layout out; this follows LTS's documented
/// `LogTanks/region/date/group/stream` tree.
pub fn object_key(t: &LogTransfer, region: &str, source: &str, task: &str, w: Window) -> String {
    let s = stamp(w.start);
    let (y, m, d) = (&s[0..4], &s[4..6], &s[6..8]);
    let dir = if t.dir_prefix_name.is_empty() {
        String::new()
    } else {
        format!("{}/", t.dir_prefix_name)
    };
    let prefix = if t.prefix_name.is_empty() {
        String::new()
    } else {
        format!("{}_", t.prefix_name)
    };
    let ext = match t.format {
        StorageFormat::Raw => "log",
        StorageFormat::Json => "json",
    };
    format!(
        "{dir}LogTanks/{region}/{y}/{m}/{d}/{source}/{task}/{prefix}{s}_{}.{ext}",
        stamp(w.end)
    )
}

/// The second a log line was written: the leading RFC 3339 time of a text line, the
/// `timestamp` of a JSON line; `None` for a continuation line.
pub fn line_time(line: &str) -> Option<u64> {
    let t = if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v.get("timestamp")?.as_str()?.to_string()
    } else {
        line.get(..20)?.to_string()
    };
    let st = crate::api::time::parse_iso8601(&t)?;
    st.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_and_keys_follow_the_layout() {
        // 2026-12-07T04:53:20Z
        let t = 1_796_619_200;
        let w = window_of(t, Duration::from_secs(300));
        assert_eq!(stamp(w.start), "20261207T045000Z");
        assert_eq!(w.end - w.start, 300);
        let lt = LogTransfer {
            bucket: "b".into(),
            format: StorageFormat::Raw,
            prefix_name: "agent".into(),
            dir_prefix_name: "sms/logs".into(),
            period: Duration::from_secs(300),
        };
        assert_eq!(
            object_key(&lt, "cn-north-4", "src1", "task1", w),
            "sms/logs/LogTanks/cn-north-4/2026/12/07/src1/task1/agent_20261207T045000Z_20261207T045500Z.log"
        );
        let hour = window_of(t, Duration::from_secs(12 * 3600));
        assert_eq!(stamp(hour.start), "20261207T000000Z");
    }

    #[test]
    fn line_times_of_text_and_json() {
        assert_eq!(
            line_time("2026-12-07T04:53:20.123456Z  INFO sms_agent: registered"),
            Some(1_796_619_200)
        );
        assert_eq!(
            line_time(r#"{"timestamp":"2026-12-07T04:53:20.5Z","level":"INFO"}"#),
            Some(1_796_619_200)
        );
        assert_eq!(line_time("    continuation of a message"), None);
    }
}
