//! An OBS client for what the agent puts there: log bundles. OBS speaks the S3 REST API with
//! signature V4 (`sigv4`); `client` makes the calls (single PUT, multipart with resume,
//! canned ACL) and `xml` reads the few fields of OBS's answers the agent needs.

pub mod client;
pub mod sigv4;
mod xml;

pub use client::{Credentials, ObsClient, ObsError, UploadSpec};
