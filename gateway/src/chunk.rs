//! Turning disk bytes into chunk frames and back: zero detection, the chunk
//! hash (BLAKE3), zstd. Pure functions on buffers; the drivers call them from
//! worker threads so compression and hashing use every core.

use ring::digest::{digest, SHA256};
use serde::{Deserialize, Serialize};

use crate::wire::{ChunkHeader, Encoding};

/// zstd level 1: on a realistic disk image it compresses at ~870 MB/s per core
/// with ratio 4.5; level 3 gains ~12 % ratio for 1.6x the CPU, which only pays
/// on links slower than ~100 MB/s.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Why a received chunk was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    #[error("payload does not decompress: {0}")]
    Decompress(String),
    #[error("payload decompresses to {got} bytes, header says {expected}")]
    WrongLength { got: usize, expected: u32 },
    #[error("the hash of the plaintext does not match the chunk's hash: altered in flight")]
    HashMismatch,
}

/// The hash of chunks, of Merkle leaves and nodes, of the cloud's dedup index and of
/// receipts. One algorithm for all of them, chosen once (docs/how-it-works.md,
/// "The chunk hash"): BLAKE3 from protocol version 8 and receipt format 3, SHA-256
/// before. Older receipts name no hash and mean SHA-256; they stay verifiable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChunkHash {
    /// Protocol versions up to 7, receipt formats 1 and 2, journals and checkpoints
    /// written by those versions.
    #[default]
    Sha256,
    /// Protocol version 8 on: 4x SHA-256's speed per core on this machine
    /// (SHA-NI against AVX-512), see `gateway/examples/chunk_hash.rs`.
    Blake3,
}

impl ChunkHash {
    /// What this build hashes chunks with.
    pub const CURRENT: ChunkHash = ChunkHash::Blake3;

    pub fn digest(self, data: &[u8]) -> [u8; 32] {
        match self {
            ChunkHash::Sha256 => sha256(data),
            ChunkHash::Blake3 => *blake3::hash(data).as_bytes(),
        }
    }

    /// The hash of several parts one after the other (a Merkle node's prefix and children).
    pub fn digest_parts(self, parts: &[&[u8]]) -> [u8; 32] {
        match self {
            ChunkHash::Sha256 => {
                let mut ctx = ring::digest::Context::new(&SHA256);
                parts.iter().for_each(|p| ctx.update(p));
                ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
            }
            ChunkHash::Blake3 => {
                let mut h = blake3::Hasher::new();
                parts.iter().for_each(|p| {
                    h.update(p);
                });
                *h.finalize().as_bytes()
            }
        }
    }

    /// The name receipts and docs use: `sha256` or `blake3`.
    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "sha256",
            ChunkHash::Blake3 => "blake3",
        }
    }

    pub fn from_name(name: &str) -> Option<ChunkHash> {
        match name {
            "sha256" => Some(ChunkHash::Sha256),
            "blake3" => Some(ChunkHash::Blake3),
            _ => None,
        }
    }
}

/// The chunk hash of this build ([`ChunkHash::CURRENT`]) of a chunk's plaintext.
pub fn chunk_hash(data: &[u8]) -> [u8; 32] {
    ChunkHash::CURRENT.digest(data)
}

/// SHA-256, for what is not a chunk: the .vmx digest a receipt signs, plan digests,
/// checkpoint names, live-migration boot files.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    digest(&SHA256, data).as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// True if every byte is zero. Compares 16 bytes at a time, which the compiler
/// turns into vector compares; runs at memory speed.
/// Makes `buf` `len` bytes long for a read or a decompression that overwrites it. A
/// buffer kept for a stream's next chunk grows to exactly the largest chunk it held:
/// `Vec::resize` would double its capacity (a 1.05 MiB payload after a 0.7 MiB one takes
/// 1.4 MiB), and the endpoint holds such a buffer per data stream.
pub fn size_buffer(buf: &mut Vec<u8>, len: usize) {
    if len > buf.capacity() {
        // Nothing in it is kept: no copy into the new allocation.
        buf.clear();
        buf.reserve_exact(len);
    }
    buf.resize(len, 0);
}

pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let wide = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0);
    wide && words.remainder().iter().all(|&b| b == 0)
}

/// Per-thread state to seal chunks without reallocating.
pub struct Sealer {
    compressor: zstd::bulk::Compressor<'static>,
    level: i32,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(level: i32) -> std::io::Result<Self> {
        Ok(Sealer {
            compressor: zstd::bulk::Compressor::new(level)?,
            level,
        })
    }

    /// Changes the zstd level for the next chunks. Chunks are compressed
    /// independently, so the level may change between any two of them.
    pub fn set_level(&mut self, level: i32) -> std::io::Result<()> {
        if level != self.level {
            self.compressor.set_compression_level(level)?;
            self.level = level;
        }
        Ok(())
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Hashes and compresses one chunk into `payload` (cleared first) and
    /// returns its header. The payload is the raw plaintext when compression
    /// saves less than 1/32 of it: not worth the receiver's CPU.
    pub fn seal(&mut self, disk: u16, offset: u64, plain: &[u8], payload: &mut Vec<u8>) -> ChunkHeader {
        let hash = chunk_hash(plain);
        payload.clear();
        payload.reserve(zstd::zstd_safe::compress_bound(plain.len()));
        let limit = plain.len() - plain.len() / 32;
        let encoding = match self.compressor.compress_to_buffer(plain, payload) {
            Ok(n) if n < limit => Encoding::Zstd,
            _ => {
                payload.clear();
                payload.extend_from_slice(plain);
                Encoding::Raw
            }
        };
        ChunkHeader {
            disk,
            offset,
            plain_len: plain.len() as u32,
            encoding,
            hash,
            payload_len: payload.len() as u32,
        }
    }
}

/// Per-thread state to open chunks.
pub struct Opener {
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").finish_non_exhaustive()
    }
}

impl Opener {
    pub fn new() -> std::io::Result<Self> {
        Ok(Opener {
            decompressor: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Decodes a payload into `plain` and verifies its hash. Decompression is
    /// bounded by the header's plaintext length (itself bounded by the plan's
    /// chunk size), so a zstd bomb fails instead of filling memory.
    pub fn open<'a>(
        &mut self,
        header: &ChunkHeader,
        payload: &'a [u8],
        plain: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], ChunkError> {
        let data: &[u8] = match header.encoding {
            Encoding::Raw => payload,
            Encoding::Zstd => {
                // Decompressing into a slice of exactly the declared length
                // bounds the output: more would be an error, not an allocation.
                let len = header.plain_len as usize;
                size_buffer(plain, len);
                let n = self
                    .decompressor
                    .decompress_to_buffer(payload, &mut plain[..len])
                    .map_err(|e| ChunkError::Decompress(e.to_string()))?;
                &plain[..n]
            }
        };
        if data.len() != header.plain_len as usize {
            return Err(ChunkError::WrongLength {
                got: data.len(),
                expected: header.plain_len,
            });
        }
        if chunk_hash(data) != header.hash {
            return Err(ChunkError::HashMismatch);
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::size_buffer;

    #[test]
    fn a_kept_buffer_grows_to_the_largest_chunk_not_to_twice_it() {
        let mut buf = Vec::new();
        size_buffer(&mut buf, 700 << 10);
        size_buffer(&mut buf, 1075 << 10);
        assert_eq!(buf.len(), 1075 << 10);
        assert_eq!(buf.capacity(), 1075 << 10, "Vec::resize would have taken 1400 KiB");
        size_buffer(&mut buf, 300 << 10);
        assert_eq!(buf.len(), 300 << 10);
        assert_eq!(buf.capacity(), 1075 << 10, "a smaller chunk reuses the buffer");
    }
}
