//! UPLOAD_LOG and RSET_LOG_ACL: bundle, upload to the command's bucket, remember what was
//! uploaded (`log-upload.json` in the state directory) so that a restarted agent resumes the
//! same multipart upload and RSET_LOG_ACL, whose `command_param` names only the task and the
//! bucket (ref. §5.5.1 table 5-241), knows the object.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::bundle::{self, Contents};
use super::LogsSection;
use crate::obs::{Credentials, ObsClient, ObsError, UploadSpec};

/// The record of the last upload, in the state directory.
pub const RECORD_FILE: &str = "log-upload.json";

/// Everything an upload needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[agent] log_dir`.
    pub log_dir: PathBuf,
    /// `[agent] state_dir`.
    pub state_dir: PathBuf,
    /// `[logs]`.
    pub logs: LogsSection,
    /// The agent's AK/SK (none under token auth).
    pub creds: Option<Credentials>,
    /// Extra CA trusted (`[api] ca_file`, for a private OBS endpoint too).
    pub ca: Option<reqwest::Certificate>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// The effective configuration with secrets as `***`.
    pub config_text: String,
}

/// The last upload: what went where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Task of the command.
    pub task_id: String,
    /// Bucket.
    pub bucket: String,
    /// Object key.
    pub object: String,
    /// Bundle size in bytes.
    pub size: u64,
    /// Bundle SHA-256 (hex).
    pub sha256: String,
    /// Multipart upload under way, if any.
    #[serde(default)]
    pub upload_id: Option<String>,
    /// The bundle file until it is uploaded.
    pub bundle: PathBuf,
    /// Uploaded completely.
    pub done: bool,
}

/// Why an upload or an ACL reset failed; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Neither `obs_domain` nor `[logs] obs_endpoint`.
    #[error(
        "no OBS endpoint: GET /v3/config gave no obs_domain and [logs] obs_endpoint is not set"
    )]
    NoEndpoint,
    /// Token auth: nothing to sign OBS requests with.
    #[error("OBS requests are signed with an AK/SK; this agent authenticates with an IAM token ([auth] method = \"token\")")]
    NoCredentials,
    /// The command names no bucket.
    #[error("the command names no bucket (command_param.bucket is empty)")]
    NoBucket,
    /// RSET_LOG_ACL without an earlier upload of that task to that bucket.
    #[error("no log bundle of task {task_id} was uploaded to bucket {bucket} by this agent")]
    NothingUploaded {
        /// Task.
        task_id: String,
        /// Bucket.
        bucket: String,
    },
    /// Building the bundle or keeping the record failed.
    #[error("{what}: {err}")]
    Local {
        /// What was being done.
        what: String,
        /// Why it failed.
        err: std::io::Error,
    },
    /// OBS refused or could not be reached.
    #[error("uploading to bucket {bucket}: {err}")]
    Obs {
        /// Bucket.
        bucket: String,
        /// OBS's answer.
        err: ObsError,
    },
}

