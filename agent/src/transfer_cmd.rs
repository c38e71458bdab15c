//! `sms-agent receive` and `sms-agent migrate`: the standalone target and source of a block-
//! or file-level migration over mutual TLS, without the SMS service.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use transfer::session::{Connector, Listener};
use transfer::task::{Control, Progress};
use transfer::wire::Mode;
use transfer::Code;

/// TLS material shared by both commands.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) both sides' certificates must be issued by.
    #[arg(long, value_name = "PEM")]
    ca: PathBuf,
    /// This side's certificate (PEM).
    #[arg(long, value_name = "PEM")]
    cert: PathBuf,
    /// This side's private key (PEM: PKCS#1, PKCS#8 or encrypted PKCS#8).
    #[arg(long, value_name = "PEM")]
    key: PathBuf,
    /// File holding the key's passphrase, when the key is encrypted.
    #[arg(long, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,
}

impl TlsArgs {
    fn load(&self) -> anyhow::Result<(transfer::tls::Identity, String)> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let pass = match &self.passphrase_file {
            Some(p) => Some(read(p)?.trim_end_matches(['\n', '\r']).to_string()),
            None => None,
        };
        let id = transfer::tls::Identity::from_pem(
            &read(&self.cert)?,
            &read(&self.key)?,
            pass.as_deref(),
        )
        .with_context(|| format!("{}: SSL certificate not loaded", Code::SslCertNotLoaded))?;
        Ok((id, read(&self.ca)?))
    }
}

/// Arguments of `receive`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8900")]
    listen: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Block mode: write target disk NAME to PATH (a device or an image file, created sparse
    /// when missing). Repeatable. Nothing else is ever written.
    #[arg(long = "disk", value_name = "NAME=PATH")]
    disks: Vec<String>,
    /// File mode: write the migrated files under DIR, and nowhere else.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Where checkpoints are kept, so an interrupted pass resumes.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/sms-agent/receive")]
    state_dir: PathBuf,
    /// Exit after the first session that completes its pass.
    #[arg(long)]
    once: bool,
    /// Give up a session whose sender stays silent this long on any stream (a dead, stopped
    /// or cut-off source); what it sent stays resumable and the next session gets in.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    peer_timeout: u64,
}

/// Transfer mode of `migrate`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Whole disks, only allocated blocks.
    Block,
    /// Files of mounted filesystems.
    File,
}

/// Arguments of `migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Block- or file-level.
    #[arg(long, value_enum)]
    mode: ModeArg,
    /// The receiver, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    target: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Block mode: send source device SRC as target disk NAME. Repeatable.
    #[arg(long = "disk", value_name = "SRC=NAME")]
    disks: Vec<String>,
    /// File mode: the directory tree to migrate (to the receiver's --root).
    #[arg(long, value_name = "DIR")]
    source_root: Option<PathBuf>,
    /// Block mode: after the full copy (or when it is already complete), run an incremental
    /// pass that sends only chunks whose hashes differ and verifies every chunk. File mode: one
    /// pass that sends what is missing or changed and deletes on the target what the source no
    /// longer has.
    #[arg(long)]
    sync: bool,
    /// Block mode, with --sync: freeze the source disks' mounted filesystems (FIFREEZE) for
    /// a final sync pass, so the target is crash-consistent. Writes on them stall while frozen;
    /// they are thawed within 30 s whatever happens (a guard process thaws at the deadline or
    /// when this one dies). The frozen pass reads every used block, so it fits the window only
    /// for disks that read in under 30 s; when it does not, migrate fails and says so.
    #[arg(long, requires = "sync")]
    freeze: bool,
    /// Freeze window in seconds (at most 30).
    #[arg(long, value_name = "SECS", default_value_t = 30.0, hide = true)]
    freeze_secs: f64,
    /// Parallel data streams [default: 4 in block mode, 8 in file mode, where more streams
    /// keep more small-file reads and writes in flight].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: Option<u16>,
    /// Speed limit in Mbit/s (0: none), shared by all streams.
    #[arg(long, value_name = "MBIT", default_value_t = 0)]
    limit_mbit: u64,
    /// Name of this migration, sent as the task id the receiver keeps its checkpoints under
    /// [default: in block mode, an id made when the migration starts and kept in --state-dir
    /// for as long as the source disks stay the same; in file mode "standalone"].
    #[arg(long)]
    task_id: Option<String>,
    /// Block mode: where the source keeps its record of each migration (its id, what each
    /// source disk was, the last pass the target acknowledged), so that a rerun resumes or
    /// verifies instead of copying again, and a replaced or rewritten disk starts afresh.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/sms-agent/migrate")]
    state_dir: PathBuf,
    /// File mode: instead of copying, compare directory DIR (inside --source-root;
    /// repeatable) with the target and print, per directory, files in all, different, missing
    /// on the target and extra there. Exits 1 when anything differs. Needs a running receiver.
    #[arg(long, value_name = "DIR")]
    check: Vec<PathBuf>,
    /// With --check: compare contents (BLAKE3) rather than size and mtime.
    #[arg(long, requires = "check")]
    check_hash: bool,
    /// File mode: paths to leave out (absolute, repeatable), besides /proc, /sys, /dev, /run.
    #[arg(long, value_name = "PATH")]
    exclude: Vec<PathBuf>,
    /// How often the receiver makes data durable and records it (resume granularity).
    #[arg(long, value_name = "SECS", default_value_t = 2.0, hide = true)]
    checkpoint_secs: f64,
    /// Give up when the receiver stays silent or takes no data this long on any stream.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    peer_timeout: u64,
}

