//! Tasks: the operator's calls (create, get, delete, action, speed-limit rules, log upload)
//! and the settings the agent reads. Operator actions become commands in the source's queue.

use serde_json::{json, Value};

use super::commands::queue;
use super::store::{Store, TaskRec};
use super::{bad, no_task, ok, str_field, Reply};

/// `POST /v3/tasks`: checks the body, gives each target disk of a source disk its
/// `relation_name` when the request left it out, and stores the task as `READY`.
pub(super) fn create(s: &mut Store, mut v: Value) -> Reply {
    for k in ["name", "type", "os_type"] {
        if str_field(&v, k).is_none() {
            return bad("SMS.6013", format!("Incomplete request parameters: {k}"));
        }
    }
    if !matches!(
        str_field(&v, "type"),
        Some("MIGRATE_FILE" | "MIGRATE_BLOCK")
    ) {
        return bad("SMS.6011", "type must be MIGRATE_FILE or MIGRATE_BLOCK");
    }
    if !matches!(str_field(&v, "os_type"), Some("WINDOWS" | "LINUX")) {
        return bad("SMS.6011", "os_type must be WINDOWS or LINUX");
    }
    let Some(src) = v["source_server"]["id"].as_str().map(str::to_string) else {
        return bad(
            "SMS.6013",
            "Incomplete request parameters: source_server.id",
        );
    };
    let Some(source) = s.db.sources.get(&src) else {
        return bad("SMS.6030", format!("Invalid source server ID {src}"));
    };
    let source_disks: Vec<String> = source.body["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect();
    if !v["target_server"].is_object() {
        return bad("SMS.6031", "The target server information is missing.");
    }
    if let Some(disks) = v["target_server"]["disks"].as_array_mut() {
        for d in disks {
            if let Some(n) = d["name"].as_str().map(str::to_string) {
                if d.get("relation_name").is_none() && source_disks.contains(&n) {
                    d["relation_name"] = json!(n);
                }
            }
        }
    }
    let id = s.db.new_id("t");
    v["id"] = json!(id);
    s.db.tasks.insert(
        id.clone(),
        TaskRec {
            id: id.clone(),
            body: v,
            state: "READY".into(),
            sub_tasks: Default::default(),
            speed_limit: Vec::new(),
            consistency: Vec::new(),
            source_id: src,
            certkey: None,
            key_passphrase: None,
        },
    );
    ok(json!({"id": id}))
}

/// The task as `GET /v3/tasks/{id}` shows it: the create body with `id`, `state` and
/// `sub_tasks`.
fn view(t: &TaskRec) -> Value {
    let mut b = t.body.clone();
    b["id"] = json!(t.id);
    b["state"] = json!(t.state);
    b["sub_tasks"] = Value::Array(t.sub_tasks.values().cloned().collect());
    b
}

/// `GET /v3/tasks/{id}`.
pub(super) fn get(s: &Store, id: &str) -> Reply {
    match s.db.tasks.get(id) {
        Some(t) => ok(view(t)),
        None => no_task(id),
    }
}

/// `DELETE /v3/tasks/{id}`: the agent gets a DELETE command.
pub(super) fn delete(s: &mut Store, id: &str) -> Reply {
    match s.db.tasks.remove(id) {
        Some(t) => {
            queue(s, &t.source_id, "DELETE", json!({"task_id": t.id}));
            ok(json!({}))
        }
        None => no_task(id),
    }
}

/// `POST /v3/tasks/{id}/action`: `operation` becomes the agent's command (start and
/// restart: START; stop, skip); the service-side operations are accepted and ignored.
/// The operations are those of ref. §5.4.7 line 12922; there is no `sync` among them
/// although the section's introduction says it manages "同步任务". The emulator models a
/// sync the way the reference allows: `start` of a task whose copy has completed
/// (`MIGRATE_SUCCESS` or `SYNC_SUCCESS`) queues SYNC. Tests that want SYNC alone queue it
/// with `POST /_emulator/sources/{id}/commands`.
pub(super) fn action(s: &mut Store, id: &str, v: &Value) -> Reply {
    let Some(t) = s.db.tasks.get_mut(id) else {
        return no_task(id);
    };
    let op = str_field(v, "operation").unwrap_or("");
    let command = match op {
        "start" if matches!(t.state.as_str(), "MIGRATE_SUCCESS" | "SYNC_SUCCESS") => {
            t.state = "RUNNING".into();
            Some("SYNC")
        }
        "start" | "restart" => {
            t.state = "RUNNING".into();
            Some("START")
        }
        "stop" => Some("STOP"),
        "skip" => Some("SKIP"),
        "test" | "clone_test" | "network_check" | "clear" | "migration_test" => None,
        other => return bad("SMS.6011", format!("operation {other:?} is not one of start, stop, test, clone_test, restart, network_check, clear, skip, migration_test")),
    };
    let (src, tid) = (t.source_id.clone(), t.id.clone());
    if let Some(c) = command {
        queue(s, &src, c, json!({"task_id": tid}));
    }
    ok(json!({}))
}

/// `GET /v3/tasks/{id}/speed-limit`.
pub(super) fn speed_limit(s: &Store, id: &str) -> Reply {
    match s.db.tasks.get(id) {
        Some(t) => ok(json!({"speed_limit": t.speed_limit})),
        None => no_task(id),
    }
}

/// `POST /v3/tasks/{id}/speed-limit`: replaces the rules.
pub(super) fn set_speed_limit(s: &mut Store, id: &str, v: &Value) -> Reply {
    match (s.db.tasks.get_mut(id), v["speed_limit"].as_array()) {
        (Some(t), Some(rules)) => {
            t.speed_limit = rules.clone();
            ok(json!({}))
        }
        (None, _) => no_task(id),
        (_, None) => bad("SMS.6013", "Incomplete request parameters: speed_limit"),
    }
}

/// `POST /v3/tasks/{id}/log`: the agent gets an UPLOAD_LOG command naming `log_bucket`.
pub(super) fn upload_log(s: &mut Store, id: &str, v: &Value) -> Reply {
    match s.db.tasks.get(id).map(|t| t.source_id.clone()) {
        Some(src) => {
            let bucket = str_field(v, "log_bucket").unwrap_or("").to_string();
            queue(
                s,
                &src,
                "UPLOAD_LOG",
                json!({"task_id": id, "bucket": bucket}),
            );
            ok(json!({}))
        }
        None => no_task(id),
    }
}

/// `POST /v3/tasks/{id}/configuration-setting` (ref. §5.10.1 line 23112): the settings
/// given replace those of the same `config_key` (at most 10 per call, ref. line 23141).
pub(super) fn set_settings(s: &mut Store, id: &str, v: &Value) -> Reply {
    let Some(t) = s.db.tasks.get_mut(id) else {
        return no_task(id);
    };
    let Some(new) = v["configurations"].as_array().filter(|a| a.len() <= 10) else {
        return bad(
            "SMS.6013",
            "configurations: an array of at most 10 settings is required",
        );
    };
    let mut all: Vec<Value> = t.body["configurations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for c in new {
        all.retain(|o| o["config_key"] != c["config_key"]);
        all.push(c.clone());
    }
    t.body["configurations"] = Value::Array(all);
    ok(json!({}))
}

/// `GET /v3/tasks/{id}/configuration-setting`: the `configurations` the task was created with.
pub(super) fn settings(s: &Store, id: &str) -> Reply {
    match s.db.tasks.get(id) {
        Some(t) => ok(
            json!({"configurations": t.body.get("configurations").cloned().unwrap_or(json!([]))}),
        ),
        None => no_task(id),
    }
}
