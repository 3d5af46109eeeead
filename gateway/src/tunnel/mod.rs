//! Carries one local byte-stream connection (an NBD connection of the storage mirror,
//! QEMU's migration stream) through QUIC bidirectional streams, compressed with zstd in
//! each direction.
//!
//! A tunnel is striped over one or more streams ("lanes", protocol version 10): one
//! QUIC stream's flow-control window is kept at [`crate::transport::STREAM_WINDOW`]
//! (1.25 MB, see there why), which caps a single stream at window/RTT, about 67 Mbit/s
//! on a 150 ms path. Frame `s` of a direction goes on lane `s % lanes` and the receiver
//! puts them back in order ([`reorder`]), so a tunnel of `lanes` streams may have
//! `lanes` windows in flight.
//!
//! A frame is `u32 BE` (top bit: compressed; low 31 bits: body length), `u64 BE`
//! sequence number, and the body. A frame holds at most [`MAX_PLAIN`] plaintext bytes,
//! so a decompression is bounded: a peer cannot make the other side allocate more than
//! that per frame whatever it claims. What is read from the local socket is sent at once
//! (no batching delay): the memory stream's last pass and the mirror's NBD replies are
//! latency-bound, so a frame is whatever one read returned.
//!
//! Small frames (NBD requests and replies) and frames zstd cannot shrink by 1/32 are
//! sent raw: compressing them costs CPU and saves nothing.

pub mod reorder;

pub use reorder::{Reorder, ReorderError};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest plaintext in one frame.
pub const MAX_PLAIN: usize = 256 * 1024;
/// Bytes before a frame's body: length (and compressed bit), sequence number.
pub const FRAME_HEAD: usize = 12;
/// Frames smaller than this are never compressed.
const MIN_COMPRESS: usize = 1024;
const COMPRESSED: u32 = 1 << 31;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    #[error("local connection: {0}")]
    Local(#[source] std::io::Error),
    #[error("tunnel stream: {0}")]
    Stream(String),
    #[error("malformed tunnel frame: {0}")]
    Malformed(String),
    #[error("tunnel protocol violation: {0}")]
    Order(#[from] ReorderError),
}

impl TunnelError {
    /// The peer sent something the protocol forbids (rather than the link or the local
    /// side failing): the connection is closed with a protocol-violation code.
    pub fn is_peer_violation(&self) -> bool {
        matches!(self, TunnelError::Malformed(_) | TunnelError::Order(_))
    }
}

/// Bytes through a tunnel, both directions, for progress and the report.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Plaintext bytes read from the local side and sent.
    pub plain_out: AtomicU64,
    /// Bytes put on the QUIC streams for them (frame headers included).
    pub wire_out: AtomicU64,
    /// Plaintext bytes received and written to the local side.
    pub plain_in: AtomicU64,
    /// Bytes taken from the QUIC streams for them.
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

    /// Appends frame `seq` of `plain` (at most [`MAX_PLAIN`] bytes) to `out`. Each
    /// frame is a whole zstd frame: any lane's decoder can read it.
    pub fn encode(&mut self, seq: u64, plain: &[u8], out: &mut Vec<u8>) {
        debug_assert!(plain.len() <= MAX_PLAIN);
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEAD]);
        out[start + 4..start + FRAME_HEAD].copy_from_slice(&seq.to_be_bytes());
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

/// A frame's head: its body length, whether the body is compressed, its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub len: usize,
    pub compressed: bool,
    pub seq: u64,
}

impl FrameDecoder {
    pub fn new() -> Result<Self, TunnelError> {
        let zstd = zstd::bulk::Decompressor::new().map_err(TunnelError::Local)?;
        Ok(FrameDecoder { zstd })
    }

