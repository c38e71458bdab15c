//! Routing of the SMS API calls: the path split into segments, the JSON body parsed, then one
//! handler per call, each in the module of its resource. A successful call that changes
//! anything is persisted before it is answered.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};

use super::store::Store;
use super::{auth, bad, certkey, commands, err, netcheck, ok, reports, sources, tasks, Emu, Reply};

/// Answers one authenticated API call.
pub(super) fn api(emu: &Emu, method: &Method, path: &str, query: &str, body: &[u8]) -> Reply {
    let mut segs: Vec<String> = path.trim_matches('/').split('/').map(auth::unpct).collect();
    // The reference's examples write `/v3/{task_id}/consistency-result` where its URI table
    // says `/v3/tasks/{task_id}/…`; accept both.
    if segs.len() == 3 && segs[0] == "v3" && segs[2] == "consistency-result" {
        segs.insert(1, "tasks".into());
    }
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let v: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return bad(
                    "SMS.6010",
                    format!("The request body is not in the JSON format: {e}"),
                )
            }
        }
    };
    let mut s = emu.lock();
    let reply = route(&mut s, method.as_str(), &segs, query, v).unwrap_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            "SMS.6000",
            format!("{method} {path} is not emulated"),
        )
    });
    if reply.0.is_success() && *method != Method::GET {
        s.save();
    }
    reply
}

/// The handler of `method` on `segs`, or `None` for a call the emulator does not know.
fn route(s: &mut Store, method: &str, segs: &[&str], query: &str, v: Value) -> Option<Reply> {
    Some(match (method, segs) {
        // The reference's example answer, verbatim (ref. §5.2.1, lines 2206–2218).
        // With `obs_domain` added when the emulator was given one (--obs-domain).
        ("GET", ["v3", "config"]) => {
            let mut config = json!({"mainRegion": "ap-southeast-1", "disktype": "SATA"});
            if let Some(d) = &s.obs_domain {
                config["obs_domain"] = json!(d);
            }
            ok(json!({
                "config": config,
                "regions": [
                    {"region_name": "cn-north-1", "project_name": "cn-north-1"},
                    {"region_name": "cn-north-4", "project_name": "cn-north-4"}
                ]
            }))
        }
        ("POST", ["v3", "sources"]) => sources::register(s, v),
        ("GET", ["v3", "sources"]) => sources::list(s, query),
        ("GET", ["v3", "sources", id]) => sources::get(s, id),
        ("PUT", ["v3", "sources", id, "diskinfo"]) => sources::diskinfo(s, id, v),
        ("PUT", ["v3", "sources", id, "changestate"]) => sources::changestate(s, id, &v),
        ("GET", ["v3", "sources", id, "command"]) => commands::poll(s, id),
        ("POST", ["v3", "sources", id, "command_result"]) => commands::result(s, id, v),
        ("POST", ["v3", "tasks"]) => tasks::create(s, v),
        ("GET", ["v3", "tasks", id]) => tasks::get(s, id),
        ("PUT", ["v3", "tasks", id]) => tasks::update(s, id, &v),
        ("DELETE", ["v3", "tasks", id]) => tasks::delete(s, id),
        ("POST", ["v3", "tasks", id, "action"]) => tasks::action(s, id, &v),
        ("GET", ["v3", "tasks", id, "speed-limit"]) => tasks::speed_limit(s, id),
        ("POST", ["v3", "tasks", id, "speed-limit"]) => tasks::set_speed_limit(s, id, &v),
        ("POST", ["v3", "tasks", id, "log"]) => tasks::upload_log(s, id, &v),
        ("GET", ["v3", "tasks", id, "configuration-setting"]) => tasks::settings(s, id),
        ("POST", ["v3", "tasks", id, "configuration-setting"]) => tasks::set_settings(s, id, &v),
        ("PUT", ["v3", "tasks", id, "progress"]) => reports::progress(s, id, &v),
        ("POST", ["v3", "tasks", id, "consistency-result"]) => reports::put_consistency(s, id, &v),
        ("GET", ["v3", "tasks", id, "consistency-result"]) => reports::consistency(s, id),
        ("POST", ["v3", task, "update-network-check-info"]) => netcheck::update(s, task, &v),
        ("GET", ["v3", "tasks", id, "certkey"]) => certkey::certkey(s, id),
        ("GET", ["v3", "tasks", id, "passphrase"]) => certkey::passphrase(s, id),
        _ => return None,
    })
}
