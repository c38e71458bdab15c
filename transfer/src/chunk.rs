//! Chunks on the wire: BLAKE3 over the plain data, zstd when it pays, and the receiver's check
//! before anything is written. Compression turns itself off for data that does not shrink (media,
//! encrypted or already compressed disks) and probes again later, so incompressible data costs
//! one failed attempt now and then, not every chunk.

use crate::wire::{Message, WireError, MAX_CHUNK};

/// zstd level: fast; at these speeds the link, not the ratio, is the bottleneck.
const LEVEL: i32 = 1;
/// A compressed chunk must be at most this share of the plain one to be worth sending.
const WORTH: f64 = 0.9;
/// Longest run of chunks sent plain after repeated misses before compression is tried again.
const MAX_SKIP: u32 = 64;

/// zstd contexts kept across calls: a fresh context per call costs about as much as
/// compressing a small file (seen as a tenth of the sender's CPU with many small files).
#[derive(Default)]
pub struct Zstd {
    c: Option<zstd::bulk::Compressor<'static>>,
    d: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Zstd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Zstd")
    }
}

/// Smallest data worth trying to compress.
const MIN_COMPRESS: usize = 512;

impl Zstd {
    /// `data` compressed at [`LEVEL`], if it saves at least a tenth.
    pub fn shrink(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < MIN_COMPRESS {
            return None;
        }
        let c = self.compressor()?;
        let out = c.compress(data).ok()?;
        #[allow(clippy::cast_precision_loss)]
        let worth = (out.len() as f64) <= data.len() as f64 * WORTH;
        worth.then_some(out)
    }

    /// Whether `data` looks compressible: three slices of it (start, middle, end), a sixteenth
    /// of it at most, shrink by at least a twentieth. Costs a few percent of compressing it.
    pub fn promising(&mut self, data: &[u8]) -> bool {
        if data.len() < MIN_COMPRESS {
            return false;
        }
        let slice = (data.len() / 16).clamp(256, 2048);
        if data.len() <= 3 * slice {
            return true;
        }
        let mid = data.len() / 2 - slice / 2;
        let mut probe = Vec::with_capacity(3 * slice);
        probe.extend_from_slice(&data[..slice]);
        probe.extend_from_slice(&data[mid..mid + slice]);
        probe.extend_from_slice(&data[data.len() - slice..]);
        let Some(c) = self.compressor() else {
            return false;
        };
        c.compress(&probe)
            .is_ok_and(|out| out.len().saturating_mul(20) <= probe.len().saturating_mul(19))
    }

    /// `data` decompressed to exactly `len` bytes (never more: a bomb is cut off there).
    pub fn expand(&mut self, data: &[u8], len: usize) -> Option<Vec<u8>> {
        if self.d.is_none() {
            self.d = zstd::bulk::Decompressor::new().ok();
        }
        let d = self.d.as_mut()?.decompress(data, len).ok()?;
        (d.len() == len).then_some(d)
    }

    fn compressor(&mut self) -> Option<&mut zstd::bulk::Compressor<'static>> {
        if self.c.is_none() {
            self.c = zstd::bulk::Compressor::new(LEVEL).ok();
        }
        self.c.as_mut()
    }
}

/// Decides per chunk whether to compress, backing off on incompressible data.
#[derive(Debug, Default)]
pub struct Compressor {
    zstd: Zstd,
    skip: u32,
    backoff: u32,
    /// Plain bytes seen.
    pub plain_bytes: u64,
    /// Bytes sent (compressed or not).
    pub wire_bytes: u64,
}

