//! `[log_transfer]`: the LTS request body's keys (`switch_on`, `obs_bucket_name`, `type`,
//! `storage_format`, `prefix_name`, `dir_prefix_name`, `period`, `period_unit`), checked when
//! the configuration is loaded with LTS's own error codes and messages (LTS.1901 for a value
//! outside its list, LTS.1902 for an invalid prefix), so that a bad value stops the agent
//! (exit 64) instead of a transfer that never happens.

use std::time::Duration;

use serde::Deserialize;

/// `[log_transfer]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogTransfer {
    /// Whether the transfer runs (LTS default: true).
    #[serde(default = "yes")]
    pub switch_on: bool,
    /// OBS bucket, 3 to 63 characters (LTS: Minimum 3, Maximum 63).
    #[serde(default)]
    pub obs_bucket_name: String,
    /// Only `cycle` (LTS: "Set this parameter to cycle").
    #[serde(default = "cycle", rename = "type")]
    pub kind: String,
    /// `RAW` (default) or `JSON`.
    #[serde(default = "raw")]
    pub storage_format: String,
    /// File name prefix of the objects, at most 64 characters.
    #[serde(default)]
    pub prefix_name: String,
    /// Directory the objects go under, at most 64 characters.
    #[serde(default)]
    pub dir_prefix_name: String,
    /// Length of a window, with `period_unit`.
    pub period: Option<i64>,
    /// `min` or `hour`.
    pub period_unit: Option<String>,
}

fn yes() -> bool {
    true
}
fn cycle() -> String {
    "cycle".into()
}
fn raw() -> String {
    "RAW".into()
}

/// How a window's lines are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFormat {
    /// The lines as the log file holds them.
    Raw,
    /// One JSON object a line.
    Json,
}

/// `[log_transfer]`, validated and switched on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogTransfer {
    /// Bucket.
    pub bucket: String,
    /// Storage format.
    pub format: StorageFormat,
    /// File name prefix ("" for none).
    pub prefix_name: String,
    /// Directory prefix ("" for none).
    pub dir_prefix_name: String,
    /// Window length.
    pub period: Duration,
}

/// The combinations LTS accepts (the seed's list, in its order).
pub const PERIODS: [&str; 7] = ["2min", "5min", "30min", "1hour", "3hour", "6hour", "12hour"];

/// A prefix by LTS's rule as far as the API reference states it (at most 64 characters); the
/// characters allowed are not listed there, so this takes those safe in an OBS key on every
/// tool: letters, digits, `-`, `_`, `.`; a directory prefix may also separate segments with
/// `/` (no empty, `.` or `..` segment).
fn prefix_ok(p: &str, dir: bool) -> bool {
    if p.is_empty() {
        return true;
    }
    if p.chars().count() > 64 {
        return false;
    }
    let seg_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if dir {
        p.split('/').all(seg_ok)
    } else {
        seg_ok(p)
    }
}

