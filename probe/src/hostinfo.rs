//! Host facts for registration: OS release, kernel, firmware, boot loader, tools, platform,
//! virtualization, CPUs, memory and read latency. Every file is read under a root path so tests
//! can hand in a fake `/proc`, `/sys` and `/etc`.

use std::fs;
use std::path::Path;

use crate::warn::Warnings;

/// What the host is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostFacts {
    /// Kernel host name.
    pub hostname: String,
    /// `CENTOS_7_4_64BIT` style release.
    pub os_version: String,
    /// JSON string for the block-migration compatibility check.
    pub linux_block_check: String,
    /// `uname -r`.
    pub kernel_version: String,
    /// `BIOS` or `UEFI`.
    pub firmware: String,
    /// `GRUB` or `LILO`.
    pub boot_loader: String,
    /// rsync installed.
    pub has_rsync: bool,
    /// tc installed.
    pub has_tc: bool,
    /// Raw devices, `;`-joined.
    pub raw_devices: String,
    /// Mean read latency, ms.
    pub io_read_wait: f64,
    /// Platform from DMI.
    pub platform: String,
    /// `HVM` or `PV`.
    pub virtualization_type: String,
    /// Xen PV guest.
    pub paravirtualization: bool,
    /// Online CPUs.
    pub cpu_quantity: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Machine architecture (`x86_64`, `aarch64`).
    pub arch: String,
}

fn read(root: &Path, rel: &str) -> Option<String> {
    fs::read_to_string(root.join(rel)).ok()
}

fn read_trim(root: &Path, rel: &str) -> Option<String> {
    read(root, rel).map(|s| s.trim().to_string())
}

/// Collects the host facts.
pub fn host_facts(root: &Path, w: &mut Warnings) -> HostFacts {
    let hostname = read_trim(root, "proc/sys/kernel/hostname").unwrap_or_else(|| {
        w.push(
            "/proc/sys/kernel/hostname",
            "unreadable; hostname reported empty",
        );
        String::new()
    });
    let kernel = read_trim(root, "proc/sys/kernel/osrelease").unwrap_or_else(|| {
        w.push(
            "/proc/sys/kernel/osrelease",
            "unreadable; kernel version reported empty",
        );
        String::new()
    });
    let arch = nix::sys::utsname::uname()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "x86_64".to_string());
    let release = os_release(root);
    if release.id.is_empty() {
        w.push(
            "/etc/os-release",
            "no os-release or legacy release file; OS reported as LINUX_OTHER",
        );
    }
    let os_version = sms_os_version(&release, &arch);
    let linux_block_check = block_check(&release, &kernel, &arch);
    let platform = match dmi(root) {
        Some(d) => platform(&d).to_string(),
        None => {
            w.push(
                "DMI",
                "/sys/class/dmi/id is missing or unreadable; platform reported as other",
            );
            "other".to_string()
        }
    };
    let pv = xen_pv(root);
    let cpu_quantity = cpus(root).unwrap_or_else(|| {
        w.push(
            "/sys/devices/system/cpu/online",
            "unreadable; CPU count reported as 1",
        );
        1
    });
    let memory = read(root, "proc/meminfo")
        .and_then(|m| meminfo_bytes(&m))
        .unwrap_or_else(|| {
            w.push("/proc/meminfo", "no MemTotal; memory reported as 0");
            0
        });
    HostFacts {
        hostname,
        os_version,
        linux_block_check,
        kernel_version: kernel,
        firmware: if root.join("sys/firmware/efi").exists() {
            "UEFI"
        } else {
            "BIOS"
        }
        .to_string(),
        boot_loader: boot_loader(root).to_string(),
        has_rsync: has_tool(root, "rsync"),
        has_tc: has_tool(root, "tc"),
        raw_devices: raw_devices(root),
        io_read_wait: read(root, "proc/diskstats").map_or(0.0, |d| read_wait_ms(&d)),
        platform,
        virtualization_type: if pv { "PV" } else { "HVM" }.to_string(),
        paravirtualization: pv,
        cpu_quantity,
        memory,
        arch,
    }
}

