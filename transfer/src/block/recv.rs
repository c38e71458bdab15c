//! The target side of a block pass: checks the plan against the mapped disks, writes only
//! verified data inside them, answers sync hash requests, and checkpoints durably.

use crate::lock;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::ckpt::{self, Meta, Sample};
use super::map::{chunk_count, chunk_range, Bitmap};
use super::{leaf_hash, BlockError};
use crate::chunk::{ChunkError, Zstd};
use crate::code::Code;
use crate::file::direct::{aligned, Aligned, ALIGN};
use crate::session::{name_of, Incoming, Stream};
use crate::wire::{read_split, Message, Split, WireError, LEAF, MAX_CHUNK, MIN_BLOCK_CHUNK};

/// How long the data streams of a session may take to connect.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Most sync hash requests one stream may have outstanding (the sender keeps far fewer).
const MAX_OUTSTANDING: usize = 256;
/// Bytes of chunks a lease extension covers: each extension costs one checkpoint write, and
/// after a kill every chunk below the lease that is not done is hashed before it is resent.
const LEASE_BYTES: u64 = 256 << 20;
/// Done chunks sampled per disk at a checkpoint (the first and the last).
const SAMPLES_PER_DISK: usize = 2;
/// Disks sampled at a checkpoint.
const SAMPLED_DISKS: usize = 4;

/// One `--disk NAME=PATH` of the receiver.
#[derive(Debug, Clone)]
pub struct TargetMap {
    /// Target disk name (the task's `target_server.disks[].name`).
    pub name: String,
    /// Device or image file written.
    pub path: PathBuf,
}

/// How the receiver runs.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The disks it may write; nothing else is ever opened for writing.
    pub disks: Vec<TargetMap>,
    /// Where checkpoints live.
    pub state_dir: PathBuf,
    /// How long the sender may stay silent on any stream (zero:
    /// [`crate::session::PEER_TIMEOUT`]); it checkpoints every few seconds and streams data
    /// continuously, so only a dead or stopped sender reaches it.
    pub peer_timeout: Duration,
}

/// What a session did.
#[derive(Debug, Clone, Default)]
pub struct ReceiveReport {
    /// Task id.
    pub task_id: String,
    /// Pass.
    pub pass: u32,
    /// Whether the sender completed the pass.
    pub complete: bool,
    /// Chunks durable at the end.
    pub chunks_done: u64,
    /// Bytes written (data and zeroed ranges).
    pub bytes_written: u64,
    /// Chunks the sender resumed instead of sending (done before this session).
    pub chunks_resumed: u64,
    /// The sender announced another pass right after this one.
    pub more: bool,
    /// The pass ran as a sync because the targets held a complete copy already.
    pub upgraded: bool,
    /// Chunks an interrupted session may have written, offered for a hash compare.
    pub chunks_to_verify: u64,
}

struct Target {
    name: String,
    path: PathBuf,
    file: File,
    /// The same file opened `O_DIRECT` where it takes that, for the whole blocks: a page-cache
    /// write costs a copy and a page allocation per 4 KiB, most of a copy's CPU on a VM.
    direct: Option<File>,
    /// The plan's size: no write may pass it.
    size: u64,
    /// The device's or image's size when opened.
    capacity: u64,
}

impl Target {
    /// Writes `data` at `offset`: directly when both are whole blocks, else through the cache.
    fn write_at(&self, buf: &mut Aligned, data: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some(d) = &self.direct {
            // Refused (the device wants a larger alignment): the cached way for this piece.
            if aligned(offset)
                && data.len().is_multiple_of(ALIGN)
                && buf.write_direct(d, data, offset)?
            {
                return Ok(());
            }
        }
        self.file.write_all_at(data, offset)
    }

    /// Writes the first `len` bytes of `buf`'s slice at `offset`, directly from it when both
    /// are whole blocks (no copy), else through the cache.
    fn write_own(&self, buf: &mut Aligned, len: usize, offset: u64) -> std::io::Result<()> {
        if let Some(d) = &self.direct {
            if aligned(offset) && len.is_multiple_of(ALIGN) && buf.write_own(d, len, offset)? {
                return Ok(());
            }
        }
        self.file.write_all_at(buf.view(len), offset)
    }
}

/// What the checkpoint file holds besides the fixed part of its [`Meta`], under one lock so
/// that a lease extension and a checkpoint never overwrite each other's newer state.
struct Saved {
    /// The done maps as last made durable.
    durable: Vec<Bitmap>,
    /// The samples of that checkpoint.
    samples: Vec<Sample>,
    /// Per disk, the first chunk not yet leased for writing.
    lease: Vec<u64>,
}

