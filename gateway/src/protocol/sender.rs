//! The edge agent's side of one migration.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::ProtocolError;
use crate::integrity::DiskHashes;
use crate::plan::{MigrationPlan, MigrationReport};
use crate::receipt::SignedReceipt;
use crate::schedule::SwitchoverWindow;
use crate::wire::{CloudMessage, DowntimeFrom, EdgeMessage, SwitchoverOutcome, SwitchoverRequest};

/// Tunables and identity of the sending side.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Name of this agent, for the cloud's migration records.
    pub agent: String,
    pub user: String,
    pub password: String,
    /// Times one chunk may be resent after the cloud rejected it.
    pub max_resends_per_chunk: u32,
    /// Time allowed for the cloud to answer hello, plan and commit. Registering
    /// a VM includes fsyncing its disks, so this is generous.
    pub reply_timeout: Duration,
}

impl SenderConfig {
    pub fn new(agent: impl Into<String>, user: impl Into<String>, password: impl Into<String>) -> Self {
        SenderConfig {
            agent: agent.into(),
            user: user.into(),
            password: password.into(),
            max_resends_per_chunk: 3,
            reply_timeout: Duration::from_secs(120),
        }
    }
}

/// What the driver learns from the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The credential was accepted.
    Welcomed { endpoint: String, role: String },
    /// The plan was accepted: start reading and sending chunks.
    Accepted { migration_id: String, datastore: String },
    /// The cloud continues the migration: `done_bytes` are already there,
    /// `to_hash` chunks of them must be read and hashed here (they were
    /// acknowledged after this agent last recorded its checkpoint) but not sent.
    Resumed {
        migration_id: String,
        datastore: String,
        done_bytes: u64,
        to_hash: u64,
    },
    /// These chunks (offset, plaintext hash) are verified and durably on the
    /// cloud's disk.
    Acked {
        disk: u16,
        chunks: Vec<(u64, [u8; 32])>,
        bytes: u64,
    },
    /// The cloud rejected a chunk: read, seal and send it again.
    Resend { disk: u16, offset: u64 },
    /// Deduplication: the cloud does not hold these chunks (asked with `HashQuery`):
    /// read, seal and send them.
    Send { disk: u16, offsets: Vec<u64> },
    /// The cloud read its staged disks back before the commit and found `chunks`
    /// damaged: they are sent again (each also comes as a [`SenderEvent::Resend`]).
    Repairing { disk: u16, chunks: u64 },
    /// The VM is registered in the cloud domain. `receipt` is the endpoint's
    /// signed receipt (JSON), already checked against this migration: its
    /// signature verifies under the certificate it carries, and it states
    /// this plan's VM and disks with the Merkle roots computed here. Whether
    /// that certificate is the endpoint's is for the driver to check.
    Committed {
        vm_id: String,
        vm_path: String,
        receipt: String,
    },
    /// A replication pass ended ([`SenderSession::finish_as_replica`]): the cloud
    /// read its replica back and keeps it; `delta_bytes` were written by this pass, and
    /// `switchover_at` (Unix seconds) is the scheduled switchover the cloud holds.
    Synced {
        delta_bytes: u64,
        switchover_at: Option<i64>,
    },
    /// A session made with [`SenderSession::ending_switchover`]: the cloud rolled the
    /// switchover back or confirmed it, and says what it did.
    SwitchoverEnded { message: String },
    /// A session made with [`SenderSession::validating`]: the cloud found the
    /// plan valid; this is what a migration would create. Nothing was staged.
    Validated(Box<MigrationReport>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitWelcome,
    AwaitPlanAccepted,
    Streaming,
    AwaitCommitted,
    Done,
    /// A replication pass ended with the replica kept.
    Synced,
    /// The plan was only validated, and found valid.
    Validated,
    /// `AbortMigration` sent: the cloud confirms by closing the connection, or refuses.
    AwaitAborted,
    /// `EndSwitchover` sent: the cloud answers `SwitchoverEnded`, or refuses.
    AwaitSwitchoverEnded,
    SwitchoverEnded,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitWelcome => "waiting for the welcome",
            Phase::AwaitPlanAccepted => "waiting for the plan to be accepted",
            Phase::Streaming => "streaming",
            Phase::AwaitCommitted => "waiting for the commit",
            Phase::Done => "done",
            Phase::Synced => "synced",
            Phase::Validated => "validated",
            Phase::AwaitAborted => "waiting for the abort to be confirmed",
            Phase::AwaitSwitchoverEnded => "waiting for the switchover to be rolled back or confirmed",
            Phase::SwitchoverEnded => "switchover ended",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Pending,
    /// Pending, and known to be all zeros from the checkpoint: declared zero
    /// again without reading it.
    PendingZero,
    Sent,
    /// In the cloud already (after a resume), but its hash is not known here.
    Unhashed,
    /// In the cloud's replica with the hash recorded here (a delta pass): read it,
    /// and send it only if the source changed it since.
    Held,
    /// Deduplication: read and hash it, then ask the cloud whether it holds it.
    Probe,
    /// Its hash is in a `HashQuery` (sent or being gathered): the answer says whether
    /// the cloud copied it or it is to be sent.
    Asked,
    Done,
}

/// A chunk known to be done: (disk, chunk index, plaintext hash).
pub type DoneChunk = (u16, u64, [u8; 32]);

/// What the driver must do with one chunk (see [`SenderSession::work_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Read, zero-check, seal and send it.
    Send,
    /// Read and hash it only: the cloud has it ([`SenderSession::chunk_hashed`]).
    Hash,
    /// Declare it zero without reading it ([`SenderSession::chunk_zero`]).
    Zero,
    /// Read and hash it: unchanged from this hash (the replica's), it is done
    /// ([`SenderSession::chunk_hashed`]); changed, it is sealed and sent (or
    /// declared zero) like [`Work::Send`].
    Compare([u8; 32]),
    /// Read it: zero, declare it zero ([`SenderSession::chunk_zero`]); else hash it
    /// and report the hash ([`SenderSession::chunk_probed`]), which goes into a hash
    /// query instead of the data.
    Probe,
    /// Nothing: done, or in flight.
    Skip,
}

