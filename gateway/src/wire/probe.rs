//! Link-test messages (`edge-agent link-test`): the probe stream carries
//! [`EdgeProbe`] and [`CloudProbe`] with the control stream's framing
//! (`len: u32 BE` then a postcard body) and its limit, [`MAX_CONTROL_FRAME`],
//! checked before anything is allocated.
//!
//! ```text
//! edge                                   cloud
//!  probe stream (bidi, StreamKind::Probe)
//!   Request{seconds, streams} ─────────▶  clamp to the endpoint's limits
//!                              ◀───────── Accepted{granted, clamped}
//!   Ping{seq, t} x N ──────────────────▶  echoed at once
//!                              ◀───────── Pong{seq, t}
//!  upload: `streams` uni streams (StreamKind::ProbeData), edge writes
//!                              ◀───────── UploadResult{bytes, first..last byte}
//!   DownloadStart ─────────────────────▶
//!  download: `streams` bidi streams (StreamKind::ProbeData) the edge opens,
//!  the cloud writes on their send halves for the granted time
//!                              ◀───────── DownloadResult{bytes, path stats}
//!   Done ──────────────────────────────▶  (the edge then closes the connection)
//! ```
//!
//! A link test never touches the inventory or the datastore: the first stream's
//! preamble tells the endpoint which of the two a connection is.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{control, Decoded, WireError};
pub use control::MAX_CONTROL_FRAME;

/// Most traffic streams per direction a link test may use: as many as a
/// migration's data streams ([`crate::transport::MAX_DATA_STREAMS`]), so the
/// test sees the same flow-control windows. Each stream carries at most a
/// 1.25 MB window per round trip: four held a 150 ms path to ~266 Mbit/s.
/// Only the bound grew (from 4): an older endpoint clamps a request for more
/// and says so, an older edge asks for 4 at most.
pub const MAX_PROBE_STREAMS: u8 = 16;

/// Most pings one link test may send; the cloud refuses more (a ping answers
/// at once, so an unbounded number would be a free amplifier of work).
pub const MAX_PINGS: u32 = 1000;

/// Edge agent to cloud endpoint on the probe stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EdgeProbe {
    /// First message: how long to measure each direction, on how many streams.
    Request {
        agent: String,
        upload_secs: u32,
        download_secs: u32,
        streams: u8,
    },
    /// Answered at once with a [`CloudProbe::Pong`] echoing both fields; the
    /// time is the edge's own clock, so no clock sync is needed.
    Ping { seq: u32, sent_micros: u64 },
    /// The upload is measured; the edge opens the download streams next.
    DownloadStart,
    /// The edge has every result and will close the connection.
    Done,
}

/// Cloud endpoint to edge agent on the probe stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloudProbe {
    /// What the endpoint grants; `clamped` says which requests it cut and why
    /// (empty when everything asked for was granted).
    Accepted {
        endpoint: String,
        upload_secs: u32,
        download_secs: u32,
        streams: u8,
        clamped: Vec<String>,
    },
    Pong {
        seq: u32,
        sent_micros: u64,
    },
    /// Bytes received on the upload streams, and the time from their first to
    /// their last byte. `cut` is true if the endpoint stopped streams that ran
    /// past the granted time.
    UploadResult {
        bytes: u64,
        micros: u64,
        cut: bool,
    },
    /// Bytes the endpoint wrote on the download streams, and its own path
    /// statistics over the download (the sender sees the losses).
    DownloadResult {
        bytes: u64,
        micros: u64,
        path: PathReport,
    },
}

/// A sender's view of the path over one phase: quinn's `PathStats`, as
/// differences over the phase where a counter, as read at its end otherwise.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathReport {
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
    pub congestion_events: u64,
    /// Smoothed RTT at the end of the phase.
    pub rtt_micros: u64,
    /// Largest UDP payload the path carries (after MTU discovery).
    pub current_mtu: u16,
}

/// Encodes a probe message as one frame.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, WireError> {
    control::encode(msg)
}

/// Decodes one probe message from the front of `buf`, if it is all there.
pub fn decode<M: DeserializeOwned>(buf: &[u8]) -> Result<Decoded<M>, WireError> {
    control::decode(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> (Vec<EdgeProbe>, Vec<CloudProbe>) {
        (
            vec![
                EdgeProbe::Request {
                    agent: "edge-01".into(),
                    upload_secs: 5,
                    download_secs: 5,
                    streams: 4,
                },
                EdgeProbe::Ping {
                    seq: 7,
                    sent_micros: u64::MAX,
                },
                EdgeProbe::DownloadStart,
                EdgeProbe::Done,
            ],
            vec![
                CloudProbe::Accepted {
                    endpoint: "gw".into(),
                    upload_secs: 10,
                    download_secs: 10,
                    streams: 4,
                    clamped: vec!["upload 60 s cut to 10 s".into()],
                },
                CloudProbe::Pong { seq: 7, sent_micros: 1 },
                CloudProbe::UploadResult {
                    bytes: 1 << 40,
                    micros: 5_000_000,
                    cut: false,
                },
                CloudProbe::DownloadResult {
                    bytes: 3,
                    micros: 4,
                    path: PathReport {
                        sent_packets: 100,
                        lost_packets: 1,
                        current_mtu: 1452,
                        ..PathReport::default()
                    },
                },
            ],
        )
    }

    #[test]
    fn round_trip_and_every_prefix_is_incomplete() {
        let (edge, cloud) = samples();
        for msg in edge {
            let frame = encode(&msg).unwrap();
            for cut in 0..frame.len() {
                assert_eq!(decode::<EdgeProbe>(&frame[..cut]).unwrap(), Decoded::Incomplete);
            }
            assert_eq!(decode::<EdgeProbe>(&frame).unwrap(), Decoded::Frame(msg, frame.len()));
        }
        for msg in cloud {
            let frame = encode(&msg).unwrap();
            assert_eq!(decode::<CloudProbe>(&frame).unwrap(), Decoded::Frame(msg, frame.len()));
        }
    }

    #[test]
    fn the_fuzz_seeds_are_probe_messages() {
        // The control_frame fuzz target starts from these; they must decode,
        // or the fuzzer would not reach the probe decoders' deeper paths.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/control_frame");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(&path).unwrap();
            let ok = if name.starts_with("probe-edge") {
                matches!(decode::<EdgeProbe>(&data), Ok(Decoded::Frame(_, n)) if n == data.len())
            } else if name.starts_with("probe-cloud") {
                matches!(decode::<CloudProbe>(&data), Ok(Decoded::Frame(_, n)) if n == data.len())
            } else {
                continue;
            };
            assert!(ok, "{name} does not decode");
            seen += 1;
        }
        assert!(seen >= 6, "probe seeds missing");
    }

    #[test]
    fn oversized_garbage_and_lying_lengths_are_refused() {
        let prefix = ((MAX_CONTROL_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode::<EdgeProbe>(&prefix),
            Err(WireError::FrameTooLarge { .. })
        ));
        assert!(matches!(
            decode::<EdgeProbe>(&[0, 0, 0, 2, 0xff, 0xff]),
            Err(WireError::MalformedControl(_))
        ));
        // Accepted claiming 2^60 clamped reasons in a 12-byte body.
        let mut body = vec![0u8, 2, b'g', b'w', 1, 1, 1];
        body.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x10]);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        assert!(decode::<CloudProbe>(&frame).is_err());
    }
}