fn split_pair(s: &str, what: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => bail!("--disk {s:?}: expected {what}"),
    }
}

/// Runs the receiver until stopped (or, with `--once`, until one pass completes).
pub fn receive(a: &ReceiveArgs) -> anyhow::Result<()> {
    if a.disks.is_empty() && a.root.is_none() {
        bail!("give --disk NAME=PATH (block mode) or --root DIR (file mode)");
    }
    let mut disks = Vec::new();
    for d in &a.disks {
        let (name, path) = split_pair(d, "NAME=PATH")?;
        disks.push(transfer::block::TargetMap {
            name,
            path: PathBuf::from(path),
        });
    }
    let (id, ca) = a.tls.load()?;
    let cfg = transfer::tls::server_config(id, &ca)
        .with_context(|| format!("{}: TLS setup", Code::SslCertNotLoaded))?;
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("cannot create {}", a.state_dir.display()))?;
    if let Some(root) = &a.root {
        anyhow::ensure!(
            root.is_dir(),
            "--root {} is not a directory",
            root.display()
        );
    }
    let listener =
        Listener::bind(&a.listen, cfg).with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "receiver listening");
    eprintln!("sms-agent receive: listening on {addr}");
    let peer_timeout = Duration::from_secs(a.peer_timeout);
    let block_opts = transfer::block::ReceiveOptions {
        disks,
        state_dir: a.state_dir.clone(),
        peer_timeout,
    };
    let file_opts = a.root.clone().map(|root| transfer::file::ReceiveOptions {
        root,
        state_dir: a.state_dir.clone(),
        peer_timeout,
    });
    let once = a.once;
    // One session at a time writes a given set of disks: two would interleave writes.
    let gate = Arc::new(std::sync::Mutex::new(()));
    listener.serve(move |mut inc, _guard| {
        let Some(_one) = wait_turn(&gate, &mut inc, peer_timeout) else {
            return false;
        };
        let task = inc.task_id.clone();
        let complete = match inc.mode {
            Mode::Block if !block_opts.disks.is_empty() => {
                match transfer::block::receive(inc, &block_opts) {
                    Ok(r) => {
                        tracing::info!(task_id = %task, pass = r.pass, complete = r.complete, chunks = r.chunks_done, bytes_written = r.bytes_written, "block session ended");
                        r.complete && !r.more
                    }
                    Err(e) => {
                        tracing::error!(task_id = %task, error = %e, "block session failed");
                        false
                    }
                }
            }
            Mode::File if file_opts.is_some() => {
                let Some(fo) = file_opts.as_ref() else {
                    return false;
                };
                match transfer::file::receive(inc, fo) {
                    Ok(r) => {
                        tracing::info!(task_id = %task, complete = r.complete, files = r.files_written, "file session ended");
                        r.complete && !r.check
                    }
                    Err(e) => {
                        tracing::error!(task_id = %task, error = %e, "file session failed");
                        false
                    }
                }
            }
            mode => {
                tracing::warn!(task_id = %task, ?mode, "refused: this receiver serves the other mode");
                inc.control.send_error(
                    &Code::TransmissionFailed,
                    "this receiver was not started for that mode (--disk for block, --root for file)",
                );
                false
            }
        };
        once && complete
    })?;
    Ok(())
}

