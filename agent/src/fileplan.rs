//! What a file task migrates: the source filesystems the task names, the task settings that
//! steer a file pass (excludes, consistency directories and mode), and the used bytes its
//! progress counts against.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::api::models::{TargetServer, TaskSettings};

/// The service checks at most this many directories per `consistency-result`.
pub const MAX_CHECK_DIRS: usize = 30;

/// The task settings a file pass obeys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Left out of every pass (`MIGRATE_EXCLUDE_DIR`).
    pub migrate_excludes: Vec<PathBuf>,
    /// Left out of sync passes as well (`SYNC_EXCLUDE_DIR`).
    pub sync_excludes: Vec<PathBuf>,
    /// Checked after each pass (`CONSISTENCY_DIR`); empty: no check.
    pub consistency_dirs: Vec<PathBuf>,
    /// `CONSISTENCY_MODE` hash (content) rather than quick (size and mtime).
    pub consistency_hash: bool,
    /// `ONLY_SYNC_PATH` (ref. §5.4.2 line 10371, §5.10.1 line 23146): sync passes cover only
    /// these paths. The reference gives no format; the agent reads it like the exclude lists.
    pub only_sync: Vec<PathBuf>,
}

impl Settings {
    /// The excludes of a pass: sync passes leave out both lists.
    pub fn excludes(&self, sync: bool) -> Vec<PathBuf> {
        let mut v = self.migrate_excludes.clone();
        if sync {
            v.extend(self.sync_excludes.iter().cloned());
        }
        v
    }
}

/// Why a file task cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// A path setting that is not absolute.
    #[error("task setting {key}: {value:?} is not an absolute path")]
    NotAbsolute {
        /// The setting.
        key: String,
        /// The offending entry.
        value: String,
    },
    /// An unknown consistency mode.
    #[error("task setting CONSISTENCY_MODE: {0:?} is neither quick nor hash")]
    Mode(String),
    /// The task's layout names no mounted filesystem.
    #[error("the task names no mounted filesystem to migrate (target_server.disks[].physical_volumes[].mount_point and volume_groups[].logical_volumes[].mount_point are all empty)")]
    NoSources,
    /// A mount point that is not an absolute path.
    #[error("the task's mount point {0:?} is not an absolute path")]
    BadMount(String),
}

/// The mount points of the task's partitions and LVs, parents first, swap left out.
pub fn sources(ts: &TargetServer) -> Result<Vec<PathBuf>, PlanError> {
    let vols = ts
        .disks
        .iter()
        .flat_map(|d| d.physical_volumes.iter())
        .chain(
            ts.volume_groups
                .iter()
                .flat_map(|g| g.logical_volumes.iter()),
        );
    let mut out = BTreeSet::new();
    for v in vols {
        let m = v.mount_point.trim();
        if m.is_empty() || v.file_system.eq_ignore_ascii_case("swap") || m.contains("SWAP") {
            continue;
        }
        if !m.starts_with('/') {
            return Err(PlanError::BadMount(m.to_string()));
        }
        out.insert(PathBuf::from(m));
    }
    if out.is_empty() {
        return Err(PlanError::NoSources);
    }
    // BTreeSet order puts `/` before `/boot`; the engine sorts again by depth anyway.
    Ok(out.into_iter().collect())
}

