//! The SMS reference's own JSON examples (`tests/fixtures/reference/`, copied from
//! `sms-api-reference.zh.txt`; README there gives each file's lines and the few repairs the
//! PDF extraction made necessary) replayed through the agent's models and through the
//! emulator, so that a misread field name, type or meaning fails here rather than in the field.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use sms_agent::api::models::{
    AgentConfig, CertKey, ChangeState, Command, CommandResult, ConsistencyResults, DiskInfo,
    PostSourceServerBody, Progress, SpeedLimits, TargetServer, Task, TaskSettings,
};
use sms_tests::procs::Emulator;

fn fixture(name: &str) -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/reference")
        .join(name);
    let text = std::fs::read_to_string(&p).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every object key of `v` as a path (`disks[].physical_volumes[].name`); array elements
/// merged.
fn keys(v: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, at: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    out.insert(p.clone());
                    walk(x, &p, out);
                }
            }
            Value::Array(a) => {
                for x in a {
                    walk(x, &format!("{at}[]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(v, "", &mut out);
    out
}

/// The example read into our model `T`, and our model written back.
fn through<T: DeserializeOwned + Serialize>(name: &str) -> (Value, T, Value) {
    let ex = fixture(name);
    let model: T = serde_json::from_value(ex.clone())
        .unwrap_or_else(|e| panic!("{name}: the reference's example does not parse: {e}"));
    let ours = serde_json::to_value(&model).unwrap();
    (ex, model, ours)
}

/// Btrfs names where the reference disagrees with itself (ambiguity): the example of §5.3.2
/// (lines 3002-3060) writes `global_reserve1`, `default_subvol_id`, `subvolume`; table 5-23
/// (lines 2800-2822) `global_reserve_1`, `default_subvol_id`, `subvolumn`; the official SDK
/// `global_reserve1`, `default_subvolid`, `subvolumn`. We send the SDK's names (docs/sms-api.md)
/// and read all three spellings; the example's names map to ours here.
fn renamed(k: &BTreeSet<String>) -> BTreeSet<String> {
    k.iter()
        .map(|p| {
            p.replace(".default_subvol_id", ".default_subvolid")
                .replace(".subvolume", ".subvolumn")
        })
        .collect()
}

/// A request the agent sends: every field of the reference's example survives our model
/// under the same name, and every field we send that the example lacks is one `optional`
/// lists (each an optional field of the reference's request table).
fn request<T: DeserializeOwned + Serialize>(name: &str, optional: &[&str]) -> (Value, T) {
    let (ex, model, ours) = through::<T>(name);
    let (want, got) = (renamed(&keys(&ex)), keys(&ours));
    let lost: Vec<_> = want.difference(&got).collect();
    assert!(lost.is_empty(), "{name}: our model drops {lost:?}");
    let extra: Vec<_> = got
        .difference(&want)
        .filter(|k| {
            !optional
                .iter()
                .any(|o| k == o || k.starts_with(&format!("{o}.")))
        })
        .collect();
    assert!(
        extra.is_empty(),
        "{name}: we send fields the reference's example does not name: {extra:?}"
    );
    (ex, model)
}

/// A response the agent parses: the fields our model reads all appear in the example.
fn response<T: DeserializeOwned + Serialize>(name: &str) -> (Value, T) {
    let (ex, model, ours) = through::<T>(name);
    let (have, read) = (keys(&ex), keys(&ours));
    let unknown: Vec<_> = read.iter().filter(|k| !have.contains(*k)).collect();
    if !unknown.is_empty() {
        // Not a failure: an example shows one case (a Windows task, no rules), not every field.
        eprintln!("{name}: fields our model reads that this example does not show: {unknown:?}");
    }
    (ex, model)
}

#[test]
fn request_examples_match_the_agents_models() {
    // §5.3.2 registration (lines 2898-3216). Fields we send beyond the example: optional
    // fields of table 5-20/5-21/5-22 (lines 2709-2800).
    let (_, reg) = request::<PostSourceServerBody>(
        "sources.request.json",
        &[
            "hostname",
            "cpu_quantity",
            "memory",
            "has_tc",
            "raw_devices",
            "start_type",
            "system_dir",
            "oem_system",
            "volume_groups",
            "networks",
            "btrfs_list",
            "disks[]",
            "id",
            "ip",
            // Table 5-25 (line 2836): `mtu`, "Linux必选", yet not in the example.
            "networks[].mtu",
            // Table 5-26/5-27 (lines 2840-2860): optional.
            "volume_groups[].free_size",
            "volume_groups[].logical_volumes[].block_count",
            "volume_groups[].logical_volumes[].block_size",
        ],
    );
    assert_eq!(reg.disks[0].name, "/dev/vda");
    // §5.3.10 diskinfo (lines 8146-8220): note the spelling `volumegroups`.
    let (_, di) = request::<DiskInfo>(
        "diskinfo.request.json",
        &["btrfs_list", "disks[]", "volumegroups[]"],
    );
    assert_eq!(di.volumegroups[0].name, "vg1");
    // §5.3.6 changestate (lines 6573-6583).
    // Its pair contradicts the SMS.7728 table of §6.1 (line 25321); see the emulator test.
    let (_, cs) = request::<ChangeState>("changestate.request.json", &[]);
    assert!(!cs.is_valid(), "{cs:?}");
    // §5.4.8 progress (lines 14402-14415): the optional metrics of table 5-? are ours.
    let (_, p) = request::<Progress>("progress.request.json", &[]);
    assert_eq!(
        (p.subtask_name.as_str(), p.totalsize),
        ("ATTACH_AGENT_IMAGE", 100_000)
    );
    // §5.5.2 command_result (lines 17389-17402).
    request::<CommandResult>("command_result.request.json", &[]);
    // §5.4.14 consistency-result (lines 16354-16376).
    let (_, c) = request::<ConsistencyResults>("consistency-result.request.json", &[]);
    assert_eq!(c.consistency_result.len(), 2);
}

#[test]
fn response_examples_parse_in_the_agents_models() {
    // §5.4.5 task (lines 11455-11502, the first, complete block of the example).
    let (_, t) = response::<Task>("task.response.json");
    assert_eq!(
        (t.kind.as_str(), t.state.as_str()),
        ("MIGRATE_BLOCK", "RUNNING")
    );
    // §4.2 (lines 1227-1267): a Linux task's target_server. `name` is the source disk,
    // `relation_name` the disk of the target ECS (table 5-148, line 11345).
    let (_, ts) = response::<TargetServer>("task-linux-target_server.json");
    let d = &ts.disks[0];
    assert_eq!(
        (d.name.as_str(), d.relation_name.as_deref()),
        ("/dev/sda", Some("/dev/vda"))
    );
    let pv = &d.physical_volumes[0];
    assert_eq!(
        (
            pv.name.as_str(),
            pv.relation_name.as_deref(),
            pv.mount_point.as_str()
        ),
        ("/dev/sda1", Some("/dev/vda1"), "/")
    );
    // §5.5.1 command (lines 17093-17109).
    let (_, c) = response::<Command>("command.response.json");
    assert_eq!(c.command_name, "START");
    assert_eq!(
        c.command_param.unwrap().task_id,
        "xxxxxxxxxxxxxxxxxxxxxx00000001"
    );
    // §5.7.1 certkey (lines 20783-20800): all seven PEMs.
    let (_, ck) = response::<CertKey>("certkey.response.json");
    for pem in [
        &ck.ca,
        &ck.cert,
        &ck.private_key,
        &ck.target_mgmt_cert,
        &ck.target_mgmt_private_key,
        &ck.target_data_cert,
        &ck.target_data_private_key,
    ] {
        assert!(pem.starts_with("-----BEGIN "), "{pem}");
    }
    // §5.4.9 speed-limit (lines 14698-14713).
    let (_, sl) = response::<SpeedLimits>("speed-limit.response.json");
    let r = &sl.speed_limit[0];
    assert_eq!(
        (r.start.as_str(), r.end.as_str(), r.speed),
        ("00:00", "23:59", 1000)
    );
    assert_eq!(r.over_speed_threshold, Some(50.0));
    // §5.10.2 configuration-setting (lines 23545-23559).
    let (_, s) = response::<TaskSettings>("configuration-setting.response.json");
    assert_eq!(s.configurations[0].config_key, "MIGRATE_EXCLUDE_PATH");
    assert_eq!(s.configurations[0].config_value, json!("/test"));
    // §5.2.1 config (lines 2199-2219).
    let (_, c) = response::<AgentConfig>("config.response.json");
    assert_eq!(c.config["mainRegion"], "ap-southeast-1");
}

/// The emulator takes the reference's request examples as they are, and answers the
/// agent's calls with at least the fields the reference's response examples show for what
/// the agent reads.
#[test]
fn the_emulator_takes_the_request_examples_and_answers_like_the_response_examples() {
    let emu = Emulator::start();
    // Ambiguity: table 5-20 (lines 2709-2765) makes `hostname` ("注册源端必选"), `raw_devices`
    // and `has_tc` ("Linux系统此参数为必选") required at registration, and the example of
    // §5.3.2 has none of them. The emulator follows the table: the example is refused for
    // exactly those, and accepted once they are added.
    let mut body = fixture("sources.request.json");
    let mut added = Vec::new();
    let src = loop {
        let (st, v) = emu.operator("POST", "/v3/sources", Some(body.clone()));
        if st == 200 {
            break v;
        }
        let msg = v["error_msg"].as_str().unwrap_or_default().to_string();
        let (field, value) = match ["hostname", "raw_devices", "has_tc"]
            .into_iter()
            .find(|f| msg.split_whitespace().any(|w| w == *f))
        {
            Some("has_tc") => ("has_tc", json!(true)),
            Some(f) => (f, json!("")),
            None => panic!("the example is refused for more than the table's fields: {v}"),
        };
        assert!(!added.contains(&field), "{v}");
        added.push(field);
        body[field] = value;
    };
    assert!(added.len() <= 3, "{added:?}");
    let sid = src["id"].as_str().unwrap().to_string();
    let (st, v) = emu.operator(
        "PUT",
        &format!("/v3/sources/{sid}/diskinfo"),
        Some(fixture("diskinfo.request.json")),
    );
    assert_eq!(st, 200, "{v}");
    // A task of the source, as §5.4.1's example creates one (lines 9840-9880).
    let (st, task) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "MigrationTask", "type": "MIGRATE_BLOCK", "os_type": "LINUX",
            "migration_ip": "192.168.0.1", "source_server": {"id": sid},
            "target_server": {"name": "Auto-tar-name", "disks": [{"name": "/dev/vda", "size": 42949672960u64,
                "used_size": 429496, "device_use": "BOOT", "physical_volumes": [{"index": 0,
                "name": "/dev/vda1", "device_use": "OS", "file_system": "ext4", "mount_point": "/",
                "size": 42947575808u64, "used_size": 5346484224u64}]}]}})),
    );
    assert_eq!(st, 200, "{task}");
    let tid = task["id"].as_str().unwrap().to_string();
    let (st, v) = emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({"operation": "start"})),
    );
    assert_eq!(st, 200, "{v}");
    // Responses: what the agent reads of each example is in the emulator's answer.
    for (path, example, model) in [
        (format!("/v3/tasks/{tid}"), "task.response.json", "task"),
        (
            format!("/v3/sources/{sid}/command"),
            "command.response.json",
            "command",
        ),
        (
            // (`enable_ca_cert` defaults to true, table 5-319, line 20699.)
            format!("/v3/tasks/{tid}/certkey"),
            "certkey.response.json",
            "certkey",
        ),
        (
            format!("/v3/tasks/{tid}/speed-limit"),
            "speed-limit.response.json",
            "speed",
        ),
        (
            format!("/v3/tasks/{tid}/configuration-setting"),
            "configuration-setting.response.json",
            "settings",
        ),
        ("/v3/config".to_string(), "config.response.json", "config"),
    ] {
        let (st, got) = emu.operator("GET", &path, None);
        assert_eq!(st, 200, "{path}: {got}");
        let read = |v: &Value| -> Value {
            match model {
                "task" => serde_json::to_value(serde_json::from_value::<Task>(v.clone()).unwrap()),
                "command" => {
                    serde_json::to_value(serde_json::from_value::<Command>(v.clone()).unwrap())
                }
                "certkey" => {
                    serde_json::to_value(serde_json::from_value::<CertKey>(v.clone()).unwrap())
                }
                "speed" => {
                    serde_json::to_value(serde_json::from_value::<SpeedLimits>(v.clone()).unwrap())
                }
                "settings" => {
                    serde_json::to_value(serde_json::from_value::<TaskSettings>(v.clone()).unwrap())
                }
                _ => {
                    serde_json::to_value(serde_json::from_value::<AgentConfig>(v.clone()).unwrap())
                }
            }
            .unwrap()
        };
        // Top-level fields the example has and the agent reads must be in the emulator's answer.
        let ex = fixture(example);
        let wanted: Vec<String> = read(&ex)
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| ex.get(*k).is_some_and(|v| !v.is_null()))
            .cloned()
            .collect();
        for k in wanted {
            // The task's `speed_limit` (line 11474) belongs to the task-settings work, which
            // changes how the emulator shows it; left out here.
            if model == "task" && k == "speed_limit" {
                continue;
            }
            assert!(
                got.get(&k).is_some(),
                "{path}: the emulator's answer lacks {k:?} of the reference's example: {got}"
            );
        }
        read(&got);
    }
    // The task shows the target ECS disks the way §5.4.5 does (line 1239).
    let (_, t) = emu.operator("GET", &format!("/v3/tasks/{tid}"), None);
    let d = &t["target_server"]["disks"][0];
    assert_eq!(
        (d["name"].as_str(), d["relation_name"].as_str()),
        (Some("/dev/vda"), Some("/dev/vda"))
    );
    assert_eq!(
        d["physical_volumes"][0]["relation_name"].as_str(),
        Some("/dev/vda1")
    );
    // Requests the agent sends, verbatim from the reference.
    for (method, path, example) in [
        (
            "PUT",
            format!("/v3/tasks/{tid}/progress"),
            "progress.request.json",
        ),
        (
            "POST",
            format!("/v3/tasks/{tid}/consistency-result"),
            "consistency-result.request.json",
        ),
        (
            "POST",
            format!("/v3/sources/{sid}/command_result"),
            "command_result.request.json",
        ),
    ] {
        let (st, v) = emu.operator(method, &path, Some(fixture(example)));
        assert_eq!(st, 200, "{method} {path} with {example}: {v}");
    }
    // Ambiguity: §5.3.6's example (lines 6579-6582) sends WAITING/cutovered, a pair the
    // SMS.7728 table of §6.1 (line 25321) refuses (cutovered: finished, deleting, stopping,
    // error, stopped, unconnected). The emulator, like the agent's `ChangeState::is_valid`,
    // follows the error table.
    let (st, v) = emu.operator(
        "PUT",
        &format!("/v3/sources/{sid}/changestate"),
        Some(fixture("changestate.request.json")),
    );
    assert_eq!(
        (st, v["error_code"].as_str()),
        (400, Some("SMS.7728")),
        "{v}"
    );
    let (st, v) = emu.operator(
        "PUT",
        &format!("/v3/sources/{sid}/changestate"),
        Some(json!({"copystate": "FINISHED", "migrationcycle": "cutovered"})),
    );
    assert_eq!(st, 200, "{v}");
}