/// Waits until no other session holds `gate`. Meanwhile a file-mode sender hears keep-alives,
/// so its peer timeout does not end a session that is only queued (a block-mode sender waits
/// for its plan's answer a few peer timeouts, and says why when it gives up). `None` when the
/// sender gave up meanwhile: the session never touched the target, so nothing is lost.
fn wait_turn<'a>(
    gate: &'a std::sync::Mutex<()>,
    inc: &mut transfer::session::Incoming,
    peer_timeout: Duration,
) -> Option<std::sync::MutexGuard<'a, ()>> {
    let every = transfer::session::keepalive_every(peer_timeout);
    let started = Instant::now();
    let mut last = started;
    let mut told = false;
    loop {
        match gate.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if !told {
            told = true;
            tracing::info!(task_id = %inc.task_id, "session queued behind the running one");
        }
        if inc.control.peer_gone() {
            tracing::warn!(task_id = %inc.task_id, waited_secs = started.elapsed().as_secs(), "the sender gave up while its session waited for its turn");
            return None;
        }
        if inc.mode == Mode::File && last.elapsed() >= every {
            last = Instant::now();
            let sent = transfer::file::proto::FileMsg::KeepAlive
                .write_to(&mut inc.control.writer)
                .and_then(|()| inc.control.flush());
            if let Err(e) = sent {
                tracing::warn!(task_id = %inc.task_id, error = %e, "the waiting sender is gone");
                return None;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints progress on a terminal until `stop` is set.
fn progress_bar(progress: &Progress, stop: &std::sync::atomic::AtomicBool, label: &str) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let mut meter: Option<transfer::meter::Meter> = None;
    let mut last_done = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        let (done, total) = (
            Progress::get(&progress.done),
            Progress::get(&progress.total),
        );
        let now = Instant::now();
        let m = meter.get_or_insert_with(|| transfer::meter::Meter::new(total, done, now));
        m.add(done.saturating_sub(last_done), now);
        last_done = done;
        let eta = m
            .eta(now)
            .map(|s| format!("{}:{:02}", s / 60, s % 60))
            .unwrap_or_else(|| "--:--".into());
        eprint!(
            "\r{label}: {:>3}%  {} / {}  {:.1} MB/s  ETA {eta}  compress {:.2}   ",
            m.percent(),
            probe::human::size(done),
            probe::human::size(total),
            m.rate(now) / 1e6,
            progress.compress_ratio()
        );
    }
    eprintln!();
}

/// Runs one pass with fresh counters, drawing the progress bar meanwhile.
fn with_progress<T>(label: &str, pass: impl FnOnce(&Progress) -> T) -> T {
    let progress = Progress::default();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| progress_bar(&progress, &stop, label));
        let r = pass(&progress);
        stop.store(true, Ordering::Relaxed);
        r
    })
}

/// Runs the standalone source side; Ok only when the copy (and sync) is complete.
pub fn migrate(a: &MigrateArgs) -> anyhow::Result<()> {
    let (id, ca) = a.tls.load()?;
    let cfg = transfer::tls::client_config(id, &ca)
        .with_context(|| format!("{}: TLS setup", Code::SslCertNotLoaded))?;
    let connector = Connector {
        addr: a.target.clone(),
        tls: cfg,
        timeout: Duration::from_secs(10),
    };
    let control = Control::default();
    if a.limit_mbit > 0 {
        control
            .bucket
            .set_rate(Some(a.limit_mbit.saturating_mul(1_000_000) / 8));
    }
    match a.mode {
        ModeArg::Block => migrate_block(a, &connector, &control),
        ModeArg::File => migrate_file(a, &connector, &control),
    }
}

