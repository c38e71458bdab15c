//! The emulator against independent clients: the official Python SDK (its own signer and models)
//! and hand-made requests.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use serde_json::json;
use sms_tests::procs::{http, Emulator, AK, SK};

#[test]
fn the_official_python_sdk_is_accepted() {
    let emu = Emulator::start();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/sdk_client.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([&emu.url(), AK, SK])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the SDK client failed (is `pip install huaweicloudsdksms` done? .ci/run does it):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let j = emu.journal();
    assert!(j.iter().filter(|e| e["auth"] == "aksk").count() >= 6);
}

#[test]
fn bad_requests_get_sms_errors() {
    let emu = Emulator::start();
    // Unsigned.
    let (st, body) = http(&emu.addr, "GET", "/v3/config", &[], None);
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("APIGW.0301"), "{body}");
    // Signed but invalid bodies.
    let (st, v) = emu.operator("POST", "/v3/sources", Some(json!({"name": "x"})));
    assert_eq!(
        (st, v["error_code"].as_str()),
        (400, Some("SMS.6013")),
        "{v}"
    );
    let (st, v) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "t", "type": "MIGRATE_ALL", "os_type": "LINUX"})),
    );
    assert_eq!(
        (st, v["error_code"].as_str()),
        (400, Some("SMS.6011")),
        "{v}"
    );
    let (st, v) = emu.operator(
        "PUT",
        "/v3/sources/nope/changestate",
        Some(json!({"copystate": "SYNCING", "migrationcycle": "replicating"})),
    );
    assert_eq!(
        (st, v["error_code"].as_str()),
        (400, Some("SMS.7728")),
        "{v}"
    );
}

#[test]
fn state_survives_an_emulator_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("emu.json");
    let mut emu = Emulator::start_with(&state, "127.0.0.1:0");
    let (st, _) = emu.operator("POST", "/v3/sources", Some(json!({"name": "n", "os_type": "WINDOWS", "os_version": "W", "agent_version": "1", "networks": []})));
    assert_eq!(st, 200);
    emu.kill();
    let emu = Emulator::start_with(&state, "127.0.0.1:0");
    assert_eq!(emu.db()["sources"].as_object().unwrap().len(), 1);
}

#[test]
fn certkey_material_sets_up_mutual_tls_plain_and_encrypted() {
    for pass in [None, Some("task-passphrase")] {
        let ck = sms_tests::emulator::certs::certkey("t1", "127.0.0.1", pass).unwrap();
        let s = |k: &str| ck[k].as_str().unwrap().to_string();
        let source =
            transfer::tls::Identity::from_pem(&s("cert"), &s("private_key"), pass).unwrap();
        let target = transfer::tls::Identity::from_pem(
            &s("target_data_cert"),
            &s("target_data_private_key"),
            pass,
        )
        .unwrap();
        transfer::tls::client_config(source, &s("ca")).unwrap();
        transfer::tls::server_config(target, &s("ca")).unwrap();
        if pass.is_some() {
            assert!(matches!(
                transfer::tls::Identity::from_pem(&s("cert"), &s("private_key"), None),
                Err(transfer::tls::TlsError::NeedPassphrase)
            ));
        }
    }
}

