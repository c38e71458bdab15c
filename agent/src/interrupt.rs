//! SIGINT and SIGTERM for the foreground commands (`migrate`, `receive`): the first one asks
//! the command to stop at a checkpoint, a second one kills it as the default action would.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

/// The signals caught so far.
#[derive(Debug, Clone)]
pub struct Signals {
    which: Arc<AtomicUsize>,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        let which = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            // Registered first, so it runs before `seen` is set by this very signal: only a
            // second signal finds it set and dies of it, for an operator who will not wait.
            signal_hook::flag::register_conditional_default(sig, Arc::clone(&seen))?;
            signal_hook::flag::register_usize(sig, Arc::clone(&which), sig_usize(sig))?;
            signal_hook::flag::register(sig, Arc::clone(&seen))?;
        }
        Ok(Self { which })
    }

    /// The signal caught, if any.
    pub fn caught(&self) -> Option<i32> {
        match self.which.load(Ordering::SeqCst) {
            0 => None,
            s => i32::try_from(s).ok(),
        }
    }
}

fn sig_usize(sig: i32) -> usize {
    usize::try_from(sig).unwrap_or(0)
}

/// The command stopped because of a signal, at a checkpoint: `main` exits 128 + the signal.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}", signal_name(*.signal))]
pub struct Interrupted {
    /// The signal number.
    pub signal: i32,
}

impl Interrupted {
    /// The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    pub fn exit_code(&self) -> u8 {
        u8::try_from(128 + self.signal).unwrap_or(1)
    }
}

/// `SIGINT`, `SIGTERM`, or the number.
pub fn signal_name(sig: i32) -> String {
    match sig {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

/// The command line this process was started with, quoted for a POSIX shell, so that
/// pasting it runs the same command again.
pub fn command_line() -> String {
    std::env::args_os()
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn quotes_what_a_shell_would_split_or_expand() {
        assert_eq!(shell_quote("--disk"), "--disk");
        assert_eq!(shell_quote("/dev/sda=disk0"), "/dev/sda=disk0");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