fn migrate_block(a: &MigrateArgs, connector: &Connector, control: &Control) -> anyhow::Result<()> {
    if a.disks.is_empty() {
        bail!("block mode needs at least one --disk SRC=NAME");
    }
    let mut sources = Vec::new();
    for d in &a.disks {
        let (src, name) = split_pair(d, "SRC=NAME")?;
        sources.push((PathBuf::from(src), name));
    }
    let plan = || -> anyhow::Result<Vec<transfer::block::SourceDisk>> {
        let mut disks = Vec::new();
        for (path, name) in &sources {
            let (used, notes) = sms_agent::blockplan::used_ranges(path).with_context(|| {
                format!("{}: cannot read {}", Code::VolumeUnreadable, path.display())
            })?;
            for n in &notes {
                tracing::info!(disk = %path.display(), "{n}");
            }
            disks.push(transfer::block::SourceDisk {
                path: path.clone(),
                name: name.clone(),
                used,
            });
        }
        Ok(disks)
    };
    let mut ids = Vec::new();
    for (path, name) in &sources {
        ids.push(sms_agent::standalone::identify(path, name)?);
    }
    let mut record =
        sms_agent::standalone::Record::open(&a.state_dir, &a.target, a.task_id.as_deref(), ids)?;
    record.save()?;
    tracing::info!(migration = %record.migration, completed = ?record.completed, record = %record.file().display(), "standalone block migration");
    let mut disks = plan()?;
    let passes = plan_passes(record.completed, a.sync, a.freeze);
    if let Some(done) = record.completed {
        println!(
            "migration {}: pass {done} completed earlier; this run verifies the target and sends only what differs",
            record.migration
        );
    }
    let last = passes.len() - 1;
    for (i, &(pass, sync, frozen)) in passes.iter().enumerate() {
        let opts = transfer::block::SendOptions {
            task_id: record.migration.clone(),
            pass,
            sync,
            more: i < last,
            streams: a.streams.unwrap_or(transfer::block::STREAMS),
            checkpoint_every: Duration::from_secs_f64(a.checkpoint_secs.clamp(0.05, 600.0)),
            peer_timeout: Duration::from_secs(a.peer_timeout),
            ..transfer::block::SendOptions::default()
        };
        let freeze = if frozen {
            let mounts: Vec<PathBuf> = sources
                .iter()
                .flat_map(|(p, _)| sms_agent::freeze::mounted_on(p))
                .collect();
            let window = Duration::from_secs_f64(a.freeze_secs.clamp(0.1, 30.0));
            let f = sms_agent::freeze::Frozen::freeze(&mounts, window)
                .context("--freeze: the final pass cannot be made consistent")?;
            println!(
                "frozen for at most {:.0} s: {}",
                window.as_secs_f64(),
                if mounts.is_empty() {
                    "(no mounted filesystem on these disks)".to_string()
                } else {
                    mounts
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            // What the filesystems use now, frozen, is what the target must hold.
            disks = plan()?;
            Some((f, Instant::now()))
        } else {
            None
        };
        let label = if sync { "sync" } else { "copy" };
        let r = with_progress(label, |p| {
            transfer::block::send(connector, &disks, &opts, p, control)
        });
        if let Some((f, at)) = freeze {
            let within = f.thaw();
            println!("thawed after {:.1} s", at.elapsed().as_secs_f64());
            let r = r?;
            anyhow::ensure!(
                within,
                "--freeze: the frozen pass took {:.1} s, longer than the window; the filesystems were thawed at the deadline, so the target is complete but not crash-consistent. Run `migrate --sync --freeze` again: it sends only what changed ({} bytes this time)",
                r.elapsed.as_secs_f64(),
                r.wire_sent
            );
            print_block(label, &r);
        } else {
            print_block(label, &r?);
        }
        // Only now, with every chunk acknowledged durable, does the pass count as done.
        record.completed = Some(pass);
        record.save()?;
    }
    Ok(())
}

/// The passes (number, sync, frozen) of a run, after the last pass that completed earlier.
/// With --freeze, an unfrozen sync first catches up, so that the frozen one has little left
/// to send. Once a copy was completed, a run is a sync: it verifies every used chunk and sends
/// what differs, since the source may have changed since.
fn plan_passes(completed: Option<u32>, sync: bool, freeze: bool) -> Vec<(u32, bool, bool)> {
    match completed {
        None => match (sync, freeze) {
            (true, true) => vec![(0, false, false), (1, true, false), (2, true, true)],
            (true, false) => vec![(0, false, false), (1, true, false)],
            _ => vec![(0, false, false)],
        },
        Some(c) if freeze => vec![(c + 1, true, false), (c + 2, true, true)],
        Some(c) => vec![(c + 1, true, false)],
    }
}

fn print_block(label: &str, r: &transfer::block::PassReport) {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    #[allow(clippy::cast_precision_loss)]
    let rate = r.bytes_read as f64 / secs / 1e6;
    let label = if r.upgraded { "sync" } else { label };
    println!(
        "{label} complete: {} chunks ({} resumed, {} compared before sending), {} used bytes, {} read, {} data sent ({} on the wire), {} zero, {} re-sent chunks, {:.1} s, {:.1} MB/s",
        r.chunks, r.chunks_resumed, r.verified, r.used_bytes, r.bytes_read, r.plain_sent, r.wire_sent, r.zero_bytes, r.resent, secs, rate
    );
    if r.upgraded {
        println!(
            "  the target already held a complete copy (pass {}): every used chunk was compared by hash and only differences sent",
            r.held.map_or_else(|| "?".to_string(), |p| p.to_string())
        );
    }
}

fn migrate_file(a: &MigrateArgs, connector: &Connector, control: &Control) -> anyhow::Result<()> {
    let Some(root) = &a.source_root else {
        bail!("file mode needs --source-root DIR");
    };
    if !a.check.is_empty() {
        return check_files(a, root, connector, control);
    }
    // One pass does it all: a sync pass copies what is missing or changed, as a first copy
    // would, and also deletes what vanished from the source.
    let opts = transfer::file::SendOptions {
        sources: vec![root.clone()],
        map_to_root: true,
        excludes: a.exclude.clone(),
        streams: a.streams.unwrap_or(transfer::file::STREAMS),
        sync: a.sync,
        task_id: a.task_id.clone().unwrap_or_else(|| "standalone".into()),
        peer_timeout: Duration::from_secs(a.peer_timeout),
        ..transfer::file::SendOptions::default()
    };
    let label = if a.sync { "sync" } else { "copy" };
    let r = with_progress(label, |p| {
        transfer::file::send(connector, &opts, p, control)
    })?;
    println!(
        "{label} complete: {} entries, {} files, {} skipped, {} bytes sent, {} deleted, {} changed while read",
        r.entries,
        r.files,
        r.skipped,
        r.bytes_sent,
        r.deleted,
        r.changed_during_read.len()
    );
    Ok(())
}

/// `migrate --mode file --check DIR…`: the consistency check alone.
fn check_files(
    a: &MigrateArgs,
    root: &std::path::Path,
    connector: &Connector,
    control: &Control,
) -> anyhow::Result<()> {
    let canon = |p: &std::path::Path| {
        std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
    };
    let root = canon(root)?;
    let mut dirs = Vec::new();
    for d in &a.check {
        let c = canon(d)?;
        anyhow::ensure!(
            c.starts_with(&root),
            "--check {} is not inside --source-root {}",
            d.display(),
            root.display()
        );
        dirs.push(c);
    }
    let opts = transfer::file::CheckOptions {
        sources: vec![root.clone()],
        map_to_root: true,
        dirs,
        excludes: a.exclude.clone(),
        hash_mode: a.check_hash,
        task_id: a.task_id.clone().unwrap_or_else(|| "standalone".into()),
        peer_timeout: Duration::from_secs(a.peer_timeout),
    };
    let checks = with_progress("check", |p| {
        transfer::file::consistency(connector, &opts, p, control)
    })?;
    let mut differ = false;
    for c in &checks {
        println!(
            "check {}: {} files, {} different, {} missing on target, {} extra on target",
            c.dir_check,
            c.num_total_files,
            c.num_different_files,
            c.num_target_miss_files,
            c.num_target_more_files
        );
        differ |= c.num_different_files + c.num_target_miss_files + c.num_target_more_files > 0;
    }
    anyhow::ensure!(!differ, "the target differs from the source");
    Ok(())
}
