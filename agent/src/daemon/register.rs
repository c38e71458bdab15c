//! Who this source is to SMS: probe the host, then register it (or update the registration
//! under the saved id, or find the one an earlier run made), retrying until SMS answers.

use reqwest::Method;
use transfer::Code;

use super::{systemd, Daemon, DaemonError};
use crate::api::models::{AgentConfig, IdResponse, PostSourceServerBody};
use crate::api::ApiError;

impl Daemon {
    /// `GET /v3/config` once at start-up, as the reference says the agent does ("the source
    /// agent calls this interface after it starts to get its configuration", ref. §5.2.1,
    /// line 2139). What is kept is [`crate::api::models::ServiceConfig`]; unknown keys are
    /// ignored, missing ones left unset. Not fatal: a service that cannot answer it (the
    /// client has already retried transient failures) leaves the defaults, with a warning.
    pub(super) async fn fetch_service_config(&mut self) {
        match self.api.get::<AgentConfig>("/v3/config", &[]).await {
            Ok(cfg) => {
                self.service_config = cfg.kept();
                tracing::info!(
                    main_region = self.service_config.main_region.as_deref().unwrap_or("-"),
                    obs_domain = self.service_config.obs_domain.as_deref().unwrap_or("-"),
                    keys = cfg.config.len(),
                    regions = cfg.regions.len(),
                    "service configuration read"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "service configuration (GET /v3/config) not read; going on without it");
            }
        }
    }

    /// Probes the host on a blocking thread; the warnings are logged.
    pub(super) async fn probe(&self) -> PostSourceServerBody {
        let opts = self.probe_opts.clone();
        let report = tokio::task::spawn_blocking(move || probe::probe(&opts))
            .await
            .unwrap_or_else(|e| probe::Report {
                body: PostSourceServerBody::default(),
                warnings: vec![probe::Warning {
                    subject: "probe".into(),
                    reason: format!("the probe thread failed: {e}"),
                }],
            });
        for w in &report.warnings {
            tracing::warn!(subject = %w.subject, reason = %w.reason, "probe warning");
        }
        report.body
    }

    /// Registers (or, with a saved id, updates) the source; retries until it succeeds.
    pub(super) async fn register(
        &mut self,
        mut body: PostSourceServerBody,
    ) -> Result<(), DaemonError> {
        self.set_activity("registering");
        if self.state.source_id.is_none() && self.state.registering {
            // A previous run may have registered and died before saving the id.
            if let Some(id) = self.find_registered(&body).await {
                tracing::info!(source_id = %id, "found this source registered by an earlier run");
                self.state.source_id = Some(id);
            }
        }
        let mut attempt = 0;
        loop {
            body.id = self.state.source_id.clone();
            if body.id.is_none() && !self.state.registering {
                self.state.registering = true;
                self.save()?;
            }
            match self
                .api
                .send::<_, IdResponse>(Method::POST, "/v3/sources", &body)
                .await
            {
                Ok(r) if !r.id.is_empty() => {
                    tracing::info!(source_id = %r.id, updated = body.id.is_some(), "registered");
                    self.state.source_id = Some(r.id.clone());
                    self.state.registering = false;
                    self.status.source_id = Some(r.id);
                    self.save()?;
                    return Ok(());
                }
                Ok(_) => self.registration_failed("registration answered without an id", attempt),
                // The saved id names a source SMS no longer has (deleted in the console, or
                // another region): retrying it would never succeed, so register as new. Its
                // task and unsent results went with it.
                Err(ApiError::Status { code, .. })
                    if Code::parse(&code) == Code::InvalidSourceId && body.id.is_some() =>
                {
                    tracing::warn!(
                        source_id = body.id.as_deref().unwrap_or_default(),
                        "SMS does not know the saved source id; registering as a new source"
                    );
                    self.state.source_id = None;
                    self.state.task = None;
                    self.state.pending_results.clear();
                    self.status.source_id = None;
                    continue;
                }
                Err(e) => {
                    self.registration_failed(&format!("registration failed: {e}"), attempt);
                }
            }
            tokio::time::sleep(self.backoff.delay(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    fn registration_failed(&mut self, why: &str, attempt: u32) {
        let msg = format!("{}: {why}", Code::RegistrationFailed);
        tracing::error!(attempt, "{msg}");
        systemd::status(&msg);
        self.status.last_error = Some(msg);
        let _ = self.store.publish(&self.status);
    }

    /// Looks for a source with our name and hostname registered earlier.
    async fn find_registered(&self, body: &PostSourceServerBody) -> Option<String> {
        let q = [
            ("name".to_string(), body.name.clone()),
            ("ip".to_string(), body.ip.clone()),
        ];
        let list: serde_json::Value = self.api.get("/v3/sources", &q).await.ok()?;
        list.get("source_servers")?
            .as_array()?
            .iter()
            .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(body.name.as_str()))
            .and_then(|s| s.get("id")?.as_str().map(str::to_string))
    }
}
