//! The HTTP client of the SMS API: one keep-alive pool, AK/SK signing or IAM tokens, bounded
//! response bodies, and retries with backoff on connection errors, 5xx and 429 only.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::backoff::{retryable_status, Backoff};
use super::models::ErrorBody;
use super::sign;
use super::time::{sdk_date, skew_seconds};
use crate::config::{ApiAccess, Config, ConfigError, Credentials, Secret};
use transfer::Code;

/// Largest response body accepted. The biggest legitimate answer (a task with hundreds of
/// disks, or certkey PEMs) is a few hundred KiB; a larger one is a broken or hostile server.
pub const MAX_BODY: usize = 8 << 20;

/// Clock difference beyond which the API gateway rejects AK/SK signatures (docs/sms-api.md §2.1).
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Renew a token this long before it expires, so a call never goes out with a dying token.
const TOKEN_MARGIN: Duration = Duration::from_secs(30 * 60);

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The service could not be reached: SMS.0201 (network), SMS.0203 (timeout) or SMS.0304
    /// (TLS check failed).
    #[error("{code}: cannot reach the SMS API at {url}: {detail}")]
    Transport {
        /// The SMS error code that fits.
        code: Code,
        /// URL called.
        url: String,
        /// The error and its causes, outermost first.
        detail: String,
    },
    /// The service answered with an error.
    #[error("{method} {path}: HTTP {status}: {code} {msg}")]
    Status {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// HTTP status.
        status: u16,
        /// `error_code` (empty when the body was not an SMS error).
        code: String,
        /// `error_msg` or the start of the body.
        msg: String,
        /// Seconds the server asked us to wait (`Retry-After`).
        retry_after: Option<u64>,
    },
    /// Local clock too far from the server's: AK/SK signatures are refused (SMS.0205).
    #[error("{code}: the local clock is {skew_secs} s off the API server's; AK/SK signatures are refused beyond 900 s. Fix the time (chrony/ntpd) on this host", code = Code::ClockSkew)]
    ClockSkew {
        /// Local minus server time, in seconds.
        skew_secs: i64,
    },
    /// The body was larger than [`MAX_BODY`].
    #[error("{path}: response body larger than {MAX_BODY} bytes; refused")]
    TooLarge {
        /// Path.
        path: String,
    },
    /// The body was not the JSON expected.
    #[error("{path}: malformed response: {detail}")]
    Malformed {
        /// Path.
        path: String,
        /// Parser message.
        detail: String,
    },
    /// The configuration does not allow a call (no endpoint, no credentials).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A call this client cannot make (a header value that cannot be sent, a token without
    /// token auth, no HTTP stack).
    #[error("{0}")]
    Local(String),
}

impl ApiError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Transport { .. } | ApiError::TooLarge { .. } | ApiError::Malformed { .. } => {
                true
            }
            ApiError::Status { status, .. } => retryable_status(*status),
            ApiError::ClockSkew { .. } | ApiError::Config(_) | ApiError::Local(_) => false,
        }
    }

    /// The server's wait hint, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status {
                retry_after: Some(s),
                ..
            } => Some(Duration::from_secs(*s)),
            _ => None,
        }
    }
}

enum Auth {
    Aksk {
        ak: String,
        sk: Secret,
        security_token: Option<Secret>,
    },
    Token {
        iam_endpoint: String,
        username: String,
        password: Secret,
        domain_name: String,
        project_name: String,
        cached: Mutex<Option<(Secret, Instant)>>,
    },
}

