//! The cloud endpoint's side of one migration.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::ProtocolError;
use crate::chunk::ChunkError;
use crate::integrity::{hex, DiskHashes};
use crate::plan::{MigrationPlan, MigrationReport};
use crate::schedule::SwitchoverWindow;
use crate::wire::{ChunkHeader, CloudMessage, EdgeMessage, RefusalCode, SwitchoverOutcome, SwitchoverRequest};

/// Tunables of the receiving side.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Time from connection to the edge's Hello. Until then the peer has shown no
    /// credential: it should hold the connection only as long as a real edge needs to
    /// open its control stream and say who it is.
    pub hello_timeout: Duration,
    /// Time from connection to an accepted plan. Bounds what a half-open or
    /// idle client can hold (a reserved connection slot) without sending data.
    pub setup_timeout: Duration,
    /// Times one chunk may fail verification before the migration is failed:
    /// a link that corrupts the same chunk again and again is not a link to
    /// trust, and an edge that keeps sending bad data is misbehaving.
    pub max_rejects_per_chunk: u32,
    /// Which staged chunks are read back and checked against their hashes before
    /// the commit (see [`VerifyScope`]).
    pub verify: VerifyScope,
    /// Rounds of repair (re-requesting chunks found damaged in staging) before the
    /// migration fails: a datastore that damages the same data again is not one to
    /// register a VM on.
    pub max_repair_rounds: u32,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            hello_timeout: Duration::from_secs(10),
            setup_timeout: Duration::from_secs(30),
            max_rejects_per_chunk: 3,
            verify: VerifyScope::All,
            max_repair_rounds: 2,
        }
    }
}

/// What the cloud reads back from its staged disks before it registers a VM and signs a
/// receipt stating their Merkle roots. A receipt speaks of the bytes the cloud holds,
/// not of the hashes it recorded when they arrived: staged files can change while a
/// migration waits for a resume (a disk fault, a careless or hostile hand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyScope {
    /// Every chunk, zero chunks included (the default: about a fifth of a lift's CPU
    /// on a realistic disk, see the README's benchmark). For a pass that ends with the
    /// switchover, what the pass leaves alone is read while it streams
    /// ([`ReceiverEvent::VerifyEarly`]).
    All,
    /// Only chunks that were not written and verified over the current connection:
    /// those taken from the journal of an earlier one.
    Resumed,
}

/// What the driver must do for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// Check the credential; answer with [`ReceiverSession::authenticated`].
    Authenticate {
        agent: String,
        user: String,
        password: String,
    },
    /// Check the plan against the domain and prepare the staging area; answer
    /// with [`ReceiverSession::plan_accepted`] or [`ReceiverSession::refuse`].
    ValidatePlan(MigrationPlan),
    /// Check that this edge may continue `migration_id` with this (unchanged)
    /// plan, reopen its staged files and read its journal; answer with
    /// [`ReceiverSession::resume_accepted`] or [`ReceiverSession::refuse`].
    ValidateResume {
        migration_id: String,
        plan: MigrationPlan,
        /// The edge's record says the switchover awaits confirmation
        /// (`SyncSwitchedOver`): no replay of the commit.
        switched_over: bool,
    },
    /// Every disk is complete and its Merkle root matches the edge's: make the
    /// files durable, register the VM with a receipt stating the roots
    /// ([`ReceiverSession::disk_roots`]), then answer with
    /// [`ReceiverSession::finalized`].
    Finalize,
    /// The edge asked to commit and every disk's root matches: read back each of
    /// `chunks` (disk, chunk index, expected plaintext hash) from the staged files,
    /// rewrite the expected-zero ones that are not zero, and report the others that
    /// differ with [`ReceiverSession::staged_verified`].
    VerifyStaged { chunks: Vec<(u16, u64, [u8; 32])> },
    /// A delta pass that ends with the switchover was resumed: while it streams, read
    /// each of `chunks` (disk, chunk index, expected plaintext hash: every chunk the
    /// replica holds) back from the staged files, **without writing anything** (the pass
    /// writes the same files meanwhile; an expected-zero chunk that is not zero is only
    /// reported, the read-back at the switchover rewrites it), and report those whose
    /// bytes match with [`ReceiverSession::verified_early`]. The read-back at the
    /// switchover then leaves them out, unless the pass wrote them since this event.
    VerifyEarly { chunks: Vec<(u16, u64, [u8; 32])> },
    /// The migration ended without a VM: discard what was staged.
    Discard { reason: String },
    /// A replication's pass is complete and read back (`SyncDone`): keep the staged
    /// disks and journal as the replica, record the pass (`delta_bytes` written by
    /// it) and `schedule` (the edge's `Schedule`: `Some(None)` clears the scheduled
    /// switchover), then answer with [`ReceiverSession::replica_kept`] and the
    /// scheduled switchover the cloud holds.
    KeepReplica {
        delta_bytes: u64,
        schedule: Option<Option<i64>>,
    },
    /// The edge only asks whether the plan is valid: check it against the
    /// domain without staging or recording anything; answer with
    /// [`ReceiverSession::plan_checked`].
    CheckPlan(MigrationPlan),
    /// The edge asks to discard `migration_id` (`edge-agent abort`): check that
    /// it may, before touching the migration; then end whatever serves it and
    /// discard its files, and answer with [`ReceiverSession::migration_aborted`].
    AbortMigration { migration_id: String, reason: String },
    /// The edge asks to roll back (`confirm: false`) or confirm a switchover that awaits
    /// confirmation: check that it may, act, and answer with
    /// [`ReceiverSession::switchover_ended`].
    EndSwitchover { migration_id: String, confirm: bool },
    /// The edge asked whether the cloud holds these chunks of `disk` (offset, length,
    /// plaintext hash): copy each one found on a disk the migration's user or edge may
    /// read into the staged disk, verified against its hash after the read, and answer
    /// with [`ReceiverSession::lookup_done`] for every chunk of the list.
    Lookup {
        disk: u16,
        chunks: Vec<(u64, u32, [u8; 32])>,
    },
}

/// What to do with a chunk frame whose header was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Verify the payload and write it, then report `chunk_written` or
    /// `chunk_rejected`.
    Write,
    /// Already written or being written: read and drop the payload.
    Duplicate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Authenticating,
    AwaitPlan,
    Validating,
    /// Checking a plan the edge only wants validated.
    Checking,
    /// That plan was found valid and the answer sent.
    Checked,
    /// Checking whether the edge may abort a migration, then aborting it.
    Aborting,
    /// Checking whether the edge may roll back or confirm a switchover, then doing it.
    EndingSwitchover,
    /// The switchover was rolled back or confirmed and the answer sent.
    SwitchoverEnded,
    Streaming,
    /// Reading the staged disks back before the commit.
    Verifying,
    Finalizing,
    Done,
    /// A replication pass ended: the staged disks are kept as the replica.
    Synced,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitHello => "waiting for hello",
            Phase::Authenticating => "authenticating",
            Phase::AwaitPlan => "waiting for the plan",
            Phase::Validating => "validating the plan",
            Phase::Checking => "checking the plan",
            Phase::Checked => "plan checked",
            Phase::Aborting => "aborting a migration",
            Phase::Streaming => "streaming",
            Phase::Verifying => "verifying the staged disks",
            Phase::Finalizing => "finalizing",
            Phase::Done => "done",
            Phase::Synced => "synced",
            Phase::EndingSwitchover => "ending a switchover",
            Phase::SwitchoverEnded => "switchover ended",
            Phase::Failed => "failed",
        }
    }
}

/// Chunks verified and written but not yet known to be durable: the driver
/// syncs the disk files, records them in its journal, then reports them with
/// [`ReceiverSession::synced`]. Only then are data chunks acknowledged, so an
/// acknowledgement always means "on disk": after any break the edge re-sends
/// exactly what was not acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unsynced {
    /// (disk, offset, plaintext SHA-256).
    pub chunks: Vec<(u16, u64, [u8; 32])>,
    /// (disk, first offset, count) of runs the edge declared zero.
    pub zero_runs: Vec<(u16, u64, u64)>,
}