/// The release as os-release or legacy files describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Release {
    /// Lowercase distribution id (`centos`, `rhel`, `sles`, `ubuntu`).
    pub id: String,
    /// Full version (`7.4.1708`, `12.2`, `22.04`).
    pub version: String,
}

/// Reads the release from `etc/os-release` and the legacy files that carry more precision.
pub fn os_release(root: &Path) -> Release {
    let mut r = read(root, "etc/os-release")
        .or_else(|| read(root, "usr/lib/os-release"))
        .map(|t| parse_os_release(&t))
        .unwrap_or_default();
    // Legacy files carry the minor (CentOS `7.4.1708`, Debian `12.5`) that os-release lacks,
    // and are the only source on CentOS 6 and SLES 11.
    for (file, id) in [
        ("etc/centos-release", "centos"),
        ("etc/redhat-release", "rhel"),
        ("etc/SuSE-release", "sles"),
        ("etc/debian_version", "debian"),
    ] {
        let Some(text) = read(root, file) else {
            continue;
        };
        if r.id.is_empty() || r.id == id || (file == "etc/redhat-release" && r.id == "centos") {
            let v = legacy_version(file, &text);
            if r.id.is_empty() {
                r.id = if file == "etc/redhat-release" && text.contains("CentOS") {
                    "centos".into()
                } else {
                    id.into()
                };
            }
            if v.len() > r.version.len() && v.starts_with(r.version.split('.').next().unwrap_or(""))
            {
                r.version = v;
            }
            break;
        }
    }
    r
}

/// Parses `KEY="value"` lines of os-release(5).
pub fn parse_os_release(text: &str) -> Release {
    let mut r = Release::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k.trim() {
            "ID" => r.id = v.to_ascii_lowercase(),
            "VERSION_ID" => r.version = v,
            _ => {}
        }
    }
    r
}

fn legacy_version(file: &str, text: &str) -> String {
    if file == "etc/SuSE-release" {
        let get = |k: &str| {
            text.lines().find_map(|l| {
                l.split_once('=')
                    .filter(|(a, _)| a.trim() == k)
                    .map(|(_, b)| b.trim().to_string())
            })
        };
        return match (get("VERSION"), get("PATCHLEVEL")) {
            (Some(v), Some(p)) => format!("{v}.{p}"),
            (Some(v), None) => v,
            _ => String::new(),
        };
    }
    // "CentOS Linux release 7.4.1708 (Core)", "Red Hat Enterprise Linux Server release 6.5 (Santiago)", "12.5"
    text.split_whitespace()
        .find(|w| {
            w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.')
                || w.chars().all(|c| c.is_ascii_digit()) && !w.is_empty()
        })
        .unwrap_or("")
        .to_string()
}

/// SMS's release spelling (reference examples: `CENTOS_7_4_64BIT`, `REDHAT_7_3_64BIT`,
/// `UBUNTU_18_4_64BIT`, `SUSE12_64BIT_SP2`).
pub fn sms_os_version(r: &Release, arch: &str) -> String {
    let bits = if matches!(arch, "i386" | "i486" | "i586" | "i686" | "armv7l") {
        "32BIT"
    } else {
        "64BIT"
    };
    let mut parts = r
        .version
        .split('.')
        .map(|p| p.trim_start_matches('0'))
        .map(|p| if p.is_empty() { "0" } else { p });
    let major = parts.next().unwrap_or("0").to_string();
    let minor = parts.next().unwrap_or("0").to_string();
    let name = match r.id.as_str() {
        "centos" => "CENTOS",
        "rhel" | "redhat" => "REDHAT",
        "ubuntu" => "UBUNTU",
        "debian" => "DEBIAN",
        "sles" | "sled" | "suse" => {
            return if minor == "0" {
                format!("SUSE{major}_{bits}")
            } else {
                format!("SUSE{major}_{bits}_SP{minor}")
            };
        }
        "opensuse-leap" | "opensuse" => "OPENSUSE",
        "ol" | "oracle" => "ORACLE",
        "rocky" => "ROCKY",
        "almalinux" => "ALMALINUX",
        "fedora" => "FEDORA",
        "amzn" => "AMAZON",
        "alinux" => "ALIYUN",
        "openeuler" => "OPENEULER",
        "euleros" => "EULEROS",
        "kylin" => "KYLIN",
        "" => return format!("LINUX_OTHER_{bits}"),
        other => {
            let up: String = other
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            return format!("{up}_{major}_{minor}_{bits}");
        }
    };
    format!("{name}_{major}_{minor}_{bits}")
}

