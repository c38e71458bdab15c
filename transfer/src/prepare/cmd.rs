//! Runs the system tools that partition, format and configure, with their output kept for
//! the error message.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

/// Runs `prog args…` (`LANG=C`); on failure the text names the command line and the tail
/// of what it wrote.
pub(super) fn run<S: AsRef<OsStr>>(
    prog: &str,
    args: &[S],
    stdin: Option<&[u8]>,
) -> Result<String, String> {
    let line = std::iter::once(prog.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(command = %line, "running");
    let mut c = Command::new(prog);
    c.args(args)
        .env("LANG", "C")
        .env("LC_ALL", "C")
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .map_err(|e| format!("`{line}` cannot start: {e}"))?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        w.write_all(input)
            .map_err(|e| format!("`{line}`: cannot write its input: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`{line}`: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let mut tail: Vec<&str> = err
        .lines()
        .chain(stdout.lines())
        .filter(|l| !l.trim().is_empty())
        .collect();
    if tail.len() > 6 {
        tail.drain(..tail.len() - 6);
    }
    Err(format!(
        "`{line}` failed ({}): {}",
        out.status,
        tail.join(" | ")
    ))
}