#[derive(Debug)]
struct Disk {
    capacity: u64,
    state: Vec<ChunkState>,
    hashes: DiskHashes,
    resends: Vec<u8>,
    /// Chunks not yet acked or declared zero.
    remaining: u64,
    /// Chunks neither sent (or copied in the cloud) nor done: the disk is sealed when
    /// none is left, without waiting for the last acknowledgements (protocol version 12).
    unsent: u64,
    /// Chunk frames of this disk put on data streams over this connection, resends
    /// included: the seal says how many the cloud is to wait for.
    frames: u64,
    /// A run of zero chunks not yet announced: (first offset, count).
    zero_run: Option<(u64, u64)>,
    /// The Merkle root, once every chunk is sent, copied or done (`unsent` is 0).
    root: Option<[u8; 32]>,
    /// Deduplication: chunks still in [`ChunkState::Probe`], and the hashes gathered
    /// for the next `HashQuery` (at most `MAX_HASH_QUERY`).
    probing: u64,
    query: Vec<(u64, [u8; 32])>,
}

/// One migration as the edge agent sees it.
#[derive(Debug)]
pub struct SenderSession {
    config: SenderConfig,
    plan: MigrationPlan,
    phase: Phase,
    deadline: Option<Instant>,
    disks: Vec<Disk>,
    outbox: VecDeque<EdgeMessage>,
    events: VecDeque<SenderEvent>,
    error: Option<ProtocolError>,
    acked_bytes: u64,
    zero_bytes: u64,
    /// Named by the cloud when it accepted the plan.
    migration_id: Option<String>,
    /// The signed receipt of the commit, once checked.
    receipt: Option<String>,
    /// Resuming: the migration to continue, and what this agent's checkpoint
    /// recorded as done (disk, chunk index, hash), until the cloud says what
    /// it holds.
    resume: Option<(String, Vec<DoneChunk>)>,
    resumed_bytes: u64,
    /// Only validate the plan (`edge-agent plan`): nothing is staged or sent.
    validate_only: bool,
    /// Only abort a migration (`edge-agent abort`): its id and the reason.
    abort: Option<(String, String)>,
    /// The cloud's report of the commit.
    report: Option<MigrationReport>,
    /// A delta pass of a replication: `Sync` instead of `Resume`.
    delta: bool,
    /// The edge's record says the switchover awaits confirmation: `SyncSwitchedOver`
    /// instead of `Sync` (see [`Self::after_switchover`]).
    after_switchover: bool,
    /// End with `SyncDone` (keep the replica) instead of `Commit`.
    keep_replica: bool,
    /// The cloud accepted the credential (a refusal before it is one of the login).
    welcomed: bool,
    /// End with `Switchover` instead of `Commit` (see [`Self::finish_as_switchover`]).
    switchover: Option<Switchover>,
    /// Set or clear the scheduled switchover before `SyncDone` (see [`Self::schedule`]).
    schedule: Option<Option<i64>>,
    /// The cloud's `SwitchedOver`, once it came.
    switchover_outcome: Option<SwitchoverOutcome>,
    /// Only roll back or confirm a switchover: the migration, and whether to confirm.
    end_switchover: Option<(String, bool)>,
    /// The scheduled switchover the cloud holds (Unix seconds), as `Synced` said.
    scheduled_switchover: Option<i64>,
    /// The switchover window the cloud holds, as `Synced` said.
    scheduled_window: Option<SwitchoverWindow>,
    /// This pass's change to the switchover window (`ScheduleWindow`), if any.
    window_schedule: Option<Option<SwitchoverWindow>>,
    /// The cloud offered deduplication (`PlanAccepted { dedup }`) and this is a new
    /// migration: chunks are hashed and asked about before they are sent.
    dedup: bool,
    /// Plaintext bytes the cloud copied from disks it held instead of receiving them.
    dedup_bytes: u64,
    /// Of `dedup_bytes`, those copied from the seed the plan named.
    seeded_bytes: u64,
    /// Never ask, whatever the cloud offers.
    refuse_dedup: bool,
}

/// How a switchover ends beyond the commit (see [`SenderSession::finish_as_switchover`]).
#[derive(Debug, Clone, Copy)]
struct Switchover {
    power_on: bool,
    confirm: bool,
    downtime_since: Instant,
    downtime_from: DowntimeFrom,
}

impl SenderSession {
    /// Starts a migration: the first message to transmit is the hello.
    pub fn new(config: SenderConfig, plan: MigrationPlan, now: Instant) -> Result<Self, ProtocolError> {
        plan.check_limits()?;
        let disks = plan
            .vm
            .disks
            .iter()
            .map(|d| {
                let n = d.chunk_count(plan.chunk_size);
                Disk {
                    capacity: d.capacity,
                    state: vec![ChunkState::Pending; n as usize],
                    hashes: DiskHashes::new(d.capacity, plan.chunk_size),
                    resends: vec![0; n as usize],
                    remaining: n,
                    unsent: n,
                    frames: 0,
                    zero_run: None,
                    root: None,
                    probing: 0,
                    query: Vec::new(),
                }
            })
            .collect();
        let mut outbox = VecDeque::new();
        outbox.push_back(EdgeMessage::Hello {
            agent: config.agent.clone(),
            user: config.user.clone(),
            password: config.password.clone(),
        });
        Ok(SenderSession {
            deadline: Some(now + config.reply_timeout),
            config,
            plan,
            phase: Phase::AwaitWelcome,
            disks,
            outbox,
            events: VecDeque::new(),
            error: None,
            acked_bytes: 0,
            zero_bytes: 0,
            migration_id: None,
            receipt: None,
            resume: None,
            resumed_bytes: 0,
            validate_only: false,
            abort: None,
            report: None,
            delta: false,
            after_switchover: false,
            keep_replica: false,
            welcomed: false,
            switchover: None,
            schedule: None,
            switchover_outcome: None,
            end_switchover: None,
            scheduled_switchover: None,
            scheduled_window: None,
            window_schedule: None,
            dedup: false,
            dedup_bytes: 0,
            seeded_bytes: 0,
            refuse_dedup: false,
        })
    }

    /// Plaintext bytes the cloud copied from disks it already held (deduplicated):
    /// they did not cross the link.
    pub fn dedup_bytes(&self) -> u64 {
        self.dedup_bytes
    }

    /// Plaintext bytes of chunks the cloud copied from the seed the plan named (a part
    /// of [`Self::dedup_bytes`]).
    pub fn seeded_bytes(&self) -> u64 {
        self.seeded_bytes
    }