struct Sess {
    targets: Vec<Target>,
    maps: Mutex<Vec<Bitmap>>,
    chunk: u64,
    sync: bool,
    /// Chunks an interrupted session of this pass may have written after its last
    /// checkpoint: the sender may ask for their hashes even in a full pass.
    verify: Vec<Bitmap>,
    failed: AtomicBool,
    error: Mutex<Option<BlockError>>,
    written: AtomicU64,
    /// Cuts the control stream, so a failed data stream ends the session at once.
    cut: Mutex<Option<std::net::TcpStream>>,
    /// The checkpoint file and the fixed part of what it records (its lease and samples are
    /// empty here: they change as the pass runs and live in `saved`).
    file: PathBuf,
    meta: Meta,
    saved: Mutex<Saved>,
    /// `saved.lease`, readable by the streams without the lock.
    lease: Vec<AtomicU64>,
    /// Chunks one lease extension covers.
    lease_step: u64,
}

impl Sess {
    fn fail(&self, e: BlockError) {
        self.failed.store(true, Ordering::SeqCst);
        if let Some(c) = lock(&self.cut).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let mut slot = lock(&self.error);
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Vec<Bitmap>> {
        lock(&self.maps)
    }

    fn saved(&self) -> std::sync::MutexGuard<'_, Saved> {
        lock(&self.saved)
    }

    /// fdatasync of every target, then the bitmap as it was before the sync is recorded,
    /// with samples of it read back from the targets.
    fn checkpoint(&self, complete: bool) -> Result<u64, BlockError> {
        let snapshot = self.maps().clone();
        for t in &self.targets {
            t.file
                .sync_data()
                .map_err(|e| target_err(t, Code::TransmissionFailed, e))?;
        }
        let samples = self.sample(&snapshot)?;
        let mut saved = self.saved();
        let meta = Meta {
            complete,
            lease: saved.lease.clone(),
            samples: samples.clone(),
            ..self.meta.clone()
        };
        ckpt::save(&self.file, &meta, &snapshot)?;
        let n = snapshot.iter().map(Bitmap::count).sum();
        saved.durable = snapshot;
        saved.samples = samples;
        Ok(n)
    }

    /// Hashes of the first and last done chunk of the first few disks, as the targets hold
    /// them now.
    fn sample(&self, maps: &[Bitmap]) -> Result<Vec<Sample>, BlockError> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for (d, (t, m)) in self
            .targets
            .iter()
            .zip(maps)
            .enumerate()
            .take(SAMPLED_DISKS)
        {
            let Some((lo, hi)) = m.ends() else { continue };
            let mut chunks = vec![lo, hi];
            chunks.dedup();
            for c in chunks.into_iter().take(SAMPLES_PER_DISK) {
                read_chunk(t, c, self.chunk, &mut buf)?;
                out.push(Sample {
                    disk: u16::try_from(d).unwrap_or(u16::MAX),
                    chunk: c,
                    hash: blake3::hash(&buf).to_hex().to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Makes sure chunk `chunk` of `disk` is below the recorded lease before it is written:
    /// a kill after the write then leaves the chunk among those hashed on resume, never
    /// among those sent blindly or trusted.
    fn cover(&self, disk: u16, chunk: u64) -> Result<(), BlockError> {
        let d = usize::from(disk);
        let Some(mark) = self.lease.get(d) else {
            return Ok(());
        };
        if chunk < mark.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut saved = self.saved();
        let Some(cur) = saved.lease.get(d).copied() else {
            return Ok(());
        };
        if chunk < cur {
            return Ok(());
        }
        let end = self
            .targets
            .get(d)
            .map_or(u64::MAX, |t| chunk_count(t.size, self.chunk));
        let new = chunk
            .saturating_add(self.lease_step)
            .min(end)
            .max(chunk + 1);
        saved.lease[d] = new;
        let meta = Meta {
            complete: false,
            lease: saved.lease.clone(),
            samples: saved.samples.clone(),
            ..self.meta.clone()
        };
        if let Err(e) = ckpt::save(&self.file, &meta, &saved.durable) {
            saved.lease[d] = cur;
            return Err(e.into());
        }
        mark.store(new, Ordering::Release);
        Ok(())
    }

    /// Whether the sender may ask for the target's hashes of this chunk.
    fn may_compare(&self, disk: u16, chunk: u64) -> bool {
        self.sync
            || self
                .verify
                .get(usize::from(disk))
                .is_some_and(|m| m.get(chunk))
    }

    /// The target of `disk` after checking that `[offset, offset+len)` lies inside one chunk
    /// of it: a frame never writes past the disk or across a chunk.
    fn range(&self, disk: u16, offset: u64, len: u64) -> Result<(&Target, u64), BlockError> {
        let t = self
            .targets
            .get(usize::from(disk))
            .ok_or_else(|| BlockError::Protocol(format!("disk index {disk} is not in the plan")))?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= t.size && len > 0)
            .ok_or_else(|| {
                BlockError::Protocol(format!(
                    "write of {len} bytes at {offset} is outside disk {} ({} bytes)",
                    t.name, t.size
                ))
            })?;
        let c = offset / self.chunk;
        if (end - 1) / self.chunk != c {
            return Err(BlockError::Protocol(format!(
                "write at {offset} of {len} bytes crosses a chunk boundary"
            )));
        }
        Ok((t, c))
    }

    fn chunk_of(&self, disk: u16, chunk: u64) -> Result<&Target, BlockError> {
        let t = self
            .targets
            .get(usize::from(disk))
            .ok_or_else(|| BlockError::Protocol(format!("disk index {disk} is not in the plan")))?;
        if chunk >= chunk_count(t.size, self.chunk) {
            return Err(BlockError::Protocol(format!(
                "chunk {chunk} is past the end of disk {}",
                t.name
            )));
        }
        Ok(t)
    }
}

fn target_err(t: &Target, code: Code, e: std::io::Error) -> BlockError {
    if crate::file::is_no_space(&e) {
        return no_space(t);
    }
    BlockError::Target {
        code,
        name: t.name.clone(),
        path: t.path.clone(),
        message: e.to_string(),
    }
}

/// The filesystem holding an image file is full (SMS.1504): how much more the image may
/// need (its unallocated part) and how much is free.
fn no_space(t: &Target) -> BlockError {
    use std::os::unix::fs::MetadataExt;
    let allocated = t
        .file
        .metadata()
        .map_or(0, |m| m.blocks().saturating_mul(512));
    let free = nix::sys::statvfs::fstatvfs(&t.file)
        .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
        .map_or_else(|_| "unknown".to_string(), |f| f.to_string());
    BlockError::Target {
        code: Code::DiskSizeMismatch,
        name: t.name.clone(),
        path: t.path.clone(),
        message: format!(
            "no space left on the filesystem holding it: the image of {} bytes has {allocated} allocated and may need up to {} more, {free} bytes are free; free some and run the pass again, it resumes",
            t.size,
            t.size.saturating_sub(allocated)
        ),
    }
}

/// Zeroes a range: a hole punched where the target supports it (image files, and block
/// devices that zero on discard), plain zeros otherwise.
fn zero_range(t: &Target, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let punched = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&t.file),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
        .is_ok(),
        _ => false,
    };
    if punched {
        return Ok(());
    }
    let zeros = vec![0u8; usize::try_from(len.min(MAX_CHUNK as u64)).unwrap_or(MAX_CHUNK)];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64);
        t.file
            .write_all_at(&zeros[..usize::try_from(n).unwrap_or(0)], at)?;
        at += n;
    }
    Ok(())
}

