//! Control-stream messages: length-prefixed postcard encodings of
//! [`EdgeMessage`] and [`CloudMessage`].
//!
//! A frame is `len: u32 BE` then `len` bytes of body. The length is checked
//! against [`MAX_CONTROL_FRAME`] before anything is allocated; serde's
//! collection size hints are capped by postcard, so a lying inner length
//! cannot allocate more than the (bounded) frame either.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{Decoded, WireError};
use crate::plan::{MigrationPlan, MigrationReport};
use crate::schedule::SwitchoverWindow;

/// Largest control frame: a plan with hundreds of disks and NICs fits easily.
pub const MAX_CONTROL_FRAME: usize = 1024 * 1024;

/// Most chunks one [`EdgeMessage::HashQuery`] may ask about: 1024 hashes are 41 KiB on
/// the wire and 1 GiB of 1 MiB chunks, so a query is answered while the edge reads on,
/// and the cloud's work for one message (index look-ups, reads, writes) stays bounded.
pub const MAX_HASH_QUERY: usize = 1024;
const LEN_PREFIX: usize = 4;

/// Edge agent to cloud endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EdgeMessage {
    /// First message: who is asking, with a credential of the cloud domain.
    Hello {
        agent: String,
        user: String,
        password: String,
    },
    /// The VM to build, sent after `Welcome`.
    Plan(MigrationPlan),
    /// `count` consecutive all-zero chunks starting at `offset`: never sent as
    /// data, they stay holes in the destination.
    ZeroChunks { disk: u16, offset: u64, count: u64 },
    /// Every chunk of the disk has been sent or declared zero; `root` is the
    /// Merkle root over all chunk hashes in offset order (see [`crate::merkle`]).
    /// `frames`: the chunk frames of this disk the edge put on data streams over this
    /// connection, resends included (protocol version 12). The edge seals once its last
    /// chunk is sent, not acknowledged: the cloud holds the seal until that many frames
    /// arrived and are durable, then checks the root. A chunk rejected after the seal is
    /// sent again and the disk sealed again with the higher count.
    DiskSealed { disk: u16, root: [u8; 32], frames: u64 },
    /// All disks sealed and acknowledged: register the VM.
    Commit,
    /// The edge gives up; the cloud discards everything of this migration and
    /// confirms by closing the connection with [`RefusalCode::Aborted`].
    Abort { reason: String },
    /// Sent instead of `Plan` to continue a migration the cloud accepted
    /// before (a dropped link, a restarted edge or endpoint). `plan` must be
    /// the one the migration started with; the cloud answers `Resumed`.
    Resume { migration_id: String, plan: MigrationPlan },
    /// Sent instead of `Plan` to have the plan checked without staging
    /// anything: the cloud answers `Valid` or `Refused` with every problem,
    /// then the connection ends.
    Validate(MigrationPlan),
    /// Sent instead of `Plan` by `edge-agent abort`: discard `migration_id`, which
    /// this edge started and no longer means to finish. The cloud checks who asks
    /// (role, user, edge certificate) before it touches the migration; then it ends
    /// the connection that serves it (if any), discards its files and confirms by
    /// closing this connection with [`RefusalCode::Aborted`], or answers `Refused`
    /// and changes nothing. Added in protocol version 3: before, an abort was a
    /// `Resume` followed by `Abort`, and a refused one had already ended the
    /// migration's connection.
    AbortMigration { migration_id: String, reason: String },
    /// Sent instead of `Plan` to run a delta pass of a replication (`edge-agent
    /// replicate` again, or `switchover`): a `Resume` in which the edge may also send
    /// chunks the cloud holds, once each, when the source changed them since the last
    /// pass. Each replaced chunk is read back before the next `SyncDone` or `Commit`.
    /// `switchover`: the pass ends with `Switchover` (`edge-agent switchover`), so the
    /// cloud may read its replica back while the pass streams, and at the switchover read
    /// only what the pass replaced (protocol version 11; see [`crate::protocol`]).
    Sync {
        migration_id: String,
        plan: MigrationPlan,
        switchover: bool,
    },
    /// Sent instead of `Commit` when every disk is sealed and the migration is a
    /// replication: the cloud reads the staged disks back, keeps them as the
    /// replica of the source (not a registered VM), answers `Synced`, and the next
    /// pass continues from there.
    SyncDone,
    /// Sent instead of `Commit` by `edge-agent switchover` (protocol version 6): commit
    /// as `Commit` does, then power the VM on if asked, and answer `SwitchedOver` just
    /// before `Committed`. Sent again, like `Commit`, after a repair.
    Switchover(SwitchoverRequest),
    /// Sent instead of `Plan` by `edge-agent rollback` (`confirm: false`) and
    /// `edge-agent confirm` (`confirm: true`) for a switchover that awaits confirmation:
    /// the cloud checks who asks (as for `AbortMigration`), then either powers the VM
    /// off and keeps its disks as the replica again, or makes the switchover final.
    /// Answered by `SwitchoverEnded`, or `Refused` with nothing changed.
    EndSwitchover { migration_id: String, confirm: bool },
    /// Sent during a replication pass, before `SyncDone`: set (`Some`, Unix seconds)
    /// or clear (`None`) the time of the scheduled switchover the cloud holds.
    Schedule { switchover_at: Option<i64> },
    /// Deduplication (protocol version 8, only after a `PlanAccepted` with `dedup`):
    /// chunks of `disk` (offset, plaintext hash) the edge read and hashed but has not
    /// sent. The cloud copies those it holds on disks this user or edge may read,
    /// verifies each copy against its hash, and answers `HashAnswer`; it never copies a
    /// chunk across tenants. At most [`MAX_HASH_QUERY`] chunks, each asked once.
    HashQuery { disk: u16, chunks: Vec<(u64, [u8; 32])> },
    /// Sent during a replication pass, before `SyncDone` (protocol version 9): set
    /// (`Some`) or clear (`None`) the daily window the scheduled switchover must start
    /// in, which the cloud holds (the API can change it too).
    ScheduleWindow { window: Option<SwitchoverWindow> },
    /// `Sync` from an edge whose record says the migration's switchover awaits
    /// confirmation (protocol version 10): the switchover may have been rolled back or
    /// confirmed through the API since. The cloud never answers it with a replay of the
    /// commit (which is for an edge that lost the commit's answer): it runs the pass if
    /// the switchover was rolled back, and otherwise refuses, saying where it stands.
    /// `switchover` as for `Sync` (protocol version 11).
    SyncSwitchedOver {
        migration_id: String,
        plan: MigrationPlan,
        switchover: bool,
    },
}

