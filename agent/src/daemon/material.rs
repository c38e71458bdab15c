//! What a pass needs from SMS before it starts: TLS material (and the key's passphrase when it
//! is encrypted), speed limits and task settings; none of it is logged, the keys are secrets.

use std::sync::Arc;

use transfer::{Code, TaskFailure};

use crate::api::models::{CertKey, Passphrase, SpeedLimits, TaskSettings};
use crate::api::Client;

/// What a transfer needs from the service.
pub(super) struct Material {
    /// Client TLS config from the task's certificate, key and CA.
    pub(super) tls: Arc<transfer::rustls::ClientConfig>,
    /// Speed limits in force.
    pub(super) rules: Vec<transfer::limit::Rule>,
    /// The task's settings (excludes, consistency check).
    pub(super) settings: TaskSettings,
    /// `LINUX_CPU_LIMIT` (ref. §5.10.1, example line 23196), percent of one CPU.
    pub(super) cpu_limit: Option<u32>,
}

/// Fetches the material of `task_id`; the failure names what could not be obtained.
pub(super) async fn fetch(api: &Client, task_id: &str) -> Result<Material, TaskFailure> {
    let tls = fetch_tls(api, task_id).await?;
    let limits: SpeedLimits = api
        .get(&format!("/v3/tasks/{task_id}/speed-limit"), &[])
        .await
        .map_err(|e| {
            TaskFailure::new(
                Code::ApiNetworkBusy,
                format!("speed limits not obtained: {e}"),
            )
        })?;
    let settings: TaskSettings = api
        .get(&format!("/v3/tasks/{task_id}/configuration-setting"), &[])
        .await
        .map_err(|e| {
            TaskFailure::new(
                Code::ApiNetworkBusy,
                format!("task settings not obtained: {e}"),
            )
        })?;
    let rules = limits
        .speed_limit
        .iter()
        .map(|r| {
            transfer::limit::Rule::new(&r.start, &r.end, r.speed).map_err(|e| {
                // A rule the agent cannot read is an answer not to spec (§6.1 SMS.6011, line 25157).
                TaskFailure::new(
                    Code::BodyNotToSpec,
                    format!("speed-limit rule refused: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cpu_limit = settings
        .configurations
        .iter()
        .filter(|c| c.config_key.trim().eq_ignore_ascii_case("LINUX_CPU_LIMIT"))
        .map(|c| super::engine::cpu::parse(&c.config_value))
        .next_back()
        .transpose()
        .map_err(|e| TaskFailure::new(Code::AdvancedOptionFailed, e))?;
    tracing::info!(
        task_id,
        speed_rules = limits.speed_limit.len(),
        cpu_limit,
        "task material fetched"
    );
    Ok(Material {
        tls,
        rules,
        settings,
        cpu_limit,
    })
}

/// The speed limits of `task_id` as they are now; rules the engine refuses are left out.
pub(super) async fn current_rules(
    api: &Client,
    task_id: &str,
) -> Option<Vec<transfer::limit::Rule>> {
    let l: SpeedLimits = api
        .get(&format!("/v3/tasks/{task_id}/speed-limit"), &[])
        .await
        .ok()?;
    Some(
        l.speed_limit
            .iter()
            .filter_map(|r| transfer::limit::Rule::new(&r.start, &r.end, r.speed).ok())
            .collect(),
    )
}

/// The certificate, key (with its passphrase when encrypted) and CA of `task_id`, loaded now
/// so that a bad certificate fails the task before any data moves.
async fn fetch_tls(
    api: &Client,
    task_id: &str,
) -> Result<Arc<transfer::rustls::ClientConfig>, TaskFailure> {
    let q = [("enable_ca_cert".to_string(), "true".to_string())];
    let ck: CertKey = api
        .get(&format!("/v3/tasks/{task_id}/certkey"), &q)
        .await
        .map_err(|e| {
            TaskFailure::new(
                Code::PrivateKeyNotObtained,
                format!("private key and certificates not obtained: {e}"),
            )
        })?;
    let mut passphrase = None;
    if ck.private_key.contains("ENCRYPTED") {
        let p: Passphrase = api
            .get(&format!("/v3/tasks/{task_id}/passphrase"), &[])
            .await
            .map_err(|e| {
                TaskFailure::new(
                    Code::PassphraseNotObtained,
                    format!("certificate password not obtained: {e}"),
                )
            })?;
        if p.passphrase.is_empty() {
            return Err(TaskFailure::new(
                Code::PassphraseNotObtained,
                "certificate password not obtained: empty passphrase",
            ));
        }
        // Never to be written: masked in logs and log bundles from now on.
        crate::logs::redact::register(&p.passphrase);
        passphrase = Some(p.passphrase);
    }
    transfer::tls::Identity::from_pem(&ck.cert, &ck.private_key, passphrase.as_deref())
        .and_then(|id| transfer::tls::client_config(id, &ck.ca))
        .map_err(|e| {
            TaskFailure::new(
                Code::SslCertNotLoaded,
                format!("SSL certificate not loaded: {e}"),
            )
        })
}
