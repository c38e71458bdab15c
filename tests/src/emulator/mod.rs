//! The SMS API emulator: the agent-side calls of sms-api.md §3 and the operator calls that drive
//! them, AK/SK and token auth, body validation with SMS error codes, a request journal, and
//! fault injection — so the agent can be run and tested end to end without the cloud.
//!
//! One fallback handler routes by path segments: journal, faults and auth apply to every request
//! in one place, in order, which a router with layered middleware would scatter.

pub mod auth;
pub mod certs;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use store::{Cmd, Entry, Fault, Source, Store, TaskRec};

/// How the emulator authenticates its callers.
#[derive(Debug, Clone, Default)]
pub struct EmuConfig {
    /// Access key.
    pub ak: String,
    /// Secret key.
    pub sk: String,
    /// IAM user for token auth.
    pub iam_user: String,
    /// IAM password.
    pub iam_password: String,
    /// Lifetime of issued tokens in seconds.
    pub token_ttl: i64,
}

/// Shared state of a running emulator.
#[derive(Clone)]
pub struct Emu {
    cfg: Arc<EmuConfig>,
    store: Arc<Mutex<Store>>,
}

type Reply = (StatusCode, Vec<(&'static str, String)>, Value);

fn ok(v: Value) -> Reply {
    (StatusCode::OK, Vec::new(), v)
}

fn err(status: StatusCode, code: &str, msg: impl Into<String>) -> Reply {
    (
        status,
        Vec::new(),
        json!({"error_code": code, "error_msg": msg.into()}),
    )
}

fn bad(code: &str, msg: impl Into<String>) -> Reply {
    err(StatusCode::BAD_REQUEST, code, msg)
}

impl Emu {
    /// An emulator over `store`.
    pub fn new(cfg: EmuConfig, store: Store) -> Self {
        Self {
            cfg: Arc::new(cfg),
            store: Arc::new(Mutex::new(store)),
        }
    }

    /// The axum app.
    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic in one handler must not take the emulator down for the rest of a test.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Serves `emu` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, emu: Emu) -> std::io::Result<()> {
    axum::serve(listener, emu.router()).await
}

async fn handle(
    State(emu): State<Emu>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let admin = path.starts_with("/_emulator");
    let fault = if admin {
        None
    } else {
        emu.lock().take_fault(method.as_str(), &path)
    };
    let mut reply: Option<Reply> = None;
    if let Some(f) = &fault {
        match f.kind.as_str() {
            "delay" => tokio::time::sleep(Duration::from_millis(f.delay_ms.unwrap_or(1000))).await,
            "drop" => {
                journal(&emu, &method, &path, &query, 0, "none", &body);
                return dropped();
            }
            "retry_after" => {
                reply = Some((
                    StatusCode::from_u16(f.status.unwrap_or(429))
                        .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
                    vec![("retry-after", f.retry_after_secs.unwrap_or(1).to_string())],
                    json!({"error_code": "APIGW.0308", "error_msg": "The throttling threshold has been reached"}),
                ));
            }
            "body" => {
                let raw = f
                    .body
                    .clone()
                    .unwrap_or_else(|| "[".repeat(f.body_len.unwrap_or(0)));
                let status =
                    StatusCode::from_u16(f.status.unwrap_or(200)).unwrap_or(StatusCode::OK);
                journal(&emu, &method, &path, &query, status.as_u16(), "none", &body);
                return with_date(&emu, (status, raw).into_response());
            }
            _ => {
                let status = StatusCode::from_u16(f.status.unwrap_or(503))
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                reply = Some(err(status, "SMS.6000", "Service error (injected)"));
            }
        }
    }
    let mut auth_kind = "none";
    let reply = match reply {
        Some(r) => r,
        None if admin => admin_call(&emu, &method, &path, &body),
        None if path == "/v3/auth/tokens" && method == Method::POST => iam(&emu, &body),
        None => match authenticate(&emu, &method, &path, &query, &headers, &body) {
            Err(r) => r,
            Ok(kind) => {
                auth_kind = kind;
                api(&emu, &method, &path, &query, &body)
            }
        },
    };
    // Admin calls are the test talking to the emulator, not traffic worth recording.
    if !admin {
        journal(
            &emu,
            &method,
            &path,
            &query,
            reply.0.as_u16(),
            auth_kind,
            &body,
        );
    }
    let (status, extra, v) = reply;
    let mut resp = (status, axum::Json(v)).into_response();
    for (k, val) in extra {
        if let Ok(hv) = HeaderValue::from_str(&val) {
            resp.headers_mut().insert(k, hv);
        }
    }
    with_date(&emu, resp)
}

/// A response whose body fails mid-way: the client sees the connection drop.
fn dropped() -> Response {
    let stream = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected drop",
        ))
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert("content-length", HeaderValue::from_static("64"));
    r
}