/// What `edge-agent switchover` asks of the cloud beyond a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    /// Power the VM on on its host once it is registered.
    pub power_on: bool,
    /// Make the switchover final at once: no rollback (`edge-agent switchover --confirm`).
    pub confirm: bool,
    /// Milliseconds from the downtime's start to this message being sent: a duration,
    /// not a time, so the two clocks need not agree.
    pub downtime_so_far_ms: u64,
    /// What the downtime starts at (protocol version 10; version 9 had a bool here, whose
    /// `false` and `true` the first two variants encode as).
    pub downtime_from: DowntimeFrom,
}

/// What a switchover's downtime counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DowntimeFrom {
    /// The operator stopped the source before the switchover, and its files do not say
    /// when: the switchover's start (the real downtime is longer).
    SwitchoverStart,
    /// The edge stopped the source itself (a QEMU source, through QMP).
    EdgeStop,
    /// The operator stopped a VMware source before the switchover: the newest
    /// modification time of its files (.vmx, disks, .nvram, vmware.log), which a running
    /// VM writes until it stops. An estimate: the datastore's clock, not the edge's.
    SourceFilesWritten,
}

impl DowntimeFrom {
    /// As the migration record and the edge's summary say it.
    pub fn describe(self) -> &'static str {
        match self {
            DowntimeFrom::SwitchoverStart => "switchover started",
            DowntimeFrom::EdgeStop => "source stopped by the edge",
            DowntimeFrom::SourceFilesWritten => "source files last written",
        }
    }
}

