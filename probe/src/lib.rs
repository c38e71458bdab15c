//! Host inventory of a Linux source server, as the SMS registration body (`PostSourceServerBody`).
//!
//! The probe only reads: sysfs, procfs, `/etc`, the first and last sectors of block devices, and
//! (read-only) `lvm` and `btrfs` reports. It never writes a disk, mounts, or changes a setting, and
//! needs no network. Anything it cannot read becomes a [`Warning`] and the rest still comes out.

pub mod io;
pub mod model;
pub mod parttable;
pub mod superblock;
pub mod warn;

pub use warn::{Warning, Warnings};
