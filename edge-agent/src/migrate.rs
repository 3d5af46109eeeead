//! The migration driver: connects the sans-I/O [`SenderSession`] to QUIC
//! streams, and to worker tasks that read, zero-check, hash and compress
//! chunks on every core.
//!
//! ```text
//!            +-------------------- SenderSession (Mutex) -------------------+
//!            |  plan, per-chunk state, zero runs, digests, commit           |
//!            +--------------------------------------------------------------+
//!   control reader  <- Welcome/PlanAccepted/Acks/Nack/Committed
//!   control writer  -> Hello/Plan/ZeroChunks/DiskSealed/Commit
//!   N sealers  read (blocking pool) -> zero? -> hash -> compress --+
//!                                                                  v
//!                                   bounded queue of sealed chunks (2N)
//!                                                                  |
//!   N senders  <- [bandwidth cap] <- data stream i <---------------+
//! ```
//! Sealers run ahead of the network, so the link stays busy while a chunk is
//! read or compressed; the queue bounds how far. Memory is bounded by the
//! chunks being sealed, the queue, and quinn's send window (a sender's
//! `write` waits when it is full). The queue's pressure also drives the
//! adaptive zstd level ([`crate::compression`]).

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gateway::plan::{DiskFormat, DiskSpec, MigrationPlan, NicSpec, VmSpec, DEFAULT_CHUNK_SIZE};
use gateway::protocol::{DoneChunk, ProtocolError, SenderConfig, SenderEvent, SenderSession};
use gateway::transport::{
    self, ControlReader, ControlWriter, DataWriter, PathEstimate, Rate, RateLimit, TransportError, TransportTuning,
};
use gateway::wire::{CloudMessage, DowntimeFrom, EdgeMessage, RefusalCode};
use tokio::sync::{mpsc, Notify};
use tracing::Instrument as _;

use crate::checkpoint::{self, Checkpoint, Header};
use crate::compression::{Compression, LevelController, Pressure};
use crate::failover::{self, Rotation, BUSY_POLL, BUSY_RESUME_PATIENCE};
use crate::holes::Holes;
use crate::prehash::{self, Prehash};
use crate::report::{secs, Progress, ProgressSink, Summary};
use crate::source::snapshot_tracking::{self, ChangedChunks};
use crate::source::{open_source_disk, running_lock, ChainLink, DiskReader, SourceVm};
use crate::target::Target;
use crate::MigrateError;

mod sealer;
use sealer::{sealer, SealedChunk};

/// How to migrate, beyond what and where.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Name of the VM in the cloud; default the source's display name.
    pub name: Option<String>,
    /// Source network name to cloud network name.
    pub network_map: Vec<(String, String)>,
    pub chunk_size: u32,
    /// Format of the disks in the cloud; `None` = the datastore's default.
    pub disk_format: Option<DiskFormat>,
    /// Folder, cluster, host, resource pool and datastores in the cloud; the default
    /// leaves every choice to the domain.
    pub placement: gateway::plan::Placement,
    /// Parallel data streams. `None`: as many as cover the round-trip time the
    /// handshake measured at [`PathEstimate::DEFAULT`]'s rate ([`data_streams_for`]);
    /// `Some(n)` when the operator chose them or described the link.
    pub streams: Option<usize>,
    /// Reader/sealer workers. Two per core keeps the cores busy while some
    /// workers wait on the disk.
    pub workers: usize,
    /// zstd level, fixed or adaptive (the default).
    pub compression: Compression,
    /// Bandwidth cap for this migration (chunk bytes on the wire).
    pub max_rate: Option<Rate>,
    /// This agent's name in the cloud's records.
    pub agent: String,
    pub tuning: TransportTuning,
    /// Where to write the endpoint's signed receipt (replacing the file).
    /// `None`: not written, only returned in the summary. Either way it is
    /// checked against this migration and the endpoint's TLS identity.
    pub receipt_path: Option<std::path::PathBuf>,
    /// Where the checkpoint of an unfinished migration is kept, so a restarted
    /// agent resumes it. `None`: no checkpoint files (a dropped link is still
    /// resumed by this process).
    pub state_dir: Option<PathBuf>,
    /// How long to keep reconnecting after the link to the endpoint is lost (at least
    /// [`failover::BUSY_RESUME_PATIENCE`] while endpoints answer that the migration is busy).
    pub retry_for: Duration,
    /// A cold lift, or a pass of a replication.
    pub replication: Replication,
    /// A switchover: what to ask of the cloud beyond the commit.
    pub switchover: SwitchoverOptions,
    /// A replication pass: set (`Some(Some)`, Unix seconds) or clear (`Some(None)`) the
    /// scheduled switchover the cloud holds.
    pub schedule: Option<Option<i64>>,
    /// A replication pass: set (`Some(Some)`) or clear (`Some(None)`) the daily window the
    /// scheduled switchover must start in, which the cloud holds.
    pub schedule_window: Option<Option<gateway::schedule::SwitchoverWindow>>,
    /// Ask the cloud for chunks it holds before sending them, when it offers
    /// (`--no-dedup` turns it off: every chunk is read once and sent).
    pub dedup: bool,
    /// A VM the cloud holds that seeds a replication's first pass (`replicate --seed`):
    /// named in the plan; the cloud checks it before anything is staged.
    pub seed: Option<String>,
}

/// What `edge-agent switchover` asks beyond the commit (see docs/replication.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct SwitchoverOptions {
    /// Power the VM on in the cloud once it is registered.
    pub power_on: bool,
    /// Make the switchover final at once (no rollback).
    pub confirm: bool,
    /// When the edge stopped the source, if it did (through QMP, say): the downtime
    /// counts from there. `None`: the operator stopped it before, and the downtime
    /// counts from its files' last write (a .vmx source, not before the last pass:
    /// `source_stop_estimate`), else from the start of the switchover ([`run`]'s call).
    pub source_stopped_at: Option<Instant>,
}

/// What a run does with the cloud's copy (see docs/replication.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Replication {
    /// A cold lift: send everything, register the VM.
    #[default]
    Off,
    /// Start a replication (a full pass) or run its next delta pass, and leave the
    /// copy in the cloud as a replica: nothing is registered.
    Sync,
    /// A last delta pass of a replication, then register the VM (the source must be
    /// stopped).
    Switchover,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            name: None,
            network_map: Vec::new(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            disk_format: None,
            placement: Default::default(),
            streams: None,
            workers: 4,
            compression: Compression::default(),
            max_rate: None,
            agent: "edge-agent".into(),
            tuning: TransportTuning::default(),
            receipt_path: None,
            state_dir: None,
            retry_for: Duration::from_secs(300),
            replication: Replication::Off,
            switchover: SwitchoverOptions::default(),
            schedule: None,
            schedule_window: None,
            dedup: true,
            seed: None,
        }
    }
}

/// Where a pass reads its source when not from the VM's own files: a point-in-time copy
/// QEMU made of a running VM's disks, and which chunks changed since the last pass
/// ([`crate::tracking`]).
#[derive(Debug)]
pub struct PassSource {
    /// One reader per disk of the VM, in its order, of the disk's capacity.
    pub readers: Vec<Box<dyn DiskReader>>,
    /// Per disk, per chunk: whether it may have changed since the last pass. `None`: any
    /// chunk may have (each is read and compared). A chunk the replica holds that is
    /// not marked is known to be unchanged and is not read.
    pub changed: Option<Vec<Vec<bool>>>,
    /// Set once this pass sent `Commit`: from then on the cloud, not the edge, decides
    /// whether the VM was registered.
    pub commit_sent: Arc<AtomicBool>,
}

/// The plan the cloud is asked to accept.
pub fn build_plan(vm: &SourceVm, opts: &MigrateOptions) -> MigrationPlan {
    let mut plan = MigrationPlan {
        vm: VmSpec {
            name: opts.name.clone().unwrap_or_else(|| vm.name.clone()),
            guest_os: vm.guest_os.clone(),
            num_cpus: vm.num_cpus,
            cores_per_socket: vm.cores_per_socket,
            memory_mib: vm.memory_mib,
            firmware: vm.firmware.clone(),
            bios_uuid: vm.bios_uuid.clone(),
            nics: vm
                .nics
                .iter()
                .map(|n| NicSpec {
                    key: n.key.clone(),
                    network: n.network.clone(),
                    virtual_dev: n.virtual_dev.clone(),
                    mac: n.mac.clone(),
                    address_type: n.address_type.clone(),
                })
                .collect(),
            disks: vm
                .disks
                .iter()
                .map(|d| DiskSpec {
                    key: d.key.clone(),
                    capacity: d.capacity,
                })
                .collect(),
            controllers: vm.controllers.clone(),
        },
        network_map: opts.network_map.clone(),
        chunk_size: opts.chunk_size,
        disk_format: opts.disk_format,
        firewall: vm.firewall.clone(),
        placement: opts.placement.clone(),
        source_descriptor_sha256: Some(vm.descriptor_sha256),
        seed: opts.seed.clone(),
    };
    plan.fit_chunk_size();
    plan
}

/// Work for the reader/sealer workers: every chunk once, in disk order, then
/// whatever the cloud asks to be resent.
#[derive(Debug)]
struct Jobs {
    capacities: Vec<u64>,
    chunk_size: u64,
    disk: usize,
    offset: u64,
    resends: VecDeque<(u16, u64)>,
    started: bool,
    closed: bool,
}

