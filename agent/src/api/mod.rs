//! The SMS API v3 client: request signing, typed bodies, and the HTTP client with retries.

pub mod backoff;
pub mod client;
pub mod models;
pub mod sign;
pub mod time;

pub use client::{ApiError, Client};

/// The `agent_version` the agent reports to SMS (`POST /v3/sources`, ref. §5.3.2 line 2749).
///
/// The service gates features on it: SMS.7707 "The current Agent version does not support log
/// upload", whose remedy is "make sure the agent version is at least 25.2.0" (ref. §6.1, line
/// 25298). That is the only documented gate, so the agent reports its lowest accepted value,
/// and claims nothing beyond it. `sms-agent --version` prints this crate's own version and
/// this one (README, "Versions").
pub const REPORTED_AGENT_VERSION: &str = "25.2.0";
