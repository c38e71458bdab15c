//! Per-task TLS material as `GET /v3/tasks/{id}/certkey` serves it: a CA, and source and target
//! certificates signed by it, with RSA keys in PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`) like the
//! reference's examples.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, PKCS_RSA_SHA256,
};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{json, Value};

/// An RSA key as (PKCS#1 PEM for the answer, rcgen key pair for signing).
fn rsa_key() -> Result<(String, KeyPair), String> {
    let mut rng = rand::thread_rng();
    let key = rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|e| e.to_string())?;
    let pkcs1 = key
        .to_pkcs1_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?
        .to_string();
    let pkcs8 = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?
        .to_string();
    let pair = KeyPair::from_pkcs8_pem_and_sign_algo(&pkcs8, &PKCS_RSA_SHA256)
        .map_err(|e| e.to_string())?;
    Ok((pkcs1, pair))
}

/// The `certkey` answer for a task whose target listens on `target_ip`.
pub fn certkey(task_id: &str, target_ip: &str) -> Result<Value, String> {
    let (_, ca_key) = rsa_key()?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca.distinguished_name
        .push(DnType::CommonName, format!("SMS task {task_id} CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| e.to_string())?;
    let leaf = |cn: &str, sans: Vec<String>| -> Result<(String, String), String> {
        let (pem, key) = rsa_key()?;
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
