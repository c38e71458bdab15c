//! Positioned reads of devices and images, bounded so that on-disk lengths never drive allocation.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Largest single read any on-disk structure parser may ask for. Superblocks and partition
/// tables are at most a few hundred KiB (a GPT entry array of 128 × 128 bytes is 16 KiB; the
/// Btrfs superblock is 4 KiB), so a parser asking for more is following a corrupt length field.
pub const MAX_READ: usize = 1 << 20;

/// Something that can be read at byte offsets: a block device, an image file, or bytes in memory.
pub trait ReadAt {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Reads exactly `len` bytes at `offset` into a new buffer; fails on a short read or when
    /// `len` exceeds [`MAX_READ`].
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if len > MAX_READ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("refusing a {len}-byte read at offset {offset}: larger than {MAX_READ}"),
            ));
        }
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Fills `buf` from `offset` (the caller's buffer bounds the read); a read past the end
    /// is [`io::ErrorKind::UnexpectedEof`].
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len();
        let mut done = 0;
        while done < len {
            let pos = offset.checked_add(done as u64).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{len} bytes at offset {offset} are past any end"),
                )
            })?;
            let n = self.read_at(&mut buf[done..], pos)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: {done} of {len} bytes at offset {offset}"),
                ));
            }
            done += n;
        }
        Ok(())
    }
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match FileExt::read_at(self, buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(src) = self.get(start..) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }
}

/// A window `[start, start + len)` of another reader: a partition read through its disk.
#[derive(Debug)]
pub struct Slice<'a, R: ?Sized> {
    inner: &'a R,
    start: u64,
    len: u64,
}

impl<'a, R: ReadAt + ?Sized> Slice<'a, R> {
    /// The window of `inner` starting at byte `start`, `len` bytes long.
    pub fn new(inner: &'a R, start: u64, len: u64) -> Self {
        Self { inner, start, len }
    }
}

impl<R: ReadAt + ?Sized> ReadAt for Slice<'_, R> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let room = usize::try_from(self.len - offset).unwrap_or(usize::MAX);
        let n = buf.len().min(room);
        let Some(pos) = self.start.checked_add(offset) else {
            return Ok(0);
        };
        self.inner.read_at(&mut buf[..n], pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_clip_reads() {
        let data: Vec<u8> = (0..100).collect();
        let s = Slice::new(&data, 10, 20);
        assert_eq!(s.read_vec(0, 5).unwrap(), vec![10, 11, 12, 13, 14]);
        assert_eq!(s.read_vec(15, 5).unwrap(), vec![25, 26, 27, 28, 29]);
        assert!(s.read_vec(15, 6).is_err());
        assert!(s.read_vec(u64::MAX - 1, 1).is_err());
        assert!(data.read_vec(0, MAX_READ + 1).is_err());
    }
}
