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
    match s.db.commands.get_mut(id).and_then(|q| q.front_mut()) {
        Some(c) => {
            c.delivered += 1;
            ok(json!({"command_name": c.command_name, "command_param": c.command_param}))
        }
        None => ok(json!({"command_name": "", "command_param": null})),
    }
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
            q.remove(i);
            s.db.results.push((id.to_string(), v));
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
