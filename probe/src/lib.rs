//! Host inventory of a Linux source server (being assembled; see the lead's full lib.rs).

pub mod blockdev;
pub mod io;
pub mod lvm;
pub mod model;
pub mod mounts;
pub mod parttable;
pub mod superblock;
pub mod tools;
pub mod warn;

pub use warn::{Warning, Warnings};