/// The cloud's answer to [`SwitchoverRequest`], sent just before `Committed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverOutcome {
    /// The VM runs on its host.
    pub powered_on: bool,
    /// Why the power-on asked for failed (the VM stays registered, powered off).
    pub power_error: Option<String>,
    /// From the downtime's start to the VM running in the cloud, when it runs.
    pub downtime_ms: Option<u64>,
    /// The switchover can still be rolled back (`edge-agent rollback`) until it is
    /// confirmed (`edge-agent confirm`).
    pub awaiting_confirm: bool,
}

/// Cloud endpoint to edge agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloudMessage {
    /// Credential accepted.
    Welcome { endpoint: String, role: String },
    /// The plan passed every check; data may flow. `dedup`: the cloud holds disks this
    /// user or edge may reuse chunks of, so the edge asks (`HashQuery`) before it sends
    /// (protocol version 8).
    PlanAccepted {
        migration_id: String,
        datastore: String,
        dedup: bool,
    },
    /// The request cannot go on. Every problem found is listed at once.
    Refused { code: RefusalCode, problems: Vec<String> },
    /// Chunks verified and written.
    Acks { disk: u16, offsets: Vec<u64> },
    /// A chunk failed verification and was not written: send it again.
    Nack { disk: u16, offset: u64, reason: String },
    /// The VM is on disk and registered. `receipt` is the signed migration
    /// receipt as JSON (see [`crate::receipt`]), stored by the cloud too.
    Committed {
        vm_id: String,
        vm_path: String,
        receipt: String,
    },
    /// The migration continues: `done` has one bitmap per disk (bit `i` of
    /// byte `i / 8`, least significant first) of the chunks the cloud holds
    /// durably, written or zero. Everything else must be sent again.
    Resumed {
        migration_id: String,
        datastore: String,
        done: Vec<Vec<u8>>,
    },
    /// Answer to `Validate`: the plan passed every check; this is what a
    /// migration would create (the fields only a commit knows are `None`).
    Valid(MigrationReport),
    /// Sent just before `Committed`: what the migration created, as the
    /// cloud keeps it (NIC mapping, rules carried and not carried).
    Report(MigrationReport),
    /// Answer to `Commit` when the cloud read its staged disks back and found these
    /// chunks differ from what it acknowledged: send each again (with the content it
    /// had), seal the disk again with the same root, then commit again. Last in the
    /// enum: the variants before it kept their encoding.
    Repair { disk: u16, offsets: Vec<u64> },
    /// Answer to `SyncDone`: the replica holds the source as it was sealed, read back
    /// and durable. `delta_bytes` are the plaintext bytes this pass wrote;
    /// `switchover_at` (Unix seconds) is the scheduled switchover the cloud holds, if
    /// any (set by the edge's `Schedule` or through the API).
    Synced {
        delta_bytes: u64,
        switchover_at: Option<i64>,
        /// The daily window the switchover must start in, if the cloud holds one
        /// (protocol version 9).
        switchover_window: Option<SwitchoverWindow>,
    },
    /// Sent just before `Committed` when the edge asked with `Switchover`.
    SwitchedOver(SwitchoverOutcome),
    /// Answer to `EndSwitchover`: done; `message` says what the cloud did and what the
    /// operator may do next.
    SwitchoverEnded { message: String },
    /// Answer to one `HashQuery`, every chunk of it in one of two lists: `copied` chunks
    /// were copied from a disk in the cloud and verified against their hash (they are
    /// acknowledged like sent ones once durable); `send` chunks must be sent.
    HashAnswer {
        disk: u16,
        copied: Vec<u64>,
        send: Vec<u64>,
        /// Of `copied`, those read from the seed the plan named (protocol version 9):
        /// the edge reports them apart, as what the seed saved.
        seeded: Vec<u64>,
    },
}

