//! The agent's own log files and what leaves the host of them: rotation in `log_dir`
//! (`file`), the global sink the `tracing` layers write into (`sink`), secret scrubbing
//! (`redact`) and the `[logs]` settings (`settings`).

pub mod file;
pub mod redact;
pub mod settings;
pub mod sink;

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
