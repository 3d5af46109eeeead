//! Bytes on the wire. Everything a peer sends is decoded here, and nothing
//! else in the crate parses peer input: decoders check every length against a
//! limit before allocating, and tell "need more bytes" apart from "malformed".
//!
//! Each QUIC stream starts with a [`Preamble`] naming the protocol version and
//! the stream's role. The control stream then carries length-prefixed
//! [`control`] messages; data streams carry [`chunk`] frames. A link test's
//! probe stream carries [`probe`] messages instead, and a live migration's stream
//! [`live`] messages.

pub mod chunk;
pub mod control;
pub mod live;
pub mod probe;

pub use chunk::{ChunkHeader, Encoding, CHUNK_HEADER_LEN};
pub use control::{
    bit, set_bit, CloudMessage, DowntimeFrom, EdgeMessage, RefusalCode, SwitchoverOutcome, SwitchoverRequest,
    MAX_CONTROL_FRAME,
};

/// ALPN protocol id: lets a future incompatible version refuse at the TLS layer.
pub const ALPN: &[u8] = b"hcm/1";
/// Magic at the start of every stream.
pub const MAGIC: [u8; 4] = *b"HCMG";
/// Current protocol version. A receiver refuses versions it does not know.
/// Version 2: the plan carries a placement (folder, cluster, host, resource pool,
/// datastores); a version-1 peer would fail to decode it, so it is refused up front
/// with a message naming both versions instead.
/// Version 3: the cloud reads staged disks back before a commit and may answer
/// `Commit` with `Repair`; `AbortMigration` (an abort checked before it touches the
/// migration); each disk of a report names its own format.
/// Version 4: replication (`Sync`, `SyncDone`, `Synced`): delta passes into a replica
/// the cloud keeps until a switchover commits it.
/// Version 5: the plan carries the VM's disk controllers with their types
/// (`VmSpec::controllers`) and each NIC's `addressType`, so the copy keeps its hardware.
/// Version 6: the switchover lifecycle: `Switchover` (a commit that may power the VM on
/// and states the downtime so far; answered by `SwitchedOver` before `Committed`),
/// `EndSwitchover` (rollback or confirm), `Schedule`, and `Synced` carrying the
/// scheduled switchover time the cloud holds.
/// Version 7: the plan carries the SHA-256 of the source's .vmx or OVF descriptor
/// (`MigrationPlan::source_descriptor_sha256`), which the receipt signs.
/// Version 8: the chunk hash is BLAKE3 ([`crate::chunk::ChunkHash`]): chunk frames,
/// acknowledgements, Merkle trees and receipts (format 3) carry BLAKE3 hashes where
/// version 7 carried SHA-256. A version-7 peer would fail every chunk's check, so it is
/// refused at the preamble.
/// Version 9: the plan may name a seed (`MigrationPlan::seed`), and `HashAnswer` says which
/// copied chunks came from it (`seeded`); a switchover window (`ScheduleWindow`, and
/// `Synced` carrying the one the cloud holds).
/// Version 10: a live migration's tunnel is striped over several streams
/// ([`live::LivePlan::tunnel_lanes`], [`live::TunnelHeader`]'s tunnel and lane), and each
/// tunnel frame carries a sequence number ([`crate::tunnel`]). A version-9 peer would
/// read the sequence number as frame body, so it is refused at the preamble like any
/// other version (cold migrations included: one version for the whole protocol).
/// `Switchover` says what its downtime counts from (`DowntimeFrom`: the switchover's
/// start, the edge's stop of the source, or the source files' last write);
/// `SyncSwitchedOver`, a pass from an edge whose record says its switchover awaits
/// confirmation (rolled back or confirmed through the API since, or not).
/// Version 11: the edge sends its request (`Plan`, `Resume`, `Sync`, `Validate`, ...)
/// right behind `Hello`, without waiting for `Welcome`: the cloud holds it until the
/// credential is accepted (and drops it with the refusal if not). A version-10 cloud
/// would take the early request as a protocol violation, so it is refused at the preamble.
/// `Sync` and `SyncSwitchedOver` say whether the pass ends with `Switchover`: the cloud
/// then reads the replica back while the pass streams, not after it.
/// Version 12: `DiskSealed` counts the disk's chunk frames, and the edge seals a disk as
/// soon as its last chunk is sent: the cloud holds the seal (and the commit or
/// `SyncDone` behind it) until those frames are durable. The end of every lift and pass
/// is one round trip shorter. A version-11 cloud would check the root before the last
/// chunks arrived, so it is refused at the preamble.
pub const PROTOCOL_VERSION: u16 = 12;
pub const PREAMBLE_LEN: usize = 8;

