//! The TLS material of a task's target, for `sms-agent receive --task ID --config FILE`: the
//! receiver fetches it from SMS with the daemon's own configuration and credentials instead of
//! an operator copying PEM files by hand.
//!
//! Reference §5.7.1 `GET /v3/tasks/{task_id}/certkey` (line 20673; response table 5-321, lines
//! 20709-20719; example lines 20777-20799): `ca`, the source's `cert`/`private_key`, and the
//! target's `target_mgmt_*` ("目的端管理层", management layer) and `target_data_*` ("目的端数据层",
//! data layer). The receiver carries data, so it serves `target_data_cert` and
//! `target_data_private_key` under `ca`. Ambiguity: the reference does not say what the
//! management pair is for; nothing here uses it. An encrypted key is opened with the task's
//! passphrase, §5.4.11 `GET /v3/tasks/{task_id}/passphrase` (line 15458).
//!
//! Nothing is written to disk and nothing secret is logged; [`TargetTls::save`] writes the
//! material only where the operator asks (`--save-tls DIR`).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::api::models::{CertKey, Passphrase};
use crate::api::{ApiError, Client};
use crate::config::Secret;

/// The target's half of a task's TLS material.
#[derive(Clone, PartialEq, Eq)]
pub struct TargetTls {
    /// CA (PEM) both sides' certificates are issued by (`ca`).
    pub ca: String,
    /// The target's data-layer certificate (`target_data_cert`).
    pub cert: String,
    /// Its private key (`target_data_private_key`), possibly encrypted.
    pub key: Secret,
    /// The key's passphrase when the key is encrypted.
    pub passphrase: Option<Secret>,
}

impl fmt::Debug for TargetTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetTls")
            .field("key", &self.key)
            .field("passphrase", &self.passphrase)
            .finish_non_exhaustive()
    }
}

/// Why the material could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TargetTlsError {
    /// The certkey call failed.
    #[error("SMS.0511: the task's certificates and keys not obtained: {0}")]
    CertKey(#[source] ApiError),
    /// The answer lacks a field the receiver needs.
    #[error("SMS.0511: the task's certkey has no {0}")]
    Missing(&'static str),
    /// The key is encrypted and its passphrase could not be had.
    #[error("SMS.0521: the passphrase of the task's key not obtained: {0}")]
    Passphrase(String),
    /// Writing the material where the operator asked failed.
    #[error("cannot write {path}: {err}")]
    Save {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        err: std::io::Error,
    },
}

/// Fetches the target material of `task_id` (reference §5.7.1 with `enable_ca_cert=true`, as
/// the example at line 20777 sends it).
pub async fn fetch(api: &Client, task_id: &str) -> Result<TargetTls, TargetTlsError> {
    let q = [("enable_ca_cert".to_string(), "true".to_string())];
    let ck: CertKey = api
        .get(&format!("/v3/tasks/{task_id}/certkey"), &q)
        .await
        .map_err(TargetTlsError::CertKey)?;
    for (field, v) in [
        ("ca", &ck.ca),
        ("target_data_cert", &ck.target_data_cert),
        ("target_data_private_key", &ck.target_data_private_key),
    ] {
        if v.trim().is_empty() {
            return Err(TargetTlsError::Missing(field));
        }
    }
    let mut passphrase = None;
    if ck.target_data_private_key.contains("ENCRYPTED") {
        let p: Passphrase = api
            .get(&format!("/v3/tasks/{task_id}/passphrase"), &[])
            .await
            .map_err(|e| TargetTlsError::Passphrase(e.to_string()))?;
        if p.passphrase.is_empty() {
            return Err(TargetTlsError::Passphrase("empty passphrase".into()));
        }
        passphrase = Some(Secret::new(p.passphrase));
    }
    tracing::info!(
        task_id,
        encrypted = passphrase.is_some(),
        "target TLS material fetched"
    );
    Ok(TargetTls {
        ca: ck.ca,
        cert: ck.target_data_cert,
        key: Secret::new(ck.target_data_private_key),
        passphrase,
    })
}

impl TargetTls {
    /// Writes `ca.pem`, `cert.pem`, `key.pem` (mode 0600) and, for an encrypted key,
    /// `passphrase` (0600) into `dir`, created 0700 when missing: the files `receive --ca
    /// --cert --key --passphrase-file` takes. Returns the paths written.
    pub fn save(&self, dir: &Path) -> Result<Vec<PathBuf>, TargetTlsError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let save_err = |path: &Path| {
            let path = path.to_path_buf();
            move |err| TargetTlsError::Save { path, err }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(save_err(dir))?;
        let mut files = vec![
            ("ca.pem", self.ca.as_str(), 0o644),
            ("cert.pem", self.cert.as_str(), 0o644),
            ("key.pem", self.key.expose(), 0o600),
        ];
        if let Some(p) = &self.passphrase {
            files.push(("passphrase", p.expose(), 0o600));
        }
        let mut out = Vec::new();
        for (name, text, mode) in files {
            let path = dir.join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .map_err(save_err(&path))?;
            // An existing file keeps its mode on open: set it.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
                .map_err(save_err(&path))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(save_err(&path))?;
            out.push(path);
        }
        Ok(out)
    }
}