fn local(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UploadError {
    let what = what.into();
    move |err| UploadError::Local { what, err }
}

impl Settings {
    /// The OBS client of these settings: `[logs] obs_endpoint`, else `obs_domain`.
    pub fn client(&self, obs_domain: Option<&str>) -> Result<ObsClient, UploadError> {
        let endpoint = Some(self.logs.obs_endpoint.trim())
            .filter(|e| !e.is_empty())
            .or(obs_domain.map(str::trim).filter(|e| !e.is_empty()))
            .ok_or(UploadError::NoEndpoint)?;
        let creds = self.creds.clone().ok_or(UploadError::NoCredentials)?;
        let region = Some(self.logs.obs_region.clone())
            .filter(|r| !r.is_empty())
            .or_else(|| ObsClient::region_of(endpoint))
            .unwrap_or_else(|| "us-east-1".into());
        let mut c = ObsClient::new(
            endpoint,
            &region,
            creds,
            self.ca.clone(),
            self.timeout,
            self.logs.obs_path_style,
        )
        .map_err(|err| UploadError::Obs {
            bucket: String::new(),
            err,
        })?;
        c.retry_for = self.logs.upload_retry_for.0;
        Ok(c)
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir.join(RECORD_FILE)
    }

    /// The record of the last upload, if any.
    pub fn record(&self) -> Option<Record> {
        let text = std::fs::read(self.record_path()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn save(&self, r: &Record) -> Result<(), UploadError> {
        let bytes = serde_json::to_vec_pretty(r).map_err(|e| UploadError::Local {
            what: "encoding the upload record".into(),
            err: std::io::Error::other(e),
        })?;
        crate::daemon::state::write_atomic(&self.record_path(), &bytes).map_err(|e| {
            UploadError::Local {
                what: format!("writing {}", self.record_path().display()),
                err: std::io::Error::other(e.to_string()),
            }
        })
    }
}

/// UPLOAD_LOG: bundles (or takes the bundle of an unfinished upload of the same task and
/// bucket), uploads it, and returns the record of the completed upload.
pub async fn upload(
    s: &Settings,
    obs_domain: Option<&str>,
    task_id: &str,
    bucket: &str,
    source_id: &str,
    probe_json: &str,
) -> Result<Record, UploadError> {
    if bucket.trim().is_empty() {
        return Err(UploadError::NoBucket);
    }
    let client = s.client(obs_domain)?;
    // Only a multipart upload under way is continued (with the bundle it started); anything
    // else gets a fresh bundle with the logs written since.
    let unfinished = s.record().filter(|r| {
        !r.done
            && r.upload_id.is_some()
            && r.task_id == task_id
            && r.bucket == bucket
            && r.bundle.is_file()
    });
    let mut rec = match unfinished {
        Some(r) => {
            tracing::info!(object = %r.object, upload_id = ?r.upload_id, "resuming the unfinished log upload");
            r
        }
        None => {
            let dir = s.state_dir.join("log-bundles");
            // Bundles of earlier attempts that will not be continued.
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(local(format!("creating {}", dir.display())))?;
            let stamp = crate::api::time::sdk_date(SystemTime::now());
            let name = format!("sms-agent-logs-{stamp}.tar.gz");
            let manifest = serde_json::json!({
                "source_id": source_id,
                "task_id": task_id,
                "created_at": stamp,
                "agent": concat!("sms-agent ", env!("CARGO_PKG_VERSION")),
            });
            let b = bundle::build(
                &dir.join(&name),
                &Contents {
                    log_dir: &s.log_dir,
                    state_dir: &s.state_dir,
                    probe_json,
                    config_text: &s.config_text,
                    manifest,
                },
            )
            .map_err(local("building the log bundle"))?;
            let r = Record {
                task_id: task_id.to_string(),
                bucket: bucket.to_string(),
                object: object_key(task_id, &stamp),
                size: b.size,
                sha256: b.sha256,
                upload_id: None,
                bundle: b.path,
                done: false,
            };
            s.save(&r)?;
            r
        }
    };
    // Kept the moment OBS names it, before any part goes up: a killed agent continues it.
    let mut saved = rec.clone();
    let mut keep = |id: &str| {
        saved.upload_id = Some(id.to_string());
        if let Err(e) = s.save(&saved) {
            tracing::warn!(error = %e, "the upload id is not kept; a restart starts the upload over");
        }
    };
    let mut spec = UploadSpec {
        bucket,
        key: &rec.object,
        path: &rec.bundle,
        part_size: s.logs.upload_part_size.0,
        acl: &s.logs.upload_acl,
        resume: rec.upload_id.clone(),
    };
    let mut up = client.upload_file(&spec, &mut keep).await;
    // OBS forgets unfinished uploads after a while (lifecycle rules): start the same one over.
    if spec.resume.is_some()
        && matches!(&up, Err(ObsError::Refused { code, .. }) if code == "NoSuchUpload")
    {
        tracing::warn!(object = %rec.object, "the unfinished upload is gone from OBS; starting it over");
        spec.resume = None;
        up = client.upload_file(&spec, &mut keep).await;
    }
    let up = up.map_err(|err| UploadError::Obs {
        bucket: bucket.to_string(),
        err,
    })?;
    tracing::info!(bucket, object = %rec.object, size = rec.size, parts = up.parts, parts_resumed = up.parts_resumed, "log bundle uploaded");
    rec.done = true;
    rec.upload_id = None;
    let _ = std::fs::remove_file(&rec.bundle);
    s.save(&rec)?;
    Ok(rec)
}

/// RSET_LOG_ACL: the object the last upload of `task_id` to `bucket` made becomes private.
pub async fn reset_acl(
    s: &Settings,
    obs_domain: Option<&str>,
    task_id: &str,
    bucket: &str,
) -> Result<Record, UploadError> {
    let rec = s
        .record()
        .filter(|r| r.done && r.task_id == task_id && (bucket.is_empty() || r.bucket == bucket))
        .ok_or_else(|| UploadError::NothingUploaded {
            task_id: task_id.to_string(),
            bucket: bucket.to_string(),
        })?;
    let client = s.client(obs_domain)?;
    client
        .put_object_acl(&rec.bucket, &rec.object, "private")
        .await
        .map_err(|err| UploadError::Obs {
            bucket: rec.bucket.clone(),
            err,
        })?;
    tracing::info!(bucket = %rec.bucket, object = %rec.object, "log bundle made private");
    Ok(rec)
}

/// `sms-agent-logs/TASK/YYYYMMDDTHHMMSSZ.tar.gz` (the source is named in the bundle's
/// manifest; the key stays short, as some S3 stores keep it in one file name).
fn object_key(task_id: &str, stamp: &str) -> String {
    let clean = |s: &str| -> String {
        let c: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if c.is_empty() {
            "none".into()
        } else {
            c
        }
    };
    format!("sms-agent-logs/{}/{stamp}.tar.gz", clean(task_id))
}
