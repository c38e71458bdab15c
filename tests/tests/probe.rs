//! `sms-agent probe` against real loop-device disks: every field checked against what the tools
//! that made the disks report.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::path::Path;

use probe::model::{PhysicalVolume, ServerDisk};
use sms_tests::{blkid, make_vg, probe, run, size_of, statfs, unique, LoopDisk};

fn disk<'a>(body: &'a probe::model::PostSourceServerBody, d: &LoopDisk) -> &'a ServerDisk {
    body.disks
        .iter()
        .find(|x| x.name == d.path())
        .unwrap_or_else(|| panic!("{} not in the report", d.path()))
}

fn part(sd: &ServerDisk, n: u64) -> &PhysicalVolume {
    sd.physical_volumes
        .iter()
        .find(|p| p.index == n)
        .unwrap_or_else(|| panic!("partition {n} of {} not in the report", sd.name))
}

fn json(cmd: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&run(cmd, args)).unwrap()
}

/// The layout of `sfdisk --json`: (number, start bytes, size bytes).
fn sfdisk_layout(dev: &Path) -> Vec<(u64, u64, u64)> {
    let v = json("sfdisk", &["--json", dev.to_str().unwrap()]);
    let ss = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let node = p["node"].as_str().unwrap();
            let n: u64 = node.rsplit('p').next().unwrap().parse().unwrap();
            (
                n,
                p["start"].as_u64().unwrap() * ss,
                p["size"].as_u64().unwrap() * ss,
            )
        })
        .collect()
}

fn check_fs_fields(pv: &PhysicalVolume, node: &Path) {
    assert_eq!(pv.name, node.to_str().unwrap());
    assert_eq!(pv.size, size_of(node), "size of {}", pv.name);
    assert_eq!(pv.file_system, blkid(node, "TYPE"), "type of {}", pv.name);
    assert_eq!(pv.uuid, blkid(node, "UUID"), "uuid of {}", pv.name);
}

/// `Subvolume ID` of `btrfs subvolume show PATH`.
fn subvol_id(path: &str) -> String {
    run("btrfs", &["subvolume", "show", path])
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Subvolume ID:")
                .map(|v| v.trim().to_string())
        })
        .unwrap()
}