impl RawLogTransfer {
    /// The validated transfer (`None` when switched off); a problem per bad key, each with
    /// LTS's code and message where LTS has one.
    pub fn check(&self, problems: &mut Vec<String>) -> Option<LogTransfer> {
        let n = problems.len();
        let mut bad = |code: &str, msg: &str| {
            problems.push(format!("[log_transfer] {code}: {msg}"));
        };
        if self.kind != "cycle" {
            bad("LTS.1901", "type is not in the list [cycle]");
        }
        let format = match self.storage_format.as_str() {
            "RAW" => Some(StorageFormat::Raw),
            "JSON" => Some(StorageFormat::Json),
            _ => {
                bad("LTS.1901", "storage_format is not in the list [RAW, JSON]");
                None
            }
        };
        let unit_ok = matches!(self.period_unit.as_deref(), Some("min" | "hour"));
        if !unit_ok {
            bad("LTS.1901", "period_unit is not in the list [min, hour]");
        }
        let combo = match (self.period, self.period_unit.as_deref()) {
            (Some(p), Some(u)) => format!("{p}{u}"),
            _ => String::new(),
        };
        let period = if PERIODS.contains(&combo.as_str()) {
            let p = u64::try_from(self.period.unwrap_or(0)).unwrap_or(0);
            Some(Duration::from_secs(
                p * if self.period_unit.as_deref() == Some("hour") {
                    3600
                } else {
                    60
                },
            ))
        } else {
            bad(
                "LTS.1901",
                "period+period_unit is not in the list [2min, 5min, 30min, 1hour, 3hour, 6hour, 12hour]",
            );
            None
        };
        if !prefix_ok(&self.prefix_name, false) {
            bad(
                "LTS.1902",
                "prefix_name is invalid, please verify if it's provided as required",
            );
        }
        if !prefix_ok(&self.dir_prefix_name, true) {
            bad(
                "LTS.1902",
                "dir_prefix_name is invalid, please verify if it's provided as required",
            );
        }
        // LTS: Minimum 3, Maximum 63; its runtime LTS.0416 ("obs bucket does not exist") is
        // for a bucket that is missing, which only OBS can tell.
        let b = self.obs_bucket_name.trim();
        if !(3..=63).contains(&b.len()) {
            problems.push(format!(
                "[log_transfer] obs_bucket_name {b:?} must be 3 to 63 characters"
            ));
        }
        if problems.len() != n || !self.switch_on {
            return None;
        }
        Some(LogTransfer {
            bucket: b.to_string(),
            format: format?,
            prefix_name: self.prefix_name.clone(),
            dir_prefix_name: self.dir_prefix_name.clone(),
            period: period?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> RawLogTransfer {
        toml::from_str(t).unwrap()
    }

    fn problems(t: &str) -> Vec<String> {
        let mut p = Vec::new();
        parse(t).check(&mut p);
        p
    }

    #[test]
    fn accepts_the_lts_example() {
        let mut p = Vec::new();
        let t = parse(
            "obs_bucket_name = \"lts-test\"\ntype = \"cycle\"\nstorage_format = \"RAW\"\nswitch_on = true\nprefix_name = \"fileprefixname\"\ndir_prefix_name = \"dirprefixname\"\nperiod = 5\nperiod_unit = \"min\"\n",
        )
        .check(&mut p)
        .unwrap();
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(t.period, Duration::from_secs(300));
        assert_eq!(t.format, StorageFormat::Raw);
    }

    #[test]
    fn refuses_values_outside_the_lists_with_lts_codes() {
        let base = "obs_bucket_name = \"lts-test\"\n";
        let p = problems(&format!(
            "{base}period = 10\nperiod_unit = \"min\"\nstorage_format = \"XML\"\n"
        ));
        assert!(
            p.contains(
                &"[log_transfer] LTS.1901: storage_format is not in the list [RAW, JSON]"
                    .to_string()
            ),
            "{p:?}"
        );
        assert!(p.iter().any(|x| x.ends_with("period+period_unit is not in the list [2min, 5min, 30min, 1hour, 3hour, 6hour, 12hour]")), "{p:?}");
        let p = problems(&format!("{base}period = 2\nperiod_unit = \"day\"\n"));
        assert!(p.iter().any(|x| x == "[log_transfer] LTS.1901: period_unit is not in the list [min, hour]"), "{p:?}");
        let p = problems(&format!(
            "{base}period = 1\nperiod_unit = \"hour\"\ntype = \"once\"\n"
        ));
        assert_eq!(
            p,
            ["[log_transfer] LTS.1901: type is not in the list [cycle]"]
        );
        let long = "a".repeat(65);
        let p = problems(&format!("{base}period = 1\nperiod_unit = \"hour\"\nprefix_name = \"{long}\"\ndir_prefix_name = \"a//b\"\n"));
        assert_eq!(
            p,
            [
                "[log_transfer] LTS.1902: prefix_name is invalid, please verify if it's provided as required",
                "[log_transfer] LTS.1902: dir_prefix_name is invalid, please verify if it's provided as required"
            ]
        );
        assert!(problems("period = 2\nperiod_unit = \"min\"\n")[0].contains("obs_bucket_name"));
    }

    #[test]
    fn switched_off_is_none_but_still_checked() {
        let mut p = Vec::new();
        assert!(parse(
            "switch_on = false\nobs_bucket_name = \"abc\"\nperiod = 2\nperiod_unit = \"min\"\n"
        )
        .check(&mut p)
        .is_none());
        assert!(p.is_empty());
        assert!(!problems(
            "switch_on = false\nobs_bucket_name = \"abc\"\nperiod = 3\nperiod_unit = \"min\"\n"
        )
        .is_empty());
        assert!(
            prefix_ok("logs/agent-1/x.y", true)
                && !prefix_ok("a/b", false)
                && !prefix_ok("../x", true)
        );
    }
}