impl Unsynced {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.zero_runs.is_empty()
    }
}

/// Where a replica's chunk stands in the read-back ahead of a switchover (see
/// [`ReceiverEvent::VerifyEarly`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Early {
    /// Not read early, found different, or touched by the pass since: read back at the
    /// switchover.
    Unread,
    /// Asked of the driver, and not touched by the pass since.
    Reading,
    /// Read back early and found intact, and not touched by the pass since.
    Intact,
}

/// The read-back ahead of a switchover, for the whole session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EarlyRead {
    NotAsked,
    Running,
    Done,
}

/// What the driver reports once the VM is registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub vm_id: String,
    /// Datastore path of the .vmx.
    pub vm_path: String,
    /// The signed receipt as JSON (see [`crate::receipt`]).
    pub receipt: String,
    /// What the migration created, sent to the edge before `Committed`.
    pub report: Option<MigrationReport>,
}

#[derive(Debug)]
struct Disk {
    capacity: u64,
    hashes: DiskHashes,
    in_flight: HashMap<u64, [u8; 32]>,
    /// The Merkle root, both sides agreeing, once the disk is sealed.
    root: Option<[u8; 32]>,
    /// The root of the first seal: a disk re-sealed after a repair must state it again.
    first_root: Option<[u8; 32]>,
    /// Chunks being repaired (found damaged in staging) and the hash they must have.
    repairing: HashMap<u64, [u8; 32]>,
    /// Per chunk: its hash came from the journal of an earlier connection and it was
    /// not written again over this one. Empty unless resumed.
    from_journal: Vec<bool>,
    /// Chunks the cloud held that this delta pass replaced: at most once each.
    replaced: HashSet<u64>,
    /// Per chunk, the read-back ahead of a switchover. Empty unless one was asked.
    early: Vec<Early>,
    /// Chunk frames of this disk admitted over this connection (resends and duplicates
    /// included): a seal is checked once it is the count the edge states.
    frames: u64,
    /// Chunks rejected (`Nack`) and neither written nor declared zero since.
    nacked: HashSet<u64>,
    /// Chunks written (or copied) whose durability the driver has not reported yet.
    not_durable: u64,
    /// The edge's seal (root, frames), held until the frames it counts are durable.
    held_seal: Option<([u8; 32], u64)>,
}

impl Disk {
    /// Every one of the `frames` the edge's seal counts arrived and was written (or
    /// found a duplicate), none rejected since: durability aside, the seal can be checked.
    /// Fewer frames: the last ones are on their way. More: a chunk was sent again after
    /// the seal, and the edge seals again.
    fn frames_in(&self, frames: u64) -> bool {
        self.frames == frames && self.in_flight.is_empty() && self.nacked.is_empty()
    }

    /// The pass is about to change chunk `index` (or changed it): what the read-back
    /// ahead of the switchover found there no longer holds.
    fn touched(&mut self, index: u64) {
        if let Some(e) = self.early.get_mut(index as usize) {
            *e = Early::Unread;
        }
    }
}

/// One migration as the cloud endpoint sees it.
#[derive(Debug)]
pub struct ReceiverSession {
    config: ReceiverConfig,
    phase: Phase,
    hello_deadline: Instant,
    setup_deadline: Instant,
    plan: Option<MigrationPlan>,
    disks: Vec<Disk>,
    rejects: HashMap<(u16, u64), u32>,
    acks: BTreeMap<u16, Vec<u64>>,
    outbox: VecDeque<CloudMessage>,
    events: VecDeque<ReceiverEvent>,
    bytes_written: u64,
    /// Logical bytes (zero chunks included) of the chunks known to be durable:
    /// the migration's progress as an operator should read it.
    durable_bytes: u64,
    unsynced: Unsynced,
    /// The migration was paused (storage full, write error): what arrived is
    /// kept for a resume instead of discarded.
    paused: bool,
    /// The edge sent `Abort`.
    edge_aborted: bool,
    /// Repair rounds so far (see [`ReceiverConfig::max_repair_rounds`]).
    repair_rounds: u32,
    /// Chunks re-requested because staging did not hold what was sent.
    repaired_chunks: u64,
    /// A resume of a migration whose VM was registered before the edge heard of it
    /// (a link lost, or the endpoint stopped, during the commit): what to answer once the
    /// edge has sealed every disk with the registered roots.
    already_committed: Option<Registered>,
    /// A delta pass of a replication (`Sync`): chunks the cloud holds may be replaced.
    delta: bool,
    /// The edge sent `SyncDone`: after the read-back, keep the replica, register nothing.
    keep_replica: bool,
    /// The edge sent `Switchover` (instead of `Commit`), and when it arrived: the
    /// downtime the cloud reports counts on from there with the cloud's own clock.
    switchover: Option<(SwitchoverRequest, Instant)>,
    /// The edge's `Schedule` in this pass, if it sent one.
    schedule: Option<Option<i64>>,
    /// The edge's `ScheduleWindow` in this pass, if it sent one.
    window_schedule: Option<Option<SwitchoverWindow>>,
    /// The switchover window the cloud holds, for the `Synced` answer.
    held_window: Option<SwitchoverWindow>,
    /// What the driver did for the `Switchover` (see [`Self::switched_over`]).
    switchover_outcome: Option<SwitchoverOutcome>,
    /// `PlanAccepted` offered deduplication: the edge may send `HashQuery`.
    dedup: bool,
    /// Chunks asked about in `HashQuery` and not yet answered, per disk: each chunk is
    /// asked once, so this is bounded by the plan's chunk count.
    asked: HashMap<u16, HashSet<u64>>,
    /// Plaintext bytes copied inside the cloud instead of sent (deduplicated).
    dedup_bytes: u64,
    /// The request the edge sent right behind its hello (protocol version 11), and when
    /// it arrived: taken up once the credential is accepted, dropped if it is not.
    early_request: Option<(EdgeMessage, Instant)>,
    /// The edge said its delta pass ends with `Switchover` (in `Sync`).
    switchover_pass: bool,
    /// The read-back of the replica while the pass streams (see
    /// [`ReceiverEvent::VerifyEarly`]).
    early_read: EarlyRead,
    /// The commit arrived while the early read-back ran: the read-back at the commit is
    /// asked for once it is reported.
    verify_after_early: bool,
    /// `Commit`, `Switchover` or `SyncDone` that came while a seal was held, and when:
    /// taken up once every seal is checked (protocol version 12).
    held_finish: Option<(EdgeMessage, Instant)>,
}

impl ReceiverSession {
    /// A session for a connection made at `now` (its deadlines count from then).
    pub fn new(config: ReceiverConfig, now: Instant) -> Self {
        ReceiverSession {
            hello_deadline: now + config.hello_timeout.min(config.setup_timeout),
            setup_deadline: now + config.setup_timeout,
            config,
            phase: Phase::AwaitHello,
            plan: None,
            disks: Vec::new(),
            rejects: HashMap::new(),
            acks: BTreeMap::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            bytes_written: 0,
            durable_bytes: 0,
            unsynced: Unsynced::default(),
            paused: false,
            edge_aborted: false,
            repair_rounds: 0,
            repaired_chunks: 0,
            already_committed: None,
            delta: false,
            keep_replica: false,
            switchover: None,
            schedule: None,
            window_schedule: None,
            held_window: None,
            switchover_outcome: None,
            dedup: false,
            asked: HashMap::new(),
            dedup_bytes: 0,
            early_request: None,
            switchover_pass: false,
            early_read: EarlyRead::NotAsked,
            verify_after_early: false,
            held_finish: None,
        }
    }