fn dumpe2fs(dev: &Path, key: &str) -> u64 {
    let out = run("dumpe2fs", &["-h", dev.to_str().unwrap()]);
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in dumpe2fs"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn gpt_disk_with_every_kind_of_volume() {
    let mut d = LoopDisk::new(1300);
    run(
        "sgdisk",
        &[
            "-o",
            "-n1:0:+64M",
            "-t1:EF00",
            "-n2:0:+100M",
            "-n3:0:+300M",
            "-n4:0:+200M",
            "-n5:0:+32M",
            "-t5:8200",
            "-n6:0:+100M",
            "-t6:8E00",
            d.path(),
        ],
    );
    d.add_partitions(&[1, 2, 3, 4, 5, 6]);
    let (esp, ext4, xfs, btr, swap, pv) = (
        d.part(1),
        d.part(2),
        d.part(3),
        d.part(4),
        d.part(5),
        d.part(6),
    );
    run("mkfs.vfat", &["-n", "ESP", esp.to_str().unwrap()]);
    run("mkfs.ext4", &["-q", "-L", "data", ext4.to_str().unwrap()]);
    run("mkfs.xfs", &["-q", "-L", "xf", xfs.to_str().unwrap()]);
    run("mkfs.btrfs", &["-q", "-L", "bt", btr.to_str().unwrap()]);
    run("mkswap", &["-q", "-L", "sw", swap.to_str().unwrap()]);
    let vg = unique("vgt-");
    make_vg(&vg, &[&pv], &[("root", 40), ("my-data", 20)]);
    d.own_vg(&vg);

    let m_ext = d.mount(&ext4, "ext4", None);
    let m_xfs = d.mount(&xfs, "xfs", None);
    let m_top = d.mount(&btr, "btrfs-top", None);
    std::fs::write(m_ext.join("file"), vec![7u8; 3 << 20]).unwrap();
    std::fs::write(m_xfs.join("file"), vec![9u8; 5 << 20]).unwrap();
    let top = m_top.to_str().unwrap();
    run("btrfs", &["-q", "subvolume", "create", &format!("{top}/@")]);
    run(
        "btrfs",
        &["-q", "subvolume", "create", &format!("{top}/@/home")],
    );
    run(
        "btrfs",
        &[
            "-q",
            "subvolume",
            "snapshot",
            &format!("{top}/@"),
            &format!("{top}/snap"),
        ],
    );
    let home_id = subvol_id(&format!("{top}/@/home"));
    let root_id = subvol_id(&format!("{top}/@"));
    run("btrfs", &["subvolume", "set-default", &root_id, top]);
    let m_home = d.mount(&btr, "btrfs-home", Some("subvol=@/home"));
    run("sync", &[]);

    let r = probe(&[&d.dev], &[]);
    let sd = disk(&r.body, &d);
    assert_eq!(sd.partition_style, "GPT");
    assert_eq!(sd.size, size_of(&d.dev));
    assert_eq!(sd.device_use, "NORMAL");
    assert!(!sd.os_disk);

    // Layout exactly as sfdisk reads it.
    let layout = sfdisk_layout(&d.dev);
    assert_eq!(layout.len(), sd.physical_volumes.len());
    for (n, _start, size) in &layout {
        assert_eq!(part(sd, *n).size, *size, "partition {n}");
    }
    assert_eq!(sd.used_size, layout.iter().map(|l| l.2).sum::<u64>());

    for n in 1..=6u32 {
        check_fs_fields(part(sd, u64::from(n)), &d.part(n));
    }
    // vfat
    let p = part(sd, 1);
    assert_eq!(
        (p.file_system.as_str(), p.device_use.as_str()),
        ("vfat", "NORMAL")
    );
    // ext4, mounted, with data
    let p = part(sd, 2);
    assert_eq!(p.mount_point, m_ext.to_str().unwrap());
    let used = (statfs(&m_ext, "%b") - statfs(&m_ext, "%f")) * statfs(&m_ext, "%S");
    assert_eq!(p.used_size, used);
    assert!(p.used_size >= 3 << 20);
    assert_eq!(p.inode_nums, statfs(&m_ext, "%c"));
    assert_eq!(p.inode_size, dumpe2fs(&ext4, "Inode size"));
    assert_eq!(p.size_per_cluster, statfs(&m_ext, "%S"));
    // xfs, mounted, with data
    let p = part(sd, 3);
    assert_eq!(p.mount_point, m_xfs.to_str().unwrap());
    let used = (statfs(&m_xfs, "%b") - statfs(&m_xfs, "%f")) * statfs(&m_xfs, "%S");
    assert_eq!(p.used_size, used);
    assert_eq!(p.inode_nums, statfs(&m_xfs, "%c"));
    let isize = run("xfs_info", &[m_xfs.to_str().unwrap()]);
    assert!(
        isize.contains(&format!("isize={}", p.inode_size)),
        "{isize}"
    );
    // btrfs member, swap and PV count as fully used.
    for (n, use_) in [(4, "BTRFS"), (5, "NORMAL"), (6, "VOLUME_GROUP")] {
        let p = part(sd, n);
        assert_eq!(p.device_use, use_, "partition {n}");
        assert_eq!(p.used_size, p.size, "partition {n}");
        assert_eq!(p.mount_point, "", "partition {n}");
    }

    // LVM, against LVM's own report.
    let v = r
        .body
        .volume_groups
        .iter()
        .find(|g| g.name == vg)
        .expect("VG reported");
    let vgs = json(
        "vgs",
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_size,vg_free",
            &vg,
        ],
    );
    let row = &vgs["report"][0]["vg"][0];
    assert_eq!(v.size.to_string(), row["vg_size"].as_str().unwrap());
    assert_eq!(v.free_size.to_string(), row["vg_free"].as_str().unwrap());
    assert_eq!(v.components, pv.to_str().unwrap());
    let lvs = json(
        "lvs",
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_name,lv_size,lv_dm_path",
            &vg,
        ],
    );
    let rows = lvs["report"][0]["lv"].as_array().unwrap();
    assert_eq!(v.logical_volumes.len(), 2);
    for row in rows {
        let dm = row["lv_dm_path"].as_str().unwrap();
        let lv = v
            .logical_volumes
            .iter()
            .find(|l| l.name == dm)
            .unwrap_or_else(|| panic!("{dm} missing"));
        assert_eq!(lv.size.to_string(), row["lv_size"].as_str().unwrap());
        // Inactive: nothing but LVM's numbers.
        assert_eq!((lv.file_system.as_str(), lv.mount_point.as_str()), ("", ""));
        assert_eq!(lv.used_size, lv.size);
    }
    assert!(v
        .logical_volumes
        .iter()
        .any(|l| l.name.ends_with("-my--data")));

    // Btrfs, against btrfs-progs.
    let uuid = blkid(&btr, "UUID");
    let b = r
        .body
        .btrfs_list
        .iter()
        .find(|b| b.uuid == uuid)
        .expect("btrfs reported");
    assert_eq!(b.label, "bt");
    assert_eq!(b.name, btr.to_str().unwrap());
    assert_eq!(b.device, btr.to_str().unwrap());
    let sup = run(
        "btrfs",
        &["inspect-internal", "dump-super", btr.to_str().unwrap()],
    );
    let sfield = |k: &str| -> u64 {
        sup.lines()
            .find_map(|l| l.strip_prefix(k).filter(|r| r.starts_with(['\t', ' '])))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(b.size, sfield("total_bytes"));
    assert_eq!(b.nodesize, sfield("nodesize"));
    assert_eq!(b.sectorsize, sfield("sectorsize"));
    assert_eq!(b.g_vol_used_size, sfield("bytes_used"));
    let df = run("btrfs", &["filesystem", "df", "-b", top]);
    let prof = |kind: &str| {
        df.lines()
            .find(|l| l.starts_with(kind))
            .and_then(|l| l.split([',', ':']).nth(1))
            .unwrap()
            .trim()
            .to_ascii_lowercase()
    };
    assert_eq!(b.data_profile, prof("Data"));
    assert_eq!(b.metadata_profile, prof("Metadata"));
    assert_eq!(b.system_profile, prof("System"));
    let reserve = df.lines().find(|l| l.starts_with("GlobalReserve")).unwrap();
    assert!(
        reserve.contains(&format!("total={}", b.global_reserve1)),
        "{reserve}"
    );
    assert_eq!(b.default_subvolid, root_id);
    assert_eq!(b.default_subvol_name, "@");
    let list = run("btrfs", &["subvolume", "list", "-a", "-u", top]);
    assert_eq!(b.subvolumn.len(), list.lines().count(), "{list}");
    for line in list.lines() {
        let id = line.split_whitespace().nth(1).unwrap();
        let s = b.subvolumn.iter().find(|s| s.subvol_id == id).unwrap();
        assert!(line.contains(&s.uuid), "{line}");
        assert!(
            line.ends_with(&s.subvol_name),
            "{line} vs {}",
            s.subvol_name
        );
    }
    let snaps = run("btrfs", &["subvolume", "list", "-s", top]);
    for s in &b.subvolumn {
        let is_snap = snaps
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&s.subvol_id));
        assert_eq!(s.is_snapshot, is_snap.to_string(), "{}", s.subvol_name);
    }
    let home = b.subvolumn.iter().find(|s| s.subvol_id == home_id).unwrap();
    assert_eq!(home.subvol_name, "@/home");
    assert_eq!(home.parent_id, root_id);
    assert_eq!(home.subvol_mount_path, m_home.to_str().unwrap());
    assert!(b
        .subvolumn
        .iter()
        .any(|s| s.subvol_name == "snap" && s.is_snapshot == "true"));
}

