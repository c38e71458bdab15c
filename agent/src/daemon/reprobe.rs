//! Disk changes: re-probe now and then and send `PUT diskinfo` when the storage layout
//! (not its usage) differs from what SMS last heard.

use reqwest::Method;
use serde_json::json;
use transfer::Code;

use super::{Daemon, DaemonError};
use crate::api::models::{DiskInfo, PostSourceServerBody};

impl Daemon {
    /// Re-probes and sends `PUT diskinfo` when the disks changed.
    pub(super) async fn reprobe(&mut self) -> Result<(), DaemonError> {
        let body = self.probe().await;
        let fp = fingerprint(&body);
        if fp == self.state.disk_fingerprint {
            return Ok(());
        }
        tracing::warn!(
            error_code = %Code::SourceDisksChanged,
            "source disks changed; updating the disk information"
        );
        let info = DiskInfo {
            disks: body.disks,
            volumegroups: body.volume_groups,
            btrfs_list: body.btrfs_list,
        };
        let path = format!("/v3/sources/{}/diskinfo", self.source_id());
        match self
            .api
            .send::<_, serde_json::Value>(Method::PUT, &path, &info)
            .await
        {
            Ok(_) => {
                self.state.disk_fingerprint = fp;
                self.save()?;
            }
            Err(e) => {
                tracing::warn!(error = %e, "disk information not updated; will retry at the next re-probe")
            }
        }
        Ok(())
    }
}

/// SHA-256 over the layout of the storage (names, sizes, filesystems), not its usage, which
/// changes all the time without the target needing to change.
pub(super) fn fingerprint(body: &PostSourceServerBody) -> String {
    let disks: Vec<_> = body
        .disks
        .iter()
        .map(|d| {
            let parts: Vec<_> = d
                .physical_volumes
                .iter()
                .map(|p| (&p.name, p.size, &p.file_system, &p.uuid))
                .collect();
            (&d.name, d.size, &d.partition_style, parts)
        })
        .collect();
    let vgs: Vec<_> = body
        .volume_groups
        .iter()
        .map(|v| {
            let lvs: Vec<_> = v
                .logical_volumes
                .iter()
                .map(|l| (&l.name, l.size))
                .collect();
            (&v.name, v.size, &v.components, lvs)
        })
        .collect();
    let btrfs: Vec<_> = body
        .btrfs_list
        .iter()
        .map(|b| (&b.uuid, &b.device, b.size))
        .collect();
    let v = json!({"d": disks, "v": vgs, "b": btrfs});
    crate::api::sign::sha256_hex(v.to_string().as_bytes())
}
