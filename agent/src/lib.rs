//! The library half of `sms-agent`: everything the binary does, usable from tests.
#![forbid(unsafe_code)]

pub mod api;
pub mod blockplan;
pub mod cbt;
pub mod changes;
pub mod config;
pub mod daemon;
pub mod disklayout;
pub mod fileplan;
pub mod freeze;
pub mod logs;
pub mod netcheck;
pub mod obs;
pub mod standalone;
pub mod target_tls;