/// The SMS API client.
pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    auth: Auth,
    project_id: String,
    domain_id: String,
    backoff: Backoff,
    /// Attempts per call before the error is returned to the caller (who has its own loop).
    attempts: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Builds the client from the configuration's validated API settings (checked here
    /// only for a config built in code rather than loaded).
    pub fn new(cfg: &Config) -> Result<Self, ApiError> {
        let access = match &cfg.access {
            Some(a) => a.clone(),
            None => ApiAccess::from_config(cfg).map_err(|problems| {
                ApiError::Config(ConfigError::Invalid {
                    path: "(built in code)".into(),
                    problems,
                })
            })?,
        };
        let auth = match access.credentials {
            Credentials::Aksk {
                access_key,
                secret_key,
                security_token,
            } => Auth::Aksk {
                ak: access_key,
                sk: secret_key,
                security_token,
            },
            Credentials::Token {
                iam_endpoint,
                username,
                password,
                domain_name,
                project_name,
            } => Auth::Token {
                iam_endpoint,
                username,
                password,
                domain_name,
                project_name,
                cached: Mutex::new(None),
            },
        };
        let mut b = reqwest::Client::builder()
            .timeout(access.timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("sms-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(p) = access.proxy {
            b = b.proxy(p);
        }
        if let Some(ca) = access.ca {
            b = b.add_root_certificate(ca);
        }
        let http = b
            .build()
            .map_err(|e| ApiError::Local(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            endpoint: access.endpoint,
            auth,
            project_id: cfg.api.project_id.clone(),
            domain_id: cfg.api.domain_id.clone(),
            backoff: Backoff::default(),
            attempts: 4,
        })
    }

    /// Replaces the retry policy (tests use short waits).
    pub fn with_retry(mut self, backoff: Backoff, attempts: u32) -> Self {
        self.backoff = backoff;
        self.attempts = attempts.max(1);
        self
    }

    /// `GET path` → `T`.
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(String, String)],
    ) -> Result<T, ApiError> {
        self.call(Method::GET, path, query, None::<&()>).await
    }

    /// `method path` with a JSON body → `T`.
    pub async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.call(method, path, &[], Some(body)).await
    }

    /// One API call with retries on retryable failures.
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ApiError::Malformed {
                path: path.to_string(),
                detail: format!("cannot encode request: {e}"),
            })?,
            None => Vec::new(),
        };
        let mut attempt = 0;
        let mut renewed = false;
        loop {
            let result = self
                .once(&method, path, query, &bytes, body.is_some())
                .await;
            let err = match result {
                Ok(b) => {
                    return parse_body(path, &b);
                }
                Err(e) => e,
            };
            // A 401 with a token: the token may have been revoked early; renew once.
            if let (ApiError::Status { status: 401, .. }, Auth::Token { cached, .. }) =
                (&err, &self.auth)
            {
                if !renewed {
                    renewed = true;
                    if let Ok(mut c) = cached.lock() {
                        *c = None;
                    }
                    continue;
                }
            }
            attempt += 1;
            if !err.is_retryable() || attempt >= self.attempts {
                return Err(err);
            }
            let wait = err
                .retry_after()
                .unwrap_or_else(|| self.backoff.delay(attempt - 1));
            tracing::warn!(%method, path, attempt, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), error = %err, "SMS API call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn once(
        &self,
        method: &Method,
        path: &str,
        query: &[(String, String)],
        body: &[u8],
        json: bool,
    ) -> Result<Vec<u8>, ApiError> {
        let url = format!("{}{}", self.endpoint, path);
        let host = host_of(&self.endpoint);
        let mut headers: Vec<(String, String)> = vec![("Host".into(), host)];
        if json {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        if !self.project_id.is_empty() {
            headers.push(("X-Project-Id".into(), self.project_id.clone()));
        }
        if !self.domain_id.is_empty() {
            headers.push(("X-Domain-Id".into(), self.domain_id.clone()));
        }
        match &self.auth {
            Auth::Aksk {
                ak,
                sk,
                security_token,
            } => {
                headers.push((sign::DATE_HEADER.into(), sdk_date(SystemTime::now())));
                if let Some(t) = security_token {
                    headers.push(("X-Security-Token".into(), t.expose().to_string()));
                }
                let req = sign::Request {
                    method: method.as_str(),
                    path,
                    query,
                    headers: &headers,
                    body,
                };
                let authz = sign::authorization(&req, ak, sk.expose().as_bytes());
                headers.push(("Authorization".into(), authz));
            }
            Auth::Token { .. } => {
                let token = self.token().await?;
                headers.push(("X-Auth-Token".into(), token.expose().to_string()));
            }
        }
        let mut map = HeaderMap::new();
        for (k, v) in &headers {
            // Host is set by the HTTP layer from the URL; it was only needed for the signature.
            if k == "Host" {
                continue;
            }
            let (Ok(name), Ok(value)) = (
                HeaderName::try_from(k.as_str()),
                HeaderValue::try_from(v.as_str()),
            ) else {
                return Err(ApiError::Local(format!(
                    "header {k} has a value that cannot be sent"
                )));
            };
            map.insert(name, value);
        }
        let resp = self
            .http
            .request(method.clone(), &url)
            .query(query)
            .headers(map)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| transport(url.clone(), &e))?;
        let status = resp.status();
        let server_date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = read_limited(resp, path).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            if let Some(skew) = server_date
                .as_deref()
                .and_then(|d| skew_seconds(SystemTime::now(), d))
            {
                if skew.unsigned_abs() > MAX_SKEW.as_secs() {
                    let e = ApiError::ClockSkew { skew_secs: skew };
                    tracing::error!(error_code = %Code::ClockSkew, skew_secs = skew, "{e}");
                    return Err(e);
                }
            }
        }
        let err: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
        let msg = if err.error_msg.is_empty() && err.error_code.is_empty() {
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned()
        } else {
            err.error_msg
        };
        Err(ApiError::Status {
            method: method.to_string(),
            path: path.to_string(),
            status: status.as_u16(),
            code: err.error_code,
            msg,
            retry_after,
        })
    }

    /// A valid IAM token, fetched or renewed when it is missing or near expiry.
    async fn token(&self) -> Result<Secret, ApiError> {
        let Auth::Token {
            iam_endpoint,
            username,
            password,
            domain_name,
            project_name,
            cached,
        } = &self.auth
        else {
            return Err(ApiError::Local("token requested without token auth".into()));
        };
        if let Ok(c) = cached.lock() {
            if let Some((t, renew_at)) = c.as_ref() {
                if Instant::now() < *renew_at {
                    return Ok(t.clone());
                }
            }
        }
        // The password body of IAM "obtain a user token" (reference §3.2).
        let body = serde_json::json!({
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": { "user": {
                        "name": username,
                        "password": password.expose(),
                        "domain": { "name": domain_name }
                    }}
                },
                "scope": { "project": { "name": project_name } }
            }
        });
        let url = format!("{iam_endpoint}/v3/auth/tokens");
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| transport(url.clone(), &e))?;
        let status = resp.status();
        let token = resp
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_limited(resp, "/v3/auth/tokens").await?;
        if !status.is_success() {
            let err: ErrorBody = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(ApiError::Status {
                method: "POST".into(),
                path: "/v3/auth/tokens".into(),
                status: status.as_u16(),
                code: err.error_code,
                msg: err.error_msg,
                retry_after: None,
            });
        }
        let token = Secret::new(token.ok_or_else(|| ApiError::Malformed {
            path: "/v3/auth/tokens".into(),
            detail: "no X-Subject-Token header".into(),
        })?);
        let lifetime = token_lifetime(&bytes).unwrap_or(Duration::from_secs(24 * 3600));
        let renew_at = Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN).max(lifetime / 2);
        if let Ok(mut c) = cached.lock() {
            *c = Some((token.clone(), renew_at));
        }
        Ok(token)
    }
}

