//! The inventory as a readable tree for people (`sms-agent probe --human`), like `lsblk`.

use std::fmt::Write;

use crate::model::PostSourceServerBody;

/// Formats `bytes` with a binary unit (`1.5 GiB`).
pub fn size(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    #[allow(clippy::cast_precision_loss)]
    let v = bytes as f64 / (1u64 << (10 * unit)) as f64;
    format!("{v:.1} {}", UNITS[unit])
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Lays out rows of cells in aligned columns, each row prefixed by its tree branch.
fn table(out: &mut String, rows: &[(String, Vec<String>)]) {
    let mut widths: Vec<usize> = Vec::new();
    for (prefix, cells) in rows {
        for (i, c) in cells.iter().enumerate() {
            let w = c.chars().count() + if i == 0 { prefix.chars().count() } else { 0 };
            if widths.len() <= i {
                widths.push(w);
            } else if widths[i] < w {
                widths[i] = w;
            }
        }
    }
    for (prefix, cells) in rows {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            let cell = if i == 0 {
                format!("{prefix}{c}")
            } else {
                c.clone()
            };
            let pad = widths[i].saturating_sub(cell.chars().count());
            line.push_str(&cell);
            if i + 1 < cells.len() {
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn branch(i: usize, n: usize) -> String {
    if i + 1 == n {
        "└─".to_string()
    } else {
        "├─".to_string()
    }
}

/// Renders the whole body as text.
pub fn render(b: &PostSourceServerBody) -> String {
    let mut out = String::new();
    host(&mut out, b);
    disks(&mut out, b);
    volume_groups(&mut out, b);
    btrfs(&mut out, b);
    networks(&mut out, b);
    out
}

/// The host's two summary lines.
fn host(out: &mut String, b: &PostSourceServerBody) {
    let _ = writeln!(
        out,
        "{} (hostname {}), {} {}, kernel {}, {}/{}, platform {} {}{}",
        b.name,
        b.hostname,
        b.os_type,
        b.os_version,
        b.kernel_version,
        b.firmware,
        b.boot_loader,
        b.platform,
        b.virtualization_type,
        if b.paravirtualization {
            " (Xen PV)"
        } else {
            ""
        },
    );
    let _ = writeln!(
        out,
        "{} CPUs, {} memory, ip {}, rsync {}, tc {}, io read wait {:.2} ms, raw devices {}",
        b.cpu_quantity,
        size(b.memory),
        or_dash(&b.ip),
        if b.has_rsync { "yes" } else { "no" },
        if b.has_tc { "yes" } else { "no" },
        b.io_read_wait,
        or_dash(&b.raw_devices),
    );
}

/// Disks and their partitions as a tree.
fn disks(out: &mut String, b: &PostSourceServerBody) {
    let _ = writeln!(out, "\nDISKS");
    let mut rows = vec![(
        String::new(),
        [
            "NAME", "SIZE", "TYPE", "USE", "FSTYPE", "USED", "MOUNT", "UUID",
        ]
        .map(String::from)
        .to_vec(),
    )];
    for d in &b.disks {
        rows.push((
            String::new(),
            vec![
                d.name.clone(),
                size(d.size),
                or_dash(&d.partition_style).to_string(),
                format!("{}{}", d.device_use, if d.os_disk { "*" } else { "" }),
                String::new(),
                size(d.used_size),
                String::new(),
                String::new(),
            ],
        ));
        let n = d.physical_volumes.len();
        for (i, p) in d.physical_volumes.iter().enumerate() {
            rows.push((
                branch(i, n),
                vec![
                    p.name.clone(),
                    size(p.size),
                    "part".to_string(),
                    p.device_use.clone(),
                    or_dash(&p.file_system).to_string(),
                    size(p.used_size),
                    or_dash(&p.mount_point).to_string(),
                    or_dash(&p.uuid).to_string(),
                ],
            ));
        }
    }
    table(out, &rows);
}

/// LVM volume groups and their logical volumes, when there are any.
fn volume_groups(out: &mut String, b: &PostSourceServerBody) {
    if !b.volume_groups.is_empty() {
        let _ = writeln!(out, "\nVOLUME GROUPS");
        let mut rows = vec![(
            String::new(),
            [
                "NAME", "SIZE", "FREE", "USE", "FSTYPE", "USED", "MOUNT", "PVS",
            ]
            .map(String::from)
            .to_vec(),
        )];
        for vg in &b.volume_groups {
            rows.push((
                String::new(),
                vec![
                    vg.name.clone(),
                    size(vg.size),
                    size(vg.free_size),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    vg.components.clone(),
                ],
            ));
            let n = vg.logical_volumes.len();
            for (i, lv) in vg.logical_volumes.iter().enumerate() {
                rows.push((
                    branch(i, n),
                    vec![
                        lv.name.clone(),
                        size(lv.size),
                        size(lv.free_size),
                        lv.device_use.clone(),
                        or_dash(&lv.file_system).to_string(),
                        size(lv.used_size),
                        or_dash(&lv.mount_point).to_string(),
                        String::new(),
                    ],
                ));
            }
        }
        table(out, &rows);
    }
}

/// Each Btrfs filesystem's summary and subvolumes.
fn btrfs(out: &mut String, b: &PostSourceServerBody) {
    for fs in &b.btrfs_list {
        let _ = writeln!(
            out,
            "\nBTRFS {} label {} on {}: {} used of {}, data/metadata/system {}/{}/{}, default subvolume {} {}",
            fs.uuid,
            or_dash(&fs.label),
            fs.device,
            size(fs.g_vol_used_size),
            size(fs.size),
            or_dash(&fs.data_profile),
            or_dash(&fs.metadata_profile),
            or_dash(&fs.system_profile),
            fs.default_subvolid,
            or_dash(&fs.default_subvol_name),
        );
        let mut rows = vec![(
            String::new(),
            ["ID", "PARENT", "SNAPSHOT", "PATH", "MOUNT"]
                .map(String::from)
                .to_vec(),
        )];
        let n = fs.subvolumn.len();
        for (i, s) in fs.subvolumn.iter().enumerate() {
            rows.push((
                branch(i, n),
                vec![
                    s.subvol_id.clone(),
                    s.parent_id.clone(),
                    s.is_snapshot.clone(),
                    s.subvol_name.clone(),
                    or_dash(&s.subvol_mount_path).to_string(),
                ],
            ));
        }
        if n > 0 {
            table(out, &rows);
        }
    }
}

/// The network interfaces.
fn networks(out: &mut String, b: &PostSourceServerBody) {
    let _ = writeln!(out, "\nNETWORKS");
    let mut rows = vec![(
        String::new(),
        ["NAME", "IPV4", "NETMASK", "GATEWAY", "IPV6", "MTU"]
            .map(String::from)
            .to_vec(),
    )];
    for n in &b.networks {
        rows.push((
            String::new(),
            vec![
                n.name.clone(),
                or_dash(&n.ip).to_string(),
                or_dash(&n.netmask).to_string(),
                or_dash(&n.gateway).to_string(),
                or_dash(n.ipv6.as_deref().unwrap_or("")).to_string(),
                n.mtu.to_string(),
            ],
        ));
    }
    table(out, &rows);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PhysicalVolume, ServerDisk};

    #[test]
    fn sizes() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(42_949_672_960), "40.0 GiB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn renders_a_tree() {
        let b = PostSourceServerBody {
            name: "web01".into(),
            disks: vec![ServerDisk {
                name: "/dev/vda".into(),
                size: 1 << 30,
                physical_volumes: vec![
                    PhysicalVolume {
                        name: "/dev/vda1".into(),
                        mount_point: "/my mnt".into(),
                        ..Default::default()
                    },
                    PhysicalVolume {
                        name: "/dev/vda2".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&b);
        assert!(text.contains("├─/dev/vda1"), "{text}");
        assert!(text.contains("└─/dev/vda2"), "{text}");
        assert!(text.contains("/my mnt"), "{text}");
    }
}
