//! Chunk frames on data streams.
//!
//! ```text
//! type u8 = 0xC1 | disk u16 | offset u64 | plain_len u32 | encoding u8
//! | hash [32] | payload_len u32 | payload
//! ```
//! All integers big-endian. The header has a fixed size, so a reader knows the
//! payload length, and can refuse it, before reading or allocating the payload.

use super::WireError;
use crate::plan::MAX_CHUNK_SIZE;

pub const CHUNK_HEADER_LEN: usize = 1 + 2 + 8 + 4 + 1 + 32 + 4;
const FRAME_TYPE_CHUNK: u8 = 0xC1;

/// Largest payload a chunk frame may carry: a chunk that did not compress is
/// sent raw, so the payload never needs to exceed the largest chunk.
pub const MAX_PAYLOAD: u32 = MAX_CHUNK_SIZE;

/// How the payload encodes the chunk's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Raw = 0,
    Zstd = 1,
}

/// Everything about a chunk except its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub disk: u16,
    pub offset: u64,
    pub plain_len: u32,
    pub encoding: Encoding,
    /// The chunk hash ([`crate::chunk::ChunkHash::CURRENT`]) of the plaintext: what the
    /// receiver verifies before writing.
    pub hash: [u8; 32],
    pub payload_len: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out[0] = FRAME_TYPE_CHUNK;
        out[1..3].copy_from_slice(&self.disk.to_be_bytes());
        out[3..11].copy_from_slice(&self.offset.to_be_bytes());
        out[11..15].copy_from_slice(&self.plain_len.to_be_bytes());
        out[15] = self.encoding as u8;
        out[16..48].copy_from_slice(&self.hash);
        out[48..52].copy_from_slice(&self.payload_len.to_be_bytes());
        out
    }

    /// Decodes and checks the lengths that need no context: a plaintext and a
    /// payload within the protocol's limits, and a raw payload of exactly the
    /// plaintext's size. Checks against the plan (disk, offset, chunk length)
    /// are the receiver session's.
    pub fn decode(b: &[u8; CHUNK_HEADER_LEN]) -> Result<Self, WireError> {
        let bad = |what: String| Err(WireError::MalformedChunk(what));
        if b[0] != FRAME_TYPE_CHUNK {
            return bad(format!("unknown frame type {:#04x}", b[0]));
        }
        let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let header = ChunkHeader {
            disk: u16::from_be_bytes([b[1], b[2]]),
            offset: u64::from_be_bytes(b[3..11].try_into().expect("8 bytes")),
            plain_len: be32(11),
            encoding: match b[15] {
                0 => Encoding::Raw,
                1 => Encoding::Zstd,
                other => return bad(format!("unknown encoding {other}")),
            },
            hash: b[16..48].try_into().expect("32 bytes"),
            payload_len: be32(48),
        };
        if header.plain_len == 0 || header.plain_len > MAX_CHUNK_SIZE {
            return bad(format!(
                "plaintext length {} outside 1..={MAX_CHUNK_SIZE}",
                header.plain_len
            ));
        }
        if header.payload_len > MAX_PAYLOAD {
            return Err(WireError::FrameTooLarge {
                len: header.payload_len.into(),
                limit: MAX_PAYLOAD.into(),
            });
        }
        if header.encoding == Encoding::Raw && header.payload_len != header.plain_len {
            return bad(format!(
                "raw payload of {} bytes for {} bytes of plaintext",
                header.payload_len, header.plain_len
            ));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ChunkHeader {
        ChunkHeader {
            disk: 3,
            offset: 7 << 20,
            plain_len: 1 << 20,
            encoding: Encoding::Zstd,
            hash: [0xAB; 32],
            payload_len: 1234,
        }
    }

    #[test]
    fn round_trip() {
        let h = header();
        assert_eq!(ChunkHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn refuses_bad_headers() {
        let mut b = header().encode();
        b[0] = 0;
        assert!(ChunkHeader::decode(&b).is_err());

        let mut h = header();
        h.payload_len = MAX_PAYLOAD + 1;
        assert!(matches!(
            ChunkHeader::decode(&h.encode()),
            Err(WireError::FrameTooLarge { .. })
        ));

        let mut h = header();
        h.plain_len = 0;
        assert!(ChunkHeader::decode(&h.encode()).is_err());

        let mut h = header();
        h.encoding = Encoding::Raw;
        assert!(ChunkHeader::decode(&h.encode()).is_err());

        let mut b = header().encode();
        b[15] = 9;
        assert!(ChunkHeader::decode(&b).is_err());
    }
}
