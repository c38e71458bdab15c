//! A data worker of the source: takes the files the target needs off the queue and sends each
//! on its data stream, whole when small, else chunk by chunk with holes skipped and chunks the
//! target already holds named instead of sent.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::stat::FileStat;
use nix::unistd::Whence;

use super::{flush, Job, Shared, CHUNK, SMALL};
use crate::conn::ConnWriter;
use crate::file::direct::Reader;
use crate::file::dirs::DirCache;
use crate::file::meta;
use crate::file::path::{join, parent};
use crate::file::proto::{FileMsg, Meta, Packer, SUM_LEN, S_IFREG};
use crate::file::walk::{open_source, Root};
use crate::file::{lossy, source_path, FileError};
use crate::lock;
use crate::session::Stream;
use crate::task::{Control, Progress};

/// Sends jobs on one data stream.
pub(super) struct Worker<'a> {
    /// The pass's roots, by index.
    pub(super) roots: &'a [Root],
    /// Peer timeout: how often an idle stream sends a keep-alive.
    pub(super) timeout: Duration,
    /// State shared with the other threads of the pass.
    pub(super) shared: &'a Shared,
    /// The pass's progress.
    pub(super) progress: &'a Progress,
    /// Cancellation and pacing.
    pub(super) control: &'a Control,
}

/// A worker's stream and its reusable buffers.
struct Out {
    w: BufWriter<ConnWriter>,
    caches: Vec<DirCache>,
    packer: Packer,
    reader: Reader,
}

/// How sending one file went.
enum Sent {
    Done { changed: bool },
    Vanished,
}

/// The file being sent, opened and checked to be the one listed.
struct Opened<'j> {
    job: &'j Job,
    file: File,
    size: u64,
    /// Its change key when opened.
    before: (i64, i64, i64, i64, i64),
}

impl Opened<'_> {
    fn err(&self, source: std::io::Error) -> FileError {
        FileError::Source {
            path: lossy(&self.job.src_rel),
            source,
        }
    }

    /// Whether the file changed since it was opened.
    fn changed_since_open(&self) -> Result<bool, FileError> {
        let after = nix::sys::stat::fstat(self.file.as_raw_fd()).map_err(|e| self.err(e.into()))?;
        Ok(meta::change_key(&after) != self.before)
    }
}