#[test]
fn reference_examples_are_accepted() {
    let emu = Emulator::start();
    let (_, src) = emu.operator("POST", "/v3/sources", Some(json!({"name": "n", "os_type": "WINDOWS", "os_version": "W", "agent_version": "1", "networks": []})));
    let (st, task) = emu.operator("POST", "/v3/tasks", Some(json!({"name": "t", "type": "MIGRATE_FILE", "os_type": "LINUX", "source_server": {"id": src["id"]}, "target_server": {"disks": []}})));
    assert_eq!(st, 200, "{task}");
    let tid = task["id"].as_str().unwrap();
    // Reference §5.4.8 request example, verbatim.
    let (st, v) = emu.operator("PUT", &format!("/v3/tasks/{tid}/progress"), Some(json!({"subtask_name": "ATTACH_AGENT_IMAGE", "progress": 100, "replicatesize": 1000, "totalsize": 100000, "process_trace": ""})));
    assert_eq!(st, 200, "{v}");
    let (st, v) = emu.operator("PUT", &format!("/v3/tasks/{tid}/progress"), Some(json!({"subtask_name": "NOPE", "progress": 1, "replicatesize": 1, "totalsize": 1, "process_trace": ""})));
    assert_eq!((st, v["error_code"].as_str()), (400, Some("SMS.6004")));
    // §5.4.14: the URI table's path and the example's path both work.
    let body = json!({"consistency_result": [{"dir_check": "/root/data", "num_total_files": 1235, "num_different_files": 12, "num_target_miss_files": 12, "num_target_more_files": 12}]});
    assert_eq!(
        emu.operator(
            "POST",
            &format!("/v3/tasks/{tid}/consistency-result"),
            Some(body.clone())
        )
        .0,
        200
    );
    assert_eq!(
        emu.operator(
            "POST",
            &format!("/v3/{tid}/consistency-result"),
            Some(body.clone())
        )
        .0,
        200
    );
    let (st, got) = emu.operator("GET", &format!("/v3/tasks/{tid}/consistency-result"), None);
    assert_eq!(
        (st, &got["consistency_result"]),
        (200, &body["consistency_result"])
    );
    let too_many = json!({"consistency_result": vec![body["consistency_result"][0].clone(); 31]});
    assert_eq!(
        emu.operator(
            "POST",
            &format!("/v3/tasks/{tid}/consistency-result"),
            Some(too_many)
        )
        .1["error_code"],
        "SMS.6011"
    );
}

/// `PUT /v3/tasks/{id}` (ref. §5.4.6) keeps `state` (one of line 10240's) and `error_json` (at
/// most 1,024 characters, line 11838) and `GET` shows both; `POST …/log` is refused with
/// SMS.7707 for an agent below 25.2.0 (line 25298).
#[test]
fn task_updates_keep_error_json_and_log_upload_is_gated_on_the_agent_version() {
    let emu = Emulator::start();
    let (_, src) = emu.operator("POST", "/v3/sources", Some(json!({"name": "n", "os_type": "WINDOWS", "os_version": "W", "agent_version": "2.2.1", "networks": []})));
    let (_, task) = emu.operator("POST", "/v3/tasks", Some(json!({"name": "t", "type": "MIGRATE_BLOCK", "os_type": "LINUX", "source_server": {"id": src["id"]}, "target_server": {"disks": []}})));
    let tid = task["id"].as_str().unwrap();
    let path = format!("/v3/tasks/{tid}");
    let (_, t) = emu.operator("GET", &path, None);
    assert_eq!(
        (t["state"].as_str(), t["error_json"].as_str()),
        (Some("READY"), Some(""))
    );
    let (st, v) = emu.operator("PUT", &path, Some(json!({"state": "BROKEN"})));
    assert_eq!(
        (st, v["error_code"].as_str()),
        (400, Some("SMS.6011")),
        "{v}"
    );
    let (st, v) = emu.operator("PUT", &path, Some(json!({"error_json": "x".repeat(1025)})));
    assert_eq!(
        (st, v["error_code"].as_str()),
        (400, Some("SMS.6014")),
        "{v}"
    );
    let ej = r#"{"error_code":"SMS.1114","error_param":"[]"}"#;
    let (st, v) = emu.operator(
        "PUT",
        &path,
        Some(json!({"state": "MIGRATE_FAIL", "error_json": ej})),
    );
    assert_eq!(st, 200, "{v}");
    let (_, t) = emu.operator("GET", &path, None);
    assert_eq!(
        (t["state"].as_str(), t["error_json"].as_str()),
        (Some("MIGRATE_FAIL"), Some(ej))
    );
    let (st, v) = emu.operator(
        "POST",
        &format!("{path}/log"),
        Some(json!({"log_bucket": "b"})),
    );
    assert_eq!(
        (st, v["error_code"].as_str()),
        (400, Some("SMS.7707")),
        "{v}"
    );
}

