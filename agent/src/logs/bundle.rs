//! The log bundle UPLOAD_LOG sends: one `tar.gz` of the agent's log files, its state files,
//! the host inventory (probe output) and the effective configuration, every file scrubbed of
//! secrets on the way in.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::redact;

/// State files larger than this are not bundled (checkpoints of a large task, not
/// diagnostics).
const MAX_STATE_FILE: u64 = 4 << 20;
/// Files of the log directory larger than this are left out (and named in the manifest):
/// each file is read whole to be scrubbed, and the host being migrated keeps its memory.
/// The agent's own files stay far below it (`[logs] max_file_size`).
const MAX_LOG_FILE: u64 = 256 << 20;

/// What goes into a bundle besides the files of the two directories.
#[derive(Debug, Clone)]
pub struct Contents<'a> {
    /// `[agent] log_dir`.
    pub log_dir: &'a Path,
    /// `[agent] state_dir` (its top-level `*.json` files are bundled).
    pub state_dir: &'a Path,
    /// The registration body as `sms-agent probe` prints it.
    pub probe_json: &'a str,
    /// The effective configuration, secrets already shown as `***`.
    pub config_text: &'a str,
    /// `manifest.json`: who made the bundle, for which task, when.
    pub manifest: serde_json::Value,
}

/// A bundle written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the file.
    pub sha256: String,
}

/// A writer that hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the bundle of `c` to `out` (mode 0600, synced).
pub fn build(out: &Path, c: &Contents<'_>) -> io::Result<Bundle> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(out)?;
    let hashing = Hashing {
        inner: file,
        hash: Sha256::new(),
        len: 0,
    };
    let gz = flate2::write::GzEncoder::new(hashing, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    for (path, len) in files(c.log_dir)? {
        if len <= MAX_LOG_FILE {
            chosen.push((path, "logs"));
        } else {
            skipped.push(format!("{} ({len} bytes)", path.display()));
        }
    }
    for (path, len) in files(c.state_dir)? {
        if path.extension().is_some_and(|e| e == "json") && len <= MAX_STATE_FILE {
            chosen.push((path, "state"));
        }
    }
    let mut manifest = c.manifest.clone();
    if let Some(m) = manifest.as_object_mut() {
        m.insert("skipped".into(), serde_json::json!(skipped));
    }
    let manifest = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
    add(&mut tar, "manifest.json", &manifest)?;
    add(&mut tar, "probe.json", c.probe_json.as_bytes())?;
    add(&mut tar, "config.txt", c.config_text.as_bytes())?;
    for (path, prefix) in chosen {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // A file rotated or rewritten meanwhile is skipped, not a failed bundle.
        let Ok(bytes) = fs::read(&path) else { continue };
        add(
            &mut tar,
            &format!("{prefix}/{name}"),
            &redact::scrub_bytes(&bytes),
        )?;
    }
    let gz = tar.into_inner()?;
    let mut hashing = gz.finish()?;
    hashing.flush()?;
    hashing.inner.sync_all()?;
    let sha256 = hashing
        .hash
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Bundle {
        path: out.to_path_buf(),
        size: hashing.len,
        sha256,
    })
}

/// Regular files directly in `dir` (none when it does not exist), sorted by name.
fn files(dir: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut v = Vec::new();
    for e in rd {
        let e = e?;
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_file() {
            v.push((e.path(), meta.len()));
        }
    }
    v.sort();
    Ok(v)
}

fn add<W: Write>(tar: &mut tar::Builder<W>, name: &str, data: &[u8]) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    h.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    h.set_cksum();
    tar.append_data(&mut h, format!("sms-agent-logs/{name}"), data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_scrubbed_files_and_hashes_the_archive() {
        let t = tempfile::tempdir().unwrap();
        let logs = t.path().join("logs");
        let state = t.path().join("state");
        fs::create_dir_all(&logs).unwrap();
        fs::create_dir_all(&state).unwrap();
        redact::register("bundle-test-secret-value-xyz");
        fs::write(
            logs.join("agent.log"),
            "line with bundle-test-secret-value-xyz\n",
        )
        .unwrap();
        fs::write(state.join("state.json"), "{}").unwrap();
        fs::write(state.join("lock"), "").unwrap();
        let out = t.path().join("b.tar.gz");
        let b = build(
            &out,
            &Contents {
                log_dir: &logs,
                state_dir: &state,
                probe_json: "{\"os\":\"linux\"}",
                config_text: "config",
                manifest: serde_json::json!({"task_id": "t"}),
            },
        )
        .unwrap();
        let bytes = fs::read(&out).unwrap();
        assert_eq!(b.size, bytes.len() as u64);
        assert_eq!(b.sha256, crate::api::sign::sha256_hex(&bytes));
        let mut names = Vec::new();
        let mut all = String::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            names.push(e.path().unwrap().display().to_string());
            io::Read::read_to_string(&mut e, &mut all).unwrap();
        }
        assert_eq!(
            names,
            [
                "sms-agent-logs/manifest.json",
                "sms-agent-logs/probe.json",
                "sms-agent-logs/config.txt",
                "sms-agent-logs/logs/agent.log",
                "sms-agent-logs/state/state.json"
            ]
        );
        assert!(all.contains("line with ***"), "{all}");
        assert!(!all.contains("bundle-test-secret-value-xyz"));
    }
}