#[test]
fn mbr_disk_with_extended_and_logical_partitions() {
    let d = LoopDisk::new(200);
    let script = "label: dos\n,40M,83\n,20M,82\n,,5\n,30M,83\n,30M,83\n";
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", d.path()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    d.add_partitions(&[1, 2, 3, 5, 6]);
    run("mkfs.ext4", &["-q", d.part(1).to_str().unwrap()]);
    run("mkfs.ext2", &["-q", d.part(5).to_str().unwrap()]);
    run("mkfs.vfat", &[d.part(6).to_str().unwrap()]);

    let r = probe(&[&d.dev], &[]);
    let sd = disk(&r.body, &d);
    assert_eq!(sd.partition_style, "MBR");
    let numbers: Vec<u64> = sd.physical_volumes.iter().map(|p| p.index).collect();
    assert_eq!(
        numbers,
        vec![1, 2, 5, 6],
        "the extended container itself is not a volume"
    );
    for (n, _start, size) in sfdisk_layout(&d.dev) {
        if n == 3 {
            continue;
        }
        assert_eq!(part(sd, n).size, size, "partition {n}");
    }
    check_fs_fields(part(sd, 1), &d.part(1));
    check_fs_fields(part(sd, 5), &d.part(5));
    check_fs_fields(part(sd, 6), &d.part(6));
    // Unmounted ext: usage and inodes from the superblock.
    let p = part(sd, 5);
    let bs = dumpe2fs(&d.part(5), "Block size");
    let used = (dumpe2fs(&d.part(5), "Block count") - dumpe2fs(&d.part(5), "Free blocks")) * bs;
    assert_eq!(p.used_size, used);
    assert_eq!(p.inode_nums, dumpe2fs(&d.part(5), "Inode count"));
    assert_eq!(p.inode_size, dumpe2fs(&d.part(5), "Inode size"));
    assert_eq!(part(sd, 2).file_system, "");
}

