//! `sms-agent run` against the SMS emulator, both as real processes: registration, restarts,
//! `kill -9`, commands, faults and bad input from the server.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sms_tests::procs::{summary, Agent, Emulator, SK};

fn is(e: &Value, method: &str, suffix: &str, status: u16) -> bool {
    e["method"] == method
        && e["path"].as_str().unwrap_or("").ends_with(suffix)
        && e["status"] == status
}

fn registered(emu: &Emulator, n: usize) -> String {
    let j = emu.wait_journal(30, "registration", |j| {
        j.iter()
            .filter(|e| is(e, "POST", "/v3/sources", 200))
            .count()
            >= n
    });
    let db = emu.db();
    let ids: Vec<&String> = db["sources"].as_object().unwrap().keys().collect();
    assert_eq!(
        ids.len(),
        1,
        "exactly one source registered: {}",
        summary(&j)
    );
    ids[0].clone()
}

fn results(emu: &Emulator) -> Vec<Value> {
    emu.db()["results"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r[1].clone())
        .collect()
}

fn wait_results(emu: &Emulator, n: usize) -> Vec<Value> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = results(emu);
        if r.len() >= n {
            return r;
        }
        assert!(
            Instant::now() < end,
            "only {} of {n} command results: {}",
            r.len(),
            summary(&emu.journal())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn registers_polls_and_keeps_its_id_across_restarts() {
    let emu = Emulator::start();
    let mut agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);
    let j = emu.wait_journal(20, "waiting state and polls", |j| {
        j.iter().any(|e| is(e, "PUT", "/changestate", 200))
            && j.iter().filter(|e| is(e, "GET", "/command", 200)).count() >= 2
    });
    // Every agent call was signed and accepted; the body passed the emulator's validation.
    assert!(
        j.iter().all(|e| e["auth"] == "aksk" && e["status"] == 200),
        "{}",
        summary(&j)
    );
    let reg = &j
        .iter()
        .find(|e| is(e, "POST", "/v3/sources", 200))
        .unwrap()["body"];
    assert!(reg.get("id").is_none(), "first registration carries no id");
    assert_eq!(reg["name"], "src-under-test");
    let cs = &j
        .iter()
        .find(|e| is(e, "PUT", "/changestate", 200))
        .unwrap()["body"];
    assert_eq!(
        cs,
        &json!({"copystate": "WAITING", "migrationcycle": "checking"})
    );
    let st = agent.status();
    assert_eq!(st["source_id"], id.as_str());
    assert_eq!(st["running"], true);

    let (status, took) = agent.terminate();
    assert!(status.success(), "exit {status}: {}", agent.log());
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    assert_eq!(agent.status()["running"], false);

    agent.restart();
    registered(&emu, 2);
    let j = emu.journal();
    let second = j
        .iter()
        .filter(|e| is(e, "POST", "/v3/sources", 200))
        .nth(1)
        .unwrap();
    assert_eq!(
        second["body"]["id"],
        id.as_str(),
        "the restart updates the same source"
    );
}

