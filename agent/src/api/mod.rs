//! The SMS API v3 client: request signing, and (later) the typed calls with retries.

pub mod sign;