enum Next {
    Job(u16, u64),
    Wait,
    Closed,
}

impl Jobs {
    fn next(&mut self) -> Next {
        if self.closed {
            return Next::Closed;
        }
        if !self.started {
            return Next::Wait;
        }
        if let Some((d, o)) = self.resends.pop_front() {
            return Next::Job(d, o);
        }
        while self.disk < self.capacities.len() {
            if self.offset < self.capacities[self.disk] {
                let job = Next::Job(self.disk as u16, self.offset);
                self.offset += self.chunk_size;
                return job;
            }
            self.disk += 1;
            self.offset = 0;
        }
        Next::Wait
    }
}

struct Shared {
    session: Mutex<SenderSession>,
    wake_writer: Notify,
    jobs: Mutex<Jobs>,
    jobs_changed: Notify,
    payload_bytes: AtomicU64,
    resent_chunks: AtomicU64,
    repaired_chunks: AtomicU64,
    /// The zstd level sealers use for their next chunk.
    level: AtomicI32,
    /// Nanoseconds sealers spent waiting for room in the sealed queue.
    sealers_blocked_ns: AtomicU64,
    /// Nanoseconds in which a sender waited on an empty sealed queue (wall time, not
    /// summed over senders: see `sender`).
    senders_starved_ns: AtomicU64,
    /// Emptied payload buffers, handed back from senders to sealers.
    spare: Mutex<Vec<Vec<u8>>>,
    levels: Mutex<LevelController>,
    run: Arc<RunState>,
    /// Runs of holes the sealers found: their chunks are zeros without a blocking task.
    holes: Holes,
}

/// What outlives one connection: the record of done chunks (checkpointed when a
/// state folder is set) and the counters of the whole run.
struct RunState {
    records: Mutex<Records>,
    /// What the snapshot chains say changed since the last pass of a replication.
    tracking: Tracking,
    sent: Mutex<HashSet<(u16, u64)>>,
    sent_bytes: AtomicU64,
    resent_bytes: AtomicU64,
    /// Plaintext bytes read from the source disks (holes are not read).
    read_bytes: AtomicU64,
    /// See [`PassSource::changed`].
    changed: Option<Vec<Vec<bool>>>,
    commit_sent: Arc<AtomicBool>,
    /// The migration's span: its `migration_id` is recorded once the cloud gave one.
    span: tracing::Span,
    /// A switchover the record marked as awaiting confirmation: the cloud resuming the
    /// pass means it was rolled back since (through the API), see [`RunState::resumed`].
    earlier_switchover: Mutex<EarlierSwitchover>,
    /// When this pass started, on the edge's clock.
    pass_started: SystemTime,
    /// A switchover's downtime counts from this instant, which is what the kind says.
    downtime_since: (Instant, DowntimeFrom),
    /// A delta pass: hashes of the source taken while the first connection was set up.
    prehash: Prehash,
}

/// See [`RunState::earlier_switchover`].
#[derive(Debug, Default)]
struct EarlierSwitchover {
    /// The cloud VM the record names.
    vm_id: Option<String>,
    /// The receipt file of that switchover.
    receipt: Option<PathBuf>,
    /// What the edge made of it, for the summary.
    said: Option<String>,
}

impl RunState {
    /// A chunk the replica holds that the source's tracking says did not change.
    fn unchanged(&self, disk: u16, offset: u64, chunk_size: u64) -> bool {
        let by_qemu = self.changed.as_ref().is_some_and(|changed| {
            changed
                .get(usize::from(disk))
                .and_then(|d| d.get((offset / chunk_size) as usize))
                .is_some_and(|changed| !changed)
        });
        by_qemu || self.tracking.unchanged(disk, offset / chunk_size)
    }
}

struct Records {
    /// (disk, chunk index, hash) of every chunk acknowledged or zero.
    done: Vec<DoneChunk>,
    checkpoint: Option<Checkpoint>,
    /// The header to write once the cloud names the migration.
    header: Header,
}

/// Changed-block tracking of a replication pass, per disk.
#[derive(Debug, Default)]
struct Tracking {
    /// Chunks that may have changed since the last pass; `None`: any may.
    changed: Vec<Option<ChangedChunks>>,
    /// The frozen snapshot chains this pass reads: the next pass's reference.
    frozen: Vec<Vec<ChainLink>>,
    notes: Vec<String>,
}

impl Tracking {
    /// Whether chunk `index` of `disk` is known unchanged since the last pass.
    fn unchanged(&self, disk: u16, index: u64) -> bool {
        matches!(self.changed.get(usize::from(disk)), Some(Some(changed)) if !changed.contains(index))
    }
}

impl RunState {
    /// A replication pass ended: the next one compares against the chains this one read.
    fn passed(&self) {
        let mut r = self.records.lock().expect("records lock poisoned");
        r.header.frozen_chains = self.tracking.frozen.clone();
        r.header.last_pass_started = Some(unix_seconds(self.pass_started));
        let header = r.header.clone();
        if let Some(c) = r.checkpoint.as_mut() {
            if let Err(e) = c.rewrite_header(&header) {
                tracing::warn!(error = %e, path = %c.path().display(), "cannot write the checkpoint; the next pass compares every chunk");
            }
        }
    }

    fn record(&self, disk: u16, index: u64, hash: [u8; 32]) {
        let mut r = self.records.lock().expect("records lock poisoned");
        r.done.push((disk, index, hash));
        if let Some(c) = r.checkpoint.as_mut() {
            c.record(disk, index, &hash);
        }
    }

    fn flush(&self) {
        let mut r = self.records.lock().expect("records lock poisoned");
        if let Some(c) = r.checkpoint.as_mut() {
            if let Err(e) = c.flush() {
                tracing::warn!(error = %e, path = %c.path().display(), "cannot write the checkpoint; a restart would resend more");
            }
        }
    }

    /// The cloud accepted a new migration: start its checkpoint.
    fn started(&self, migration_id: &str) {
        let mut r = self.records.lock().expect("records lock poisoned");
        r.done.clear();
        r.header.migration_id = migration_id.to_owned();
        self.span.record("migration_id", migration_id);
        let header = r.header.clone();
        if let Some(c) = r.checkpoint.as_mut() {
            if let Err(e) = c.start(&header) {
                tracing::warn!(error = %e, path = %c.path().display(), "cannot write the checkpoint; a restarted agent could not resume");
            }
        }
    }

    /// The cloud resumed the migration of the loaded checkpoint: append to it from now.
    /// If the record marked a switchover as awaiting confirmation, the cloud rolled it
    /// back since (it resumes no pass of a switched-over VM): the record drops the mark,
    /// and the receipt file is superseded, as after `edge-agent rollback`.
    fn resumed(&self) {
        let mut r = self.records.lock().expect("records lock poisoned");
        let earlier = {
            let mut e = self
                .earlier_switchover
                .lock()
                .expect("earlier switchover lock poisoned");
            e.vm_id.take().map(|vm| (vm, e.receipt.take()))
        };
        if let Some((vm, receipt)) = earlier {
            let mut said = format!(
                "the switchover to {vm} this edge recorded was rolled back in the cloud since (through the API): \
                 replication goes on from the replica"
            );
            let header = r.header.clone();
            if let Some(c) = r.checkpoint.as_ref() {
                if let Err(e) = c.rewrite_header(&header) {
                    tracing::warn!(error = %e, path = %c.path().display(), "cannot drop the switchover's mark from the checkpoint");
                }
            }
            if let Some(kept) = receipt.as_deref().and_then(supersede_receipt) {
                said.push_str(&format!("; {kept}"));
            }
            tracing::warn!("{said}");
            self.earlier_switchover
                .lock()
                .expect("earlier switchover lock poisoned")
                .said = Some(said);
        }
        if let Some(c) = r.checkpoint.as_mut() {
            if let Err(e) = c.open_chunks() {
                tracing::warn!(error = %e, path = %c.path().display(), "cannot append to the checkpoint; a restart would resend more");
            }
        }
    }

    /// The switchover awaits confirmation: the record says so (see [`end_switchover`]).
    fn mark_switched_over(&self, header: Option<Header>) {
        let r = self.records.lock().expect("records lock poisoned");
        if let (Some(c), Some(header)) = (r.checkpoint.as_ref(), header) {
            if let Err(e) = c.rewrite_header(&header) {
                tracing::warn!(error = %e, path = %c.path().display(), "cannot mark the switchover in the checkpoint; `edge-agent rollback` will not find it");
            }
        }
    }

    fn remove_checkpoint(&self) {
        if let Some(c) = self.records.lock().expect("records lock poisoned").checkpoint.as_mut() {
            c.remove();
        }
    }

    fn sent(&self, disk: u16, offset: u64, len: u64) {
        self.sent_bytes.fetch_add(len, Ordering::Relaxed);
        if !self.sent.lock().expect("sent lock poisoned").insert((disk, offset)) {
            self.resent_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }
}

impl Shared {
    fn session(&self) -> std::sync::MutexGuard<'_, SenderSession> {
        self.session.lock().expect("session lock poisoned")
    }

    fn update_jobs(&self, f: impl FnOnce(&mut Jobs)) {
        f(&mut self.jobs.lock().expect("jobs lock poisoned"));
        self.jobs_changed.notify_waiters();
    }

