//! `[logs]` and `[agent] log_format`: how the log files are written and rotated.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::Interval;

/// How log lines are written to the files of `log_dir`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `tracing`'s plain text lines, as on stderr (no colours).
    #[default]
    Text,
    /// One JSON object a line (`timestamp`, `level`, `fields`, `target`).
    Json,
}

/// A size written as `10MiB`, `512K`, `1G` (binary units) or a bare number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// Parses `10MiB`, `10M`, `512k`, `1GiB` or a bare number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (like 10MiB, 512K, 1G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("{s:?} has an unknown unit {other:?} (use K, M, G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => parse_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `[logs]`: rotation of the files in `[agent] log_dir`, and where UPLOAD_LOG sends bundles
/// when the service names no `obs_domain`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsSection {
    /// A file is rotated once it would grow past this.
    pub max_file_size: ByteSize,
    /// A file is rotated once it has been written to for this long.
    pub rotate_interval: Interval,
    /// Rotated files older than this are deleted.
    pub max_age: Interval,
    /// The current and rotated files together stay under this; the oldest go first.
    pub max_total: ByteSize,
    /// OBS endpoint (`https://obs.REGION.myhuaweicloud.com`) used when `GET /v3/config` gives
    /// no `obs_domain`; when both exist this one wins (a private OBS endpoint, a proxy).
    pub obs_endpoint: String,
    /// Region of the OBS signature's credential scope (default: the `REGION` of
    /// `obs.REGION.myhuaweicloud.com`, else `us-east-1`).
    pub obs_region: String,
    /// Name the bucket in the path (`endpoint/bucket/key`) instead of the host name
    /// (`bucket.endpoint/key`, OBS's documented form); IP-address endpoints always do.
    pub obs_path_style: bool,
    /// Bundles larger than this go up in parts of this size (5 MiB to 5 GiB: S3's limits,
    /// within OBS's 100 KiB to 5 GiB).
    pub upload_part_size: ByteSize,
    /// Canned ACL of an uploaded bundle until RSET_LOG_ACL makes it `private`.
    pub upload_acl: String,
    /// How long an upload retries through a network or OBS outage before it fails.
    pub upload_retry_for: Interval,
}

impl Default for LogsSection {
    fn default() -> Self {
        Self {
            max_file_size: ByteSize(10 << 20),
            rotate_interval: Interval(Duration::from_secs(86_400)),
            max_age: Interval(Duration::from_secs(30 * 86_400)),
            max_total: ByteSize(100 << 20),
            obs_endpoint: String::new(),
            obs_region: String::new(),
            obs_path_style: false,
            upload_part_size: ByteSize(8 << 20),
            // The reference's log collection has the service collect the object
            // (WAIT_SERVER_COLLECT) before it asks for the ACL reset (TELL_AGENT_RESET_ACL,
            // §5.4.5 line 10293): the object is readable until then.
            upload_acl: "public-read".into(),
            upload_retry_for: Interval(Duration::from_secs(300)),
        }
    }
}

impl LogsSection {
    /// A problem per unusable key, each naming `[logs] key`.
    pub fn check(&self, problems: &mut Vec<String>) {
        // Below a few KiB a single long line (a probe report) would rotate every write.
        if self.max_file_size.0 < 4096 {
            problems.push("[logs] max_file_size must be at least 4KiB".into());
        }
        if self.max_total.0 < self.max_file_size.0 {
            problems.push("[logs] max_total must be at least max_file_size".into());
        }
        if self.rotate_interval.0 < Duration::from_secs(1) {
            problems.push("[logs] rotate_interval must be at least 1s".into());
        }
        if self.max_age.0 < Duration::from_secs(1) {
            problems.push("[logs] max_age must be at least 1s".into());
        }
        // S3's part size limits (OBS's are wider: 100 KiB to 5 GiB).
        if !(5 << 20..=5 << 30).contains(&self.upload_part_size.0) {
            problems.push("[logs] upload_part_size must be 5MiB..5GiB".into());
        }
        const ACLS: [&str; 4] = [
            "private",
            "public-read",
            "authenticated-read",
            "bucket-owner-full-control",
        ];
        if !ACLS.contains(&self.upload_acl.as_str()) {
            problems.push(format!(
                "[logs] upload_acl {:?} must be one of {}",
                self.upload_acl,
                ACLS.join(", ")
            ));
        }
        let e = self.obs_endpoint.trim();
        if !(e.is_empty() || e.starts_with("https://") || e.starts_with("http://")) {
            problems.push(format!(
                "[logs] obs_endpoint {e:?} must be an http(s) URL, e.g. https://obs.cn-north-4.myhuaweicloud.com"
            ));
        }
    }

    /// The rotation limits of these settings.
    pub fn limits(&self) -> super::file::Limits {
        super::file::Limits {
            max_file_size: self.max_file_size.0,
            rotate_interval: self.rotate_interval.0,
            max_age: self.max_age.0,
            max_total: self.max_total.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn check_names_each_bad_key() {
        let s = LogsSection {
            max_file_size: ByteSize(10),
            obs_endpoint: "obs.example".into(),
            ..LogsSection::default()
        };
        let mut p = Vec::new();
        s.check(&mut p);
        assert!(p.iter().any(|x| x.contains("max_file_size")), "{p:?}");
        assert!(p.iter().any(|x| x.contains("obs_endpoint")), "{p:?}");
        let mut p = Vec::new();
        LogsSection::default().check(&mut p);
        assert!(p.is_empty(), "{p:?}");
    }
}
