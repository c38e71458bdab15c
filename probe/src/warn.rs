//! Warnings: what the probe could not read, kept so that the rest of the report still comes out.

use std::fmt;

/// One thing the probe could not read: the device or file it concerns, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The device, file or facility concerned (e.g. `/dev/vdb`, `DMI`, `lvs`).
    pub subject: String,
    /// What went wrong, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.reason)
    }
}

/// Collects warnings during one probe run.
#[derive(Debug, Default)]
pub struct Warnings(Vec<Warning>);

impl Warnings {
    /// Records that `subject` could not be read fully because of `reason`.
    pub fn push(&mut self, subject: impl Into<String>, reason: impl fmt::Display) {
        let w = Warning {
            subject: subject.into(),
            reason: reason.to_string(),
        };
        tracing::debug!(subject = %w.subject, reason = %w.reason, "probe warning");
        self.0.push(w);
    }

    /// The warnings recorded so far, in order.
    pub fn as_slice(&self) -> &[Warning] {
        &self.0
    }

    /// Consumes the collector.
    pub fn into_vec(self) -> Vec<Warning> {
        self.0
    }
}
