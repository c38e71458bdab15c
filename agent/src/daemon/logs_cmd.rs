//! UPLOAD_LOG and RSET_LOG_ACL (ref. §5.5.2 table 5-250, line 17325): the daemon's side, on
//! top of `crate::logs::upload`. A failure answers `fail` with SMS.0503 "Log upload failed.
//! Cause: %s" (§6.1 line 24923) and OBS's own reason.

use serde_json::{json, Value};
use transfer::{Code, TaskFailure};

use super::Daemon;
use crate::api::models::CommandParam;
use crate::logs::upload::{self, UploadError};

fn failed(name: &str, e: &UploadError) -> TaskFailure {
    TaskFailure::new(Code::LogUploadFailed, format!("{name}: {e}"))
}

impl Daemon {
    /// UPLOAD_LOG: bundle and upload; `result_detail` {bucket, object, size, sha256}.
    pub(super) async fn upload_log(&mut self, p: &CommandParam) -> Result<Value, TaskFailure> {
        self.set_activity("uploading logs");
        let body = self.probe().await;
        let probe_json = serde_json::to_string_pretty(&body).unwrap_or_default();
        let r = upload::upload(
            &self.log_upload,
            self.service_config.obs_domain.as_deref(),
            &p.task_id,
            &p.bucket,
            &self.source_id(),
            &probe_json,
        )
        .await;
        self.set_activity("waiting for commands");
        let r = r.map_err(|e| failed("UPLOAD_LOG", &e))?;
        Ok(json!({"bucket": r.bucket, "object": r.object, "size": r.size, "sha256": r.sha256}))
    }

    /// RSET_LOG_ACL: the uploaded bundle becomes private; `result_detail` {bucket, object,
    /// acl}.
    pub(super) async fn reset_log_acl(&mut self, p: &CommandParam) -> Result<Value, TaskFailure> {
        let r = upload::reset_acl(
            &self.log_upload,
            self.service_config.obs_domain.as_deref(),
            &p.task_id,
            &p.bucket,
        )
        .await
        .map_err(|e| failed("RSET_LOG_ACL", &e))?;
        Ok(json!({"bucket": r.bucket, "object": r.object, "acl": "private"}))
    }
}