/// Whether `dev` (or one of its partitions) is mounted: writing under a mounted filesystem
/// would corrupt it.
fn mounted(dev: &Path) -> Option<String> {
    let canon = std::fs::canonicalize(dev).ok()?;
    let canon = canon.to_str()?.to_string();
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|src| {
            src.starts_with('/')
                && std::fs::canonicalize(src)
                    .ok()
                    .and_then(|p| p.to_str().map(str::to_string))
                    .is_some_and(|p| {
                        p == canon
                            || (p.starts_with(&canon)
                                && p[canon.len()..]
                                    .trim_start_matches('p')
                                    .chars()
                                    .all(|c| c.is_ascii_digit()))
                    })
        })
        .map(str::to_string)
}

/// The most bytes a plan may announce for one disk at `chunk`-byte chunks: its done map (a
/// bit per chunk) must fit one `DoneMap` frame, and the receiver holds it in memory.
fn max_disk_bytes(chunk: u64) -> u64 {
    (MAX_CHUNK as u64).saturating_mul(8).saturating_mul(chunk)
}

/// Checks every disk of a plan against its mapping and its target, before anything is opened
/// for writing, created or allocated: the sizes are the peer's word. Returns each disk's
/// mapping and size, in plan order.
fn check_plan<'a>(
    disks: &[(String, u64)],
    chunk: u64,
    opts: &'a ReceiveOptions,
) -> Result<Vec<(&'a TargetMap, u64)>, BlockError> {
    let mut checked: Vec<(&TargetMap, u64)> = Vec::new();
    for (name, size) in disks {
        let m = opts
            .disks
            .iter()
            .find(|m| &m.name == name)
            .ok_or_else(|| BlockError::Target {
                code: Code::TooFewTargetDisks,
                name: name.clone(),
                path: PathBuf::new(),
                message: "not mapped on the target (receive --disk NAME=PATH)".into(),
            })?;
        if checked.iter().any(|(t, _)| t.name == *name) {
            return Err(BlockError::Protocol(format!(
                "disk {name} twice in the plan"
            )));
        }
        check_size(m, *size, chunk)?;
        checked.push((m, *size));
    }
    Ok(checked)
}

