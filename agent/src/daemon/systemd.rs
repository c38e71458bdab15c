//! systemd integration: `sd_notify` messages (READY, STATUS, WATCHDOG, STOPPING) and whether we
//! run under systemd at all. Written here rather than pulled in: it is one datagram.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends `msg` to `$NOTIFY_SOCKET`; a no-op outside systemd. Failures are logged, never fatal:
/// the daemon must work the same without a supervisor.
pub fn notify(msg: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let addr = match path.strip_prefix('@') {
        Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| {
        let s = UnixDatagram::unbound()?;
        s.send_to_addr(msg.as_bytes(), &a)
    });
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd the daemon is up.
pub fn ready() {
    notify("READY=1");
}

/// Sets the one-line status `systemctl status` shows.
pub fn status(s: &str) {
    notify(&format!("STATUS={}", s.replace('\n', " ")));
}

/// The watchdog ping interval (half of `WATCHDOG_USEC`), when the unit asks for one and the
/// request is for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Whether stderr goes to the journal (systemd sets `JOURNAL_STREAM` for units).
pub fn under_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_socket() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("notify");
        let sock = UnixDatagram::bind(&p).unwrap();
        // Tests run in threads of one process; only this test touches NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &p);
        status("registering\nnow");
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=registering now");
        std::env::remove_var("NOTIFY_SOCKET");
    }
}
