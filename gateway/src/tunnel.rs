//! Carries one local byte-stream connection (an NBD connection of the storage mirror,
//! QEMU's migration stream) through a QUIC bidirectional stream, compressed with zstd in
//! each direction.
//!
//! A frame is `u32 BE` (top bit: compressed; low 31 bits: body length) and the body. A
//! frame holds at most [`MAX_PLAIN`] plaintext bytes, so a decompression is bounded: a
//! peer cannot make the other side allocate more than that per frame whatever it
//! claims. What is read from the local socket is sent at once (no batching delay): the
//! memory stream's last pass and the mirror's NBD replies are latency-bound, so a
//! frame is whatever one read returned.
//!
//! Small frames (NBD requests and replies) and frames zstd cannot shrink by 1/32 are
//! sent raw: compressing them costs CPU and saves nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest plaintext in one frame.
pub const MAX_PLAIN: usize = 256 * 1024;
/// Frames smaller than this are never compressed.
const MIN_COMPRESS: usize = 1024;
const COMPRESSED: u32 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("local connection: {0}")]
    Local(#[source] std::io::Error),
    #[error("tunnel stream: {0}")]
    Stream(String),
    #[error("malformed tunnel frame: {0}")]
    Malformed(String),
}

/// Bytes through a tunnel, both directions, for progress and the report.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Plaintext bytes read from the local side and sent.
    pub plain_out: AtomicU64,
    /// Bytes put on the QUIC stream for them (frame headers included).
    pub wire_out: AtomicU64,
    /// Plaintext bytes received and written to the local side.
    pub plain_in: AtomicU64,
    /// Bytes taken from the QUIC stream for them.
    pub wire_in: AtomicU64,
}

impl TunnelStats {
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.plain_out.load(Ordering::Relaxed),
            self.wire_out.load(Ordering::Relaxed),
            self.plain_in.load(Ordering::Relaxed),
            self.wire_in.load(Ordering::Relaxed),
        )
    }
}

/// Encodes frames; keeps one zstd context for the stream's life.
pub struct FrameEncoder {
    zstd: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameEncoder")
    }
}

impl FrameEncoder {
    /// `level` is zstd's (negative levels are faster than 1).
    pub fn new(level: i32) -> Result<Self, TunnelError> {
        let zstd = zstd::bulk::Compressor::new(level).map_err(TunnelError::Local)?;
        Ok(FrameEncoder { zstd })
    }

    /// Appends the frame of `plain` (at most [`MAX_PLAIN`] bytes) to `out`.
    pub fn encode(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        debug_assert!(plain.len() <= MAX_PLAIN);
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        if plain.len() >= MIN_COMPRESS {
            if let Ok(packed) = self.zstd.compress(plain) {
                if packed.len() < plain.len() - plain.len() / 32 {
                    out.extend_from_slice(&packed);
                    let head = COMPRESSED | packed.len() as u32;
                    out[start..start + 4].copy_from_slice(&head.to_be_bytes());
                    return;
                }
            }
        }
        out.extend_from_slice(plain);
        out[start..start + 4].copy_from_slice(&(plain.len() as u32).to_be_bytes());
    }
}

/// Decodes frames; keeps one zstd context for the stream's life.
pub struct FrameDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameDecoder")
    }
}

impl FrameDecoder {
    pub fn new() -> Result<Self, TunnelError> {
        let zstd = zstd::bulk::Decompressor::new().map_err(TunnelError::Local)?;
        Ok(FrameDecoder { zstd })
    }

    /// The body length and whether it is compressed, from a frame's first 4 bytes.
    pub fn head(head: [u8; 4]) -> Result<(usize, bool), TunnelError> {
        let v = u32::from_be_bytes(head);
        let len = (v & !COMPRESSED) as usize;
        let compressed = v & COMPRESSED != 0;
        // A compressed body is never larger than the plaintext it saves bytes on.
        if len == 0 || len > MAX_PLAIN {
            return Err(TunnelError::Malformed(format!(
                "frame body of {len} bytes is outside 1..={MAX_PLAIN}"
            )));
        }
        Ok((len, compressed))
    }

    /// The plaintext of a frame body.
    pub fn decode(&mut self, body: &[u8], compressed: bool, out: &mut Vec<u8>) -> Result<(), TunnelError> {
        out.clear();
        if !compressed {
            out.extend_from_slice(body);
            return Ok(());
        }
        out.reserve(MAX_PLAIN);
        self.zstd.decompress_to_buffer(body, out).map_err(|e| {
            TunnelError::Malformed(format!("zstd frame does not decompress within {MAX_PLAIN} bytes: {e}"))
        })?;
        Ok(())
    }
}

