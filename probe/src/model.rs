//! The SMS registration model (`PostSourceServerBody` and its parts) with the SDK's JSON names.
//!
//! Field names follow the official SDKs (`huaweicloudsdksms`, `huaweicloud-sdk-go-v3`); where the
//! reference spells a field differently (`global_reserve_1`, `default_subvol_id`, `subvolume`) the
//! reference spelling is accepted when reading, and the SDK's is always written. Numbers that the
//! reference's examples sometimes send as strings (`"inode_size": "256"`, `"size": "3.30GiB"`) are
//! accepted as strings too, so a body captured from the real service deserialises.

use serde::{Deserialize, Deserializer, Serialize};

/// The body of `POST /v3/sources`: everything the service plans the target from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostSourceServerBody {
    /// Source id in the SMS database; present only when updating a registered source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Address of the NIC that holds the default route.
    #[serde(default)]
    pub ip: String,
    /// Name that tells sources apart in the console (config `agent.name`, else the hostname).
    pub name: String,
    /// Kernel host name.
    #[serde(default)]
    pub hostname: String,
    /// Always `LINUX` for this agent.
    pub os_type: String,
    /// Release in the service's spelling, e.g. `CENTOS_7_4_64BIT`.
    pub os_version: String,
    /// Virtualization mode of the guest, e.g. `HVM`.
    #[serde(default)]
    pub virtualization_type: String,
    /// JSON *string* describing release and kernel for the block-migration compatibility check.
    #[serde(default)]
    pub linux_block_check: String,
    /// `BIOS` or `UEFI`.
    #[serde(default)]
    pub firmware: String,
    /// Number of online CPUs.
    #[serde(default)]
    pub cpu_quantity: u32,
    /// Memory in bytes (every reference example sends bytes, though its table says MB).
    #[serde(default, deserialize_with = "lenient_u64")]
    pub memory: u64,
    /// Whole disks with their partitions.
    #[serde(default)]
    pub disks: Vec<ServerDisk>,
    /// Btrfs filesystems (`[]` when none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub btrfs_list: Vec<BtrfsFileSystem>,
    /// Network interfaces.
    pub networks: Vec<NetWork>,
    /// Tenant domain id, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_id: Option<String>,
    /// Whether `rsync` is installed.
    #[serde(default)]
    pub has_rsync: bool,
    /// Whether `tc` is installed.
    #[serde(default)]
    pub has_tc: bool,
    /// True only for a Xen paravirtualized (PV) guest.
    #[serde(default)]
    pub paravirtualization: bool,
    /// Raw devices bound with the `raw` driver, `;`-joined (empty when none).
    #[serde(default)]
    pub raw_devices: String,
    /// `GRUB` or `LILO`.
    #[serde(default)]
    pub boot_loader: String,
    /// LVM volume groups (`[]` when none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub volume_groups: Vec<VolumeGroups>,
    /// Version of this agent.
    pub agent_version: String,
    /// `uname -r`.
    #[serde(default)]
    pub kernel_version: String,
    /// `MANUAL` (or `MGC`).
    #[serde(default)]
    pub start_type: String,
    /// Mean disk read latency in milliseconds.
    #[serde(default)]
    pub io_read_wait: f64,
    /// Cloud or hypervisor the host runs on: hw, ali, aws, azure, gcp, tencent, vmware, hyperv, other.
    #[serde(default)]
    pub platform: String,
}

/// A whole disk (`ServerDisk`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerDisk {
    /// Device path, e.g. `/dev/vda`.
    pub name: String,
    /// `MBR` or `GPT`.
    #[serde(default)]
    pub partition_style: String,
    /// `BOOT`, `OS`, `NORMAL`, `VOLUME_GROUP` or `BTRFS`.
    pub device_use: String,
    /// Size in bytes.
    #[serde(deserialize_with = "lenient_u64")]
    pub size: u64,
    /// Sum of the sizes of its partitions (or the whole disk for a bare PV/filesystem).
    #[serde(deserialize_with = "lenient_u64")]
    pub used_size: u64,
    /// Partitions.
    #[serde(default)]
    pub physical_volumes: Vec<PhysicalVolume>,
    /// Whether the disk holds the root filesystem.
    #[serde(default)]
    pub os_disk: bool,
    /// Name of the associated target disk (set by the service in a task; empty here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation_name: Option<String>,
    /// Inode size of a filesystem that occupies the whole disk, 0 otherwise.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub inode_size: u64,
}

