//! Mutual TLS between source and target from the PEMs that `GET …/certkey` returns: the source
//! presents `cert`/`private_key`, the target `target_data_cert`/`target_data_private_key`, and
//! each side accepts only a peer certificate issued by the task's `ca`.
//!
//! Keys come as PKCS#1 (`BEGIN RSA PRIVATE KEY`, as in the reference), PKCS#8, SEC1, or encrypted
//! PKCS#8 unlocked with the task's passphrase.
//!
//! The client checks the target's certificate chain against the task CA but not its host name:
//! the CA is private to one task, so any certificate it issued identifies that task's target,
//! and the service does not promise that the target certificate names `migration_ip`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Why TLS could not be set up; SMS reports these as SMS.3301 (certificate not loaded).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM block could not be parsed.
    #[error("{what}: not valid PEM: {detail}")]
    Pem {
        /// Which input (`cert`, `private_key`, `ca`).
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// No certificate or key where one was expected.
    #[error("{0}: no certificate or key found in the PEM")]
    Missing(&'static str),
    /// An encrypted key without a passphrase.
    #[error("the private key is encrypted and no passphrase was given (GET …/passphrase)")]
    NeedPassphrase,
    /// An encrypted key the passphrase does not open.
    #[error("the private key could not be decrypted with the passphrase: {0}")]
    Decrypt(String),
    /// Legacy OpenSSL encryption (`Proc-Type: 4,ENCRYPTED`), which is not supported.
    #[error("the private key uses legacy OpenSSL PEM encryption (Proc-Type: 4,ENCRYPTED); convert it to encrypted PKCS#8")]
    LegacyEncryption,
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA.
    #[error("CA: {0}")]
    Verifier(String),
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses the certificates of a PEM string.
pub fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Missing(what));
    }
    Ok(certs)
}

/// Parses a private key: PKCS#1, PKCS#8, SEC1, or encrypted PKCS#8 with `passphrase`.
pub fn private_key(
    pem: &str,
    passphrase: Option<&str>,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    if pem.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(TlsError::LegacyEncryption);
    }
    if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        let pass = passphrase
            .filter(|p| !p.is_empty())
            .ok_or(TlsError::NeedPassphrase)?;
        let (_, doc) = pkcs8::SecretDocument::from_pem(pem.trim()).map_err(|e| TlsError::Pem {
            what: "private_key",
            detail: e.to_string(),
        })?;
        let enc = pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes())
            .map_err(|e| TlsError::Decrypt(e.to_string()))?;
        let plain = enc
            .decrypt(pass.as_bytes())
            .map_err(|e| TlsError::Decrypt(e.to_string()))?;
        return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            plain.as_bytes().to_vec(),
        )));
    }
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Pem {
            what: "private_key",
            detail: e.to_string(),
        })?
        .ok_or(TlsError::Missing("private_key"))
}

impl Identity {
    /// The identity from a certificate (chain) PEM and its key PEM.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        passphrase: Option<&str>,
    ) -> Result<Self, TlsError> {
        Ok(Self {
            certs: certs("cert", cert_pem)?,
            key: private_key(key_pem, passphrase)?,
        })
    }
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs("ca", ca_pem)? {
        store.add(c)?;
    }
    Ok(store)
}

/// The target side: presents `id`, requires a client certificate issued by `ca_pem`.
pub fn server_config(id: Identity, ca_pem: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs, id.key)?;
    Ok(Arc::new(cfg))
}

/// The source side: presents `id`, accepts only a server certificate issued by `ca_pem`.
pub fn client_config(id: Identity, ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TaskCaVerifier { inner }))
        .with_client_auth_cert(id.certs, id.key)?;
    Ok(Arc::new(cfg))
}

