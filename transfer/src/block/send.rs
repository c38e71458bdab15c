//! The source side of a block pass: N streams share the chunks that hold used bytes; a full
//! pass sends their data, a sync pass only the leaves whose hashes differ from the target's.

use crate::lock;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use super::map::{chunk_count, chunk_range, done_bytes, normalize, Bitmap, DiskItems, Item};
use super::{is_zero, leaf_hash, BlockError, SourceDisk, DEFAULT_CHUNK};
use crate::chunk::Compressor;
use crate::code::Code;
use crate::file::direct::{aligned, is_einval, Aligned, ALIGN};
use crate::session::{name_of, Connector, Stream};
use crate::task::{Control, Progress};
use crate::wire::{Message, Mode, LEAF};

/// Outstanding sync hash requests per stream: enough to hide a round trip at disk speed,
/// few enough that the receiver's queued answers stay small.
const SYNC_WINDOW: usize = 16;
/// Zero runs at least this long travel as `Zero` frames; shorter ones ride along with the
/// data (zstd shrinks them to nothing) instead of costing a frame each.
const MIN_ZERO_RUN: usize = 32 << 10;
/// How often a chunk may fail the receiver's check before the pass fails.
const MAX_RESENDS: u32 = 3;
/// How many peer timeouts the sender waits for the receiver to take up its plan: a
/// standalone receiver serves one session at a time, and the one before may need a timeout to
/// notice that its own sender is gone, and a few seconds more to record what it received.
const PLAN_WAIT_TIMEOUTS: u32 = 2;

/// How a pass runs.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Task id (the receiver's checkpoint is kept per task).
    pub task_id: String,
    /// Pass number: 0 for the full copy, then one more per sync pass.
    pub pass: u32,
    /// Compare hashes and send only differences.
    pub sync: bool,
    /// Another pass follows right after this one.
    pub more: bool,
    /// Parallel data streams.
    pub streams: u16,
    /// Chunk size (power of two).
    pub chunk_size: u32,
    /// How often the receiver is asked to make data durable.
    pub checkpoint_every: Duration,
    /// How long the receiver may stay silent or take no data on any stream, checkpoint
    /// acknowledgements included (zero: [`crate::session::PEER_TIMEOUT`]).
    pub peer_timeout: Duration,
}

/// Data streams of a block pass unless told otherwise: enough for wire speed on big chunks.
pub const STREAMS: u16 = 4;

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            task_id: String::new(),
            pass: 0,
            sync: false,
            more: false,
            streams: STREAMS,
            chunk_size: DEFAULT_CHUNK,
            checkpoint_every: Duration::from_secs(2),
            peer_timeout: crate::session::PEER_TIMEOUT,
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct PassReport {
    /// Chunks with used bytes.
    pub chunks: u64,
    /// Of those, already on the target when the pass started.
    pub chunks_resumed: u64,
    /// Used bytes of the pass.
    pub used_bytes: u64,
    /// Bytes read from the source disks.
    pub bytes_read: u64,
    /// Data bytes sent, before compression.
    pub plain_sent: u64,
    /// Data bytes on the wire, after compression.
    pub wire_sent: u64,
    /// Bytes sent as zero runs (no data).
    pub zero_bytes: u64,
    /// Chunks the receiver found different after they were sent, and got again.
    pub resent: u64,
    /// Chunks compared by hash before sending because an interrupted session may have
    /// written them after its last checkpoint.
    pub verified: u64,
    /// The receiver turned the full pass into a sync: the targets held a complete copy.
    pub upgraded: bool,
    /// The last pass the receiver recorded as complete on its targets.
    pub held: Option<u32>,
    /// Wall time.
    pub elapsed: Duration,
}

struct Disk {
    file: File,
    /// The same device opened `O_DIRECT` where it takes that: whole blocks are read past the
    /// page cache, without the kernel's copy and page allocation per 4 KiB (and, unlike a
    /// cached read, never from stale pages: a direct read writes back dirty ones first).
    direct: Option<File>,
    path: PathBuf,
    size: u64,
    used: Vec<Range<u64>>,
    /// The device's cache could not be invalidated at the pass start: drop each chunk's pages
    /// before reading it instead (costlier: it throws away the kernel's readahead).
    drop_before_read: bool,
}

