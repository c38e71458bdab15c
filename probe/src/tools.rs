//! Running the read-only report commands of system tools (`lvm`, `btrfs`) with bounded output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Directories searched for system tools, in order: the sbin directories come first because a
/// daemon under systemd may run with a PATH that lacks them.
const TOOL_DIRS: &[&str] = &[
    "/usr/sbin",
    "/sbin",
    "/usr/bin",
    "/bin",
    "/usr/local/sbin",
    "/usr/local/bin",
];

/// Largest report we accept from a tool; a host with thousands of subvolumes produces well under
/// this, and a runaway tool must not make the probe allocate without bound.
const MAX_OUTPUT: u64 = 64 << 20;

/// Why a tool's report could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool is not installed.
    #[error("`{0}` is not installed (looked in {dirs})", dirs = TOOL_DIRS.join(", "))]
    Missing(String),
    /// The tool could not be started.
    #[error("cannot run `{0}`: {1}")]
    Spawn(String, std::io::Error),
    /// The tool failed.
    #[error("`{cmd}` exited with {status}: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Last line of its stderr.
        stderr: String,
    },
    /// The output was too large.
    #[error("`{0}` printed more than {MAX_OUTPUT} bytes")]
    TooLarge(String),
}

/// Finds an executable by name in the standard system directories.
pub fn find(name: &str) -> Option<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Runs `name args…` with a clean locale and returns its stdout as text.
pub fn run(name: &str, args: &[&str]) -> Result<String, ToolError> {
    let path = find(name).ok_or_else(|| ToolError::Missing(name.to_string()))?;
    let cmdline = format!("{name} {}", args.join(" "));
    let mut child = Command::new(&path)
        .args(args)
        .env("LC_ALL", "C")
        // lvm complains on stderr about every inherited descriptor; nothing is wrong with that.
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ToolError::Spawn(cmdline.clone(), e))?;
    // stderr is drained on its own thread so a chatty tool cannot block on a full pipe while we
    // read stdout.
    let stderr_reader = child.stderr.take().map(|s| {
        std::thread::spawn(move || {
            let mut err = Vec::new();
            let _ = s.take(MAX_OUTPUT).read_to_end(&mut err);
            err
        })
    });
    let mut out = Vec::new();
    let read_out = child
        .stdout
        .take()
        .map(|s| s.take(MAX_OUTPUT + 1).read_to_end(&mut out));
    if out.len() as u64 > MAX_OUTPUT {
        // It would block forever on a pipe nobody reads.
        let _ = child.kill();
    }
    let status = child
        .wait()
        .map_err(|e| ToolError::Spawn(cmdline.clone(), e))?;
    let err = stderr_reader
        .and_then(|h| h.join().ok())
        .unwrap_or_default();
    if let Some(Err(e)) = read_out {
        return Err(ToolError::Spawn(cmdline, e));
    }
    if out.len() as u64 > MAX_OUTPUT {
        return Err(ToolError::TooLarge(cmdline));
    }
    if !status.success() {
        let stderr = String::from_utf8_lossy(&err);
        let last = stderr
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string();
        return Err(ToolError::Failed {
            cmd: cmdline,
            status,
            stderr: last,
        });
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_failing_tools_are_errors_not_panics() {
        let e = run("no-such-tool-sms-agent", &[]).unwrap_err().to_string();
        assert!(e.contains("not installed"), "{e}");
        let e = run("false", &[]).unwrap_err().to_string();
        assert!(e.contains("exited with"), "{e}");
        assert_eq!(run("true", &[]).unwrap(), "");
    }
}