    async fn next_job(&self) -> Option<(u16, u64)> {
        loop {
            let notified = self.jobs_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.jobs.lock().expect("jobs lock poisoned").next() {
                Next::Job(d, o) => return Some((d, o)),
                Next::Closed => return None,
                Next::Wait => {}
            }
            notified.await;
        }
    }
}

/// Migrates `vm` to `target`. Returns when the VM is registered in the cloud
/// domain, or with the reason it is not (then nothing is registered).
///
/// A migration the cloud accepted survives a lost link: the agent reconnects
/// with backoff (for up to [`MigrateOptions::retry_for`]) and resumes it, sending
/// only what the cloud does not hold durably. With a state folder, a checkpoint
/// lets a restarted agent do the same; a source changed since is refused.
pub async fn run(
    vm: &SourceVm,
    target: &Target,
    opts: &MigrateOptions,
    sink: Arc<dyn ProgressSink>,
) -> Result<Summary, MigrateError> {
    run_pass(vm, target, opts, sink, None).await
}

/// [`run`], reading the source from `pass` when given (a QEMU source's backup) instead
/// of the VM's files.
pub async fn run_pass(
    vm: &SourceVm,
    target: &Target,
    opts: &MigrateOptions,
    sink: Arc<dyn ProgressSink>,
    pass: Option<PassSource>,
) -> Result<Summary, MigrateError> {
    // Every line of the migration carries its id (recorded once known) and VM.
    let span = tracing::info_span!("migration", vm = ?vm.name, migration_id = tracing::field::Empty);
    run_pass_in(vm, target, opts, sink, pass, span.clone())
        .instrument(span)
        .await
}

