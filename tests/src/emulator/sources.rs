//! Source servers: registration (`POST /v3/sources`, checked as the service checks it), the
//! operator's listing, disk info and the copy state with its allowed pairs.

use serde_json::{json, Value};

use super::store::{Source, Store};
use super::{auth, bad, no_source, ok, str_field, Reply};

/// `POST /v3/sources`: registers a new source, or updates the one whose `id` the body names
/// (SMS.6030 when the service does not know it).
pub(super) fn register(s: &mut Store, v: Value) -> Reply {
    if let Err(e) = validate_source(&v) {
        return bad("SMS.6013", format!("Incomplete request parameters: {e}"));
    }
    let id = match str_field(&v, "id").filter(|i| !i.is_empty()) {
        Some(id) if s.db.sources.contains_key(id) => id.to_string(),
        Some(id) => return bad("SMS.6030", format!("Invalid source server ID {id}")),
        None => s.db.new_id(""),
    };
    let e = s.db.sources.entry(id.clone()).or_insert_with(|| Source {
        id: id.clone(),
        body: Value::Null,
        copystate: "UNAVAILABLE".into(),
        migrationcycle: "checking".into(),
        diskinfo: None,
    });
    e.body = v;
    ok(json!({"id": id}))
}

/// `GET /v3/sources`: the sources matching the query's `name`, `ip` and `id`.
pub(super) fn list(s: &Store, query: &str) -> Reply {
    let q: Vec<(String, String)> = query
        .split('&')
        .filter_map(|p| {
            p.split_once('=')
                .map(|(a, b)| (auth::unpct(a), auth::unpct(b)))
        })
        .collect();
    let list: Vec<Value> = s
        .db
        .sources
        .values()
        .filter(|src| q.iter().all(|(k, val)| !matches!(k.as_str(), "name" | "ip" | "id") || str_field(&src.body, k) == Some(val) || (k == "id" && &src.id == val)))
        .map(|src| json!({"id": src.id, "name": src.body["name"], "ip": src.body["ip"], "state": src.copystate.to_ascii_lowercase(), "migration_cycle": src.migrationcycle}))
        .collect();
    ok(json!({"count": list.len(), "source_servers": list}))
}

/// `GET /v3/sources/{id}`: the registration body with `id`, `state` and `migration_cycle`.
pub(super) fn get(s: &Store, id: &str) -> Reply {
    match s.db.sources.get(id) {
        Some(src) => {
            let mut b = src.body.clone();
            b["id"] = json!(src.id);
            b["state"] = json!(src.copystate.to_ascii_lowercase());
            b["migration_cycle"] = json!(src.migrationcycle);
            ok(b)
        }
        None => no_source(id),
    }
}

/// `PUT /v3/sources/{id}/diskinfo`.
pub(super) fn diskinfo(s: &mut Store, id: &str, v: Value) -> Reply {
    match s.db.sources.get_mut(id) {
        Some(src) => {
            if !v["disks"].is_array() {
                return bad("SMS.6013", "Incomplete request parameters: disks");
            }
            src.diskinfo = Some(v);
            ok(json!({}))
        }
        None => no_source(id),
    }
}

/// `PUT /v3/sources/{id}/changestate`: only the pairs [`copystate_pair_ok`] allows.
pub(super) fn changestate(s: &mut Store, id: &str, v: &Value) -> Reply {
    let (Some(cs), Some(cycle)) = (str_field(v, "copystate"), str_field(v, "migrationcycle"))
    else {
        return bad(
            "SMS.6013",
            "Incomplete request parameters: copystate and migrationcycle",
        );
    };
    if !copystate_pair_ok(cs, cycle) {
        return bad(
            "SMS.7728",
            format!("copystate {cs} is not allowed in migrationcycle {cycle}"),
        );
    }
    match s.db.sources.get_mut(id) {
        Some(src) => {
            src.copystate = cs.to_string();
            src.migrationcycle = cycle.to_string();
            ok(json!({}))
        }
        None => no_source(id),
    }
}

