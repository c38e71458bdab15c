//! Block and file transfer engines, wire protocol and TLS setup of sms-agent.
//!
//! This crate is the third stage of the one-way data flow probe → agent → transfer. Its engines
//! (issues "Block-level migration" and "File-level migration") are not written yet; the crate exists
//! so that the workspace layout of `design.md` §2 is fixed from the start.
#![forbid(unsafe_code)]