async fn run_pass_in(
    vm: &SourceVm,
    target: &Target,
    opts: &MigrateOptions,
    sink: Arc<dyn ProgressSink>,
    pass: Option<PassSource>,
    span: tracing::Span,
) -> Result<Summary, MigrateError> {
    let started = Instant::now();
    let pass_started = SystemTime::now();
    let plan = build_plan(vm, opts);
    plan.check_limits().map_err(|e| MigrateError::Target(e.to_string()))?;
    // A replication of files (not a QEMU backup) opens its disks once its record says
    // which snapshot chains the last pass read.
    let chain_tracked = pass.is_none() && opts.replication != Replication::Off;
    let (mut disks, changed, commit_sent) = match pass {
        Some(pass) => {
            let fits = pass.readers.len() == vm.disks.len()
                && pass
                    .readers
                    .iter()
                    .zip(&vm.disks)
                    .all(|(r, d)| r.capacity() == d.capacity);
            if !fits {
                return Err(MigrateError::Target(format!(
                    "the source's copy of {} does not match its disks (count or sizes); nothing was sent",
                    vm.vmx_path.display()
                )));
            }
            (pass.readers, pass.changed, pass.commit_sent)
        }
        None => {
            let mut disks: Vec<Box<dyn DiskReader>> = Vec::with_capacity(vm.disks.len());
            if !chain_tracked {
                for d in &vm.disks {
                    disks.push(open_source_disk(d)?);
                }
            }
            (disks, None, Arc::new(AtomicBool::new(false)))
        }
    };

    // The target as a whole, so that a migration started on one endpoint resumes from
    // another with the same record.
    let keys = target.record_keys();
    let endpoint = keys.first().cloned().unwrap_or_default();
    let source = checkpoint::fingerprint(vm).map_err(|e| MigrateError::Read {
        what: format!("the source files of {}", vm.vmx_path.display()),
        source: e,
    })?;
    let mut header = Header {
        migration_id: String::new(),
        endpoint: endpoint.clone(),
        vm_name: plan.vm.name.clone(),
        plan_digest: checkpoint::plan_digest(&plan),
        plan: gateway::wire::control::encode(&plan).unwrap_or_default(),
        source,
        started: time_now(),
        replica: opts.replication != Replication::Off,
        frozen_chains: Vec::new(),
        switched_over: None,
        last_pass_started: None,
        chunk_hash: gateway::chunk::ChunkHash::CURRENT,
    };
    let mut resume: Option<(String, Vec<DoneChunk>)> = None;
    // The cloud VM of a switchover the record marks as awaiting confirmation.
    let mut switched_over: Option<String> = None;
    // The record as loaded: a switchover that awaits confirmation is marked in it.
    let mut loaded_header: Option<Header> = None;
    let mut ckpt = opts
        .state_dir
        .as_deref()
        .map(|dir| Checkpoint::find(dir, &vm.vmx_path, &keys, &plan.vm.name));
    if let Some(c) = ckpt.as_mut() {
        let loaded = c.load().map_err(|e| {
            MigrateError::Target(format!(
                "cannot read the checkpoint {}: {e}; remove it to start the migration over",
                c.path().display()
            ))
        })?;
        if let Some((recorded, done)) = loaded {
            // A switchover this edge ran awaited confirmation when it last heard: the
            // cloud holds where it stands now (it may have been rolled back or confirmed
            // through the API), so the pass asks it. The cloud refuses the pass while the
            // switchover awaits confirmation or once it is confirmed, and the record is
            // kept; it accepts it after a rollback, and the pass's new record drops the mark.
            if let Some(vm_id) = &recorded.switched_over {
                tracing::info!(migration = %recorded.migration_id, vm = %vm_id, "the record says the switchover awaits confirmation; asking the endpoint where it stands");
                switched_over = Some(vm_id.clone());
            }
            match (recorded.replica, opts.replication) {
                (false, Replication::Off) => check_unchanged(&recorded, &header, &plan, &disks, &done, c.path())?,
                (true, Replication::Off) => {
                    return Err(MigrateError::Target(format!(
                        "{} is being replicated to this endpoint as {} (migration {}): run `edge-agent switchover` to finish it, or `edge-agent abort` to drop the replica",
                        vm.vmx_path.display(),
                        recorded.vm_name,
                        recorded.migration_id
                    )))
                }
                (false, _) => {
                    return Err(MigrateError::Target(format!(
                        "{} has an unfinished cold migration to this endpoint (migration {}): finish it with `edge-agent migrate`, or `edge-agent abort` it before replicating",
                        vm.vmx_path.display(),
                        recorded.migration_id
                    )))
                }
                // The source changes between passes: each pass compares everything.
                (true, _) if recorded.plan_digest != header.plan_digest => {
                    return Err(MigrateError::SourceChanged {
                        migration_id: recorded.migration_id.clone(),
                        what: "the VM's configuration (disks, CPUs, memory, NICs) or the options differ from the replication's; `edge-agent abort` the replication and start it again".into(),
                        checkpoint: c.path().to_owned(),
                    })
                }
                (true, _) => {
                    // Rewritten after each pass: it goes on naming this replication.
                    header.migration_id = recorded.migration_id.clone();
                    header.started = recorded.started.clone();
                    header.frozen_chains = recorded.frozen_chains.clone();
                    header.last_pass_started = recorded.last_pass_started;
                }
            }
            // Appended to only once the endpoint resumed the migration for us: an agent it
            // refuses (another user's, or one whose role may not migrate) must leave the
            // owner's record as it found it.
            span.record("migration_id", recorded.migration_id.as_str());
            tracing::info!(migration = %recorded.migration_id, recorded_chunks = done.len(), "resuming from the checkpoint");
            resume = Some((recorded.migration_id.clone(), done));
            loaded_header = Some(recorded);
        }
    }
    if opts.replication == Replication::Switchover && resume.is_none() {
        return Err(MigrateError::Target(format!(
            "no replication of {} to this endpoint is recorded{}: start one with `edge-agent replicate`, or lift the VM cold with `edge-agent migrate`",
            vm.vmx_path.display(),
            opts.state_dir
                .as_deref()
                .map(|d| format!(" in {}", d.display()))
                .unwrap_or_default()
        )));
    }
    let mut tracking = Tracking::default();
    if chain_tracked {
        // A switchover runs on a stopped VM (checked before): its whole chain is frozen.
        let running = running_lock(vm).is_some();
        for (i, d) in vm.disks.iter().enumerate() {
            let previous = header.frozen_chains.get(i).map(Vec::as_slice);
            let pass = snapshot_tracking::plan_disk_pass(d, running, previous, u64::from(plan.chunk_size))?;
            tracing::info!(disk = %d.key, note = %pass.note, "changed-block tracking");
            disks.push(pass.reader);
            tracking.changed.push(pass.changed);
            tracking.frozen.push(pass.frozen);
            tracking.notes.push(pass.note);
        }
    }
    let disks = Arc::new(disks);
    let downtime_since = match opts.switchover.source_stopped_at {
        Some(at) => (at, DowntimeFrom::EdgeStop),
        None if opts.replication == Replication::Switchover && chain_tracked => {
            let last_pass = loaded_header.as_ref().and_then(|h| h.last_pass_started);
            source_stop_estimate(vm, last_pass, started, pass_started)
        }
        None => (started, DowntimeFrom::SwitchoverStart),
    };
    let run = Arc::new(RunState {
        tracking,
        records: Mutex::new(Records {
            done: resume.as_ref().map(|(_, d)| d.clone()).unwrap_or_default(),
            checkpoint: ckpt,
            header,
        }),
        sent: Mutex::new(HashSet::new()),
        sent_bytes: AtomicU64::new(0),
        resent_bytes: AtomicU64::new(0),
        read_bytes: AtomicU64::new(0),
        changed,
        commit_sent,
        span,
        earlier_switchover: Mutex::new(EarlierSwitchover {
            vm_id: switched_over.clone(),
            receipt: opts.receipt_path.clone(),
            said: None,
        }),
        pass_started,
        downtime_since,
        prehash: Prehash::default(),
    });
    let tracked = run.changed.is_some() || run.tracking.changed.iter().any(Option::is_some);
    if let (Some((_, done)), true, false) = (&resume, opts.replication != Replication::Off, tracked) {
        // A delta pass without changed-block tracking reads the whole source to compare
        // it with what it recorded, which needs nothing from the cloud: it starts now,
        // while the connection, the login and the resume cross the link (see
        // crate::prehash). A tracked pass reads only the changed chunks, once, to send
        // them: hashing them ahead would read each of them twice.
        let cs = u64::from(plan.chunk_size);
        let chunks = Arc::new(prehash::candidates(done.iter().map(|&(d, i, _)| (d, i)), |d, i| {
            run.unchanged(d, i * cs, cs)
        }));
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..opts.workers.max(1) {
            let (run, disks, chunks, next) = (run.clone(), disks.clone(), chunks.clone(), next.clone());
            tokio::task::spawn_blocking(move || run.prehash.hash_ahead(&disks, &chunks, &next, cs, &run.read_bytes));
        }
    }

    let mut reconnects = 0u32;
    let mut down_since: Option<Instant> = None;
    let mut busy_since: Option<Instant> = None;
    let mut backoff = Duration::from_secs(1);
    let mut rotation = Rotation::new(target.endpoints.len());
    // The endpoint that last had the migration going: after it is lost, another
    // endpoint may refuse the resume until it released the migration.
    let mut holder: Option<usize> = None;
    let mut failovers = 0u32;
    loop {
        let outcome = attempt(
            vm,
            target,
            opts,
            &plan,
            &disks,
            resume.clone(),
            &run,
            sink.clone(),
            started,
            &mut rotation,
        )
        .await;
        // Taken for the first connection only: a later one reads the running source again.
        run.prehash.discard();
        let reached = rotation.reached();
        let went_on = match &outcome {
            Ok(_) => true,
            Err((_, _, progressed)) => *progressed,
        };
        if went_on {
            if holder.is_some() && holder != reached {
                failovers += 1;
                tracing::warn!(
                    from = %target.addr(holder.unwrap_or_default()),
                    to = %target.addr(reached.unwrap_or_default()),
                    "the migration goes on through another endpoint"
                );
            }
            holder = reached;
        }
        let (e, migration_id, progressed) = match outcome {
            Ok(mut summary) => {
                let awaiting_confirm = summary.switchover.as_ref().map_or(
                    opts.replication == Replication::Switchover && !opts.switchover.confirm,
                    |s| s.awaiting_confirm,
                );
                if opts.replication == Replication::Sync {
                    // The next pass compares against what this one recorded.
                    run.flush();
                    run.passed();
                } else if awaiting_confirm {
                    // Kept for `edge-agent rollback`: after one, the next pass compares
                    // against what this last pass recorded.
                    run.flush();
                    let header = loaded_header.clone().map(|h| Header {
                        switched_over: Some(summary.vm_id.clone()),
                        ..h
                    });
                    run.mark_switched_over(header);
                } else {
                    run.remove_checkpoint();
                }
                summary.reconnects = reconnects;
                summary.failovers = failovers;
                summary.earlier_switchover = run
                    .earlier_switchover
                    .lock()
                    .expect("earlier switchover lock poisoned")
                    .said
                    .take();
                return Ok(summary);
            }
            Err(failure) => failure,
        };
        if progressed {
            down_since = None;
            busy_since = None;
            backoff = Duration::from_secs(1);
        }
        let known = migration_id.or_else(|| resume.as_ref().map(|(id, _)| id.clone()));
        match &e {
            // Nothing was staged or changed: wait and log in again, within --retry-for;
            // another endpoint of the target may have room.
            MigrateError::LoginsBusy { .. } => {
                let since = *down_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.retry_for {
                    return Err(e_into(&e));
                }
                let at = target.addr(reached.unwrap_or_default());
                rotation.move_on();
                tracing::warn!(
                    error = %e,
                    retry_in = ?backoff,
                    "endpoint {at} is busy with logins; logging in again through {}",
                    target.addr(rotation.next())
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            MigrateError::Refused {
                code: RefusalCode::UnknownMigration,
                problems,
            } if resume.is_some() && switched_over.is_some() => {
                // Not a migration to start over: the switchover awaits confirmation, or
                // was confirmed. The record stays for `confirm` or `rollback`.
                return Err(MigrateError::Target(format!(
                    "{} was switched over to {} (migration {}); the endpoint takes no pass now:\n  - {}\nthe record \
                     of the switchover is kept",
                    vm.vmx_path.display(),
                    switched_over.as_deref().unwrap_or("?"),
                    resume.as_ref().map(|(id, _)| id.as_str()).unwrap_or("?"),
                    problems.join("\n  - ")
                )));
            }
            MigrateError::Refused {
                code: RefusalCode::UnknownMigration,
                problems,
            } if resume.is_some() => {
                // The cloud no longer has it (expired, aborted, already done):
                // start over, and say why.
                tracing::warn!(problems = %problems.join("; "), "the endpoint cannot resume the migration; starting it over");
                run.remove_checkpoint();
                run.records.lock().expect("records lock poisoned").done.clear();
                resume = None;
                continue;
            }
            e if retriable(e) && known.is_some() => {
                let id = known.clone().unwrap_or_default();
                let since = *down_since.get_or_insert_with(Instant::now);
                let busy = matches!(
                    e,
                    MigrateError::Refused {
                        code: RefusalCode::Busy,
                        ..
                    }
                );
                // An endpoint taking over from a lost one refuses the resume while the
                // lost one's lease runs: that wait is owed whatever --retry-for says.
                let patient = busy && busy_since.get_or_insert_with(Instant::now).elapsed() < BUSY_RESUME_PATIENCE;
                if since.elapsed() >= opts.retry_for && !patient {
                    run.flush();
                    return Err(MigrateError::LinkDown {
                        migration_id: id,
                        secs: since.elapsed().as_secs(),
                        last: e.to_string(),
                    });
                }
                // Asked again soon: the lease frees the migration at a moment this
                // agent cannot know.
                let wait = if busy { backoff.min(BUSY_POLL) } else { backoff };
                let moved = rotation.move_on();
                let then = failover::next_attempt(target, moved, rotation.next(), wait);
                let say = failover::waiting_for(target, &id, e, reached, holder, progressed, &then);
                tracing::warn!(migration = %id, retry_in = ?wait, "{say}");
                sink.waiting(&say);
                run.flush();
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                reconnects += 1;
                sink.reconnecting();
                let done = run.records.lock().expect("records lock poisoned").done.clone();
                resume = known.map(|id| (id, done));
            }
            e => {
                run.flush();
                // A refusal before this attempt had the migration going (a resume that
                // another user, a role that may not migrate, or a changed plan asked for)
                // changed nothing at the cloud: the checkpoint stays for whoever may
                // resume or abort the migration.
                if progressed && cloud_discarded(e) {
                    run.remove_checkpoint();
                }
                return Err(e_into(e));
            }
        }
    }
}

/// The checkpoint file of `vm`'s replication (or migration) to `target` under
/// `opts.state_dir`, and whether it records a replica the cloud holds.
pub fn replica_record(vm: &SourceVm, target: &Target, opts: &MigrateOptions) -> (PathBuf, bool) {
    let plan = build_plan(vm, opts);
    let dir = opts.state_dir.clone().unwrap_or_else(checkpoint::default_state_dir);
    let c = Checkpoint::find(&dir, &vm.vmx_path, &target.record_keys(), &plan.vm.name);
    let replica = matches!(c.load(), Ok(Some((header, _))) if header.replica);
    (c.path().to_owned(), replica)
}

/// Aborts the unfinished migration recorded for `vm` and `target` in
/// `opts.state_dir`: the endpoint discards its files and frees the VM name, and
/// the checkpoint is removed. Returns what happened, for the operator. An abort the
/// endpoint refuses (another user's migration, a role that may not abort) changes
/// nothing, here or there: the error says so.
pub async fn abort(vm: &SourceVm, target: &Target, opts: &MigrateOptions) -> Result<String, MigrateError> {
    let Recorded { mut ckpt, header, plan } = recorded(vm, target, opts, |_| true)?.map_err(|(which, dir)| {
        MigrateError::Target(format!(
            "no unfinished migration of {which} is recorded in {}; nothing to abort",
            dir.display()
        ))
    })?;
    let id = header.migration_id.clone();
    let (endpoint_conn, conn) = target.connect(&opts.tuning).await?;
    let mut s = SenderSession::aborting(
        SenderConfig::new(&opts.agent, &target.user, &target.password),
        plan,
        id.clone(),
        "aborted by the operator (edge-agent abort)",
        Instant::now(),
    )?;
    let (send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
    let mut writer = ControlWriter::open(send, true).await?;
    let mut reader = ControlReader::open(recv, false).await?;
    // Ok once the endpoint ended the exchange without refusing: its close says how.
    let outcome: Result<(), MigrateError> = async {
        loop {
            while let Some(msg) = s.poll_transmit(Instant::now()) {
                writer.send(&msg).await?;
            }
            if let Some(e) = s.error() {
                return Err(MigrateError::from(e.clone()));
            }
            let msg = tokio::time::timeout(Duration::from_secs(60), reader.recv::<CloudMessage>())
                .await
                .map_err(|_| MigrateError::Target("the endpoint did not answer within 60 s".into()))?;
            match msg {
                Ok(Some(msg)) => {
                    // A refusal is kept by the session and returned above.
                    let _ = s.handle_control(msg, Instant::now());
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    return match refine(e.into()) {
                        // The confirmation itself.
                        MigrateError::Refused {
                            code: RefusalCode::Aborted,
                            ..
                        } => Ok(()),
                        other => Err(other),
                    };
                }
            }
        }
    }
    .await;
    let refused = |what: String| {
        MigrateError::Target(format!(
            "the endpoint refused to abort migration {id}: {what}\nthe migration goes on (or waits for \
             its edge) and the checkpoint {} is kept",
            ckpt.path().display()
        ))
    };
    match outcome {
        Ok(()) => {
            writer.finish();
            // The endpoint confirms the discard by closing with Aborted.
            let closed = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint_conn.wait_idle()).await;
            match closed {
                Ok(quinn::ConnectionError::ApplicationClosed(c))
                    if RefusalCode::from_close_code(c.error_code.into_inner()) == Some(RefusalCode::Aborted) =>
                {
                    ckpt.remove();
                    Ok(format!(
                        "migration {id} aborted: {}",
                        String::from_utf8_lossy(&c.reason)
                    ))
                }
                other => Err(MigrateError::Target(format!(
                    "the endpoint did not confirm the abort of {id} ({other:?}); run the same command again"
                ))),
            }
        }
        Err(MigrateError::Refused {
            code: RefusalCode::UnknownMigration,
            problems,
        }) => {
            ckpt.remove();
            Ok(format!(
                "nothing to abort at the endpoint: {}; the local checkpoint was removed",
                problems.join("; ")
            ))
        }
        Err(MigrateError::Refused { code, problems }) => Err(refused(format!(
            "{}\n  - {}",
            crate::refusal_head(code),
            problems.join("\n  - ")
        ))),
        Err(e) => Err(e),
    }
}

/// Unix seconds of `t` (0 before 1970).
fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Where the downtime of a switchover of a source the operator stopped before counts
/// from: the newest modification time of its files (`source::last_written`), as an
/// instant of this process (`started` is now at `started_at` on the edge's clock), not
/// before the last pass started (`last_pass`, Unix seconds): a file last written before
/// that, such as a copy, says nothing of the stop. Without files or with a time after
/// now (the datastore's clock ahead of the edge's), from the switchover's start.
fn source_stop_estimate(
    vm: &SourceVm,
    last_pass: Option<i64>,
    started: Instant,
    started_at: SystemTime,
) -> (Instant, DowntimeFrom) {
    let files = crate::source::last_written::stop_witnesses(vm);
    let Some((mut written, file)) = crate::source::last_written::newest(&files) else {
        return (started, DowntimeFrom::SwitchoverStart);
    };
    let floor = last_pass
        .and_then(|s| u64::try_from(s).ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s));
    if let Some(floor) = floor.filter(|f| *f > written) {
        written = floor;
    }
    let Some(at) = started_at
        .duration_since(written)
        .ok()
        .and_then(|before| started.checked_sub(before))
    else {
        tracing::warn!(file = %file.display(), "the source's files were last written after the switchover started (the datastore's clock is ahead?): the downtime counts from the switchover's start");
        return (started, DowntimeFrom::SwitchoverStart);
    };
    tracing::info!(file = %file.display(), before_ms = started.duration_since(at).as_millis() as u64, "the source's files were last written before the switchover: the downtime counts from there (an estimate)");
    (at, DowntimeFrom::SourceFilesWritten)
}

/// The receipt file of a switchover that was rolled back is renamed `.superseded`: it no
/// longer states the cloud's VM. Returns what was done, if the file was there.
fn supersede_receipt(receipt: &Path) -> Option<String> {
    if !receipt.is_file() {
        return None;
    }
    let superseded = receipt.with_extension("json.superseded");
    std::fs::rename(receipt, &superseded).ok()?;
    Some(format!(
        "the receipt {} no longer states the cloud's VM: kept as {}",
        receipt.display(),
        superseded.display()
    ))
}

/// A migration recorded in the state folder, as `abort`, `rollback` and `confirm` find it.
struct Recorded {
    ckpt: Checkpoint,
    header: Header,
    /// The plan the migration started with, even if the source changed since.
    plan: MigrationPlan,
}

/// The migration of `vm` to `target` recorded in `opts.state_dir`, if its header is
/// `usable`; otherwise which migration was looked for ("VMX to ENDPOINT as NAME") and where.
fn recorded(
    vm: &SourceVm,
    target: &Target,
    opts: &MigrateOptions,
    usable: impl Fn(&Header) -> bool,
) -> Result<Result<Recorded, (String, PathBuf)>, MigrateError> {
    let plan = build_plan(vm, opts);
    let endpoint = target.describe();
    let dir = opts.state_dir.clone().unwrap_or_else(checkpoint::default_state_dir);
    let ckpt = Checkpoint::find(&dir, &vm.vmx_path, &target.record_keys(), &plan.vm.name);
    let loaded = ckpt
        .load()
        .map_err(|e| MigrateError::Target(format!("cannot read the checkpoint {}: {e}", ckpt.path().display())))?;
    let Some((header, _)) = loaded.filter(|(h, _)| usable(h)) else {
        let which = format!("{} to {endpoint} as {:?}", vm.vmx_path.display(), plan.vm.name);
        return Ok(Err((which, dir)));
    };
    let plan = match gateway::wire::control::decode::<MigrationPlan>(&header.plan) {
        Ok(gateway::wire::Decoded::Frame(p, _)) => p,
        _ => plan,
    };
    Ok(Ok(Recorded { ckpt, header, plan }))
}

/// Rolls back (`confirm: false`) or confirms the switchover recorded for `vm` and
/// `target` in `opts.state_dir` as awaiting confirmation. A rollback: the cloud powers its
/// VM off before it answers, unregisters it and keeps its disks as the replica; the
/// record stays, so that `edge-agent replicate` goes on, and the receipt file is renamed
/// `.superseded`. A confirmation: final; the record is removed. Returns what the cloud
/// did; a refusal changes nothing, here or there.
pub async fn end_switchover(
    vm: &SourceVm,
    target: &Target,
    opts: &MigrateOptions,
    confirm: bool,
) -> Result<String, MigrateError> {
    let verb = if confirm { "confirm" } else { "roll back" };
    let awaiting = |h: &Header| h.switched_over.is_some();
    let Recorded { mut ckpt, header, plan } = recorded(vm, target, opts, awaiting)?.map_err(|(which, dir)| {
        MigrateError::Target(format!(
            "no switchover of {which} awaiting confirmation is recorded in {}; nothing to {verb} \
             (a switchover run with --confirm is final)",
            dir.display()
        ))
    })?;
    let id = header.migration_id.clone();
    let (endpoint_conn, conn) = target.connect(&opts.tuning).await?;
    let mut s = SenderSession::ending_switchover(
        SenderConfig::new(&opts.agent, &target.user, &target.password),
        plan,
        id.clone(),
        confirm,
        Instant::now(),
    )?;
    let (send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
    let mut writer = ControlWriter::open(send, true).await?;
    let mut reader = ControlReader::open(recv, false).await?;
    let outcome: Result<String, MigrateError> = async {
        loop {
            while let Some(msg) = s.poll_transmit(Instant::now()) {
                writer.send(&msg).await?;
            }
            while let Some(event) = s.poll_event() {
                if let SenderEvent::SwitchoverEnded { message } = event {
                    return Ok(message);
                }
            }
            if let Some(e) = s.error() {
                return Err(MigrateError::from(e.clone()));
            }
            let wait = s
                .poll_timeout()
                .map_or(Duration::from_secs(60), |d| d.saturating_duration_since(Instant::now()));
            let Ok(msg) = tokio::time::timeout(wait, reader.recv::<CloudMessage>()).await else {
                s.handle_timeout(Instant::now());
                continue;
            };
            match msg {
                // A refusal is kept by the session and returned above.
                Ok(Some(msg)) => {
                    let _ = s.handle_control(msg, Instant::now());
                }
                Ok(None) => {
                    return Err(MigrateError::Target(format!(
                    "the endpoint ended the connection before it said whether it could {verb} the switchover of {id}; \
                         run the same command again"
                )))
                }
                Err(e) => return Err(refine(e.into())),
            }
        }
    }
    .await;
    writer.finish();
    transport::close_and_flush(&conn, 0u32.into(), b"done", Duration::from_secs(2)).await;
    drop(endpoint_conn);
    match outcome {
        Ok(message) if confirm => {
            ckpt.remove();
            Ok(message)
        }
        Ok(message) => {
            let back = Header {
                switched_over: None,
                ..header
            };
            let kept = ckpt.rewrite_header(&back).map_err(|e| {
                MigrateError::Target(format!(
                    "{message}\nbut the record {} cannot be updated ({e}): fix the folder, then run `edge-agent \
                     rollback` again (the endpoint answers that it is rolled back already)",
                    ckpt.path().display()
                ))
            });
            kept?;
            let mut said = message;
            if let Some(kept) = opts.receipt_path.as_deref().and_then(supersede_receipt) {
                said.push_str(&format!("\n{kept}"));
            }
            Ok(said)
        }
        Err(MigrateError::Refused { code, problems }) => Err(MigrateError::Target(format!(
            "the endpoint refused to {verb} the switchover of {id}: {}\n  - {}\nnothing was changed; the record {} is kept",
            crate::refusal_head(code),
            problems.join("\n  - "),
            ckpt.path().display()
        ))),
        Err(e) => Err(e),
    }
}

/// The error as returned (the match above borrows it).
fn e_into(e: &MigrateError) -> MigrateError {
    match e {
        MigrateError::Refused { code, problems } => MigrateError::Refused {
            code: *code,
            problems: problems.clone(),
        },
        other => MigrateError::Target(other.to_string()),
    }
}

/// Errors after which the same migration can go on over a new connection.
fn retriable(e: &MigrateError) -> bool {
    matches!(
        e,
        MigrateError::Transport(_)
            | MigrateError::Refused {
                code: RefusalCode::Busy,
                ..
            }
            | MigrateError::Protocol(ProtocolError::TimedOut(_))
    )
}

/// Whether the cloud threw the migration away (so the checkpoint is worthless).
fn cloud_discarded(e: &MigrateError) -> bool {
    match e {
        MigrateError::Refused { code, .. } => !matches!(code, RefusalCode::Paused | RefusalCode::Busy),
        MigrateError::Protocol(_) => true,
        // Unconfirmed, the checkpoint stays so that `edge-agent abort` can finish the job.
        MigrateError::SourceDamaged { discarded, .. } => *discarded,
        _ => false,
    }
}

/// Unix seconds as RFC 3339 UTC.
pub fn rfc3339(unix: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn time_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A checkpoint is only resumed for the same plan and an unchanged source: its files'
/// stamps, and a re-read of up to 16 recorded chunks spread over the disks.
fn check_unchanged(
    recorded: &Header,
    now: &Header,
    plan: &MigrationPlan,
    disks: &[Box<dyn DiskReader>],
    done: &[(u16, u64, [u8; 32])],
    path: &std::path::Path,
) -> Result<(), MigrateError> {
    let changed = |what: String| MigrateError::SourceChanged {
        migration_id: recorded.migration_id.clone(),
        what,
        checkpoint: path.to_owned(),
    };
    if recorded.plan_digest != now.plan_digest {
        return Err(changed("the VM's configuration or the migration options differ".into()));
    }
    for (was, is) in recorded.source.iter().zip(&now.source) {
        if was != is {
            return Err(changed(format!(
                "{} was modified (size {} -> {}, modified {} -> {} ns)",
                is.path.display(),
                was.len,
                is.len,
                was.mtime_ns,
                is.mtime_ns
            )));
        }
    }
    if recorded.source.len() != now.source.len() {
        return Err(changed("its set of files differs".into()));
    }
    let cs = u64::from(plan.chunk_size);
    let step = (done.len() / 16).max(1);
    let mut plain = Vec::new();
    for &(disk, index, hash) in done.iter().step_by(step).take(16) {
        let Some(reader) = disks.get(usize::from(disk)) else {
            return Err(changed(format!("the checkpoint names disk {disk}")));
        };
        let offset = index * cs;
        if offset >= reader.capacity() {
            return Err(changed(format!("disk {disk} is smaller than recorded")));
        }
        plain.resize((reader.capacity() - offset).min(cs) as usize, 0);
        reader.read_at(offset, &mut plain).map_err(|e| {
            if is_damage(&e) {
                changed(format!("disk {disk} at offset {offset} can no longer be read ({e})"))
            } else {
                MigrateError::Read {
                    what: format!("disk {disk} at offset {offset}"),
                    source: e,
                }
            }
        })?;
        if gateway::chunk::chunk_hash(&plain) != hash {
            return Err(changed(format!(
                "disk {disk} at offset {offset} holds other data than was sent"
            )));
        }
    }
    Ok(())
}

type AttemptFailure = (MigrateError, Option<String>, bool);

/// One connection's worth of the migration. On failure: the error, the
/// migration id if the cloud named it, and whether this attempt got as far as
/// streaming (then the backoff starts over).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    vm: &SourceVm,
    target: &Target,
    opts: &MigrateOptions,
    plan: &MigrationPlan,
    disks: &Arc<Vec<Box<dyn DiskReader>>>,
    resume: Option<(String, Vec<DoneChunk>)>,
    run: &Arc<RunState>,
    sink: Arc<dyn ProgressSink>,
    started: Instant,
    rotation: &mut Rotation,
) -> Result<Summary, AttemptFailure> {
    let _ = vm;
    let total = plan.logical_bytes();
    let crate::target::Connected { index, endpoint, conn } = target
        .connect_from(rotation.start(), &opts.tuning)
        .await
        .map_err(|e| (MigrateError::from(e), None, false))?;
    rotation.connected(index);
    let via = target.addr(index);
    tracing::info!(endpoint = %via, "connected");

    let config = SenderConfig::new(&opts.agent, &target.user, &target.password);
    let mut session = match resume {
        // A replication is compared chunk by chunk on every resume: its source runs.
        Some((id, done)) if opts.replication != Replication::Off => {
            SenderSession::syncing(config, plan.clone(), id, done, Instant::now())
        }
        Some((id, done)) => SenderSession::resuming(config, plan.clone(), id, done, Instant::now()),
        None => SenderSession::new(config, plan.clone(), Instant::now()),
    }
    .map_err(|e| (e.into(), None, false))?;
    if !opts.dedup {
        session.refuse_dedup();
    }
    if run
        .earlier_switchover
        .lock()
        .expect("earlier switchover lock poisoned")
        .vm_id
        .is_some()
    {
        session.after_switchover();
    }
    match opts.replication {
        Replication::Sync => {
            session.finish_as_replica();
            if let Some(at) = opts.schedule {
                session.schedule(at);
            }
            if let Some(window) = opts.schedule_window {
                session.schedule_window(window);
            }
        }
        Replication::Switchover => session.finish_as_switchover(
            opts.switchover.power_on,
            opts.switchover.confirm,
            run.downtime_since.0,
            run.downtime_since.1,
        ),
        Replication::Off => {}
    }
    let shared = Arc::new(Shared {
        session: Mutex::new(session),
        wake_writer: Notify::new(),
        jobs: Mutex::new(Jobs {
            capacities: plan.vm.disks.iter().map(|d| d.capacity).collect(),
            chunk_size: u64::from(plan.chunk_size),
            disk: 0,
            offset: 0,
            resends: VecDeque::new(),
            started: false,
            closed: false,
        }),
        jobs_changed: Notify::new(),
        payload_bytes: AtomicU64::new(0),
        resent_chunks: AtomicU64::new(0),
        repaired_chunks: AtomicU64::new(0),
        level: AtomicI32::new(opts.compression.initial_level()),
        sealers_blocked_ns: AtomicU64::new(0),
        senders_starved_ns: AtomicU64::new(0),
        spare: Mutex::new(Vec::new()),
        levels: Mutex::new(LevelController::new(opts.compression)),
        run: run.clone(),
        holes: Holes::new(plan.vm.disks.len()),
    });

    let result = drive(&shared, &conn, disks, opts, plan, sink.clone(), started).await;
    shared.update_jobs(|j| j.closed = true);
    let wire_bytes = conn.stats().udp_tx.bytes;
    let (migration_id, progressed) = {
        let s = shared.session();
        (s.migration_id().map(str::to_owned), s.migration_id().is_some())
    };
    match result {
        Ok((vm_id, vm_path, migration_id)) => {
            let synced = shared.session().is_synced();
            // The VM is registered whatever happens to its receipt now. A replication
            // pass has no receipt: nothing was registered.
            let receipt = shared.session().receipt().map(str::to_owned);
            let kept = if synced {
                Ok(None)
            } else {
                crate::receipt::keep(
                    &conn,
                    receipt.as_deref(),
                    opts.receipt_path.as_deref(),
                    &vm_id,
                    &migration_id,
                )
            };
            let duration = started.elapsed();
            // The close must reach the cloud; the drain after it is nobody's business.
            transport::close_and_flush(
                &conn,
                0u32.into(),
                if synced { b"synced" } else { b"committed" },
                Duration::from_secs(2),
            )
            .await;
            drop(endpoint);
            let s = shared.session();
            sink.progress(&Progress {
                done_bytes: s.done_bytes(),
                total_bytes: total,
                wire_bytes,
                sent_bytes: run.sent_bytes.load(Ordering::Relaxed),
                elapsed_secs: secs(duration),
                read_bytes: run.read_bytes.load(Ordering::Relaxed),
                link: Some(crate::report::LinkSample::of(&conn)),
            });
            let kept = kept.map_err(|e| (e, Some(migration_id.clone()), true))?;
            Ok(Summary {
                vm: plan.vm.name.clone(),
                vm_id,
                vm_path,
                migration_id,
                disks: plan.vm.disks.len(),
                logical_bytes: total,
                zero_bytes: s.zero_bytes(),
                payload_bytes: shared.payload_bytes.load(Ordering::Relaxed),
                wire_bytes,
                resent_chunks: shared.resent_chunks.load(Ordering::Relaxed),
                repaired_chunks: shared.repaired_chunks.load(Ordering::Relaxed),
                sent_bytes: run.sent_bytes.load(Ordering::Relaxed),
                dedup_bytes: s.dedup_bytes(),
                seeded_bytes: s.seeded_bytes(),
                resent_bytes: run.resent_bytes.load(Ordering::Relaxed),
                read_bytes: run.read_bytes.load(Ordering::Relaxed),
                tracking: None,
                resumed_bytes: s.resumed_bytes(),
                reconnects: 0,
                endpoint: via,
                failovers: 0,
                duration_secs: secs(duration),
                receipt_path: kept,
                receipt: receipt.unwrap_or_default(),
                report: s.report().cloned(),
                replica: synced,
                snapshots: run.tracking.notes.clone(),
                switchover_at: s.scheduled_switchover().and_then(rfc3339),
                switchover_window: s.scheduled_window().map(|w| w.to_string()),
                earlier_switchover: None,
                switchover: s.switchover_outcome().map(|o| crate::report::SwitchoverReport {
                    powered_on: o.powered_on,
                    power_error: o.power_error.clone(),
                    downtime_ms: o.downtime_ms,
                    downtime_from: run.downtime_since.1.describe(),
                    awaiting_confirm: o.awaiting_confirm,
                }),
            })
        }
        Err(e) => {
            let e = match refine(e) {
                MigrateError::Refused {
                    code: RefusalCode::Busy,
                    problems,
                } if !shared.session().is_welcomed() => MigrateError::LoginsBusy { problems },
                e => e,
            };
            // A lost link gets no close (there is nobody to tell); anything
            // else tells the cloud at once why this connection ends: Aborted
            // when the migration cannot go on (the cloud discards it), Paused
            // when it can be resumed later (a source read error, for one).
            if !matches!(e, MigrateError::Transport(_)) {
                // A damaged source was aborted: closing says so again, confirmed or not.
                let code = if cloud_discarded(&e) || matches!(e, MigrateError::SourceDamaged { .. }) {
                    RefusalCode::Aborted
                } else {
                    RefusalCode::Paused
                };
                transport::close(&conn, code, &e.to_string());
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            Err((e, migration_id, progressed))
        }
    }
}

/// A closed connection carrying one of our refusal codes is a refusal.
fn refine(e: MigrateError) -> MigrateError {
    if let MigrateError::Transport(TransportError::Connection(quinn::ConnectionError::ApplicationClosed(c))) = &e {
        if let Some(code) = RefusalCode::from_close_code(c.error_code.into_inner()) {
            return MigrateError::Refused {
                code,
                problems: vec![String::from_utf8_lossy(&c.reason).into_owned()],
            };
        }
    }
    e
}

async fn drive(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    disks: &Arc<Vec<Box<dyn DiskReader>>>,
    opts: &MigrateOptions,
    plan: &MigrationPlan,
    sink: Arc<dyn ProgressSink>,
    started: Instant,
) -> Result<(String, String, String), MigrateError> {
    let (send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
    let writer = ControlWriter::open(send, true).await?;
    let reader = ControlReader::open(recv, false).await?;
    let streams = opts
        .streams
        .unwrap_or_else(|| data_streams_for(conn.rtt(), opts.max_rate));
    tracing::info!(streams, rtt_ms = conn.rtt().as_secs_f64() * 1e3, "data streams");
    let (fail_tx, mut fail_rx) = mpsc::channel::<MigrateError>(streams + 2);

    let mut tasks = tokio::task::JoinSet::new();
    {
        let shared = shared.clone();
        let fail_tx = fail_tx.clone();
        tasks.spawn(in_span(async move {
            if let Err(e) = control_writer(&shared, writer).await {
                let _ = fail_tx.send(e).await;
            }
        }));
    }
    let (streams, workers) = (streams.max(1), opts.workers.max(1));
    // Room for two sealed chunks per worker: a sender rarely waits while a
    // sealer is between chunks, and memory stays a few chunks deep.
    let (sealed_tx, sealed_rx) = mpsc::channel::<SealedChunk>(2 * workers);
    let sealed_rx = Arc::new(tokio::sync::Mutex::new(sealed_rx));
    let limit = opts.max_rate.map(|r| Arc::new(RateLimit::new(r)));
    for _ in 0..workers {
        let (shared, disks, fail_tx, sealed_tx) = (shared.clone(), disks.clone(), fail_tx.clone(), sealed_tx.clone());
        tasks.spawn(in_span(async move {
            if let Err(e) = sealer(&shared, &disks, sealed_tx).await {
                let _ = fail_tx.send(e).await;
            }
        }));
    }
    for _ in 0..streams {
        let (shared, conn, fail_tx, sealed_rx, limit) = (
            shared.clone(),
            conn.clone(),
            fail_tx.clone(),
            sealed_rx.clone(),
            limit.clone(),
        );
        tasks.spawn(in_span(async move {
            if let Err(e) = sender(&shared, &conn, &sealed_rx, limit.as_deref()).await {
                let _ = fail_tx.send(e).await;
            }
        }));
    }
    drop(sealed_tx);
    {
        let (shared, conn, sink) = (shared.clone(), conn.clone(), sink.clone());
        let total = plan.logical_bytes();
        tasks.spawn(in_span(async move {
            const TICK: Duration = Duration::from_millis(200);
            // The compression level follows the pressure of the last second.
            const TICKS_PER_WINDOW: u32 = 5;
            let mut tick = tokio::time::interval(TICK);
            let mut ticks = 0u32;
            loop {
                tick.tick().await;
                if !shared.jobs.lock().expect("jobs lock poisoned").started {
                    continue;
                }
                ticks += 1;
                if ticks.is_multiple_of(TICKS_PER_WINDOW) {
                    let window = (TICK * TICKS_PER_WINDOW).as_nanos() as f64;
                    let pressure = Pressure {
                        sealers_blocked: shared.sealers_blocked_ns.swap(0, Ordering::Relaxed) as f64
                            / (window * workers as f64),
                        // Wall time, not per stream: see `sender`.
                        senders_starved: (shared.senders_starved_ns.swap(0, Ordering::Relaxed) as f64 / window)
                            .min(1.0),
                    };
                    let level = shared.levels.lock().expect("levels lock poisoned").update(pressure);
                    if shared.level.swap(level, Ordering::Relaxed) != level {
                        tracing::debug!(level, ?pressure, "zstd level changed");
                    }
                }
                if ticks.is_multiple_of(TICKS_PER_WINDOW) {
                    shared.run.flush();
                }
                let done_bytes = shared.session().done_bytes();
                sink.progress(&Progress {
                    done_bytes,
                    total_bytes: total,
                    wire_bytes: conn.stats().udp_tx.bytes,
                    sent_bytes: shared.run.sent_bytes.load(Ordering::Relaxed),
                    elapsed_secs: secs(started.elapsed()),
                    read_bytes: shared.run.read_bytes.load(Ordering::Relaxed),
                    link: Some(crate::report::LinkSample::of(&conn)),
                });
            }
        }));
    }
    drop(fail_tx);

    let outcome = tokio::select! {
        r = control_reader(shared, reader, sink.as_ref(), plan) => r,
        Some(e) = fail_rx.recv() => Err(e),
    };
    let outcome = match outcome {
        Err(MigrateError::Read { what, source }) => Err(source_failed(shared, conn, plan, what, source).await),
        other => other,
    };
    if outcome.is_ok() {
        // Let the workers see the closed queue and finish their streams.
        shared.update_jobs(|j| j.closed = true);
        shared.wake_writer.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            // The progress ticker never ends; wait only for the others.
            while tasks.len() > 1 {
                if tasks.join_next().await.is_none() {
                    break;
                }
            }
        })
        .await;
    }
    tasks.abort_all();
    outcome
}

/// Data streams for a path whose rate nobody gave: [`TransportTuning::for_path`] at the
/// round-trip time the handshake measured and the default rate (or the cap, if lower),
/// as `link-test` sizes its probe.
///
/// The trade-off: a stream carries at most [`gateway::transport::STREAM_WINDOW`] per round
/// trip, so the streams bound the rate (4 streams at 150 ms: about 270 Mbit/s), and each
/// one costs the endpoint memory whatever the path: quinn buffers up to a stream window
/// the endpoint has not read yet, plus a chunk's payload and plaintext buffers. With
/// 1 MiB chunks on loopback 16 streams held 42 MiB of the endpoint's heap at its peak and
/// 33-36 MiB more peak RSS than 4 (docs/benchmarks.md, issue 16). So the count follows the
/// path: a LAN gets 4, a 500 Mbit/s or 1 Gbit/s link at 150 ms still gets 16 (three
/// windows per bandwidth-delay product, room for the RTT to grow under load and for
/// streams that wait on a retransmission). The handshake's RTT is a floor of the path's;
/// a link that only looks short idle is under-streamed by at most that factor of three.
pub fn data_streams_for(rtt: Duration, max_rate: Option<Rate>) -> usize {
    let rate_bps = max_rate.map_or(PathEstimate::DEFAULT.rate_bps, |r| {
        r.bps().min(PathEstimate::DEFAULT.rate_bps)
    });
    TransportTuning::for_path(PathEstimate { rate_bps, rtt }).data_streams
}

/// `task` in the current span (the migration's): its lines carry the migration id.
fn in_span<F: std::future::Future>(task: F) -> tracing::instrument::Instrumented<F> {
    task.in_current_span()
}

/// How long the cloud has to confirm that it discarded a migration the edge aborted.
const ABORT_CONFIRM: Duration = Duration::from_secs(30);

/// Whether a read error shows the source itself damaged: content its format cannot hold
/// (InvalidData), or a file shorter than its tables or than when it was opened
/// (UnexpectedEof). A resume would read the same bytes again. Anything else (EIO from a
/// flaky NFS mount, a permission taken away) may pass.
fn is_damage(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
    )
}

/// A source read failed mid-transfer. Damage is not fixed by a resume: the migration is
/// aborted on both sides (the cloud discards its staging and frees the name, and confirms
/// by closing with Aborted). Anything else pauses it, kept for a resume. Either way the
/// error says which.
async fn source_failed(
    shared: &Shared,
    conn: &quinn::Connection,
    plan: &MigrationPlan,
    what: String,
    source: std::io::Error,
) -> MigrateError {
    let migration_id = shared.session().migration_id().unwrap_or_default().to_owned();
    let vm_name = plan.vm.name.clone();
    if !is_damage(&source) {
        return MigrateError::SourceReadPaused {
            what,
            source,
            migration_id,
            vm_name,
        };
    }
    tracing::warn!(%what, error = %source, "the source is damaged; aborting the migration");
    shared.update_jobs(|j| j.closed = true);
    shared
        .session()
        .abort(format!("the source is damaged: {what}: {source}"));
    shared.wake_writer.notify_one();
    let discarded = matches!(
        tokio::time::timeout(ABORT_CONFIRM, conn.closed()).await,
        Ok(quinn::ConnectionError::ApplicationClosed(c))
            if RefusalCode::from_close_code(c.error_code.into_inner()) == Some(RefusalCode::Aborted)
    );
    MigrateError::SourceDamaged {
        what,
        source,
        migration_id,
        vm_name,
        discarded,
    }
}

async fn control_writer(shared: &Shared, mut writer: ControlWriter) -> Result<(), MigrateError> {
    loop {
        let (msgs, finished) = {
            let mut s = shared.session();
            let now = Instant::now();
            let msgs: Vec<_> = std::iter::from_fn(|| s.poll_transmit(now)).collect();
            (msgs, s.is_finished())
        };
        for msg in &msgs {
            // A switchover is a commit too: once it is out, the cloud may register (and
            // power on) the VM, so a failure must not resume a source QEMU.
            if matches!(msg, EdgeMessage::Commit | EdgeMessage::Switchover(_)) {
                shared.run.commit_sent.store(true, Ordering::SeqCst);
            }
            if matches!(
                msg,
                EdgeMessage::Commit | EdgeMessage::Switchover(_) | EdgeMessage::SyncDone
            ) {
                tracing::info!("every disk sealed; asking the cloud to finish the pass");
            }
            writer.send(msg).await?;
        }
        if finished {
            writer.finish();
            return Ok(());
        }
        shared.wake_writer.notified().await;
    }
}

async fn control_reader(
    shared: &Shared,
    mut reader: ControlReader,
    sink: &dyn ProgressSink,
    plan: &MigrationPlan,
) -> Result<(String, String, String), MigrateError> {
    let mut migration_id = String::new();
    loop {
        let deadline = shared.session().poll_timeout();
        let msg = match deadline {
            Some(deadline) => tokio::select! {
                msg = reader.recv::<CloudMessage>() => msg?,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let mut s = shared.session();
                    s.handle_timeout(Instant::now());
                    if let Some(e) = s.error() {
                        return Err(e.clone().into());
                    }
                    continue;
                }
            },
            None => reader.recv::<CloudMessage>().await?,
        };
        let Some(msg) = msg else {
            return Err(TransportError::StreamClosed.into());
        };
        let mut s = shared.session();
        s.handle_control(msg, Instant::now())?;
        while let Some(event) = s.poll_event() {
            match event {
                SenderEvent::Welcomed { endpoint, role } => {
                    tracing::info!(%endpoint, %role, "credential accepted");
                }
                SenderEvent::Accepted {
                    migration_id: id,
                    datastore,
                } => {
                    // First: the span gets the id, so this line carries it too.
                    shared.run.started(&id);
                    tracing::info!(migration = %id, %datastore, "plan accepted");
                    sink.started(&plan.vm.name, &id, plan.logical_bytes());
                    migration_id = id;
                    shared.update_jobs(|j| j.started = true);
                }
                SenderEvent::Resumed {
                    migration_id: id,
                    datastore,
                    done_bytes,
                    to_hash,
                } => {
                    let prehashed = shared.run.prehash.stop();
                    tracing::info!(migration = %id, %datastore, done_bytes, to_hash, prehashed, "migration resumed");
                    shared.run.resumed();
                    sink.started(&plan.vm.name, &id, plan.logical_bytes());
                    migration_id = id;
                    shared.update_jobs(|j| j.started = true);
                }
                SenderEvent::Acked { disk, chunks, .. } => {
                    let cs = u64::from(plan.chunk_size);
                    for (offset, hash) in chunks {
                        shared.run.record(disk, offset / cs, hash);
                    }
                }
                SenderEvent::Repairing { disk, chunks } => {
                    shared.repaired_chunks.fetch_add(chunks, Ordering::Relaxed);
                    tracing::warn!(
                        disk,
                        chunks,
                        "the cloud read its staged copy back and found chunks that differ from what it acknowledged; sending them again"
                    );
                }
                SenderEvent::Resend { disk, offset } => {
                    tracing::warn!(disk, offset, "chunk rejected by the cloud, resending");
                    shared.resent_chunks.fetch_add(1, Ordering::Relaxed);
                    shared.update_jobs(|j| j.resends.push_back((disk, offset)));
                }
                // Deduplication: the cloud does not hold these; they are read again and sent.
                SenderEvent::Send { disk, offsets } => {
                    shared.update_jobs(|j| j.resends.extend(offsets.into_iter().map(|o| (disk, o))));
                }
                SenderEvent::Committed { vm_id, vm_path, .. } => {
                    shared.wake_writer.notify_one();
                    return Ok((vm_id, vm_path, migration_id));
                }
                // A replication pass: the replica is kept, no VM is registered.
                SenderEvent::Synced {
                    delta_bytes,
                    switchover_at,
                } => {
                    tracing::info!(migration = %migration_id, delta_bytes, ?switchover_at, "replica in sync");
                    return Ok((String::new(), String::new(), migration_id));
                }
                // Only a session made to validate a plan (`edge-agent plan`), or to roll
                // back or confirm a switchover, has them.
                SenderEvent::Validated(_) | SenderEvent::SwitchoverEnded { .. } => {}
            }
        }
        drop(s);
        shared.wake_writer.notify_one();
    }
}

