//! The test's own calls under `/_emulator`: the journal, the state, faults, the clock, key
//! passphrases and commands queued by hand. They bypass auth and are not journaled.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use super::store::{Cmd, Fault};
use super::{bad, err, no_task, ok, Emu, Reply};

/// Answers one `/_emulator` call.
pub(super) fn call(emu: &Emu, method: &Method, path: &str, body: &[u8]) -> Reply {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let mut s = emu.lock();
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["_emulator", "journal"]) => {
            ok(serde_json::to_value(&s.journal).unwrap_or(Value::Null))
        }
        ("GET", ["_emulator", "state"]) => ok(serde_json::to_value(&s.db).unwrap_or(Value::Null)),
        ("POST", ["_emulator", "faults"]) => match serde_json::from_value::<Fault>(v) {
            Ok(f) => {
                s.faults.push(f);
                ok(json!({}))
            }
            Err(e) => bad("SMS.6011", format!("bad fault: {e}")),
        },
        ("DELETE", ["_emulator", "faults"]) => {
            s.faults.clear();
            ok(json!({}))
        }
        ("POST", ["_emulator", "clock"]) => {
            s.clock_offset = v["offset_secs"].as_i64().unwrap_or(0);
            ok(json!({}))
        }
        ("POST", ["_emulator", "tasks", id, "key-passphrase"]) => match s.db.tasks.get_mut(*id) {
            // Serve this task's private keys encrypted with the passphrase from now on.
            Some(t) => {
                t.key_passphrase = v["passphrase"].as_str().map(str::to_string);
                t.certkey = None;
                s.save();
                ok(json!({}))
            }
            None => no_task(id),
        },
        ("POST", ["_emulator", "sources", id, "commands"]) => {
            let cmd = Cmd {
                command_name: v["command_name"].as_str().unwrap_or("").to_string(),
                command_param: v.get("command_param").cloned().unwrap_or(Value::Null),
                delivered: 0,
            };
            s.db.commands
                .entry((*id).to_string())
                .or_default()
                .push_back(cmd);
            s.save();
            ok(json!({}))
        }
        _ => err(
            StatusCode::NOT_FOUND,
            "SMS.6000",
            format!("no admin call {method} {path}"),
        ),
    }
}