/// State shared by the streams of one pass.
struct Ctx<'a> {
    task_id: String,
    disks: Vec<Disk>,
    chunk: u64,
    sync: bool,
    /// Per disk, chunks to compare by hash even in a full pass (the receiver's `VerifyMap`).
    verify: Vec<Bitmap>,
    verified: AtomicU64,
    work: Mutex<Work>,
    progress: &'a Progress,
    control: &'a Control,
    abort: AtomicBool,
    error: Mutex<Option<BlockError>>,
    sent_items: AtomicU64,
    bytes_read: AtomicU64,
    zero_bytes: AtomicU64,
    resent: AtomicU64,
}

/// The items still to hand out, disk after disk, skipping those already done.
struct Work {
    disk: usize,
    /// Per disk: (used range index, next chunk) of its walk.
    pos: Vec<(usize, u64)>,
    done: Vec<Bitmap>,
}

impl Ctx<'_> {
    fn fail(&self, e: BlockError) {
        self.abort.store(true, Ordering::SeqCst);
        let mut slot = lock(&self.error);
        // The receiver's own specific reason (a full disk, say) beats the broken streams it
        // leaves; transport failures (SMS.1908), from either side, are all alike.
        let specific = |e: &BlockError| matches!(e, BlockError::Remote { code, .. } if Code::parse(code) != Code::TransmissionFailed);
        if slot.is_none() || (specific(&e) && !slot.as_ref().is_some_and(specific)) {
            *slot = Some(e);
        }
    }

    /// Whether an item goes by hash compare (`SumReq`) rather than as a whole.
    fn compares(&self, item: &Item) -> bool {
        self.sync
            || self
                .verify
                .get(usize::from(item.disk))
                .is_some_and(|m| m.get(item.chunk))
    }

    fn stopped(&self) -> bool {
        self.abort.load(Ordering::Relaxed) || self.control.cancelled()
    }

    /// The next item of work, or `None` when all are handed out.
    fn next(&self) -> Option<Item> {
        let mut w = lock(&self.work);
        while let Some(disk) = self.disks.get(w.disk) {
            let d = w.disk;
            let (at, next_chunk) = w.pos[d];
            let mut it = DiskItems::resume(
                u16::try_from(d).unwrap_or(u16::MAX),
                self.chunk,
                disk.size,
                &disk.used,
                at,
                next_chunk,
            );
            let found = it.by_ref().find(|item| !w.done[d].get(item.chunk));
            w.pos[d] = it.position();
            if found.is_some() {
                return found;
            }
            w.disk += 1;
        }
        None
    }

    /// The item of a chunk (for a resend), rebuilt from the used ranges.
    fn item_for(&self, disk: u16, chunk: u64) -> Option<Item> {
        let d = self.disks.get(usize::from(disk))?;
        let start = chunk.saturating_mul(self.chunk);
        let first = d.used.partition_point(|r| r.end <= start);
        DiskItems::resume(disk, self.chunk, d.size, &d.used, first, chunk)
            .next()
            .filter(|i| i.chunk == chunk)
    }

    /// Reads the item's chunk into `buf` with every byte outside the used ranges zero: the
    /// view of the disk the target must end up with. Returns its length: the chunk is
    /// `buf.view(len)`.
    fn read_masked(&self, item: &Item, buf: &mut Aligned) -> Result<usize, BlockError> {
        let disk = &self.disks[usize::from(item.disk)];
        let cr = chunk_range(item.chunk, self.chunk, disk.size);
        let len = usize::try_from(cr.end - cr.start).unwrap_or(0);
        let out = &mut buf.get(len)[..len];
        let err = |e| BlockError::ReadDisk {
            path: disk.path.clone(),
            source: e,
        };
        // Only the gaps between used ranges are zeroed: the ranges are read over.
        let mut at = 0;
        let mut read = 0;
        let mut cached = false;
        for r in &item.ranges {
            let a = usize::try_from(r.start - cr.start).unwrap_or(0);
            let b = usize::try_from(r.end - cr.start).unwrap_or(0);
            if a < at || b > len || a > b {
                continue;
            }
            out[at..a].fill(0);
            at = b;
            let dst = &mut out[a..b];
            let direct = disk.direct.as_ref().filter(|_| {
                aligned(r.start) && (b - a).is_multiple_of(ALIGN) && a.is_multiple_of(ALIGN)
            });
            let done = match direct {
                Some(f) => match f.read_exact_at(dst, r.start) {
                    Ok(()) => true,
                    // The device wants a larger alignment: this piece goes the cached way.
                    Err(e) if is_einval(&e) => false,
                    Err(e) => return Err(err(e)),
                },
                None => false,
            };
            if !done {
                // A whole-disk device's page cache is not updated by writes through a mounted
                // partition's filesystem: pages cached before this pass (the last pass's
                // readahead, blkid) would be stale. The pass start invalidated them; where it
                // could not, they are dropped here so the read comes from the device.
                if disk.drop_before_read && !cached {
                    drop_cached(&disk.file, &cr);
                }
                cached = true;
                disk.file.read_exact_at(dst, r.start).map_err(err)?;
            }
            read += r.end - r.start;
        }
        out[at..].fill(0);
        // Migrating must not evict the source host's working set from its page cache.
        if cached {
            drop_cached(&disk.file, &cr);
        }
        self.bytes_read.fetch_add(read, Ordering::Relaxed);
        Ok(len)
    }
}

