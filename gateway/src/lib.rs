//! The library edge-agent and cloud-endpoint share: the migration protocol (a
//! state machine with no I/O), the wire format, chunking, compression and
//! integrity, and the QUIC transport that carries them.
//!
//! ```text
//! plan        what is migrated (VM, disks, NICs)
//! wire        bytes on the wire: preambles, control messages, chunk frames
//! chunk       zero detection, SHA-256, zstd (pure functions on buffers)
//! integrity   per-disk chunk hashes, checked on both sides before commit
//! merkle      RFC 6962-style Merkle roots over a disk's chunk hashes
//! receipt     the signed migration receipt the endpoint issues at commit
//! protocol    SenderSession / ReceiverSession: the sans-I/O state machines
//! transport   quinn + rustls configuration and framed stream I/O
//! qemu        QEMU processes, their command line and QMP: the hosts' hypervisor
//! ```
#![forbid(unsafe_code)]

pub mod chunk;
pub mod fuzzing;
pub mod integrity;
pub mod merkle;
pub mod plan;
pub mod protocol;
pub mod qemu;
pub mod receipt;
pub mod schedule;
pub mod transport;
pub mod tunnel;
pub mod wire;