/// The `linux_block_check` JSON string, spaced exactly as the reference's example.
pub fn block_check(r: &Release, kernel: &str, arch: &str) -> String {
    let release_type = sms_os_version(r, arch)
        .split(|c: char| c == '_' || c.is_ascii_digit())
        .next()
        .unwrap_or("")
        .to_string();
    let simple = kernel.split('-').next().unwrap_or(kernel);
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
    format!(
        "{{\"release_type\": {}, \"release_version\": {}, \"kernel_simplification\": {}, \"architecture\": {}, \"kernel_version\": {}}}",
        q(&release_type),
        q(&r.version),
        q(simple),
        q(arch),
        q(kernel)
    )
}

fn boot_loader(root: &Path) -> &'static str {
    let grub = [
        "boot/grub/grub.cfg",
        "boot/grub2/grub.cfg",
        "boot/grub/menu.lst",
        "boot/grub/grub.conf",
        "etc/default/grub",
    ]
    .iter()
    .any(|p| root.join(p).exists());
    if !grub && root.join("etc/lilo.conf").exists() {
        "LILO"
    } else {
        "GRUB"
    }
}

/// Standard locations of system binaries.
const BIN_DIRS: &[&str] = &[
    "usr/bin",
    "bin",
    "usr/sbin",
    "sbin",
    "usr/local/bin",
    "usr/local/sbin",
];

fn has_tool(root: &Path, name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    BIN_DIRS.iter().any(|d| {
        fs::metadata(root.join(d).join(name))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn raw_devices(root: &Path) -> String {
    let Ok(entries) = fs::read_dir(root.join("dev/raw")) else {
        return String::new();
    };
    let mut v: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("raw") && n != "rawctl")
        .map(|n| format!("/dev/raw/{n}"))
        .collect();
    v.sort();
    v.join(";")
}

/// Milliseconds per completed read over whole disks in `/proc/diskstats`.
pub fn read_wait_ms(diskstats: &str) -> f64 {
    let (mut reads, mut ms) = (0u64, 0u64);
    for line in diskstats.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(r), Some(t)) = (f.get(2), f.get(3), f.get(6)) else {
            continue;
        };
        // Partitions, loop, ram, zram and device-mapper nodes would count reads twice or not
        // measure a disk at all.
        // `nvme0n1` and `mmcblk0` end in a digit but are whole disks; their partitions have `p`.
        let numbered_disk =
            (name.starts_with("nvme") || name.starts_with("mmcblk")) && !name.contains('p');
        let partition = name.ends_with(|c: char| c.is_ascii_digit()) && !numbered_disk;
        if partition
            || ["loop", "ram", "zram", "dm-", "sr", "md"]
                .iter()
                .any(|p| name.starts_with(p))
        {
            continue;
        }
        reads += r.parse::<u64>().unwrap_or(0);
        ms += t.parse::<u64>().unwrap_or(0);
    }
    if reads == 0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)]
    let v = ms as f64 / reads as f64;
    (v * 100.0).round() / 100.0
}

/// DMI identification strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dmi {
    /// `sys_vendor`.
    pub sys_vendor: String,
    /// `product_name`.
    pub product_name: String,
    /// `product_version`.
    pub product_version: String,
    /// `bios_vendor`.
    pub bios_vendor: String,
    /// `chassis_asset_tag`.
    pub chassis_asset_tag: String,
}