/// Verifies the chain, validity and signatures against the task CA; only a name mismatch is
/// forgiven (see the module comment).
#[derive(Debug)]
struct TaskCaVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for TaskCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    struct Ca {
        cert: rcgen::Certificate,
        key: KeyPair,
    }

    fn new_ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// (cert PEM, key PEM) issued by `ca`; `expired` moves its validity into the past.
    fn leaf(ca: &Ca, name: &str, expired: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        if expired {
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
            p.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        }
        (
            p.signed_by(&key, &ca.cert, &ca.key).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    /// Runs one handshake plus a ping over loopback; Ok(()) when both sides agree.
    fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Result<(), String> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || -> Result<(), String> {
            let (tcp, _) = l.accept().map_err(|e| e.to_string())?;
            let conn = rustls::ServerConnection::new(server).map_err(|e| e.to_string())?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            s.write_all(b"pong").map_err(|e| e.to_string())?;
            s.flush().map_err(|e| e.to_string())
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(client, name).map_err(|e| e.to_string())?;
        let mut c = rustls::StreamOwned::new(conn, tcp);
        let r = c
            .write_all(b"ping")
            .and_then(|()| c.flush())
            .and_then(|()| {
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf).map(|()| buf)
            });
        drop(c);
        let s = srv.join().unwrap();
        match (r, s) {
            (Ok(b), Ok(())) if &b == b"pong" => Ok(()),
            (r, s) => Err(format!("client {r:?}, server {s:?}")),
        }
    }

    #[test]
    fn mutual_tls_with_the_task_ca() {
        let ca = new_ca();
        let (tc, tk) = leaf(&ca, "sms-target", false);
        let (sc, sk) = leaf(&ca, "sms-source", false);
        let server =
            server_config(Identity::from_pem(&tc, &tk, None).unwrap(), &ca.cert.pem()).unwrap();
        let client =
            client_config(Identity::from_pem(&sc, &sk, None).unwrap(), &ca.cert.pem()).unwrap();
        // The target certificate names "sms-target", not 127.0.0.1: accepted all the same.
        handshake(server, client).unwrap();
    }

    #[test]
    fn foreign_expired_or_missing_client_certificates_are_refused() {
        let ca = new_ca();
        let other = new_ca();
        let (tc, tk) = leaf(&ca, "sms-target", false);
        let server =
            || server_config(Identity::from_pem(&tc, &tk, None).unwrap(), &ca.cert.pem()).unwrap();
        // A client certificate from another CA.
        let (oc, ok) = leaf(&other, "intruder", false);
        let client =
            client_config(Identity::from_pem(&oc, &ok, None).unwrap(), &ca.cert.pem()).unwrap();
        assert!(handshake(server(), client).is_err());
        // An expired one from the right CA.
        let (ec, ek) = leaf(&ca, "old-source", true);
        let client =
            client_config(Identity::from_pem(&ec, &ek, None).unwrap(), &ca.cert.pem()).unwrap();
        assert!(handshake(server(), client).is_err());
        // None at all.
        let bare = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&ca.cert.pem()).unwrap())
            .with_no_client_auth();
        assert!(handshake(server(), Arc::new(bare)).is_err());
        // And the source refuses a target from another CA.
        let (sc, sk) = leaf(&ca, "sms-source", false);
        let impostor = server_config(
            Identity::from_pem(&oc, &ok, None).unwrap(),
            &other.cert.pem(),
        )
        .unwrap();
        let client =
            client_config(Identity::from_pem(&sc, &sk, None).unwrap(), &ca.cert.pem()).unwrap();
        assert!(handshake(impostor, client).is_err());
    }

    #[test]
    fn pkcs1_and_encrypted_pkcs8_keys_load() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let mut rng = rand::thread_rng();
        let key = rsa::RsaPrivateKey::new(&mut rng, 1024).unwrap();
        let pkcs1 = key.to_pkcs1_pem(LineEnding::LF).unwrap();
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        assert!(matches!(
            private_key(&pkcs1, None).unwrap(),
            PrivateKeyDer::Pkcs1(_)
        ));
        let der = key.to_pkcs8_der().unwrap();
        let params =
            pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(1000, &[7; 16], &[9; 16])
                .unwrap();
        let enc = pkcs8::PrivateKeyInfo::try_from(der.as_bytes())
            .unwrap()
            .encrypt_with_params(params, b"open sesame")
            .unwrap()
            .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
            .unwrap();
        assert!(matches!(
            private_key(&enc, None),
            Err(TlsError::NeedPassphrase)
        ));
        assert!(matches!(
            private_key(&enc, Some("wrong")),
            Err(TlsError::Decrypt(_))
        ));
        assert!(matches!(
            private_key(&enc, Some("open sesame")).unwrap(),
            PrivateKeyDer::Pkcs8(_)
        ));
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(matches!(
            private_key(legacy, Some("x")),
            Err(TlsError::LegacyEncryption)
        ));
        assert!(matches!(
            private_key("garbage", None),
            Err(TlsError::Missing(_))
        ));
        assert!(matches!(
            certs("ca", "garbage"),
            Err(TlsError::Missing("ca"))
        ));
    }
}