#[test]
fn a_saved_source_id_sms_no_longer_knows_is_replaced_by_a_new_registration() {
    let emu = Emulator::start();
    let mut agent = Agent::start(&emu.url(), SK);
    let old = registered(&emu, 1);
    let (status, _) = agent.terminate();
    assert!(status.success(), "exit {status}: {}", agent.log());
    // The source is gone on the service side: a fresh emulator at the same address.
    let addr = emu.addr.clone();
    drop(emu);
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start_with(&dir.path().join("emu.json"), &addr);
    agent.restart();
    let new = registered(&emu, 1);
    assert_ne!(new, old);
    let j = emu.journal();
    let posts: Vec<&Value> = j
        .iter()
        .filter(|e| e["method"] == "POST" && e["path"] == "/v3/sources")
        .collect();
    assert_eq!(posts[0]["body"]["id"], old.as_str(), "{}", summary(&j));
    assert_eq!(posts[0]["status"], 400);
    assert!(posts[1]["body"].get("id").is_none(), "{}", summary(&j));
    let end = Instant::now() + Duration::from_secs(20);
    while agent.status()["source_id"] != new.as_str() {
        assert!(Instant::now() < end, "status: {}", agent.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent.log().contains("registering as a new source"),
        "{}",
        agent.log()
    );
}

#[test]
fn commands_are_answered_and_a_second_daemon_is_refused() {
    let emu = Emulator::start();
    let agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);

    // A second daemon on the same state directory must not start.
    let out = std::process::Command::new(sms_tests::sms_agent())
        .args(["run", "--config"])
        .arg(agent.dir.path().join("agent.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another sms-agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An operator creates a block task and starts it.
    let (st, task) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "t1", "type": "MIGRATE_BLOCK", "os_type": "LINUX", "source_server": {"id": id},
                    "target_server": {"disks": []}, "migration_ip": "127.0.0.1"})),
    );
    assert_eq!(st, 200, "{task}");
    let tid = task["id"].as_str().unwrap().to_string();
    let (st, _) = emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({"operation": "start"})),
    );
    assert_eq!(st, 200);
    let r = wait_results(&emu, 1);
    assert_eq!(r[0]["command_name"], "START");
    // The task maps no source disk to a target disk: nothing to copy, and the agent says so.
    assert_eq!(r[0]["result"], "fail");
    assert_eq!(r[0]["result_detail"]["error_code"], "SMS.1311");
    let j = emu.journal();
    for call in [
        format!("/v3/tasks/{tid}"),
        format!("/v3/tasks/{tid}/certkey"),
        format!("/v3/tasks/{tid}/speed-limit"),
        format!("/v3/tasks/{tid}/configuration-setting"),
    ] {
        assert!(
            j.iter().any(|e| is(e, "GET", &call, 200)),
            "no GET {call}: {}",
            summary(&j)
        );
    }
    assert!(j
        .iter()
        .any(|e| e["path"].as_str().unwrap().ends_with("/certkey")
            && e["query"] == "enable_ca_cert=true"));
    // The TLS material is the reference's shape: PKCS#1 RSA keys under one CA.
    let ck = &emu.db()["tasks"][&tid]["certkey"];
    assert!(ck["private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert!(ck["target_data_private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert!(ck["ca"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    // The keys never reach the agent's log.
    let key_line = ck["private_key"]
        .as_str()
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(!agent.log().contains(&key_line));
    let states: Vec<&Value> = j
        .iter()
        .filter(|e| is(e, "PUT", "/changestate", 200))
        .map(|e| &e["body"]["copystate"])
        .collect();
    assert!(
        states.contains(&&json!("INIT")) && states.contains(&&json!("ERROR")),
        "{states:?}"
    );

    for (name, param) in [
        ("STOP", json!({"task_id": tid})),
        ("SKIP", json!({"task_id": tid})),
        ("FROBNICATE", json!({})),
        ("DELETE", json!({"task_id": tid})),
    ] {
        emu.command(&id, name, param);
    }
    let (st, _) = emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/log"),
        Some(json!({"log_bucket": "b"})),
    );
    assert_eq!(st, 200);
    let r = wait_results(&emu, 6);
    let by_name = |n: &str| {
        r.iter()
            .find(|x| x["command_name"] == n)
            .unwrap_or_else(|| panic!("no result for {n}"))
    };
    assert_eq!(by_name("STOP")["result"], "success");
    assert_eq!(by_name("SKIP")["result"], "success");
    assert_eq!(by_name("DELETE")["result"], "success");
    assert_eq!(by_name("FROBNICATE")["result"], "fail");
    // §6.1 has no "unknown command" code; SMS.6021 (line 25164) is the closest documented one.
    assert_eq!(
        by_name("FROBNICATE")["result_detail"]["error_code"],
        "SMS.6021"
    );
    // The agent's own upload failing (here: the service names no obs_domain and no
    // [logs] obs_endpoint is set) is SMS.0503 (§6.1, line 24923), not SMS.0414.
    assert_eq!(
        by_name("UPLOAD_LOG")["result_detail"]["error_code"],
        "SMS.0503"
    );
    // All queues drained: every command answered exactly once.
    assert_eq!(emu.db()["commands"][&id], json!([]));
    assert_eq!(r.len(), 6);
    assert!(agent.log().contains("unknown command"));
}

#[test]
fn kill_9_at_random_points_loses_nothing_and_registers_once() {
    let emu = Emulator::start();
    let mut agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);
    let mut queued = 0;
    let mut seed = u64::from(std::process::id());
    for round in 0..6 {
        emu.command(
            &id,
            if round % 2 == 0 { "STOP" } else { "SKIP" },
            json!({"task_id": "none"}),
        );
        queued += 1;
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        std::thread::sleep(Duration::from_millis(200 + (seed >> 33) % 1300));
        agent.kill9();
        agent.restart();
    }
    let r = wait_results(&emu, queued);
    assert_eq!(r.len(), queued, "each command answered exactly once");
    registered(&emu, 1);
    let j = emu.journal();
    let regs: Vec<&Value> = j
        .iter()
        .filter(|e| is(e, "POST", "/v3/sources", 200))
        .collect();
    assert!(
        regs.iter().skip(1).all(|e| e["body"]["id"] == id.as_str()),
        "a restart registered a new source: {}",
        summary(&j)
    );
    assert_eq!(emu.db()["commands"][&id], json!([]));
}

#[test]
fn server_faults_are_retried_with_backoff() {
    let emu = Emulator::start();
    emu.fault(json!({"match": {"method": "POST", "path_prefix": "/v3/sources"}, "kind": "status", "status": 503, "count": 3}));
    emu.fault(json!({"match": {"method": "PUT", "path_prefix": "/v3/sources"}, "kind": "drop", "count": 1}));
    let _agent = Agent::start(&emu.url(), SK);
    registered(&emu, 1);
    let j = emu.journal();
    let posts: Vec<&Value> = j
        .iter()
        .filter(|e| e["method"] == "POST" && e["path"] == "/v3/sources")
        .collect();
    assert_eq!(
        posts
            .iter()
            .map(|e| e["status"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![503, 503, 503, 200]
    );
    // Waits grow and never collapse into a busy loop.
    let t: Vec<i64> = posts.iter().map(|e| e["time"].as_i64().unwrap()).collect();
    assert!(t[3] - t[0] >= 1, "three retries within a second: {t:?}");

    // 429 with Retry-After on the poll: the next poll waits at least that long.
    let id = registered(&emu, 1);
    emu.fault(json!({"match": {"path_prefix": format!("/v3/sources/{id}/command")}, "kind": "retry_after", "status": 429, "retry_after_secs": 3, "count": 1}));
    let j = emu.wait_journal(20, "a poll after the 429", |j| {
        j.iter()
            .position(|e| e["status"] == 429)
            .is_some_and(|i| j[i + 1..].iter().any(|e| is(e, "GET", "/command", 200)))
    });
    let i = j.iter().position(|e| e["status"] == 429).unwrap();
    let next = j[i + 1..]
        .iter()
        .find(|e| is(e, "GET", "/command", 200))
        .unwrap();
    assert!(
        next["time"].as_i64().unwrap() - j[i]["time"].as_i64().unwrap() >= 2,
        "Retry-After not honoured: {}",
        summary(&j)
    );
}

#[test]
fn bad_server_answers_are_survived() {
    let emu = Emulator::start();
    let agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);
    let cmd = format!("/v3/sources/{id}/command");
    emu.fault(json!({"match": {"path_prefix": cmd}, "kind": "body", "status": 200, "body": "{\"command_name\": ", "count": 1}));
    emu.fault(json!({"match": {"path_prefix": cmd}, "kind": "body", "status": 200, "body": "{\"command_name\": 42}", "count": 1}));
    emu.fault(json!({"match": {"path_prefix": cmd}, "kind": "body", "status": 200, "body_len": 50_000_000, "count": 1}));
    emu.wait_journal(60, "polls after the bad answers", |j| {
        j.iter().filter(|e| is(e, "GET", "/command", 200)).count() >= 5
    });
    // Still alive and still answering commands.
    emu.command(&id, "STOP", json!({"task_id": "x"}));
    let r = wait_results(&emu, 1);
    assert_eq!(r[0]["command_name"], "STOP");
    let log = agent.log();
    assert!(
        log.contains("malformed response") || log.contains("larger than"),
        "{log}"
    );
}

#[test]
fn wrong_secret_key_is_a_clear_error_and_retried_slowly() {
    let emu = Emulator::start();
    let agent = Agent::start(&emu.url(), "not-the-right-secret");
    std::thread::sleep(Duration::from_secs(6));
    let j = emu.journal();
    assert!(!j.is_empty());
    assert!(j.iter().all(|e| e["status"] == 401), "{}", summary(&j));
    // Backoff: a handful of attempts in six seconds, not hundreds.
    assert!(
        j.len() <= 12,
        "{} requests in 6 s: {}",
        j.len(),
        summary(&j)
    );
    let log = agent.log();
    assert!(
        log.contains("SMS.0502") && log.contains("401") && log.contains("APIGW.0301"),
        "{log}"
    );
}

#[test]
fn clock_skew_is_reported_as_sms_0205() {
    let emu = Emulator::start();
    emu.admin(
        "POST",
        "/_emulator/clock",
        Some(json!({"offset_secs": 3600})),
    );
    let agent = Agent::start(&emu.url(), SK);
    let end = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("SMS.0205") {
        assert!(Instant::now() < end, "no SMS.0205 in: {}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = agent.log();
    assert!(
        log.contains("-3600") || log.contains("-3599") || log.contains("-3601"),
        "skew seconds missing: {log}"
    );
}

#[test]
fn iam_tokens_are_fetched_and_renewed_before_expiry() {
    // The emulator's tokens live 3 s: the agent must renew them as it goes.
    let emu = Emulator::start();
    let auth = format!(
        "method = \"token\"\niam_endpoint = \"{}\"\nusername = \"op\"\npassword = \"pw\"\ndomain_name = \"d\"\nproject_name = \"p\"\n",
        emu.url()
    );
    let _agent = Agent::start_with_auth(&emu.url(), &auth);
    registered(&emu, 1);
    std::thread::sleep(Duration::from_secs(7));
    let j = emu.journal();
    let tokens = j
        .iter()
        .filter(|e| is(e, "POST", "/v3/auth/tokens", 201))
        .count();
    assert!(tokens >= 2, "token never renewed: {}", summary(&j));
    let api: Vec<&Value> = j
        .iter()
        .filter(|e| e["path"] != "/v3/auth/tokens")
        .collect();
    assert!(api.iter().all(|e| e["auth"] == "token"), "{}", summary(&j));
    // A call that met an expired token was retried with a fresh one, never given up.
    assert!(
        api.iter().filter(|e| e["status"] == 200).count() >= 4,
        "{}",
        summary(&j)
    );
}

#[test]
fn a_stalled_server_times_out_and_polling_goes_on() {
    let emu = Emulator::start();
    let agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);
    emu.fault(json!({"match": {"path_prefix": format!("/v3/sources/{id}/command")}, "kind": "delay", "delay_ms": 30000, "count": 1}));
    let before = emu.journal().len();
    emu.command(&id, "STOP", json!({"task_id": "x"}));
    // The stalled poll times out after the configured 5 s; the next one delivers STOP.
    let r = wait_results(&emu, 1);
    assert_eq!(r[0]["command_name"], "STOP");
    assert!(emu.journal().len() > before);
    assert!(
        agent.log().contains("timed out")
            || agent.log().contains("operation timed out")
            || agent.log().contains("error sending request"),
        "{}",
        agent.log()
    );
}

#[test]
fn changed_disks_are_sent_with_put_diskinfo() {
    let emu = Emulator::start();
    let disk = sms_tests::LoopDisk::new(32);
    let extra = format!(
        "reprobe_interval = \"2s\"\n[probe]\ndevices = [\"{}\"]\n",
        disk.path()
    );
    let auth = format!(
        "access_key = \"{}\"\nsecret_key = \"{SK}\"\n",
        sms_tests::procs::AK
    );
    let _agent = Agent::start_with(&emu.url(), &auth, &extra, &[]);
    let id = registered(&emu, 1);
    let j = emu.journal();
    let reg = &j
        .iter()
        .find(|e| is(e, "POST", "/v3/sources", 200))
        .unwrap()["body"];
    assert!(
        reg["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == disk.path()),
        "configured device not probed"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !emu.journal().iter().any(|e| is(e, "PUT", "/diskinfo", 200)),
        "diskinfo sent although nothing changed"
    );

    run_mkfs(&disk);
    let j = emu.wait_journal(20, "PUT diskinfo", |j| {
        j.iter()
            .any(|e| is(e, "PUT", &format!("/v3/sources/{id}/diskinfo"), 200))
    });
    let body = &j.iter().find(|e| is(e, "PUT", "/diskinfo", 200)).unwrap()["body"];
    assert!(
        body.get("volumegroups").is_some(),
        "the API spells it volumegroups"
    );
    let d = body["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == disk.path())
        .unwrap();
    assert_eq!(d["physical_volumes"][0]["file_system"], "ext4");
}

fn run_mkfs(disk: &sms_tests::LoopDisk) {
    sms_tests::run("mkfs.ext4", &["-q", disk.path()]);
}

#[test]
fn systemd_gets_ready_status_watchdog_and_stopping() {
    let emu = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let auth = format!(
        "access_key = \"{}\"\nsecret_key = \"{SK}\"\n",
        sms_tests::procs::AK
    );
    let mut agent = Agent::start_with(
        &emu.url(),
        &auth,
        "",
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut msgs = Vec::new();
    let end = Instant::now() + Duration::from_secs(6);
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let (st, _) = agent.terminate();
    assert!(st.success());
    while let Ok(n) = sock.recv(&mut buf) {
        msgs.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(msgs.iter().any(|m| m == "READY=1"), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("STATUS=waiting for commands")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().filter(|m| *m == "WATCHDOG=1").count() >= 5,
        "{msgs:?}"
    );
    assert!(msgs.iter().any(|m| m == "STOPPING=1"), "{msgs:?}");
    let ready = msgs.iter().position(|m| m == "READY=1").unwrap();
    assert!(
        msgs[..ready]
            .iter()
            .any(|m| m.starts_with("STATUS=registering")),
        "READY only after registering: {msgs:?}"
    );
}

#[test]
fn https_api_needs_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    let (ca_pem, cert_pem, key_pem) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, cert.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let emu = Emulator::start_tls(&cert_pem, &key_pem);
    let url = format!("https://{}", emu.addr);
    let auth = format!(
        "access_key = \"{}\"\nsecret_key = \"{SK}\"\n",
        sms_tests::procs::AK
    );

    // Without the CA the server is not trusted: SMS.0304, and nothing gets through.
    let untrusting = Agent::start_with(&url, &auth, "", &[]);
    let end = Instant::now() + Duration::from_secs(15);
    while !untrusting.log().contains("SMS.0304") {
        assert!(Instant::now() < end, "no SMS.0304: {}", untrusting.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(emu.journal().is_empty());
    drop(untrusting);

    // With `ca_file` it registers over TLS.
    let api = format!(
        "[api]\nendpoint = \"{url}\"\nca_file = \"{}\"\n",
        ca_pem.display()
    );
    let _trusting = Agent::start_with_config(&api, &auth);
    registered(&emu, 1);
}

#[test]
fn the_configured_proxy_carries_the_requests() {
    // The emulator doubles as the HTTP proxy: the endpoint's host does not resolve, so a
    // registration can only arrive through the proxy.
    let emu = Emulator::start();
    let auth = format!(
        "access_key = \"{}\"\nsecret_key = \"{SK}\"\n",
        sms_tests::procs::AK
    );
    let api = format!(
        "[api]\nendpoint = \"http://sms.emulated.invalid:8080\"\nproxy = \"{}\"\n",
        emu.url()
    );
    let _agent = Agent::start_with_config(&api, &auth);
    registered(&emu, 1);
}

#[test]
fn an_encrypted_task_key_makes_the_agent_fetch_its_passphrase() {
    let emu = Emulator::start();
    let agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);
    let (_, task) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "t", "type": "MIGRATE_FILE", "os_type": "LINUX", "source_server": {"id": id}, "target_server": {"disks": []}})),
    );
    let tid = task["id"].as_str().unwrap().to_string();
    emu.admin(
        "POST",
        &format!("/_emulator/tasks/{tid}/key-passphrase"),
        Some(json!({"passphrase": "pass-s3cret-phrase"})),
    );
    emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({"operation": "start"})),
    );
    let r = wait_results(&emu, 1);
    // The key loads; the task then fails for having no target address.
    assert_eq!(r[0]["result_detail"]["error_code"], "SMS.1807", "{r:?}");
    let j = emu.journal();
    assert!(
        j.iter()
            .any(|e| is(e, "GET", &format!("/v3/tasks/{tid}/passphrase"), 200)),
        "{}",
        summary(&j)
    );
    let ck = &emu.db()["tasks"][&tid]["certkey"];
    assert!(ck["private_key"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    assert!(
        !agent.log().contains("pass-s3cret-phrase"),
        "the passphrase was logged"
    );
}

#[test]
fn bad_configs_are_refused_with_exit_64_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bin = sms_tests::sms_agent();
    let cases = [
        ("[agent]\nnmae = \"x\"\n", 0o600, "nmae"),
        ("[api]\nendpoint = \"ftp://x\"\n[auth]\naccess_key = \"a\"\nsecret_key = \"b\"\n", 0o600, "endpoint"),
        ("[api]\nendpoint = \"http://127.0.0.1:9\"\n[auth]\naccess_key = \"a\"\nsecret_key = \"b\"\n", 0o644, "chmod 600"),
        ("[api]\nendpoint = \"http://127.0.0.1:9\"\n[auth]\naccess_key = \"a\"\n", 0o600, "secret_key"),
        ("[api]\nendpoint = \"http://127.0.0.1:9\"\n[auth]\naccess_key = \"a\"\nsecret_key = \"b\"\n[transfer]\nfreeze = [\"srv\"]\n", 0o600, "[transfer] freeze \"srv\" is not an absolute path"),
    ];
    for (i, (text, mode, want)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&p, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["run", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "case {i}: {err}");
        assert!(
            err.contains(want) && err.contains(p.to_str().unwrap()),
            "case {i}: {err}"
        );
    }
}

#[test]
fn unusable_tls_material_fails_the_task_with_sms_3301() {
    let emu = Emulator::start();
    let _agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);
    let (_, task) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "t", "type": "MIGRATE_BLOCK", "os_type": "LINUX", "source_server": {"id": id}, "target_server": {"disks": []}})),
    );
    let tid = task["id"].as_str().unwrap().to_string();
    let junk = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n";
    emu.fault(json!({"match": {"path_prefix": format!("/v3/tasks/{tid}/certkey")}, "kind": "body", "status": 200,
                     "body": json!({"cert": junk, "private_key": junk, "ca": junk}).to_string(), "count": 1}));
    emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({"operation": "start"})),
    );
    let r = wait_results(&emu, 1);
    assert_eq!(r[0]["result"], "fail");
    assert_eq!(r[0]["result_detail"]["error_code"], "SMS.3301", "{r:?}");
}