    /// Plaintext bytes copied inside the cloud from disks it held instead of sent.
    pub fn dedup_bytes(&self) -> u64 {
        self.dedup_bytes
    }

    /// Every chunk hash of each disk, in plan order, once every disk is sealed: what the
    /// cloud indexes for later deduplication.
    pub fn disk_hashes(&self) -> Option<Vec<&DiskHashes>> {
        self.disks
            .iter()
            .map(|d| (d.hashes.missing() == 0).then_some(&d.hashes))
            .collect()
    }

    /// The driver copied (`true`) or could not copy (`false`) each chunk of a
    /// [`ReceiverEvent::Lookup`] of `disk`. Copied chunks count as verified and written
    /// (acknowledged once durable); the others are to be sent, as the answer says.
    pub fn lookup_done(&mut self, disk: u16, results: Vec<(u64, bool)>) {
        self.lookup_done_seeded(disk, results, &[]);
    }

    /// [`Self::lookup_done`], where `seeded` (offsets, a subset of the copied ones) were
    /// copied from the seed the plan named: the answer tells the edge so.
    pub fn lookup_done_seeded(&mut self, disk: u16, results: Vec<(u64, bool)>, seeded: &[u64]) {
        let cs = u64::from(self.plan.as_ref().map_or(0, |p| p.chunk_size));
        let Some(d) = self.disks.get_mut(usize::from(disk)) else {
            return;
        };
        let asked = self.asked.entry(disk).or_default();
        let (mut copied, mut send) = (Vec::new(), Vec::new());
        let mut bytes = 0;
        let mut written = Vec::new();
        for (offset, ok) in results {
            let index = offset / cs;
            if !asked.remove(&index) {
                continue;
            }
            let Some(hash) = d.in_flight.remove(&index) else {
                continue;
            };
            if ok {
                d.hashes.set(index, hash);
                d.touched(index);
                if let Some(f) = d.from_journal.get_mut(index as usize) {
                    *f = false;
                }
                bytes += (d.capacity - offset).min(cs);
                d.not_durable += 1;
                written.push((disk, offset, hash));
                copied.push(offset);
            } else {
                send.push(offset);
            }
        }
        self.bytes_written += bytes;
        self.dedup_bytes += bytes;
        self.unsynced.chunks.extend(written);
        let was_copied: std::collections::HashSet<u64> = copied.iter().copied().collect();
        let seeded = seeded.iter().copied().filter(|o| was_copied.contains(o)).collect();
        self.outbox.push_back(CloudMessage::HashAnswer {
            disk,
            copied,
            send,
            seeded,
        });
    }

    /// What the edge asked with `Switchover` and when it arrived; `None` for a plain
    /// commit (or before the commit).
    pub fn switchover(&self) -> Option<&(SwitchoverRequest, Instant)> {
        self.switchover.as_ref()
    }

    /// Whether this connection runs a delta pass of a replication.
    pub fn is_delta(&self) -> bool {
        self.delta
    }

    /// Chunks found damaged in staging by the read-back and sent again by the edge.
    pub fn repaired_chunks(&self) -> u64 {
        self.repaired_chunks
    }

    /// Whether the edge aborted the migration (it waits for the cloud to
    /// confirm the discard by closing the connection).
    pub fn edge_aborted(&self) -> bool {
        self.edge_aborted
    }

    /// Whether what was staged must be kept for a resume when the connection
    /// ends now: the plan was accepted, and the migration neither committed
    /// nor was refused or aborted (a lost link, a killed edge), or it was
    /// paused on purpose ([`Self::pause`]).
    pub fn is_resumable(&self) -> bool {
        matches!(self.phase, Phase::Streaming | Phase::Verifying | Phase::Synced)
            || (self.phase == Phase::Failed && self.paused)
    }

    /// The accepted plan, once there is one.
    pub fn plan(&self) -> Option<&MigrationPlan> {
        self.plan.as_ref()
    }

    /// Plaintext bytes verified and written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Logical bytes of the plan's disks held durably (written, synced and
    /// journaled, or declared zero and journaled), resumed ones included. A
    /// chunk re-sent after a resume may be counted twice, so the figure is
    /// capped at the plan's size.
    pub fn durable_bytes(&self) -> u64 {
        let total = self.plan.as_ref().map_or(0, MigrationPlan::logical_bytes);
        self.durable_bytes.min(total)
    }

    /// Plaintext length of chunk `index` of `disk` (0 outside the plan).
    fn chunk_bytes(&self, disk: u16, offset: u64, count: u64) -> u64 {
        let (Some(plan), Some(d)) = (self.plan.as_ref(), self.disks.get(usize::from(disk))) else {
            return 0;
        };
        let end = offset.saturating_add(count.saturating_mul(u64::from(plan.chunk_size)));
        end.min(d.capacity).saturating_sub(offset)
    }

