//! `POST /v3/{task_id}/update-network-check-info` (reference §5.9.1, line 22782): the body is
//! checked against table 5-362 (lines 22807-22821) and kept as the task's
//! `network_check_info`, which `GET /v3/tasks/{id}` shows (§5.4.5, line 11283).

use serde_json::{json, Map, Value};

use super::store::Store;
use super::{bad, no_task, ok, Reply};

/// The figures of table 5-362: name and largest value (all at least 0). Units: the table
/// gives none; the issue and the SDK's subtask `migrate_speed` (Mbit/s) suggest ms for delay
/// and jitter, Mbit/s for the speed and % for the rest.
const FIGURES: &[(&str, f64)] = &[
    ("network_delay", 10_000.0),
    ("network_jitter", 10_000.0),
    ("migration_speed", 10_000.0),
    ("loss_percentage", 100.0),
    ("cpu_usage", 100.0),
    ("mem_usage", 100.0),
];

/// A Double of the body: a JSON number, or a string holding one, as the reference's own
/// example writes them (`"network_delay": "20.00"`, line 22880).
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|x| x.is_finite())
}

/// Checks the body and stores it on the task. Required: the six figures and
/// `evaluation_result` (6–8 characters, line 22821; the example's "" at line 22886
/// contradicts the table, which the emulator follows). Optional: the two connectivity
/// booleans. Anything out of range is SMS.6011 (line 25157), anything missing SMS.6013.
pub(super) fn update(s: &mut Store, task_id: &str, v: &Value) -> Reply {
    let Some(t) = s.db.tasks.get_mut(task_id) else {
        return no_task(task_id);
    };
    let mut info = Map::new();
    for (k, max) in FIGURES {
        let Some(raw) = v.get(*k).filter(|x| !x.is_null()) else {
            return bad("SMS.6013", format!("Incomplete request parameters: {k}"));
        };
        match number(raw) {
            Some(x) if (0.0..=*max).contains(&x) => {
                info.insert((*k).to_string(), json!(x));
            }
            _ => {
                return bad(
                    "SMS.6011",
                    format!("{k} must be a number within 0–{max}: {raw}"),
                )
            }
        }
    }
    match v.get("evaluation_result") {
        Some(Value::String(e)) if (6..=8).contains(&e.chars().count()) => {
            info.insert("evaluation_result".into(), json!(e));
        }
        Some(other) => {
            return bad(
                "SMS.6011",
                format!("evaluation_result must be a string of 6–8 characters: {other}"),
            )
        }
        None => {
            return bad(
                "SMS.6013",
                "Incomplete request parameters: evaluation_result",
            )
        }
    }
    for k in ["domain_connectivity", "destination_connectivity"] {
        match v.get(k) {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => {
                info.insert(k.into(), json!(b));
            }
            Some(other) => return bad("SMS.6011", format!("{k} must be a boolean: {other}")),
        }
    }
    t.body["network_check_info"] = Value::Object(info);
    // Table 5-363: the answer names the task.
    ok(json!({"task_id": task_id}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_numeric_strings_are_doubles() {
        assert_eq!(number(&json!(20.5)), Some(20.5));
        assert_eq!(number(&json!("20.00")), Some(20.0));
        assert_eq!(number(&json!("x")), None);
        assert_eq!(number(&json!(true)), None);
    }
}