/// Sets `Date` from the emulator clock, so clients can measure their skew.
fn with_date(emu: &Emu, mut resp: Response) -> Response {
    let t =
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(emu.lock().now()).unwrap_or(0));
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(t)) {
        resp.headers_mut().insert("date", v);
    }
    resp
}

fn journal(
    emu: &Emu,
    method: &Method,
    path: &str,
    query: &str,
    status: u16,
    auth: &str,
    body: &[u8],
) {
    let mut s = emu.lock();
    s.journal_seq += 1;
    let e = Entry {
        seq: s.journal_seq,
        time: s.now(),
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        status,
        auth: auth.to_string(),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        body_len: body.len(),
    };
    // A long load test must not grow the emulator without bound: keep the newest entries.
    while s.journal.len() >= store::JOURNAL_LIMIT {
        s.journal.pop_front();
    }
    s.journal.push_back(e);
}

fn authenticate(
    emu: &Emu,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<&'static str, Reply> {
    let get = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let now = emu.lock().now();
    if let Some(token) = get("x-auth-token") {
        let valid = emu.lock().tokens.get(&token).is_some_and(|exp| *exp > now);
        return if valid {
            Ok("token")
        } else {
            Err(err(
                StatusCode::UNAUTHORIZED,
                "APIGW.0301",
                "Incorrect IAM authentication information: token expired or unknown",
            ))
        };
    }
    let Some(authz) = get("authorization") else {
        return Err(err(
            StatusCode::UNAUTHORIZED,
            "APIGW.0301",
            auth::AuthError::Missing.to_string(),
        ));
    };
    let (ak, sk) = (emu.cfg.ak.clone(), emu.cfg.sk.clone());
    let keys = move |a: &str| (a == ak).then(|| sk.clone());
    let host = |k: &str| get(k);
    let req = auth::Received {
        method: method.as_str(),
        raw_path: path,
        raw_query: query,
        header: &host,
        body,
    };
    match auth::verify(&authz, &keys, &req, now) {
        Ok(_) => Ok("aksk"),
        Err(e) => Err(err(
            StatusCode::UNAUTHORIZED,
            "APIGW.0301",
            format!("Incorrect IAM authentication information: {e}"),
        )),
    }
}

fn iam(emu: &Emu, body: &[u8]) -> Reply {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let user = &v["auth"]["identity"]["password"]["user"];
    if user["name"].as_str() != Some(emu.cfg.iam_user.as_str())
        || user["password"].as_str() != Some(emu.cfg.iam_password.as_str())
        || emu.cfg.iam_user.is_empty()
    {
        return err(
            StatusCode::UNAUTHORIZED,
            "IAM.0007",
            "Incorrect user name or password",
        );
    }
    let mut s = emu.lock();
    let token = format!("tok-{}-{}", s.now(), s.tokens.len());
    let exp = s.now() + emu.cfg.token_ttl;
    s.tokens.insert(token.clone(), exp);
    let t = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(exp).unwrap_or(0));
    let iso = httpdate_to_iso(t);
    (
        StatusCode::CREATED,
        vec![("x-subject-token", token)],
        json!({"token": {"expires_at": iso, "methods": ["password"]}}),
    )
}

fn httpdate_to_iso(t: std::time::SystemTime) -> String {
    // httpdate gives "Sun, 06 Nov 1994 08:49:37 GMT"; rebuild as ISO 8601.
    let s = httpdate::fmt_http_date(t);
    let p: Vec<&str> = s.split_whitespace().collect();
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months
        .iter()
        .position(|x| Some(x) == p.get(2))
        .map_or(1, |i| i + 1);
    format!(
        "{}-{m:02}-{}T{}.000000Z",
        p.get(3).unwrap_or(&"1970"),
        p.get(1).unwrap_or(&"01"),
        p.get(4).unwrap_or(&"00:00:00")
    )
}

fn admin_call(emu: &Emu, method: &Method, path: &str, body: &[u8]) -> Reply {
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
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6000",
                format!("task {id} not found"),
            ),
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

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
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

