//! The migrated system's `/etc/fstab` and `/etc/crypttab` against the filesystems the target
//! now has: specs that name what changed are rewritten to the new UUID, and a record that
//! names nothing the target has is refused (unless `noauto` or `nofail` say it may be missing).

/// A filesystem on the target: its UUID there, the source's UUID and label, its mount point.
#[derive(Debug, Clone)]
pub(super) struct Have {
    pub uuid: String,
    pub source_uuid: String,
    pub label: String,
    pub mount: String,
    pub swap: bool,
}

/// Filesystem types that name no block device.
const VIRTUAL: &[&str] = &[
    "proc",
    "sysfs",
    "tmpfs",
    "devpts",
    "devtmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "hugetlbfs",
    "mqueue",
    "configfs",
    "pstore",
    "bpf",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "fuse",
    "none",
    "overlay",
    "9p",
    "virtiofs",
    "autofs",
];

/// Which target filesystem `spec` names, if any.
fn resolve<'a>(spec: &str, mount: &str, have: &'a [Have]) -> Option<&'a Have> {
    let unquote = |s: &str| s.trim_matches('"').to_string();
    if let Some(u) = spec
        .strip_prefix("UUID=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-uuid/"))
    {
        let u = unquote(u);
        return have
            .iter()
            .find(|h| h.source_uuid.eq_ignore_ascii_case(&u) || h.uuid.eq_ignore_ascii_case(&u));
    }
    if let Some(l) = spec
        .strip_prefix("LABEL=")
        .or_else(|| spec.strip_prefix("/dev/disk/by-label/"))
    {
        let l = unquote(l);
        return have.iter().find(|h| !h.label.is_empty() && h.label == l);
    }
    // A device path or PARTUUID names a source device: the filesystem with the same mount
    // point (or the only swap area) is what it meant.
    if mount == "none" || mount == "swap" {
        let swaps: Vec<&Have> = have.iter().filter(|h| h.swap).collect();
        return (swaps.len() == 1).then(|| swaps[0]);
    }
    have.iter().find(|h| h.mount == mount)
}

/// Checks `/etc/fstab`'s text: the rewritten text when a record had to change, `Ok(None)` when
/// none did, or the record that names nothing the target has.
pub(super) fn check_fstab(text: &str, have: &[Have]) -> Result<Option<String>, String> {
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() || f[0].starts_with('#') || f.len() < 3 {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let (spec, mount, vfs) = (f[0], f[1], f[2]);
        let opts = f.get(3).copied().unwrap_or("defaults");
        let optional = opts
            .split(',')
            .any(|o| o == "noauto" || o == "nofail" || o == "bind");
        if VIRTUAL.contains(&vfs)
            || spec.contains(":/")
            || spec.starts_with("//")
            || opts.split(',').any(|o| o == "bind")
        {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        match resolve(spec, mount, have) {
            Some(h) => {
                let want = if spec.starts_with("LABEL=") && h.uuid == h.source_uuid {
                    spec.to_string()
                } else {
                    format!("UUID={}", h.uuid)
                };
                if want != spec {
                    changed = true;
                    out.push_str(&line.replacen(spec, &want, 1));
                } else {
                    out.push_str(line);
                }
            }
            None if optional => out.push_str(line),
            None => return Err(line.trim().to_string()),
        }
        out.push('\n');
    }
    Ok(changed.then_some(out))
}

/// Checks `/etc/crypttab`: every record that must open at boot names a device the target has.
/// `--prepare` creates no LUKS volumes, so such a record is refused.
pub(super) fn check_crypttab(text: &str, have: &[Have]) -> Result<(), String> {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 2 || f[0].starts_with('#') {
            continue;
        }
        let opts = f.get(3).copied().unwrap_or("");
        if opts.split(',').any(|o| o == "noauto" || o == "nofail") {
            continue;
        }
        if resolve(f[1], "\0", have).is_none() {
            return Err(line.trim().to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have() -> Vec<Have> {
        vec![
            Have {
                uuid: "aaaa".into(),
                source_uuid: "aaaa".into(),
                label: "root".into(),
                mount: "/".into(),
                swap: false,
            },
            Have {
                uuid: "bbbb-new".into(),
                source_uuid: "bbbb".into(),
                label: String::new(),
                mount: "/boot".into(),
                swap: false,
            },
            Have {
                uuid: "cccc".into(),
                source_uuid: "cccc".into(),
                label: String::new(),
                mount: String::new(),
                swap: true,
            },
        ]
    }

    #[test]
    fn unchanged_records_stay_and_changed_uuids_and_device_paths_are_rewritten() {
        let same = "# c\nUUID=aaaa / ext4 defaults 0 1\nproc /proc proc defaults 0 0\nUUID=cccc none swap sw 0 0\n";
        assert_eq!(check_fstab(same, &have()), Ok(None));
        let t = "UUID=bbbb /boot ext4 defaults 0 2\n/dev/sda3 / ext4 defaults 0 1\n/dev/sda2 none swap sw 0 0\nLABEL=root /x ext4 defaults 0 0\n";
        let got = check_fstab(t, &have()).unwrap().unwrap();
        assert_eq!(
            got,
            "UUID=bbbb-new /boot ext4 defaults 0 2\nUUID=aaaa / ext4 defaults 0 1\nUUID=cccc none swap sw 0 0\nLABEL=root /x ext4 defaults 0 0\n"
        );
    }

    #[test]
    fn a_record_naming_nothing_is_refused_unless_optional() {
        let t = "UUID=dead /data xfs defaults 0 0\n";
        assert_eq!(
            check_fstab(t, &have()),
            Err("UUID=dead /data xfs defaults 0 0".into())
        );
        assert_eq!(
            check_fstab("UUID=dead /data xfs nofail 0 0\n", &have()),
            Ok(None)
        );
        assert_eq!(
            check_fstab("srv:/export /mnt nfs defaults 0 0\n", &have()),
            Ok(None)
        );
        assert!(check_crypttab("luks UUID=dead none luks\n", &have()).is_err());
        assert!(check_crypttab("luks UUID=dead none luks,noauto\n# x\n", &have()).is_ok());
    }
}