/// Drops the clean cached pages of `range` (advice only: failure costs cache, not correctness
/// for files, whose cache is coherent).
fn drop_cached(file: &File, range: &Range<u64>) {
    if let (Ok(o), Ok(l)) = (
        i64::try_from(range.start),
        i64::try_from(range.end - range.start),
    ) {
        let _ = nix::fcntl::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(file),
            o,
            l,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// Runs one pass against the target; returns when the receiver has acked every item durable.
pub fn send(
    connector: &Connector,
    disks: &[SourceDisk],
    opts: &SendOptions,
    progress: &Progress,
    control: &Control,
) -> Result<PassReport, BlockError> {
    let started = Instant::now();
    let chunk = u64::from(opts.chunk_size);
    let streams = opts.streams.max(1);
    let open = open_disks(disks)?;
    let (mut ctl, session) = connector.open(&opts.task_id, Mode::Block, 0, streams, 0)?;
    let timeout = crate::session::peer_timeout(opts.peer_timeout);
    let (sync, held) = propose(&mut ctl, connector, disks, &open, opts, timeout)?;
    let upgraded = sync && !opts.sync;
    if upgraded {
        tracing::info!(
            task_id = %opts.task_id,
            held = ?held,
            "the target holds a complete copy of this migration; this pass compares every chunk and sends only what differs"
        );
        progress.note(format!(
            "the target holds a complete copy (pass {}): verifying it instead of copying again",
            held.map_or_else(|| "?".to_string(), |p| p.to_string())
        ));
    }
    let done = read_maps(&mut ctl, &open, chunk, "DoneMap")?;
    let verify = read_maps(&mut ctl, &open, chunk, "VerifyMap")?;
    ctl.set_timeouts(timeout);
    expect(&mut ctl, &Message::Ready)?;
    let mut report = PassReport {
        upgraded,
        held,
        ..PassReport::default()
    };
    count_chunks(&mut report, &open, &done, chunk);
    let resumed_bytes: u64 = open
        .iter()
        .zip(&done)
        .map(|(d, m)| done_bytes(&d.used, chunk, d.size, m))
        .sum();
    progress.total.store(report.used_bytes, Ordering::Relaxed);
    progress.done.store(resumed_bytes, Ordering::Relaxed);
    tracing::info!(
        task_id = %opts.task_id,
        pass = opts.pass,
        sync,
        chunks = report.chunks,
        resumed = report.chunks_resumed,
        to_verify = verify.iter().map(Bitmap::count).sum::<u64>(),
        used_bytes = report.used_bytes,
        "block pass started"
    );
    let n = open.len();
    let ctx = Ctx {
        disks: open,
        chunk,
        sync,
        verify,
        verified: AtomicU64::new(0),
        work: Mutex::new(Work {
            disk: 0,
            pos: vec![(0, 0); n],
            done,
        }),
        task_id: opts.task_id.clone(),
        progress,
        control,
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        sent_items: AtomicU64::new(report.chunks_resumed),
        bytes_read: AtomicU64::new(0),
        zero_bytes: AtomicU64::new(0),
        resent: AtomicU64::new(0),
    };
    let plain0 = Progress::get(&progress.plain_sent);
    let wire0 = Progress::get(&progress.wire_sent);
    let data = DataPhase {
        connector,
        ctx: &ctx,
        streams,
        session,
        timeout,
    };
    let ctl_result = data.run(&mut ctl, opts.checkpoint_every);
    report.bytes_read = ctx.bytes_read.load(Ordering::Relaxed);
    report.zero_bytes = ctx.zero_bytes.load(Ordering::Relaxed);
    report.resent = ctx.resent.load(Ordering::Relaxed);
    report.verified = ctx.verified.load(Ordering::Relaxed);
    report.plain_sent = Progress::get(&progress.plain_sent) - plain0;
    report.wire_sent = Progress::get(&progress.wire_sent) - wire0;
    let err = lock(&ctx.error).take();
    if let Some(e) = err {
        return Err(e);
    }
    ctl_result?;
    if control.cancelled() {
        // What arrived is durable (the last checkpoint ran after the streams stopped).
        ctl.send_error(&Code::TaskPaused, "the pass was stopped");
        return Err(BlockError::Cancelled);
    }
    finish(ctl, &report, progress)?;
    report.elapsed = started.elapsed();
    tracing::info!(
        task_id = %opts.task_id,
        pass = opts.pass,
        bytes_read = report.bytes_read,
        wire_sent = report.wire_sent,
        resent = report.resent,
        secs = report.elapsed.as_secs_f64(),
        "block pass complete"
    );
    Ok(report)
}

/// Opens every source disk for reading, with its size and used ranges.
fn open_disks(disks: &[SourceDisk]) -> Result<Vec<Disk>, BlockError> {
    let mut open = Vec::new();
    for d in disks {
        let mut file = File::open(&d.path).map_err(|e| BlockError::ReadDisk {
            path: d.path.clone(),
            source: e,
        })?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| BlockError::ReadDisk {
                path: d.path.clone(),
                source: e,
            })?;
        let drop_before_read = !super::dev::flush_cache(&file);
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&d.path)
            .ok();
        open.push(Disk {
            drop_before_read,
            direct,
            file,
            path: d.path.clone(),
            size,
            used: normalize(d.used.clone(), size),
        });
    }
    Ok(open)
}