    /// True once the session reached an end (committed or failed).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.phase,
            Phase::Done | Phase::Checked | Phase::Synced | Phase::SwitchoverEnded | Phase::Failed
        )
    }

    /// Whether a replication pass ended with the replica kept.
    pub fn is_synced(&self) -> bool {
        self.phase == Phase::Synced
    }

    pub fn is_committed(&self) -> bool {
        self.phase == Phase::Done
    }

    fn unexpected(&self, message: &'static str) -> ProtocolError {
        ProtocolError::Unexpected {
            message,
            phase: self.phase.name(),
        }
    }

    /// A control message from the edge.
    pub fn handle_control(&mut self, msg: EdgeMessage, now: Instant) -> Result<(), ProtocolError> {
        let res = self.on_control(msg, now);
        if let Err(e) = &res {
            self.fail(e.code(), vec![e.to_string()]);
        }
        res
    }

    fn on_control(&mut self, msg: EdgeMessage, now: Instant) -> Result<(), ProtocolError> {
        if self.phase == Phase::Authenticating && is_request(&msg) {
            // Sent without waiting for the welcome: held, never looked at, until the
            // credential is accepted. One request per connection, as after a welcome.
            if self.early_request.is_some() {
                return Err(self.unexpected("a second request"));
            }
            self.early_request = Some((msg, now));
            return Ok(());
        }
        match msg {
            EdgeMessage::Hello { agent, user, password } => {
                if self.phase != Phase::AwaitHello {
                    return Err(self.unexpected("Hello"));
                }
                self.phase = Phase::Authenticating;
                self.events
                    .push_back(ReceiverEvent::Authenticate { agent, user, password });
            }
            EdgeMessage::Plan(plan) => {
                if self.phase != Phase::AwaitPlan {
                    return Err(self.unexpected("Plan"));
                }
                plan.check_limits()?;
                self.phase = Phase::Validating;
                self.events.push_back(ReceiverEvent::ValidatePlan(plan.clone()));
                self.plan = Some(plan);
            }
            EdgeMessage::Resume { migration_id, plan } => self.on_resume(migration_id, plan, false, false)?,
            EdgeMessage::Sync {
                migration_id,
                plan,
                switchover,
            } => {
                self.on_resume(migration_id, plan, true, false)?;
                self.switchover_pass = switchover;
            }
            EdgeMessage::SyncSwitchedOver {
                migration_id,
                plan,
                switchover,
            } => {
                self.on_resume(migration_id, plan, true, true)?;
                self.switchover_pass = switchover;
            }
            EdgeMessage::AbortMigration { migration_id, reason } => {
                if self.phase != Phase::AwaitPlan {
                    return Err(self.unexpected("AbortMigration"));
                }
                self.phase = Phase::Aborting;
                self.events
                    .push_back(ReceiverEvent::AbortMigration { migration_id, reason });
            }
            EdgeMessage::EndSwitchover { migration_id, confirm } => {
                if self.phase != Phase::AwaitPlan {
                    return Err(self.unexpected("EndSwitchover"));
                }
                self.phase = Phase::EndingSwitchover;
                self.events
                    .push_back(ReceiverEvent::EndSwitchover { migration_id, confirm });
            }
            EdgeMessage::Schedule { switchover_at } => {
                if self.phase != Phase::Streaming {
                    return Err(self.unexpected("Schedule"));
                }
                self.schedule = Some(switchover_at);
            }
            EdgeMessage::ScheduleWindow { window } => {
                if self.phase != Phase::Streaming {
                    return Err(self.unexpected("ScheduleWindow"));
                }
                self.window_schedule = Some(window);
            }
            EdgeMessage::HashQuery { disk, chunks } => {
                if self.phase != Phase::Streaming || !self.dedup {
                    return Err(self.unexpected("HashQuery"));
                }
                self.on_hash_query(disk, chunks)?;
            }
            EdgeMessage::Validate(plan) => {
                if self.phase != Phase::AwaitPlan {
                    return Err(self.unexpected("Validate"));
                }
                plan.check_limits()?;
                self.phase = Phase::Checking;
                self.events.push_back(ReceiverEvent::CheckPlan(plan));
            }
            EdgeMessage::ZeroChunks { disk, offset, count } => {
                if self.phase != Phase::Streaming {
                    return Err(self.unexpected("ZeroChunks"));
                }
                let delta = self.delta;
                let (d, chunk_size) = self.disk_mut(disk)?;
                let first = offset / u64::from(chunk_size);
                let end = first.checked_add(count);
                if !offset.is_multiple_of(u64::from(chunk_size))
                    || count == 0
                    || end.is_none_or(|end| end > d.hashes.chunk_count())
                {
                    return Err(ProtocolError::OutsidePlan(format!(
                        "zero run of {count} chunks at offset {offset} does not fit disk {disk} of {} bytes",
                        d.capacity
                    )));
                }
                // A chunk's state is set once. The edge declares each chunk zero once per
                // connection, and after a resume only those the cloud's bitmap lacks, so a
                // chunk already known can only come from a broken or hostile edge: it is
                // refused, not ignored, which bounds what one session journals (one record
                // per chunk) and the work a peer can ask for (one pass over the plan)
                // whatever it sends. The whole run is checked before anything is set.
                for index in first..first + count {
                    if d.repairing.contains_key(&index) {
                        return Err(ProtocolError::Integrity(format!(
                            "disk {disk} chunk at offset {} was sent as data before and is declared zero now: the source changed during the migration; abort it and migrate again",
                            index * u64::from(chunk_size)
                        )));
                    }
                    if d.in_flight.contains_key(&index) {
                        return Err(ProtocolError::OutsidePlan(format!(
                            "disk {disk} chunk at offset {} declared zero while data for it is being written",
                            index * u64::from(chunk_size)
                        )));
                    }
                    if let Some(existing) = d.hashes.get(index) {
                        // A delta pass of a replication may turn a chunk the replica
                        // holds as data into zeros, once.
                        let zero = d.hashes.zero_hash(index);
                        if delta && existing != zero && !d.replaced.contains(&index) {
                            continue;
                        }
                        let what = if existing == zero {
                            "declared zero again (each chunk is declared once)"
                        } else if delta {
                            "declared zero after data was written there in this pass"
                        } else {
                            "declared zero after data was written there"
                        };
                        return Err(ProtocolError::OutsidePlan(format!(
                            "disk {disk} chunk at offset {} {what}",
                            index * u64::from(chunk_size)
                        )));
                    }
                }
                for index in first..first + count {
                    let zero = d.hashes.zero_hash(index);
                    d.touched(index);
                    if d.hashes.get(index).is_some() {
                        // Replaced in a delta pass: the replica's file still holds the
                        // old data there; the read-back before the pass ends finds it and
                        // writes zeros, whatever the verify scope.
                        d.replaced.insert(index);
                        if d.from_journal.is_empty() {
                            d.from_journal = vec![false; d.hashes.chunk_count() as usize];
                        }
                        d.from_journal[index as usize] = true;
                    }
                    d.hashes.set(index, zero);
                    d.nacked.remove(&index);
                }
                self.unsynced.zero_runs.push((disk, offset, count));
                self.release_seals()?;
            }
            EdgeMessage::DiskSealed { disk, root, frames } => {
                if self.phase != Phase::Streaming {
                    return Err(self.unexpected("DiskSealed"));
                }
                let (d, _) = self.disk_mut(disk)?;
                if d.root.is_some() {
                    return Err(ProtocolError::OutsidePlan(format!("disk {disk} sealed twice")));
                }
                // Sealed again after a chunk was rejected: this one counts the resend.
                d.held_seal = Some((root, frames));
                self.release_seals()?;
            }
            EdgeMessage::SyncDone | EdgeMessage::Commit | EdgeMessage::Switchover(_)
                if self.phase == Phase::Streaming && self.disks.iter().any(|d| d.held_seal.is_some()) =>
            {
                // The disks were sealed as their last chunks were sent: this waits for
                // those chunks (see `release_seals`). One end per pass.
                if self.held_finish.is_some() {
                    return Err(self.unexpected("a second commit"));
                }
                self.held_finish = Some((msg, now));
            }
            EdgeMessage::SyncDone => {
                if self.phase != Phase::Streaming || self.already_committed.is_some() {
                    return Err(self.unexpected("SyncDone"));
                }
                if let Some(i) = self.disks.iter().position(|d| d.root.is_none()) {
                    return Err(ProtocolError::Integrity(format!(
                        "sync done before disk {i} was sealed"
                    )));
                }
                self.keep_replica = true;
                self.phase = Phase::Verifying;
                let chunks = self.verification_chunks();
                self.events.push_back(ReceiverEvent::VerifyStaged { chunks });
            }
            EdgeMessage::Commit | EdgeMessage::Switchover(_) => {
                if self.phase != Phase::Streaming {
                    return Err(self.unexpected("Commit"));
                }
                self.keep_replica = false;
                if let EdgeMessage::Switchover(request) = msg {
                    // Sent again after a repair: the downtime counts from the first.
                    let since = self.switchover.as_ref().map_or(now, |(_, at)| *at);
                    let first = self
                        .switchover
                        .as_ref()
                        .map_or(request.downtime_so_far_ms, |(r, _)| r.downtime_so_far_ms);
                    self.switchover = Some((
                        SwitchoverRequest {
                            downtime_so_far_ms: first,
                            ..request
                        },
                        since,
                    ));
                }
                if let Some(i) = self.disks.iter().position(|d| d.root.is_none()) {
                    return Err(ProtocolError::Integrity(format!("commit before disk {i} was sealed")));
                }
                if let Some(registered) = self.already_committed.take() {
                    self.phase = Phase::Finalizing;
                    self.finalized(Ok(registered));
                    return Ok(());
                }
                self.phase = Phase::Verifying;
                if self.early_read == EarlyRead::Running {
                    // The early read-back is still going: it goes on, and the read-back
                    // at the commit waits for it and reads only what it did not find
                    // intact. Stopping it instead would leave its remaining chunks to the
                    // read-back now, the same reads on the same disks, and a chunk read
                    // both ways is read twice: waiting costs no more than that and never
                    // reads a chunk twice.
                    self.verify_after_early = true;
                } else {
                    let chunks = self.verification_chunks();
                    self.events.push_back(ReceiverEvent::VerifyStaged { chunks });
                }
            }
            EdgeMessage::Abort { reason } => {
                if !self.is_finished() {
                    self.edge_aborted = true;
                    self.phase = Phase::Failed;
                    self.events.push_back(ReceiverEvent::Discard {
                        reason: format!("aborted by the edge agent: {reason}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks every held seal whose frames all arrived and are durable, then takes up
    /// the commit (or `SyncDone`) that waited for them. Called whenever a chunk is
    /// written, made durable or declared zero, and when a seal arrives.
    fn release_seals(&mut self) -> Result<(), ProtocolError> {
        if self.phase != Phase::Streaming {
            return Ok(());
        }
        for disk in 0..self.disks.len() {
            let d = &mut self.disks[disk];
            let Some((root, frames)) = d.held_seal else {
                continue;
            };
            if !d.frames_in(frames) || d.not_durable != 0 {
                continue;
            }
            d.held_seal = None;
            self.check_seal(disk as u16, root)?;
        }
        if self.disks.iter().all(|d| d.held_seal.is_none()) {
            if let Some((msg, at)) = self.held_finish.take() {
                return self.on_control(msg, at);
            }
        }
        Ok(())
    }

    /// Whether a held seal waits only for written chunks to be made durable: the driver
    /// then syncs at once rather than after its quiet interval.
    pub fn seal_waits_for_sync(&self) -> bool {
        self.disks.iter().any(|d| {
            d.held_seal
                .is_some_and(|(_, frames)| d.frames_in(frames) && d.not_durable != 0)
        })
    }

    /// The seal of `disk` against what the cloud holds: every chunk received or declared
    /// zero, and the Merkle root the edge's.
    fn check_seal(&mut self, disk: u16, root: [u8; 32]) -> Result<(), ProtocolError> {
        let committed = self.already_committed.is_some();
        let (d, _) = self.disk_mut(disk)?;
        if committed {
            let registered = d.first_root.unwrap_or_default();
            if registered != root {
                return Err(ProtocolError::Integrity(format!(
                    "disk {disk} Merkle root {} differs from the {} the registered VM's receipt states: the source changed since it was migrated",
                    hex(&root),
                    hex(&registered)
                )));
            }
            d.root = Some(root);
            return Ok(());
        }
        let Some(ours) = d.hashes.merkle_root() else {
            return Err(ProtocolError::Integrity(format!(
                "disk {disk} sealed with {} of {} chunks neither received nor declared zero",
                d.hashes.missing(),
                d.hashes.chunk_count()
            )));
        };
        if ours != root {
            return Err(ProtocolError::Integrity(format!(
                "disk {disk} Merkle root {} differs from the edge's {}",
                hex(&ours),
                hex(&root)
            )));
        }
        if d.first_root.is_some_and(|first| first != ours) {
            return Err(ProtocolError::Integrity(format!(
                "disk {disk} re-sealed after a repair with root {}, not the {} it was sealed with",
                hex(&ours),
                hex(&d.first_root.unwrap_or_default())
            )));
        }
        d.root = Some(ours);
        d.first_root = Some(ours);
        Ok(())
    }

    /// `Resume`, or `Sync` (`delta`), or `SyncSwitchedOver` (`switched_over`): continue a
    /// migration the cloud accepted before.
    fn on_resume(
        &mut self,
        migration_id: String,
        plan: MigrationPlan,
        delta: bool,
        switched_over: bool,
    ) -> Result<(), ProtocolError> {
        if self.phase != Phase::AwaitPlan {
            return Err(self.unexpected(if delta { "Sync" } else { "Resume" }));
        }
        plan.check_limits()?;
        self.delta = delta;
        self.phase = Phase::Validating;
        self.events.push_back(ReceiverEvent::ValidateResume {
            migration_id,
            plan: plan.clone(),
            switched_over,
        });
        self.plan = Some(plan);
        Ok(())
    }

    fn disk_mut(&mut self, disk: u16) -> Result<(&mut Disk, u32), ProtocolError> {
        let chunk_size = self.plan.as_ref().map_or(0, |p| p.chunk_size);
        let count = self.disks.len();
        self.disks
            .get_mut(usize::from(disk))
            .map(|d| (d, chunk_size))
            .ok_or_else(|| ProtocolError::OutsidePlan(format!("disk {disk} does not exist (plan has {count})")))
    }

    /// The driver checked the credential.
    pub fn authenticated(&mut self, result: Result<String, (RefusalCode, String)>, endpoint: &str) {
        if self.phase != Phase::Authenticating {
            return;
        }
        match result {
            Ok(role) => {
                self.phase = Phase::AwaitPlan;
                self.outbox.push_back(CloudMessage::Welcome {
                    endpoint: endpoint.to_owned(),
                    role,
                });
                if let Some((request, at)) = self.early_request.take() {
                    // As if it came now: the same checks as a request after the welcome.
                    let _ = self.handle_control(request, at);
                }
            }
            Err((code, problem)) => {
                self.early_request = None;
                self.fail(code, vec![problem]);
            }
        }
    }

    fn start_streaming(&mut self) {
        let plan = self.plan.as_ref().expect("validating has a plan");
        self.disks = plan
            .vm
            .disks
            .iter()
            .map(|d| Disk {
                capacity: d.capacity,
                hashes: DiskHashes::new(d.capacity, plan.chunk_size),
                in_flight: HashMap::new(),
                root: None,
                first_root: None,
                repairing: HashMap::new(),
                from_journal: Vec::new(),
                replaced: HashSet::new(),
                early: Vec::new(),
                frames: 0,
                nacked: HashSet::new(),
                not_durable: 0,
                held_seal: None,
            })
            .collect();
        self.phase = Phase::Streaming;
    }

    /// The driver validated the plan and staged its files: data may flow.
    /// `dedup`: the driver holds disks this user or edge may reuse chunks of, and will
    /// answer [`ReceiverEvent::Lookup`]s.
    pub fn plan_accepted(&mut self, migration_id: String, datastore: String, dedup: bool) {
        if self.phase != Phase::Validating {
            return;
        }
        self.start_streaming();
        self.dedup = dedup;
        self.outbox.push_back(CloudMessage::PlanAccepted {
            migration_id,
            datastore,
            dedup,
        });
    }

    /// The driver reopened a migration's staged files; `durable` is what its
    /// journal holds, one table per disk of the plan (zero chunks with their zero
    /// hash): its size is the plan's, whatever the journal held. A table of another
    /// shape than the plan's disk is ignored (the journal is checked when read; this
    /// only keeps the session's invariants).
    pub fn resume_accepted(&mut self, migration_id: String, datastore: String, durable: Vec<DiskHashes>) {
        if self.phase != Phase::Validating {
            return;
        }
        self.start_streaming();
        let chunk_size = self.plan.as_ref().map_or(0, |p| u64::from(p.chunk_size));
        let mut done = Vec::with_capacity(self.disks.len());
        let mut durable_bytes = 0;
        let mut tables = durable.into_iter();
        for d in &mut self.disks {
            let count = d.hashes.chunk_count();
            let mut bitmap = vec![0u8; count.div_ceil(8) as usize];
            if let Some(table) = tables.next().filter(|t| t.shape() == d.hashes.shape() && t.known() > 0) {
                d.from_journal = (0..count).map(|i| table.is_known(i)).collect();
                for index in (0..count).filter(|&i| table.is_known(i)) {
                    crate::wire::set_bit(&mut bitmap, index);
                    durable_bytes += (d.capacity - index * chunk_size).min(chunk_size);
                }
                d.hashes = table;
            }
            done.push(bitmap);
        }
        self.durable_bytes = durable_bytes;
        self.outbox.push_back(CloudMessage::Resumed {
            migration_id,
            datastore,
            done,
        });
        if self.delta && self.switchover_pass {
            self.verify_early();
        }
    }

    /// A pass that ends with the switchover: the switchover reads the whole replica back
    /// before the VM is registered, and most of it is what the replica held before this
    /// pass, which the pass leaves alone. Reading that now, while the pass streams, takes
    /// it off the downtime: at the switchover only what the pass wrote (and what was not
    /// found intact now) is read.
    fn verify_early(&mut self) {
        let mut chunks = Vec::new();
        for (disk, d) in self.disks.iter_mut().enumerate() {
            let count = d.hashes.chunk_count();
            d.early = vec![Early::Unread; count as usize];
            for index in 0..count {
                if let Some(hash) = d.hashes.get(index) {
                    d.early[index as usize] = Early::Reading;
                    chunks.push((disk as u16, index, hash));
                }
            }
        }
        if chunks.is_empty() {
            return;
        }
        self.early_read = EarlyRead::Running;
        self.events.push_back(ReceiverEvent::VerifyEarly { chunks });
    }

    /// The driver read the replica back for a [`ReceiverEvent::VerifyEarly`]: `intact`
    /// (disk, chunk index) are the chunks whose bytes matched their hash; every other
    /// chunk of the event is read back at the switchover, as is any the pass touched
    /// since the event (whatever the driver found there). If the commit came meanwhile,
    /// its read-back is asked for now.
    pub fn verified_early(&mut self, intact: Vec<(u16, u64)>) {
        if self.early_read != EarlyRead::Running {
            return;
        }
        self.early_read = EarlyRead::Done;
        for (disk, index) in intact {
            if let Some(e) = self
                .disks
                .get_mut(usize::from(disk))
                .and_then(|d| d.early.get_mut(index as usize))
            {
                if *e == Early::Reading {
                    *e = Early::Intact;
                }
            }
        }
        for d in &mut self.disks {
            for e in d.early.iter_mut().filter(|e| **e == Early::Reading) {
                *e = Early::Unread;
            }
        }
        if self.verify_after_early && self.phase == Phase::Verifying {
            self.verify_after_early = false;
            let chunks = self.verification_chunks();
            self.events.push_back(ReceiverEvent::VerifyStaged { chunks });
        }
    }

    /// Chunks the read-back ahead of the switchover found intact and the pass left alone
    /// since: the read-back at the switchover does not read them again.
    pub fn verified_early_chunks(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| d.early.iter().filter(|e| **e == Early::Intact).count() as u64)
            .sum()
    }

    /// The driver found the migration to resume already committed: its VM is registered
    /// (`registered`, with the receipt as issued), with `roots` per disk. The edge is told
    /// the cloud holds every chunk; once it seals each disk with the root it computes
    /// from its source and that root is the registered one, its commit is answered with
    /// the stored report and receipt. Nothing is written or registered again.
    pub fn resume_committed(
        &mut self,
        migration_id: String,
        datastore: String,
        roots: &[[u8; 32]],
        registered: Registered,
    ) {
        if self.phase != Phase::Validating {
            return;
        }
        self.start_streaming();
        if roots.len() != self.disks.len() {
            self.fail(
                RefusalCode::EndpointFailure,
                vec![format!(
                    "migration {migration_id} is registered with {} disks' roots, the plan has {} disks",
                    roots.len(),
                    self.disks.len()
                )],
            );
            return;
        }
        let mut done = Vec::new();
        for (d, root) in self.disks.iter_mut().zip(roots) {
            d.first_root = Some(*root);
            let count = d.hashes.chunk_count();
            let mut bitmap = vec![0u8; count.div_ceil(8) as usize];
            for index in 0..count {
                crate::wire::set_bit(&mut bitmap, index);
            }
            done.push(bitmap);
        }
        self.durable_bytes = self.plan.as_ref().map_or(0, MigrationPlan::logical_bytes);
        self.already_committed = Some(registered);
        self.outbox.push_back(CloudMessage::Resumed {
            migration_id,
            datastore,
            done,
        });
    }

    /// The driver checked a plan the edge only wanted validated: `Ok` is what a
    /// migration would create, `Err` the refusal with every problem.
    pub fn plan_checked(&mut self, result: Result<MigrationReport, (RefusalCode, Vec<String>)>) {
        if self.phase != Phase::Checking {
            return;
        }
        match result {
            Ok(report) => {
                self.phase = Phase::Checked;
                self.outbox.push_back(CloudMessage::Valid(report));
            }
            Err((code, problems)) => self.fail(code, problems),
        }
    }

    /// The driver handled an edge's `AbortMigration`: `Ok` once the migration is
    /// discarded (the driver confirms by closing the connection with
    /// [`RefusalCode::Aborted`]), `Err` the refusal, with nothing changed.
    pub fn migration_aborted(&mut self, result: Result<(), (RefusalCode, Vec<String>)>) {
        if self.phase != Phase::Aborting {
            return;
        }
        match result {
            Ok(()) => {
                self.edge_aborted = true;
                self.phase = Phase::Failed;
            }
            Err((code, problems)) => self.fail(code, problems),
        }
    }

    /// The driver cannot store more (datastore full, a write failed): the
    /// migration stops with `problems` but keeps what arrived, to be resumed.
    pub fn pause(&mut self, problems: Vec<String>) {
        if matches!(self.phase, Phase::Streaming | Phase::Verifying) {
            self.paused = true;
            self.phase = Phase::Failed;
            self.outbox.push_back(CloudMessage::Refused {
                code: RefusalCode::Paused,
                problems,
            });
        }
    }

    /// Chunks written (and zero runs declared) since the last call, to be
    /// made durable and then reported with [`Self::synced`].
    pub fn take_unsynced(&mut self) -> Unsynced {
        std::mem::take(&mut self.unsynced)
    }

    /// How many chunks and zero runs wait to be made durable (see [`Self::take_unsynced`]).
    pub fn unsynced_len(&self) -> usize {
        self.unsynced.chunks.len() + self.unsynced.zero_runs.len()
    }

    /// The driver made `batch` durable: acknowledge its data chunks.
    pub fn synced(&mut self, batch: &Unsynced) {
        if !matches!(self.phase, Phase::Streaming | Phase::Verifying | Phase::Finalizing) {
            return;
        }
        for &(disk, offset, _) in &batch.chunks {
            self.acks.entry(disk).or_default().push(offset);
            self.durable_bytes += self.chunk_bytes(disk, offset, 1);
            if let Some(d) = self.disks.get_mut(usize::from(disk)) {
                d.not_durable = d.not_durable.saturating_sub(1);
            }
        }
        for &(disk, first, count) in &batch.zero_runs {
            self.durable_bytes += self.chunk_bytes(disk, first, count);
        }
        self.release_seals_or_fail();
    }

    /// Ends the migration with a refusal sent to the edge (bad plan, failed
    /// write, lost database...). Anything staged must be discarded.
    pub fn refuse(&mut self, code: RefusalCode, problems: Vec<String>) {
        self.fail(code, problems);
    }

    fn fail(&mut self, code: RefusalCode, problems: Vec<String>) {
        if self.is_finished() {
            return;
        }
        let staged = matches!(self.phase, Phase::Streaming | Phase::Verifying | Phase::Finalizing);
        self.phase = Phase::Failed;
        self.outbox.push_back(CloudMessage::Refused {
            code,
            problems: problems.clone(),
        });
        if staged {
            self.events.push_back(ReceiverEvent::Discard {
                reason: problems.join("; "),
            });
        }
    }

    /// Checks a `HashQuery` against the plan and what is held, then asks the driver.
    /// Every chunk must be one the cloud neither holds nor has in flight, asked once:
    /// so the queries of a migration add up to at most its chunk count.
    fn on_hash_query(&mut self, disk: u16, chunks: Vec<(u64, [u8; 32])>) -> Result<(), ProtocolError> {
        if chunks.is_empty() || chunks.len() > crate::wire::control::MAX_HASH_QUERY {
            return Err(ProtocolError::OutsidePlan(format!(
                "a hash query of {} chunks (1 to {} allowed)",
                chunks.len(),
                crate::wire::control::MAX_HASH_QUERY
            )));
        }
        let (d, chunk_size) = self.disk_mut(disk)?;
        let cs = u64::from(chunk_size);
        let mut lookup = Vec::with_capacity(chunks.len());
        let mut indexes = Vec::with_capacity(chunks.len());
        for &(offset, hash) in &chunks {
            if !offset.is_multiple_of(cs) || offset >= d.capacity {
                return Err(ProtocolError::OutsidePlan(format!(
                    "a hash query names disk {disk} offset {offset}, not a chunk of the plan"
                )));
            }
            let index = offset / cs;
            if d.in_flight.contains_key(&index) || d.hashes.is_known(index) || d.repairing.contains_key(&index) {
                return Err(ProtocolError::OutsidePlan(format!(
                    "a hash query names disk {disk} offset {offset}, which was sent, asked or held already"
                )));
            }
            d.in_flight.insert(index, hash);
            indexes.push(index);
            lookup.push((offset, (d.capacity - offset).min(cs) as u32, hash));
        }
        self.asked.entry(disk).or_default().extend(indexes);
        self.events.push_back(ReceiverEvent::Lookup { disk, chunks: lookup });
        Ok(())
    }

    /// A chunk frame's header arrived on a data stream. Checked against the
    /// plan before its payload is read, so nothing is allocated for a chunk
    /// that cannot be right.
    pub fn admit_chunk(&mut self, h: &ChunkHeader) -> Result<Admission, ProtocolError> {
        let res = self.on_admit(h);
        if let Err(e) = &res {
            self.fail(e.code(), vec![e.to_string()]);
        }
        res
    }

    fn on_admit(&mut self, h: &ChunkHeader) -> Result<Admission, ProtocolError> {
        if self.phase != Phase::Streaming {
            return Err(self.unexpected("chunk data"));
        }
        let delta = self.delta;
        let (d, chunk_size) = self.disk_mut(h.disk)?;
        d.frames += 1;
        let cs = u64::from(chunk_size);
        if !h.offset.is_multiple_of(cs) || h.offset >= d.capacity {
            return Err(ProtocolError::OutsidePlan(format!(
                "disk {} has no chunk at offset {} (capacity {}, chunk size {cs})",
                h.disk, h.offset, d.capacity
            )));
        }
        let expected = (d.capacity - h.offset).min(cs) as u32;
        if h.plain_len != expected {
            return Err(ProtocolError::OutsidePlan(format!(
                "disk {} chunk at offset {} claims {} bytes, the plan says {expected}",
                h.disk, h.offset, h.plain_len
            )));
        }
        let index = h.offset / cs;
        if let Some(hash) = d.in_flight.get(&index) {
            return if *hash == h.hash {
                Ok(Admission::Duplicate)
            } else {
                Err(ProtocolError::OutsidePlan(format!(
                    "disk {} chunk at offset {} sent twice with different content",
                    h.disk, h.offset
                )))
            };
        }
        let replacing = delta
            && d.hashes.get(index).is_some_and(|hash| hash != h.hash)
            && !d.replaced.contains(&index)
            && !d.repairing.contains_key(&index);
        if replacing {
            // A delta pass: the source changed this chunk since the replica got it. The
            // driver writes it from now on, maybe while the early read-back reads it.
            d.replaced.insert(index);
            d.touched(index);
            d.in_flight.insert(index, h.hash);
            return Ok(Admission::Write);
        }
        if let Some(hash) = d.hashes.get(index) {
            if hash != h.hash {
                return Err(ProtocolError::OutsidePlan(format!(
                    "disk {} chunk at offset {} already written with other content",
                    h.disk, h.offset
                )));
            }
            // A replay of what is on disk: acknowledge again (unless its first
            // copy still waits for its sync, which acknowledges it), write nothing.
            if !self.unsynced.chunks.iter().any(|c| c.0 == h.disk && c.1 == h.offset) {
                self.acks.entry(h.disk).or_default().push(h.offset);
            }
            return Ok(Admission::Duplicate);
        }
        if let Some(expected) = d.repairing.get(&index) {
            if *expected != h.hash {
                return Err(ProtocolError::Integrity(format!(
                    "disk {} chunk at offset {} was re-sent for a repair with other content than before (SHA-256 {}, before {}): the source changed during the migration; abort it and migrate again",
                    h.disk,
                    h.offset,
                    hex(&h.hash),
                    hex(expected)
                )));
            }
        }
        d.touched(index);
        d.in_flight.insert(index, h.hash);
        Ok(Admission::Write)
    }

    /// The driver verified and wrote an admitted chunk.
    pub fn chunk_written(&mut self, disk: u16, offset: u64) {
        let Ok((d, chunk_size)) = self.disk_mut(disk) else {
            return;
        };
        let index = offset / u64::from(chunk_size);
        if let Some(hash) = d.in_flight.remove(&index) {
            let len = (d.capacity - offset).min(u64::from(chunk_size));
            d.hashes.set(index, hash);
            d.touched(index);
            d.repairing.remove(&index);
            if let Some(f) = d.from_journal.get_mut(index as usize) {
                *f = false;
            }
            d.nacked.remove(&index);
            d.not_durable += 1;
            self.bytes_written += len;
            self.unsynced.chunks.push((disk, offset, hash));
        }
        self.release_seals_or_fail();
    }

    fn release_seals_or_fail(&mut self) {
        if let Err(e) = self.release_seals() {
            self.fail(e.code(), vec![e.to_string()]);
        }
    }

    /// An admitted chunk failed verification: ask for it again, or fail the
    /// migration when it failed too often.
    pub fn chunk_rejected(&mut self, disk: u16, offset: u64, error: &ChunkError) -> Result<(), ProtocolError> {
        let Ok((d, chunk_size)) = self.disk_mut(disk) else {
            return Ok(());
        };
        let index = offset / u64::from(chunk_size);
        d.in_flight.remove(&index);
        d.nacked.insert(index);
        let rejects = self.rejects.entry((disk, offset)).or_default();
        *rejects += 1;
        if *rejects > self.config.max_rejects_per_chunk {
            let e = ProtocolError::Integrity(format!(
                "disk {disk} chunk at offset {offset} failed verification {} times, last: {error}",
                *rejects
            ));
            self.fail(e.code(), vec![e.to_string()]);
            return Err(e);
        }
        self.outbox.push_back(CloudMessage::Nack {
            disk,
            offset,
            reason: error.to_string(),
        });
        Ok(())
    }

    /// Bytes of the chunks known to be all zeros (declared zero by the edge, or
    /// written with the zero chunk's hash): what never had to be sent.
    pub fn zero_bytes(&self) -> u64 {
        let chunk_size = self.plan.as_ref().map_or(0, |p| u64::from(p.chunk_size));
        self.disks
            .iter()
            .map(|d| {
                (0..d.hashes.chunk_count())
                    .filter(|&i| d.hashes.get(i) == Some(d.hashes.zero_hash(i)))
                    .map(|i| (d.capacity - i * chunk_size).min(chunk_size))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Each disk's Merkle root, in plan order, once every disk is sealed (both
    /// sides computed the same roots).
    pub fn disk_roots(&self) -> Option<Vec<[u8; 32]>> {
        if self.disks.is_empty() {
            return None;
        }
        self.disks.iter().map(|d| d.root).collect()
    }

    /// What the read-back before the commit checks, per [`ReceiverConfig::verify`].
    fn verification_chunks(&self) -> Vec<(u16, u64, [u8; 32])> {
        // A delta pass that keeps the replica reads back what it changed: the rest was
        // read back by the pass that wrote it, and the switchover reads everything back
        // before it registers the VM. So a pass costs the cloud what changed, not the
        // size of the disk.
        let only_this_pass = self.delta && self.keep_replica;
        let mut chunks = Vec::new();
        for (disk, d) in self.disks.iter().enumerate() {
            for index in 0..d.hashes.chunk_count() {
                // Read back while the pass streamed, and not written by it since.
                if d.early.get(index as usize) == Some(&Early::Intact) {
                    continue;
                }
                let earlier = d.from_journal.get(index as usize).copied();
                let wanted = if only_this_pass {
                    d.replaced.contains(&index) || earlier != Some(true)
                } else {
                    match self.config.verify {
                        VerifyScope::All => true,
                        VerifyScope::Resumed => earlier.unwrap_or(false),
                    }
                };
                if let (true, Some(hash)) = (wanted, d.hashes.get(index)) {
                    chunks.push((disk as u16, index, hash));
                }
            }
        }
        chunks
    }

    /// The driver read the staged disks back. `damaged` lists the chunks (disk, chunk
    /// index) whose bytes differ from their hash and that the driver could not rewrite
    /// itself (all but the zero ones). None: the VM is registered. Otherwise the edge is
    /// asked to send them again ([`CloudMessage::Repair`]); each must come back with the
    /// hash it had, each disk is sealed again with its first root, and the next commit
    /// reads the disks back again. After [`ReceiverConfig::max_repair_rounds`] rounds
    /// the migration fails.
    pub fn staged_verified(&mut self, damaged: Vec<(u16, u64)>) {
        if self.phase != Phase::Verifying {
            return;
        }
        if damaged.is_empty() {
            self.phase = Phase::Finalizing;
            self.events.push_back(if self.keep_replica {
                ReceiverEvent::KeepReplica {
                    delta_bytes: self.bytes_written,
                    schedule: self.schedule,
                }
            } else {
                ReceiverEvent::Finalize
            });
            return;
        }
        let chunk_size = self.plan.as_ref().map_or(0, |p| u64::from(p.chunk_size));
        let listed = |damaged: &[(u16, u64)]| {
            let mut names: Vec<String> = damaged
                .iter()
                .take(8)
                .map(|(d, i)| format!("disk {d} offset {}", i * chunk_size))
                .collect();
            if damaged.len() > 8 {
                names.push(format!("and {} more", damaged.len() - 8));
            }
            names.join(", ")
        };
        if self.repair_rounds >= self.config.max_repair_rounds {
            let e = ProtocolError::Integrity(format!(
                "the staged disks still differ from what was sent after {} repairs ({}): the cloud's datastore does not keep what it writes; nothing was registered; check the datastore, then migrate again",
                self.repair_rounds,
                listed(&damaged)
            ));
            self.fail(e.code(), vec![e.to_string()]);
            return;
        }
        self.repair_rounds += 1;
        let mut by_disk: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
        for &(disk, index) in &damaged {
            let Some(d) = self.disks.get_mut(usize::from(disk)) else {
                continue;
            };
            let Some(hash) = d.hashes.get(index) else {
                continue;
            };
            d.hashes.unset(index);
            d.touched(index);
            d.repairing.insert(index, hash);
            d.root = None;
            let offset = index * chunk_size;
            let len = (d.capacity - offset).min(chunk_size);
            self.durable_bytes = self.durable_bytes.saturating_sub(len);
            by_disk.entry(disk).or_default().push(offset);
            self.repaired_chunks += 1;
        }
        self.phase = Phase::Streaming;
        for (disk, offsets) in by_disk {
            self.outbox.push_back(CloudMessage::Repair { disk, offsets });
        }
    }

    /// The driver registered the VM and its receipt (or failed to).
    pub fn finalized(&mut self, result: Result<Registered, (RefusalCode, String)>) {
        if self.phase != Phase::Finalizing {
            return;
        }
        match result {
            Ok(Registered {
                vm_id,
                vm_path,
                receipt,
                report,
            }) => {
                self.phase = Phase::Done;
                if let Some(outcome) = self.switchover_outcome.take() {
                    self.outbox.push_back(CloudMessage::SwitchedOver(outcome));
                }
                if let Some(report) = report {
                    self.outbox.push_back(CloudMessage::Report(report));
                }
                self.outbox.push_back(CloudMessage::Committed {
                    vm_id,
                    vm_path,
                    receipt,
                });
            }
            Err((code, problem)) => self.fail(code, vec![problem]),
        }
    }

    /// What the driver did beyond the commit the edge asked for with `Switchover`
    /// (powered the VM on, or not): sent just before `Committed`. Call before
    /// [`Self::finalized`].
    pub fn switched_over(&mut self, outcome: SwitchoverOutcome) {
        if self.phase == Phase::Finalizing && self.switchover.is_some() {
            self.switchover_outcome = Some(outcome);
        }
    }

    /// The driver handled an edge's `EndSwitchover`: `Ok` with what it did, or the
    /// refusal, with nothing changed.
    pub fn switchover_ended(&mut self, result: Result<String, (RefusalCode, Vec<String>)>) {
        if self.phase != Phase::EndingSwitchover {
            return;
        }
        match result {
            Ok(message) => {
                self.phase = Phase::SwitchoverEnded;
                self.outbox.push_back(CloudMessage::SwitchoverEnded { message });
            }
            Err((code, problems)) => self.fail(code, problems),
        }
    }

    /// The edge's change to the switchover window in this pass: `Some(None)` clears it.
    /// The driver records it with the pass (at [`ReceiverEvent::KeepReplica`]).
    pub fn window_schedule(&self) -> Option<Option<SwitchoverWindow>> {
        self.window_schedule
    }

    /// The switchover window the cloud holds after recording the pass: `Synced` tells
    /// the edge. Call before [`Self::replica_kept`].
    pub fn set_held_window(&mut self, window: Option<SwitchoverWindow>) {
        self.held_window = window;
    }

    /// The driver kept the replica and recorded the pass (or could not); `Ok` carries
    /// the scheduled switchover (Unix seconds) the cloud holds now.
    pub fn replica_kept(&mut self, result: Result<Option<i64>, (RefusalCode, String)>) {
        if self.phase != Phase::Finalizing || !self.keep_replica {
            return;
        }
        match result {
            Ok(switchover_at) => {
                self.phase = Phase::Synced;
                self.outbox.push_back(CloudMessage::Synced {
                    delta_bytes: self.bytes_written,
                    switchover_at,
                    switchover_window: self.held_window,
                });
            }
            // What was staged stays: the pass can be run again.
            Err((code, problem)) => {
                self.paused = true;
                self.phase = Phase::Failed;
                self.outbox.push_back(CloudMessage::Refused {
                    code,
                    problems: vec![problem],
                });
            }
        }
    }

    /// Next control message to send. Pending acknowledgements go out first,
    /// batched per disk.
    pub fn poll_transmit(&mut self) -> Option<CloudMessage> {
        if let Some((&disk, _)) = self.acks.iter().next() {
            let offsets = self.acks.remove(&disk).expect("key just seen");
            return Some(CloudMessage::Acks { disk, offsets });
        }
        self.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::AwaitHello {
            return Some(self.hello_deadline);
        }
        matches!(
            self.phase,
            Phase::AwaitHello
                | Phase::Authenticating
                | Phase::AwaitPlan
                | Phase::Validating
                | Phase::Checking
                | Phase::Aborting
        )
        .then_some(self.setup_deadline)
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout() {
            if now >= deadline {
                let e = ProtocolError::TimedOut(match self.phase {
                    Phase::AwaitHello => "before the edge said Hello",
                    _ => "before a plan was accepted",
                });
                self.fail(e.code(), vec![e.to_string()]);
            }
        }
    }
}

/// A message that opens what a connection is for (a plan, a resume, a delta pass, a check,
/// an abort, the end of a switchover): one per connection, after the hello.
fn is_request(msg: &EdgeMessage) -> bool {
    matches!(
        msg,
        EdgeMessage::Plan(_)
            | EdgeMessage::Resume { .. }
            | EdgeMessage::Sync { .. }
            | EdgeMessage::SyncSwitchedOver { .. }
            | EdgeMessage::Validate(_)
            | EdgeMessage::AbortMigration { .. }
            | EdgeMessage::EndSwitchover { .. }
    )
}
