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

/// Decides per chunk whether to compress, backing off on incompressible data.
#[derive(Debug, Default)]
pub struct Compressor {
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
        let mut out = None;
        if self.skip > 0 {
            self.skip -= 1;
        } else {
            match zstd::bulk::compress(data, LEVEL) {
                #[allow(clippy::cast_precision_loss)]
                Ok(c) if (c.len() as f64) <= data.len() as f64 * WORTH => {
                    self.backoff = 0;
                    out = Some(c);
                }
                _ => {
                    self.backoff = (self.backoff * 2).clamp(1, MAX_SKIP);
                    self.skip = self.backoff;
                }
            }
        }
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
        let d = zstd::bulk::decompress(data, *len as usize)
            .map_err(|_| ChunkError::Decompress(*offset))?;
        if d.len() != *len as usize {
            return Err(ChunkError::Decompress(*offset));
        }
        d
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
}
