//! The SMS API emulator: the agent-side calls of docs/sms-api.md §3 and the operator calls that
//! drive them, AK/SK and token auth, body validation with SMS error codes, a request journal,
//! and fault injection — so the agent can be run and tested end to end without the cloud.
//!
//! One fallback handler takes every request: journal, faults and auth apply to all of them in
//! one place, in order, which a router with layered middleware would scatter. It hands the call
//! to `routes`, which picks the handler in the module of the call's resource: `sources`,
//! `commands`, `tasks`, `reports` (progress, consistency results), `certkey`; the test's own
//! calls go to `admin`.

mod admin;
pub mod auth;
mod certkey;
pub mod certs;
mod commands;
mod netcheck;
mod reports;
mod routes;
mod sources;
pub mod store;
mod tasks;

pub use sources::{copystate_pair_ok, validate_source};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use store::{Entry, Store};

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
        None if admin => admin::call(&emu, &method, &path, &body),
        None if path == "/v3/auth/tokens" && method == Method::POST => iam(&emu, &body),
        None => match authenticate(&emu, &method, &path, &query, &headers, &body) {
            Err(r) => r,
            Ok(kind) => {
                auth_kind = kind;
                routes::api(&emu, &method, &path, &query, &body)
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

fn str_field<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// SMS.6000 for a task the emulator does not know.
fn no_task(id: &str) -> Reply {
    err(
        StatusCode::NOT_FOUND,
        "SMS.6000",
        format!("task {id} not found"),
    )
}

/// SMS.6030 for a source the emulator does not know.
fn no_source(id: &str) -> Reply {
    err(
        StatusCode::NOT_FOUND,
        "SMS.6030",
        format!("Invalid source server ID {id}"),
    )
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
