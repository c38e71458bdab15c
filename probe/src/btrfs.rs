//! Btrfs filesystems: superblock facts for every filesystem, plus profiles, usage and
//! subvolumes from sysfs and `btrfs subvolume list` when it is mounted.

use std::fs;
use std::path::Path;

use crate::fsdetect::BtrfsSuper;
use crate::model::{BtrfsFileSystem, BtrfsSubvolumn};
use crate::mounts::MountEntry;
use crate::tools;
use crate::warn::Warnings;

/// Block group profile names as sysfs spells them (fs/btrfs/sysfs.c, `btrfs_raid_array`).
const PROFILES: &[&str] = &[
    "single", "dup", "raid0", "raid1", "raid10", "raid5", "raid6", "raid1c3", "raid1c4",
];

/// Id of the top-level subvolume (`BTRFS_FS_TREE_OBJECTID`).
const FS_TREE_ID: &str = "5";

/// One member device of a Btrfs filesystem, as found by the disk scan.
#[derive(Debug, Clone)]
pub struct Member {
    /// Device path (`/dev/vda2`).
    pub device: String,
    /// Its superblock.
    pub sb: BtrfsSuper,
    /// Every mount of this device (one per mounted subvolume).
    pub mounts: Vec<MountEntry>,
}

/// Groups members by filesystem UUID and describes each filesystem.
pub fn filesystems(
    root: &Path,
    members: &[Member],
    warnings: &mut Warnings,
) -> Vec<BtrfsFileSystem> {
    let mut fsids: Vec<&str> = Vec::new();
    for m in members {
        if !fsids.contains(&m.sb.fsid.as_str()) {
            fsids.push(&m.sb.fsid);
        }
    }
    fsids
        .into_iter()
        .map(|fsid| {
            let group: Vec<&Member> = members.iter().filter(|m| m.sb.fsid == fsid).collect();
            describe(root, &group, warnings)
        })
        .collect()
}

fn describe(root: &Path, group: &[&Member], warnings: &mut Warnings) -> BtrfsFileSystem {
    let first = group[0];
    let sb = &first.sb;
    let mut mounts: Vec<&MountEntry> = Vec::new();
    for m in group.iter().flat_map(|m| m.mounts.iter()) {
        if !mounts.iter().any(|x| x.mount_point == m.mount_point) {
            mounts.push(m);
        }
    }
    let mut fs = BtrfsFileSystem {
        name: first.device.clone(),
        label: sb.label.clone(),
        uuid: sb.fsid.clone(),
        device: group
            .iter()
            .map(|m| m.device.as_str())
            .collect::<Vec<_>>()
            .join(";"),
        size: sb.total_bytes,
        nodesize: u64::from(sb.nodesize),
        sectorsize: u64::from(sb.sectorsize),
        system_profile: sb.system_profile.clone().unwrap_or_default(),
        g_vol_used_size: sb.bytes_used,
        default_subvolid: FS_TREE_ID.to_string(),
        ..Default::default()
    };
    if let Some(m) = mounts
        .iter()
        .find(|m| m.super_option("subvolid") == Some(FS_TREE_ID))
    {
        fs.default_subvol_mountpath = m.mount_point.clone();
    }
    if mounts.is_empty() {
        if group.len() as u64 != sb.num_devices {
            warnings.push(
                first.device.clone(),
                format!(
                    "Btrfs {} has {} devices but only {} were found",
                    sb.fsid,
                    sb.num_devices,
                    group.len()
                ),
            );
        }
        return fs;
    }
    // Live numbers from the mounted filesystem beat a superblock that may lag a commit.
    let alloc = root.join(format!("sys/fs/btrfs/{}/allocation", sb.fsid));
    if alloc.is_dir() {
        fs.data_profile = profile_of(&alloc.join("data"));
        fs.metadata_profile = profile_of(&alloc.join("metadata"));
        let sys = profile_of(&alloc.join("system"));
        if !sys.is_empty() {
            fs.system_profile = sys;
        }
        if let Some(r) = read_u64(&alloc.join("global_rsv_size")) {
            fs.global_reserve1 = r.to_string();
        }
        let used: Option<u64> = ["data", "metadata", "system"]
            .iter()
            .map(|k| read_u64(&alloc.join(k).join("bytes_used")))
            .sum();
        if let Some(u) = used {
            fs.g_vol_used_size = u;
        }
    } else {
        warnings.push(
            alloc.display().to_string(),
            "missing although the filesystem is mounted; profiles not reported",
        );
    }
    match subvolumes(&mounts) {
        Ok((subs, default)) => {
            if let Some((id, name)) = default {
                fs.default_subvol_mountpath = subvol_mount(&mounts, &id);
                fs.default_subvolid = id;
                fs.default_subvol_name = name;
            }
            fs.subvolumn = subs;
        }
        Err(e) => warnings.push(
            first.device.clone(),
            format!("Btrfs subvolumes not listed: {e}"),
        ),
    }
    fs
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The profile of a space-info directory: the name of its profile subdirectory.
fn profile_of(dir: &Path) -> String {
    let Ok(entries) = fs::read_dir(dir) else {
        return String::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| PROFILES.contains(&n.as_str()))
        .collect();
    found.sort();
    // Two profiles at once means a balance converting between them is under way.
    found.join(",")
}

/// Where subvolume `id` is mounted, or "".
fn subvol_mount(mounts: &[&MountEntry], id: &str) -> String {
    mounts
        .iter()
        .find(|m| m.super_option("subvolid") == Some(id))
        .map(|m| m.mount_point.clone())
        .unwrap_or_default()
}

type DefaultSubvol = Option<(String, String)>;

fn subvolumes(mounts: &[&MountEntry]) -> Result<(Vec<BtrfsSubvolumn>, DefaultSubvol), String> {
    // Any mount reaches the whole tree with `-a`; paths it prints without `<FS_TREE>/` are
    // relative to the subvolume mounted there, so note which one that is.
    let m = mounts
        .iter()
        .find(|m| m.super_option("subvolid") == Some(FS_TREE_ID))
        .or_else(|| mounts.first())
        .ok_or("not mounted")?;
    let base = m.root.trim_matches('/').to_string();
    let mp = m.mount_point.as_str();
    let all = tools::run("btrfs", &["subvolume", "list", "-a", "-u", "-q", "-p", mp])
        .map_err(|e| e.to_string())?;
    let snaps =
        tools::run("btrfs", &["subvolume", "list", "-a", "-s", mp]).map_err(|e| e.to_string())?;
    let snap_ids: Vec<String> = snaps.lines().filter_map(|l| field(l, "ID")).collect();
    let mut subs = Vec::new();
    for line in all.lines().filter(|l| !l.trim().is_empty()) {
        let parsed = parse_list_line(line, &base)
            .ok_or_else(|| format!("unexpected `btrfs subvolume list` line {line:?}"))?;
        let is_snap = snap_ids.contains(&parsed.id);
        subs.push(BtrfsSubvolumn {
            subvol_mount_path: subvol_mount(mounts, &parsed.id),
            uuid: parsed.uuid,
            is_snapshot: is_snap.to_string(),
            subvol_id: parsed.id,
            parent_id: parsed.parent,
            subvol_name: parsed.path,
        });
    }
    let default =
        tools::run("btrfs", &["subvolume", "get-default", mp]).map_err(|e| e.to_string())?;
    let default = field(&default, "ID").map(|id| {
        let name = subs
            .iter()
            .find(|s| s.subvol_id == id)
            .map(|s| s.subvol_name.clone())
            .unwrap_or_default();
        (id, name)
    });
    Ok((subs, default))
}

/// One parsed line of `btrfs subvolume list -a -u -q -p`.
#[derive(Debug, PartialEq, Eq)]
struct ListLine {
    id: String,
    parent: String,
    uuid: String,
    path: String,
}

/// The word after `key` in a `key value key value … path P` line.
fn field(line: &str, key: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next().map(str::to_string);
        }
    }
    None
}

