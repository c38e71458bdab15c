//! The log file sink: `tracing` layers installed at start-up write into it once [`install`]
//! has opened `log_dir` (the config is read after logging starts), each event scrubbed of
//! secrets and appended whole.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::file::{Limits, Rotating};
use super::redact;
use super::LogFormat;

/// No file yet.
const OFF: u8 = 0;
const TEXT: u8 = 1;
const JSON: u8 = 2;

static ACTIVE: AtomicU8 = AtomicU8::new(OFF);
static FILE: Mutex<Option<Rotating>> = Mutex::new(None);

/// The two file layers (text and JSON); only the one of the installed format writes.
pub fn layers<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let text = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(FileWriter(TEXT));
    let json = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(false)
        .with_writer(FileWriter(JSON));
    text.and_then(json)
}

/// Starts writing log events to `dir/NAME.log` in `format`; returns the file's path.
pub fn install(dir: &Path, name: &str, format: LogFormat, limits: Limits) -> io::Result<PathBuf> {
    let r = Rotating::open(dir, name, limits)?;
    let path = r.path();
    *FILE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
    ACTIVE.store(
        match format {
            LogFormat::Text => TEXT,
            LogFormat::Json => JSON,
        },
        Ordering::SeqCst,
    );
    Ok(path)
}

/// Rotates the current file now (a bundle then holds every line written so far in closed
/// files); nothing when no file is installed.
pub fn rotate_now() -> io::Result<()> {
    match FILE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_mut()
    {
        Some(r) => r.rotate(),
        None => Ok(()),
    }
}

/// Makes the writer of one event for the layer of format `.0`.
#[derive(Debug, Clone, Copy)]
struct FileWriter(u8);

/// One event's bytes, appended to the file when complete.
struct EventBuf {
    on: bool,
    buf: Vec<u8>,
}

impl<'a> MakeWriter<'a> for FileWriter {
    type Writer = EventBuf;

    fn make_writer(&'a self) -> Self::Writer {
        EventBuf {
            on: ACTIVE.load(Ordering::Relaxed) == self.0,
            buf: Vec::new(),
        }
    }
}

impl Write for EventBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.on {
            self.buf.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuf {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        let clean = redact::scrub(&text);
        let mut g = FILE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = g.as_mut() {
            // A line that cannot be written has nowhere else to go; stderr still has it.
            let _ = r.write_line(clean.as_bytes());
        }
    }
}