/// Item: a failed task is visible where the operator looks. Its disk is missing on the source,
/// so planning fails; `GET /v3/tasks/{id}` then shows `MIGRATE_FAIL` (ref. §5.4.3, line 10240)
/// and `error_json` in the reference's shape (`{"error_code": …, "error_param": "[…]"}`, ref.
/// lines 2490–2517) with the same code and message as the command result, by the time that
/// result arrives (the agent reports the task before it answers the command, well within one
/// poll interval), and the agent's log has it at ERROR.
#[test]
fn a_failed_task_shows_its_code_and_message_in_get_task() {
    let emu = Emulator::start();
    let agent = Agent::start(&emu.url(), SK);
    let id = registered(&emu, 1);
    let (_, task) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "t", "type": "MIGRATE_BLOCK", "os_type": "LINUX",
                    "migration_ip": "127.0.0.1", "source_server": {"id": id},
                    "target_server": {"disks": [{"name": "/dev/sms-no-such-disk-a", "relation_name": "/dev/sms-no-such-disk-b", "size": 1}]}})),
    );
    let tid = task["id"].as_str().unwrap().to_string();
    let (_, before) = emu.operator("GET", &format!("/v3/tasks/{tid}"), None);
    assert_eq!(before["error_json"], "", "{before}");
    emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({"operation": "start"})),
    );
    let r = wait_results(&emu, 1);
    assert_eq!(r[0]["result"], "fail", "{r:?}");
    let code = r[0]["result_detail"]["error_code"]
        .as_str()
        .unwrap()
        .to_string();
    let msg = r[0]["result_detail"]["error_msg"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(code.starts_with("SMS."), "{code}");
    let (st, t) = emu.operator("GET", &format!("/v3/tasks/{tid}"), None);
    assert_eq!(st, 200);
    assert_eq!(t["state"], "MIGRATE_FAIL", "{t}");
    let ej: Value = serde_json::from_str(t["error_json"].as_str().unwrap()).unwrap();
    assert_eq!(ej["error_code"], code.as_str(), "{ej}");
    let params: Vec<String> = serde_json::from_str(ej["error_param"].as_str().unwrap()).unwrap();
    assert_eq!(params, std::slice::from_ref(&msg));
    assert!(msg.contains("sms-no-such-disk"), "{msg}");
    let j = emu.journal();
    assert!(
        j.iter()
            .any(|e| is(e, "PUT", &format!("/v3/tasks/{tid}"), 200)),
        "{}",
        summary(&j)
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&code) && l.contains("sms-no-such-disk")),
        "{log}"
    );
}