/// Takes sealed chunks off the queue and writes them to one data stream,
/// within the bandwidth cap.
async fn sender(
    shared: &Shared,
    conn: &quinn::Connection,
    sealed: &tokio::sync::Mutex<mpsc::Receiver<SealedChunk>>,
    limit: Option<&RateLimit>,
) -> Result<(), MigrateError> {
    let mut stream: Option<DataWriter> = None;
    loop {
        // Starvation is timed only while this sender holds the queue: the holder waits on
        // an empty queue, the others wait on the holder. The sum over all senders is then
        // the wall time in which the link was ready for a chunk and none was sealed, the
        // same whether 4 streams or 16 share the queue (summing every sender's wait would
        // make fewer streams look less starved, and the level climb on a LAN).
        let mut queue = sealed.lock().await;
        let waiting = Instant::now();
        let next = queue.recv().await;
        drop(queue);
        let Some(chunk) = next else { break };
        shared
            .senders_starved_ns
            .fetch_add(waiting.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let len = u64::from(chunk.header.payload_len);
        if let Some(limit) = limit {
            limit.acquire(len + gateway::wire::CHUNK_HEADER_LEN as u64).await;
        }
        if stream.is_none() {
            stream = Some(DataWriter::open(conn).await?);
        }
        let s = stream.as_mut().expect("opened above");
        s.send_chunk(&chunk.header, &chunk.payload).await?;
        shared.run.sent(
            chunk.header.disk,
            chunk.header.offset,
            u64::from(chunk.header.plain_len),
        );
        shared.payload_bytes.fetch_add(len, Ordering::Relaxed);
        shared.spare.lock().expect("spare lock poisoned").push(chunk.payload);
    }
    if let Some(mut s) = stream {
        s.finish();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_streams_follow_the_measured_round_trip_and_the_cap() {
        // A LAN: the fewest (each stream holds buffers at both ends).
        assert_eq!(data_streams_for(Duration::from_micros(200), None), 4);
        // 150 ms at 1 Gbit/s: the most, as a link test's probe opens.
        assert_eq!(data_streams_for(Duration::from_millis(150), None), 16);
        // The same path capped at 100 Mbit/s: 1.875 MB in flight, 3 x that over 1.25 MB
        // windows, plus one.
        let cap = "100mbit".parse::<Rate>().unwrap();
        assert_eq!(data_streams_for(Duration::from_millis(150), Some(cap)), 6);
        // A fat long link capped at 500 Mbit/s: 9.4 MB in flight still needs the most.
        let fat = "500mbit".parse::<Rate>().unwrap();
        assert_eq!(data_streams_for(Duration::from_millis(150), Some(fat)), 16);
        // A cap above the default rate sizes as the default.
        let fast = "10gbit".parse::<Rate>().unwrap();
        assert_eq!(data_streams_for(Duration::from_millis(150), Some(fast)), 16);
    }
}
