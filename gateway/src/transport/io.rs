//! Framed reads and writes of the wire format on quinn streams. Lengths are
//! checked by the decoders in [`crate::wire`] before any buffer is sized.

use quinn::{ReadError, ReadExactError, RecvStream, SendStream, WriteError};
use serde::{de::DeserializeOwned, Serialize};

use super::TransportError;
use crate::wire::{control, ChunkHeader, Preamble, StreamKind, WireError, CHUNK_HEADER_LEN, PREAMBLE_LEN};

fn write_err(e: WriteError) -> TransportError {
    match e {
        WriteError::ConnectionLost(c) => TransportError::Connection(c),
        _ => TransportError::StreamClosed,
    }
}

fn read_err(e: ReadError) -> TransportError {
    match e {
        ReadError::ConnectionLost(c) => TransportError::Connection(c),
        _ => TransportError::StreamClosed,
    }
}

/// Reads exactly `buf.len()` bytes. `Ok(false)` if the stream ended cleanly
/// before the first byte; an error if it ended part-way.
async fn read_exact_or_end(stream: &mut RecvStream, buf: &mut [u8]) -> Result<bool, TransportError> {
    match stream.read_exact(buf).await {
        Ok(()) => Ok(true),
        Err(ReadExactError::FinishedEarly(0)) => Ok(false),
        Err(ReadExactError::FinishedEarly(_)) => Err(TransportError::StreamClosed),
        Err(ReadExactError::ReadError(e)) => Err(read_err(e)),
    }
}

async fn read_preamble(stream: &mut RecvStream, kind: StreamKind) -> Result<(), TransportError> {
    let mut b = [0u8; PREAMBLE_LEN];
    if !read_exact_or_end(stream, &mut b).await? {
        return Err(TransportError::StreamClosed);
    }
    let p = Preamble::decode(&b)?;
    if p.kind != kind {
        return Err(WireError::UnknownStreamKind(p.kind as u8).into());
    }
    Ok(())
}

/// Sending half of the control stream.
#[derive(Debug)]
pub struct ControlWriter {
    stream: SendStream,
}

impl ControlWriter {
    /// Wraps the stream; the opener (the edge) writes the preamble first.
    pub async fn open(mut stream: SendStream, write_preamble: bool) -> Result<Self, TransportError> {
        if write_preamble {
            stream
                .write_all(&Preamble::new(StreamKind::Control).encode())
                .await
                .map_err(write_err)?;
        }
        Ok(ControlWriter { stream })
    }

    pub async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), TransportError> {
        let frame = control::encode(msg)?;
        self.stream.write_all(&frame).await.map_err(write_err)
    }

    /// Ends the stream after everything written was delivered.
    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }
}

/// Receiving half of the control stream.
#[derive(Debug)]
pub struct ControlReader {
    stream: RecvStream,
    body: Vec<u8>,
}

impl ControlReader {
    /// Wraps the stream; the accepting side (the cloud) checks the preamble.
    pub async fn open(mut stream: RecvStream, check_preamble: bool) -> Result<Self, TransportError> {
        if check_preamble {
            read_preamble(&mut stream, StreamKind::Control).await?;
        }
        Ok(ControlReader {
            stream,
            body: Vec::new(),
        })
    }

    /// The next message, or `None` when the peer finished the stream.
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, TransportError> {
        let mut prefix = [0u8; 4];
        if !read_exact_or_end(&mut self.stream, &mut prefix).await? {
            return Ok(None);
        }
        let len = control::frame_len(prefix)?;
        crate::chunk::size_buffer(&mut self.body, len);
        if len > 0 && !read_exact_or_end(&mut self.stream, &mut self.body).await? {
            return Err(TransportError::StreamClosed);
        }
        Ok(Some(control::decode_body(&self.body)?))
    }
}

/// A data stream the edge writes chunk frames to.
#[derive(Debug)]
pub struct DataWriter {
    stream: SendStream,
}

impl DataWriter {
    pub async fn open(conn: &quinn::Connection) -> Result<Self, TransportError> {
        let mut stream = conn.open_uni().await?;
        stream
            .write_all(&Preamble::new(StreamKind::Data).encode())
            .await
            .map_err(write_err)?;
        Ok(DataWriter { stream })
    }

    /// Writes one chunk frame; waits while the stream's send window is full,
    /// which is what bounds the sender's memory.
    pub async fn send_chunk(&mut self, header: &ChunkHeader, payload: &[u8]) -> Result<(), TransportError> {
        debug_assert_eq!(header.payload_len as usize, payload.len());
        self.stream.write_all(&header.encode()).await.map_err(write_err)?;
        self.stream.write_all(payload).await.map_err(write_err)
    }

    pub fn finish(&mut self) {
        let _ = self.stream.finish();
    }
}

/// The piece a paced payload read takes at a time: a few dozen datagrams.
pub const PACED_PIECE: usize = 64 * 1024;

/// A data stream the cloud reads chunk frames from.
#[derive(Debug)]
pub struct DataReader {
    stream: RecvStream,
}

impl DataReader {
    pub async fn open(mut stream: RecvStream) -> Result<Self, TransportError> {
        read_preamble(&mut stream, StreamKind::Data).await?;
        Ok(DataReader { stream })
    }

    /// The next chunk header, or `None` when the stream ended cleanly.
    pub async fn next_header(&mut self) -> Result<Option<ChunkHeader>, TransportError> {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        if !read_exact_or_end(&mut self.stream, &mut b).await? {
            return Ok(None);
        }
        Ok(Some(ChunkHeader::decode(&b)?))
    }

    /// Reads the payload announced by `header` into `buf`. The header was
    /// decoded (so its length is within limits) and admitted by the session.
    pub async fn read_payload(&mut self, header: &ChunkHeader, buf: &mut Vec<u8>) -> Result<(), TransportError> {
        crate::chunk::size_buffer(buf, header.payload_len as usize);
        if header.payload_len > 0 && !read_exact_or_end(&mut self.stream, buf).await? {
            return Err(TransportError::StreamClosed);
        }
        Ok(())
    }

    /// [`Self::read_payload`], awaiting `pace(n)` before each piece of `n` bytes (at most
    /// [`PACED_PIECE`]) is read. A capped reader thus takes the payload, and gives the
    /// edge its flow-control credit back, at the cap piece by piece instead of a whole
    /// chunk at a time: the link sees the cap, not chunk-sized bursts at line rate.
    pub async fn read_payload_paced<F, Fut>(
        &mut self,
        header: &ChunkHeader,
        buf: &mut Vec<u8>,
        mut pace: F,
    ) -> Result<(), TransportError>
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        crate::chunk::size_buffer(buf, header.payload_len as usize);
        for piece in buf.chunks_mut(PACED_PIECE) {
            pace(piece.len() as u64).await;
            if !read_exact_or_end(&mut self.stream, piece).await? {
                return Err(TransportError::StreamClosed);
            }
        }
        Ok(())
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: u32) {
        let _ = self.stream.stop(code.into());
    }
}
