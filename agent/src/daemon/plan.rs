//! Which data a pass moves: the source disks (and their used ranges) of a block task, or the
//! filesystems, excludes and consistency check of a file task.

use std::num::NonZeroU16;
use std::path::PathBuf;

use transfer::{Code, TaskFailure};

use super::engine::FileJob;
use crate::api::models::{Task, TaskSettings};
use crate::config::TransferSection;

/// The source disks of a `MIGRATE_BLOCK` task and their used ranges.
///
/// Reference §5.4.5 (table 5-148 `TargetDisk`, lines 11330-11345; example, lines 1235-1240):
/// `target_server.disks[].name` is the *source* disk (`/dev/sda`) and `relation_name` the disk
/// of the target ECS it is copied to ("目的端ECS中与源端关联的磁盘名称", `/dev/vda`). So the
/// agent reads `name` here and addresses `relation_name` on the target (the receiver's
/// `--disk NAME=PATH` takes that target name).
pub(super) async fn block(task: &Task) -> Result<Vec<transfer::block::SourceDisk>, TaskFailure> {
    let pairs: Vec<(String, String)> = task
        .target_server
        .as_ref()
        .map(|ts| {
            ts.disks
                .iter()
                .filter_map(|d| {
                    let target = d.relation_name.clone().filter(|r| !r.is_empty())?;
                    Some((d.name.clone(), target)).filter(|(src, _)| !src.is_empty())
                })
                .collect()
        })
        .unwrap_or_default();
    if pairs.is_empty() {
        return Err(TaskFailure::new(
            Code::TooFewTargetDisks,
            "the task maps no source disk (name) to a target disk (relation_name)",
        ));
    }
    tokio::task::spawn_blocking(move || {
        let mut disks = Vec::new();
        for (src, name) in pairs {
            // `src`: the source disk (`name`); `name`: the target ECS disk (`relation_name`).
            let path = if src.starts_with('/') {
                PathBuf::from(&src)
            } else {
                PathBuf::from("/dev").join(&src)
            };
            let (used, notes) = crate::blockplan::used_ranges(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for n in notes {
                tracing::info!(disk = %path.display(), "{n}");
            }
            disks.push(transfer::block::SourceDisk { path, name, used });
        }
        Ok::<_, String>(disks)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
    .map_err(|msg| TaskFailure::new(Code::VolumeUnreadable, msg))
}

/// The directories a file task's consistency check compares: `CONSISTENCY_DIR` (our
/// extension) when set; else, when the task asks for a check (`is_need_consistency_check`,
/// ref. §5.4.1 line 9691 "是否进行一致性校验", §5.4.7 line 12927, default false), the migrated
/// filesystems themselves, up to the 30 a result may carry; else none.
fn check_dirs(
    need: Option<bool>,
    configured: &[std::path::PathBuf],
    sources: &[std::path::PathBuf],
) -> Vec<std::path::PathBuf> {
    if !configured.is_empty() {
        configured.to_vec()
    } else if need == Some(true) {
        sources
            .iter()
            .take(crate::fileplan::MAX_CHECK_DIRS)
            .cloned()
            .collect()
    } else {
        Vec::new()
    }
}

/// The file pass of a `MIGRATE_FILE` task: its filesystems, the excludes of the task
/// settings and the config, and the consistency check unless SKIP said otherwise.
pub(super) async fn file(
    task: &Task,
    sync: bool,
    skip_check: bool,
    settings: &TaskSettings,
    cfg: &TransferSection,
) -> Result<FileJob, TaskFailure> {
    let ts = task.target_server.clone().unwrap_or_default();
    let sources = crate::fileplan::sources(&ts)
        .map_err(|e| TaskFailure::new(Code::NoSystemPartition, e.to_string()))?;
    let st = crate::fileplan::settings(settings)
        .map_err(|e| TaskFailure::new(Code::AdvancedOptionFailed, e.to_string()))?;
    let mut excludes = st.excludes(sync);
    if sync {
        // ONLY_SYNC_PATH (ref. line 10371): a sync pass covers only those paths.
        excludes.extend(crate::fileplan::only_sync_excludes(&sources, &st.only_sync));
    }
    excludes.extend(cfg.exclude.iter().cloned());
    if let Some(s) = sources.iter().find(|s| !s.is_dir()) {
        return Err(TaskFailure::new(
            Code::MountPointNotFound,
            format!(
                "mount point {} of the task is not a directory here",
                s.display()
            ),
        ));
    }
    let for_used = sources.clone();
    let used_bytes = tokio::task::spawn_blocking(move || crate::fileplan::used_bytes(&for_used))
        .await
        .unwrap_or(0);
    let dirs = check_dirs(
        task.is_need_consistency_check,
        &st.consistency_dirs,
        &sources,
    );
    let check = (!dirs.is_empty() && !skip_check).then(|| transfer::file::CheckOptions {
        sources: sources.clone(),
        map_to_root: false,
        dirs,
        excludes: excludes.clone(),
        hash_mode: st.consistency_hash,
        task_id: task.id.clone(),
        peer_timeout: transfer::session::PEER_TIMEOUT,
    });
    // The source disks' layout, named as the task maps them to the target ECS's disks
    // (target_server.disks[].name → relation_name, ref. §5.4.5), for a receiver that
    // prepares blank disks.
    let rename: Vec<(String, String)> = ts
        .disks
        .iter()
        .filter_map(|d| d.relation_name.clone().map(|r| (d.name.clone(), r)))
        .collect();
    // It reads partition tables and superblocks: blocking I/O, off the runtime's threads.
    let read = tokio::task::spawn_blocking(move || {
        crate::disklayout::read_layout(std::path::Path::new("/"), &rename)
            .map(|(l, _)| l)
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let layout = match read {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::info!(task_id = %task.id, reason = %e, "no disk layout goes with the plan");
            None
        }
    };
    tracing::info!(task_id = %task.id, sources = ?sources, excludes = excludes.len(), used_bytes, check = check.is_some(), "file pass planned");
    Ok(FileJob {
        send: transfer::file::SendOptions {
            sources,
            map_to_root: false,
            base: None,
            layout,
            excludes,
            streams: cfg.streams.map_or(transfer::file::STREAMS, NonZeroU16::get),
            sync,
            hash_mode: false,
            task_id: task.id.clone(),
            peer_timeout: transfer::session::PEER_TIMEOUT,
            changes: None,
        },
        check,
        used_bytes,
        journal: None,
    })
}

#[cfg(test)]
mod tests {
    use super::check_dirs;
    use std::path::PathBuf;

    #[test]
    fn the_check_covers_consistency_dir_else_the_migrated_filesystems_when_asked() {
        let srcs = vec![PathBuf::from("/"), PathBuf::from("/srv")];
        let conf = vec![PathBuf::from("/etc")];
        assert_eq!(check_dirs(Some(true), &conf, &srcs), conf);
        assert_eq!(check_dirs(None, &conf, &srcs), conf);
        assert_eq!(check_dirs(Some(true), &[], &srcs), srcs);
        assert!(check_dirs(Some(false), &[], &srcs).is_empty());
        assert!(check_dirs(None, &[], &srcs).is_empty());
    }
}