    /// A frame's head from its first [`FRAME_HEAD`] bytes.
    pub fn head(head: [u8; FRAME_HEAD]) -> Result<FrameHead, TunnelError> {
        let v = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = (v & !COMPRESSED) as usize;
        let compressed = v & COMPRESSED != 0;
        // A compressed body is never larger than the plaintext it saves bytes on.
        if len == 0 || len > MAX_PLAIN {
            return Err(TunnelError::Malformed(format!(
                "frame body of {len} bytes is outside 1..={MAX_PLAIN}"
            )));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&head[4..FRAME_HEAD]);
        Ok(FrameHead {
            len,
            compressed,
            seq: u64::from_be_bytes(seq),
        })
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

/// Reads the local side until it ends and sends it as frames, round-robin over the
/// lanes' send streams (frame `s` on lane `s % lanes`); finishes every lane at the end.
/// Returns the plaintext bytes carried.
pub async fn pump_out<R: AsyncRead + Unpin>(
    mut local: R,
    lanes: &mut [quinn::SendStream],
    level: i32,
    stats: &TunnelStats,
) -> Result<u64, TunnelError> {
    if lanes.is_empty() {
        return Err(TunnelError::Stream("a tunnel needs at least one stream".into()));
    }
    let mut enc = FrameEncoder::new(level)?;
    let mut buf = vec![0u8; MAX_PLAIN];
    let mut frame = Vec::with_capacity(MAX_PLAIN + FRAME_HEAD);
    let mut total = 0u64;
    let mut seq = 0u64;
    loop {
        let n = local.read(&mut buf).await.map_err(TunnelError::Local)?;
        if n == 0 {
            for send in lanes.iter_mut() {
                let _ = send.finish();
            }
            return Ok(total);
        }
        frame.clear();
        enc.encode(seq, &buf[..n], &mut frame);
        // Waits while this lane's window is full, even if others have room: the
        // receiver delivers in order, so running ahead on other lanes would only fill
        // its reorder buffer (one frame per lane) and the streams' windows behind it.
        let send = &mut lanes[(seq % lanes.len() as u64) as usize];
        send.write_all(&frame)
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
        seq += 1;
        total += n as u64;
        stats.plain_out.fetch_add(n as u64, Ordering::Relaxed);
        stats.wire_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
    }
}

/// What a lane's reader hands the reassembly.
enum Arrival {
    Frame { lane: usize, seq: u64, plain: Vec<u8> },
    Ended(usize),
    Failed(TunnelError),
}

/// Aborts the lane readers when the tunnel ends, whichever way.
struct Readers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Readers {
    fn drop(&mut self) {
        for r in &self.0 {
            r.abort();
        }
    }
}

/// Reads one lane: a frame, then waits for its buffer to come back (the frame was
/// delivered) before the next. That wait is what bounds the reorder buffer to a frame
/// per lane; while it waits, QUIC's flow control holds the peer to the lane's window.
/// Lanes decompress in their own tasks, so several cores share a fast tunnel's work.
async fn read_lane(
    lane: usize,
    mut recv: quinn::RecvStream,
    to_reorder: tokio::sync::mpsc::Sender<Arrival>,
    mut returned: tokio::sync::mpsc::Receiver<Vec<u8>>,
    stats: Arc<TunnelStats>,
) {
    let result = async {
        let mut dec = FrameDecoder::new()?;
        let mut body = vec![0u8; MAX_PLAIN];
        let mut plain = Vec::with_capacity(MAX_PLAIN);
        loop {
            let mut head = [0u8; FRAME_HEAD];
            match recv.read_exact(&mut head).await {
                Ok(()) => {}
                Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(true),
                Err(e) => return Err(TunnelError::Stream(e.to_string())),
            }
            let head = FrameDecoder::head(head)?;
            recv.read_exact(&mut body[..head.len])
                .await
                .map_err(|e| TunnelError::Stream(e.to_string()))?;
            dec.decode(&body[..head.len], head.compressed, &mut plain)?;
            stats
                .wire_in
                .fetch_add((head.len + FRAME_HEAD) as u64, Ordering::Relaxed);
            let frame = Arrival::Frame {
                lane,
                seq: head.seq,
                plain,
            };
            if to_reorder.send(frame).await.is_err() {
                return Ok(false);
            }
            match returned.recv().await {
                Some(buf) => plain = buf,
                None => return Ok(false),
            }
        }
    }
    .await;
    let _ = match result {
        Ok(true) => to_reorder.send(Arrival::Ended(lane)).await,
        Ok(false) => Ok(()),
        Err(e) => to_reorder.send(Arrival::Failed(e)).await,
    };
}

/// Receives frames from every lane until all of them end, and writes their plaintext in
/// order to the local side, then shuts the local side's writing half. Returns the
/// plaintext bytes.
pub async fn pump_in<W: AsyncWrite + Unpin>(
    lanes: Vec<quinn::RecvStream>,
    mut local: W,
    stats: &Arc<TunnelStats>,
) -> Result<u64, TunnelError> {
    let count = lanes.len();
    if count == 0 {
        return Err(TunnelError::Stream("a tunnel needs at least one stream".into()));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(count);
    let mut give_back = Vec::with_capacity(count);
    let mut readers = Readers(Vec::with_capacity(count));
    for (lane, recv) in lanes.into_iter().enumerate() {
        let (back_tx, back_rx) = tokio::sync::mpsc::channel(1);
        give_back.push(back_tx);
        readers
            .0
            .push(tokio::spawn(read_lane(lane, recv, tx.clone(), back_rx, stats.clone())));
    }
    drop(tx);
    let mut order = Reorder::new(count);
    let mut total = 0u64;
    loop {
        match rx.recv().await {
            Some(Arrival::Frame { lane, seq, plain }) => {
                order.accept(lane, seq, plain)?;
                while let Some((lane, plain)) = order.pop() {
                    local.write_all(&plain).await.map_err(TunnelError::Local)?;
                    total += plain.len() as u64;
                    stats.plain_in.fetch_add(plain.len() as u64, Ordering::Relaxed);
                    // The lane may read its next frame, into this buffer.
                    let _ = give_back[lane].try_send(plain);
                }
            }
            Some(Arrival::Ended(lane)) => {
                order.end(lane)?;
                if order.is_finished() {
                    let _ = local.shutdown().await;
                    drop(readers);
                    return Ok(total);
                }
            }
            Some(Arrival::Failed(e)) => return Err(e),
            None => return Err(TunnelError::Stream("every stream of the tunnel stopped".into())),
        }
    }
}

/// Carries `local` through the lanes (bidirectional streams: each carries its share of
/// both directions) until both directions end, or one fails (then the other is stopped
/// too). Returns (bytes out, bytes in).
pub async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
    local: S,
    lanes: Vec<(quinn::SendStream, quinn::RecvStream)>,
    level: i32,
    stats: Arc<TunnelStats>,
) -> Result<(u64, u64), TunnelError> {
    let (mut sends, recvs): (Vec<_>, Vec<_>) = lanes.into_iter().unzip();
    let (r, w) = tokio::io::split(local);
    let out = pump_out(r, &mut sends, level, &stats);
    let inn = pump_in(recvs, w, &stats);
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

/// Streams a tunnel is striped over on a path: enough windows of
/// [`crate::transport::STREAM_WINDOW`] to cover `bytes_in_flight` (twice the path's
/// bandwidth-delay product: one in flight while the next is queued, and room for
/// retransmissions), at least 1 and at most `max`.
pub fn lanes_for(bytes_in_flight: u64, max: u16) -> u16 {
    bytes_in_flight
        .div_ceil(crate::transport::STREAM_WINDOW)
        .clamp(1, u64::from(max.max(1))) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(plain: &[u8]) -> (Vec<u8>, usize) {
        let mut enc = FrameEncoder::new(1).unwrap();
        let mut frame = Vec::new();
        enc.encode(u64::MAX - 1, plain, &mut frame);
        let head = FrameDecoder::head(frame[..FRAME_HEAD].try_into().unwrap()).unwrap();
        assert_eq!(head.len + FRAME_HEAD, frame.len());
        assert_eq!(head.seq, u64::MAX - 1);
        let mut out = Vec::new();
        FrameDecoder::new()
            .unwrap()
            .decode(&frame[FRAME_HEAD..], head.compressed, &mut out)
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
        assert_eq!(wire, random.len() + FRAME_HEAD);
        let (out, wire) = round_trip(b"\x25\x60\x95\x13 request");
        assert_eq!(out, b"\x25\x60\x95\x13 request");
        assert_eq!(wire, FRAME_HEAD + 12);
    }

    #[test]
    fn hostile_frames_are_refused_before_allocating() {
        let head = |v: u32| {
            let mut h = [0u8; FRAME_HEAD];
            h[..4].copy_from_slice(&v.to_be_bytes());
            FrameDecoder::head(h)
        };
        assert!(head(0).is_err());
        assert!(head(MAX_PLAIN as u32 + 1).is_err());
        assert!(head(COMPRESSED | (MAX_PLAIN as u32 + 1)).is_err());
        assert!(head(COMPRESSED | MAX_PLAIN as u32).is_ok());
        // A zstd bomb: 64 MiB of zeros in a small frame is refused, not inflated.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() <= MAX_PLAIN);
        let mut out = Vec::new();
        let err = FrameDecoder::new().unwrap().decode(&bomb, true, &mut out).unwrap_err();
        assert!(err.to_string().contains("decompress"), "{err}");
        assert!(out.capacity() <= 2 * MAX_PLAIN);
    }

    #[test]
    fn lanes_cover_twice_the_path_in_stream_windows() {
        use crate::transport::{PathEstimate, STREAM_WINDOW};
        // 150 ms at 1 Gbit/s: 18.75 MB in flight, twice that over 1.25 MB windows.
        let bdp = PathEstimate::DEFAULT.bdp();
        assert_eq!(lanes_for(2 * bdp, 32), 30);
        assert_eq!(lanes_for(2 * bdp, 16), 16);
        assert_eq!(lanes_for(0, 32), 1);
        assert_eq!(lanes_for(STREAM_WINDOW + 1, 32), 2);
        assert_eq!(lanes_for(u64::MAX, 0), 1);
    }
}
