//! Tasks: the operator's calls (create, get, delete, action, speed-limit rules, log upload)
//! and the settings the agent reads. Operator actions become commands in the source's queue.

use serde_json::{json, Value};

use super::commands::queue;
use super::store::{Store, TaskRec};
use super::{bad, no_task, ok, str_field, Reply};

/// `POST /v3/tasks`: checks the body, gives each disk the name of its target ECS disk
/// (`relation_name`) when the request left it out, and stores the task as `READY`.
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
    if !s.db.sources.contains_key(&src) {
        return bad("SMS.6030", format!("Invalid source server ID {src}"));
    }
    if !v["target_server"].is_object() {
        return bad("SMS.6031", "The target server information is missing.");
    }
    // Reference §5.4.5 (table 5-148, line 11345; example lines 1235-1252): `name` is the source
    // disk (`/dev/sda`), `relation_name` the disk of the target ECS (`/dev/vda`), and the same
    // for `physical_volumes[]` (`/dev/sda1` -> `/dev/vda1`, table 5-149, line 11361). The create
    // request (§5.4.1, table 5-114, line 9747) has no `relation_name`: the service picks the
    // target disks, here as an ECS names its virtio disks, `/dev/vda`, `/dev/vdb`, ... in the
    // order of `disks[]`, unless the request names one. `name` is never copied.
    if let Some(disks) = v["target_server"]["disks"].as_array_mut() {
        for (i, d) in disks.iter_mut().enumerate().filter(|(_, d)| d.is_object()) {
            if d["relation_name"].as_str().is_none() {
                d["relation_name"] = json!(ecs_disk(i));
            }
            let disk = d["relation_name"].as_str().unwrap_or_default().to_string();
            if let Some(pvs) = d.get_mut("physical_volumes").and_then(Value::as_array_mut) {
                for (j, pv) in pvs.iter_mut().enumerate().filter(|(_, p)| p.is_object()) {
                    if pv["relation_name"].as_str().is_none() {
                        // The partition number of the source device (`/dev/sda1` -> 1), else
                        // its place on the disk.
                        let name = pv["name"].as_str().unwrap_or_default();
                        let digits =
                            name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
                        let num = match &name[name.len() - digits..] {
                            "" => (j + 1).to_string(),
                            n => n.to_string(),
                        };
                        pv["relation_name"] = json!(format!("{disk}{num}"));
                    }
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
            error_json: String::new(),
            sub_tasks: Default::default(),
            speed_limit: Vec::new(),
            consistency: Vec::new(),
            source_id: src,
            certkey: None,
            key_passphrase: None,
            log_collect_status: None,
        },
    );
    ok(json!({"id": id}))
}

/// The name an ECS gives its `i`-th virtio disk: `/dev/vda`, ..., `/dev/vdz`, `/dev/vdaa`, ...
fn ecs_disk(i: usize) -> String {
    let mut n = i;
    let mut letters = Vec::new();
    loop {
        letters.push(char::from(b"abcdefghijklmnopqrstuvwxyz"[n % 26]));
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("/dev/vd{}", letters.iter().rev().collect::<String>())
}

/// The task as `GET /v3/tasks/{id}` shows it: the create body with `id`, `state`,
/// `error_json` (ref. §5.4.5 response, line 11274) and `sub_tasks`.
fn view(t: &TaskRec) -> Value {
    let mut b = t.body.clone();
    b["id"] = json!(t.id);
    b["state"] = json!(t.state);
    b["error_json"] = json!(t.error_json);
    b["log_collect_status"] = json!(t.log_collect_status.as_deref().unwrap_or("INIT"));
    b["sub_tasks"] = Value::Array(t.sub_tasks.values().cloned().collect());
    // `priority` defaults to 1, standard (§5.4.1 line 9682, §5.4.5 line 11252).
    if b.get("priority").is_none_or(Value::is_null) {
        b["priority"] = json!(1);
    }
    b
}

/// `GET /v3/tasks/{id}`.
pub(super) fn get(s: &Store, id: &str) -> Reply {
    match s.db.tasks.get(id) {
        Some(t) => ok(view(t)),
        None => no_task(id),
    }
}

/// The task states of the reference (ref. §5.4.3, line 10240).
const TASK_STATES: &[&str] = &[
    "READY",
    "RUNNING",
    "SYNCING",
    "MIGRATE_SUCCESS",
    "MIGRATE_FAIL",
    "ABORTING",
    "ABORT",
    "DELETING",
    "SYNC_F_ROLLBACKING",
    "SYNC_F_ROLLBACK_SUCCESS",
];

/// `PUT /v3/tasks/{id}` (ref. §5.4.6, line 11779): updates the task. `state` must be one of
/// the reference's task states (SMS.6011 otherwise, line 25157); `error_json` a string of at
/// most 1,024 characters (line 11838; SMS.6014 "The parameter part in the request body is too
/// long" otherwise, line 25160); the other fields of table 5-159 replace the create body's,
/// except `id`. The reference does not say the service moves the task to a failed state by
/// itself when `error_json` is set; the emulator keeps the `state` it is sent.
pub(super) fn update(s: &mut Store, id: &str, v: &Value) -> Reply {
    let Some(obj) = v.as_object() else {
        return bad("SMS.6011", "the body must be a JSON object");
    };
    if let Some(st) = obj.get("state") {
        match st.as_str() {
            Some(st) if TASK_STATES.contains(&st) => {}
            _ => return bad("SMS.6011", format!("state {st} is not a task state")),
        }
    }
    if let Some(ej) = obj.get("error_json") {
        match ej.as_str() {
            Some(ej) if ej.chars().count() > 1024 => {
                return bad("SMS.6014", "error_json is longer than 1024 characters")
            }
            Some(_) => {}
            None => return bad("SMS.6011", "error_json must be a string"),
        }
    }
    let Some(t) = s.db.tasks.get_mut(id) else {
        return no_task(id);
    };
    for (k, val) in obj {
        match k.as_str() {
            "id" => {}
            "state" => t.state = val.as_str().unwrap_or_default().to_string(),
            "error_json" => t.error_json = val.as_str().unwrap_or_default().to_string(),
            _ => t.body[k] = val.clone(),
        }
    }
    ok(json!({}))
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
/// restart: START; stop, skip; network_check: NETWORK_CHECK); the service-side operations are
/// accepted and ignored.
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
            // A new run starts without the last one's error (an assumption: the reference does
            // not say when the service clears `error_json`).
            t.error_json.clear();
            Some("START")
        }
        "stop" => Some("STOP"),
        "skip" => Some("SKIP"),
        // The reference names no command for it (§5.5.1 lists START, STOP, DELETE, SYNC,
        // SKIP), yet only the agent can measure from the source and it hears of the service
        // only through commands; the emulator queues NETWORK_CHECK (an assumption), and the
        // agent answers with update-network-check-info (§5.9.1).
        "network_check" => Some("NETWORK_CHECK"),
        "test" | "clone_test" | "clear" | "migration_test" => None,
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

/// The lowest `agent_version` the service lets upload logs: SMS.7707 "The current Agent
/// version does not support log upload", remedy "agent version ≥ 25.2.0" (ref. §6.1, line
/// 25298).
const LOG_UPLOAD_MIN_AGENT: [u64; 3] = [25, 2, 0];

/// Whether `version` (dotted numbers; anything after the first non-digit of a part is
/// ignored, a missing part is 0) is at least [`LOG_UPLOAD_MIN_AGENT`]. The reference does not
/// say how the service compares versions; numerically part by part is assumed.
fn agent_may_upload_logs(version: &str) -> bool {
    let mut parts = version.trim().split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>().unwrap_or(0)
    });
    let v: [u64; 3] = std::array::from_fn(|_| parts.next().unwrap_or(0));
    v >= LOG_UPLOAD_MIN_AGENT
}