fn dmi(root: &Path) -> Option<Dmi> {
    let dir = "sys/class/dmi/id";
    if !root.join(dir).is_dir() {
        return None;
    }
    let f = |n: &str| read_trim(root, &format!("{dir}/{n}")).unwrap_or_default();
    Some(Dmi {
        sys_vendor: f("sys_vendor"),
        product_name: f("product_name"),
        product_version: f("product_version"),
        bios_vendor: f("bios_vendor"),
        chassis_asset_tag: f("chassis_asset_tag"),
    })
}

/// The chassis asset tag every Azure VM carries (Azure docs, "Detect if running in Azure").
const AZURE_ASSET_TAG: &str = "7783-7084-3265-9085-8269-3286-77";

/// Cloud or hypervisor from DMI strings, as each vendor documents its guests' SMBIOS.
pub fn platform(d: &Dmi) -> &'static str {
    let all = format!(
        "{} {} {} {}",
        d.sys_vendor, d.product_name, d.product_version, d.bios_vendor
    )
    .to_ascii_lowercase();
    if d.chassis_asset_tag == AZURE_ASSET_TAG {
        "azure"
    } else if all.contains("huawei") || all.contains("openstack") {
        // Huawei Cloud ECS report "OpenStack Foundation"/"OpenStack Nova" or "HUAWEICLOUD".
        "hw"
    } else if all.contains("alibaba") {
        "ali"
    } else if all.contains("amazon") {
        // Nitro: sys_vendor "Amazon EC2"; Xen-based: bios_vendor/product_version "amazon".
        "aws"
    } else if all.contains("google") {
        "gcp"
    } else if all.contains("tencent") {
        "tencent"
    } else if all.contains("vmware") {
        "vmware"
    } else if all.contains("microsoft") && all.contains("virtual machine") {
        "hyperv"
    } else {
        "other"
    }
}

/// A Xen PV guest: the hypervisor is Xen and the guest type is PV (no DMI, no HVM devices).
fn xen_pv(root: &Path) -> bool {
    if read_trim(root, "sys/hypervisor/type").as_deref() != Some("xen") {
        return false;
    }
    match read_trim(root, "sys/hypervisor/guest_type") {
        Some(t) => t == "PV",
        None => !root.join("sys/class/dmi/id").exists(),
    }
}

/// Counts CPUs in a `0-3,8,10-11` list.
pub fn count_cpu_list(s: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
            }
            None => {
                part.parse::<u32>().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    (n > 0).then_some(n)
}

fn cpus(root: &Path) -> Option<u32> {
    read(root, "sys/devices/system/cpu/online")
        .and_then(|s| count_cpu_list(&s))
        .or_else(|| {
            let n = read(root, "proc/cpuinfo")?
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count();
            u32::try_from(n).ok().filter(|n| *n > 0)
        })
}