    /// Sends every chunk even if the cloud offers deduplication (`--no-dedup`).
    pub fn refuse_dedup(&mut self) {
        self.refuse_dedup = true;
    }

    /// Whether this migration asks the cloud for chunks before sending them.
    pub fn is_deduplicating(&self) -> bool {
        self.dedup
    }

    /// The driver read the chunk at `offset` of [`Work::Probe`], found it not zero and
    /// hashed it: the hash joins the next `HashQuery`, sent when it holds
    /// `MAX_HASH_QUERY` chunks or when no chunk of the disk is left to probe. So the
    /// questions travel in batches while the reading goes on, never one round trip
    /// per chunk.
    pub fn chunk_probed(&mut self, disk: u16, offset: u64, hash: [u8; 32]) {
        let Some((d, index)) = self.streaming_disk(disk, offset) else {
            return;
        };
        if d.state[index as usize] != ChunkState::Probe {
            return;
        }
        d.state[index as usize] = ChunkState::Asked;
        d.probing -= 1;
        d.hashes.set(index, hash);
        d.query.push((offset, hash));
        self.flush_query(disk);
    }

    /// Sends the gathered hash query of `disk` when it is full or the disk has no
    /// chunk left to probe.
    fn flush_query(&mut self, disk: u16) {
        let d = &mut self.disks[usize::from(disk)];
        if d.query.len() >= crate::wire::control::MAX_HASH_QUERY || (d.probing == 0 && !d.query.is_empty()) {
            let chunks = std::mem::take(&mut d.query);
            self.outbox.push_back(EdgeMessage::HashQuery { disk, chunks });
        }
    }

    /// Asks the cloud to check `plan` without staging anything: after the
    /// welcome the session sends `Validate` and ends with
    /// [`SenderEvent::Validated`] or the refusal listing every problem.
    pub fn validating(config: SenderConfig, plan: MigrationPlan, now: Instant) -> Result<Self, ProtocolError> {
        let mut s = SenderSession::new(config, plan, now)?;
        s.validate_only = true;
        Ok(s)
    }

    /// Asks the cloud to discard `migration_id`, started before with `plan`: after the
    /// welcome the session sends `AbortMigration` and waits. The cloud confirms by
    /// closing the connection with [`crate::wire::RefusalCode::Aborted`] (the driver
    /// watches for it); a refusal fails the session, and then nothing was changed.
    pub fn aborting(
        config: SenderConfig,
        plan: MigrationPlan,
        migration_id: String,
        reason: impl Into<String>,
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        let mut s = SenderSession::new(config, plan, now)?;
        s.abort = Some((migration_id, reason.into()));
        Ok(s)
    }

    /// Asks the cloud to roll back (`confirm: false`) or confirm the switchover of
    /// `migration_id`: after the welcome the session sends `EndSwitchover` and ends with
    /// [`SenderEvent::SwitchoverEnded`], or the refusal (then nothing was changed).
    pub fn ending_switchover(
        config: SenderConfig,
        plan: MigrationPlan,
        migration_id: String,
        confirm: bool,
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        let mut s = SenderSession::new(config, plan, now)?;
        s.end_switchover = Some((migration_id, confirm));
        Ok(s)
    }

    /// Whether the switchover was rolled back or confirmed.
    pub fn is_switchover_ended(&self) -> bool {
        self.phase == Phase::SwitchoverEnded
    }

    /// Ends the pass with `Switchover` instead of `Commit`: the cloud commits, then powers
    /// the VM on if `power_on`, and keeps the switchover reversible unless `confirm`.
    /// The downtime counts from `downtime_since`, which is what `downtime_from` says
    /// (the edge's stop of the source, the source files' last write, or the switchover's
    /// start). Called before the first [`Self::poll_transmit`], a delta pass says so in
    /// its `Sync`, and the cloud reads its replica back while the pass streams.
    pub fn finish_as_switchover(
        &mut self,
        power_on: bool,
        confirm: bool,
        downtime_since: Instant,
        downtime_from: DowntimeFrom,
    ) {
        self.switchover = Some(Switchover {
            power_on,
            confirm,
            downtime_since,
            downtime_from,
        });
    }

    /// Sets (`Some`, Unix seconds) or clears (`None`) the scheduled switchover the cloud
    /// holds, at the end of this replication pass.
    pub fn schedule(&mut self, switchover_at: Option<i64>) {
        self.schedule = Some(switchover_at);
    }

    /// Sets (`Some`) or clears (`None`) the daily window the scheduled switchover must
    /// start in, which the cloud holds, at the end of this replication pass.
    pub fn schedule_window(&mut self, window: Option<SwitchoverWindow>) {
        self.window_schedule = Some(window);
    }

    /// The switchover window the cloud holds, once the pass is synced.
    pub fn scheduled_window(&self) -> Option<SwitchoverWindow> {
        self.scheduled_window
    }

    /// The cloud's answer to `Switchover`: power-on, downtime, whether it awaits
    /// confirmation. `None` for a plain commit, or a commit the cloud had already made
    /// before this connection (the link was lost during the switchover).
    pub fn switchover_outcome(&self) -> Option<&SwitchoverOutcome> {
        self.switchover_outcome.as_ref()
    }

    /// The scheduled switchover the cloud holds (Unix seconds), once the pass is synced.
    pub fn scheduled_switchover(&self) -> Option<i64> {
        self.scheduled_switchover
    }

    /// The cloud's report of what the migration created, once committed.
    pub fn report(&self) -> Option<&MigrationReport> {
        self.report.as_ref()
    }

    /// Continues `migration_id`, which the cloud accepted before with this
    /// same plan. `checkpoint` is what this agent recorded as acknowledged or
    /// zero: (disk, chunk index, plaintext hash). The cloud's answer decides
    /// what is done; the checkpoint only spares reading and hashing again.
    pub fn resuming(
        config: SenderConfig,
        plan: MigrationPlan,
        migration_id: String,
        checkpoint: Vec<DoneChunk>,
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        let mut s = SenderSession::new(config, plan, now)?;
        s.resume = Some((migration_id, checkpoint));
        Ok(s)
    }