impl Compressor {
    /// The chunk message for `data` at `offset` of disk `disk`.
    pub fn chunk(&mut self, disk: u16, offset: u64, data: &[u8]) -> Result<Message, WireError> {
        if data.len() > MAX_CHUNK {
            return Err(WireError::TooLong {
                what: "chunk",
                len: data.len(),
                max: MAX_CHUNK,
            });
        }
        let hash = *blake3::hash(data).as_bytes();
        let len = u32::try_from(data.len()).map_err(|_| WireError::Invalid("chunk length"))?;
        let out = self.try_shrink(data);
        let (compressed, payload) = match out {
            Some(c) => (true, c),
            None => (false, data.to_vec()),
        };
        self.plain_bytes += data.len() as u64;
        self.wire_bytes += payload.len() as u64;
        Ok(Message::Chunk {
            disk,
            offset,
            len,
            hash,
            compressed,
            data: payload,
        })
    }

    /// Writes the chunk frame for `data` at `offset` of disk `disk` straight to `w`, the same
    /// bytes as [`Compressor::chunk`]'s message encodes to, without copying plain data into a
    /// message first; returns the bytes of data on the wire.
    pub fn write_chunk(
        &mut self,
        w: &mut impl std::io::Write,
        disk: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, WireError> {
        if data.len() > MAX_CHUNK {
            return Err(WireError::TooLong {
                what: "chunk",
                len: data.len(),
                max: MAX_CHUNK,
            });
        }
        let hash = *blake3::hash(data).as_bytes();
        let len = u32::try_from(data.len()).map_err(|_| WireError::Invalid("chunk length"))?;
        let out = self.try_shrink(data);
        let payload = out.as_deref().unwrap_or(data);
        crate::wire::write_chunk(w, disk, offset, len, &hash, out.is_some(), payload)?;
        self.plain_bytes += data.len() as u64;
        self.wire_bytes += payload.len() as u64;
        Ok(payload.len())
    }

    /// `data` compressed when this chunk's turn to try has come and it pays; after a miss the
    /// next chunks (doubling up to [`MAX_SKIP`]) go plain without a trial.
    fn try_shrink(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        // After a miss, a probe of a few KiB decides before a whole chunk is compressed.
        if self.backoff > 0 && !self.zstd.promising(data) {
            self.backoff = (self.backoff * 2).clamp(1, MAX_SKIP);
            self.skip = self.backoff;
            return None;
        }
        match self.zstd.shrink(data) {
            Some(c) => {
                self.backoff = 0;
                Some(c)
            }
            None => {
                self.backoff = (self.backoff * 2).clamp(1, MAX_SKIP);
                self.skip = self.backoff;
                None
            }
        }
    }

    /// Plain bytes per byte sent (1.0 when nothing compressed).
    pub fn ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            return 1.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let r = self.plain_bytes as f64 / self.wire_bytes as f64;
        r
    }
}

/// Why a received chunk must not be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// Not a chunk message.
    #[error("not a chunk")]
    NotAChunk,
    /// The compressed data is corrupt or expands beyond its declared length.
    #[error("chunk at offset {0} does not decompress to its declared length")]
    Decompress(u64),
    /// The data does not match its hash.
    #[error("chunk at offset {0} fails its BLAKE3 check")]
    Hash(u64),
}

/// The plain data of a received chunk, checked against its hash; nothing is returned (so
/// nothing can be written) unless it matches.
pub fn verify(m: &Message) -> Result<Vec<u8>, ChunkError> {
    verify_with(&mut Zstd::default(), m)
}

