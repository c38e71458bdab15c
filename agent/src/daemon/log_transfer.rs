//! `[log_transfer]` in the daemon: each complete window is shipped on a task of its own, so
//! that an OBS outage (retried for `[logs] upload_retry_for`) never holds up commands.

use crate::logs::transfer::ship::{now_secs, read_state, until_due};

use super::Daemon;

impl Daemon {
    /// Starts a shipment when a window is due and none is under way.
    pub(super) fn tick_log_transfer(&mut self) {
        let Some(lt) = self.log_transfer.clone() else {
            return;
        };
        if self.log_ship.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let now = now_secs();
        if now < self.log_ship_next {
            return;
        }
        let st = read_state(&self.log_upload.state_dir);
        let wait = until_due(&st, lt.period, now);
        if st.next_start.is_some() && !wait.is_zero() {
            self.log_ship_next = now + wait.as_secs();
            return;
        }
        let task = self
            .state
            .task
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default();
        let shipper = match crate::logs::shipper(
            &self.log_upload,
            &lt,
            self.service_config.obs_domain.as_deref(),
            self.service_config.main_region.as_deref(),
            &self.source_id(),
            &task,
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "log transfer cannot start; trying again in a minute");
                self.log_ship_next = now + 60;
                return;
            }
        };
        self.log_ship = Some(tokio::spawn(async move {
            if let Err(e) = shipper.ship_due(now_secs()).await {
                tracing::warn!(error = %e, "log transfer failed; the window is shipped at the next attempt");
            }
        }));
    }
}