/// `sms-agent receive --task ID --config FILE` fetches the target's TLS material of the task
/// (reference §5.7.1 `target_data_cert`/`target_data_private_key` under `ca`, and §5.4.11's
/// passphrase for an encrypted key) with the daemon's config and credentials; it writes it
/// only where `--save-tls` says, and refuses a task SMS does not know.
#[test]
fn receive_fetches_the_tls_material_of_its_task() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let emu = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\nendpoint = \"{}\"\n[auth]\naccess_key = \"{AK}\"\nsecret_key = \"{SK}\"\n",
            emu.url()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, src) = emu.operator("POST", "/v3/sources", Some(json!({"name": "n", "os_type": "WINDOWS", "os_version": "W", "agent_version": "1", "networks": []})));
    for pass in [None, Some("task-pass")] {
        let (st, task) = emu.operator("POST", "/v3/tasks", Some(json!({"name": "t", "type": "MIGRATE_BLOCK", "os_type": "LINUX", "migration_ip": "127.0.0.1", "source_server": {"id": src["id"]}, "target_server": {"disks": []}})));
        assert_eq!(st, 200, "{task}");
        let tid = task["id"].as_str().unwrap().to_string();
        if let Some(p) = pass {
            emu.admin(
                "POST",
                &format!("/_emulator/tasks/{tid}/key-passphrase"),
                Some(json!({"passphrase": p})),
            );
        }
        let saved = dir.path().join(format!("tls-{tid}"));
        let mut rx = Command::new(sms_tests::sms_agent())
            .args(["receive", "--listen", "127.0.0.1:0", "--task", &tid])
            .arg("--config")
            .arg(&cfg)
            .arg("--save-tls")
            .arg(&saved)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--root")
            .arg(dir.path().join("root"))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(rx.stderr.take().unwrap());
        let mut log = String::new();
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 {
            log.push_str(&line);
            if line.contains("listening on") {
                break;
            }
            line.clear();
        }
        let _ = rx.kill();
        let _ = rx.wait();
        assert!(log.contains("listening on"), "{log}");
        assert!(!log.contains("PRIVATE KEY"), "{log}");
        // What it saved is the task's target material, keys readable by root only.
        let (_, ck) = emu.operator("GET", &format!("/v3/tasks/{tid}/certkey"), None);
        let read = |n: &str| std::fs::read_to_string(saved.join(n)).unwrap();
        assert_eq!(read("ca.pem"), ck["ca"].as_str().unwrap());
        assert_eq!(read("cert.pem"), ck["target_data_cert"].as_str().unwrap());
        assert_eq!(
            read("key.pem"),
            ck["target_data_private_key"].as_str().unwrap()
        );
        let mode = |n: &str| {
            std::fs::metadata(saved.join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("key.pem"), 0o600);
        match pass {
            Some(p) => {
                assert_eq!(read("passphrase"), p);
                assert_eq!(mode("passphrase"), 0o600);
            }
            None => assert!(!saved.join("passphrase").exists()),
        }
        // The saved files serve as --ca/--cert/--key for the target side.
        let id =
            transfer::tls::Identity::from_pem(&read("cert.pem"), &read("key.pem"), pass).unwrap();
        transfer::tls::server_config(id, &read("ca.pem")).unwrap();
    }
    // A task SMS does not know: no listener, an SMS code, nothing saved.
    let out = Command::new(sms_tests::sms_agent())
        .args(["receive", "--listen", "127.0.0.1:0", "--task", "nope"])
        .arg("--config")
        .arg(&cfg)
        .arg("--save-tls")
        .arg(dir.path().join("never"))
        .arg("--root")
        .arg(dir.path().join("root"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("SMS.0511"), "{err}");
    assert!(!dir.path().join("never").exists());
    // --task and --cert exclude each other.
    let out = Command::new(sms_tests::sms_agent())
        .args([
            "receive",
            "--task",
            "x",
            "--cert",
            "c.pem",
            "--root",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
