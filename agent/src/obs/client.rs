//! The OBS calls of a log upload: PUT object, multipart upload resumed from the parts OBS
//! already holds (ListParts) after a dropped connection or a restarted server, and PUT
//! object ACL. Every request is signed with signature V4 over `UNSIGNED-PAYLOAD`; parts carry
//! `Content-MD5`, so OBS refuses a part damaged on the way and a listed part is known good.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use md5::{Digest, Md5};
use reqwest::header::HeaderMap;
use reqwest::Method;

use super::sigv4::{encode_key, Request, Signer, UNSIGNED_PAYLOAD};
use super::xml;
use crate::api::sign::escape;
use crate::config::Secret;

/// The AK/SK (and the security token of a temporary AK/SK) requests are signed with.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Access key id.
    pub access_key: String,
    /// Secret key.
    pub secret_key: Secret,
    /// `x-amz-security-token` of a temporary AK/SK.
    pub security_token: Option<Secret>,
}

/// Why an OBS call failed.
#[derive(Debug, thiserror::Error)]
pub enum ObsError {
    /// OBS answered with an error (its `Code` and `Message`).
    #[error("OBS answered {status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// OBS/S3 error code, e.g. `NoSuchBucket`, `SignatureDoesNotMatch`.
        code: String,
        /// OBS's message.
        message: String,
    },
    /// No answer: connection refused or dropped, timeout, TLS failure.
    #[error("cannot reach OBS at {endpoint}: {detail}")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        detail: String,
    },
    /// A local failure (reading the file, a bad endpoint).
    #[error("{0}")]
    Local(String),
}

impl ObsError {
    /// Whether trying again later may succeed (the network or OBS itself, not the request).
    pub fn is_retryable(&self) -> bool {
        match self {
            ObsError::Transport { .. } => true,
            ObsError::Refused { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            ObsError::Local(_) => false,
        }
    }
}

/// What to upload where.
#[derive(Debug, Clone)]
pub struct UploadSpec<'a> {
    /// Bucket.
    pub bucket: &'a str,
    /// Object key.
    pub key: &'a str,
    /// The file.
    pub path: &'a Path,
    /// Part size of a multipart upload (files up to it go in one PUT).
    pub part_size: u64,
    /// Canned ACL of the new object.
    pub acl: &'a str,
    /// Upload id of an earlier, unfinished attempt.
    pub resume: Option<String>,
}

/// How an upload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Parts sent (1 for a single PUT).
    pub parts: u32,
    /// Parts OBS already had from an earlier, interrupted attempt.
    pub parts_resumed: u32,
}

/// A client of one OBS endpoint.
#[derive(Debug, Clone)]
pub struct ObsClient {
    http: reqwest::Client,
    /// `http` or `https`.
    scheme: String,
    /// `Host` as reqwest sends it (the port only when not the scheme's default).
    host: String,
    /// Bucket in the path (`host/bucket/key`) rather than in the host name
    /// (`bucket.host/key`, OBS's documented form).
    path_style: bool,
    region: String,
    creds: Credentials,
    /// How long an upload keeps retrying through an outage.
    pub retry_for: Duration,
}

impl ObsClient {
    /// A client of `endpoint` (`https://obs.REGION.myhuaweicloud.com`; a bare domain gets
    /// `https://`), signing for `region`. Requests name the bucket in the host name
    /// (virtual-hosted style) unless `path_style` is asked for or the endpoint is an IP
    /// address or `localhost`, which no bucket name can be prefixed to.
    pub fn new(
        endpoint: &str,
        region: &str,
        creds: Credentials,
        ca: Option<reqwest::Certificate>,
        timeout: Duration,
        path_style: bool,
    ) -> Result<Self, ObsError> {
        let e = endpoint.trim().trim_end_matches('/');
        let full = if e.contains("://") {
            e.to_string()
        } else {
            format!("https://{e}")
        };
        let url = reqwest::Url::parse(&full)
            .map_err(|err| ObsError::Local(format!("OBS endpoint {endpoint:?}: {err}")))?;
        let Some(h) = url.host_str() else {
            return Err(ObsError::Local(format!(
                "OBS endpoint {endpoint:?} names no host"
            )));
        };
        let host = match url.port() {
            Some(p) => format!("{h}:{p}"),
            None => h.to_string(),
        };
        let literal =
            h == "localhost" || h.starts_with('[') || h.parse::<std::net::IpAddr>().is_ok();
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("sms-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = ca {
            b = b.add_root_certificate(ca);
        }
        let http = b
            .build()
            .map_err(|err| ObsError::Local(format!("cannot build the HTTP client: {err}")))?;
        Ok(Self {
            http,
            scheme: url.scheme().to_string(),
            host,
            path_style: path_style || literal,
            region: region.to_string(),
            creds,
            retry_for: Duration::from_secs(120),
        })
    }

