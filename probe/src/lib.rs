//! Host inventory of a Linux source server, as the SMS registration body (`PostSourceServerBody`).
//!
//! The probe only reads: sysfs, procfs, `/etc`, the first and last sectors of block devices, and
//! (read-only) `lvm` and `btrfs` reports. It never writes a disk, mounts, or changes a setting, and
//! needs no network. Anything it cannot read becomes a [`Warning`] and the rest still comes out.
//!
//! Every on-disk format is read here, through the bounded [`io::ReadAt`]: partition tables
//! ([`ptable`]), superblocks ([`fsdetect`]), and, for block mode, the allocation maps of ext4
//! and XFS ([`alloc`]), whose `FS_IOC_GETFSMAP` query is the crate's one `unsafe` module.

#![deny(unsafe_code)]

use std::path::PathBuf;

pub mod alloc;
pub mod blockdev;
pub mod btrfs;
pub mod fsdetect;
pub mod hostinfo;
pub mod human;
pub mod io;
pub mod lvm;
pub mod model;
pub mod mounts;
pub mod nic;
pub mod ptable;
pub mod storage;
pub mod tools;
pub mod warn;

pub use warn::{Warning, Warnings};

use model::PostSourceServerBody;

/// `os_type` of every source this agent registers.
pub const OS_TYPE: &str = "LINUX";
/// `start_type` of a source started by hand (not through Migration Center).
pub const START_TYPE: &str = "MANUAL";

/// What to probe and how to name it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where `/proc`, `/sys` and `/etc` are read from (`/` on a live host).
    pub root: PathBuf,
    /// Loop and nbd devices to include (others are skipped; snap loops must not show up).
    pub devices: Vec<PathBuf>,
    /// Name to register under; the hostname when `None`.
    pub name: Option<String>,
    /// Interfaces to report although they are normally skipped (tun/tap …).
    pub interfaces: Vec<String>,
    /// Version of the agent doing the probing.
    pub agent_version: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            devices: Vec::new(),
            name: None,
            interfaces: Vec::new(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The registration body and what could not be read while building it.
#[derive(Debug)]
pub struct Report {
    /// Body for `POST /v3/sources`.
    pub body: PostSourceServerBody,
    /// Things the probe could not read, in the order met.
    pub warnings: Vec<Warning>,
}

/// Inventories the host.
pub fn probe(opts: &Options) -> Report {
    let mut w = Warnings::default();
    let host = hostinfo::host_facts(&opts.root, &mut w);
    let net = nic::networks(&opts.root, &opts.interfaces, &mut w);
    let storage = storage::scan(&opts.root, &opts.devices, &mut w);
    let name = opts
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| host.hostname.clone());
    let body = PostSourceServerBody {
        id: None,
        ip: net.default_ip,
        name,
        hostname: host.hostname,
        os_type: OS_TYPE.to_string(),
        os_version: host.os_version,
        virtualization_type: host.virtualization_type,
        linux_block_check: host.linux_block_check,
        firmware: host.firmware,
        cpu_quantity: host.cpu_quantity,
        memory: host.memory,
        disks: storage.disks,
        btrfs_list: storage.btrfs_list,
        networks: net.networks,
        domain_id: None,
        has_rsync: host.has_rsync,
        has_tc: host.has_tc,
        paravirtualization: host.paravirtualization,
        raw_devices: host.raw_devices,
        boot_loader: host.boot_loader,
        volume_groups: storage.volume_groups,
        agent_version: opts.agent_version.clone(),
        kernel_version: host.kernel_version,
        start_type: START_TYPE.to_string(),
        io_read_wait: host.io_read_wait,
        platform: host.platform,
    };
    Report {
        body,
        warnings: w.into_vec(),
    }
}

/// Test-only helpers shared by the modules' tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// One step of xorshift64: cheap, seedable noise for no-panic loops over random input.
    pub(crate) fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }
}