/// Whether SMS accepts the pair (sms-api.md §5, error SMS.7728).
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

/// Subtask names the service knows (reference §5.4.8 and its examples); an agent on Linux
/// reports the MIGRATE/SYNC ones, the service side the rest.
const SUBTASKS: &[&str] = &[
    "MIGRATE_LINUX_BLOCK",
    "MIGRATE_LINUX_FILE",
    "SYNC_LINUX_BLOCK",
    "SYNC_LINUX_FILE",
    "MIGRATE_WINDOWS_BLOCK",
    "SYNC_WINDOWS_BLOCK",
    "CREATE_CLOUD_SERVER",
    "SSL_CONFIG",
    "ATTACH_AGENT_IMAGE",
    "DETTACH_AGENT_IMAGE",
    "DETACH_AGENT_IMAGE",
    "FORMAT_DISK_LINUX",
    "FORMAT_DISK_LINUX_FILE",
    "FORMAT_DISK_LINUX_BLOCK",
    "FORMAT_DISK_WINDOWS",
    "CONFIGURE_LINUX",
    "CONFIGURE_LINUX_FILE",
    "CONFIGURE_LINUX_BLOCK",
    "CONFIGURE_WINDOWS",
    "CLONE_TEST",
];

fn api(emu: &Emu, method: &Method, path: &str, query: &str, body: &[u8]) -> Reply {
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
    let reply = match (method.as_str(), segs.as_slice()) {
        ("GET", ["v3", "config"]) => {
            ok(json!({"config": {"mainRegion": "emulator"}, "regions": [{"id": "emulator"}]}))
        }
        ("POST", ["v3", "sources"]) => {
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
        ("GET", ["v3", "sources"]) => {
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
        ("GET", ["v3", "sources", id]) => match s.db.sources.get(*id) {
            Some(src) => {
                let mut b = src.body.clone();
                b["id"] = json!(src.id);
                b["state"] = json!(src.copystate.to_ascii_lowercase());
                b["migration_cycle"] = json!(src.migrationcycle);
                ok(b)
            }
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6030",
                format!("Invalid source server ID {id}"),
            ),
        },
        ("PUT", ["v3", "sources", id, "diskinfo"]) => match s.db.sources.get_mut(*id) {
            Some(src) => {
                if !v["disks"].is_array() {
                    return bad("SMS.6013", "Incomplete request parameters: disks");
                }
                src.diskinfo = Some(v);
                ok(json!({}))
            }
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6030",
                format!("Invalid source server ID {id}"),
            ),
        },
        ("PUT", ["v3", "sources", id, "changestate"]) => {
            let (Some(cs), Some(cycle)) =
                (str_field(&v, "copystate"), str_field(&v, "migrationcycle"))
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
            match s.db.sources.get_mut(*id) {
                Some(src) => {
                    src.copystate = cs.to_string();
                    src.migrationcycle = cycle.to_string();
                    ok(json!({}))
                }
                None => err(
                    StatusCode::NOT_FOUND,
                    "SMS.6030",
                    format!("Invalid source server ID {id}"),
                ),
            }
        }
        ("GET", ["v3", "sources", id, "command"]) => {
            if !s.db.sources.contains_key(*id) {
                return err(
                    StatusCode::NOT_FOUND,
                    "SMS.6030",
                    format!("Invalid source server ID {id}"),
                );
            }
            match s.db.commands.get_mut(*id).and_then(|q| q.front_mut()) {
                Some(c) => {
                    c.delivered += 1;
                    ok(json!({"command_name": c.command_name, "command_param": c.command_param}))
                }
                None => ok(json!({"command_name": "", "command_param": null})),
            }
        }
        ("POST", ["v3", "sources", id, "command_result"]) => {
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
            let q = s.db.commands.entry((*id).to_string()).or_default();
            match q.iter().position(|c| c.command_name == name) {
                Some(i) => {
                    q.remove(i);
                    s.db.results.push(((*id).to_string(), v));
                    ok(json!({}))
                }
                None if name == "UPLOAD_LOG" || name == "RSET_LOG_ACL" => {
                    s.db.results.push(((*id).to_string(), v));
                    ok(json!({}))
                }
                None => bad(
                    "SMS.6021",
                    format!(
                        "The command {name} from the Agent is inconsistent with that from SMS."
                    ),
                ),
            }
        }
        ("POST", ["v3", "tasks"]) => create_task(&mut s, v),
        ("GET", ["v3", "tasks", id]) => match s.db.tasks.get(*id) {
            Some(t) => ok(task_view(t)),
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6000",
                format!("task {id} not found"),
            ),
        },
        ("DELETE", ["v3", "tasks", id]) => match s.db.tasks.remove(*id) {
            Some(t) => {
                queue(&mut s, &t.source_id, "DELETE", json!({"task_id": t.id}));
                ok(json!({}))
            }
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6000",
                format!("task {id} not found"),
            ),
        },
        ("POST", ["v3", "tasks", id, "action"]) => {
            let Some(t) = s.db.tasks.get_mut(*id) else {
                return err(
                    StatusCode::NOT_FOUND,
                    "SMS.6000",
                    format!("task {id} not found"),
                );
            };
            let op = str_field(&v, "operation").unwrap_or("");
            let command = match op {
                "start" | "restart" => {
                    t.state = "RUNNING".into();
                    Some("START")
                }
                "stop" => Some("STOP"),
                "skip" => Some("SKIP"),
                "sync" => Some("SYNC"),
                "test" | "clone_test" | "network_check" | "clear" | "migration_test" => None,
                other => return bad("SMS.6011", format!("operation {other:?} is not one of start, stop, test, clone_test, restart, network_check, clear, skip, migration_test")),
            };
            let (src, tid) = (t.source_id.clone(), t.id.clone());
            if let Some(c) = command {
                queue(&mut s, &src, c, json!({"task_id": tid}));
            }
            ok(json!({}))
        }
        ("PUT", ["v3", "tasks", id, "progress"]) => {
            let Some(t) = s.db.tasks.get_mut(*id) else {
                return err(
                    StatusCode::NOT_FOUND,
                    "SMS.6000",
                    format!("task {id} not found"),
                );
            };
            let Some(name) = str_field(&v, "subtask_name") else {
                return bad("SMS.6013", "Incomplete request parameters: subtask_name");
            };
            if !SUBTASKS.contains(&name) {
                return bad("SMS.6004", format!("Invalid subtask name {name}"));
            }
            for k in ["progress", "replicatesize", "totalsize"] {
                if !v.get(k).is_some_and(Value::is_u64) {
                    return bad("SMS.6013", format!("Incomplete request parameters: {k}"));
                }
            }
            let progress = v["progress"].as_u64().unwrap_or(0);
            if progress > 100
                || str_field(&v, "process_trace").is_none_or(|p| p.chars().count() > 2048)
            {
                return bad(
                    "SMS.6011",
                    "progress must be 0-100 and process_trace at most 2048 characters",
                );
            }
            t.state = match (progress, name.starts_with("SYNC")) {
                (100, false) => "MIGRATE_SUCCESS",
                (100, true) => "SYNC_SUCCESS",
                _ => "RUNNING",
            }
            .into();
            t.sub_tasks.insert(name.to_string(), json!({"name": name, "progress": progress, "process_trace": v["process_trace"], "migrate_speed": v.get("migrate_speed")}));
            ok(json!({}))
        }
        ("GET", ["v3", "tasks", id, "speed-limit"]) => match s.db.tasks.get(*id) {
            Some(t) => ok(json!({"speed_limit": t.speed_limit})),
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6000",
                format!("task {id} not found"),
            ),
        },
        ("POST", ["v3", "tasks", id, "speed-limit"]) => {
            match (s.db.tasks.get_mut(*id), v["speed_limit"].as_array()) {
                (Some(t), Some(rules)) => {
                    t.speed_limit = rules.clone();
                    ok(json!({}))
                }
                (None, _) => err(
                    StatusCode::NOT_FOUND,
                    "SMS.6000",
                    format!("task {id} not found"),
                ),
                (_, None) => bad("SMS.6013", "Incomplete request parameters: speed_limit"),
            }
        }
        ("POST", ["v3", "tasks", id, "log"]) => {
            match s.db.tasks.get(*id).map(|t| t.source_id.clone()) {
                Some(src) => {
                    let bucket = str_field(&v, "log_bucket").unwrap_or("").to_string();
                    queue(
                        &mut s,
                        &src,
                        "UPLOAD_LOG",
                        json!({"task_id": id, "bucket": bucket}),
                    );
                    ok(json!({}))
                }
                None => err(
                    StatusCode::NOT_FOUND,
                    "SMS.6000",
                    format!("task {id} not found"),
                ),
            }
        }
        ("POST", ["v3", "tasks", id, "consistency-result"]) => {
            match (s.db.tasks.get_mut(*id), v["consistency_result"].as_array()) {
                (Some(t), Some(r)) if r.len() <= 30 => {
                    t.consistency = r.clone();
                    ok(json!({}))
                }
                (None, _) => err(
                    StatusCode::NOT_FOUND,
                    "SMS.6000",
                    format!("task {id} not found"),
                ),
                _ => bad(
                    "SMS.6011",
                    "consistency_result must be an array of at most 30 entries",
                ),
            }
        }
        ("GET", ["v3", "tasks", id, "consistency-result"]) => match s.db.tasks.get(*id) {
            Some(t) => ok(json!({"consistency_result": t.consistency})),
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6000",
                format!("task {id} not found"),
            ),
        },
        ("GET", ["v3", "tasks", id, "configuration-setting"]) => match s.db.tasks.get(*id) {
            Some(t) => ok(
                json!({"configurations": t.body.get("configurations").cloned().unwrap_or(json!([]))}),
            ),
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6000",
                format!("task {id} not found"),
            ),
        },
        ("GET", ["v3", "tasks", id, "certkey"]) => {
            let Some(t) = s.db.tasks.get_mut(*id) else {
                return err(
                    StatusCode::NOT_FOUND,
                    "SMS.6000",
                    format!("task {id} not found"),
                );
            };
            // Made once per task and kept, as the service does.
            if t.certkey.is_none() {
                let ip = str_field(&t.body, "migration_ip")
                    .unwrap_or("127.0.0.1")
                    .to_string();
                match certs::certkey(id, &ip, t.key_passphrase.as_deref()) {
                    Ok(c) => t.certkey = Some(c),
                    Err(e) => {
                        return err(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "SMS.6000",
                            format!("cannot make certificates: {e}"),
                        )
                    }
                }
            }
            ok(t.certkey.clone().unwrap_or(Value::Null))
        }
        ("GET", ["v3", "tasks", id, "passphrase"]) => match s.db.tasks.get(*id) {
            Some(t) => ok(
                json!({"task_id": t.id, "passphrase": t.key_passphrase.clone().unwrap_or_default()}),
            ),
            None => err(
                StatusCode::NOT_FOUND,
                "SMS.6000",
                format!("task {id} not found"),
            ),
        },
        ("POST", ["v3", _task, "update-network-check-info"]) => ok(json!({})),
        _ => err(
            StatusCode::NOT_FOUND,
            "SMS.6000",
            format!("{method} {path} is not emulated"),
        ),
    };
    if reply.0.is_success() && *method != Method::GET {
        s.save();
    }
    reply
}

