//! The command queue of each source: the agent's poll (`GET …/command`), its result
//! (`POST …/command_result`), and the queueing the operator calls do.

use serde_json::{json, Value};

use super::store::{Cmd, Store};
use super::{bad, no_source, ok, str_field, Reply};

/// Queues command `name` for `source`.
pub(super) fn queue(s: &mut Store, source: &str, name: &str, param: Value) {
    s.db.commands
        .entry(source.to_string())
        .or_default()
        .push_back(Cmd {
            command_name: name.to_string(),
            command_param: param,
            delivered: 0,
        });
}

/// `GET /v3/sources/{id}/command`: the oldest command without a result, handed out again
/// until its result arrives; an empty name when there is none.
pub(super) fn poll(s: &mut Store, id: &str) -> Reply {
    if !s.db.sources.contains_key(id) {
        return no_source(id);
    }
    let Some(c) = s.db.commands.get_mut(id).and_then(|q| q.front_mut()) else {
        return ok(json!({"command_name": "", "command_param": null}));
    };
    c.delivered += 1;
    let answer = json!({"command_name": c.command_name, "command_param": c.command_param});
    // Handing out a log command waits for the agent's answer (`log_collect_status`, ref.
    // §5.4.5 line 10293; the order of its values is assumed, see `log_collection_step`).
    let waiting = match c.command_name.as_str() {
        "UPLOAD_LOG" => Some("WAIT_AGENT_COLLECT_ACK"),
        "RSET_LOG_ACL" => Some("WAIT_AGENT_RESET_ACL_ACK"),
        _ => None,
    };
    let tid = c.command_param["task_id"]
        .as_str()
        .unwrap_or("")
        .to_string();
    if let Some(st) = waiting {
        set_log_status(s, &tid, st);
    }
    ok(answer)
}

/// `POST /v3/sources/{id}/command_result`: takes the command off the queue.
pub(super) fn result(s: &mut Store, id: &str, v: Value) -> Reply {
    let Some(name) = str_field(&v, "command_name") else {
        return bad("SMS.6020", "The command name is missing.");
    };
    if !matches!(str_field(&v, "result"), Some("success" | "fail")) {
        return bad("SMS.6022", "Incorrect result format.");
    }
    if !v.get("result_detail").is_some_and(Value::is_object) {
        return bad("SMS.6023", "Incorrect result_detail format.");
    }
    let name = name.to_string();
    let q = s.db.commands.entry(id.to_string()).or_default();
    match q.iter().position(|c| c.command_name == name) {
        Some(i) => {
            let cmd = q.remove(i);
            let success = str_field(&v, "result") == Some("success");
            s.db.results.push((id.to_string(), v));
            if let Some(c) = cmd {
                log_collection_step(s, id, &c, success);
            }
            ok(json!({}))
        }
        None if name == "UPLOAD_LOG" || name == "RSET_LOG_ACL" => {
            s.db.results.push((id.to_string(), v));
            ok(json!({}))
        }
        None => bad(
            "SMS.6021",
            format!("The command {name} from the Agent is inconsistent with that from SMS."),
        ),
    }
}

fn set_log_status(s: &mut Store, task_id: &str, status: &str) {
    if let Some(t) = s.db.tasks.get_mut(task_id) {
        t.log_collect_status = Some(status.to_string());
    }
}

/// The log collection after an agent's answer, through the `log_collect_status` values of
/// ref. §5.4.5 line 10293. The reference lists the values, not the transitions; assumed
/// here: UPLOAD_LOG success → AGENT_COLLECT_SUCCESS, the service's own collection
/// (WAIT_SERVER_COLLECT → SERVER_COLLECT_SUCCESS, immediate in the emulator), then
/// TELL_AGENT_RESET_ACL with an RSET_LOG_ACL queued for the same task and bucket; failure →
/// AGENT_COLLECT_FAIL. RSET_LOG_ACL's answer ends it: SERVER_COLLECT_SUCCESS when the ACL
/// was reset, SERVER_COLLECT_FAIL when not (the reference has no value of its own for a
/// failed reset).
fn log_collection_step(s: &mut Store, source: &str, c: &Cmd, success: bool) {
    let tid = c.command_param["task_id"]
        .as_str()
        .unwrap_or("")
        .to_string();
    match (c.command_name.as_str(), success) {
        ("UPLOAD_LOG", true) => {
            set_log_status(s, &tid, "AGENT_COLLECT_SUCCESS");
            set_log_status(s, &tid, "WAIT_SERVER_COLLECT");
            set_log_status(s, &tid, "SERVER_COLLECT_SUCCESS");
            set_log_status(s, &tid, "TELL_AGENT_RESET_ACL");
            let param = c.command_param.clone();
            queue(s, source, "RSET_LOG_ACL", param);
        }
        ("UPLOAD_LOG", false) => set_log_status(s, &tid, "AGENT_COLLECT_FAIL"),
        ("RSET_LOG_ACL", true) => set_log_status(s, &tid, "SERVER_COLLECT_SUCCESS"),
        ("RSET_LOG_ACL", false) => set_log_status(s, &tid, "SERVER_COLLECT_FAIL"),
        _ => {}
    }
}
