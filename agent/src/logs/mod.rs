//! The agent's own log files and what leaves the host of them: rotation in `log_dir`
//! (`file`), the global sink the `tracing` layers write into (`sink`), secret scrubbing
//! (`redact`) and the `[logs]` settings (`settings`).

pub mod bundle;
pub mod file;
pub mod redact;
pub mod settings;
pub mod sink;
pub mod transfer;
pub mod upload;

pub use settings::{LogFormat, LogsSection};

use crate::config::Config;

/// Starts the log file `NAME.log` in `cfg`'s `log_dir` with its secrets registered for
/// masking. A log directory that cannot be written is reported and the command goes on with
/// stderr / the journal only: losing the files must not stop a migration.
pub fn start_files(cfg: &Config, name: &str) {
    redact::register_config(cfg);
    match sink::install(
        &cfg.agent.log_dir,
        name,
        cfg.agent.log_format,
        cfg.logs.limits(),
    ) {
        Ok(path) => tracing::debug!(file = %path.display(), "logging to file"),
        Err(e) => tracing::warn!(
            log_dir = %cfg.agent.log_dir.display(),
            error = %e,
            "cannot write log files; logging to stderr only"
        ),
    }
}

/// What UPLOAD_LOG needs of `cfg`: directories, `[logs]`, the AK/SK, the extra CA, and the
/// effective configuration as text with its secrets (and the access key id) masked.
pub fn upload_settings(cfg: &Config) -> upload::Settings {
    let (creds, ca, timeout) = match &cfg.access {
        Some(a) => (
            match &a.credentials {
                crate::config::Credentials::Aksk {
                    access_key,
                    secret_key,
                    security_token,
                } => Some(crate::obs::Credentials {
                    access_key: access_key.clone(),
                    secret_key: secret_key.clone(),
                    security_token: security_token.clone(),
                }),
                crate::config::Credentials::Token { .. } => None,
            },
            a.ca.clone(),
            a.timeout,
        ),
        None => (None, None, cfg.api.timeout.0),
    };
    let mut auth = cfg.auth.clone();
    if !auth.access_key.is_empty() {
        auth.access_key = redact::MASK.into();
    }
    let mut api = cfg.api.clone();
    // A proxy URL may carry a user and password.
    if let Some((scheme, rest)) = api.proxy.split_once("://") {
        if let Some((_, host)) = rest.rsplit_once('@') {
            api.proxy = format!("{scheme}://{}@{host}", redact::MASK);
        }
    }
    let config_text = format!(
        "{api:#?}\n{auth:#?}\n{:#?}\n{:#?}\n{:#?}\n{:#?}\n",
        cfg.agent, cfg.probe, cfg.transfer, cfg.logs
    );
    upload::Settings {
        log_dir: cfg.agent.log_dir.clone(),
        state_dir: cfg.agent.state_dir.clone(),
        logs: cfg.logs.clone(),
        creds,
        ca,
        timeout,
        config_text: redact::scrub(&config_text).into_owned(),
    }
}

/// The shipper of `[log_transfer]` `lt`, with the OBS client and region of `s` (`[logs]
/// obs_region`, else the endpoint's, else the service's `mainRegion`).
pub fn shipper(
    s: &upload::Settings,
    lt: &transfer::LogTransfer,
    obs_domain: Option<&str>,
    main_region: Option<&str>,
    source: &str,
    task: &str,
) -> Result<transfer::ship::Shipper, upload::UploadError> {
    let client = s.client(obs_domain)?;
    let endpoint = Some(s.logs.obs_endpoint.as_str())
        .filter(|e| !e.trim().is_empty())
        .or(obs_domain)
        .unwrap_or_default();
    let region = Some(s.logs.obs_region.clone())
        .filter(|r| !r.is_empty())
        .or_else(|| crate::obs::ObsClient::region_of(endpoint))
        .or_else(|| main_region.map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let name = |v: &str, none: &str| {
        if v.is_empty() {
            none.to_string()
        } else {
            v.to_string()
        }
    };
    Ok(transfer::ship::Shipper {
        cfg: lt.clone(),
        log_dir: s.log_dir.clone(),
        state_dir: s.state_dir.clone(),
        client,
        region,
        source: name(source, "unregistered"),
        task: name(task, "agent"),
    })
}