/// A partition (`PhysicalVolume`), or the whole disk when it carries a filesystem directly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PhysicalVolume {
    /// `OS`, `BOOT`, `NORMAL`, `VOLUME_GROUP` or `BTRFS`.
    #[serde(default)]
    pub device_use: String,
    /// Filesystem type from the superblock (`ext4`, `xfs`, `swap`, `LVM2_member`, …), empty if none.
    #[serde(default)]
    pub file_system: String,
    /// Partition number as in the device name (`/dev/vda2` → 2).
    #[serde(default, deserialize_with = "lenient_u64")]
    pub index: u64,
    /// Where it is mounted, empty when not mounted.
    #[serde(default)]
    pub mount_point: String,
    /// Device path, e.g. `/dev/vda1`.
    #[serde(default)]
    pub name: String,
    /// Size in bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub size: u64,
    /// Bytes in use (filesystem used bytes when mounted; `size` for swap, PVs, Btrfs members).
    #[serde(default, deserialize_with = "lenient_u64")]
    pub used_size: u64,
    /// Bytes per inode record of the filesystem.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub inode_size: u64,
    /// Number of inodes of the filesystem.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub inode_nums: u64,
    /// Filesystem UUID.
    #[serde(default)]
    pub uuid: String,
    /// Filesystem block (cluster) size in bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub size_per_cluster: u64,
}

/// An LVM volume group (`VolumeGroups`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeGroups {
    /// Its physical volumes, `;`-joined.
    #[serde(default)]
    pub components: String,
    /// Unallocated bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub free_size: u64,
    /// Logical volumes.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub logical_volumes: Vec<LogicalVolumes>,
    /// VG name.
    #[serde(default)]
    pub name: String,
    /// Bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub size: u64,
}

/// An LVM logical volume (`LogicalVolumes`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogicalVolumes {
    /// Filesystem blocks.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub block_count: u64,
    /// Filesystem block size in bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub block_size: u64,
    /// Filesystem type, empty when unknown (inactive LV).
    #[serde(default)]
    pub file_system: String,
    /// Bytes per inode record.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub inode_size: u64,
    /// Number of inodes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub inode_nums: u64,
    /// `OS` when mounted at `/`, `BOOT` at `/boot`, else `NORMAL`.
    #[serde(default)]
    pub device_use: String,
    /// Where it is mounted, empty when not.
    #[serde(default)]
    pub mount_point: String,
    /// `/dev/mapper/VG-LV` with `-` in either name doubled.
    #[serde(default)]
    pub name: String,
    /// Bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub size: u64,
    /// Filesystem used bytes when mounted, else `size`.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub used_size: u64,
    /// `size - used_size`.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub free_size: u64,
}

/// A Btrfs filesystem (`BtrfsFileSystem`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BtrfsFileSystem {
    /// First member device.
    pub name: String,
    /// Label, empty when none.
    #[serde(default)]
    pub label: String,
    /// Filesystem UUID.
    pub uuid: String,
    /// Member devices, `;`-joined.
    #[serde(default)]
    pub device: String,
    /// Total bytes of the filesystem.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub size: u64,
    /// Tree node size in bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub nodesize: u64,
    /// Sector size in bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub sectorsize: u64,
    /// Block group profile of data (`single`, `dup`, `raid1`, …).
    #[serde(default)]
    pub data_profile: String,
    /// Block group profile of the system chunks.
    #[serde(default)]
    pub system_profile: String,
    /// Block group profile of metadata.
    #[serde(default)]
    pub metadata_profile: String,
    /// Global reserve in bytes, as a string (the SDK types it so).
    #[serde(default, alias = "global_reserve_1")]
    pub global_reserve1: String,
    /// Used bytes.
    #[serde(default, deserialize_with = "lenient_u64")]
    pub g_vol_used_size: u64,
    /// Id of the default subvolume.
    #[serde(default, alias = "default_subvol_id")]
    pub default_subvolid: String,
    /// Path of the default subvolume (empty for the top level, id 5).
    #[serde(default)]
    pub default_subvol_name: String,
    /// Where the default subvolume (or the filesystem) is mounted.
    #[serde(default)]
    pub default_subvol_mountpath: String,
    /// Subvolumes and snapshots.
    #[serde(default, alias = "subvolume", deserialize_with = "null_as_empty")]
    pub subvolumn: Vec<BtrfsSubvolumn>,
}

/// A Btrfs subvolume or snapshot (`BtrfsSubvolumn`; every field a string, as in the SDK).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BtrfsSubvolumn {
    /// UUID of the subvolume.
    pub uuid: String,
    /// `"true"` for a snapshot.
    pub is_snapshot: String,
    /// Subvolume id.
    pub subvol_id: String,
    /// Id of the subvolume it lives in.
    pub parent_id: String,
    /// Path from the top level.
    pub subvol_name: String,
    /// Where it is mounted, empty when not.
    #[serde(default)]
    pub subvol_mount_path: String,
}

/// A network interface (`NetWork`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetWork {
    /// Interface name.
    pub name: String,
    /// First IPv4 address.
    #[serde(default)]
    pub ip: String,
    /// First global IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// Dotted IPv4 netmask.
    #[serde(default)]
    pub netmask: String,
    /// IPv4 default gateway through this interface, empty when none.
    #[serde(default)]
    pub gateway: String,
    /// MTU.
    #[serde(default)]
    pub mtu: u32,
    /// Lowercase hex SHA-256 of the lowercase colon-separated MAC.
    #[serde(default)]
    pub mac: String,
    /// Database id (set by the service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// Accepts an integer, a float with no fraction, a numeric string, or a human size (`3.30GiB`).
fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        U(u64),
        F(f64),
        S(String),
        Null(()),
    }
    match Num::deserialize(d)? {
        Num::U(v) => Ok(v),
        Num::F(v) if v >= 0.0 && v.fract() == 0.0 && v < 1.8e19 =>
        {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Ok(v as u64)
        }
        Num::F(v) => Err(serde::de::Error::custom(format!(
            "expected a non-negative integer, got {v}"
        ))),
        Num::S(s) => parse_size(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("expected a size, got {s:?}"))),
        Num::Null(()) => Ok(0),
    }
}

/// Parses `123`, `""` (0), `null`, or `3.30GiB`/`512MiB`/`1.5KB`-style sizes into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || s == "null" {
        return Some(0);
    }
    if let Ok(v) = s.parse::<u64>() {
        return Some(v);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" | "KB" => 1024.0,
        "M" | "MiB" | "MB" => 1024.0 * 1024.0,
        "G" | "GiB" | "GB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" | "TB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = (num * mult).round();
    if !(0.0..1.8e19).contains(&v) {
        return None;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(v as u64)
}

fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_example_body_deserialises() {
        // Trimmed from the reference's `POST /v3/sources` example (§5.3.2), with its spellings.
        let json = r#"{
          "os_type":"LINUX","name":"host-192-168-136-xxx","os_version":"SUSE12_64BIT_SP2",
          "linux_block_check":"{\"release_type\": \"SUSE\"}","kernel_version":"4.4.21-69-default",
          "virtualization_type":"HVM","paravirtualization":true,"firmware":"BIOS","has_rsync":true,
          "io_read_wait":3.4,"boot_loader":"GRUB","agent_version":"2.2.1","networks":[],
          "disks":[{"name":"/dev/vda","device_use":"BOOT","size":42949672960,"partition_style":"MBR",
            "used_size":42948624384,"physical_volumes":[{"name":"/dev/vda1","size":2153775104,
            "device_use":"NORMAL","used_size":2153775104,"inode_size":0,"inode_nums":0,
            "file_system":"swap","mount_point":""}]}],
          "volume_groups":[{"name":"vg1","size":42948624384,"components":"/dev/vdb1;/dev/vdc",
            "logical_volumes":[{"name":"/dev/mapper/vg1-lv1","device_use":"NORMAL","size":10737418240,
            "free_size":10713837568,"used_size":23580672,"file_system":"ext4","mount_point":"/mnt/lv1",
            "inode_nums":12345,"inode_size":"256"}]}],
          "btrfs_list":[{"name":"/dev/vda2","label":"none","uuid":"u","device":"/dev/vda2",
            "size":"3.30GiB","nodesize":"16384","sectorsize":"4096","data_profile":"single",
            "system_profile":"single","metadata_profile":"single","global_reserve_1":"single",
            "g_vol_used_size":"3894038528","default_subvol_id":"259","default_subvol_name":"@",
            "default_subvol_mountpath":"/","subvolume":[{"uuid":"u","is_snapshot":"true",
            "subvol_id":"259","parent_id":"258","subvol_name":"@/.snapshots/1/snapshot",
            "subvol_mount_path":"/"}]}]
        }"#;
        let body: PostSourceServerBody = serde_json::from_str(json).unwrap();
        assert_eq!(body.volume_groups[0].logical_volumes[0].inode_size, 256);
        assert_eq!(body.btrfs_list[0].size, 3_543_348_019);
        assert_eq!(body.btrfs_list[0].default_subvolid, "259");
        assert_eq!(body.btrfs_list[0].subvolumn[0].is_snapshot, "true");
        // Written back with the SDK's spellings only.
        let out = serde_json::to_string(&body).unwrap();
        assert!(out.contains("\"subvolumn\"") && !out.contains("\"subvolume\""));
        assert!(out.contains("\"global_reserve1\"") && out.contains("\"default_subvolid\""));
        let again: PostSourceServerBody = serde_json::from_str(&out).unwrap();
        assert_eq!(again, body);
    }

    #[test]
    fn btrfs_list_null_is_empty() {
        let json = r#"{"name":"n","os_type":"LINUX","os_version":"x","networks":[],
            "agent_version":"1","btrfs_list":null}"#;
        let body: PostSourceServerBody = serde_json::from_str(json).unwrap();
        assert!(body.btrfs_list.is_empty());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size(""), Some(0));
        assert_eq!(parse_size("1.5 K"), Some(1536));
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("12 parsecs"), None);
    }

    #[test]
    fn bad_number_is_a_clear_error() {
        let json = r#"{"name":"/dev/x","device_use":"OS","size":"lots","used_size":0}"#;
        let err = serde_json::from_str::<ServerDisk>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lots"), "{err}");
    }
}