/// Reads the local side until it ends and sends it as frames; finishes the stream at
/// the end. Returns the plaintext bytes carried.
pub async fn pump_out<R: AsyncRead + Unpin>(
    mut local: R,
    send: &mut quinn::SendStream,
    level: i32,
    stats: &TunnelStats,
) -> Result<u64, TunnelError> {
    let mut enc = FrameEncoder::new(level)?;
    let mut buf = vec![0u8; MAX_PLAIN];
    let mut frame = Vec::with_capacity(MAX_PLAIN + 4);
    let mut total = 0u64;
    loop {
        let n = local.read(&mut buf).await.map_err(TunnelError::Local)?;
        if n == 0 {
            let _ = send.finish();
            return Ok(total);
        }
        frame.clear();
        enc.encode(&buf[..n], &mut frame);
        send.write_all(&frame)
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
        total += n as u64;
        stats.plain_out.fetch_add(n as u64, Ordering::Relaxed);
        stats.wire_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
    }
}

/// Receives frames until the stream ends and writes their plaintext to the local
/// side, then shuts the local side's writing half. Returns the plaintext bytes.
pub async fn pump_in<W: AsyncWrite + Unpin>(
    recv: &mut quinn::RecvStream,
    mut local: W,
    stats: &TunnelStats,
) -> Result<u64, TunnelError> {
    let mut dec = FrameDecoder::new()?;
    let mut body = vec![0u8; MAX_PLAIN];
    let mut plain = Vec::with_capacity(MAX_PLAIN);
    let mut total = 0u64;
    loop {
        let mut head = [0u8; 4];
        match recv.read_exact(&mut head).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => {
                let _ = local.shutdown().await;
                return Ok(total);
            }
            Err(e) => return Err(TunnelError::Stream(e.to_string())),
        }
        let (len, compressed) = FrameDecoder::head(head)?;
        recv.read_exact(&mut body[..len])
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
        dec.decode(&body[..len], compressed, &mut plain)?;
        local.write_all(&plain).await.map_err(TunnelError::Local)?;
        total += plain.len() as u64;
        stats.plain_in.fetch_add(plain.len() as u64, Ordering::Relaxed);
        stats.wire_in.fetch_add(len as u64 + 4, Ordering::Relaxed);
    }
}

/// Carries `local` through (`send`, `recv`) both ways until both directions end, or
/// one fails (then the other is stopped too). Returns (bytes out, bytes in).
pub async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
    local: S,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    level: i32,
    stats: Arc<TunnelStats>,
) -> Result<(u64, u64), TunnelError> {
    let (r, w) = tokio::io::split(local);
    let out = pump_out(r, &mut send, level, &stats);
    let inn = pump_in(&mut recv, w, &stats);
    tokio::pin!(out, inn);
    // Whichever direction fails first ends the tunnel: a half-broken NBD or migration
    // connection would only hang the hypervisor waiting for a reply.
    let (mut sent, mut received) = (None, None);
    while sent.is_none() || received.is_none() {
        tokio::select! {
            r = &mut out, if sent.is_none() => sent = Some(r?),
            r = &mut inn, if received.is_none() => received = Some(r?),
        }
    }
    Ok((sent.unwrap_or(0), received.unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(plain: &[u8]) -> (Vec<u8>, usize) {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut frame = Vec::new();
        enc.encode(plain, &mut frame);
        let (len, compressed) = FrameDecoder::head(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len + 4, frame.len());
        let mut out = Vec::new();
        FrameDecoder::new()
            .unwrap()
            .decode(&frame[4..], compressed, &mut out)
            .unwrap();
        (out, frame.len())
    }

    #[test]
    fn frames_round_trip_and_compress_only_when_it_pays() {
        // Memory pages of a guest: mostly repetitive, compressed.
        let pages: Vec<u8> = (0..MAX_PLAIN).map(|i| (i / 4096 % 7) as u8).collect();
        let (out, wire) = round_trip(&pages);
        assert_eq!(out, pages);
        assert!(wire < MAX_PLAIN / 10, "{wire}");
        // Random bytes and tiny NBD requests travel raw.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (out, wire) = round_trip(&random);
        assert_eq!(out, random);
        assert_eq!(wire, random.len() + 4);
        let (out, wire) = round_trip(b"\x25\x60\x95\x13 request");
        assert_eq!(out, b"\x25\x60\x95\x13 request");
        assert_eq!(wire, 4 + 12);
    }

    #[test]
    fn hostile_frames_are_refused_before_allocating() {
        assert!(FrameDecoder::head(0u32.to_be_bytes()).is_err());
        assert!(FrameDecoder::head((MAX_PLAIN as u32 + 1).to_be_bytes()).is_err());
        assert!(FrameDecoder::head((COMPRESSED | (MAX_PLAIN as u32 + 1)).to_be_bytes()).is_err());
        // A zstd bomb: 64 MiB of zeros in a small frame is refused, not inflated.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() <= MAX_PLAIN);
        let mut out = Vec::new();
        let err = FrameDecoder::new().unwrap().decode(&bomb, true, &mut out).unwrap_err();
        assert!(err.to_string().contains("decompress"), "{err}");
        assert!(out.capacity() <= 2 * MAX_PLAIN);
    }
}