/// Item: `GET /v3/config` at start-up (ref. §5.2.1, line 2139), before registering; the
/// emulator answers the reference's example (no `obs_domain`), and an answer with unknown,
/// odd and missing keys is tolerated too.
#[test]
fn the_service_configuration_is_read_at_start_up_and_odd_answers_are_tolerated() {
    let emu = Emulator::start();
    let agent = Agent::start(&emu.url(), SK);
    registered(&emu, 1);
    let j = emu.journal();
    let config = j.iter().position(|e| is(e, "GET", "/v3/config", 200));
    let register = j.iter().position(|e| is(e, "POST", "/v3/sources", 200));
    assert!(
        matches!((config, register), (Some(c), Some(r)) if c < r),
        "{}",
        summary(&j)
    );
    // The registration reports the version the service's gate accepts (SMS.7707, ≥ 25.2.0).
    let body = &j[register.unwrap()]["body"];
    assert_eq!(
        body["agent_version"],
        sms_agent::api::REPORTED_AGENT_VERSION
    );
    let log = agent.log();
    assert!(
        log.contains("service configuration read") && log.contains("ap-southeast-1"),
        "{log}"
    );
    drop(agent);

    let emu = Emulator::start();
    emu.fault(json!({"match": {"path_prefix": "/v3/config"}, "kind": "body", "status": 200,
                     "body": json!({"config": {"obs_domain": "obs.example.com", "new_limit": 7, "nested": {}}, "extra": [1]}).to_string(), "count": 1}));
    let agent = Agent::start(&emu.url(), SK);
    registered(&emu, 1);
    let log = agent.log();
    assert!(log.contains("obs.example.com"), "{log}");
    drop(agent);

    let emu = Emulator::start();
    emu.fault(
        json!({"match": {"path_prefix": "/v3/config"}, "kind": "body", "status": 200,
                     "body": "not json", "count": 1}),
    );
    let agent = Agent::start(&emu.url(), SK);
    registered(&emu, 1);
    assert!(
        agent.log().contains("GET /v3/config) not read"),
        "{}",
        agent.log()
    );
}