/// Refuses (SMS.1504) an announced size of zero, one past what a done map covers, past the
/// size of an existing device or image, or past the filesystem that holds (or would hold) an
/// image file: a sparse image the size of the peer's choosing would be created otherwise.
fn check_size(m: &TargetMap, size: u64, chunk: u64) -> Result<(), BlockError> {
    let err = |code, message: String| BlockError::Target {
        code,
        name: m.name.clone(),
        path: m.path.clone(),
        message,
    };
    let refuse = |limit: String| {
        err(
            Code::DiskSizeMismatch,
            format!("the plan announces {size} bytes for it, but {limit}"),
        )
    };
    if size == 0 {
        return Err(refuse("a disk has at least one byte".into()));
    }
    let cap = max_disk_bytes(chunk);
    if size > cap {
        return Err(refuse(format!(
            "at most {cap} bytes fit a done map at {chunk}-byte chunks"
        )));
    }
    // The filesystem's size bounds an image: a sparse file larger than it is no disk.
    let fs_limit = |on: &Path| -> Result<(), BlockError> {
        let st = nix::sys::statvfs::statvfs(on).map_err(|e| {
            err(
                Code::TransmissionFailed,
                format!("cannot stat the filesystem of {}: {e}", on.display()),
            )
        })?;
        let total = st.blocks().saturating_mul(st.fragment_size());
        // Zero: the filesystem reports no size (an unlimited tmpfs); the cap above holds.
        if total > 0 && size > total {
            return Err(refuse(format!(
                "the filesystem holding the image has {total} bytes"
            )));
        }
        Ok(())
    };
    match std::fs::metadata(&m.path) {
        Ok(md) if md.file_type().is_block_device() => {
            let have = File::open(&m.path)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .map_err(|e| {
                    err(
                        Code::TransmissionFailed,
                        format!("cannot read the device's size: {e}"),
                    )
                })?;
            if size > have {
                return Err(refuse(format!("the device has {have} bytes")));
            }
            Ok(())
        }
        Ok(md) if md.is_file() => {
            if size > md.len() {
                return Err(refuse(format!("the image file has {} bytes", md.len())));
            }
            fs_limit(&m.path)
        }
        Ok(_) => Err(err(
            Code::TransmissionFailed,
            "neither a block device nor a regular file".into(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match m.path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            fs_limit(dir)
        }
        Err(e) => Err(err(Code::TransmissionFailed, format!("cannot stat: {e}"))),
    }
}

/// Opens (or creates, for an image file) the target of one plan disk and checks its size.
fn open_target(m: &TargetMap, size: u64) -> Result<Target, BlockError> {
    let err = |code, message: String| BlockError::Target {
        code,
        name: m.name.clone(),
        path: m.path.clone(),
        message,
    };
    let existed = m.path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!existed)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open(&m.path)
        .map_err(|e| err(Code::TransmissionFailed, format!("cannot open: {e}")))?;
    let ft = file
        .metadata()
        .map_err(|e| err(Code::TransmissionFailed, e.to_string()))?
        .file_type();
    let is_dev = ft.is_block_device();
    if !is_dev && !ft.is_file() {
        return Err(err(
            Code::TransmissionFailed,
            "neither a block device nor a regular file".into(),
        ));
    }
    if is_dev {
        if let Some(src) = mounted(&m.path) {
            return Err(err(
                Code::DiskAbnormal,
                format!("{src} is mounted; refusing to write under a mounted filesystem"),
            ));
        }
    }
    if !existed {
        if let Err(e) = file.set_len(size) {
            // Nothing of a refused plan stays behind.
            let _ = std::fs::remove_file(&m.path);
            return Err(err(
                Code::TransmissionFailed,
                format!("cannot size the image: {e}"),
            ));
        }
    }
    let mut f = &file;
    let have = f
        .seek(SeekFrom::End(0))
        .map_err(|e| err(Code::TransmissionFailed, e.to_string()))?;
    if have < size {
        return Err(err(
            Code::DiskSizeMismatch,
            format!("it has {have} bytes, less than the source disk's {size}"),
        ));
    }
    // Through /proc/self/fd: the very file checked above, whatever happened to the path.
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok();
    Ok(Target {
        name: m.name.clone(),
        path: m.path.clone(),
        file,
        direct,
        size,
        capacity: have,
    })
}

/// Serves one block session.
pub fn receive(inc: Incoming, opts: &ReceiveOptions) -> Result<ReceiveReport, BlockError> {
    let Incoming {
        task_id,
        streams,
        mut control,
        data,
        ..
    } = inc;
    let timeout = crate::session::peer_timeout(opts.peer_timeout);
    control.set_timeouts(timeout);
    let plan = control.recv()?;
    let Message::DiskPlan {
        pass,
        sync,
        more,
        chunk_size,
        disks,
    } = plan
    else {
        control.send_error(&Code::TransmissionFailed, "expected DiskPlan");
        return Err(BlockError::Protocol(format!(
            "expected DiskPlan, got {}",
            name_of(&plan)
        )));
    };
    let prepared = prepare(&task_id, pass, sync, chunk_size, &disks, opts);
    let (sess, p) = match prepared {
        Ok(p) => p,
        Err(e) => {
            control.send_error(&e.code(), &e.to_string());
            return Err(e);
        }
    };
    tracing::info!(
        task_id = %task_id,
        pass,
        sync = sess.sync,
        upgraded = sess.sync && !sync,
        held = ?p.held,
        disks = disks.len(),
        resumed_chunks = p.resumed,
        chunks_to_verify = p.to_verify,
        "block pass accepted"
    );
    control.send(&Message::Accepted {
        sync: sess.sync,
        held: p.held,
    })?;
    {
        let maps = sess.maps();
        for (i, m) in maps.iter().enumerate() {
            control.send(&Message::DoneMap {
                disk: u16::try_from(i).unwrap_or(u16::MAX),
                bits: m.as_bytes().to_vec(),
            })?;
        }
    }
    for (i, m) in sess.verify.iter().enumerate() {
        control.send(&Message::VerifyMap {
            disk: u16::try_from(i).unwrap_or(u16::MAX),
            bits: m.as_bytes().to_vec(),
        })?;
    }
    control.send(&Message::Ready)?;
    control.flush()?;

    *lock(&sess.cut) = control.cutter();
    let mut workers = Vec::new();
    let mut spawn_error = None;
    for _ in 0..streams {
        let Ok(s) = data.recv_timeout(JOIN_TIMEOUT) else {
            break;
        };
        let worker = Arc::clone(&sess);
        let spawned = std::thread::Builder::new()
            .name("sms-block-data".into())
            .spawn(move || {
                if let Err(e) = serve_stream(s, &worker, timeout) {
                    tracing::warn!(error = %e, "data stream failed");
                    worker.fail(e);
                }
            });
        match spawned {
            Ok(w) => workers.push(w),
            Err(source) => {
                spawn_error = Some(BlockError::Spawn {
                    what: "a data stream",
                    source,
                });
                break;
            }
        }
    }
    let complete = if let Some(e) = spawn_error {
        tracing::warn!(task_id = %task_id, error = %e, "block session refused");
        control.send_error(&e.code(), &e.to_string());
        sess.fail(e);
        false
    } else if workers.len() == usize::from(streams) {
        control_loop(&mut control, &sess)
    } else {
        let e = BlockError::Protocol(format!(
            "only {} of {streams} data streams connected",
            workers.len()
        ));
        control.send_error(&Code::TransmissionFailed, &e.to_string());
        sess.fail(e);
        false
    };
    for w in workers {
        let _ = w.join();
    }
    // Whatever arrived is made durable and recorded, complete or not.
    let failed = sess.failed.load(Ordering::SeqCst);
    let complete = complete && !failed;
    let done = sess.checkpoint(complete)?;
    if complete {
        let _ = control.send(&Message::Bye);
        let _ = control.flush();
        control.close();
    }
    let report = ReceiveReport {
        task_id,
        pass,
        complete,
        chunks_done: done,
        bytes_written: sess.written.load(Ordering::Relaxed),
        chunks_resumed: p.resumed,
        more,
        upgraded: sess.sync && !sync,
        chunks_to_verify: p.to_verify,
    };
    let err = lock(&sess.error).take();
    match err {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// What `prepare` found in the old checkpoint.
struct Prior {
    /// Chunks resumed as done.
    resumed: u64,
    /// Chunks offered for a hash compare.
    to_verify: u64,
    /// Last complete pass on these targets.
    held: Option<u32>,
}

/// Identity of a target that does not survive its replacement: for an image file its inode
/// with birth time and generation (a file deleted and created again can get the same inode
/// number), for a device its number and size (samples of its content are checked on resume).
fn identity(t: &Target) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = t.file.metadata() else {
        return format!("unknown:{}", t.path.display());
    };
    if m.file_type().is_block_device() {
        return format!("dev:{}:{}:{}", t.path.display(), m.rdev(), t.capacity);
    }
    let born = m
        .created()
        .ok()
        .and_then(|b| b.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(|| "-".to_string(), |d| d.as_nanos().to_string());
    let generation =
        super::dev::generation(&t.file).map_or_else(|| "-".to_string(), |g| g.to_string());
    format!(
        "file:{}:{}:{}:{born}:{generation}",
        t.path.display(),
        m.dev(),
        m.ino()
    )
}

/// Whether every sample of a checkpoint still hashes as recorded.
fn samples_hold(targets: &[Target], chunk: u64, samples: &[Sample]) -> bool {
    let mut buf = Vec::new();
    samples.iter().all(|s| {
        let Some(t) = targets.get(usize::from(s.disk)) else {
            return false;
        };
        if s.chunk >= chunk_count(t.size, chunk) {
            return false;
        }
        read_chunk(t, s.chunk, chunk, &mut buf).is_ok()
            && blake3::hash(&buf).to_hex().as_str() == s.hash
    })
}

fn prepare(
    task_id: &str,
    pass: u32,
    sync: bool,
    chunk_size: u32,
    disks: &[(String, u64)],
    opts: &ReceiveOptions,
) -> Result<(Arc<Sess>, Prior), BlockError> {
    if !chunk_size.is_power_of_two()
        || !(MIN_BLOCK_CHUNK..=u32::try_from(MAX_CHUNK).unwrap_or(u32::MAX)).contains(&chunk_size)
    {
        return Err(BlockError::Protocol(format!(
            "chunk size {chunk_size} is not a power of two between {MIN_BLOCK_CHUNK} and {MAX_CHUNK}"
        )));
    }
    if disks.is_empty() {
        return Err(BlockError::Protocol("the plan has no disks".into()));
    }
    let mut targets = Vec::new();
    for (m, size) in check_plan(disks, u64::from(chunk_size), opts)? {
        targets.push(open_target(m, size)?);
    }
    let chunk = u64::from(chunk_size);
    let counts: Vec<u64> = disks.iter().map(|(_, s)| chunk_count(*s, chunk)).collect();
    let mut meta = Meta {
        targets: targets.iter().map(identity).collect(),
        task_id: task_id.to_string(),
        pass,
        sync,
        chunk_size,
        disks: disks.to_vec(),
        complete: false,
        held: None,
        lease: vec![0; disks.len()],
        samples: Vec::new(),
    };
    let file = ckpt::path(&opts.state_dir, task_id);
    let old = match ckpt::load(&file) {
        Ok(old) => old,
        Err(e) => {
            tracing::warn!(error = %e, "starting the pass afresh");
            None
        }
    };
    let fresh = || -> Result<Vec<Bitmap>, BlockError> {
        targets.iter().map(|t| done_map(t, chunk)).collect()
    };
    let mut maps = fresh()?;
    let mut verify = fresh()?;
    if let Some((old, old_maps)) = old.filter(|(o, _)| o.same_migration(&meta)) {
        // A pass that completed is never resumed: a later full pass over a complete copy
        // runs as a sync, which compares every chunk instead of trusting it.
        meta.held = if old.complete {
            Some(old.pass)
        } else {
            old.held
        };
        meta.sync = sync || meta.held.is_some();
        let same_pass = !old.complete && old.pass == pass && old.sync == meta.sync;
        if same_pass && samples_hold(&targets, chunk, &old.samples) {
            // Leases of an old format are unknown: every chunk not done may have been written.
            let lease = if old.lease.len() == counts.len() {
                old.lease.clone()
            } else {
                counts.clone()
            };
            for (d, v) in verify.iter_mut().enumerate() {
                for c in 0..lease[d].min(counts[d]) {
                    if !old_maps[d].get(c) {
                        v.set(c);
                    }
                }
            }
            maps = old_maps;
            meta.lease = lease;
            // Still true (just checked): a lease saved before this session's first checkpoint
            // must not drop them.
            meta.samples = old.samples.clone();
        } else if same_pass {
            tracing::warn!(task_id = %task_id, pass, "the targets changed since the checkpoint (a sampled chunk differs); starting the pass afresh");
            meta.held = None;
            meta.sync = sync;
        }
    }
    let prior = Prior {
        resumed: maps.iter().map(Bitmap::count).sum(),
        to_verify: verify.iter().map(Bitmap::count).sum(),
        held: meta.held,
    };
    let lease_step = (LEASE_BYTES / chunk).max(16);
    let durable = maps.clone();
    let (lease, samples) = (
        std::mem::take(&mut meta.lease),
        std::mem::take(&mut meta.samples),
    );
    Ok((
        Arc::new(Sess {
            targets,
            maps: Mutex::new(maps),
            chunk,
            sync: meta.sync,
            verify,
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            written: AtomicU64::new(0),
            cut: Mutex::new(None),
            file,
            lease: lease.iter().map(|&l| AtomicU64::new(l)).collect(),
            saved: Mutex::new(Saved {
                durable,
                samples,
                lease,
            }),
            meta,
            lease_step,
        }),
        prior,
    ))
}

/// An empty done map for `t`, refused (SMS.1504) rather than aborting when there is no memory
/// for it.
fn done_map(t: &Target, chunk: u64) -> Result<Bitmap, BlockError> {
    let n = chunk_count(t.size, chunk);
    Bitmap::try_new(n).ok_or_else(|| BlockError::Target {
        code: Code::DiskSizeMismatch,
        name: t.name.clone(),
        path: t.path.clone(),
        message: format!(
            "no memory for the done map of {n} chunks its {} bytes need",
            t.size
        ),
    })
}

/// Checkpoints on request until the sender says the pass is over; returns whether it
/// completed it.
fn control_loop(control: &mut Stream, sess: &Sess) -> bool {
    loop {
        let m = match control.recv() {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(error = %e, "control stream ended");
                return false;
            }
        };
        match m {
            Message::Checkpoint { .. } => match sess.checkpoint(false) {
                Ok(n) => {
                    if sess.failed.load(Ordering::SeqCst) {
                        let msg = sess
                            .error
                            .lock()
                            .ok()
                            .and_then(|e| e.as_ref().map(|e| (e.code(), e.to_string())));
                        if let Some((code, text)) = msg {
                            control.send_error(&code, &text);
                        }
                        return false;
                    }
                    if control
                        .send(&Message::Ack { upto: n })
                        .and_then(|()| control.flush())
                        .is_err()
                    {
                        return false;
                    }
                }
                Err(e) => {
                    control.send_error(&e.code(), &e.to_string());
                    sess.fail(e);
                    return false;
                }
            },
            Message::Bye => return true,
            Message::Error { code, message } => {
                tracing::info!(code = %code, message = %message, "the sender ended the pass");
                return false;
            }
            other => {
                let e = BlockError::Protocol(format!(
                    "unexpected {} on the control stream",
                    name_of(&other)
                ));
                control.send_error(&Code::TransmissionFailed, &e.to_string());
                sess.fail(e);
                return false;
            }
        }
    }
}

/// What a stream remembers of a chunk whose sums it sent.
struct Pending {
    hash: [u8; 32],
    written: bool,
}

/// Serves one data stream; replies go through a writer thread so this reader never waits on
/// the peer reading (the sender bounds how many replies can pile up).
fn serve_stream(s: Stream, sess: &Sess, timeout: Duration) -> Result<(), BlockError> {
    s.set_timeouts(timeout);
    let (mut rd, mut wr) = s.into_halves();
    let (tx, rx) = mpsc::channel::<Message>();
    let spawned = std::thread::Builder::new()
        .name("sms-block-reply".into())
        .spawn(move || {
            while let Ok(m) = rx.recv() {
                let last = matches!(m, Message::Bye | Message::Error { .. });
                if m.write_to(&mut wr).is_err() {
                    return;
                }
                // Batch what is queued, then push it out.
                let mut more = true;
                while more {
                    match rx.try_recv() {
                        Ok(m) => {
                            if m.write_to(&mut wr).is_err() {
                                return;
                            }
                        }
                        Err(_) => more = false,
                    }
                }
                if wr.flush().is_err() || last {
                    let _ = wr.get_mut().close();
                    return;
                }
            }
        });
    let writer = spawned.map_err(|source| BlockError::Spawn {
        what: "a data stream's replies",
        source,
    })?;
    let result = stream_loop(&mut rd, &tx, sess);
    if let Err(e) = &result {
        let _ = tx.send(Message::Error {
            code: e.code().to_string(),
            message: e.to_string().chars().take(1000).collect(),
        });
    }
    drop(tx);
    let _ = writer.join();
    result
}

fn stream_loop(
    rd: &mut impl std::io::Read,
    tx: &mpsc::Sender<Message>,
    sess: &Sess,
) -> Result<(), BlockError> {
    let mut pending: HashMap<(u16, u64), Pending> = HashMap::new();
    let mut buf = Vec::new();
    let mut aligned = Aligned::default();
    let mut zstd = Zstd::default();
    loop {
        if sess.failed.load(Ordering::Relaxed) {
            return Ok(());
        }
        // A chunk's data is read straight into the aligned buffer it is written from: one
        // copy out of TLS, one hash, no copy before an O_DIRECT write.
        let m = match read_split(rd)? {
            Split::Other(m) => m,
            Split::Chunk(h) => {
                let (disk, offset, len) = (h.disk, h.offset, h.len);
                let (t, c) = sess.range(disk, offset, u64::from(len))?;
                sess.cover(disk, c)?;
                let raw = &mut aligned.get(h.data_len)[..h.data_len];
                rd.read_exact(raw)
                    .map_err(|e| WireError::Io(e.to_string()))?;
                let bad = |e: ChunkError| BlockError::Protocol(e.to_string());
                let written = if h.compressed {
                    // Decompression is capped at the declared length, itself capped by
                    // MAX_CHUNK on decode.
                    let plain = zstd
                        .expand(raw, len as usize)
                        .ok_or(ChunkError::Decompress(offset))
                        .map_err(bad)?;
                    if blake3::hash(&plain).as_bytes() != &h.hash {
                        return Err(bad(ChunkError::Hash(offset)));
                    }
                    t.write_at(&mut aligned, &plain, offset)
                } else {
                    if blake3::hash(raw).as_bytes() != &h.hash {
                        return Err(bad(ChunkError::Hash(offset)));
                    }
                    t.write_own(&mut aligned, len as usize, offset)
                };
                written.map_err(|e| target_err(t, Code::TransmissionFailed, e))?;
                sess.written.fetch_add(u64::from(len), Ordering::Relaxed);
                if let Some(p) = pending.get_mut(&(disk, c)) {
                    p.written = true;
                }
                continue;
            }
        };
        match m {
            Message::Zero { disk, offset, len } => {
                let (t, c) = sess.range(disk, offset, u64::from(len))?;
                sess.cover(disk, c)?;
                zero_range(t, offset, u64::from(len))
                    .map_err(|e| target_err(t, Code::TransmissionFailed, e))?;
                sess.written.fetch_add(u64::from(len), Ordering::Relaxed);
                if let Some(p) = pending.get_mut(&(disk, c)) {
                    p.written = true;
                }
            }
            Message::Done { disk, chunk, hash } => {
                let t = sess.chunk_of(disk, chunk)?;
                let ok = if hash == [0; 32] {
                    if sess.sync {
                        return Err(BlockError::Protocol(
                            "a sync pass must give each chunk's hash".into(),
                        ));
                    }
                    true
                } else {
                    match pending.remove(&(disk, chunk)) {
                        Some(p) if !p.written => p.hash == hash,
                        _ => {
                            read_chunk(t, chunk, sess.chunk, &mut buf)?;
                            *blake3::hash(&buf).as_bytes() == hash
                        }
                    }
                };
                if ok {
                    let mut maps = sess.maps();
                    if let Some(m) = maps.get_mut(usize::from(disk)) {
                        m.set(chunk);
                    }
                } else {
                    let _ = tx.send(Message::Mismatch { disk, chunk });
                }
            }
            Message::SumReq { disk, chunk } => {
                let t = sess.chunk_of(disk, chunk)?;
                if !sess.may_compare(disk, chunk) {
                    return Err(BlockError::Protocol(format!(
                        "SumReq for chunk {chunk} of disk {disk} outside a sync pass"
                    )));
                }
                if pending.len() >= MAX_OUTSTANDING {
                    return Err(BlockError::Protocol(format!(
                        "more than {MAX_OUTSTANDING} hash requests outstanding"
                    )));
                }
                read_chunk(t, chunk, sess.chunk, &mut buf)?;
                let hash = *blake3::hash(&buf).as_bytes();
                let leaves = buf.chunks(LEAF).map(leaf_hash).collect();
                pending.insert(
                    (disk, chunk),
                    Pending {
                        hash,
                        written: false,
                    },
                );
                let _ = tx.send(Message::Sums {
                    disk,
                    chunk,
                    hash,
                    leaves,
                });
            }
            Message::Checkpoint { seq } => {
                // A barrier: everything before it on this stream has been processed.
                let _ = tx.send(Message::Ack { upto: seq });
            }
            Message::Bye => {
                let _ = tx.send(Message::Bye);
                return Ok(());
            }
            Message::Error { code, message } => {
                return Err(BlockError::Remote { code, message });
            }
            other => {
                return Err(BlockError::Protocol(format!(
                    "unexpected {} on a data stream",
                    name_of(&other)
                )))
            }
        }
    }
}

fn read_chunk(t: &Target, chunk: u64, size: u64, buf: &mut Vec<u8>) -> Result<(), BlockError> {
    let r = chunk_range(chunk, size, t.size);
    buf.resize(usize::try_from(r.end - r.start).unwrap_or(0), 0);
    t.file
        .read_exact_at(buf, r.start)
        .map_err(|e| target_err(t, Code::TransmissionFailed, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_blocks_go_direct_and_the_rest_through_the_cache_with_the_same_result() {
        let d = tempfile::tempdir().unwrap();
        let m = TargetMap {
            name: "disk0".into(),
            path: d.path().join("disk0.img"),
        };
        let t = open_target(&m, 1 << 20).unwrap();
        // Where the temp dir's filesystem refuses O_DIRECT this checks the cached way alone.
        eprintln!("direct: {}", t.direct.is_some());
        let mut buf = Aligned::default();
        let a: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let b = vec![7u8; 100];
        t.write_at(&mut buf, &a, 4096).unwrap();
        t.write_at(&mut buf, &b, 4096 + 10).unwrap();
        t.write_at(&mut buf, &a[..4096], 1 << 19).unwrap();
        let mut want = vec![0u8; 1 << 20];
        want[4096..4096 + 8192].copy_from_slice(&a);
        want[4106..4206].copy_from_slice(&b);
        want[1 << 19..(1 << 19) + 4096].copy_from_slice(&a[..4096]);
        assert_eq!(std::fs::read(&m.path).unwrap(), want);
    }
}