impl Worker<'_> {
    /// Sends jobs from `qrx` until the queue closes or the pass fails.
    pub(super) fn run(
        &self,
        stream: Stream,
        qrx: &Mutex<mpsc::Receiver<Job>>,
        root_fds: &[Arc<OwnedFd>],
    ) {
        let (_r, w) = stream.into_halves();
        let mut out = Out {
            w,
            caches: root_fds
                .iter()
                .map(|f| DirCache::new(Arc::clone(f)))
                .collect(),
            packer: Packer::default(),
            reader: Reader::default(),
        };
        let every = crate::session::keepalive_every(self.timeout);
        let mut last_sent = Instant::now();
        loop {
            // In short slices, so that the queue's lock passes between the idle workers and
            // each can keep its stream alive while the walker finds nothing to send.
            let job = lock(qrx).recv_timeout(Duration::from_millis(200));
            let job = match job {
                Ok(j) => j,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if last_sent.elapsed() >= every {
                        last_sent = Instant::now();
                        let sent = FileMsg::KeepAlive
                            .write_to(&mut out.w)
                            .map_err(FileError::from);
                        if let Err(e) = sent.and_then(|()| flush(&mut out.w)) {
                            return fail(&out, self.shared, e);
                        }
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            last_sent = Instant::now();
            if self.control.cancelled() || self.shared.abort.load(Ordering::Relaxed) {
                continue;
            }
            match self.file(&mut out, &job) {
                Ok(Sent::Done { changed: false }) => {}
                Ok(Sent::Done { changed: true }) => {
                    let p = source_path(&self.roots[job.root].src, &job.src_rel);
                    self.progress.note(format!(
                        "changed while read, sent again in the next pass: {}",
                        p.display()
                    ));
                    lock(&self.shared.changed).push(p);
                }
                Ok(Sent::Vanished) => {
                    self.shared.stats.vanished.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return fail(&out, self.shared, e),
            }
        }
        let _ = FileMsg::StreamEnd.write_to(&mut out.w);
        let _ = out.w.flush();
        let _ = out.w.get_mut().close();
    }

    fn send(
        &self,
        w: &mut BufWriter<ConnWriter>,
        m: &FileMsg,
        wire: usize,
    ) -> Result<(), FileError> {
        let t = Instant::now();
        self.control.pace(wire as u64);
        m.write_to(w)?;
        self.shared.squeeze.waited(t.elapsed());
        self.shared
            .stats
            .wire
            .fetch_add(wire as u64, Ordering::Relaxed);
        Progress::add(&self.progress.wire_sent, wire as u64);
        Ok(())
    }

    fn file(&self, out: &mut Out, job: &Job) -> Result<Sent, FileError> {
        let Some((file, st)) = self.open(&mut out.caches, job)? else {
            return Ok(Sent::Vanished);
        };
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let f = Opened {
            job,
            file,
            size,
            before: meta::change_key(&st),
        };
        let mut changed = f.before != job.key;
        let mut meta = job.meta.clone();
        meta.size = size;
        // The target needs the path it knows: the target-relative one.
        let path = self.target_path(job);
        out.reader.open(&f.file);
        if size <= SMALL && job.sums.is_none() {
            changed |= self.whole(out, &f, path, meta)?;
        } else {
            match self.chunked(out, &f, path, meta, changed)? {
                Some(c) => changed = c,
                None => return Ok(Sent::Vanished),
            }
        }
        if !changed {
            changed = f.changed_since_open()?;
        }
        self.shared.stats.files.fetch_add(1, Ordering::Relaxed);
        Progress::add(&self.progress.done, size);
        Ok(Sent::Done { changed })
    }

    /// Opens the file of `job` below its root; `None` when it vanished or is another file now.
    fn open(
        &self,
        caches: &mut [DirCache],
        job: &Job,
    ) -> Result<Option<(File, FileStat)>, FileError> {
        let src = || lossy(&job.src_rel);
        let name_start = job
            .src_rel
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(0, |i| i + 1);
        let name = &job.src_rel[name_start..];
        let dir = match caches[job.root].open(parent(&job.src_rel)) {
            Ok(d) => d,
            Err(_) => return Ok(None),
        };
        let fd = match open_source(&dir, name) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(None),
            Err(e) => {
                self.progress.note(format!("cannot read {}: {e}", src()));
                return Ok(None);
            }
        };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| FileError::Source {
            path: src(),
            source: e.into(),
        })?;
        if st.st_mode & crate::file::proto::S_IFMT != S_IFREG || (st.st_dev, st.st_ino) != job.ino {
            return Ok(None);
        }
        Ok(Some((File::from(fd), st)))
    }

    /// Sends a small file whole in one frame; true when it read short (it changed).
    fn whole(
        &self,
        out: &mut Out,
        f: &Opened<'_>,
        path: Vec<u8>,
        meta: Meta,
    ) -> Result<bool, FileError> {
        // One read of the size fstat gave: a file that grew meanwhile shows in the change key
        // checked after the read.
        let want = usize::try_from(f.size).unwrap_or(0);
        let buf = out.reader.read_at(&f.file, 0, want).map_err(|e| f.err(e))?;
        let short = buf.len() < want;
        let hash = *blake3::hash(buf).as_bytes();
        let len = u32::try_from(buf.len()).map_err(|_| FileError::Protocol("file data".into()))?;
        let (compressed, data) = match out.packer.pack(buf, self.shared.squeeze.wanted()) {
            Some(c) => (true, c),
            None => (false, buf.to_vec()),
        };
        let wire = data.len();
        let msg = FileMsg::File {
            id: f.job.id,
            path,
            meta,
            complete: true,
            hash,
            compressed,
            len,
            data,
        };
        self.send(&mut out.w, &msg, wire)?;
        Progress::add(&self.progress.plain_sent, f.size);
        self.shared.stats.plain.fetch_add(f.size, Ordering::Relaxed);
        Ok(short)
    }

    /// Sends a file chunk by chunk: holes skipped, chunks whose sum the target sent named
    /// instead of sent. Returns whether it changed, `None` when cancelled (then abandoned).
    fn chunked(
        &self,
        out: &mut Out,
        f: &Opened<'_>,
        path: Vec<u8>,
        meta: Meta,
        mut changed: bool,
    ) -> Result<Option<bool>, FileError> {
        let head = FileMsg::File {
            id: f.job.id,
            path,
            meta,
            complete: false,
            hash: *blake3::hash(&[]).as_bytes(),
            compressed: false,
            len: 0,
            data: Vec::new(),
        };
        self.send(&mut out.w, &head, 0)?;
        let (cs, sums) = match &f.job.sums {
            Some((cs, s)) => (*cs, s.as_slice()),
            None => (CHUNK, &[][..]),
        };
        let mut pos = 0u64;
        while pos < f.size {
            if self.control.cancelled() {
                FileMsg::Abandon.write_to(&mut out.w)?;
                return Ok(None);
            }
            let Some(data_at) = next_data(&f.file, pos, f.size) else {
                break;
            };
            let c = data_at / cs * cs;
            let n = usize::try_from((f.size - c).min(cs)).unwrap_or(0);
            let got = self.chunk(out, f, c, n, cs, sums)?;
            if got < n {
                changed = true;
                break;
            }
            pos = c + cs;
        }
        changed |= f.changed_since_open()?;
        self.send(&mut out.w, &FileMsg::End { changed }, 0)?;
        Ok(Some(changed))
    }

    /// Sends the `n` bytes at `c` (chunk size `cs`) as a copy, as data, or not at all when
    /// they are zeros; returns how many it read.
    fn chunk(
        &self,
        out: &mut Out,
        f: &Opened<'_>,
        c: u64,
        n: usize,
        cs: u64,
        sums: &[[u8; SUM_LEN]],
    ) -> Result<usize, FileError> {
        let chunk = out.reader.read_at(&f.file, c, n).map_err(|e| f.err(e))?;
        let got = chunk.len();
        let i = usize::try_from(c / cs).unwrap_or(usize::MAX);
        let sum_ok = sums
            .get(i)
            .is_some_and(|s| s[..] == blake3::hash(chunk).as_bytes()[..SUM_LEN]);
        let len = u32::try_from(got).map_err(|_| FileError::Protocol("chunk".into()))?;
        if sum_ok {
            self.send(&mut out.w, &FileMsg::Copy { offset: c, len }, 12)?;
            self.shared
                .stats
                .reused
                .fetch_add(got as u64, Ordering::Relaxed);
        } else if !chunk.iter().all(|&b| b == 0) {
            let hash = *blake3::hash(chunk).as_bytes();
            let (compressed, data) = match out.packer.pack(chunk, self.shared.squeeze.wanted()) {
                Some(c) => (true, c),
                None => (false, chunk.to_vec()),
            };
            let wire = data.len();
            let msg = FileMsg::Data {
                offset: c,
                len,
                hash,
                compressed,
                data,
            };
            self.send(&mut out.w, &msg, wire)?;
            Progress::add(&self.progress.plain_sent, got as u64);
            self.shared
                .stats
                .plain
                .fetch_add(got as u64, Ordering::Relaxed);
        }
        Ok(got)
    }

    fn target_path(&self, job: &Job) -> Vec<u8> {
        let root = &self.roots[job.root];
        if job.src_rel.is_empty() {
            root.rel.clone()
        } else {
            join(&root.rel, &job.src_rel)
        }
    }
}

/// The offset of the next data at or after `pos`, `None` when only a hole is left.
fn next_data(file: &File, pos: u64, size: u64) -> Option<u64> {
    let data_at = match nix::unistd::lseek(
        file.as_raw_fd(),
        i64::try_from(pos).unwrap_or(i64::MAX),
        Whence::SeekData,
    ) {
        Ok(o) => u64::try_from(o).unwrap_or(u64::MAX),
        Err(nix::errno::Errno::ENXIO) => return None,
        // Without SEEK_DATA every byte is data.
        Err(_) => pos,
    };
    (data_at < size).then_some(data_at)
}

/// Records a failure and cuts this stream so that the target sees it at once.
fn fail(out: &Out, shared: &Shared, e: FileError) {
    shared.abort.store(true, Ordering::Relaxed);
    lock(&shared.errors).push(e);
    out.w.get_ref().abort();
}