fn parse_list_line(line: &str, base: &str) -> Option<ListLine> {
    // The path is last and may contain spaces, so split it off at the first " path ".
    let (head, path) = line.split_once(" path ")?;
    let path = match path.strip_prefix("<FS_TREE>/") {
        Some(abs) => abs.to_string(),
        None if base.is_empty() => path.to_string(),
        None => format!("{base}/{path}"),
    };
    Some(ListLine {
        id: field(head, "ID")?,
        parent: field(head, "parent")?,
        uuid: field(head, "uuid")?,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_list_lines() {
        let l = "ID 257 gen 7 parent 256 top level 256 parent_uuid -                                    uuid 08f445b2-3bd3-e64a-adb5-c1b9a3c89633 path <FS_TREE>/sub1/d/nested";
        let p = parse_list_line(l, "").unwrap();
        assert_eq!(p.id, "257");
        assert_eq!(p.parent, "256");
        assert_eq!(p.uuid, "08f445b2-3bd3-e64a-adb5-c1b9a3c89633");
        assert_eq!(p.path, "sub1/d/nested");
        let l = "ID 258 gen 7 parent 5 top level 5 parent_uuid 20f0ce0f-f939-7d47-bb34-c7eb5cd4f96c uuid 7cc5 path my snap";
        let p = parse_list_line(l, "").unwrap();
        assert_eq!(p.path, "my snap");
        let p = parse_list_line(
            "ID 300 gen 1 parent 256 top level 256 parent_uuid - uuid u path x",
            "@",
        )
        .unwrap();
        assert_eq!(p.path, "@/x");
        assert!(parse_list_line("garbage", "").is_none());
        assert!(parse_list_line("ID 1 path x", "").is_none());
    }

    #[test]
    fn default_line() {
        assert_eq!(field("ID 5 (FS_TREE)", "ID").as_deref(), Some("5"));
        assert_eq!(
            field("ID 256 gen 7 top level 5 path sub1", "ID").as_deref(),
            Some("256")
        );
    }
}
