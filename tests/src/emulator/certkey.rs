//! A task's TLS material: `GET …/certkey` (made once per task, as the service does) and
//! `GET …/passphrase` for its encrypted private keys.

use axum::http::StatusCode;
use serde_json::{json, Value};

use super::store::Store;
use super::{certs, err, no_task, ok, str_field, Reply};

/// `GET /v3/tasks/{id}/certkey`.
pub(super) fn certkey(s: &mut Store, id: &str) -> Reply {
    let Some(t) = s.db.tasks.get_mut(id) else {
        return no_task(id);
    };
    if t.certkey.is_none() {
        let ip = str_field(&t.body, "migration_ip")
            .unwrap_or("127.0.0.1")
            .to_string();
        match certs::certkey(id, &ip, t.key_passphrase.as_deref()) {
            Ok(c) => t.certkey = Some(c),
            Err(e) => {
                return err(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "SMS.6000",
                    format!("cannot make certificates: {e}"),
                )
            }
        }
    }
    ok(t.certkey.clone().unwrap_or(Value::Null))
}

/// `GET /v3/tasks/{id}/passphrase`: empty when the keys are not encrypted.
pub(super) fn passphrase(s: &Store, id: &str) -> Reply {
    match s.db.tasks.get(id) {
        Some(t) => {
            ok(json!({"task_id": t.id, "passphrase": t.key_passphrase.clone().unwrap_or_default()}))
        }
        None => no_task(id),
    }
}