/// A transport error with its whole cause chain (reqwest's own message omits the cause, which is
/// where "certificate not trusted" or "connection refused" is) and the SMS code that fits.
fn transport(url: String, e: &reqwest::Error) -> ApiError {
    let mut detail = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        src = s.source();
    }
    let lower = detail.to_ascii_lowercase();
    let code =
        if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
            Code::TlsAuthFailed
        } else if e.is_timeout() {
            Code::ApiTimeout
        } else {
            Code::ApiNetworkBusy
        };
    ApiError::Transport { code, url, detail }
}

fn host_of(endpoint: &str) -> String {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Lifetime of a token from `token.expires_at` of the IAM answer.
fn token_lifetime(body: &[u8]) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let exp = v.get("token")?.get("expires_at")?.as_str()?;
    let t = super::time::parse_iso8601(exp)?;
    t.duration_since(SystemTime::now()).ok()
}

async fn read_limited(mut resp: reqwest::Response, path: &str) -> Result<Vec<u8>, ApiError> {
    if resp.content_length().is_some_and(|l| l > MAX_BODY as u64) {
        return Err(ApiError::TooLarge { path: path.into() });
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > MAX_BODY {
                    return Err(ApiError::TooLarge { path: path.into() });
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(transport(path.to_string(), &e)),
        }
    }
}

fn parse_body<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T, ApiError> {
    // An empty success body stands for `{}` (several calls answer 200/204 with nothing).
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| ApiError::Malformed {
        path: path.to_string(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(
            host_of("https://sms.cn-north-4.myhuaweicloud.com"),
            "sms.cn-north-4.myhuaweicloud.com"
        );
        assert_eq!(host_of("http://127.0.0.1:8080/base"), "127.0.0.1:8080");
    }

    #[test]
    fn empty_body_is_empty_object() {
        let v: serde_json::Value = parse_body("/x", b"").unwrap();
        assert_eq!(v, serde_json::json!({}));
        assert!(parse_body::<serde_json::Value>("/x", b"{oops").is_err());
    }
}