fn queue(s: &mut Store, source: &str, name: &str, param: Value) {
    s.db.commands
        .entry(source.to_string())
        .or_default()
        .push_back(Cmd {
            command_name: name.to_string(),
            command_param: param,
            delivered: 0,
        });
}

fn create_task(s: &mut Store, mut v: Value) -> Reply {
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
    let Some(source) = s.db.sources.get(&src) else {
        return bad("SMS.6030", format!("Invalid source server ID {src}"));
    };
    let source_disks: Vec<String> = source.body["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect();
    if !v["target_server"].is_object() {
        return bad("SMS.6031", "The target server information is missing.");
    }
    if let Some(disks) = v["target_server"]["disks"].as_array_mut() {
        for d in disks {
            if let Some(n) = d["name"].as_str().map(str::to_string) {
                if d.get("relation_name").is_none() && source_disks.contains(&n) {
                    d["relation_name"] = json!(n);
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
            sub_tasks: Default::default(),
            speed_limit: Vec::new(),
            consistency: Vec::new(),
            source_id: src,
            certkey: None,
            key_passphrase: None,
        },
    );
    ok(json!({"id": id}))
}

fn task_view(t: &TaskRec) -> Value {
    let mut b = t.body.clone();
    b["id"] = json!(t.id);
    b["state"] = json!(t.state);
    b["sub_tasks"] = Value::Array(t.sub_tasks.values().cloned().collect());
    b
}

/// Serves `emu` over TLS with the certificate chain and key in the PEM files `cert` and `key`.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    emu: Emu,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert)?))
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key)?))?
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "no private key in the key file"))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::InvalidInput, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let app = emu.router();
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A failed handshake is the client's problem (e.g. it does not trust our CA).
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
        });
    }
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