/// `POST /v3/tasks/{id}/log`: the agent gets an UPLOAD_LOG command naming `log_bucket`,
/// unless its registered `agent_version` is below the gate (SMS.7707).
pub(super) fn upload_log(s: &mut Store, id: &str, v: &Value) -> Reply {
    match s.db.tasks.get(id).map(|t| t.source_id.clone()) {
        Some(src) => {
            let version =
                s.db.sources
                    .get(&src)
                    .and_then(|x| str_field(&x.body, "agent_version"))
                    .unwrap_or("");
            if !agent_may_upload_logs(version) {
                return bad(
                    "SMS.7707",
                    format!("The current Agent version does not support log upload ({version:?} < 25.2.0)"),
                );
            }
            let bucket = str_field(v, "log_bucket").unwrap_or("").to_string();
            // ref. §5.4.5 line 10293: the first value after INIT.
            if let Some(t) = s.db.tasks.get_mut(id) {
                t.log_collect_status = Some("TELL_AGENT_TO_COLLECT".into());
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_upload_gate_is_25_2_0() {
        for ok in ["25.2.0", "25.2", "25.10.1", "26.0.0", "100", "25.2.0-rc1"] {
            assert!(agent_may_upload_logs(ok), "{ok}");
        }
        for no in ["0.1.0", "2.2.1", "25.1.9", "24.12.0", "", "x"] {
            assert!(!agent_may_upload_logs(no), "{no}");
        }
    }

    #[test]
    fn ecs_disks_are_named_in_order() {
        let n: Vec<String> = [0, 1, 25, 26, 27].into_iter().map(ecs_disk).collect();
        assert_eq!(
            n,
            ["/dev/vda", "/dev/vdb", "/dev/vdz", "/dev/vdaa", "/dev/vdab"]
        );
    }
}