    /// Runs a delta pass of the replication `migration_id`: like [`Self::resuming`], but
    /// every chunk the cloud holds with a hash in `checkpoint` is read and compared
    /// ([`Work::Compare`]), and sent again only if the source changed it. Chunks the
    /// cloud holds without a recorded hash are sent (the cloud writes nothing for one
    /// that did not change).
    pub fn syncing(
        config: SenderConfig,
        plan: MigrationPlan,
        migration_id: String,
        checkpoint: Vec<DoneChunk>,
        now: Instant,
    ) -> Result<Self, ProtocolError> {
        let mut s = SenderSession::resuming(config, plan, migration_id, checkpoint, now)?;
        s.delta = true;
        Ok(s)
    }

    /// The edge's record says the switchover of this replication awaits confirmation: the
    /// pass asks with `SyncSwitchedOver`, which the cloud runs only if the switchover was
    /// rolled back since (through the API), and refuses otherwise.
    pub fn after_switchover(&mut self) {
        self.after_switchover = true;
    }

    /// Ends the pass with `SyncDone` instead of `Commit`: the cloud keeps what it holds
    /// as the replica, and nothing is registered.
    pub fn finish_as_replica(&mut self) {
        self.keep_replica = true;
    }

    /// Whether the cloud accepted the credential: a refusal before it was one of the
    /// login (a wrong password, or an endpoint with too many logins waiting).
    pub fn is_welcomed(&self) -> bool {
        self.welcomed
    }

    /// Whether the session ended with the replica kept.
    pub fn is_synced(&self) -> bool {
        self.phase == Phase::Synced
    }

    /// The migration id, once the cloud accepted (or resumed) the plan.
    pub fn migration_id(&self) -> Option<&str> {
        self.migration_id.as_deref()
    }

    /// The plaintext hash of a chunk, once it is known here (sent, acknowledged or zero).
    pub fn chunk_hash(&self, disk: u16, offset: u64) -> Option<[u8; 32]> {
        let d = self.disks.get(usize::from(disk))?;
        d.hashes.get(checked_index(d, offset, self.chunk_size())?)
    }

    /// The hash of an all-zero chunk at `offset` of `disk` (the last one may be short).
    pub fn zero_hash(&self, disk: u16, offset: u64) -> Option<[u8; 32]> {
        let d = self.disks.get(usize::from(disk))?;
        Some(d.hashes.zero_hash(checked_index(d, offset, self.chunk_size())?))
    }

    /// Bytes the cloud already held when it resumed this migration (written or zero).
    pub fn resumed_bytes(&self) -> u64 {
        self.resumed_bytes
    }

    /// What to do with the chunk at `offset` of `disk`.
    pub fn work_for(&self, disk: u16, offset: u64) -> Work {
        // Waiting for the commit, a chunk rejected after its disk was sealed is still
        // sent again (it is the only kind left pending then).
        if !matches!(self.phase, Phase::Streaming | Phase::AwaitCommitted) {
            return Work::Skip;
        }
        let cs = self.chunk_size();
        let Some(d) = self.disks.get(usize::from(disk)) else {
            return Work::Skip;
        };
        match checked_index(d, offset, cs).map(|i| d.state[i as usize]) {
            Some(ChunkState::Pending) => Work::Send,
            Some(ChunkState::PendingZero) => Work::Zero,
            Some(ChunkState::Unhashed) => Work::Hash,
            Some(ChunkState::Probe) => Work::Probe,
            Some(ChunkState::Held) => {
                let index = offset / cs;
                d.hashes.get(index).map_or(Work::Send, Work::Compare)
            }
            _ => Work::Skip,
        }
    }

    /// The driver hashed a chunk the cloud already holds ([`Work::Hash`]), or found a
    /// chunk of [`Work::Compare`] unchanged.
    pub fn chunk_hashed(&mut self, disk: u16, offset: u64, hash: [u8; 32]) {
        if self.phase != Phase::Streaming {
            return;
        }
        let cs = self.chunk_size();
        let Some(d) = self.disks.get_mut(usize::from(disk)) else {
            return;
        };
        let Some(index) = checked_index(d, offset, cs).filter(|&i| match d.state[i as usize] {
            ChunkState::Unhashed => true,
            ChunkState::Held => d.hashes.get(i) == Some(hash),
            _ => false,
        }) else {
            return;
        };
        d.state[index as usize] = ChunkState::Done;
        d.remaining -= 1;
        d.unsent -= 1;
        let len = (d.capacity - offset).min(cs);
        if hash == d.hashes.zero_hash(index) {
            self.zero_bytes += len;
        } else {
            self.acked_bytes += len;
        }
        d.hashes.set(index, hash);
        self.maybe_seal(disk);
    }

    pub fn plan(&self) -> &MigrationPlan {
        &self.plan
    }

    /// The endpoint's signed receipt (JSON), once the VM is committed.
    pub fn receipt(&self) -> Option<&str> {
        self.receipt.as_deref()
    }

    /// Each disk's Merkle root, in plan order, once every disk is sealed.
    pub fn disk_roots(&self) -> Option<Vec<[u8; 32]>> {
        self.disks.iter().map(|d| d.root).collect()
    }