/// Whether chunk `index` is set in a [`CloudMessage::Resumed`] bitmap.
pub fn bit(bitmap: &[u8], index: u64) -> bool {
    usize::try_from(index / 8)
        .ok()
        .and_then(|byte| bitmap.get(byte))
        .is_some_and(|b| b & (1 << (index % 8)) != 0)
}

/// Sets chunk `index` in a bitmap sized for its disk.
pub fn set_bit(bitmap: &mut [u8], index: u64) {
    if let Some(b) = usize::try_from(index / 8).ok().and_then(|byte| bitmap.get_mut(byte)) {
        *b |= 1 << (index % 8);
    }
}

/// Why the cloud refused; each code also closes the QUIC connection with the
/// matching application error code (see [`RefusalCode::close_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// Wrong user or password.
    BadCredentials,
    /// The user's role may not migrate.
    NotPermitted,
    /// The plan cannot be placed (name taken, no space, unmapped network...).
    PlanRejected,
    /// The peer broke the protocol.
    ProtocolViolation,
    /// Data failed verification too often or a disk's Merkle root did not match.
    IntegrityFailure,
    /// The endpoint failed (I/O, database) while writing or registering.
    EndpointFailure,
    /// Too many migrations are running; retry later.
    Busy,
    /// The edge agent aborted.
    Aborted,
    /// The endpoint stopped the migration but kept what arrived (its datastore
    /// is full, or a write failed): free the space and run the same migration
    /// again to resume.
    Paused,
    /// The migration to resume is not one the endpoint can continue (unknown,
    /// finished, expired or aborted): start a new migration.
    UnknownMigration,
}

impl RefusalCode {
    /// QUIC application close code for this refusal.
    pub fn close_code(self) -> u32 {
        match self {
            RefusalCode::BadCredentials => 0x101,
            RefusalCode::NotPermitted => 0x102,
            RefusalCode::PlanRejected => 0x103,
            RefusalCode::ProtocolViolation => 0x104,
            RefusalCode::IntegrityFailure => 0x105,
            RefusalCode::EndpointFailure => 0x106,
            RefusalCode::Busy => 0x107,
            RefusalCode::Aborted => 0x108,
            RefusalCode::Paused => 0x109,
            RefusalCode::UnknownMigration => 0x10a,
        }
    }

    pub fn from_close_code(code: u64) -> Option<Self> {
        use RefusalCode::*;
        [
            BadCredentials,
            NotPermitted,
            PlanRejected,
            ProtocolViolation,
            IntegrityFailure,
            EndpointFailure,
            Busy,
            Aborted,
            Paused,
            UnknownMigration,
        ]
        .into_iter()
        .find(|c| u64::from(c.close_code()) == code)
    }
}

