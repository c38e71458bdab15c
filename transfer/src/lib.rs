//! Block and file transfer engines, wire protocol and TLS setup of sms-agent.
//!
//! This crate is the third stage of the one-way data flow probe → agent → transfer. So far it
//! holds the mutual-TLS setup from the PEMs SMS hands out (`tls`) and the certificates of
//! standalone mode (`certs`); the wire protocol and the
//! engines of the block- and file-level issues come next.
#![forbid(unsafe_code)]

pub mod certs;
pub mod tls;