/// [`verify`] with the stream's own zstd context.
pub fn verify_with(z: &mut Zstd, m: &Message) -> Result<Vec<u8>, ChunkError> {
    let Message::Chunk {
        offset,
        len,
        hash,
        compressed,
        data,
        ..
    } = m
    else {
        return Err(ChunkError::NotAChunk);
    };
    let plain = if *compressed {
        // Decompression is capped at the declared length, itself capped by MAX_CHUNK on decode.
        z.expand(data, *len as usize)
            .ok_or(ChunkError::Decompress(*offset))?
    } else {
        data.clone()
    };
    if blake3::hash(&plain).as_bytes() != hash {
        return Err(ChunkError::Hash(*offset));
    }
    Ok(plain)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                crate::testutil::xorshift(&mut x);
                x as u8
            })
            .collect()
    }

    #[test]
    fn text_compresses_and_verifies() {
        let mut c = Compressor::default();
        let data = b"the quick brown fox ".repeat(10_000);
        let m = c.chunk(0, 4096, &data).unwrap();
        assert!(matches!(
            &m,
            Message::Chunk {
                compressed: true,
                ..
            }
        ));
        assert!(c.ratio() > 10.0, "{}", c.ratio());
        assert_eq!(verify(&m).unwrap(), data);
        // Through the wire and back.
        let back = Message::read_from(&mut &m.encode().unwrap()[..]).unwrap();
        assert_eq!(verify(&back).unwrap(), data);
    }

    #[test]
    fn incompressible_data_turns_compression_off_with_backoff() {
        let mut c = Compressor::default();
        let mut attempts = 0;
        for i in 0..200u64 {
            let before = c.skip;
            let m = c.chunk(0, i << 20, &noise(64 << 10, i + 1)).unwrap();
            assert!(matches!(
                m,
                Message::Chunk {
                    compressed: false,
                    ..
                }
            ));
            if before == 0 {
                attempts += 1;
            }
            assert_eq!(verify(&m).unwrap().len(), 64 << 10);
        }
        assert!(
            attempts < 15,
            "{attempts} compression attempts on 200 random chunks"
        );
        // Compressible data afterwards is compressed again once the back-off runs out.
        let mut compressed = false;
        for i in 0..(MAX_SKIP + 2) {
            compressed |= matches!(
                c.chunk(0, u64::from(i), &vec![0u8; 65536]).unwrap(),
                Message::Chunk {
                    compressed: true,
                    ..
                }
            );
        }
        assert!(compressed);
    }

    #[test]
    fn tampered_chunks_are_refused() {
        let mut c = Compressor::default();
        let data = b"abc".repeat(1000);
        let Message::Chunk {
            disk,
            offset,
            len,
            hash,
            compressed,
            mut data,
        } = c.chunk(0, 0, &data).unwrap()
        else {
            panic!()
        };
        if let Some(b) = data.get_mut(3) {
            *b ^= 0xFF;
        }
        let m = Message::Chunk {
            disk,
            offset,
            len,
            hash,
            compressed,
            data,
        };
        assert!(verify(&m).is_err());
        let plain = Message::Chunk {
            disk: 0,
            offset: 9,
            len: 3,
            hash: [0; 32],
            compressed: false,
            data: b"abc".to_vec(),
        };
        assert_eq!(verify(&plain), Err(ChunkError::Hash(9)));
        // A zstd bomb declaring a small length is cut off at that length.
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        let m = Message::Chunk {
            disk: 0,
            offset: 1,
            len: 10,
            hash: [0; 32],
            compressed: true,
            data: bomb,
        };
        assert_eq!(verify(&m), Err(ChunkError::Decompress(1)));
        assert_eq!(verify(&Message::Bye), Err(ChunkError::NotAChunk));
    }

    #[test]
    fn the_probe_tells_text_from_noise_and_contexts_are_reused() {
        let mut z = Zstd::default();
        let text = b"2024-05-01 INFO worker-3 GET /api/v1/items/1234 status=200\n".repeat(1000);
        assert!(z.promising(&text));
        assert!(!z.promising(&noise(64 << 10, 5)));
        assert!(!z.promising(&[0u8; 100]), "too small to bother");
        // Noise with a compressible half still looks worth a try.
        let mut mixed = noise(32 << 10, 6);
        mixed.resize(64 << 10, 0);
        assert!(z.promising(&mixed));
        for _ in 0..3 {
            let c = z.shrink(&text).unwrap();
            assert_eq!(z.expand(&c, text.len()).unwrap(), text);
            assert!(z.expand(&c, text.len() - 1).is_none());
        }
        assert!(z.shrink(&noise(4096, 7)).is_none());
    }
}