    /// Plaintext bytes the cloud has verified and written.
    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes
    }

    /// Bytes found to be zero (never sent).
    pub fn zero_bytes(&self) -> u64 {
        self.zero_bytes
    }

    /// Bytes accounted for: written in the cloud or known to be zero.
    pub fn done_bytes(&self) -> u64 {
        self.acked_bytes + self.zero_bytes
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self.phase,
            Phase::Done | Phase::Synced | Phase::Validated | Phase::SwitchoverEnded | Phase::Failed
        )
    }

    pub fn is_committed(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Why the migration failed, if it did.
    pub fn error(&self) -> Option<&ProtocolError> {
        self.error.as_ref()
    }

    fn chunk_size(&self) -> u64 {
        u64::from(self.plan.chunk_size)
    }

    fn unexpected(&self, message: &'static str) -> ProtocolError {
        ProtocolError::Unexpected {
            message,
            phase: self.phase.name(),
        }
    }

    /// A control message from the cloud.
    pub fn handle_control(&mut self, msg: CloudMessage, now: Instant) -> Result<(), ProtocolError> {
        let res = self.on_control(msg, now);
        if let Err(e) = &res {
            self.fail(e.clone());
        }
        res
    }

    fn on_control(&mut self, msg: CloudMessage, now: Instant) -> Result<(), ProtocolError> {
        match msg {
            CloudMessage::Welcome { endpoint, role } => {
                if self.phase != Phase::AwaitWelcome {
                    return Err(self.unexpected("Welcome"));
                }
                // The request went out right behind the hello (see `poll_transmit`):
                // its answer is what comes next.
                self.phase = if self.abort.is_some() {
                    Phase::AwaitAborted
                } else if self.end_switchover.is_some() {
                    Phase::AwaitSwitchoverEnded
                } else {
                    Phase::AwaitPlanAccepted
                };
                self.welcomed = true;
                self.deadline = Some(now + self.config.reply_timeout + self.request_allowance());
                self.events.push_back(SenderEvent::Welcomed { endpoint, role });
            }
            CloudMessage::PlanAccepted {
                migration_id,
                datastore,
                dedup,
            } => {
                if self.phase != Phase::AwaitPlanAccepted || self.resume.is_some() || self.validate_only {
                    return Err(self.unexpected("PlanAccepted"));
                }
                if dedup && !self.refuse_dedup {
                    // Every chunk is read and hashed first and its hash asked about; only
                    // what the cloud does not hold is read again and sent.
                    self.dedup = true;
                    for d in &mut self.disks {
                        d.state.fill(ChunkState::Probe);
                        d.probing = d.state.len() as u64;
                    }
                }
                self.phase = Phase::Streaming;
                self.deadline = None;
                self.migration_id = Some(migration_id.clone());
                self.events.push_back(SenderEvent::Accepted {
                    migration_id,
                    datastore,
                });
            }
            CloudMessage::Resumed {
                migration_id,
                datastore,
                done,
            } => {
                let expected = self.resume.as_ref().map(|(id, _)| id.as_str());
                if self.phase != Phase::AwaitPlanAccepted
                    || expected != Some(migration_id.as_str())
                    || self.validate_only
                {
                    return Err(self.unexpected("Resumed"));
                }
                self.on_resumed(&done)?;
                self.phase = Phase::Streaming;
                self.deadline = None;
                self.migration_id = Some(migration_id.clone());
                let to_hash = self
                    .disks
                    .iter()
                    .map(|d| d.state.iter().filter(|&&s| s == ChunkState::Unhashed).count() as u64)
                    .sum();
                self.events.push_back(SenderEvent::Resumed {
                    migration_id,
                    datastore,
                    done_bytes: self.done_bytes(),
                    to_hash,
                });
                for disk in 0..self.disks.len() {
                    self.maybe_seal(disk as u16);
                }
            }
            CloudMessage::Refused { code, problems } => {
                return Err(ProtocolError::Refused { code, problems });
            }
            CloudMessage::Acks { disk, offsets } => {
                if !matches!(self.phase, Phase::Streaming | Phase::AwaitCommitted) {
                    return Err(self.unexpected("Acks"));
                }
                let cs = self.chunk_size();
                let mut bytes = 0;
                let mut chunks = Vec::with_capacity(offsets.len());
                let d = self.disk_mut(disk)?;
                for &offset in &offsets {
                    let index = checked_index(d, offset, cs)
                        .ok_or_else(|| ProtocolError::OutsidePlan(format!("ack for disk {disk} offset {offset}")))?;
                    match d.state[index as usize] {
                        ChunkState::Sent => {
                            d.state[index as usize] = ChunkState::Done;
                            d.remaining -= 1;
                            bytes += (d.capacity - offset).min(cs);
                            chunks.push((offset, d.hashes.get(index).expect("a sent chunk has its hash")));
                        }
                        // A duplicate was acknowledged again.
                        ChunkState::Done => {}
                        ChunkState::Pending
                        | ChunkState::PendingZero
                        | ChunkState::Unhashed
                        | ChunkState::Held
                        | ChunkState::Probe
                        | ChunkState::Asked => {
                            return Err(ProtocolError::OutsidePlan(format!(
                                "ack for disk {disk} offset {offset}, which was never sent"
                            )))
                        }
                    }
                }
                self.acked_bytes += bytes;
                self.events.push_back(SenderEvent::Acked { disk, chunks, bytes });
                if self.phase == Phase::AwaitCommitted && self.deadline.is_none() && self.all_acked() {
                    // The commit went out before its last chunks were acknowledged (see
                    // `poll_transmit`): its answer is due from now.
                    self.deadline = Some(now + self.commit_allowance());
                }
            }
            CloudMessage::HashAnswer {
                disk,
                copied,
                send,
                seeded,
            } => {
                if self.phase != Phase::Streaming || !self.dedup {
                    return Err(self.unexpected("HashAnswer"));
                }
                let cs = self.chunk_size();
                let d = self.disk_mut(disk)?;
                let mut bytes = 0;
                for (&offset, is_copied) in copied.iter().map(|o| (o, true)).chain(send.iter().map(|o| (o, false))) {
                    let index = checked_index(d, offset, cs)
                        .filter(|&i| d.state[i as usize] == ChunkState::Asked)
                        .ok_or_else(|| {
                            ProtocolError::OutsidePlan(format!(
                                "hash answer for disk {disk} offset {offset}, which was not asked about"
                            ))
                        })?;
                    if is_copied {
                        // Copied in the cloud and verified there against the hash sent:
                        // acknowledged like a sent chunk once durable.
                        d.state[index as usize] = ChunkState::Sent;
                        d.unsent -= 1;
                        bytes += (d.capacity - offset).min(cs);
                    } else {
                        d.state[index as usize] = ChunkState::Pending;
                        d.hashes.unset(index);
                    }
                }
                self.dedup_bytes += bytes;
                // Every seeded offset must be one this answer copied: the count is
                // what the summary claims the seed saved.
                let capacity = self.disk_mut(disk)?.capacity;
                let was_copied: std::collections::HashSet<u64> = copied.iter().copied().collect();
                let mut seeded_bytes = 0;
                for offset in &seeded {
                    if !was_copied.contains(offset) {
                        return Err(ProtocolError::OutsidePlan(format!(
                            "hash answer for disk {disk} says offset {offset} came from the seed but was not copied"
                        )));
                    }
                    seeded_bytes += (capacity - offset).min(cs);
                }
                self.seeded_bytes += seeded_bytes;
                if !send.is_empty() {
                    self.events.push_back(SenderEvent::Send { disk, offsets: send });
                }
                self.maybe_seal(disk);
            }
            CloudMessage::Nack { disk, offset, .. } => {
                // A disk is sealed once its last chunk is sent, so the rejection of one of
                // its last chunks may come while the commit waits.
                if !matches!(self.phase, Phase::Streaming | Phase::AwaitCommitted) {
                    return Err(self.unexpected("Nack"));
                }
                let cs = self.chunk_size();
                let max = self.config.max_resends_per_chunk;
                let d = self.disk_mut(disk)?;
                let index = checked_index(d, offset, cs)
                    .filter(|&i| d.state[i as usize] == ChunkState::Sent)
                    .ok_or_else(|| {
                        ProtocolError::OutsidePlan(format!(
                            "nack for disk {disk} offset {offset}, which is not in flight"
                        ))
                    })?;
                let resends = &mut d.resends[index as usize];
                *resends = resends.saturating_add(1);
                if u32::from(*resends) > max {
                    return Err(ProtocolError::Integrity(format!(
                        "disk {disk} chunk at offset {offset} was rejected {resends} times"
                    )));
                }
                d.state[index as usize] = ChunkState::Pending;
                d.hashes.unset(index);
                d.unsent += 1;
                // Sealed already: sealed again, with the resend counted, once it is sent.
                // The cloud holds the first seal (and any commit behind it) meanwhile.
                d.root = None;
                self.events.push_back(SenderEvent::Resend { disk, offset });
            }
            CloudMessage::Repair { disk, offsets } => {
                if self.phase != Phase::AwaitCommitted && self.phase != Phase::Streaming {
                    return Err(self.unexpected("Repair"));
                }
                let cs = self.chunk_size();
                let d = self.disk_mut(disk)?;
                let mut bytes = 0;
                for &offset in &offsets {
                    let index = checked_index(d, offset, cs)
                        .filter(|&i| d.state[i as usize] == ChunkState::Done)
                        .ok_or_else(|| {
                            ProtocolError::OutsidePlan(format!(
                                "repair of disk {disk} offset {offset}, which was not acknowledged"
                            ))
                        })?;
                    d.state[index as usize] = ChunkState::Pending;
                    d.hashes.unset(index);
                    d.remaining += 1;
                    d.unsent += 1;
                    d.root = None;
                    bytes += (d.capacity - offset).min(cs);
                }
                self.acked_bytes = self.acked_bytes.saturating_sub(bytes);
                // Back to streaming: the disk is sealed again once the repaired chunks
                // are sent, then the commit is sent again.
                self.phase = Phase::Streaming;
                self.deadline = None;
                self.events.push_back(SenderEvent::Repairing {
                    disk,
                    chunks: offsets.len() as u64,
                });
                for offset in offsets {
                    self.events.push_back(SenderEvent::Resend { disk, offset });
                }
            }
            CloudMessage::Committed {
                vm_id,
                vm_path,
                receipt,
            } => {
                if self.phase != Phase::AwaitCommitted {
                    return Err(self.unexpected("Committed"));
                }
                self.check_receipt(&vm_id, &vm_path, &receipt)?;
                self.phase = Phase::Done;
                self.deadline = None;
                self.receipt = Some(receipt.clone());
                self.events.push_back(SenderEvent::Committed {
                    vm_id,
                    vm_path,
                    receipt,
                });
            }
            CloudMessage::Synced {
                delta_bytes,
                switchover_at,
                switchover_window,
            } => {
                if self.phase != Phase::AwaitCommitted || !self.keep_replica {
                    return Err(self.unexpected("Synced"));
                }
                self.phase = Phase::Synced;
                self.deadline = None;
                self.scheduled_switchover = switchover_at;
                self.scheduled_window = switchover_window;
                self.events.push_back(SenderEvent::Synced {
                    delta_bytes,
                    switchover_at,
                });
            }
            CloudMessage::SwitchedOver(outcome) => {
                if self.phase != Phase::AwaitCommitted || self.switchover.is_none() || self.switchover_outcome.is_some()
                {
                    return Err(self.unexpected("SwitchedOver"));
                }
                self.switchover_outcome = Some(outcome);
            }
            CloudMessage::SwitchoverEnded { message } => {
                if self.phase != Phase::AwaitSwitchoverEnded {
                    return Err(self.unexpected("SwitchoverEnded"));
                }
                self.phase = Phase::SwitchoverEnded;
                self.deadline = None;
                self.events.push_back(SenderEvent::SwitchoverEnded { message });
            }
            CloudMessage::Valid(report) => {
                if self.phase != Phase::AwaitPlanAccepted || !self.validate_only {
                    return Err(self.unexpected("Valid"));
                }
                self.phase = Phase::Validated;
                self.deadline = None;
                self.events.push_back(SenderEvent::Validated(Box::new(report)));
            }
            CloudMessage::Report(report) => {
                if self.phase != Phase::AwaitCommitted || self.report.is_some() {
                    return Err(self.unexpected("Report"));
                }
                self.report = Some(report);
            }
        }
        Ok(())
    }

    /// What this session asks of the cloud once it is logged in: a plan, a resume, a
    /// delta pass, a check, an abort or the end of a switchover.
    fn request(&self) -> EdgeMessage {
        if let Some((migration_id, reason)) = &self.abort {
            return EdgeMessage::AbortMigration {
                migration_id: migration_id.clone(),
                reason: reason.clone(),
            };
        }
        if let Some((migration_id, confirm)) = &self.end_switchover {
            return EdgeMessage::EndSwitchover {
                migration_id: migration_id.clone(),
                confirm: *confirm,
            };
        }
        // Said up front so that the cloud reads back, while the pass streams, what the
        // switchover would otherwise read back after it (the downtime's longest part).
        let switchover = self.switchover.is_some() && !self.keep_replica;
        match &self.resume {
            Some((migration_id, _)) if self.delta && self.after_switchover => EdgeMessage::SyncSwitchedOver {
                migration_id: migration_id.clone(),
                plan: self.plan.clone(),
                switchover,
            },
            Some((migration_id, _)) if self.delta => EdgeMessage::Sync {
                migration_id: migration_id.clone(),
                plan: self.plan.clone(),
                switchover,
            },
            Some((migration_id, _)) => EdgeMessage::Resume {
                migration_id: migration_id.clone(),
                plan: self.plan.clone(),
            },
            None if self.validate_only => EdgeMessage::Validate(self.plan.clone()),
            None => EdgeMessage::Plan(self.plan.clone()),
        }
    }

    /// Time the cloud may take to answer the request beyond the reply timeout, once the
    /// credential is accepted: work that grows with the VM's size, at a slow datastore's
    /// pace (100 MB/s).
    fn request_allowance(&self) -> Duration {
        let at_datastore_pace = Duration::from_secs(self.plan.logical_bytes() / 100_000_000);
        if self.end_switchover.is_some() {
            // A rollback powers the VM off and reads the replica back.
            at_datastore_pace
        } else if self.plan.seed.is_some() && self.resume.is_none() && !self.validate_only && self.abort.is_none() {
            // The cloud may first hash the seed's disks at this chunk size (a seed
            // lifted with another one, or registered by other means).
            at_datastore_pace
        } else {
            Duration::ZERO
        }
    }

    /// Applies the cloud's bitmaps of what it holds to the checkpoint.
    fn on_resumed(&mut self, done: &[Vec<u8>]) -> Result<(), ProtocolError> {
        if done.len() != self.disks.len() {
            return Err(ProtocolError::OutsidePlan(format!(
                "the cloud resumed {} disks, the plan has {}",
                done.len(),
                self.disks.len()
            )));
        }
        let cs = self.chunk_size();
        let (_, checkpoint) = self.resume.take().expect("resuming");
        let mut known: Vec<DiskHashes> = self
            .disks
            .iter()
            .map(|d| DiskHashes::new(d.capacity, self.plan.chunk_size))
            .collect();
        for (disk, index, hash) in checkpoint {
            if let Some(k) = known.get_mut(usize::from(disk)) {
                if index < k.chunk_count() {
                    k.set(index, hash);
                }
            }
        }
        let mut held = 0;
        for ((d, bitmap), known) in self.disks.iter_mut().zip(done).zip(&known) {
            let count = d.state.len() as u64;
            if bitmap.len() as u64 != count.div_ceil(8) {
                return Err(ProtocolError::OutsidePlan(format!(
                    "the cloud's resume bitmap has {} bytes for a disk of {count} chunks",
                    bitmap.len()
                )));
            }
            for index in 0..count {
                let zero = d.hashes.zero_hash(index);
                let hash = known.get(index);
                if self.delta {
                    // Everything is read again; what the replica holds is compared.
                    if let (true, Some(hash)) = (crate::wire::bit(bitmap, index), hash) {
                        held += (d.capacity - index * cs).min(cs);
                        d.state[index as usize] = ChunkState::Held;
                        d.hashes.set(index, hash);
                    }
                    continue;
                }
                if crate::wire::bit(bitmap, index) {
                    held += (d.capacity - index * cs).min(cs);
                    match hash {
                        Some(hash) => {
                            d.state[index as usize] = ChunkState::Done;
                            d.remaining -= 1;
                            d.unsent -= 1;
                            d.hashes.set(index, hash);
                            let len = (d.capacity - index * cs).min(cs);
                            if hash == zero {
                                self.zero_bytes += len;
                            } else {
                                self.acked_bytes += len;
                            }
                        }
                        None => d.state[index as usize] = ChunkState::Unhashed,
                    }
                } else if hash == Some(zero) {
                    d.state[index as usize] = ChunkState::PendingZero;
                }
            }
        }
        self.resumed_bytes = held;
        Ok(())
    }

    /// A receipt that does not state what was sent is worth nothing as
    /// evidence: the migration fails (with the VM already registered, which
    /// the error says) rather than hand the user a receipt that will not verify.
    pub(super) fn check_receipt(&self, vm_id: &str, vm_path: &str, receipt: &str) -> Result<(), ProtocolError> {
        let bad = |why: String| {
            ProtocolError::Integrity(format!(
                "the cloud registered the VM as {vm_id}, but its migration receipt is not valid: {why}; \
                 the VM's integrity is not attested, check the endpoint before using it"
            ))
        };
        let signed = SignedReceipt::from_json(receipt).map_err(|e| bad(e.to_string()))?;
        signed.verify_signature().map_err(|e| bad(e.to_string()))?;
        let roots: Vec<[u8; 32]> = self.disks.iter().map(|d| d.root.unwrap_or_default()).collect();
        let differences = signed.receipt.differences(
            self.migration_id.as_deref().unwrap_or_default(),
            vm_id,
            vm_path,
            &self.plan,
            &roots,
        );
        if !differences.is_empty() {
            return Err(bad(differences.join("; ")));
        }
        Ok(())
    }

    fn disk_mut(&mut self, disk: u16) -> Result<&mut Disk, ProtocolError> {
        self.disks
            .get_mut(usize::from(disk))
            .ok_or_else(|| ProtocolError::OutsidePlan(format!("disk {disk} is not in the plan")))
    }

    fn streaming_disk(&mut self, disk: u16, offset: u64) -> Option<(&mut Disk, u64)> {
        // Waiting for the commit, only chunks rejected after their disk's seal are pending.
        if !matches!(self.phase, Phase::Streaming | Phase::AwaitCommitted) {
            return None;
        }
        let cs = self.chunk_size();
        let d = self.disks.get_mut(usize::from(disk))?;
        let index = checked_index(d, offset, cs)?;
        matches!(
            d.state[index as usize],
            ChunkState::Pending | ChunkState::PendingZero | ChunkState::Held | ChunkState::Probe
        )
        .then_some((d, index))
    }

    /// The driver read the chunk at `offset` and found only zeros.
    pub fn chunk_zero(&mut self, disk: u16, offset: u64) {
        let cs = self.chunk_size();
        let Some((d, index)) = self.streaming_disk(disk, offset) else {
            return;
        };
        let probed = d.state[index as usize] == ChunkState::Probe;
        if probed {
            d.probing -= 1;
        }
        d.state[index as usize] = ChunkState::Done;
        let zero = d.hashes.zero_hash(index);
        d.hashes.set(index, zero);
        d.remaining -= 1;
        d.unsent -= 1;
        let len = (d.capacity - offset).min(cs);
        let flush = match &mut d.zero_run {
            Some((start, count)) if *start + *count * cs == offset => {
                *count += 1;
                None
            }
            run => run.replace((offset, 1)),
        };
        if let Some((offset, count)) = flush {
            self.outbox.push_back(EdgeMessage::ZeroChunks { disk, offset, count });
        }
        self.zero_bytes += len;
        if probed {
            self.flush_query(disk);
        }
        self.maybe_seal(disk);
    }

    /// The driver sealed the chunk at `offset` (plaintext hash `hash`) and
    /// queued it on a data stream.
    pub fn chunk_sent(&mut self, disk: u16, offset: u64, hash: [u8; 32]) {
        // Every frame the driver sends is counted, whatever its state here: the cloud
        // waits for exactly this many before it checks the seal.
        let Some(d) = self.disks.get_mut(usize::from(disk)) else {
            return;
        };
        d.frames += 1;
        if d.root.is_some() {
            // A frame after the seal (a driver sending a chunk twice): the seal the cloud
            // holds no longer counts every frame, so the disk is sealed again.
            d.root = None;
            self.maybe_seal(disk);
        }
        let Some((d, index)) = self.streaming_disk(disk, offset) else {
            return;
        };
        let probed = d.state[index as usize] == ChunkState::Probe;
        if probed {
            d.probing -= 1;
        }
        d.state[index as usize] = ChunkState::Sent;
        d.unsent -= 1;
        d.hashes.set(index, hash);
        if probed {
            self.flush_query(disk);
        }
        self.maybe_seal(disk);
    }

    /// Seals a disk once every chunk is sent, copied or done, without waiting for the
    /// last acknowledgements: the cloud holds the seal until the frames it counts are
    /// durable (protocol version 12), which saves the end of every pass a round trip.
    /// Commits once every disk is sealed.
    fn maybe_seal(&mut self, disk: u16) {
        let d = &mut self.disks[usize::from(disk)];
        if d.unsent != 0 || d.root.is_some() {
            return;
        }
        if let Some((offset, count)) = d.zero_run.take() {
            self.outbox.push_back(EdgeMessage::ZeroChunks { disk, offset, count });
        }
        let root = d.hashes.merkle_root().expect("every chunk is done");
        d.root = Some(root);
        self.outbox.push_back(EdgeMessage::DiskSealed {
            disk,
            root,
            frames: d.frames,
        });
        if self.disks.iter().all(|d| d.root.is_some()) && self.phase == Phase::Streaming {
            self.phase = Phase::AwaitCommitted;
            if self.keep_replica {
                if let Some(switchover_at) = self.schedule.take() {
                    self.outbox.push_back(EdgeMessage::Schedule { switchover_at });
                }
                if let Some(window) = self.window_schedule.take() {
                    self.outbox.push_back(EdgeMessage::ScheduleWindow { window });
                }
            }
            self.outbox.push_back(match (self.keep_replica, &self.switchover) {
                (true, _) => EdgeMessage::SyncDone,
                (false, Some(s)) => EdgeMessage::Switchover(SwitchoverRequest {
                    power_on: s.power_on,
                    confirm: s.confirm,
                    // Filled in when it is sent (see poll_transmit).
                    downtime_so_far_ms: 0,
                    downtime_from: s.downtime_from,
                }),
                (false, None) => EdgeMessage::Commit,
            });
        }
    }

    /// Sets the commit deadline once the commit has actually been sent.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<EdgeMessage> {
        let mut msg = self.outbox.pop_front()?;
        if matches!(msg, EdgeMessage::Hello { .. }) {
            // The request follows the hello without waiting for the welcome (protocol
            // version 11): the cloud holds it until the credential is checked, and drops
            // it with the refusal if it is not. On a 150 ms link that is 150 ms less
            // before anything moves. Built here, not in `new`: the constructors and
            // setters (`syncing`, `after_switchover`, ...) choose what it is.
            self.outbox.push_front(self.request());
        }
        if let (EdgeMessage::Switchover(request), Some(s)) = (&mut msg, &self.switchover) {
            request.downtime_so_far_ms =
                u64::try_from(now.saturating_duration_since(s.downtime_since).as_millis()).unwrap_or(u64::MAX);
        }
        if matches!(
            msg,
            EdgeMessage::Commit | EdgeMessage::SyncDone | EdgeMessage::Switchover(_)
        ) {
            // The last chunks may still be on their way (the disks were sealed when they
            // were sent): the answer is due once they are acknowledged, not before. A slow
            // link's data in flight is not the cloud's delay.
            self.deadline = self.all_acked().then(|| now + self.commit_allowance());
        }
        Some(msg)
    }

    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Every chunk sent was acknowledged (or declared zero, or found held).
    fn all_acked(&self) -> bool {
        self.disks.iter().all(|d| d.remaining == 0)
    }

    /// How long the cloud may take to answer a commit or `SyncDone` once it holds every
    /// chunk: it reads every staged disk back first, so allow for that at a slow
    /// datastore's pace (100 MB/s) on top of the reply timeout.
    fn commit_allowance(&self) -> Duration {
        self.config.reply_timeout + Duration::from_secs(self.plan.logical_bytes() / 100_000_000)
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.is_finished())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|d| now >= d) {
            let e = ProtocolError::TimedOut(match self.phase {
                Phase::AwaitWelcome => "waiting for the cloud to accept the credential",
                Phase::AwaitPlanAccepted => "waiting for the cloud to accept the plan",
                Phase::AwaitAborted => "waiting for the cloud to abort the migration",
                Phase::AwaitSwitchoverEnded => "waiting for the cloud to roll back or confirm the switchover",
                _ => "waiting for the cloud to register the VM",
            });
            self.fail(e);
        }
    }

    /// Gives up: the cloud is told to discard everything.
    pub fn abort(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        if !self.is_finished() {
            self.outbox.push_back(EdgeMessage::Abort { reason: reason.clone() });
            self.fail(ProtocolError::Aborted(reason));
        }
    }

    fn fail(&mut self, e: ProtocolError) {
        if !self.is_finished() {
            self.phase = Phase::Failed;
            self.deadline = None;
            self.error = Some(e);
        }
    }
}

/// Chunk index of `offset` if it is a chunk boundary inside the disk.
fn checked_index(d: &Disk, offset: u64, chunk_size: u64) -> Option<u64> {
    (offset.is_multiple_of(chunk_size) && offset < d.capacity).then_some(offset / chunk_size)
}