/// Reads the settings a file pass obeys; the reference spells the exclude keys three ways
/// (with a stray leading space in places), so all are accepted. Others are ignored.
pub fn settings(s: &TaskSettings) -> Result<Settings, PlanError> {
    let mut out = Settings::default();
    for c in &s.configurations {
        let key = c.config_key.trim().to_ascii_uppercase();
        let value = match &c.config_value {
            serde_json::Value::String(v) => v.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        let list = match key.as_str() {
            "MIGRATE_EXCLUDE_DIR" | "MIGRATE_EXCLUDE_PATH" | "EXCLUDE_MIGRATE_PATH" => {
                &mut out.migrate_excludes
            }
            "SYNC_EXCLUDE_DIR" | "SYNC_EXCLUDE_PATH" => &mut out.sync_excludes,
            "CONSISTENCY_DIR" => &mut out.consistency_dirs,
            "ONLY_SYNC_PATH" => &mut out.only_sync,
            "CONSISTENCY_MODE" => {
                out.consistency_hash = match value.trim().to_ascii_lowercase().as_str() {
                    "" | "quick" => false,
                    "hash" => true,
                    _ => return Err(PlanError::Mode(value)),
                };
                continue;
            }
            _ => {
                tracing::debug!(key = %key, "task setting not used by file passes");
                continue;
            }
        };
        for p in value
            .split([',', ';', '\n'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            if !p.starts_with('/') {
                return Err(PlanError::NotAbsolute {
                    key,
                    value: p.to_string(),
                });
            }
            let p = PathBuf::from(p);
            if !list.contains(&p) {
                list.push(p);
            }
        }
    }
    if out.consistency_dirs.len() > MAX_CHECK_DIRS {
        tracing::warn!(
            dirs = out.consistency_dirs.len(),
            "CONSISTENCY_DIR names more directories than the service takes; the first 30 are checked"
        );
        out.consistency_dirs.truncate(MAX_CHECK_DIRS);
    }
    Ok(out)
}

/// What a sync pass leaves out so that it covers only `only` (`ONLY_SYNC_PATH`): along the
/// way from each source down to each path it keeps, every sibling is excluded. A source with
/// none of those paths under it (and none above it) is left out whole, except the sources
/// mounted inside it, which are judged on their own. Empty `only`: nothing.
pub fn only_sync_excludes(sources: &[PathBuf], only: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if only.is_empty() {
        return out;
    }
    for s in sources {
        if only.iter().any(|p| s.starts_with(p)) {
            continue; // the whole source is wanted
        }
        let keep: Vec<&PathBuf> = only
            .iter()
            .chain(sources.iter())
            .filter(|p| p.starts_with(s) && *p != s)
            .collect();
        let mut dirs = vec![s.clone()];
        while let Some(d) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if keep.iter().any(|k| **k == path) {
                    continue;
                }
                if keep.iter().any(|k| k.starts_with(&path)) {
                    dirs.push(path);
                } else {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

/// Used bytes of the filesystems under `sources` (each counted once), by statvfs.
pub fn used_bytes(sources: &[PathBuf]) -> u64 {
    let mut seen = BTreeSet::new();
    let mut total = 0u64;
    for s in sources {
        let Ok(meta) = std::fs::metadata(s) else {
            continue;
        };
        if !seen.insert(std::os::unix::fs::MetadataExt::dev(&meta)) {
            continue;
        }
        if let Ok(v) = nix::sys::statvfs::statvfs(s) {
            let used = v.blocks().saturating_sub(v.blocks_free());
            total = total.saturating_add(used.saturating_mul(v.fragment_size()));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::models::{ConfigBody, TargetDisk, Volume, VolumeGroup};
    use serde_json::json;

    fn vol(m: &str, fs: &str) -> Volume {
        Volume {
            mount_point: m.into(),
            file_system: fs.into(),
            ..Volume::default()
        }
    }

    #[test]
    fn sources_are_the_mounted_partitions_and_lvs() {
        let ts = TargetServer {
            disks: vec![TargetDisk {
                physical_volumes: vec![
                    vol("/boot", "ext4"),
                    vol("/", "xfs"),
                    vol("", "ext4"),
                    vol("[SWAP]", "swap"),
                ],
                ..TargetDisk::default()
            }],
            volume_groups: vec![VolumeGroup {
                logical_volumes: vec![vol("/var", "ext4"), vol("/boot", "ext4")],
                ..VolumeGroup::default()
            }],
        };
        let got: Vec<_> = sources(&ts).unwrap();
        assert_eq!(got, vec![PathBuf::from("/"), "/boot".into(), "/var".into()]);
        assert_eq!(sources(&TargetServer::default()), Err(PlanError::NoSources));
        let bad = TargetServer {
            disks: vec![TargetDisk {
                physical_volumes: vec![vol("data", "ext4")],
                ..TargetDisk::default()
            }],
            ..TargetServer::default()
        };
        assert!(matches!(sources(&bad), Err(PlanError::BadMount(_))));
    }

    fn cfg(pairs: &[(&str, serde_json::Value)]) -> TaskSettings {
        TaskSettings {
            configurations: pairs
                .iter()
                .map(|(k, v)| ConfigBody {
                    config_key: (*k).into(),
                    config_value: v.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn settings_take_every_spelling_and_lists() {
        let s = settings(&cfg(&[
            (" EXCLUDE_MIGRATE_PATH", json!("/a, /b")),
            ("MIGRATE_EXCLUDE_DIR", json!("/c;/a")),
            ("SYNC_EXCLUDE_DIR", json!("/var/log\n/tmp")),
            ("CONSISTENCY_DIR", json!("/etc,/srv")),
            ("CONSISTENCY_MODE", json!("HASH")),
            ("LINUX_CPU_LIMIT", json!(50)),
        ]))
        .unwrap();
        assert_eq!(
            s.migrate_excludes,
            vec![PathBuf::from("/a"), "/b".into(), "/c".into()]
        );
        assert_eq!(s.excludes(false).len(), 3);
        assert_eq!(s.excludes(true).len(), 5);
        assert_eq!(
            s.consistency_dirs,
            vec![PathBuf::from("/etc"), "/srv".into()]
        );
        assert!(s.consistency_hash);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = settings(&cfg(&[("SYNC_EXCLUDE_DIR", json!("var/log"))])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "task setting SYNC_EXCLUDE_DIR: \"var/log\" is not an absolute path"
        );
        assert!(matches!(
            settings(&cfg(&[("CONSISTENCY_MODE", json!("full"))])),
            Err(PlanError::Mode(_))
        ));
        let many: String = (0..40).map(|i| format!("/d{i},")).collect();
        let s = settings(&cfg(&[("CONSISTENCY_DIR", json!(many))])).unwrap();
        assert_eq!(s.consistency_dirs.len(), MAX_CHECK_DIRS);
    }

    #[test]
    fn only_sync_path_excludes_the_rest_of_each_source() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["a/keep/x", "a/other", "b/c", "boot/grub"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("a/file"), b"x").unwrap();
        let sources = vec![r.to_path_buf(), r.join("boot")];
        let got = only_sync_excludes(&sources, &[r.join("a/keep")]);
        assert_eq!(
            got,
            vec![
                r.join("a/file"),
                r.join("a/other"),
                r.join("b"),
                r.join("boot/grub")
            ]
        );
        // A path at or above a source keeps that source whole.
        assert_eq!(
            only_sync_excludes(&sources, &[r.join("boot"), r.join("a")]),
            vec![r.join("b")]
        );
        assert!(only_sync_excludes(&sources, &[]).is_empty());
    }

    #[test]
    fn used_bytes_counts_each_filesystem_once() {
        let one = used_bytes(&[PathBuf::from("/")]);
        assert!(one > 0);
        // Other processes write to / meanwhile: counted twice would be about twice as much.
        let twice = used_bytes(&[PathBuf::from("/"), "/".into()]);
        assert!(twice.abs_diff(one) < one / 2, "{one} vs {twice}");
        assert_eq!(used_bytes(&[PathBuf::from("/no/such/dir")]), 0);
    }
}