/// Encodes a control message as one frame.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, WireError> {
    let body = postcard::to_stdvec(msg).map_err(|e| WireError::MalformedControl(e.to_string()))?;
    if body.len() > MAX_CONTROL_FRAME {
        return Err(WireError::FrameTooLarge {
            len: body.len() as u64,
            limit: MAX_CONTROL_FRAME as u64,
        });
    }
    let mut out = Vec::with_capacity(LEN_PREFIX + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads the length prefix of a control frame; errors if it is over the limit.
pub fn frame_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            limit: MAX_CONTROL_FRAME as u64,
        });
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix).
pub fn decode_body<M: DeserializeOwned>(body: &[u8]) -> Result<M, WireError> {
    let (msg, rest) = postcard::take_from_bytes::<M>(body).map_err(|e| WireError::MalformedControl(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::MalformedControl(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Decodes one frame from the front of `buf`, if it is all there.
pub fn decode<M: DeserializeOwned>(buf: &[u8]) -> Result<Decoded<M>, WireError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(Decoded::Incomplete);
    };
    let len = frame_len(prefix.try_into().expect("4 bytes"))?;
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(Decoded::Incomplete);
    };
    Ok(Decoded::Frame(decode_body(body)?, LEN_PREFIX + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{DiskSpec, VmSpec};

    fn plan() -> MigrationPlan {
        MigrationPlan {
            vm: VmSpec {
                name: "web01".into(),
                guest_os: "debian12_64Guest".into(),
                num_cpus: 2,
                cores_per_socket: None,
                memory_mib: 2048,
                firmware: Some("efi".into()),
                bios_uuid: None,
                nics: vec![],
                controllers: vec![],
                disks: vec![DiskSpec {
                    key: "scsi0:0".into(),
                    capacity: 1 << 30,
                }],
            },
            network_map: vec![("VM Network".into(), "cloud-web".into())],
            chunk_size: crate::plan::DEFAULT_CHUNK_SIZE,
            disk_format: None,
            firewall: Default::default(),
            placement: Default::default(),
            source_descriptor_sha256: Some([0x5d; 32]),
            seed: None,
        }
    }

    #[test]
    fn round_trip_every_prefix_is_incomplete() {
        let msg = EdgeMessage::Plan(plan());
        let frame = encode(&msg).unwrap();
        for cut in 0..frame.len() {
            assert_eq!(decode::<EdgeMessage>(&frame[..cut]).unwrap(), Decoded::Incomplete);
        }
        assert_eq!(decode::<EdgeMessage>(&frame).unwrap(), Decoded::Frame(msg, frame.len()));
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let prefix = ((MAX_CONTROL_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode::<EdgeMessage>(&prefix),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed() {
        let mut frame = vec![0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode::<CloudMessage>(&frame),
            Err(WireError::MalformedControl(_))
        ));
        frame = encode(&EdgeMessage::Commit).unwrap();
        frame.push(0);
        let len = frame.len() as u32 - 4;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode::<EdgeMessage>(&frame),
            Err(WireError::MalformedControl(_))
        ));
    }

    #[test]
    fn a_huge_inner_vector_length_cannot_allocate() {
        // Acks with a claimed 2^60 offsets but a 20-byte body.
        let mut body = vec![4u8, 0]; // variant Acks, disk 0
        body.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        assert!(decode::<CloudMessage>(&frame).is_err());
    }

    #[test]
    fn the_fuzz_seeds_are_whole_messages_of_todays_encoding() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/control_frame");
        let mut committed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            // Other seeds of the target (link-test probes) are checked by their module.
            let used = if name.starts_with("edge-") {
                match decode::<EdgeMessage>(&data) {
                    Ok(Decoded::Frame(_, used)) => used,
                    other => panic!("{name}: {other:?}"),
                }
            } else if name.starts_with("cloud-") {
                match decode::<CloudMessage>(&data) {
                    Ok(Decoded::Frame(msg, used)) => {
                        committed += usize::from(matches!(msg, CloudMessage::Committed { .. }));
                        used
                    }
                    other => panic!("{name}: {other:?}"),
                }
            } else {
                continue;
            };
            assert_eq!(used, data.len(), "{name} has trailing bytes");
        }
        assert_eq!(committed, 1, "a seed carries a Committed with its receipt");
    }

    #[test]
    fn close_codes_are_distinct_and_reversible() {
        for code in [
            RefusalCode::BadCredentials,
            RefusalCode::PlanRejected,
            RefusalCode::Aborted,
        ] {
            assert_eq!(RefusalCode::from_close_code(code.close_code().into()), Some(code));
        }
        assert_eq!(RefusalCode::from_close_code(0), None);
    }
}