#[test]
fn whole_disk_pv_and_whole_disk_filesystem() {
    let mut pv = LoopDisk::new(64);
    let fs = LoopDisk::new(64);
    let vg = unique("vgw-");
    make_vg(&vg, &[&pv.dev], &[("lv0", 8)]);
    pv.own_vg(&vg);
    run("mkfs.ext4", &["-q", "-L", "bare", fs.path()]);

    let r = probe(&[&pv.dev, &fs.dev], &[]);
    let sd = disk(&r.body, &pv);
    assert_eq!((sd.device_use.as_str(), sd.used_size), ("VOLUME_GROUP", 0));
    assert!(sd.physical_volumes.is_empty());
    let v = r
        .body
        .volume_groups
        .iter()
        .find(|g| g.name == vg)
        .expect("whole-disk VG reported");
    assert_eq!(v.components, pv.path());
    assert_eq!(
        v.logical_volumes[0].name,
        format!("/dev/mapper/{}-lv0", vg.replace('-', "--"))
    );

    let sd = disk(&r.body, &fs);
    assert_eq!(sd.physical_volumes.len(), 1);
    let p = &sd.physical_volumes[0];
    assert_eq!((p.name.as_str(), p.index), (fs.path(), 0));
    check_fs_fields(p, &fs.dev);
    assert_eq!(sd.used_size, sd.size);
}

#[test]
fn damaged_primary_gpt_is_read_from_the_backup() {
    let d = LoopDisk::new(64);
    run("sgdisk", &["-o", "-n1:0:+10M", "-n2:0:+20M", d.path()]);
    let before = sfdisk_layout(&d.dev);
    // Zero the primary header (LBA 1).
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", d.path()),
            "bs=512",
            "seek=1",
            "count=1",
            "conv=notrunc,fsync",
            "status=none",
        ],
    );
    let r = probe(&[&d.dev], &[]);
    let sd = disk(&r.body, &d);
    assert_eq!(sd.partition_style, "GPT");
    assert_eq!(sd.physical_volumes.len(), 2);
    for (n, _, size) in before {
        assert_eq!(part(sd, n).size, size);
    }
    let w = r
        .stderr
        .lines()
        .find(|l| l.contains(d.path()))
        .unwrap_or_else(|| panic!("no warning: {}", r.stderr));
    assert!(w.starts_with("warning: ") && w.contains("backup"), "{w}");
}

