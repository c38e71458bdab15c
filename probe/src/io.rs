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
        let mut done = 0;
        while done < len {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: {done} of {len} bytes at offset {offset}"),
                ));
            }
            done += n;
        }
        Ok(buf)
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
