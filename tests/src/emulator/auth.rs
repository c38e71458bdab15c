//! Checking `SDK-HMAC-SHA256` signatures the way the API gateway does, written independently of
//! the agent's signer so that the two check each other.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// How far `X-Sdk-Date` may be from the server's clock (docs/sms-api.md §2.1).
pub const MAX_SKEW_SECS: i64 = 15 * 60;

/// Why a request's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable credentials at all.
    #[error("no Authorization or X-Auth-Token header")]
    Missing,
    /// The Authorization header is not `SDK-HMAC-SHA256 Access=…, SignedHeaders=…, Signature=…`.
    #[error("malformed Authorization header")]
    Malformed,
    /// Unknown access key.
    #[error("unknown access key")]
    UnknownKey,
    /// `X-Sdk-Date` missing or unparsable.
    #[error("missing or invalid X-Sdk-Date")]
    BadDate,
    /// `X-Sdk-Date` too far from the server's clock.
    #[error("X-Sdk-Date is {0} s off the server clock (limit 900 s)")]
    Skew(i64),
    /// The signature does not match.
    #[error("signature mismatch")]
    Mismatch,
    /// A token that is unknown or expired.
    #[error("token unknown or expired")]
    BadToken,
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` is kept literally, as the gateway does).
pub fn unpct(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The canonical request for `method`, a raw (still encoded) `path` and `query`, the named
/// headers (lookup by lowercase name) and the body.
pub fn canonical(
    method: &str,
    raw_path: &str,
    raw_query: &str,
    signed: &[&str],
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
) -> String {
    let mut path: String = raw_path
        .split('/')
        .map(|seg| pct(&unpct(seg)))
        .collect::<Vec<_>>()
        .join("/");
    if !path.ends_with('/') {
        path.push('/');
    }
    let mut q: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct(&unpct(k)), pct(&unpct(v)))
        })
        .collect();
    q.sort();
    let query = q
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut hdrs = String::new();
    for h in signed {
        hdrs.push_str(&format!("{h}:{}\n", header(h).unwrap_or_default().trim()));
    }
    let payload = header("x-sdk-content-sha256").unwrap_or_else(|| hexs(&Sha256::digest(body)));
    format!(
        "{method}\n{path}\n{query}\n{hdrs}\n{}\n{payload}",
        signed.join(";")
    )
}

/// The parts of a received request that a signature covers.
pub struct Received<'a> {
    /// Method.
    pub method: &'a str,
    /// Path as received (percent-encoded).
    pub raw_path: &'a str,
    /// Query as received.
    pub raw_query: &'a str,
    /// Header lookup by lowercase name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
    /// Body bytes.
    pub body: &'a [u8],
}

/// Checks an `Authorization` header; `keys` maps AK → SK, `now` is the server's Unix time.
pub fn verify(
    authorization: &str,
    keys: &dyn Fn(&str) -> Option<String>,
    req: &Received<'_>,
    now: i64,
) -> Result<String, AuthError> {
    let Received {
        method,
        raw_path,
        raw_query,
        header,
        body,
    } = *req;
    let rest = authorization
        .strip_prefix("SDK-HMAC-SHA256 ")
        .ok_or(AuthError::Malformed)?;
    let mut access = None;
    let mut signed = None;
    let mut sig = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or(AuthError::Malformed)?;
        match k {
            "Access" => access = Some(v.to_string()),
            "SignedHeaders" => signed = Some(v.to_string()),
            "Signature" => sig = Some(v.to_string()),
            _ => return Err(AuthError::Malformed),
        }
    }
    let (access, signed, sig) = (
        access.ok_or(AuthError::Malformed)?,
        signed.ok_or(AuthError::Malformed)?,
        sig.ok_or(AuthError::Malformed)?,
    );
    let sk = keys(&access).ok_or(AuthError::UnknownKey)?;
    let date = header("x-sdk-date").ok_or(AuthError::BadDate)?;
    let t = parse_sdk_date(&date).ok_or(AuthError::BadDate)?;
    if (now - t).abs() > MAX_SKEW_SECS {
        return Err(AuthError::Skew(now - t));
    }
    let names: Vec<&str> = signed.split(';').filter(|s| !s.is_empty()).collect();
    let creq = canonical(method, raw_path, raw_query, &names, header, body);
    let sts = format!(
        "SDK-HMAC-SHA256\n{date}\n{}",
        hexs(&Sha256::digest(creq.as_bytes()))
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(sk.as_bytes()).map_err(|_| AuthError::Mismatch)?;
    mac.update(sts.as_bytes());
    if hexs(&mac.finalize().into_bytes()) == sig {
        Ok(access)
    } else {
        Err(AuthError::Mismatch)
    }
}

/// Unix time of `YYYYMMDDTHHMMSSZ`.
pub fn parse_sdk_date(s: &str) -> Option<i64> {
    if s.len() != 16 || s.as_bytes().get(8) != Some(&b'T') || !s.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(9..11)?,
        n(11..13)?,
        n(13..15)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    // days_from_civil
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.to_string())
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        auth: &str,
        method: &str,
        path: &str,
        query: &str,
        h: &[(&str, &str)],
        body: &str,
        ak: &str,
        sk: &str,
    ) -> Result<String, AuthError> {
        let now = parse_sdk_date(&hdr(h)("x-sdk-date").unwrap()).unwrap();
        let sk = sk.to_string();
        let ak = ak.to_string();
        let header = hdr(h);
        let req = Received {
            method,
            raw_path: path,
            raw_query: query,
            header: &header,
            body: body.as_bytes(),
        };
        verify(auth, &move |a| (a == ak).then(|| sk.clone()), &req, now)
    }

    #[test]
    fn sdk_vectors_verify() {
        let h = [("X-Sdk-Date", "20060102T150405Z")];
        let a = "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624";
        assert_eq!(
            check(
                a,
                "GET",
                "/path",
                "limit=1",
                &h,
                "",
                "AccessKey",
                "SecretKey"
            ),
            Ok("AccessKey".into())
        );
        assert_eq!(
            check(
                a,
                "GET",
                "/path",
                "limit=2",
                &h,
                "",
                "AccessKey",
                "SecretKey"
            ),
            Err(AuthError::Mismatch)
        );
        assert_eq!(
            check(a, "GET", "/path", "limit=1", &h, "", "AccessKey", "Wrong"),
            Err(AuthError::Mismatch)
        );
        let a = "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=cecc2af119b18ab70b4d094c0750f3b42c02f254903179a0fc2cc72fc9db4f59";
        assert!(check(
            a,
            "POST",
            "/path",
            "key=value",
            &h,
            "{\"Name\":\"test\",\"Id\":1}\n",
            "AccessKey",
            "SecretKey"
        )
        .is_ok());
        let h = [
            ("Host", "service.endpoint.myhuaweicloud.com"),
            ("X-Sdk-Date", "20200608T023900Z"),
        ];
        let a = "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=cfb4171acec81de07d50e53d57eb77edd537414d66ddb1d7d780f128e12cd842";
        assert!(check(
            a,
            "GET",
            "/resources",
            "size=1",
            &h,
            "",
            "AccessKey",
            "SecretKey"
        )
        .is_ok());
        let a = "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=436b1ac0a1ae03705934bb70ef2f2e09f7bfed2117d731a38235053199323a1f";
        assert!(check(
            a,
            "POST",
            "/resources",
            "size=1",
            &h,
            "{\"name\":\"test\",\"id\":1}",
            "AccessKey",
            "SecretKey"
        )
        .is_ok());
        let h = [
            ("content-type", "application/json"),
            ("host", "service.region.example.com"),
            ("x-sdk-date", "20191115T033655Z"),
        ];
        let a = "SDK-HMAC-SHA256 Access=QTWAOYTTINDUT2QVKYUC, SignedHeaders=content-type;host;x-sdk-date, Signature=7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe";
        assert!(check(
            a,
            "GET",
            "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs",
            "limit=2&marker=13551d6b-755d-4757-b956-536f674975c0",
            &h,
            "",
            "QTWAOYTTINDUT2QVKYUC",
            "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"
        )
        .is_ok());
    }

    #[test]
    fn skew_and_garbage() {
        let h = [("X-Sdk-Date", "20060102T150405Z")];
        let a = "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624";
        let now = parse_sdk_date("20060102T150405Z").unwrap() + 901;
        let header = hdr(&h);
        let req = Received {
            method: "GET",
            raw_path: "/path",
            raw_query: "limit=1",
            header: &header,
            body: b"",
        };
        let r = verify(a, &|_| Some("SecretKey".into()), &req, now);
        assert_eq!(r, Err(AuthError::Skew(901)));
        assert_eq!(
            verify("Basic x", &|_| None, &req, 0),
            Err(AuthError::Malformed)
        );
        assert_eq!(parse_sdk_date("20060102T150405Z"), Some(1_136_214_245));
    }
}