#[test]
fn corrupt_superblock_is_a_warning_and_the_rest_comes_out() {
    let d = LoopDisk::new(64);
    run("sgdisk", &["-o", "-n1:0:+20M", "-n2:0:+20M", d.path()]);
    d.add_partitions(&[1, 2]);
    run("mkfs.ext4", &["-q", d.part(1).to_str().unwrap()]);
    run("mkfs.ext4", &["-q", d.part(2).to_str().unwrap()]);
    // s_blocks_count (superblock offset 4) of partition 1 → far larger than the partition.
    let cmd = format!(
        "printf '\\377\\377\\377\\177' | dd of={} bs=1 seek=1028 conv=notrunc,fsync status=none",
        d.part(1).display()
    );
    assert!(std::process::Command::new("sh")
        .args(["-c", &cmd])
        .status()
        .unwrap()
        .success());
    let r = probe(&[&d.dev], &[]);
    let p1 = d.part(1);
    let w = r
        .stderr
        .lines()
        .find(|l| l.contains(p1.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no warning: {}", r.stderr));
    assert!(w.contains("corrupt"), "{w}");
    let sd = disk(&r.body, &d);
    assert_eq!(part(sd, 1).file_system, "");
    assert_eq!(part(sd, 1).used_size, part(sd, 1).size);
    assert_eq!(part(sd, 2).file_system, "ext4");
}

#[test]
fn mount_points_with_odd_characters_are_reported_exactly() {
    let mut d = LoopDisk::new(64);
    run("mkfs.ext4", &["-q", d.path()]);
    let dev = d.dev.clone();
    let mp = d.mount(&dev, "with space\tand tab\\and backslash", None);
    let r = probe(&[&d.dev], &[]);
    let sd = disk(&r.body, &d);
    assert_eq!(sd.physical_volumes[0].mount_point, mp.to_str().unwrap());
}

#[test]
fn only_named_loop_devices_are_reported_and_bad_names_warn() {
    let named = LoopDisk::new(16);
    let other = LoopDisk::new(16);
    let r = probe(
        &[
            &named.dev,
            Path::new("/nonexistent/disk"),
            Path::new("/etc/passwd"),
        ],
        &[],
    );
    assert!(r.body.disks.iter().any(|d| d.name == named.path()));
    assert!(
        !r.body.disks.iter().any(|d| d.name == other.path()),
        "unnamed loop device reported"
    );
    assert!(
        r.stderr.contains("warning: /nonexistent/disk: "),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("warning: /etc/passwd: is not a block device"),
        "{}",
        r.stderr
    );
    // Everything else is still there.
    assert_eq!(r.body.os_type, "LINUX");
    assert_eq!(r.body.start_type, "MANUAL");
}

#[test]
fn probing_changes_nothing_and_formats_agree() {
    let mut d = LoopDisk::new(400);
    run("sgdisk", &["-o", "-n1:0:+40M", "-n2:0:+320M", d.path()]);
    d.add_partitions(&[1, 2]);
    run("mkfs.ext4", &["-q", d.part(1).to_str().unwrap()]);
    run("mkfs.xfs", &["-q", d.part(2).to_str().unwrap()]);
    let p1 = d.part(1);
    d.mount(&p1, "m", None);
    run("sync", &[]);
    let mounts = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let (edges, m0) = (d.edges_digest(), mounts());
    let p1_digest = run("sha256sum", &[d.part(2).to_str().unwrap()]);

    let compact = probe(&[&d.dev], &[]);
    let pretty = probe(&[&d.dev], &["--pretty"]);
    let human = probe(&[&d.dev], &["--human"]);

    assert_eq!(d.edges_digest(), edges, "the probe changed the disk");
    assert_eq!(run("sha256sum", &[d.part(2).to_str().unwrap()]), p1_digest);
    assert_eq!(mounts(), m0, "the probe changed the mount table");
    assert!(pretty.stdout.contains("\n  \""), "--pretty is indented");
    let mut a = compact.body.clone();
    let mut b = pretty.body.clone();
    // Live usage of the root filesystem may move between runs; the rest must agree.
    for x in [&mut a, &mut b] {
        x.io_read_wait = 0.0;
        for disk in &mut x.disks {
            for p in &mut disk.physical_volumes {
                if !p.name.starts_with(d.path()) {
                    p.used_size = 0;
                    p.inode_nums = 0;
                }
            }
        }
    }
    assert_eq!(a, b);
    for n in ["p1", "p2"] {
        assert!(
            human.stdout.contains(&format!("{}{n}", d.path())),
            "{}",
            human.stdout
        );
    }
    assert!(human.stdout.contains("DISKS") && human.stdout.contains("NETWORKS"));
}

#[test]
fn host_fields_match_the_system() {
    let r = probe(&[], &["--name", "my-source"]);
    let b = &r.body;
    assert_eq!(b.name, "my-source");
    assert_eq!(b.hostname, run("hostname", &[]).trim());
    assert_eq!(b.kernel_version, run("uname", &["-r"]).trim());
    // The version the service's documented gate (SMS.7707, ≥ 25.2.0) accepts; README "Versions".
    assert_eq!(b.agent_version, sms_agent::api::REPORTED_AGENT_VERSION);
    assert_eq!(b.cpu_quantity.to_string(), run("nproc", &[]).trim());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(b.memory, kb * 1024);
    let check: serde_json::Value = serde_json::from_str(&b.linux_block_check).unwrap();
    assert_eq!(check["kernel_version"], b.kernel_version);
    for n in &b.networks {
        assert_eq!(n.mac.len(), 64);
        let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", n.name)).unwrap();
        use sha2::Digest;
        let want = format!(
            "{:x}",
            sha2::Sha256::digest(mac.trim().to_ascii_lowercase().as_bytes())
        );
        assert_eq!(n.mac, want);
    }
    let routes = run("ip", &["-j", "route", "show", "default"]);
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    if let Some(dev) = routes[0]["dev"].as_str() {
        let nic = b
            .networks
            .iter()
            .find(|n| n.name == dev)
            .expect("default-route NIC reported");
        assert_eq!(b.ip, nic.ip);
        assert_eq!(nic.gateway, routes[0]["gateway"].as_str().unwrap_or(""));
    }
    // The body is a valid registration body with the SDK's spellings.
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    for key in [
        "name",
        "os_type",
        "os_version",
        "networks",
        "agent_version",
        "btrfs_list",
        "volume_groups",
        "disks",
    ] {
        assert!(v.get(key).is_some(), "{key} missing");
    }
}