/// Sends the disk plan and waits for the target to take up the pass; returns whether it runs
/// as a sync and the last pass the target holds.
fn propose(
    ctl: &mut Stream,
    connector: &Connector,
    disks: &[SourceDisk],
    open: &[Disk],
    opts: &SendOptions,
    timeout: Duration,
) -> Result<(bool, Option<u32>), BlockError> {
    ctl.send(&Message::DiskPlan {
        pass: opts.pass,
        sync: opts.sync,
        more: opts.more,
        chunk_size: opts.chunk_size,
        disks: disks
            .iter()
            .zip(open)
            .map(|(d, o)| (d.name.clone(), o.size))
            .collect(),
    })?;
    ctl.flush()?;
    let plan_wait = timeout * PLAN_WAIT_TIMEOUTS;
    ctl.set_timeouts(plan_wait);
    let first = ctl.recv().map_err(|e| {
        BlockError::Protocol(format!(
            "the target {} did not take up the pass within {} s ({e}); it serves one session at a time, so another may still be running: run migrate again later",
            connector.addr,
            plan_wait.as_secs()
        ))
    })?;
    let (sync, held) = match first {
        Message::Accepted { sync, held } => (sync, held),
        Message::Error { code, message } => return Err(BlockError::Remote { code, message }),
        other => {
            return Err(BlockError::Protocol(format!(
                "expected Accepted, got {}",
                name_of(&other)
            )))
        }
    };
    if opts.sync && !sync {
        return Err(BlockError::Protocol(
            "the target would not run the sync pass as a sync".into(),
        ));
    }
    Ok((sync, held))
}

/// Reads the next message, which must be of `want`'s kind (`Ready`, `Bye`).
fn expect(ctl: &mut Stream, want: &Message) -> Result<(), BlockError> {
    match ctl.recv()? {
        m if std::mem::discriminant(&m) == std::mem::discriminant(want) => Ok(()),
        Message::Error { code, message } => Err(BlockError::Remote { code, message }),
        other => Err(BlockError::Protocol(format!(
            "expected {}, got {}",
            name_of(want),
            name_of(&other)
        ))),
    }
}

