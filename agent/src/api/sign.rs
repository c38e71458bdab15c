//! AK/SK request signing, `SDK-HMAC-SHA256`, as the Huawei Cloud API gateway checks it.
//!
//! The algorithm (docs/sms-api.md §2.1) is the one of the official SDKs' `signer` modules; the
//! SDKs' own test vectors are the unit tests below.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Name of the algorithm, first line of the string to sign and of the Authorization value.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// Header carrying the signing time, `YYYYMMDDTHHMMSSZ` (UTC).
pub const DATE_HEADER: &str = "X-Sdk-Date";
/// Header that, when present, replaces the body hash (e.g. `UNSIGNED-PAYLOAD`).
pub const CONTENT_SHA256_HEADER: &str = "X-Sdk-Content-Sha256";

/// The parts of an HTTP request that are signed.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// HTTP method, uppercase.
    pub method: &'a str,
    /// Path, not yet percent-encoded (`/v3/sources`).
    pub path: &'a str,
    /// Query parameters, not yet percent-encoded.
    pub query: &'a [(String, String)],
    /// Headers to sign (every header sent, including `Host` and `X-Sdk-Date`).
    pub headers: &'a [(String, String)],
    /// Exact body bytes.
    pub body: &'a [u8],
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// RFC 3986 percent-encoding: unreserved characters kept, everything else `%XX` uppercase.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The names of the headers to sign: lowercase, sorted, without names containing `_` (the
/// gateway drops those before checking).
pub fn signed_header_names(headers: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .filter(|k| !k.contains('_'))
        .collect();
    names.sort();
    names.dedup();
    names
}

fn canonical_uri(path: &str) -> String {
    let mut uri = path.split('/').map(escape).collect::<Vec<_>>().join("/");
    if !uri.ends_with('/') {
        uri.push('/');
    }
    uri
}

fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> =
        query.iter().map(|(k, v)| (escape(k), escape(v))).collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical request over the headers named in `signed`.
pub fn canonical_request(req: &Request<'_>, signed: &[String]) -> String {
    let mut headers = String::new();
    for name in signed {
        let value = req
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.trim());
        headers.push_str(name);
        headers.push(':');
        headers.push_str(value);
        headers.push('\n');
    }
    let payload = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(CONTENT_SHA256_HEADER))
        .map_or_else(|| sha256_hex(req.body), |(_, v)| v.clone());
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        canonical_uri(req.path),
        canonical_query(req.query),
        headers,
        signed.join(";"),
        payload
    )
}

/// The hex signature of `req` with secret key `sk`, over the headers named in `signed`.
pub fn signature(req: &Request<'_>, signed: &[String], date: &str, sk: &[u8]) -> String {
    let string_to_sign = format!(
        "{ALGORITHM}\n{date}\n{}",
        sha256_hex(canonical_request(req, signed).as_bytes())
    );
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(sk) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(string_to_sign.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// The `Authorization` header value for `req`, which must already carry `X-Sdk-Date`.
pub fn authorization(req: &Request<'_>, ak: &str, sk: &[u8]) -> String {
    let signed = signed_header_names(req.headers);
    let date = req
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(DATE_HEADER))
        .map_or("", |(_, v)| v.as_str());
    let sig = signature(req, &signed, date, sk);
    format!(
        "{ALGORITHM} Access={ak}, SignedHeaders={}, Signature={sig}",
        signed.join(";")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sig(
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: &str,
        ak: &str,
        sk: &str,
    ) -> String {
        let query = h(query);
        let headers = h(headers);
        let req = Request {
            method,
            path,
            query: &query,
            headers: &headers,
            body: body.as_bytes(),
        };
        authorization(&req, ak, sk.as_bytes())
    }

    #[test]
    fn sdk_vector_get_date_only() {
        let headers = h(&[("X-Sdk-Date", "20060102T150405Z")]);
        let query = h(&[("limit", "1")]);
        let req = Request {
            method: "GET",
            path: "/path",
            query: &query,
            headers: &headers,
            body: b"",
        };
        let signed = signed_header_names(&headers);
        assert_eq!(
            canonical_request(&req, &signed),
            "GET\n/path/\nlimit=1\nx-sdk-date:20060102T150405Z\n\nx-sdk-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let a = sig(
            "GET",
            "/path",
            &[("limit", "1")],
            &[("X-Sdk-Date", "20060102T150405Z")],
            "",
            "AccessKey",
            "SecretKey",
        );
        assert_eq!(a, "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=x-sdk-date, Signature=5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624");
    }

    #[test]
    fn sdk_vector_post_with_body() {
        let a = sig(
            "POST",
            "/path",
            &[("key", "value")],
            &[("X-Sdk-Date", "20060102T150405Z")],
            "{\"Name\":\"test\",\"Id\":1}\n",
            "AccessKey",
            "SecretKey",
        );
        assert!(
            a.ends_with(
                "Signature=cecc2af119b18ab70b4d094c0750f3b42c02f254903179a0fc2cc72fc9db4f59"
            ),
            "{a}"
        );
    }

    #[test]
    fn sdk_vector_host_signed() {
        let headers = [
            ("Host", "service.endpoint.myhuaweicloud.com"),
            ("X-Sdk-Date", "20200608T023900Z"),
        ];
        let a = sig(
            "GET",
            "/resources",
            &[("size", "1")],
            &headers,
            "",
            "AccessKey",
            "SecretKey",
        );
        assert_eq!(a, "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature=cfb4171acec81de07d50e53d57eb77edd537414d66ddb1d7d780f128e12cd842");
        let a = sig(
            "POST",
            "/resources",
            &[("size", "1")],
            &headers,
            "{\"name\":\"test\",\"id\":1}",
            "AccessKey",
            "SecretKey",
        );
        assert!(
            a.ends_with(
                "Signature=436b1ac0a1ae03705934bb70ef2f2e09f7bfed2117d731a38235053199323a1f"
            ),
            "{a}"
        );
    }

    #[test]
    fn signing_guide_vector() {
        let a = sig(
            "GET",
            "/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs",
            &[
                ("limit", "2"),
                ("marker", "13551d6b-755d-4757-b956-536f674975c0"),
            ],
            &[
                ("content-type", "application/json"),
                ("host", "service.region.example.com"),
                ("x-sdk-date", "20191115T033655Z"),
            ],
            "",
            "QTWAOYTTINDUT2QVKYUC",
            "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc",
        );
        assert_eq!(a, "SDK-HMAC-SHA256 Access=QTWAOYTTINDUT2QVKYUC, SignedHeaders=content-type;host;x-sdk-date, Signature=7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe");
    }

    #[test]
    fn underscored_headers_are_not_signed_and_escaping_is_rfc3986() {
        assert_eq!(
            signed_header_names(&h(&[("X_Odd", "1"), ("B", "2"), ("a", "3")])),
            vec!["a", "b"]
        );
        assert_eq!(escape("a b/c~d*"), "a%20b%2Fc~d%2A");
        assert_eq!(canonical_uri("/v3/sources"), "/v3/sources/");
        assert_eq!(canonical_uri("/v3/a b/"), "/v3/a%20b/");
        assert_eq!(
            canonical_query(&h(&[("b", "2"), ("a", "x y"), ("a", "1")])),
            "a=1&a=x%20y&b=2"
        );
    }
}
