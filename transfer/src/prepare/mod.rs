//! The target side of `receive --prepare`: makes on blank target disks the layout the source's
//! `Plan` describes (partition table, partitions, filesystems with the source's UUIDs and
//! labels, swap), mounts it under the staging root for the file pass, and after a complete
//! pass configures the migrated system to boot there (fstab and crypttab checked, initramfs
//! and GRUB regenerated in a chroot with the target's own tools).
//!
//! Modules: `size` where the partitions go, `cmd` running tools, `disk` partitioning,
//! formatting and mounting, `configure` the post-copy steps, `fstab` the fstab check.

mod cmd;
mod configure;
mod disk;
mod fstab;
mod size;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::code::Code;
use crate::file::layout::Layout;
use crate::lock;

pub use size::{plan_disk, Planned};

/// What `--prepare` was told.
#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Layout disk name → target block device (`--disk NAME=DEV`).
    pub disks: Vec<(String, PathBuf)>,
    /// Wipe target disks that hold a partition table or filesystem (`--wipe`).
    pub wipe: bool,
    /// Empty `/etc/machine-id` of the migrated system, so it gets a new one at first boot.
    pub clear_machine_id: bool,
    /// Configure the migrated system after a complete copy pass (fstab, initramfs, GRUB).
    pub configure: bool,
}

/// A failed preparation or configuration step: the SMS code and a message naming the disk,
/// file or command.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PrepareError {
    /// SMS code (§6.1: SMS.1312, SMS.31xx, SMS.32xx, SMS.6539).
    pub code: Code,
    /// What failed, naming the disk, file or command.
    pub message: String,
}

impl PrepareError {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The target disks of a receiver, prepared at most once and kept mounted under the staging
/// root until it is dropped.
#[derive(Debug)]
pub struct Target {
    opts: PrepareOptions,
    root: PathBuf,
    staged: Mutex<Option<disk::Staged>>,
}

impl Target {
    /// A target that will prepare `opts.disks` under `root` when the first plan arrives.
    pub fn new(opts: PrepareOptions, root: PathBuf) -> Self {
        Self {
            opts,
            root,
            staged: Mutex::new(None),
        }
    }

    /// Makes the layout on the disks (or finds it already made, by this or an earlier
    /// receiver) and mounts it under the root. A second call with the same layout does
    /// nothing; a different layout is refused.
    pub fn ensure(&self, layout: &Layout) -> Result<(), PrepareError> {
        layout
            .validate()
            .map_err(|e| PrepareError::new(Code::PartitionFailed, e.to_string()))?;
        let mut staged = lock(&self.staged);
        if let Some(s) = staged.as_ref() {
            if s.layout.same_shape(layout) {
                return Ok(());
            }
            return Err(PrepareError::new(
                Code::PartitionFailed,
                "the source's disk layout changed since the target disks were prepared; restart the receiver with --wipe to prepare them again",
            ));
        }
        *staged = Some(disk::stage(layout, &self.opts, &self.root)?);
        Ok(())
    }

    /// Configures the migrated system on the prepared disks (after a complete copy pass).
    pub fn configure(&self) -> Result<(), PrepareError> {
        if !self.opts.configure {
            nix::unistd::sync();
            return Ok(());
        }
        let staged = lock(&self.staged);
        let Some(s) = staged.as_ref() else {
            return Err(PrepareError::new(
                Code::TargetConfigFailed,
                "no prepared target disks to configure",
            ));
        };
        configure::run_all(s, &self.root, &self.opts)
    }

    /// Syncs and unmounts the prepared filesystems (they are mounted again by the next
    /// session's [`Target::ensure`]).
    pub fn release(&self) {
        drop(lock(&self.staged).take());
    }

    /// The staging root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}