/// Counts the pass's chunks, their used bytes and those already done (a resume).
fn count_chunks(report: &mut PassReport, open: &[Disk], done: &[Bitmap], chunk: u64) {
    for (i, d) in open.iter().enumerate() {
        let items = DiskItems::new(0, chunk, d.size, &d.used);
        for it in items {
            report.chunks += 1;
            report.used_bytes += it.bytes();
            if done[i].get(it.chunk) {
                report.chunks_resumed += 1;
            }
        }
    }
}

/// The data streams of a pass, with the control stream taking checkpoints meanwhile.
struct DataPhase<'a> {
    connector: &'a Connector,
    ctx: &'a Ctx<'a>,
    streams: u16,
    session: u64,
    timeout: Duration,
}

impl DataPhase<'_> {
    /// Runs a worker per data stream until every item is sent; returns the control side's
    /// result (a failed stream leaves its error in the context).
    fn run(&self, ctl: &mut Stream, checkpoint_every: Duration) -> Result<(), BlockError> {
        let running = AtomicUsize::new(usize::from(self.streams));
        std::thread::scope(|scope| {
            for i in 1..=self.streams {
                let running = &running;
                scope.spawn(move || {
                    if let Err(e) = self.stream(i) {
                        tracing::warn!(stream = i, error = %e, "data stream failed");
                        self.ctx.fail(e);
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                });
            }
            checkpoints(ctl, self.ctx, &running, checkpoint_every)
        })
    }

    fn stream(&self, i: u16) -> Result<(), BlockError> {
        let (s, _) = self.connector.open(
            &self.ctx.task_id,
            Mode::Block,
            i,
            self.streams,
            self.session,
        )?;
        stream_worker(self.ctx, s, self.timeout)
    }
}

/// Ends the pass: every item must be durable on the target, then both sides say goodbye.
fn finish(mut ctl: Stream, report: &PassReport, progress: &Progress) -> Result<(), BlockError> {
    ctl.send(&Message::Checkpoint { seq: report.chunks })?;
    ctl.flush()?;
    let upto = expect_ack(&mut ctl)?;
    if upto < report.chunks {
        return Err(BlockError::Protocol(format!(
            "the target holds {upto} of {} chunks after the pass",
            report.chunks
        )));
    }
    progress.durable.store(report.used_bytes, Ordering::Relaxed);
    ctl.send(&Message::Bye)?;
    ctl.flush()?;
    expect(&mut ctl, &Message::Bye)?;
    ctl.close();
    Ok(())
}

/// Reads one map per disk (`DoneMap` or `VerifyMap`, as `what` says) in plan order.
fn read_maps(
    ctl: &mut Stream,
    disks: &[Disk],
    chunk: u64,
    what: &str,
) -> Result<Vec<Bitmap>, BlockError> {
    let mut maps = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let (disk, bits) = match ctl.recv()? {
            Message::DoneMap { disk, bits } if what == "DoneMap" => (disk, bits),
            Message::VerifyMap { disk, bits } if what == "VerifyMap" => (disk, bits),
            Message::Error { code, message } => return Err(BlockError::Remote { code, message }),
            other => {
                return Err(BlockError::Protocol(format!(
                    "expected {what}, got {}",
                    name_of(&other)
                )))
            }
        };
        if usize::from(disk) != i {
            return Err(BlockError::Protocol(format!(
                "{what} of disk {disk} where disk {i} was due"
            )));
        }
        let n = chunk_count(d.size, chunk);
        maps.push(Bitmap::from_bytes(bits, n).ok_or_else(|| {
            BlockError::Protocol(format!("{what} of disk {i} has the wrong length"))
        })?);
    }
    Ok(maps)
}

fn expect_ack(ctl: &mut Stream) -> Result<u64, BlockError> {
    match ctl.recv()? {
        Message::Ack { upto } => Ok(upto),
        Message::Error { code, message } => Err(BlockError::Remote { code, message }),
        other => Err(BlockError::Protocol(format!(
            "expected Ack, got {}",
            name_of(&other)
        ))),
    }
}

