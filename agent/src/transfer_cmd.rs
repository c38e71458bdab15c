//! `sms-agent receive` and `sms-agent migrate`: the standalone target and source of a block-
//! or file-level migration over mutual TLS, without the SMS service.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use transfer::session::{Connector, Listener};
use transfer::task::Control;
use transfer::wire::Mode;
use transfer::Code;

use crate::interrupt::{signal_name, Interrupted, Signals};
use crate::term::{with_progress, Counters};

/// The command line or the files it names cannot work as given (exit status 64): running
/// again unchanged would fail the same way.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

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
    /// The identity and CA of this side; a file that cannot be used is a [`BadConfig`].
    pub(crate) fn load(&self) -> anyhow::Result<(transfer::tls::Identity, String)> {
        self.load_inner()
            .map_err(|e| BadConfig(format!("{e:#}")).into())
    }

    fn load_inner(&self) -> anyhow::Result<(transfer::tls::Identity, String)> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let pass = match &self.passphrase_file {
            Some(p) => Some(read(p)?.trim_end_matches(['\n', '\r']).to_string()),
            None => None,
        };
        // Masked in the log lines (and log files) from now on.
        if let Some(p) = &pass {
            sms_agent::logs::redact::register(p);
        }
        let id = transfer::tls::Identity::from_pem(
            &read(&self.cert)?,
            &read(&self.key)?,
            pass.as_deref(),
        )
        .with_context(|| format!("{}: SSL certificate not loaded", Code::SslCertNotLoaded))?;
        Ok((id, read(&self.ca)?))
    }
}

/// TLS material of `receive`: PEM files, or fetched from SMS for a task.
#[derive(Debug, Args)]
pub struct ReceiveTlsArgs {
    /// CA certificate (PEM) both sides' certificates must be issued by.
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "task",
        conflicts_with = "task"
    )]
    ca: Option<PathBuf>,
    /// This side's certificate (PEM).
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "task",
        conflicts_with = "task"
    )]
    cert: Option<PathBuf>,
    /// This side's private key (PEM: PKCS#1, PKCS#8 or encrypted PKCS#8).
    #[arg(
        long,
        value_name = "PEM",
        required_unless_present = "task",
        conflicts_with = "task"
    )]
    key: Option<PathBuf>,
    /// File holding the key's passphrase, when the key is encrypted.
    #[arg(long, value_name = "FILE", conflicts_with = "task")]
    passphrase_file: Option<PathBuf>,
    /// Instead of --ca/--cert/--key: fetch the target's TLS material of SMS task ID
    /// (`GET /v3/tasks/{ID}/certkey`: ca, target_data_cert, target_data_private_key, and the
    /// passphrase of an encrypted key) with the endpoint and credentials of --config. It is
    /// kept in memory only, unless --save-tls says where to write it.
    #[arg(long, value_name = "ID")]
    task: Option<String>,
    /// With --task: the daemon's config file, for its [api] and [auth]
    /// [default: /etc/sms-agent/agent.toml].
    #[arg(long, value_name = "FILE", requires = "task")]
    config: Option<PathBuf>,
    /// With --task: also write the fetched material to DIR (ca.pem, cert.pem, key.pem and,
    /// for an encrypted key, passphrase; keys 0600), for later runs with --ca/--cert/--key.
    #[arg(long, value_name = "DIR", requires = "task")]
    save_tls: Option<PathBuf>,
}

impl ReceiveTlsArgs {
    /// The identity and CA the receiver serves with.
    fn load(&self) -> anyhow::Result<(transfer::tls::Identity, String)> {
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            let Some(task) = &self.task else {
                return Err(BadConfig("give --ca, --cert and --key, or --task".into()).into());
            };
            return self.fetch(task);
        };
        TlsArgs {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            passphrase_file: self.passphrase_file.clone(),
        }
        .load()
    }

    /// `--task`: the material from SMS, through the daemon's configuration.
    fn fetch(&self, task: &str) -> anyhow::Result<(transfer::tls::Identity, String)> {
        use sms_agent::config::{Config, Purpose, DEFAULT_PATH};
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
        let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        let cfg = Config::load(&path, false, &env, Purpose::Daemon)?;
        sms_agent::logs::redact::register_config(&cfg);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let tls = rt.block_on(async {
            let api = sms_agent::api::Client::new(&cfg)
                .with_context(|| format!("config {}", path.display()))?;
            sms_agent::target_tls::fetch(&api, task)
                .await
                .map_err(anyhow::Error::from)
        })?;
        if let Some(p) = &tls.passphrase {
            sms_agent::logs::redact::register(p.expose());
        }
        if let Some(dir) = &self.save_tls {
            let files = tls.save(dir)?;
            tracing::info!(dir = %dir.display(), files = files.len(), "target TLS material saved");
        }
        let id = transfer::tls::Identity::from_pem(
            &tls.cert,
            tls.key.expose(),
            tls.passphrase
                .as_ref()
                .map(sms_agent::config::Secret::expose),
        )
        .with_context(|| format!("{}: SSL certificate not loaded", Code::SslCertNotLoaded))?;
        Ok((id, tls.ca))
    }
}

