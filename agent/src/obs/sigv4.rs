//! AWS signature V4 for OBS's S3-compatible API (OBS accepts it in place of its own
//! signature). Written here rather than taken from a crate: the official `aws-sigv4` pulls in
//! the AWS SDK's runtime crates and `rusty-s3` signs only presigned URLs and has no ACL call,
//! while the algorithm is a few hashes over `hmac`/`sha2`, which the agent already links for
//! SMS's own signature. The tests below hold it to AWS's published test vectors.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::api::sign::{escape, sha256_hex};

/// What the payload hash says when the body is not hashed (OBS and S3 accept it over TLS,
/// and it lets a multipart part be streamed from the file without reading it twice).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// The credential scope and key of a signature.
#[derive(Clone)]
pub struct Signer<'a> {
    /// Access key id.
    pub access_key: &'a str,
    /// Secret key.
    pub secret_key: &'a str,
    /// Region of the scope.
    pub region: &'a str,
    /// Service of the scope (`s3`).
    pub service: &'a str,
}

/// One request to sign: the URI path as sent (already percent-encoded), the query pairs
/// (decoded) and the headers to sign (names in any case).
pub struct Request<'a> {
    /// `GET`, `PUT`, …
    pub method: &'a str,
    /// The path as sent on the wire, e.g. `/bucket/a%20b.tar.gz`.
    pub path: &'a str,
    /// Query parameters, decoded.
    pub query: &'a [(String, String)],
    /// Headers to sign, including `host` and `x-amz-date`.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body, or [`UNSIGNED_PAYLOAD`].
    pub payload_hash: &'a str,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length: the error exists only for the trait's sake.
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mut m) => {
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The canonical query string: pairs encoded, sorted by name then value.
fn canonical_query(q: &[(String, String)]) -> String {
    let mut v: Vec<(String, String)> = q.iter().map(|(k, v)| (escape(k), escape(v))).collect();
    v.sort();
    v.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical headers block and the signed-header list.
fn canonical_headers(h: &[(String, String)]) -> (String, String) {
    let mut v: Vec<(String, String)> = h
        .iter()
        .map(|(k, v)| {
            let value = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), value)
        })
        .collect();
    v.sort();
    let block: String = v.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let names = v
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    (block, names)
}

/// The canonical request of `r`.
pub fn canonical_request(r: &Request<'_>) -> String {
    let (headers, signed) = canonical_headers(r.headers);
    format!(
        "{}\n{}\n{}\n{headers}\n{signed}\n{}",
        r.method,
        if r.path.is_empty() { "/" } else { r.path },
        canonical_query(r.query),
        r.payload_hash
    )
}

impl Signer<'_> {
    /// The `Authorization` header value for `r` at `amz_date` (`YYYYMMDDTHHMMSSZ`, the
    /// value of its `x-amz-date` header).
    pub fn authorization(&self, r: &Request<'_>, amz_date: &str) -> String {
        let date = amz_date.get(..8).unwrap_or(amz_date);
        let scope = format!("{date}/{}/{}/aws4_request", self.region, self.service);
        let canonical = canonical_request(r);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            sha256_hex(canonical.as_bytes())
        );
        let k = hmac(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        let k = hmac(&k, self.region.as_bytes());
        let k = hmac(&k, self.service.as_bytes());
        let k = hmac(&k, b"aws4_request");
        let sig = hex(&hmac(&k, to_sign.as_bytes()));
        let (_, signed) = canonical_headers(r.headers);
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}",
            self.access_key
        )
    }
}

/// An object key as an S3 path segment sequence: each segment encoded, `/` kept.
pub fn encode_key(key: &str) -> String {
    key.split('/').map(escape).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// AWS's SigV4 test suite (`get-vanilla`, `get-vanilla-query-order-key-case`): scope
    /// 20150830/us-east-1/service, key AKIDEXAMPLE.
    #[test]
    fn aws_test_suite_vectors() {
        let s = Signer {
            access_key: "AKIDEXAMPLE",
            secret_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            service: "service",
        };
        let headers = h(&[
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
        ]);
        let mut r = Request {
            method: "GET",
            path: "/",
            query: &[],
            headers: &headers,
            payload_hash: EMPTY,
        };
        assert_eq!(
            s.authorization(&r, "20150830T123600Z"),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        let q = [
            ("Param2".to_string(), "value2".to_string()),
            ("Param1".to_string(), "value1".to_string()),
        ];
        r.query = &q;
        assert!(s.authorization(&r, "20150830T123600Z").ends_with(
            "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        ));
    }

    /// The S3 examples of AWS's signature V4 documentation ("GET Object" with a range,
    /// "GET Bucket (List Objects)"): bucket examplebucket, 20130524, AKIAIOSFODNN7EXAMPLE.
    #[test]
    fn aws_s3_documentation_examples() {
        let s = Signer {
            access_key: "AKIAIOSFODNN7EXAMPLE",
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            service: "s3",
        };
        let headers = h(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let r = Request {
            method: "GET",
            path: "/test.txt",
            query: &[],
            headers: &headers,
            payload_hash: EMPTY,
        };
        assert_eq!(
            s.authorization(&r, "20130524T000000Z"),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        let headers = h(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-content-sha256", EMPTY),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let q = [
            ("max-keys".to_string(), "2".to_string()),
            ("prefix".to_string(), "J".to_string()),
        ];
        let r = Request {
            method: "GET",
            path: "/",
            query: &q,
            headers: &headers,
            payload_hash: EMPTY,
        };
        assert!(s.authorization(&r, "20130524T000000Z").ends_with(
            "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
        ));
    }

    #[test]
    fn keys_keep_slashes_and_encode_the_rest() {
        assert_eq!(encode_key("logs/a b/ü.tar.gz"), "logs/a%20b/%C3%BC.tar.gz");
    }
}