/// Asks for a checkpoint every `every` while the streams run, and once more after they end.
fn checkpoints(
    ctl: &mut Stream,
    ctx: &Ctx<'_>,
    running: &AtomicUsize,
    every: Duration,
) -> Result<(), BlockError> {
    let mut last = Instant::now();
    loop {
        let finished = running.load(Ordering::SeqCst) == 0;
        if finished || last.elapsed() >= every {
            last = Instant::now();
            let done_before = ctx.progress.done.load(Ordering::Relaxed);
            let r = ctl
                .send(&Message::Checkpoint {
                    seq: ctx.sent_items.load(Ordering::Relaxed),
                })
                .and_then(|()| ctl.flush())
                .map_err(BlockError::from)
                .and_then(|()| expect_ack(ctl));
            match r {
                Ok(_) => {
                    // Everything covered before the request is durable now.
                    ctx.progress.durable.store(done_before, Ordering::Relaxed);
                }
                Err(e) => {
                    ctx.fail(e);
                    // Let the streams see the abort and stop.
                    while running.load(Ordering::SeqCst) > 0 {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    return Ok(());
                }
            }
            if finished {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One data stream: sends items until none are left, then waits until the receiver has
/// processed (and checked) everything it sent.
fn stream_worker(ctx: &Ctx<'_>, s: Stream, timeout: Duration) -> Result<(), BlockError> {
    // Writes only: the reader thread blocks until the stream ends (the receiver says
    // nothing during a full pass), and replies are awaited with the timeout instead.
    s.set_write_timeout(Some(timeout));
    let peer = s.peer.clone();
    let (mut rd, wr) = s.into_halves();
    let (tx, rx) = mpsc::channel::<Message>();
    // Returns the receiver's own error, when it sent one.
    let reader = std::thread::spawn(move || loop {
        match Message::read_from(&mut rd) {
            Ok(m) => {
                let told = match &m {
                    Message::Error { code, message } => Some(BlockError::Remote {
                        code: code.clone(),
                        message: message.clone(),
                    }),
                    _ => None,
                };
                let end = told.is_some() || matches!(m, Message::Bye);
                if tx.send(m).is_err() || end {
                    return told;
                }
            }
            Err(e) => {
                let _ = tx.send(Message::Error {
                    code: Code::TransmissionFailed.to_string(),
                    message: format!("data stream: {e}"),
                });
                return None;
            }
        }
    });
    let mut out = Out {
        w: wr,
        comp: Compressor::default(),
    };
    let rx = Replies { rx, timeout, peer };
    let r = run_stream(ctx, &mut out, &rx);
    if r.is_err() {
        out.w.get_ref().abort();
    } else {
        let _ = out.w.get_mut().close();
    }
    let told = reader.join().ok().flatten();
    match (r, told) {
        // A write into a stream the receiver closed: its reason (a full disk, say) came
        // before, unread.
        (Err(BlockError::Wire(_) | BlockError::Session(_)), Some(remote)) => Err(remote),
        (r, _) => r,
    }
}

/// The receiver's replies on one data stream, as its reader thread passes them on.
struct Replies {
    rx: mpsc::Receiver<Message>,
    timeout: Duration,
    peer: String,
}

impl Replies {
    fn try_recv(&self) -> Result<Message, mpsc::TryRecvError> {
        self.rx.try_recv()
    }

    /// The next reply, waited for at most the peer timeout.
    fn recv(&self) -> Result<Message, BlockError> {
        self.rx.recv_timeout(self.timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                BlockError::Wire(crate::wire::WireError::Io(format!(
                    "the peer {} sent nothing on a data stream for {} s (peer timeout)",
                    self.peer,
                    self.timeout.as_secs()
                )))
            }
            mpsc::RecvTimeoutError::Disconnected => {
                BlockError::Protocol("the data stream closed".into())
            }
        })
    }
}

struct Out {
    w: std::io::BufWriter<crate::conn::ConnWriter>,
    comp: Compressor,
}

impl Out {
    fn send(&mut self, m: &Message) -> Result<(), BlockError> {
        Ok(m.write_to(&mut self.w)?)
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        use std::io::Write;
        self.w
            .flush()
            .map_err(|e| BlockError::Wire(crate::wire::WireError::Io(e.to_string())))
    }

    /// Sends `data` (at disk offset `at`) as zero runs and data frames.
    fn send_span(
        &mut self,
        ctx: &Ctx<'_>,
        disk: u16,
        at: u64,
        data: &[u8],
    ) -> Result<(), BlockError> {
        let mut i = 0;
        while i < data.len() {
            // Find the next long zero run; everything before it is one data frame.
            let (zs, ze) = next_zero_run(data, i);
            if zs > i {
                let wire = self
                    .comp
                    .write_chunk(&mut self.w, disk, at + i as u64, &data[i..zs])?
                    as u64;
                ctx.control.pace(wire);
                Progress::add(&ctx.progress.wire_sent, wire);
                Progress::add(&ctx.progress.plain_sent, (zs - i) as u64);
            }
            if ze > zs {
                self.send(&Message::Zero {
                    disk,
                    offset: at + zs as u64,
                    len: u32::try_from(ze - zs).unwrap_or(u32::MAX),
                })?;
                ctx.zero_bytes
                    .fetch_add((ze - zs) as u64, Ordering::Relaxed);
            }
            i = ze.max(zs);
        }
        Ok(())
    }
}

/// The first zero run of at least [`MIN_ZERO_RUN`] bytes at or after `from`, aligned to
/// leaves: (start, end); (len, len) when there is none. Short tails count as zero runs when
/// the whole rest is zero.
fn next_zero_run(data: &[u8], from: usize) -> (usize, usize) {
    let mut i = from;
    while i < data.len() {
        let leaf_end = (i - i % LEAF + LEAF).min(data.len());
        if is_zero(&data[i..leaf_end]) {
            let start = i;
            let mut end = leaf_end;
            while end < data.len() {
                let e = (end + LEAF).min(data.len());
                if !is_zero(&data[end..e]) {
                    break;
                }
                end = e;
            }
            if end - start >= MIN_ZERO_RUN || (end == data.len() && start == from) {
                return (start, end);
            }
            i = end;
        } else {
            i = leaf_end;
        }
    }
    (data.len(), data.len())
}

fn run_stream(ctx: &Ctx<'_>, out: &mut Out, rx: &Replies) -> Result<(), BlockError> {
    let mut buf = Aligned::default();
    let mut tries: HashMap<(u16, u64), u32> = HashMap::new();
    let mut pending: VecDeque<Item> = VecDeque::new();
    let mut exhausted = false;
    loop {
        // An error from the receiver stops the stream at once.
        while let Ok(m) = rx.try_recv() {
            handle_reply(ctx, out, m, &mut pending, &mut tries, &mut buf)?;
        }
        if ctx.stopped() {
            break;
        }
        // Items that go by hash compare keep a window of requests in flight; the others are
        // sent whole as they come.
        if !exhausted && pending.len() < SYNC_WINDOW {
            match ctx.next() {
                Some(item) if ctx.compares(&item) => {
                    if !ctx.sync {
                        ctx.verified.fetch_add(1, Ordering::Relaxed);
                    }
                    out.send(&Message::SumReq {
                        disk: item.disk,
                        chunk: item.chunk,
                    })?;
                    pending.push_back(item);
                }
                Some(item) => send_whole(ctx, out, &item, &mut buf)?,
                None => exhausted = true,
            }
            continue;
        }
        if pending.is_empty() {
            break;
        }
        out.flush()?;
        let m = rx.recv()?;
        handle_reply(ctx, out, m, &mut pending, &mut tries, &mut buf)?;
    }
    // Barrier: once the receiver acks it, every Done before it has been checked; repeat
    // while mismatches made us resend something.
    let mut seq = 0;
    // When stopping, no barrier: the receiver processes everything before Bye anyway.
    while !ctx.stopped() {
        seq += 1;
        out.send(&Message::Checkpoint { seq })?;
        out.flush()?;
        let before = ctx.resent.load(Ordering::Relaxed);
        loop {
            let m = rx.recv()?;
            if matches!(m, Message::Ack { upto } if upto == seq) {
                break;
            }
            handle_reply(ctx, out, m, &mut pending, &mut tries, &mut buf)?;
            out.flush()?;
        }
        if ctx.resent.load(Ordering::Relaxed) == before {
            break;
        }
    }
    out.send(&Message::Bye)?;
    out.flush()?;
    match rx.recv()? {
        Message::Bye => Ok(()),
        Message::Error { code, message } => Err(BlockError::Remote { code, message }),
        other => Err(BlockError::Protocol(format!(
            "expected Bye, got {}",
            name_of(&other)
        ))),
    }
}

/// Sends the used data of an item and its `Done` (no hash: the frames carry their own).
fn send_whole(
    ctx: &Ctx<'_>,
    out: &mut Out,
    item: &Item,
    buf: &mut Aligned,
) -> Result<(), BlockError> {
    let len = ctx.read_masked(item, buf)?;
    let data = buf.view(len);
    let base = item.chunk * ctx.chunk;
    for r in &item.ranges {
        let a = usize::try_from(r.start - base).unwrap_or(0);
        let b = usize::try_from(r.end - base).unwrap_or(0);
        if let Some(span) = data.get(a..b) {
            out.send_span(ctx, item.disk, r.start, span)?;
        }
    }
    out.send(&Message::Done {
        disk: item.disk,
        chunk: item.chunk,
        hash: [0; 32],
    })?;
    ctx.sent_items.fetch_add(1, Ordering::Relaxed);
    Progress::add(&ctx.progress.done, item.bytes());
    Ok(())
}

/// Acts on one message from the receiver on a data stream.
fn handle_reply(
    ctx: &Ctx<'_>,
    out: &mut Out,
    m: Message,
    pending: &mut VecDeque<Item>,
    tries: &mut HashMap<(u16, u64), u32>,
    buf: &mut Aligned,
) -> Result<(), BlockError> {
    match m {
        Message::Sums {
            disk,
            chunk,
            hash,
            leaves,
        } => {
            let item = pending
                .pop_front()
                .filter(|i| i.disk == disk && i.chunk == chunk)
                .ok_or_else(|| BlockError::Protocol("sums for a chunk not asked for".into()))?;
            let len = ctx.read_masked(&item, buf)?;
            let buf = buf.view(len);
            let mine = *blake3::hash(buf).as_bytes();
            if mine != hash {
                let base = item.chunk * ctx.chunk;
                let same_shape = leaves.len() == buf.len().div_ceil(LEAF);
                let mut i = 0;
                let n = buf.len().div_ceil(LEAF);
                while i < n {
                    let differs = |k: usize| {
                        !same_shape
                            || leaves.get(k).is_none_or(|l| {
                                *l != leaf_hash(&buf[k * LEAF..((k + 1) * LEAF).min(buf.len())])
                            })
                    };
                    if !differs(i) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < n && differs(j) {
                        j += 1;
                    }
                    let (a, b) = (i * LEAF, (j * LEAF).min(buf.len()));
                    out.send_span(ctx, disk, base + a as u64, &buf[a..b])?;
                    i = j;
                }
            }
            out.send(&Message::Done {
                disk,
                chunk,
                hash: mine,
            })?;
            ctx.sent_items.fetch_add(1, Ordering::Relaxed);
            Progress::add(&ctx.progress.done, item.bytes());
            Ok(())
        }
        Message::Mismatch { disk, chunk } => {
            let t = tries.entry((disk, chunk)).or_insert(0);
            *t += 1;
            if *t > MAX_RESENDS {
                return Err(BlockError::Protocol(format!(
                    "chunk {chunk} of disk {disk} still differs on the target after {MAX_RESENDS} resends"
                )));
            }
            let item = ctx.item_for(disk, chunk).ok_or_else(|| {
                BlockError::Protocol(format!("mismatch for unknown chunk {chunk}"))
            })?;
            let len = ctx.read_masked(&item, buf)?;
            let data = buf.view(len);
            let hash = *blake3::hash(data).as_bytes();
            out.send_span(ctx, disk, item.chunk * ctx.chunk, data)?;
            out.send(&Message::Done { disk, chunk, hash })?;
            ctx.resent.fetch_add(1, Ordering::Relaxed);
            ctx.progress.note(format!(
                "chunk {chunk} of disk {disk} re-sent after a hash mismatch"
            ));
            Ok(())
        }
        Message::Error { code, message } => Err(BlockError::Remote { code, message }),
        other => Err(BlockError::Protocol(format!(
            "unexpected {} on a data stream",
            name_of(&other)
        ))),
    }
}
