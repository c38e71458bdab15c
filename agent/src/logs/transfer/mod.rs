//! Periodic log transfer to OBS with the semantics of the Log Tank Service's transfer task
//! (LTS API "Creating a Log Transfer Task", `POST /v2/{project_id}/log-dump/obs`): `lts` is
//! the `[log_transfer]` section and its validation with LTS's codes, `window` the wall-clock
//! windows and object keys, `ship` the exactly-once shipping with a durable offset.

pub mod lts;
pub mod ship;
pub mod window;

pub use lts::{LogTransfer, RawLogTransfer, StorageFormat};
