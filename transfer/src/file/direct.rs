//! File data moved past the page cache (`O_DIRECT`) where the filesystem takes it.
//!
//! Why: data a migration reads or writes once has no business in the page cache. Filling the
//! cache costs a copy and a page allocation per 4 KiB (on this kind of VM, where freed pages
//! go back to the host, most of the copy's CPU: 3.3 s of sys per GiB written buffered against
//! 0.3 s direct), and on a production source it evicts the host's working set. A file of which
//! some page is cached is read through the cache (that is where its newest bytes are, and
//! reading it costs nothing); anything a filesystem refuses, or an unaligned piece, goes the
//! buffered way.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::sys;

/// Alignment of memory, offsets and lengths for direct I/O: every logical block size Linux
/// filesystems use divides it.
pub const ALIGN: usize = 4096;

/// `n` rounded up to a multiple of [`ALIGN`].
pub fn round_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Whether `off` is a multiple of [`ALIGN`].
pub fn aligned(off: u64) -> bool {
    off.is_multiple_of(ALIGN as u64)
}

/// A reusable buffer whose slices start on an [`ALIGN`] boundary.
#[derive(Default)]
pub struct Aligned {
    raw: Vec<u8>,
}

impl Aligned {
    /// An aligned slice of `round_up(len)` bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        let want = round_up(len);
        if self.raw.len() < want + ALIGN {
            self.raw = vec![0u8; want + ALIGN];
        }
        let start = self.raw.as_ptr().align_offset(ALIGN);
        &mut self.raw[start..start + want]
    }

    /// The first `len` bytes of the slice [`Aligned::get`] last handed out for at least `len`
    /// (empty when it never did).
    pub fn view(&self, len: usize) -> &[u8] {
        let start = self.raw.as_ptr().align_offset(ALIGN);
        self.raw.get(start..start + len).unwrap_or(&[])
    }

    /// Writes the first `len` bytes of this buffer's slice (whole blocks, filled through
    /// [`Aligned::get`]) at `off` of `f`, opened `O_DIRECT`, without a copy; false when the
    /// device wants a larger alignment than [`ALIGN`] (nothing was written).
    pub fn write_own(&mut self, f: &File, len: usize, off: u64) -> io::Result<bool> {
        let buf = &self.get(len)[..len];
        match f.write_all_at(buf, off) {
            Ok(()) => Ok(true),
            Err(e) if is_einval(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `data` (whole blocks) at `off` of `f`, opened `O_DIRECT`, through this buffer;
    /// false when the device wants a larger alignment than [`ALIGN`] (nothing was written).
    pub fn write_direct(&mut self, f: &File, data: &[u8], off: u64) -> io::Result<bool> {
        let buf = self.get(data.len());
        buf.copy_from_slice(data);
        match f.write_all_at(buf, off) {
            Ok(()) => Ok(true),
            Err(e) if is_einval(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Turns `O_DIRECT` on or off for `f`; false when the filesystem refuses it.
pub fn set(f: &File, on: bool) -> bool {
    let Ok(bits) = fcntl(f.as_raw_fd(), FcntlArg::F_GETFL) else {
        return false;
    };
    let mut flags = OFlag::from_bits_truncate(bits);
    flags.set(OFlag::O_DIRECT, on);
    fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(flags)).is_ok()
}

pub(crate) fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EINVAL)
}

/// Reads source files, directly where nothing of them is cached.
#[derive(Default)]
pub struct Reader {
    buf: Aligned,
    direct: bool,
}

impl Reader {
    /// Prepares to read `f`: direct unless some of it is cached or its filesystem refuses.
    pub fn open(&mut self, f: &File) {
        self.direct = sys::cached(f.as_fd()) == Some(0) && set(f, true);
    }

    /// Whether `f` is being read past the cache.
    #[cfg(test)]
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Up to `len` bytes of `f` at `off`; fewer only at the end of the file.
    pub fn read_at(&mut self, f: &File, off: u64, len: usize) -> io::Result<&[u8]> {
        if self.direct && aligned(off) {
            // The whole aligned buffer: a direct read's length must be whole blocks too.
            match read_full(f, self.buf.get(len), off, true) {
                Ok(got) => return Ok(&self.buf.get(len)[..got.min(len)]),
                // The device wants a larger alignment than ALIGN: the buffered way then.
                Err(e) if is_einval(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if self.direct {
            set(f, false);
            self.direct = false;
        }
        let buf = &mut self.buf.get(len)[..len];
        let got = read_full(f, buf, off, false)?;
        Ok(&buf[..got])
    }
}

/// Reads up to `buf.len()` bytes at `off`; fewer only at the end of the file (where a
/// `direct` read, whose next piece would be unaligned, ends at its first short read).
fn read_full(f: &File, buf: &mut [u8], off: u64, direct: bool) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if direct && !n.is_multiple_of(ALIGN) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Writes fresh files, directly where the filesystem takes it.
#[derive(Default)]
pub struct Writer {
    buf: Aligned,
}

/// How one file is being written: past the cache until a piece cannot be.
#[derive(Debug, Default)]
pub struct Target {
    direct: Cell<bool>,
}

impl Target {
    /// For `f`, just created: direct when its filesystem takes it.
    pub fn new(f: &File) -> Self {
        Target {
            direct: Cell::new(set(f, true)),
        }
    }
}

impl Writer {
    /// Writes `data` at `off` of `f`: the whole blocks of an aligned piece directly, anything
    /// else (a file's unaligned tail; it ends the direct writes of that file) buffered.
    pub fn write_at(&mut self, f: &File, t: &Target, off: u64, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        if t.direct.get() && aligned(off) {
            let whole = data.len() - data.len() % ALIGN;
            // Refused (the device wants a larger alignment): the buffered way then.
            if whole > 0 && self.buf.write_direct(f, &data[..whole], off)? {
                done = whole;
            }
        }
        if done == data.len() {
            return Ok(());
        }
        // A shorter tail than a block costs less buffered (one cached page, written back
        // later) than padded and truncated (a journalled truncate per file).
        if t.direct.get() {
            set(f, false);
            t.direct.set(false);
        }
        f.write_all_at(&data[done..], off + done as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| u8::try_from((i * 7 + i / 4096) % 251).unwrap())
            .collect()
    }

    #[test]
    fn buffers_are_aligned_and_rounded_up() {
        let mut a = Aligned::default();
        for len in [1, 4095, 4096, 4097, 1 << 20] {
            let b = a.get(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), round_up(len));
        }
    }

    #[test]
    fn reads_return_the_file_whatever_the_path() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let want = data(3 * 4096 + 100);
        std::fs::write(&p, &want).unwrap();
        let f = File::open(&p).unwrap();
        let mut r = Reader::default();
        r.open(&f);
        // Just written, so cached: the buffered way.
        assert!(!r.direct());
        assert_eq!(r.read_at(&f, 0, want.len()).unwrap(), &want[..]);
        // Forced direct (where the filesystem has it): whole, a tail, past the end, unaligned.
        r.direct = set(&f, true);
        assert_eq!(r.read_at(&f, 0, 1 << 20).unwrap(), &want[..]);
        assert_eq!(r.read_at(&f, 8192, 4096 + 100).unwrap(), &want[8192..]);
        assert_eq!(r.read_at(&f, 1 << 20, 4096).unwrap(), b"");
        assert_eq!(r.read_at(&f, 100, 50).unwrap(), &want[100..150]);
        assert!(!r.direct(), "an unaligned read leaves direct mode");
    }

    fn evict(f: &File) {
        f.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }

    #[test]
    fn the_page_cache_is_left_alone_where_direct_io_works() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let want = data((1 << 20) + 100);
        let f = File::create(&p).unwrap();
        let target = Target::new(&f);
        if !target.direct.get() || sys::cached(f.as_fd()).is_none() {
            eprintln!("no O_DIRECT or no cachestat where the temporary directory is: skipped");
            return;
        }
        Writer::default().write_at(&f, &target, 0, &want).unwrap();
        // Only the tail's page went through the cache.
        assert_eq!(sys::cached(f.as_fd()), Some(1));
        evict(&f);
        let f = File::open(&p).unwrap();
        assert_eq!(sys::cached(f.as_fd()), Some(0));
        let mut r = Reader::default();
        r.open(&f);
        assert!(r.direct());
        assert_eq!(r.read_at(&f, 0, 1 << 20).unwrap(), &want[..1 << 20]);
        assert_eq!(r.read_at(&f, 1 << 20, 1 << 20).unwrap(), &want[1 << 20..]);
        assert_eq!(sys::cached(f.as_fd()), Some(0), "read past the cache");
    }

    #[test]
    fn whole_blocks_go_direct_and_a_tail_buffered() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let want = data(3 * 4096 + 10);
        let f = File::create(&p).unwrap();
        let target = Target::new(&f);
        let direct = target.direct.get();
        let mut w = Writer::default();
        w.write_at(&f, &target, 0, &want[..4096]).unwrap();
        assert_eq!(target.direct.get(), direct);
        w.write_at(&f, &target, 4096, &want[4096..]).unwrap();
        assert!(!target.direct.get(), "the tail ends direct writes");
        assert_eq!(std::fs::read(&p).unwrap(), want);
        // Later pieces, aligned or not, go buffered, and the file stays right.
        w.write_at(&f, &target, 10, &want[10..20]).unwrap();
        w.write_at(&f, &target, 4096, &want[4096..8192]).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), want);
    }
}
