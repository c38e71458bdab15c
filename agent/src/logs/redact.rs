//! Secrets kept out of what the agent writes: every log line (and every file that goes into a
//! log bundle) passes through [`scrub`], which replaces the configured secret values and PEM
//! private-key blocks with `***`. `Secret`'s `Debug`/`Display` already print `***`; this is
//! the second line of defence, for a secret that reaches a message by another way (an error
//! echoing a request, a URL with a token).

use std::borrow::Cow;
use std::sync::RwLock;

use crate::config::{Config, Credentials};

/// What replaces a secret.
pub const MASK: &str = "***";

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds a value that must never be written (empty values are ignored).
pub fn register(secret: &str) {
    if secret.is_empty() {
        return;
    }
    let mut s = SECRETS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !s.iter().any(|x| x == secret) {
        s.push(secret.to_string());
        // Longest first, so that a secret containing another is masked whole.
        s.sort_by_key(|x| std::cmp::Reverse(x.len()));
    }
}

/// Registers every secret of `cfg`: SK, security token, IAM password, and the access key id
/// (not a secret on its own, but nothing the agent writes needs it).
pub fn register_config(cfg: &Config) {
    for s in [
        &cfg.auth.secret_key,
        &cfg.auth.security_token,
        &cfg.auth.password,
    ]
    .into_iter()
    .flatten()
    {
        register(s.expose());
    }
    register(&cfg.auth.access_key);
    if let Some(a) = &cfg.access {
        match &a.credentials {
            Credentials::Aksk {
                secret_key,
                security_token,
                ..
            } => {
                register(secret_key.expose());
                if let Some(t) = security_token {
                    register(t.expose());
                }
            }
            Credentials::Token { password, .. } => register(password.expose()),
        }
    }
}

/// `text` with every registered secret and every PEM private key replaced by [`MASK`].
pub fn scrub(text: &str) -> Cow<'_, str> {
    let secrets = SECRETS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = Cow::Borrowed(text);
    for s in secrets.iter() {
        if out.contains(s.as_str()) {
            out = Cow::Owned(out.replace(s.as_str(), MASK));
        }
    }
    if out.contains("PRIVATE KEY-----") {
        out = Cow::Owned(mask_pem_keys(&out));
    }
    out
}

/// `bytes` scrubbed as [`scrub`] does text; bytes that are not UTF-8 (a binary file in a log
/// bundle) are searched for the secrets as byte strings.
pub fn scrub_bytes(bytes: &[u8]) -> Cow<'_, [u8]> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return match scrub(text) {
            Cow::Borrowed(_) => Cow::Borrowed(bytes),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        };
    }
    let secrets = SECRETS
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = Cow::Borrowed(bytes);
    for s in secrets.iter() {
        let finder = memchr::memmem::Finder::new(s.as_bytes());
        if finder.find(&out).is_none() {
            continue;
        }
        let mut v = Vec::with_capacity(out.len());
        let mut rest: &[u8] = &out;
        while let Some(i) = finder.find(rest) {
            v.extend_from_slice(&rest[..i]);
            v.extend_from_slice(MASK.as_bytes());
            rest = &rest[i + s.len()..];
        }
        v.extend_from_slice(rest);
        out = Cow::Owned(v);
    }
    if memchr::memmem::find(&out, b"PRIVATE KEY-----").is_some() {
        out = Cow::Owned(mask_pem_keys(&String::from_utf8_lossy(&out)).into_bytes());
    }
    out
}

/// Replaces each `-----BEGIN … PRIVATE KEY-----` … `-----END … PRIVATE KEY-----` block (or
/// the rest of the text after an unterminated BEGIN) with [`MASK`].
fn mask_pem_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(b) = rest.find("-----BEGIN ") {
        let after = &rest[b..];
        let Some(head_end) = after[11..].find("-----").map(|i| i + 16) else {
            break;
        };
        if !after[..head_end].contains("PRIVATE KEY") {
            out.push_str(&rest[..b + head_end]);
            rest = &rest[b + head_end..];
            continue;
        }
        out.push_str(&rest[..b]);
        out.push_str(MASK);
        match after
            .find("-----END ")
            .and_then(|e| after[e + 9..].find("-----").map(|i| e + 9 + i + 5))
        {
            Some(end) => rest = &after[end..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_registered_values_and_private_keys() {
        register("sk-value-for-the-redact-test-0123456789");
        register("");
        let line = "signing with sk-value-for-the-redact-test-0123456789 failed";
        assert_eq!(scrub(line), "signing with *** failed");
        assert!(matches!(scrub("nothing secret here"), Cow::Borrowed(_)));
        let pem = "key:\n-----BEGIN PRIVATE KEY-----\nMIIEabc\n-----END PRIVATE KEY-----\ncert:\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let s = scrub(pem);
        assert!(!s.contains("MIIEabc"), "{s}");
        assert!(s.contains("BEGIN CERTIFICATE-----\nMIIB"), "{s}");
        let ec = "x -----BEGIN EC PRIVATE KEY-----\nAAAA";
        assert_eq!(scrub(ec), "x ***");
        let mut bin = vec![0xff, 0xfe];
        bin.extend_from_slice(b"k=sk-value-for-the-redact-test-0123456789;");
        assert_eq!(&*scrub_bytes(&bin), b"\xff\xfek=***;");
    }
}
