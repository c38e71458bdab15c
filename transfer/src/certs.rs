//! Certificates for standalone mode (`sms-agent certs`): a CA and a source and a target
//! certificate it issued, the same roles the service's `certkey` plays in a task.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// How long the certificates are valid: a migration takes days to weeks, not years.
const VALID_DAYS: i64 = 365;

/// File names written into the output directory.
pub const FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "source.pem",
    "source-key.pem",
    "target.pem",
    "target-key.pem",
];

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// Generation failed.
    #[error("cannot generate certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file exists already; nothing is overwritten.
    #[error("{0} exists; remove it or choose another --out directory (nothing was overwritten)")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("{path}: {err}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
}

fn params(cn: &str, sans: Vec<String>) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(VALID_DAYS);
    Ok(p)
}

/// Writes a CA and source/target certificates with keys into `out`; `target_names` go into
/// the target certificate's subject alternative names (host names or IP addresses).
pub fn generate(out: &Path, target_names: &[String]) -> Result<Vec<PathBuf>, CertsError> {
    let paths: Vec<PathBuf> = FILES.iter().map(|f| out.join(f)).collect();
    if let Some(p) = paths.iter().find(|p| p.exists()) {
        return Err(CertsError::Exists(p.clone()));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = params("sms-agent standalone CA", Vec::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;

    let leaf = |cn: &str,
                sans: Vec<String>,
                usage: ExtendedKeyUsagePurpose|
     -> Result<(String, String), rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut p = params(cn, sans)?;
        p.extended_key_usages = vec![usage];
        Ok((
            p.signed_by(&key, &ca_cert, &ca_key)?.pem(),
            key.serialize_pem(),
        ))
    };
    let mut names = target_names.to_vec();
    if names.is_empty() {
        names.push("sms-target".to_string());
    }
    let (src_cert, src_key) = leaf(
        "sms-source",
        vec!["sms-source".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let (tgt_cert, tgt_key) = leaf("sms-target", names, ExtendedKeyUsagePurpose::ServerAuth)?;
    let contents = [
        ca_cert.pem(),
        ca_key.serialize_pem(),
        src_cert,
        src_key,
        tgt_cert,
        tgt_key,
    ];
    std::fs::create_dir_all(out).map_err(|err| CertsError::Io {
        path: out.to_path_buf(),
        err,
    })?;
    for (path, text) in paths.iter().zip(contents.iter()) {
        // Keys are secrets: 0600 from the moment they exist.
        let mode = if path.to_string_lossy().ends_with("-key.pem") {
            0o600
        } else {
            0o644
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|err| CertsError::Io {
                path: path.clone(),
                err,
            })?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|err| CertsError::Io {
                path: path.clone(),
                err,
            })?;
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{client_config, server_config, Identity};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_material_sets_up_mutual_tls_and_is_never_overwritten() {
        let t = tempfile::tempdir().unwrap();
        let paths = generate(t.path(), &["10.0.0.5".into(), "target.example".into()]).unwrap();
        let read = |n: &str| std::fs::read_to_string(t.path().join(n)).unwrap();
        let ca = read("ca.pem");
        client_config(
            Identity::from_pem(&read("source.pem"), &read("source-key.pem"), None).unwrap(),
            &ca,
        )
        .unwrap();
        server_config(
            Identity::from_pem(&read("target.pem"), &read("target-key.pem"), None).unwrap(),
            &ca,
        )
        .unwrap();
        for p in &paths {
            let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let want = if p.to_string_lossy().ends_with("-key.pem") {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode, want, "{}", p.display());
        }
        let before = read("ca-key.pem");
        let e = generate(t.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("exists"), "{e}");
        assert_eq!(read("ca-key.pem"), before);
    }
}