    /// The region of an OBS domain `obs.REGION.myhuaweicloud.com` (or `.com.cn` etc.).
    pub fn region_of(endpoint: &str) -> Option<String> {
        let host = endpoint.split("://").last()?.split(['/', ':']).next()?;
        let mut parts = host.split('.');
        (parts.next()? == "obs")
            .then(|| parts.next().map(str::to_string))
            .flatten()
            .filter(|r| !r.is_empty() && host.contains("myhuaweicloud"))
    }

    /// One signed request; the answer's headers and body on a 2xx.
    async fn call(
        &self,
        method: Method,
        bucket: &str,
        key: &str,
        query: &[(String, String)],
        extra: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<(HeaderMap, String), ObsError> {
        // A bucket name with dots cannot be a host label under the endpoint's certificate.
        let in_path = self.path_style || bucket.contains('.');
        let host = if in_path {
            self.host.clone()
        } else {
            format!("{bucket}.{}", self.host)
        };
        let path = match (in_path, key.is_empty()) {
            (true, true) => format!("/{}", escape(bucket)),
            (true, false) => format!("/{}/{}", escape(bucket), encode_key(key)),
            (false, true) => "/".to_string(),
            (false, false) => format!("/{}", encode_key(key)),
        };
        let base = format!("{}://{host}", self.scheme);
        let qs = query
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    escape(k)
                } else {
                    format!("{}={}", escape(k), escape(v))
                }
            })
            .collect::<Vec<_>>()
            .join("&");
        let url = if qs.is_empty() {
            format!("{base}{path}")
        } else {
            format!("{base}{path}?{qs}")
        };
        let amz_date = crate::api::time::sdk_date(SystemTime::now());
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), host.clone()),
            ("x-amz-content-sha256".into(), UNSIGNED_PAYLOAD.into()),
            ("x-amz-date".into(), amz_date.clone()),
        ];
        if let Some(t) = &self.creds.security_token {
            headers.push(("x-amz-security-token".into(), t.expose().to_string()));
        }
        for (k, v) in extra {
            headers.push(((*k).to_string(), v.clone()));
        }
        let signer = Signer {
            access_key: &self.creds.access_key,
            secret_key: self.creds.secret_key.expose(),
            region: &self.region,
            service: "s3",
        };
        let auth = signer.authorization(
            &Request {
                method: method.as_str(),
                path: &path,
                query,
                headers: &headers,
                payload_hash: UNSIGNED_PAYLOAD,
            },
            &amz_date,
        );
        let mut req = self.http.request(method, &url).body(body);
        for (k, v) in headers.iter().filter(|(k, _)| k != "host") {
            req = req.header(k.as_str(), v.as_str());
        }
        req = req.header("authorization", auth);
        let resp = req.send().await.map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let hdrs = resp.headers().clone();
        let text = resp.text().await.map_err(|e| self.transport(&e))?;
        if status.is_success() {
            return Ok((hdrs, text));
        }
        Err(ObsError::Refused {
            status: status.as_u16(),
            code: xml::tag(&text, "Code").unwrap_or_else(|| status.to_string()),
            message: xml::tag(&text, "Message").unwrap_or_default(),
        })
    }

    fn transport(&self, e: &reqwest::Error) -> ObsError {
        // reqwest's message names the URL (never a credential: those travel in headers).
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            src = s.source();
        }
        ObsError::Transport {
            endpoint: format!("{}://{}", self.scheme, self.host),
            detail,
        }
    }

    /// Puts `body` as `bucket/key` with canned ACL `acl`, retrying through an outage of up to
    /// [`ObsClient::retry_for`].
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        acl: &str,
        content_type: &str,
    ) -> Result<(), ObsError> {
        let extra = [
            ("x-amz-acl", acl.to_string()),
            ("content-md5", content_md5(&body)),
            ("content-type", content_type.to_string()),
        ];
        let deadline = Instant::now() + self.retry_for;
        self.retrying(deadline, "PUT object", || {
            self.call(Method::PUT, bucket, key, &[], &extra, body.clone())
        })
        .await
        .map(|_| ())
    }

    /// Sets the object's canned ACL (`private`, `public-read`, …).
    pub async fn put_object_acl(&self, bucket: &str, key: &str, acl: &str) -> Result<(), ObsError> {
        self.call(
            Method::PUT,
            bucket,
            key,
            &[("acl".into(), String::new())],
            &[("x-amz-acl", acl.to_string())],
            Vec::new(),
        )
        .await
        .map(|_| ())
    }

    /// Uploads a file as `spec` says: in one PUT up to its part size, in parts beyond,
    /// continuing `spec.resume` (an upload id of an earlier attempt at the same file and key)
    /// when given; `on_upload_id` is told a new id before any part is sent (the caller keeps
    /// it so that a restarted agent resumes). Retries through an outage of up to
    /// [`ObsClient::retry_for`].
    pub async fn upload_file(
        &self,
        spec: &UploadSpec<'_>,
        on_upload_id: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Uploaded, ObsError> {
        let UploadSpec {
            bucket,
            key,
            path,
            part_size,
            acl,
            ..
        } = *spec;
        let resume = spec.resume.clone();
        let size = std::fs::metadata(path)
            .map_err(|e| ObsError::Local(format!("{}: {e}", path.display())))?
            .len();
        let deadline = Instant::now() + self.retry_for;
        if size <= part_size {
            let body = std::fs::read(path)
                .map_err(|e| ObsError::Local(format!("{}: {e}", path.display())))?;
            let extra = [
                ("x-amz-acl", acl.to_string()),
                ("content-md5", content_md5(&body)),
                ("content-type", "application/gzip".to_string()),
            ];
            self.retrying(deadline, "PUT object", || {
                self.call(Method::PUT, bucket, key, &[], &extra, body.clone())
            })
            .await?;
            return Ok(Uploaded {
                parts: 1,
                parts_resumed: 0,
            });
        }
        let count = u32::try_from(size.div_ceil(part_size))
            .ok()
            .filter(|n| *n <= 10_000)
            .ok_or_else(|| {
                ObsError::Local(format!(
                    "{size} bytes need more than 10,000 parts of {part_size}"
                ))
            })?;
        let upload_id = match resume {
            Some(id) => id,
            None => {
                let query = [("uploads".to_string(), String::new())];
                let extra = [
                    ("x-amz-acl", acl.to_string()),
                    ("content-type", "application/gzip".to_string()),
                ];
                let (_, body) = self
                    .retrying(deadline, "initiate multipart upload", || {
                        self.call(Method::POST, bucket, key, &query, &extra, Vec::new())
                    })
                    .await?;
                let id = xml::tag(&body, "UploadId")
                    .ok_or_else(|| ObsError::Local("OBS gave no UploadId".into()))?;
                on_upload_id(&id);
                id
            }
        };
        let mut file =
            File::open(path).map_err(|e| ObsError::Local(format!("{}: {e}", path.display())))?;
        let mut etags: Vec<Option<String>> = vec![None; count as usize];
        // Parts found on OBS instead of sent, each counted once.
        let mut skipped = vec![false; count as usize];
        loop {
            // What OBS holds already: after a cut, a part may have landed unanswered.
            let listed = self
                .retrying(deadline, "list parts", || {
                    self.list_parts(bucket, key, &upload_id)
                })
                .await?;
            let mut failed = None;
            for n in 1..=count {
                let off = u64::from(n - 1) * part_size;
                let len = part_size.min(size - off);
                let buf = read_at(&mut file, off, len)
                    .map_err(|e| ObsError::Local(format!("{}: {e}", path.display())))?;
                let md5 = Md5::digest(&buf);
                let want = format!("\"{}\"", hex(&md5));
                // A listed part of the right size whose ETag (when the store gives one) is
                // our MD5 is ours, whole: it was sent with Content-MD5.
                if let Some((_, l, tag)) = listed.iter().find(|(pn, _, _)| *pn == n) {
                    if *l == len && tag.as_ref().is_none_or(|t| t.eq_ignore_ascii_case(&want)) {
                        skipped[(n - 1) as usize] = true;
                        etags[(n - 1) as usize] = Some(tag.clone().unwrap_or_else(|| want.clone()));
                        continue;
                    }
                }
                let r = self
                    .call(
                        Method::PUT,
                        bucket,
                        key,
                        &[
                            ("partNumber".into(), n.to_string()),
                            ("uploadId".into(), upload_id.clone()),
                        ],
                        &[(
                            "content-md5",
                            base64::engine::general_purpose::STANDARD.encode(md5),
                        )],
                        buf,
                    )
                    .await;
                match r {
                    Ok(h) => {
                        let tag =
                            h.0.get("etag")
                                .and_then(|v| v.to_str().ok())
                                .map_or_else(|| want.clone(), str::to_string);
                        etags[(n - 1) as usize] = Some(tag);
                    }
                    Err(e) if e.is_retryable() && Instant::now() < deadline => {
                        failed = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match failed {
                None => break,
                Some(e) => {
                    tracing::warn!(error = %e, upload_id = %upload_id, "part upload failed; resuming from the parts OBS holds");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let body = format!(
            "<CompleteMultipartUpload>{}</CompleteMultipartUpload>",
            etags
                .iter()
                .enumerate()
                .map(|(i, t)| format!(
                    "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                    i + 1,
                    t.as_deref().unwrap_or_default()
                ))
                .collect::<String>()
        );
        let query = [("uploadId".to_string(), upload_id.clone())];
        let extra = [("content-type", "application/xml".to_string())];
        self.retrying(deadline, "complete multipart upload", || {
            self.call(
                Method::POST,
                bucket,
                key,
                &query,
                &extra,
                body.clone().into_bytes(),
            )
        })
        .await?;
        Ok(Uploaded {
            parts: count,
            parts_resumed: u32::try_from(skipped.iter().filter(|s| **s).count()).unwrap_or(count),
        })
    }

    /// The parts of an upload OBS holds: (number, size, ETag when given).
    async fn list_parts(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<(u32, u64, Option<String>)>, ObsError> {
        let mut out = Vec::new();
        let mut marker = String::new();
        loop {
            let mut q = vec![("uploadId".to_string(), upload_id.to_string())];
            if !marker.is_empty() {
                q.push(("part-number-marker".into(), marker.clone()));
            }
            let (_, body) = self
                .call(Method::GET, bucket, key, &q, &[], Vec::new())
                .await?;
            for p in xml::tags(&body, "Part") {
                let n = xml::tag(&p, "PartNumber").and_then(|v| v.parse().ok());
                let size = xml::tag(&p, "Size").and_then(|v| v.parse().ok());
                if let (Some(n), Some(size)) = (n, size) {
                    out.push((n, size, xml::tag(&p, "ETag")));
                }
            }
            match xml::tag(&body, "NextPartNumberMarker") {
                Some(m)
                    if xml::tag(&body, "IsTruncated").as_deref() == Some("true") && m != marker =>
                {
                    marker = m
                }
                _ => return Ok(out),
            }
        }
    }

    /// Runs `f` until it succeeds, fails for good, or `deadline` passes.
    async fn retrying<T, F, Fut>(
        &self,
        deadline: Instant,
        what: &str,
        mut f: F,
    ) -> Result<T, ObsError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ObsError>>,
    {
        let mut wait = Duration::from_millis(500);
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && Instant::now() + wait < deadline => {
                    tracing::warn!(error = %e, call = what, retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "OBS call failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn read_at(f: &mut File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(off))?;
    let mut buf = Vec::new();
    f.by_ref().take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "file shrank during the upload",
        ));
    }
    Ok(buf)
}

fn content_md5(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_go_in_the_host_name_of_a_domain_endpoint_only() {
        let creds = Credentials {
            access_key: "AK".into(),
            secret_key: Secret::new("SK"),
            security_token: None,
        };
        let t = Duration::from_secs(5);
        let c = |e: &str, p: bool| ObsClient::new(e, "r", creds.clone(), None, t, p).unwrap();
        let obs = c("obs.cn-north-4.myhuaweicloud.com", false);
        assert!(
            !obs.path_style
                && obs.scheme == "https"
                && obs.host == "obs.cn-north-4.myhuaweicloud.com"
        );
        assert!(c("obs.cn-north-4.myhuaweicloud.com", true).path_style);
        assert!(c("http://127.0.0.1:9000", false).path_style);
        assert_eq!(c("http://127.0.0.1:9000", false).host, "127.0.0.1:9000");
        assert!(c("http://localhost:9000", false).path_style);
        assert!(c("http://[::1]:9000", false).path_style);
        assert!(ObsClient::new("https://:9000", "r", creds.clone(), None, t, false).is_err());
    }

    #[test]
    fn region_from_obs_domain() {
        assert_eq!(
            ObsClient::region_of("obs.cn-north-4.myhuaweicloud.com").as_deref(),
            Some("cn-north-4")
        );
        assert_eq!(
            ObsClient::region_of("https://obs.ap-southeast-1.myhuaweicloud.com/").as_deref(),
            Some("ap-southeast-1")
        );
        assert_eq!(ObsClient::region_of("http://127.0.0.1:9000"), None);
    }
}