/// `MemTotal` of /proc/meminfo in bytes.
pub fn meminfo_bytes(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(id: &str, v: &str) -> Release {
        Release {
            id: id.into(),
            version: v.into(),
        }
    }

    #[test]
    fn os_versions_in_sms_spelling() {
        assert_eq!(
            sms_os_version(&rel("centos", "7.4.1708"), "x86_64"),
            "CENTOS_7_4_64BIT"
        );
        assert_eq!(
            sms_os_version(&rel("rhel", "7.3"), "x86_64"),
            "REDHAT_7_3_64BIT"
        );
        assert_eq!(
            sms_os_version(&rel("ubuntu", "18.04"), "x86_64"),
            "UBUNTU_18_4_64BIT"
        );
        assert_eq!(
            sms_os_version(&rel("sles", "12.2"), "x86_64"),
            "SUSE12_64BIT_SP2"
        );
        assert_eq!(
            sms_os_version(&rel("debian", "12"), "x86_64"),
            "DEBIAN_12_0_64BIT"
        );
        assert_eq!(
            sms_os_version(&rel("centos", "6.5"), "i686"),
            "CENTOS_6_5_32BIT"
        );
        assert_eq!(sms_os_version(&rel("", ""), "x86_64"), "LINUX_OTHER_64BIT");
        assert_eq!(
            sms_os_version(&rel("my-distro", "3.1"), "x86_64"),
            "MY_DISTRO_3_1_64BIT"
        );
    }

    #[test]
    fn releases_from_files() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/os-release"),
            "NAME=\"CentOS Linux\"\nID=\"centos\"\nVERSION_ID=\"7\"\n",
        )
        .unwrap();
        fs::write(
            t.path().join("etc/centos-release"),
            "CentOS Linux release 7.4.1708 (Core)\n",
        )
        .unwrap();
        assert_eq!(os_release(t.path()), rel("centos", "7.4.1708"));
        // CentOS 6: no os-release.
        fs::remove_file(t.path().join("etc/os-release")).unwrap();
        fs::remove_file(t.path().join("etc/centos-release")).unwrap();
        fs::write(
            t.path().join("etc/redhat-release"),
            "CentOS release 6.5 (Final)\n",
        )
        .unwrap();
        assert_eq!(os_release(t.path()), rel("centos", "6.5"));
        // SLES 11 SP4.
        fs::remove_file(t.path().join("etc/redhat-release")).unwrap();
        fs::write(
            t.path().join("etc/SuSE-release"),
            "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 4\n",
        )
        .unwrap();
        assert_eq!(os_release(t.path()), rel("sles", "11.4"));
        // Debian with the point release.
        fs::remove_file(t.path().join("etc/SuSE-release")).unwrap();
        fs::write(
            t.path().join("etc/os-release"),
            "ID=debian\nVERSION_ID=\"12\"\n",
        )
        .unwrap();
        fs::write(t.path().join("etc/debian_version"), "12.5\n").unwrap();
        assert_eq!(os_release(t.path()), rel("debian", "12.5"));
        // Ubuntu has a debian_version ("bookworm/sid") that must not win.
        fs::write(
            t.path().join("etc/os-release"),
            "ID=ubuntu\nVERSION_ID=\"22.04\"\n",
        )
        .unwrap();
        fs::write(t.path().join("etc/debian_version"), "bookworm/sid\n").unwrap();
        assert_eq!(os_release(t.path()), rel("ubuntu", "22.04"));
    }

    #[test]
    fn block_check_matches_reference_shape() {
        let s = block_check(
            &rel("centos", "7.4.1708"),
            "3.10.0-1062.1.1.el7.x86_64",
            "x86_64",
        );
        assert_eq!(s, "{\"release_type\": \"CENTOS\", \"release_version\": \"7.4.1708\", \"kernel_simplification\": \"3.10.0\", \"architecture\": \"x86_64\", \"kernel_version\": \"3.10.0-1062.1.1.el7.x86_64\"}");
        let v: serde_json::Value = serde_json::from_str(&block_check(
            &rel("sles", "12.2"),
            "4.4.21-69-default",
            "x86_64",
        ))
        .unwrap();
        assert_eq!(v["release_type"], "SUSE");
    }

    #[test]
    fn platforms() {
        let d = |v: &str, p: &str, b: &str, tag: &str| Dmi {
            sys_vendor: v.into(),
            product_name: p.into(),
            bios_vendor: b.into(),
            chassis_asset_tag: tag.into(),
            ..Dmi::default()
        };
        assert_eq!(
            platform(&d("Amazon EC2", "t3.micro", "Amazon EC2", "")),
            "aws"
        );
        assert_eq!(platform(&d("Xen", "HVM domU", "Xen", "")), "other");
        assert_eq!(
            platform(&d(
                "Microsoft Corporation",
                "Virtual Machine",
                "Microsoft Corporation",
                AZURE_ASSET_TAG
            )),
            "azure"
        );
        assert_eq!(
            platform(&d(
                "Microsoft Corporation",
                "Virtual Machine",
                "Microsoft Corporation",
                ""
            )),
            "hyperv"
        );
        assert_eq!(
            platform(&d(
                "OpenStack Foundation",
                "OpenStack Nova",
                "SeaBIOS",
                "HUAWEICLOUD"
            )),
            "hw"
        );
        assert_eq!(
            platform(&d("Alibaba Cloud", "Alibaba Cloud ECS", "SeaBIOS", "")),
            "ali"
        );
        assert_eq!(
            platform(&d("Google", "Google Compute Engine", "Google", "")),
            "gcp"
        );
        assert_eq!(
            platform(&d("Tencent Cloud", "CVM", "SeaBIOS", "")),
            "tencent"
        );
        assert_eq!(
            platform(&d("VMware, Inc.", "VMware Virtual Platform", "Phoenix", "")),
            "vmware"
        );
        assert_eq!(
            platform(&d("Dell Inc.", "PowerEdge R740", "Dell Inc.", "")),
            "other"
        );
    }

    #[test]
    fn small_parsers() {
        assert_eq!(count_cpu_list("0-3,8,10-11\n"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(
            meminfo_bytes("MemTotal:       16303132 kB\nMemFree: 1 kB\n"),
            Some(16_303_132 * 1024)
        );
        assert_eq!(meminfo_bytes("nothing"), None);
        let stats = "\
 252       0 vda 1000 0 8000 2500 0 0 0 0 0 0 0\n\
 252       1 vda1 900 0 7000 2400 0 0 0 0 0 0 0\n\
 259       0 nvme0n1 1000 0 8000 500 0 0 0 0 0 0 0\n\
 259       1 nvme0n1p1 10 0 80 50 0 0 0 0 0 0 0\n\
   7       0 loop0 99999 0 8 99999 0 0 0 0 0 0 0\n";
        assert_eq!(read_wait_ms(stats), 1.5);
        assert_eq!(read_wait_ms(""), 0.0);
    }

    #[test]
    fn fake_root() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for (p, c) in [
            ("proc/sys/kernel/hostname", "web01\n"),
            ("proc/sys/kernel/osrelease", "3.10.0-1160.el7.x86_64\n"),
            ("proc/meminfo", "MemTotal: 1024 kB\n"),
            ("sys/devices/system/cpu/online", "0-1\n"),
            ("sys/class/dmi/id/sys_vendor", "VMware, Inc.\n"),
            ("etc/os-release", "ID=\"centos\"\nVERSION_ID=\"7\"\n"),
            ("etc/lilo.conf", "boot=/dev/sda\n"),
            ("sys/firmware/efi/x", ""),
            ("usr/bin/rsync", ""),
            ("dev/raw/raw1", ""),
            ("dev/raw/rawctl", ""),
        ] {
            fs::create_dir_all(r.join(p).parent().unwrap()).unwrap();
            fs::write(r.join(p), c).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(r.join("usr/bin/rsync"), fs::Permissions::from_mode(0o755)).unwrap();
        let mut w = Warnings::default();
        let h = host_facts(r, &mut w);
        assert!(w.as_slice().is_empty(), "{:?}", w.as_slice());
        assert_eq!(h.hostname, "web01");
        assert_eq!(h.os_version, "CENTOS_7_0_64BIT");
        assert_eq!(h.memory, 1024 * 1024);
        assert_eq!(h.cpu_quantity, 2);
        assert_eq!(h.platform, "vmware");
        assert_eq!(h.firmware, "UEFI");
        assert_eq!(h.boot_loader, "LILO");
        assert!(h.has_rsync && !h.has_tc);
        assert_eq!(h.raw_devices, "/dev/raw/raw1");
        assert!(!h.paravirtualization);

        let empty = tempfile::tempdir().unwrap();
        let mut w = Warnings::default();
        let h = host_facts(empty.path(), &mut w);
        assert_eq!(h.platform, "other");
        let subjects: Vec<_> = w.as_slice().iter().map(|w| w.subject.clone()).collect();
        assert!(subjects.contains(&"DMI".to_string()), "{subjects:?}");
    }
}
