//! What the agent reports about a task: progress (`PUT …/progress`), which also moves the
//! task's `state` and `sub_tasks`, and consistency results.

use serde_json::{json, Value};

use super::store::Store;
use super::{bad, no_task, ok, str_field, Reply};

/// Subtask names the service knows (reference §5.4.8 and its examples); an agent on Linux
/// reports the MIGRATE/SYNC ones, the service side the rest.
const SUBTASKS: &[&str] = &[
    "MIGRATE_LINUX_BLOCK",
    "MIGRATE_LINUX_FILE",
    "SYNC_LINUX_BLOCK",
    "SYNC_LINUX_FILE",
    "MIGRATE_WINDOWS_BLOCK",
    "SYNC_WINDOWS_BLOCK",
    "CREATE_CLOUD_SERVER",
    "SSL_CONFIG",
    "ATTACH_AGENT_IMAGE",
    "DETTACH_AGENT_IMAGE",
    "DETACH_AGENT_IMAGE",
    "FORMAT_DISK_LINUX",
    "FORMAT_DISK_LINUX_FILE",
    "FORMAT_DISK_LINUX_BLOCK",
    "FORMAT_DISK_WINDOWS",
    "CONFIGURE_LINUX",
    "CONFIGURE_LINUX_FILE",
    "CONFIGURE_LINUX_BLOCK",
    "CONFIGURE_WINDOWS",
    "CLONE_TEST",
];

/// Most entries of one consistency-result upload (reference §5.4.14).
const MAX_CONSISTENCY: usize = 30;

/// `PUT /v3/tasks/{id}/progress`: checks the body as the service does; a subtask at 100 %
/// makes the task `MIGRATE_SUCCESS` or `SYNC_SUCCESS`, anything else `RUNNING`.
pub(super) fn progress(s: &mut Store, id: &str, v: &Value) -> Reply {
    let Some(t) = s.db.tasks.get_mut(id) else {
        return no_task(id);
    };
    let Some(name) = str_field(v, "subtask_name") else {
        return bad("SMS.6013", "Incomplete request parameters: subtask_name");
    };
    if !SUBTASKS.contains(&name) {
        return bad("SMS.6004", format!("Invalid subtask name {name}"));
    }
    for k in ["progress", "replicatesize", "totalsize"] {
        if !v.get(k).is_some_and(Value::is_u64) {
            return bad("SMS.6013", format!("Incomplete request parameters: {k}"));
        }
    }
    let progress = v["progress"].as_u64().unwrap_or(0);
    if progress > 100 || str_field(v, "process_trace").is_none_or(|p| p.chars().count() > 2048) {
        return bad(
            "SMS.6011",
            "progress must be 0-100 and process_trace at most 2048 characters",
        );
    }
    t.state = match (progress, name.starts_with("SYNC")) {
        (100, false) => "MIGRATE_SUCCESS",
        (100, true) => "SYNC_SUCCESS",
        _ => "RUNNING",
    }
    .into();
    t.sub_tasks.insert(
        name.to_string(),
        json!({"name": name, "progress": progress, "process_trace": v["process_trace"], "migrate_speed": v.get("migrate_speed")}),
    );
    ok(json!({}))
}

/// `POST /v3/tasks/{id}/consistency-result`: replaces the task's results.
pub(super) fn put_consistency(s: &mut Store, id: &str, v: &Value) -> Reply {
    match (s.db.tasks.get_mut(id), v["consistency_result"].as_array()) {
        (Some(t), Some(r)) if r.len() <= MAX_CONSISTENCY => {
            t.consistency = r.clone();
            ok(json!({}))
        }
        (None, _) => no_task(id),
        _ => bad(
            "SMS.6011",
            "consistency_result must be an array of at most 30 entries",
        ),
    }
}

/// `GET /v3/tasks/{id}/consistency-result`.
pub(super) fn consistency(s: &Store, id: &str) -> Reply {
    match s.db.tasks.get(id) {
        Some(t) => ok(json!({"consistency_result": t.consistency})),
        None => no_task(id),
    }
}
