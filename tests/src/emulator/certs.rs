//! Per-task TLS material as `GET /v3/tasks/{id}/certkey` serves it: a CA, and source and target
//! certificates signed by it, with RSA keys in PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`) like the
//! reference's examples.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, PKCS_RSA_SHA256,
};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{json, Value};

/// An RSA key as (PEM for the answer, rcgen key pair for signing). The PEM is PKCS#1, or
/// encrypted PKCS#8 (`BEGIN ENCRYPTED PRIVATE KEY`) when a passphrase is given.
fn rsa_key(passphrase: Option<&str>) -> Result<(String, KeyPair), String> {
    let mut rng = rand::thread_rng();
    let key = rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|e| e.to_string())?;
    let pkcs1 = match passphrase {
        Some(p) => {
            // PBES2 with PBKDF2-SHA256 and AES-256-CBC, as `openssl pkcs8 -topk8 -v2 aes256`
            // writes; the crate's default (scrypt) is too slow for a test server.
            use rand::RngCore;
            let (mut salt, mut iv) = ([0u8; 16], [0u8; 16]);
            rng.fill_bytes(&mut salt);
            rng.fill_bytes(&mut iv);
            let params =
                pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(10_000, &salt, &iv)
                    .map_err(|e| e.to_string())?;
            let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
            let enc = pkcs8::PrivateKeyInfo::try_from(der.as_bytes())
                .and_then(|info| info.encrypt_with_params(params, p.as_bytes()))
                .map_err(|e| e.to_string())?;
            enc.to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
                .map_err(|e| e.to_string())?
                .to_string()
        }
        None => key
            .to_pkcs1_pem(LineEnding::LF)
            .map_err(|e| e.to_string())?
            .to_string(),
    };
    let pkcs8 = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?
        .to_string();
    let pair = KeyPair::from_pkcs8_pem_and_sign_algo(&pkcs8, &PKCS_RSA_SHA256)
        .map_err(|e| e.to_string())?;
    Ok((pkcs1, pair))
}

/// The `certkey` answer for a task whose target listens on `target_ip`; the private keys are
/// encrypted with `passphrase` when one is given.
pub fn certkey(task_id: &str, target_ip: &str, passphrase: Option<&str>) -> Result<Value, String> {
    let (_, ca_key) = rsa_key(None)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca.distinguished_name
        .push(DnType::CommonName, format!("SMS task {task_id} CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| e.to_string())?;
    let leaf = |cn: &str, sans: Vec<String>| -> Result<(String, String), String> {
        let (pem, key) = rsa_key(passphrase)?;
        let mut p = CertificateParams::new(sans).map_err(|e| e.to_string())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        let cert = p
            .signed_by(&key, &ca_cert, &ca_key)
            .map_err(|e| e.to_string())?;
        Ok((cert.pem(), pem))
    };
    let (cert, private_key) = leaf("sms-source", vec!["sms-source".into()])?;
    let (target_data_cert, target_data_private_key) = leaf(
        "sms-target",
        vec![target_ip.to_string(), "sms-target".into()],
    )?;
    let (target_mgmt_cert, target_mgmt_private_key) =
        leaf("sms-target-mgmt", vec![target_ip.to_string()])?;
    Ok(json!({
        "cert": cert, "private_key": private_key, "ca": ca_cert.pem(),
        "target_mgmt_cert": target_mgmt_cert, "target_mgmt_private_key": target_mgmt_private_key,
        "target_data_cert": target_data_cert, "target_data_private_key": target_data_private_key,
    }))
}
