//! The data streams of a target session: each writes the files the source sends under
//! temporary or partial names and renames them into place once complete.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;

use super::partial::{
    open_in_place, partial_name, partial_of, read_padded, sum_of, unlink_quietly, Base, Bases,
};
use super::{io_of, open_regular, CtlWriter, Failed, Halt, TEMP_PREFIX};
use crate::conn::{ConnReader, ConnWriter};
use crate::file::direct::{Target, Writer};
use crate::file::dirs::DirCache;
use crate::file::meta;
use crate::file::path::{parent, split};
use crate::file::proto::{read_any, Any, FileMsg, Meta, Packer, S_IFREG};
use crate::file::sys;
use crate::file::{lossy, FileError};
use crate::lock;
use crate::session::Stream;
use crate::wire::{Message, MAX_CHUNK};

/// How long the data streams of a session may take to connect.
const DATA_WAIT: Duration = Duration::from_secs(60);

/// Zeroes `from..to` of `f` (a hole where the filesystem can punch one).
fn zero_range(w: &mut Writer, f: &File, t: &Target, from: u64, to: u64) -> std::io::Result<()> {
    use nix::fcntl::FallocateFlags as F;
    if from >= to {
        return Ok(());
    }
    let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
        return Err(std::io::Error::other("range too large"));
    };
    match nix::fcntl::fallocate(
        f.as_raw_fd(),
        F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; usize::try_from((to - from).min(1 << 20)).unwrap_or(1 << 20)];
    let mut at = from;
    while at < to {
        let n = usize::try_from((to - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
        w.write_at(f, t, at, &zeros[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Block size of hole detection when writing: all-zero blocks are left unwritten.
const ZERO_BLOCK: usize = 4096;

/// Writes `data` at `offset` of the fresh file `f`, leaving holes where it is zero; returns
/// the end of the last byte written (0 when all of it was zero).
pub(super) fn write_sparse(
    w: &mut Writer,
    f: &File,
    t: &Target,
    offset: u64,
    data: &[u8],
) -> std::io::Result<u64> {
    let mut written_end = 0;
    let mut i = 0;
    while i < data.len() {
        let end = (i + ZERO_BLOCK).min(data.len());
        if data[i..end].iter().all(|&b| b == 0) {
            i = end;
            continue;
        }
        // Extend over following non-zero blocks: one write per run.
        let mut j = end;
        while j < data.len() {
            let e = (j + ZERO_BLOCK).min(data.len());
            if data[j..e].iter().all(|&b| b == 0) {
                break;
            }
            j = e;
        }
        w.write_at(f, t, offset + i as u64, &data[i..j])?;
        written_end = offset + j as u64;
        i = j;
    }
    Ok(written_end)
}

/// Counters a data stream shares with the session, and the bases its `Need`s offered.
#[derive(Default)]
pub(super) struct DataStats {
    pub(super) files: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) reused: AtomicU64,
    pub(super) changed: AtomicU64,
    pub(super) bases: Arc<Bases>,
}

/// The file a data stream is writing.
struct Current {
    pfd: Arc<OwnedFd>,
    path: Vec<u8>,
    name: Vec<u8>,
    temp: Vec<u8>,
    file: File,
    /// How `file` is written (past the page cache or not).
    how: Target,
    meta: Meta,
    /// What the `Need` offered to diff against; without it no `Copy` is taken.
    base: Option<Base>,
    /// The partial, read for the chunks of `base` it holds.
    part: Option<File>,
    /// The final name's older copy, read for the other chunks.
    old: Option<File>,
    /// Whether `file` is the partial itself, written in place: its own chunks stay where they
    /// are, and everything else of it is overwritten or zeroed before it takes its name.
    in_place: bool,
    /// In place: below this, `file` holds only bytes this session wrote or verified.
    covered: std::cell::Cell<u64>,
    /// In place: the partial's size when opened (older bytes can only lie below it).
    stale_end: u64,
    /// End of the data written so far: the temp's size (it starts empty unless in place).
    end: std::cell::Cell<u64>,
}

impl Current {
    fn wrote(&self, end: u64) {
        self.end.set(self.end.get().max(end));
    }

    /// A failed write of this file: a full filesystem says how much is still missing.
    fn write_err(&self, e: std::io::Error) -> FileError {
        let needed = (self.end.get() < self.meta.size).then(|| self.meta.size - self.end.get());
        FileError::write_failed(&self.path, self.pfd.as_fd(), needed, e)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), FileError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.meta.size)
        {
            return Err(FileError::Protocol(format!(
                "data beyond the end of {}",
                lossy(&self.path)
            )));
        }
        Ok(())
    }

    /// In place, before `offset..to` is written: zeroes what the source skipped since the
    /// last piece (holes, zero chunks) and the range itself (zero blocks are not written),
    /// so no older byte of the partial survives unverified.
    fn clear(&self, w: &mut Writer, offset: u64, to: u64) -> Result<(), FileError> {
        if !self.in_place {
            return Ok(());
        }
        let from = self.covered.get().min(offset);
        zero_range(w, &self.file, &self.how, from, to.min(self.stale_end))
            .map_err(|e| FileError::target(&self.path, e))?;
        self.covered.set(self.covered.get().max(to));
        Ok(())
    }

    fn write(
        &self,
        w: &mut Writer,
        offset: u64,
        data: &[u8],
        stats: &DataStats,
    ) -> Result<(), FileError> {
        self.check_range(offset, data.len())?;
        self.clear(w, offset, offset + data.len() as u64)?;
        let end =
            write_sparse(w, &self.file, &self.how, offset, data).map_err(|e| self.write_err(e))?;
        self.wrote(end);
        stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn copy(
        &mut self,
        w: &mut Writer,
        offset: u64,
        len: u32,
        stats: &DataStats,
    ) -> Result<(), FileError> {
        let len = len as usize;
        if len > MAX_CHUNK {
            return Err(FileError::Protocol("copy longer than a chunk".into()));
        }
        self.check_range(offset, len)?;
        let bad = |what: &str| FileError::Protocol(format!("{what} for {}", lossy(&self.path)));
        let base = self.base.as_ref().ok_or_else(|| bad("Copy without sums"))?;
        if base.chunk == 0 || !offset.is_multiple_of(base.chunk) {
            return Err(bad("Copy off a chunk boundary"));
        }
        let i = usize::try_from(offset / base.chunk).unwrap_or(usize::MAX);
        let want = *base.sums.get(i).ok_or_else(|| bad("Copy past the sums"))?;
        let from_part = i < base.split;
        let slot = if from_part {
            &mut self.part
        } else {
            &mut self.old
        };
        if slot.is_none() {
            let name = if from_part {
                partial_of(&self.name).unwrap_or_default()
            } else {
                self.name.clone()
            };
            let f = open_regular(self.pfd.as_fd(), &name)
                .map_err(|e| FileError::target(&self.path, e))?;
            *slot = Some(f);
        }
        let mut buf = vec![0u8; len];
        if let Some(f) = slot.as_ref() {
            read_padded(f, &mut buf, offset).map_err(|e| FileError::target(&self.path, e))?;
        }
        // The source matched its bytes to the sum this target sent; these bytes must still
        // be the ones summed, or the final file would hold something nobody compared.
        if sum_of(&buf) != want {
            return Err(FileError::target(
                &self.path,
                std::io::Error::other("the older copy changed since its chunk sums were sent"),
            ));
        }
        if from_part && self.in_place {
            // Already where it belongs.
            self.covered
                .set(self.covered.get().max(offset + len as u64));
        } else {
            self.clear(w, offset, offset + len as u64)?;
            let end = write_sparse(w, &self.file, &self.how, offset, &buf)
                .map_err(|e| self.write_err(e))?;
            self.wrote(end);
        }
        stats.reused.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn finish(self, w: &mut Writer) -> Result<u64, FileError> {
        let r = (|| -> Result<u64, FileError> {
            if self.in_place {
                // Past the last piece the source sent, the partial's older bytes go too.
                self.clear(w, self.covered.get(), self.meta.size)?;
                self.file
                    .set_len(self.meta.size)
                    .map_err(|e| self.write_err(e))?;
            } else if self.end.get() != self.meta.size {
                // Only a trailing hole needs the size set; a syscall per file saved otherwise.
                self.file
                    .set_len(self.meta.size)
                    .map_err(|e| self.write_err(e))?;
            }
            let failed = meta::apply_fd(self.file.as_fd(), &self.meta, true)
                .map_err(|e| FileError::target(&self.path, e))?;
            nix::fcntl::renameat(
                Some(self.pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(&self.temp),
                Some(self.pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(&self.name),
            )
            .map_err(|e| FileError::target(&self.path, io_of(e)))?;
            Ok(failed as u64)
        })();
        if r.is_err() {
            self.keep_partial();
        }
        r
    }

    fn unlink(&self, name: &[u8]) {
        unlink_quietly(self.pfd.as_fd(), name);
    }

    fn discard(&self) {
        self.unlink(&self.temp);
    }

    /// After a broken stream or a failed finish: a large file keeps what it holds under its
    /// partial name (where it is written from the start), for the next session to diff
    /// against; anything else is dropped.
    fn keep_partial(&self) {
        if partial_name(&self.name, self.meta.size).as_ref() != Some(&self.temp) {
            self.discard();
        }
    }
}

/// Serves one data stream until `StreamEnd`; returns the warnings of its files.
fn data_stream(
    mut r: BufReader<ConnReader>,
    root: Arc<OwnedFd>,
    prefix: Vec<u8>,
    stats: Arc<DataStats>,
    halt: &Halt,
) -> Result<u64, FileError> {
    let mut s = DataStream {
        cache: DirCache::new(root),
        packer: Packer::default(),
        writer: Writer::default(),
        cur: None,
        seq: 0,
        warnings: 0,
        prefix,
        stats: &stats,
    };
    let res = s.serve(&mut r, halt);
    if let Some(c) = s.cur.take() {
        c.keep_partial();
    }
    res.map(|()| s.warnings)
}

/// One data stream's writer: the file it is writing and its reusable buffers.
struct DataStream<'a> {
    cache: DirCache,
    packer: Packer,
    writer: Writer,
    cur: Option<Current>,
    /// Files begun on this stream, numbering their temporary names.
    seq: u64,
    warnings: u64,
    /// Temporary names of this stream start so.
    prefix: Vec<u8>,
    stats: &'a DataStats,
}

impl DataStream<'_> {
    fn serve(&mut self, r: &mut BufReader<ConnReader>, halt: &Halt) -> Result<(), FileError> {
        loop {
            let m = read_any(r)?;
            if halt.halted() {
                return Err(FileError::Protocol("the session ended".into()));
            }
            if !self.handle(m)? {
                return Ok(());
            }
        }
    }

    /// Applies one message; false once the stream ends.
    fn handle(&mut self, m: Any) -> Result<bool, FileError> {
        match m {
            Any::File(FileMsg::File {
                id,
                path,
                meta,
                complete,
                hash,
                compressed,
                len,
                data,
            }) => {
                if self.cur.is_some() {
                    return Err(FileError::Protocol("File before the previous End".into()));
                }
                if meta.kind() != S_IFREG {
                    return Err(FileError::Protocol("File of a non-regular entry".into()));
                }
                let c = self.begin(id, path, meta)?;
                let c = self.cur.insert(c);
                if len > 0 || !data.is_empty() {
                    let plain = self
                        .packer
                        .unpack(len, &hash, compressed, data)
                        .ok_or_else(|| {
                            FileError::Protocol(format!("corrupt data for {}", lossy(&c.path)))
                        })?;
                    c.write(&mut self.writer, 0, &plain, self.stats)?;
                }
                if complete {
                    if let Some(c) = self.cur.take() {
                        self.warnings += c.finish(&mut self.writer)?;
                        self.stats.files.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Any::File(FileMsg::Data {
                offset,
                len,
                hash,
                compressed,
                data,
            }) => {
                let c = self
                    .cur
                    .as_ref()
                    .ok_or_else(|| FileError::Protocol("Data outside a file".into()))?;
                let plain = self
                    .packer
                    .unpack(len, &hash, compressed, data)
                    .ok_or_else(|| {
                        FileError::Protocol(format!("corrupt data for {}", lossy(&c.path)))
                    })?;
                c.write(&mut self.writer, offset, &plain, self.stats)?;
            }
            Any::File(FileMsg::Copy { offset, len }) => {
                self.cur
                    .as_mut()
                    .ok_or_else(|| FileError::Protocol("Copy outside a file".into()))?
                    .copy(&mut self.writer, offset, len, self.stats)?;
            }
            Any::File(FileMsg::End { changed }) => {
                let c = self
                    .cur
                    .take()
                    .ok_or_else(|| FileError::Protocol("End outside a file".into()))?;
                self.warnings += c.finish(&mut self.writer)?;
                self.stats.files.fetch_add(1, Ordering::Relaxed);
                if changed {
                    self.stats.changed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Any::File(FileMsg::Abandon) => {
                // A cancelled pass abandons its files too: what a large one holds stays for
                // the next session (a vanished file's partial goes with the next listing).
                if let Some(c) = self.cur.take() {
                    c.keep_partial();
                }
            }
            Any::File(FileMsg::StreamEnd) | Any::Common(Message::Bye) => return Ok(false),
            Any::Common(Message::Error { code, message }) => {
                return Err(FileError::Remote { code, message })
            }
            other => {
                return Err(FileError::Protocol(format!(
                    "unexpected {} on a data stream",
                    match &other {
                        Any::File(m) => m.name(),
                        Any::Common(m) => crate::session::name_of(m),
                    }
                )))
            }
        }
        Ok(true)
    }

    /// Opens the file entry `id` is written to: a large file under its partial name from the
    /// start, so that what arrived survives even a kill -9 of this process and the next
    /// session diffs against it (the partial the `Need` summed is written in place), any
    /// other under a temporary name of this stream.
    fn begin(&mut self, id: u64, path: Vec<u8>, meta: Meta) -> Result<Current, FileError> {
        let (_, name) = split(&path).map_err(|e| FileError::path(&path, e))?;
        let name = name.to_vec();
        let pfd = self
            .cache
            .open(parent(&path))
            .map_err(|e| FileError::target(&path, e))?;
        self.seq += 1;
        let base = self.stats.bases.take(id);
        let pn = partial_name(&name, meta.size);
        let in_place = match (&pn, base.as_ref().and_then(|b| b.part)) {
            (Some(pn), Some(ino)) => open_in_place(pfd.as_fd(), pn, ino),
            _ => None,
        };
        let (temp, file, stale_end) = match (pn, in_place) {
            (Some(pn), Some((f, len))) => (pn, f, Some(len)),
            (pn, _) => {
                let temp = match pn {
                    Some(pn) => {
                        unlink_quietly(pfd.as_fd(), &pn);
                        pn
                    }
                    None => {
                        let mut t = self.prefix.clone();
                        t.extend_from_slice(self.seq.to_string().as_bytes());
                        t
                    }
                };
                let fd = sys::openat(
                    pfd.as_fd(),
                    &temp,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                    0o600,
                )
                .map_err(|e| FileError::write_failed(&path, pfd.as_fd(), Some(meta.size), e))?;
                (temp, File::from(fd), None)
            }
        };
        Ok(Current {
            pfd,
            path,
            name,
            temp,
            base,
            how: Target::new(&file),
            file,
            meta,
            part: None,
            old: None,
            in_place: stale_end.is_some(),
            covered: std::cell::Cell::new(0),
            stale_end: stale_end.unwrap_or(0),
            end: std::cell::Cell::new(0),
        })
    }
}

/// The writers of a session's data streams, joined at the end of the data phase.
pub(super) type DataHandles = Vec<std::thread::JoinHandle<Result<u64, FileError>>>;

/// What the data streams of a session share with it.
#[derive(Clone)]
pub(super) struct DataSession {
    /// The target root.
    pub(super) root: Arc<OwnedFd>,
    /// The session's counters and bases.
    pub(super) stats: Arc<DataStats>,
    /// The control stream, cut when a data stream fails.
    pub(super) ctl: CtlWriter,
    /// The first failure of a data stream.
    pub(super) failed: Failed,
    /// Ends the streams of a failed session.
    pub(super) halt: Arc<Halt>,
}

/// Accepts the session's data streams as they connect and starts a writer for each.
pub(super) fn accept_data(
    data: std::sync::mpsc::Receiver<Stream>,
    streams: u16,
    session: u64,
    shared: DataSession,
    timeout: Duration,
) -> Result<DataHandles, FileError> {
    let halt = Arc::clone(&shared.halt);
    let mut handles = Vec::new();
    for i in 0..streams {
        let never = || {
            FileError::Protocol(format!(
                "data stream {} of {streams} never connected",
                i + 1
            ))
        };
        let deadline = Instant::now() + DATA_WAIT;
        let s = loop {
            // In slices, so that a halted session does not wait out DATA_WAIT.
            match data.recv_timeout(Duration::from_millis(200)) {
                Ok(s) => break s,
                Err(_) if halt.halted() => return Ok(handles),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return Err(never()),
            }
        };
        s.set_timeouts(timeout);
        if let Some(c) = s.cutter() {
            lock(&halt.socks).push(c);
        }
        if halt.halted() {
            halt.halt();
        }
        let (r, w) = s.into_halves();
        let mut prefix = TEMP_PREFIX.to_vec();
        prefix.extend_from_slice(format!("{session:016x}.{i}.").as_bytes());
        let stream = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("sms-file-data".into())
            .spawn(move || stream.run(r, w, prefix));
        match spawned {
            Ok(h) => handles.push(h),
            Err(source) => {
                shared.cannot_start(source, handles);
                return Err(FileError::Protocol(format!(
                    "data stream {} of {streams} could not start",
                    i + 1
                )));
            }
        }
    }
    Ok(handles)
}

impl DataSession {
    /// Runs one stream's writer until its end.
    fn run(
        &self,
        r: BufReader<ConnReader>,
        w: BufWriter<ConnWriter>,
        prefix: Vec<u8>,
    ) -> Result<u64, FileError> {
        let _keep = w;
        let r = data_stream(
            r,
            Arc::clone(&self.root),
            prefix,
            Arc::clone(&self.stats),
            &self.halt,
        );
        // A stream the session itself halted carries no news: the session's own error is
        // the one to report.
        match r {
            Err(e) if !self.halt.halted() => Err(self.stream_failed(e)),
            r => r,
        }
    }

    /// Stops the session now rather than at the end of the listing, and tells the source why
    /// first: its operator needs the path and the cause (a full disk, say), not a reset
    /// connection. Returns the error this stream's writer ends with.
    fn stream_failed(&self, e: FileError) -> FileError {
        tracing::warn!(error = %e, code = %e.code(), "file data stream failed");
        let mut slot = lock(&self.failed);
        if slot.is_none() {
            let mut w = lock(&self.ctl);
            if !matches!(e, FileError::Remote { .. }) {
                let _ = Message::Error {
                    code: e.code().to_string(),
                    message: e.to_string().chars().take(1000).collect(),
                }
                .write_to(&mut *w);
                let _ = w.flush();
            }
            w.get_ref().abort();
            drop(w);
            let text = e.to_string();
            *slot = Some(e);
            return FileError::Protocol(text);
        }
        FileError::Protocol(e.to_string())
    }

    /// A data stream's thread could not start: the session cannot go on without it, so it
    /// stops now (the control side reports `failed`), the streams already started first.
    fn cannot_start(&self, source: std::io::Error, started: DataHandles) {
        let e = FileError::Spawn {
            what: "a data stream",
            source,
        };
        tracing::warn!(error = %e, "file session stopped");
        lock(&self.failed).get_or_insert(e);
        self.halt.halt();
        lock(&self.ctl).get_ref().abort();
        for h in started {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_stay_holes() {
        let t = tempfile::tempdir().unwrap();
        let f = File::create(t.path().join("f")).unwrap();
        let mut data = vec![0u8; 64 << 10];
        data[10] = 1;
        data[40_000] = 2;
        let how = Target::new(&f);
        let end = write_sparse(&mut Writer::default(), &f, &how, 1 << 20, &data);
        assert_eq!(end.unwrap(), (1 << 20) + 40_960);
        f.set_len(2 << 20).unwrap();
        let back = std::fs::read(t.path().join("f")).unwrap();
        assert_eq!(&back[1 << 20..(1 << 20) + data.len()], &data[..]);
        use std::os::unix::fs::MetadataExt;
        // Two 4 KiB blocks written, the rest holes.
        assert!(
            f.metadata().unwrap().blocks() <= 16,
            "{}",
            f.metadata().unwrap().blocks()
        );
    }
}