/// Arguments of `receive`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8900")]
    listen: String,
    #[command(flatten)]
    tls: ReceiveTlsArgs,
    /// Block mode: write target disk NAME to PATH (a device or an image file, created sparse
    /// when missing). Repeatable. Nothing else is ever written. For an SMS task NAME is the
    /// target ECS disk of the task's `relation_name` (e.g. /dev/vdb), not the source's disk.
    /// With --prepare (file mode): the blank block device for disk NAME of the source's
    /// layout (`migrate --disk SRC=NAME`, default the source's device path).
    #[arg(long = "disk", value_name = "NAME=PATH")]
    disks: Vec<String>,
    /// File mode: write the migrated files under DIR, and nowhere else.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// File mode onto blank disks: with --root DIR and --disk NAME=DEVICE for each disk of
    /// the source's layout, make on the devices the source's partition table, partitions
    /// (at least the used size, the last one grown to the end of a larger disk) and
    /// filesystems with the source's UUIDs and labels, and swap; mount them under DIR;
    /// receive the files; then configure the migrated system to boot (fstab and crypttab
    /// checked, UUIDs rewritten where they changed, initramfs regenerated, GRUB 2 installed
    /// for BIOS and grub.cfg regenerated, in a chroot with the target's own tools) before
    /// the pass counts as complete. A device holding a partition table or filesystem is
    /// refused unless --wipe. The filesystems stay mounted until the receiver exits.
    #[arg(long, requires = "root")]
    prepare: bool,
    /// With --prepare: erase target disks that hold a partition table or a filesystem
    /// (disks already holding the layout an earlier receiver prepared are kept as they are).
    #[arg(long, requires = "prepare")]
    wipe: bool,
    /// With --prepare: empty /etc/machine-id of the migrated system, so it makes a new one
    /// at first boot (a clone that runs beside its source must not share the id).
    #[arg(long, requires = "prepare")]
    clear_machine_id: bool,
    /// With --prepare: only lay out, format and mount the disks; configure nothing (disks
    /// that hold data, not an operating system).
    #[arg(long, requires = "prepare")]
    no_configure: bool,
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
    /// Print one JSON document on stdout when the receiver ends: each session's report
    /// (pass, complete, chunks or files, bytes written, seconds), and nothing else there.
    #[arg(long)]
    json: bool,
    /// Also log to DIR/receive.log (rotated at 10 MiB or daily, 100 MiB and 30 days kept in
    /// all); an empty value keeps logs on stderr only.
    #[arg(long, value_name = "DIR", default_value = "/var/log/sms-agent")]
    log_dir: PathBuf,
    /// Format of the log file: text, or json (one object a line).
    #[arg(long, value_enum, default_value = "text")]
    log_format: sms_agent::logs::LogFormat,
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
    /// Block mode: send source device SRC as target disk NAME. Repeatable. File mode: name
    /// the source disk SRC NAME in the disk layout sent to a `receive --prepare` (default:
    /// its device path).
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
    /// when this one dies). With changed-block tracking (BPF) the frozen pass reads only the
    /// blocks written since the pass before it began, so the window stays in seconds whatever
    /// the disk size; without it, every used block, and migrate fails when that overruns.
    #[arg(long)]
    freeze: bool,
    /// Block mode: after the copy, keep the target current until SIGINT/SIGTERM: a sync pass
    /// whenever --sync-threshold of data changed or --sync-interval passed with anything
    /// changed, printing the replication lag (age of the oldest change not yet on the
    /// target). With --freeze, the signal starts the cutover: the running pass ends, then the
    /// filesystems are frozen, the changes sent and the filesystems thawed, and migrate exits.
    #[arg(long)]
    continuous: bool,
    /// With --continuous: the longest wait between two sync passes, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    sync_interval: f64,
    /// With --continuous: run a sync pass as soon as this many MiB changed.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    sync_threshold: u64,
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
    /// File mode: after the pass, keep running and holding a change journal of the source
    /// root's filesystem (fanotify; Linux 5.9, root), and run a sync pass at each SIGUSR1.
    /// Such a pass visits only what changed since the last completed pass; when the journal
    /// cannot vouch for the whole interval (its queue overflowed, a pass failed, a changed
    /// file has several hard links, no journal on this kernel), it walks everything and says
    /// why. SIGINT or SIGTERM between passes ends the run (exit 0: the last pass completed).
    #[arg(long, conflicts_with = "check")]
    watch: bool,
    /// How often the receiver makes data durable and records it (resume granularity).
    #[arg(long, value_name = "SECS", default_value_t = 2.0, hide = true)]
    checkpoint_secs: f64,
    /// Give up when the receiver stays silent or takes no data this long on any stream.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    peer_timeout: u64,
    /// Print one JSON summary on stdout (per pass: bytes read, sent, on the wire, zero,
    /// resumed, re-sent, compared before sending, seconds, rate, verdict), and nothing else
    /// there; an interrupted run adds the command that resumes it.
    #[arg(long)]
    json: bool,
}

fn split_pair(s: &str, what: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => Err(BadConfig(format!("--disk {s:?}: expected {what}")).into()),
    }
}