/// Problems with bytes a peer sent. Each maps to a QUIC close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("stream does not start with the gateway magic: the peer is not a migration gateway")]
    BadMagic,
    #[error("peer speaks protocol version {0}, this build speaks {PROTOCOL_VERSION}: upgrade the older side")]
    UnsupportedVersion(u16),
    #[error("unknown stream kind {0}")]
    UnknownStreamKind(u8),
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: u64, limit: u64 },
    #[error("malformed control message: {0}")]
    MalformedControl(String),
    #[error("malformed chunk frame: {0}")]
    MalformedChunk(String),
    #[error("invalid migration plan: {0}")]
    BadPlan(String),
}

/// What a stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// The one bidirectional stream of a migration: plan, acks, commit.
    Control = 0,
    /// A unidirectional stream of chunk frames.
    Data = 1,
    /// The first bidirectional stream of a link test (instead of `Control`):
    /// requests, pings and results as [`probe`] messages.
    Probe = 2,
    /// A link test's traffic: upload (unidirectional, edge to cloud) or
    /// download (bidirectional, opened by the edge, written by the cloud).
    ProbeData = 3,
    /// The first bidirectional stream of a live migration (instead of `Control`):
    /// [`live`] messages.
    Live = 4,
    /// A bidirectional stream of a live migration carrying one connection of the
    /// source hypervisor (see [`crate::tunnel`]).
    Tunnel = 5,
}

/// First bytes of every stream: magic, version, kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub version: u16,
    pub kind: StreamKind,
}

impl Preamble {
    pub fn new(kind: StreamKind) -> Self {
        Preamble {
            version: PROTOCOL_VERSION,
            kind,
        }
    }

    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_be_bytes());
        out[6] = self.kind as u8;
        out
    }

    pub fn decode(bytes: &[u8; PREAMBLE_LEN]) -> Result<Self, WireError> {
        if bytes[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = u16::from_be_bytes([bytes[4], bytes[5]]);
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        let kind = match bytes[6] {
            0 => StreamKind::Control,
            1 => StreamKind::Data,
            2 => StreamKind::Probe,
            3 => StreamKind::ProbeData,
            4 => StreamKind::Live,
            5 => StreamKind::Tunnel,
            other => return Err(WireError::UnknownStreamKind(other)),
        };
        Ok(Preamble { version, kind })
    }
}

/// Outcome of trying to decode from a buffer that may hold a partial frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole frame and how many bytes it used.
    Frame(T, usize),
    /// The buffer holds a prefix of a valid frame: read more.
    Incomplete,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trip_and_rejections() {
        let p = Preamble::new(StreamKind::Data);
        assert_eq!(Preamble::decode(&p.encode()).unwrap(), p);
        let mut bad = p.encode();
        bad[0] = b'X';
        assert_eq!(Preamble::decode(&bad), Err(WireError::BadMagic));
        let mut newer = p.encode();
        let next = PROTOCOL_VERSION + 1;
        newer[4..6].copy_from_slice(&next.to_be_bytes());
        assert_eq!(Preamble::decode(&newer), Err(WireError::UnsupportedVersion(next)));
        let mut older = p.encode();
        older[4..6].copy_from_slice(&(PROTOCOL_VERSION - 1).to_be_bytes());
        let e = Preamble::decode(&older).unwrap_err();
        assert_eq!(e, WireError::UnsupportedVersion(PROTOCOL_VERSION - 1));
        assert!(e.to_string().contains("upgrade the older side"), "{e}");
        let mut kind = p.encode();
        kind[6] = 7;
        assert_eq!(Preamble::decode(&kind), Err(WireError::UnknownStreamKind(7)));
    }
}
