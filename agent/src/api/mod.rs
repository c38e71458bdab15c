//! The SMS API v3 client: request signing, typed bodies, and the HTTP client with retries.

pub mod backoff;
pub mod client;
pub mod models;
pub mod sign;
pub mod time;

pub use client::{ApiError, Client};