/// Runs the receiver until stopped (or, with `--once`, until one pass completes).
pub fn receive(a: &ReceiveArgs) -> anyhow::Result<()> {
    if !a.log_dir.as_os_str().is_empty() {
        let limits = sms_agent::logs::LogsSection::default().limits();
        if let Err(e) = sms_agent::logs::sink::install(&a.log_dir, "receive", a.log_format, limits)
        {
            tracing::warn!(log_dir = %a.log_dir.display(), error = %e, "cannot write log files; logging to stderr only");
        }
    }
    if a.disks.is_empty() && a.root.is_none() {
        return Err(BadConfig(
            "give --disk NAME=PATH (block mode) or --root DIR (file mode)".into(),
        )
        .into());
    }
    let mut disks = Vec::new();
    for d in &a.disks {
        let (name, path) = split_pair(d, "NAME=PATH")?;
        disks.push(transfer::block::TargetMap {
            name,
            path: PathBuf::from(path),
        });
    }
    if a.prepare && disks.is_empty() {
        return Err(BadConfig(
            "--prepare needs --disk NAME=DEVICE for each disk of the source's layout".into(),
        )
        .into());
    }
    let target = match (&a.root, a.prepare) {
        (Some(root), true) => Some(Arc::new(transfer::prepare::Target::new(
            transfer::prepare::PrepareOptions {
                // With --prepare the disks are the file pass's; no block pass may write them.
                disks: std::mem::take(&mut disks)
                    .into_iter()
                    .map(|m| (m.name, m.path))
                    .collect(),
                wipe: a.wipe,
                clear_machine_id: a.clear_machine_id,
                configure: !a.no_configure,
            },
            root.clone(),
        ))),
        _ => None,
    };
    let (id, ca) = a.tls.load()?;
    let cfg = transfer::tls::server_config(id, &ca)
        .with_context(|| format!("{}: TLS setup", Code::SslCertNotLoaded))?;
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("cannot create {}", a.state_dir.display()))?;
    if let Some(root) = &a.root {
        prepare_root(root)?;
    }
    let signals = Signals::install().context("cannot install signal handlers")?;
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
        prepare: target.clone(),
    });
    let once = a.once;
    let state = Arc::new(Served::default());
    let served = Arc::clone(&state);
    // One session at a time writes a given set of disks: two would interleave writes.
    let gate = Arc::new(std::sync::Mutex::new(()));
    let server = std::thread::Builder::new()
        .name("sms-serve".into())
        .spawn(move || {
            listener.serve(move |mut inc, _guard| {
                if served.stopping.load(Ordering::SeqCst) {
                    inc.control
                        .send_error(&Code::TaskPaused, "the receiver is stopping");
                    return false;
                }
                // A network check writes nothing: it neither waits for nor holds the gate.
                if inc.mode == Mode::Check {
                    let task = inc.task_id.clone();
                    match transfer::netcheck::serve::serve(inc, peer_timeout) {
                        Ok(r) => tracing::info!(task_id = %task, echoes = r.echoes, streams = r.streams, bytes = r.bytes, "network check served"),
                        Err(e) => tracing::warn!(task_id = %task, error = %e, "network check failed"),
                    }
                    return false;
                }
                let Some(_one) = wait_turn(&gate, &mut inc, peer_timeout) else {
                    return false;
                };
                served.active.fetch_add(1, Ordering::SeqCst);
                let complete = serve_session(inc, &block_opts, file_opts.as_ref(), &served);
                served.active.fetch_sub(1, Ordering::SeqCst);
                once && complete
            })
        })
        .context("cannot start the receiver's thread")?;
    let result = loop {
        if server.is_finished() {
            break match server.join() {
                Ok(r) => r.context("the receiver stopped"),
                Err(_) => Err(anyhow::anyhow!("the receiver's thread panicked")),
            };
        }
        if let Some(signal) = signals.caught() {
            state.stopping.store(true, Ordering::SeqCst);
            // A session that is about to end gets to; one that is not is cut, and its
            // sender resumes from the last checkpoint the receiver made durable.
            let active = state.active.load(Ordering::SeqCst);
            tracing::info!(signal = %signal_name(signal), sessions = active, "stopping: accepting no more sessions");
            let until = Instant::now() + Duration::from_secs(3);
            while state.active.load(Ordering::SeqCst) > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            if state.active.load(Ordering::SeqCst) > 0 {
                eprintln!("sms-agent receive: {}: the running session was cut; its sender resumes from the last checkpoint", signal_name(signal));
            }
            break Err(Interrupted { signal }.into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(t) = &target {
        // The prepared filesystems are unmounted (after a sync) before the receiver exits,
        // so the disks can be booted or attached elsewhere.
        t.release();
    }
    if a.json {
        let sessions = std::mem::take(&mut *lock(&state.reports));
        let verdict = match &result {
            Ok(()) => "complete",
            Err(e) if e.is::<Interrupted>() => "interrupted",
            Err(_) => "failed",
        };
        println!(
            "{}",
            json!({"command": "receive", "listen": addr.to_string(), "verdict": verdict, "sessions": sessions})
        );
    }
    result
}

/// What the serving thread shares with the one that waits for signals.
#[derive(Default)]
struct Served {
    /// Set on SIGINT/SIGTERM: new sessions are turned away.
    stopping: AtomicBool,
    /// Sessions running an engine.
    active: AtomicUsize,
    /// Each session's report, for `--json`.
    reports: Mutex<Vec<Value>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs one session's engine; whether it completed the sender's last pass.
fn serve_session(
    mut inc: transfer::session::Incoming,
    block_opts: &transfer::block::ReceiveOptions,
    file_opts: Option<&transfer::file::ReceiveOptions>,
    served: &Served,
) -> bool {
    let task = inc.task_id.clone();
    let started = Instant::now();
    let (complete, report) = match inc.mode {
        Mode::Block if !block_opts.disks.is_empty() => {
            match transfer::block::receive(inc, block_opts) {
                Ok(r) => {
                    tracing::info!(task_id = %task, pass = r.pass, complete = r.complete, chunks = r.chunks_done, bytes_written = r.bytes_written, "block session ended");
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    #[allow(clippy::cast_precision_loss)]
                    let rate = r.bytes_written as f64 / secs;
                    let v = json!({
                        "mode": "block",
                        "task_id": r.task_id,
                        "pass": r.pass,
                        "verdict": if r.complete { "complete" } else { "incomplete" },
                        "more_passes_follow": r.more,
                        "upgraded_to_sync": r.upgraded,
                        "chunks_done": r.chunks_done,
                        "chunks_resumed": r.chunks_resumed,
                        "chunks_to_verify": r.chunks_to_verify,
                        "bytes_written": r.bytes_written,
                        "seconds": secs,
                        "rate_bytes_per_sec": rate,
                    });
                    (r.complete && !r.more, v)
                }
                Err(e) => {
                    tracing::error!(task_id = %task, error = %e, "block session failed");
                    let v = json!({"mode": "block", "task_id": task, "verdict": "failed", "error": e.to_string(), "seconds": started.elapsed().as_secs_f64()});
                    (false, v)
                }
            }
        }
        Mode::File if file_opts.is_some() => {
            let Some(fo) = file_opts else {
                return false;
            };
            match transfer::file::receive(inc, fo) {
                Ok(r) => {
                    tracing::info!(task_id = %task, complete = r.complete, files = r.files_written, "file session ended");
                    let secs = started.elapsed().as_secs_f64().max(1e-9);
                    #[allow(clippy::cast_precision_loss)]
                    let rate = r.bytes_written as f64 / secs;
                    let v = json!({
                        "mode": "file",
                        "task_id": task,
                        "root": fo.root.display().to_string(),
                        "check": r.check,
                        "verdict": if r.complete { "complete" } else { "incomplete" },
                        "files_written": r.files_written,
                        "bytes_written": r.bytes_written,
                        "bytes_reused": r.bytes_reused,
                        "created": r.created,
                        "updated": r.updated,
                        "deleted": r.deleted,
                        "changed_while_read": r.changed_during_read,
                        "warnings": r.warnings,
                        "seconds": secs,
                        "rate_bytes_per_sec": rate,
                    });
                    (r.complete && !r.check, v)
                }
                Err(e) => {
                    tracing::error!(task_id = %task, error = %e, "file session failed");
                    let v = json!({"mode": "file", "task_id": task, "verdict": "failed", "error": e.to_string(), "seconds": started.elapsed().as_secs_f64()});
                    (false, v)
                }
            }
        }
        mode => {
            tracing::warn!(task_id = %task, ?mode, "refused: this receiver serves the other mode");
            inc.control.send_error(
                &Code::TransmissionFailed,
                "this receiver was not started for that mode (--disk for block, --root for file)",
            );
            return false;
        }
    };
    lock(&served.reports).push(report);
    complete
}

/// `--root DIR`: an existing directory, or one made now (0700: the tree that will arrive
/// sets its own modes) when its parent exists. A missing parent is more likely a typo than
/// a wish for a new tree of directories, so that is refused.
fn prepare_root(root: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::metadata(root) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(BadConfig(format!("--root {} is not a directory", root.display())).into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("--root {}", root.display())),
    }
    let parent = match root.parent() {
        Some(p) if p.as_os_str().is_empty() => std::path::Path::new("."),
        Some(p) => p,
        None => std::path::Path::new("/"),
    };
    if !parent.is_dir() {
        return Err(BadConfig(format!(
            "--root {}: its parent directory {} does not exist (only the last component is created)",
            root.display(),
            parent.display()
        ))
        .into());
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(root)
        .with_context(|| format!("cannot create --root {}", root.display()))?;
    tracing::info!(root = %root.display(), "created the receive root (mode 0700)");
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

/// What a `migrate` run did, printed as it goes (human) or once at the end (`--json`).
struct Summary {
    json: bool,
    doc: serde_json::Map<String, Value>,
    passes: Vec<Value>,
}

impl Summary {
    fn new(a: &MigrateArgs) -> Self {
        let mut doc = serde_json::Map::new();
        doc.insert("command".into(), json!("migrate"));
        doc.insert(
            "mode".into(),
            json!(match a.mode {
                ModeArg::Block => "block",
                ModeArg::File => "file",
            }),
        );
        doc.insert("target".into(), json!(a.target));
        Self {
            json: a.json,
            doc,
            passes: Vec::new(),
        }
    }

    fn set(&mut self, key: &str, v: Value) {
        self.doc.insert(key.into(), v);
    }

    /// A line for the operator: on stdout normally, on stderr under `--json`, whose stdout
    /// carries the JSON document alone.
    fn say(&self, line: &str) {
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    fn block_pass(
        &mut self,
        label: &str,
        pass: u32,
        r: &transfer::block::PassReport,
        tracked: usize,
        freeze_secs: Option<f64>,
    ) {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        let rate = r.bytes_read as f64 / secs;
        let label = if r.upgraded { "sync" } else { label };
        self.passes.push(json!({
            "pass": pass,
            "kind": label,
            "verdict": "complete",
            "chunks": r.chunks,
            "chunks_resumed": r.chunks_resumed,
            "chunks_compared_before_sending": r.verified,
            "chunks_resent": r.resent,
            "used_bytes": r.used_bytes,
            "bytes_read": r.bytes_read,
            "bytes_sent": r.plain_sent,
            "bytes_on_wire": r.wire_sent,
            "bytes_zero": r.zero_bytes,
            "upgraded_to_sync": r.upgraded,
            "target_held_pass": r.held,
            "seconds": secs,
            "rate_bytes_per_sec": rate,
            "disks_tracked": tracked,
            "freeze_seconds": freeze_secs,
        }));
        if self.json {
            return;
        }
        println!(
            "{label} complete: {} chunks ({} resumed, {} compared before sending), {} used bytes, {} read, {} data sent ({} on the wire), {} zero, {} re-sent chunks, {:.3} s, {:.1} MB/s",
            r.chunks, r.chunks_resumed, r.verified, r.used_bytes, r.bytes_read, r.plain_sent, r.wire_sent, r.zero_bytes, r.resent, secs, rate / 1e6
        );
        if tracked > 0 {
            println!("  changed-block tracking: {tracked} disk(s) read only the blocks written since the last pass began");
        }
        if r.upgraded {
            println!(
                "  the target already held a complete copy (pass {}): every used chunk was compared by hash and only differences sent",
                r.held.map_or_else(|| "?".to_string(), |p| p.to_string())
            );
        }
    }

    fn file_pass(&mut self, label: &str, r: &transfer::file::SendReport, secs: f64) {
        let secs = secs.max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        let rate = r.bytes_plain as f64 / secs;
        self.passes.push(json!({
            "pass": 0,
            "kind": label,
            "verdict": "complete",
            "filesystems": [{
                "source_root": self.doc.get("source_root").cloned().unwrap_or(Value::Null),
                "entries": r.entries,
                "files_sent": r.files,
                "files_skipped": r.skipped,
                "hard_links": r.links,
                "bytes_sent": r.bytes_plain,
                "bytes_on_wire": r.bytes_sent,
                "bytes_reused_on_target": r.bytes_reused,
                "deleted_on_target": r.deleted,
                "changed_while_read": r.changed_during_read.len(),
                "vanished": r.vanished,
                "target_written": r.target_written,
                "target_updated": r.target_updated,
            }],
            "seconds": secs,
            "rate_bytes_per_sec": rate,
        }));
        self.say(&format!(
            "{label} complete: {} entries, {} files, {} skipped, {} bytes sent, {} deleted, {} changed while read",
            r.entries,
            r.files,
            r.skipped,
            r.bytes_sent,
            r.deleted,
            r.changed_during_read.len()
        ));
    }

    /// The pass that did not complete: what it covered, and how far the target made it durable.
    fn unfinished(&mut self, label: &str, pass: u32, c: Counters, verdict: &str, secs: f64) {
        self.passes.push(json!({
            "pass": pass,
            "kind": label,
            "verdict": verdict,
            "bytes_done": c.done,
            "bytes_total": c.total,
            "bytes_sent": c.plain_sent,
            "bytes_on_wire": c.wire_sent,
            "bytes_durable": c.durable,
            "seconds": secs,
        }));
    }

    /// Prints the JSON document (under `--json`) with the run's verdict.
    fn finish(mut self, result: &anyhow::Result<()>) {
        let (verdict, error) = match result {
            Ok(()) => ("complete", None),
            Err(e) if e.is::<Interrupted>() => ("interrupted", Some(format!("{e:#}"))),
            Err(e) => ("failed", Some(format!("{e:#}"))),
        };
        if !self.json {
            return;
        }
        self.doc.insert("verdict".into(), json!(verdict));
        self.doc.insert("passes".into(), Value::Array(self.passes));
        if let Some(e) = error {
            self.doc.insert("error".into(), json!(e));
        }
        println!("{}", Value::Object(self.doc));
    }
}

/// Runs the standalone source side; Ok only when the copy (and sync) is complete.
pub fn migrate(a: &MigrateArgs) -> anyhow::Result<()> {
    let signals = Signals::install().context("cannot install signal handlers")?;
    let mut summary = Summary::new(a);
    let control = Control::default();
    let finished = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        // The engines check the cancel flag; a signal handler may only set an atomic, so a
        // watcher carries the one to the other.
        s.spawn(|| {
            while !finished.load(Ordering::Relaxed) {
                if signals.caught().is_some() {
                    // A cutover lets the running pass finish; a second signal kills.
                    if !(a.continuous && a.freeze) {
                        control.cancel.store(true, Ordering::Relaxed);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let r = migrate_with(a, &control, &signals, &mut summary);
        finished.store(true, Ordering::Relaxed);
        r
    });
    let result = match (result, signals.caught()) {
        (Err(e), Some(signal)) if !e.is::<BadConfig>() => {
            let resume = crate::interrupt::command_line();
            summary.set("resume_command", json!(resume));
            eprintln!(
                "sms-agent migrate: {}: stopped at a checkpoint; what the target acknowledged stays there and is not sent again",
                signal_name(signal)
            );
            eprintln!("to resume, run the same command:\n  {resume}");
            tracing::debug!(error = %format!("{e:#}"), "the pass ended");
            Err(Interrupted { signal }.into())
        }
        (r, _) => r,
    };
    summary.finish(&result);
    result
}

fn migrate_with(
    a: &MigrateArgs,
    control: &Control,
    signals: &Signals,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let (id, ca) = a.tls.load()?;
    let cfg = transfer::tls::client_config(id, &ca)
        .with_context(|| format!("{}: TLS setup", Code::SslCertNotLoaded))?;
    let connector = Connector {
        addr: a.target.clone(),
        tls: cfg,
        timeout: Duration::from_secs(10),
    };
    if a.limit_mbit > 0 {
        control
            .bucket
            .set_rate(Some(a.limit_mbit.saturating_mul(1_000_000) / 8));
    }
    match a.mode {
        ModeArg::Block => migrate_block(a, &connector, control, signals, summary),
        ModeArg::File => migrate_file(a, &connector, control, signals, summary),
    }
}

fn migrate_block(
    a: &MigrateArgs,
    connector: &Connector,
    control: &Control,
    signals: &Signals,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    if a.disks.is_empty() {
        return Err(BadConfig("block mode needs at least one --disk SRC=NAME".into()).into());
    }
    if a.watch {
        return Err(BadConfig("--watch is for file mode".into()).into());
    }
    let mut sources = Vec::new();
    for d in &a.disks {
        let (src, name) = split_pair(d, "SRC=NAME")?;
        sources.push((PathBuf::from(src), name));
    }
    summary.set(
        "disks",
        Value::Array(
            sources
                .iter()
                .map(|(p, n)| json!({"source": p.display().to_string(), "name": n}))
                .collect(),
        ),
    );
    let mut ids = Vec::new();
    for (path, name) in &sources {
        ids.push(sms_agent::standalone::identify(path, name)?);
    }
    let mut record =
        sms_agent::standalone::Record::open(&a.state_dir, &a.target, a.task_id.as_deref(), ids)?;
    record.save()?;
    summary.set("migration", json!(record.migration));
    tracing::info!(migration = %record.migration, completed = ?record.completed, record = %record.file().display(), "standalone block migration");
    let sync = a.sync || a.continuous;
    if a.freeze && !sync {
        return Err(BadConfig("--freeze needs --sync or --continuous".into()).into());
    }
    let passes = plan_passes(record.completed, sync, a.freeze && !a.continuous);
    if let Some(done) = record.completed {
        summary.say(&format!(
            "migration {}: pass {done} completed earlier; this run verifies the target and sends only what differs",
            record.migration
        ));
    }
    // Tracking starts before the first pass reads anything, so that every later pass of this
    // run needs only what changed.
    let tracker = if sync {
        let paths: Vec<PathBuf> = sources.iter().map(|(p, _)| p.clone()).collect();
        match sms_agent::cbt::Tracker::start(&paths) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("{e}; every sync pass compares the hashes of all used chunks");
                None
            }
        }
    } else {
        None
    };
    let mut run = BlockRun {
        a,
        connector,
        control,
        sources: &sources,
        tracker: tracker.as_ref(),
        record: &mut record,
    };
    let last = passes.len() - 1;
    for (i, &(pass, sync, frozen)) in passes.iter().enumerate() {
        if let Some(signal) = signals.caught() {
            return Err(Interrupted { signal }.into());
        }
        run.pass(summary, pass, sync, frozen, i < last || a.continuous)?;
    }
    if a.continuous {
        run.continuous(summary, signals)?;
    }
    Ok(())
}

/// One standalone block migration's passes.
struct BlockRun<'a> {
    a: &'a MigrateArgs,
    connector: &'a Connector,
    control: &'a Control,
    sources: &'a [(PathBuf, String)],
    tracker: Option<&'a sms_agent::cbt::Tracker>,
    record: &'a mut sms_agent::standalone::Record,
}

impl BlockRun<'_> {
    /// What each disk uses now.
    fn plan(&self) -> anyhow::Result<Vec<transfer::block::SourceDisk>> {
        let mut disks = Vec::new();
        for (path, name) in self.sources {
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
    }

    /// Takes what changed since the last pass began, after flushing each disk's own page
    /// cache (buffered writes to the device reach the tracker only as they are written back).
    fn changes(&self, pass: u32, sync: bool) -> Option<Vec<sms_agent::cbt::Changes>> {
        let t = self.tracker?;
        for (p, _) in self.sources {
            if let Ok(f) = std::fs::File::open(p) {
                let _ = f.sync_all();
            }
        }
        let changes = t.take();
        // A copy reads everything anyway.
        let shown = if sync { changes.as_slice() } else { &[] };
        for ((p, _), c) in self.sources.iter().zip(shown) {
            match c {
                sms_agent::cbt::Changes::Known(d) => {
                    tracing::info!(pass, disk = %p.display(), changed_bytes = d.bytes(), "changed-block tracking: this pass reads only the changed blocks");
                }
                sms_agent::cbt::Changes::Unknown(why) => {
                    tracing::info!(pass, disk = %p.display(), "changed-block tracking: {why}; this pass compares every used chunk");
                }
            }
        }
        Some(changes)
    }

    /// Runs pass `pass`; with `frozen`, between a freeze and a thaw of the disks' filesystems.
    fn pass(
        &mut self,
        summary: &mut Summary,
        pass: u32,
        sync: bool,
        frozen: bool,
        more: bool,
    ) -> anyhow::Result<()> {
        let a = self.a;
        let mut opts = transfer::block::SendOptions {
            task_id: self.record.migration.clone(),
            pass,
            sync,
            more,
            streams: a.streams.unwrap_or(transfer::block::STREAMS),
            checkpoint_every: Duration::from_secs_f64(a.checkpoint_secs.clamp(0.05, 600.0)),
            peer_timeout: Duration::from_secs(a.peer_timeout),
            ..transfer::block::SendOptions::default()
        };
        let freeze = if frozen {
            let mounts: Vec<PathBuf> = self
                .sources
                .iter()
                .flat_map(|(p, _)| sms_agent::freeze::mounted_on(p))
                .collect();
            let window = Duration::from_secs_f64(a.freeze_secs.clamp(0.1, 30.0));
            let f = sms_agent::freeze::Frozen::freeze(&mounts, window)
                .context("--freeze: the final pass cannot be made consistent")?;
            summary.say(&format!(
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
            ));
            Some((f, Instant::now()))
        } else {
            None
        };
        // Frozen, every write to the filesystems has completed: the tracker holds them all.
        let changes = self.changes(pass, sync);
        if sync {
            if let Some(c) = &changes {
                opts.changed = c.iter().map(sms_agent::cbt::Changes::ranges).collect();
            }
        }
        let tracked = opts.changed.iter().filter(|c| c.is_some()).count();
        let give_back = |changes: Option<Vec<sms_agent::cbt::Changes>>| {
            if let (Some(t), Some(c)) = (self.tracker, changes) {
                t.give_back(c);
            }
        };
        // What the filesystems use now (frozen: what the target must hold).
        let disks = match self.plan() {
            Ok(d) => d,
            Err(e) => {
                give_back(changes);
                if let Some((f, _)) = freeze {
                    f.thaw();
                }
                return Err(e);
            }
        };
        let label = if sync { "sync" } else { "copy" };
        let started = Instant::now();
        let (r, counters) = with_progress(label, |p| {
            transfer::block::send(self.connector, &disks, &opts, p, self.control)
        });
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                give_back(changes);
                let verdict = if self.control.cancelled() {
                    "interrupted"
                } else {
                    "failed"
                };
                summary.unfinished(
                    label,
                    pass,
                    counters,
                    verdict,
                    started.elapsed().as_secs_f64(),
                );
                if let Some((f, at)) = freeze {
                    f.thaw();
                    summary.say(&format!("thawed after {:.1} s", at.elapsed().as_secs_f64()));
                }
                if self.control.cancelled() {
                    summary.say(&format!(
                        "{label} pass {pass} stopped: {} of {} covered, {} durable on the target, {} data sent ({} on the wire)",
                        counters.done, counters.total, counters.durable, counters.plain_sent, counters.wire_sent
                    ));
                }
                return Err(e.into());
            }
        };
        let mut window = None;
        if let Some((f, at)) = freeze {
            let within = f.thaw();
            let secs = at.elapsed().as_secs_f64();
            window = Some(secs);
            summary.say(&format!("thawed after {secs:.3} s"));
            anyhow::ensure!(
                within,
                "--freeze: the frozen pass took {:.1} s, longer than the window; the filesystems were thawed at the deadline, so the target is complete but not crash-consistent. Run `migrate --sync --freeze` again: it sends only what changed ({} bytes this time)",
                r.elapsed.as_secs_f64(),
                r.wire_sent
            );
        }
        if let Some(t) = self.tracker {
            if r.chunks_resumed > 0 {
                // Chunks sent by an earlier session were read before tracking began.
                t.forget(&format!(
                    "pass {pass} resumed {} chunks sent before the tracker started",
                    r.chunks_resumed
                ));
            }
            t.committed();
        }
        summary.block_pass(label, pass, &r, tracked, window);
        // Only now, with every chunk acknowledged durable, does the pass count as done.
        self.record.completed = Some(pass);
        self.record.save()?;
        Ok(())
    }

    /// Keeps the target current until a signal; with --freeze, the signal starts the cutover.
    fn continuous(&mut self, summary: &mut Summary, signals: &Signals) -> anyhow::Result<()> {
        use sms_agent::changes::{ChangeFeed, Policy};
        let policy = Policy {
            interval: Duration::from_secs_f64(self.a.sync_interval.clamp(0.1, 86_400.0)),
            threshold: self.a.sync_threshold.saturating_mul(1 << 20),
        };
        let feed = self.tracker.map(|t| t as &dyn ChangeFeed);
        let mut last = Instant::now();
        let mut said = Instant::now();
        summary.say(&format!(
            "continuous sync: a pass every {:.0} s or at {} MiB changed; stop with SIGINT/SIGTERM{}",
            policy.interval.as_secs_f64(),
            self.a.sync_threshold,
            if self.a.freeze {
                ", which freezes, sends the last changes and thaws"
            } else {
                ""
            }
        ));
        loop {
            let next = self.record.completed.map_or(0, |c| c + 1);
            if signals.caught().is_some() {
                if self.a.freeze {
                    return self.pass(summary, next, true, true, false);
                }
                summary.say(&format!(
                    "continuous sync stopped; the target holds pass {} (lag {})",
                    self.record
                        .completed
                        .map_or_else(|| "-".into(), |p| p.to_string()),
                    lag_text(feed)
                ));
                return Ok(());
            }
            if policy.due(feed, last.elapsed()) {
                self.pass(summary, next, true, false, true)?;
                last = Instant::now();
            }
            if said.elapsed() >= Duration::from_secs(10) {
                said = Instant::now();
                let pending = feed.and_then(ChangeFeed::pending_bytes);
                tracing::info!(
                    lag_secs = feed.and_then(ChangeFeed::lag).map(|l| l.as_secs_f64()),
                    pending_bytes = pending,
                    "replication lag"
                );
                eprintln!(
                    "replication lag {}, {} changed since the last pass",
                    lag_text(feed),
                    pending.map_or_else(|| "unknown".into(), |b| format!("{b} bytes"))
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The replication lag for a line of text.
fn lag_text(feed: Option<&dyn sms_agent::changes::ChangeFeed>) -> String {
    match feed.map(|f| f.lag()) {
        None => "unknown (no changed-block tracking)".into(),
        Some(None) => "0 s".into(),
        Some(Some(l)) => format!("{:.1} s", l.as_secs_f64()),
    }
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

fn migrate_file(
    a: &MigrateArgs,
    connector: &Connector,
    control: &Control,
    signals: &Signals,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let Some(root) = &a.source_root else {
        return Err(BadConfig("file mode needs --source-root DIR".into()).into());
    };
    summary.set("source_root", json!(root.display().to_string()));
    if !a.check.is_empty() {
        return check_files(a, root, connector, control, summary);
    }
    // One pass does it all: a sync pass copies what is missing or changed, as a first copy
    // would, and also deletes what vanished from the source.
    // A root that is a mounted filesystem carries its disks' layout (for a target that
    // prepares blank disks), and the filesystems mounted below it on those disks go along.
    let mut rename = Vec::new();
    for d in &a.disks {
        rename.push(split_pair(d, "SRC=NAME")?);
    }
    let (sources, base, layout) = match sms_agent::disklayout::read_layout(root, &rename) {
        Ok((layout, sources)) => {
            tracing::info!(
                disks = layout.disks.len(),
                filesystems = sources.len(),
                "disk layout read; it goes with the plan"
            );
            (sources, Some(root.clone()), Some(layout))
        }
        Err(e) => {
            tracing::info!(reason = %e, "no disk layout goes with the plan (only a receiver with --prepare needs one)");
            (vec![root.clone()], None, None)
        }
    };
    let opts = transfer::file::SendOptions {
        sources,
        map_to_root: true,
        base,
        layout,
        excludes: a.exclude.clone(),
        streams: a.streams.unwrap_or(transfer::file::STREAMS),
        sync: a.sync,
        task_id: a.task_id.clone().unwrap_or_else(|| "standalone".into()),
        peer_timeout: Duration::from_secs(a.peer_timeout),
        ..transfer::file::SendOptions::default()
    };
    if a.watch {
        return crate::watch::run(root, opts, signals, |o| {
            let label = if o.sync { "sync" } else { "copy" };
            file_pass(connector, control, summary, o, label)
        });
    }
    let label = if a.sync { "sync" } else { "copy" };
    file_pass(connector, control, summary, &opts, label)
}

/// One file pass with its progress line and its report.
fn file_pass(
    connector: &Connector,
    control: &Control,
    summary: &mut Summary,
    opts: &transfer::file::SendOptions,
    label: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (r, counters) = with_progress(label, |p| transfer::file::send(connector, opts, p, control));
    let secs = started.elapsed().as_secs_f64();
    match r {
        Ok(r) => {
            summary.file_pass(label, &r, secs);
            Ok(())
        }
        Err(e) => {
            let verdict = if control.cancelled() {
                "interrupted"
            } else {
                "failed"
            };
            summary.unfinished(label, 0, counters, verdict, secs);
            if control.cancelled() {
                summary.say(&format!(
                    "{label} stopped: {} of {} bytes covered, {} data sent ({} on the wire)",
                    counters.done, counters.total, counters.plain_sent, counters.wire_sent
                ));
            }
            Err(e.into())
        }
    }
}

/// `migrate --mode file --check DIR…`: the consistency check alone.
fn check_files(
    a: &MigrateArgs,
    root: &std::path::Path,
    connector: &Connector,
    control: &Control,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let canon = |p: &std::path::Path| {
        std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
    };
    let root = canon(root)?;
    let mut dirs = Vec::new();
    for d in &a.check {
        let c = canon(d)?;
        if !c.starts_with(&root) {
            return Err(BadConfig(format!(
                "--check {} is not inside --source-root {}",
                d.display(),
                root.display()
            ))
            .into());
        }
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
    let (checks, _) = with_progress("check", |p| {
        transfer::file::consistency(connector, &opts, p, control)
    });
    let checks = checks?;
    let mut differ = false;
    for c in &checks {
        summary.say(&format!(
            "check {}: {} files, {} different, {} missing on target, {} extra on target",
            c.dir_check,
            c.num_total_files,
            c.num_different_files,
            c.num_target_miss_files,
            c.num_target_more_files
        ));
        differ |= c.num_different_files + c.num_target_miss_files + c.num_target_more_files > 0;
    }
    summary.set("checks", serde_json::to_value(&checks)?);
    anyhow::ensure!(!differ, "the target differs from the source");
    Ok(())
}
