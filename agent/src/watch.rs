//! `migrate --mode file --watch`: this process holds the source's change journal from before
//! its first pass, and runs a sync pass at each SIGUSR1 that visits only what changed since
//! the last completed pass.
//!
//! The journal lives in this process only (a fanotify group ends with its descriptor): a
//! separate `migrate --sync` run has no record of what changed before it started and walks
//! everything, as it must.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use transfer::file::journal::{Journal, Scope};
use transfer::file::SendOptions;

use crate::interrupt::Signals;

/// Runs the first pass as `opts` says, then a journal-driven sync pass per SIGUSR1 until
/// SIGINT or SIGTERM arrives between passes. `pass` runs one pass and reports it.
pub fn run(
    root: &Path,
    mut opts: SendOptions,
    signals: &Signals,
    mut pass: impl FnMut(&SendOptions) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let wake = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&wake))
        .context("cannot install the SIGUSR1 handler")?;
    // Started before the first pass walks, so that every change from then on is recorded.
    let journal = match Journal::start(&[root.to_path_buf()]) {
        Ok(j) => Some(j),
        Err(e) => {
            tracing::warn!(error = %e, "no change journal: every sync walks everything");
            eprintln!("sms-agent migrate: {e}; every sync pass walks everything");
            None
        }
    };
    let no_journal = "no change journal could be started";
    if let Some(j) = &journal {
        // The first pass walks everything whatever the journal says.
        let _ = j.take();
    }
    pass(&opts)?;
    if let Some(j) = &journal {
        j.completed();
    }
    eprintln!(
        "watching {}: `kill -USR1 {}` runs a sync pass, SIGINT or SIGTERM ends the run",
        root.display(),
        std::process::id()
    );
    opts.sync = true;
    loop {
        if signals.caught().is_some() {
            return Ok(());
        }
        if !wake.swap(false, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let t0 = std::time::Instant::now();
        let scope = journal
            .as_ref()
            .map_or_else(|| Scope::Full(no_journal.into()), Journal::take);
        let ms = t0.elapsed().as_millis();
        match scope {
            Scope::Full(why) => {
                tracing::info!(reason = %why, "journal sync: walking everything");
                eprintln!("sync: walking everything: {why}");
                opts.changes = None;
            }
            Scope::Changes(c) => {
                tracing::info!(changed = c.len(), ms, "journal sync: visiting what changed");
                eprintln!(
                    "sync: the journal names {} changed entries (read in {ms} ms)",
                    c.len()
                );
                opts.changes = Some(Arc::new(c));
            }
        }
        pass(&opts)?;
        if let Some(j) = &journal {
            j.completed();
        }
    }
}