/// Checks a registration body as the service does (required fields, enums, types).
pub fn validate_source(v: &Value) -> Result<(), String> {
    let obj = v.as_object().ok_or("body is not a JSON object")?;
    let update = obj
        .get("id")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    let need_str = |k: &str| -> Result<(), String> {
        match obj.get(k) {
            Some(Value::String(_)) => Ok(()),
            Some(_) => Err(format!("{k} must be a string")),
            None => Err(format!("{k} is required")),
        }
    };
    for k in ["name", "os_type", "os_version", "agent_version"] {
        need_str(k)?;
    }
    if !obj.get("networks").is_some_and(Value::is_array) {
        return Err("networks is required and must be an array".into());
    }
    let enum_of = |k: &str, allowed: &[&str]| -> Result<(), String> {
        match obj.get(k).and_then(Value::as_str) {
            Some(x) if !allowed.contains(&x) => Err(format!("{k} {x:?} is not one of {allowed:?}")),
            _ => Ok(()),
        }
    };
    enum_of("os_type", &["WINDOWS", "LINUX"])?;
    enum_of("firmware", &["BIOS", "UEFI"])?;
    enum_of("boot_loader", &["GRUB", "LILO"])?;
    enum_of("start_type", &["MANUAL", "MGC", ""])?;
    enum_of(
        "platform",
        &[
            "hw", "ali", "aws", "azure", "gcp", "tencent", "vmware", "hyperv", "other",
        ],
    )?;
    if obj.get("os_type").and_then(Value::as_str) == Some("LINUX") && !update {
        for k in [
            "ip",
            "hostname",
            "firmware",
            "boot_loader",
            "kernel_version",
            "raw_devices",
            "linux_block_check",
        ] {
            need_str(k)?;
        }
        for k in ["has_rsync", "has_tc", "paravirtualization"] {
            if !obj.get(k).is_some_and(Value::is_boolean) {
                return Err(format!("{k} is required for Linux and must be a boolean"));
            }
        }
        for k in ["disks", "btrfs_list", "volume_groups"] {
            if !obj.get(k).is_some_and(Value::is_array) {
                return Err(format!("{k} is required for Linux and must be an array"));
            }
        }
        for k in ["cpu_quantity", "memory"] {
            if !obj.get(k).is_some_and(Value::is_u64) {
                return Err(format!("{k} must be a non-negative integer"));
            }
        }
    }
    for (i, d) in obj
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        for k in ["name", "device_use"] {
            if str_field(d, k).is_none() {
                return Err(format!("disks[{i}].{k} is required"));
            }
        }
        for k in ["size", "used_size"] {
            if !d.get(k).is_some_and(Value::is_u64) {
                return Err(format!("disks[{i}].{k} must be a non-negative integer"));
            }
        }
        match str_field(d, "partition_style") {
            Some("MBR" | "GPT") | None => {}
            Some(x) => {
                return Err(format!(
                    "disks[{i}].partition_style {x:?} is not MBR or GPT"
                ))
            }
        }
        if !d.get("physical_volumes").is_some_and(Value::is_array) {
            return Err(format!("disks[{i}].physical_volumes is required"));
        }
    }
    Ok(())
}

/// Whether SMS accepts the pair (docs/sms-api.md §5, error SMS.7728).
pub fn copystate_pair_ok(copystate: &str, cycle: &str) -> bool {
    let cs = copystate.to_ascii_lowercase();
    let cs = if cs == "init" {
        "initialize".to_string()
    } else {
        cs
    };
    let common = ["deleting", "stopping", "error", "stopped", "unconnected"];
    let allowed: &[&str] = match cycle {
        "checking" => &["available", "waiting", "unconnected", "unavailable"],
        "setting" => &["waiting", "unconnected"],
        "replicating" => &["initialize", "replicate"],
        "syncing" => &["syncing", "cloning"],
        "cutovering" => &["cutovering"],
        "cutovered" => &["finished"],
        _ => return false,
    };
    allowed.contains(&cs.as_str())
        || (cycle != "checking" && cycle != "setting" && common.contains(&cs.as_str()))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copystate_table() {
        assert!(copystate_pair_ok("WAITING", "checking"));
        assert!(copystate_pair_ok("INIT", "replicating"));
        assert!(copystate_pair_ok("stopped", "syncing"));
        assert!(!copystate_pair_ok("REPLICATE", "checking"));
        assert!(!copystate_pair_ok("SYNCING", "replicating"));
        assert!(!copystate_pair_ok("WAITING", "nonsense"));
    }

    #[test]
    fn source_validation_names_the_field() {
        let e = validate_source(&json!({"name": "x"})).unwrap_err();
        assert!(e.contains("os_type"), "{e}");
        let e = validate_source(&json!({"name": "x", "os_type": "BSD", "os_version": "1", "agent_version": "1", "networks": []})).unwrap_err();
        assert!(e.contains("BSD"), "{e}");
    }
}
