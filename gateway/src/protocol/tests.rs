//! Sender and receiver sessions against each other in memory: no sockets, no
//! sleeps, a fake clock. The "link" is a pair of queues that tests may tamper
//! with, reorder or duplicate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use super::*;
use crate::chunk::{Opener, Sealer};
use crate::plan::{DiskSpec, MigrationPlan, VmSpec, MIN_CHUNK_SIZE};
use crate::receipt::{Receipt, ReceiptDisk, ReceiptSigner, SignedReceipt, RECEIPT_FORMAT_VERSION};
use crate::wire::{control, ChunkHeader, CloudMessage, Decoded, EdgeMessage, RefusalCode};

const CS: u32 = MIN_CHUNK_SIZE;

/// A disk image with random, compressible and zero regions, and a short tail.
fn disk_image(seed: u64, chunks: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; chunks * CS as usize + 1000];
    for (i, chunk) in img.chunks_mut(CS as usize).enumerate() {
        match i % 4 {
            0 => rng.fill(chunk),
            1 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"the quick brown fox "[j % 20]),
            2 => {} // zeros
            _ => chunk[..100].fill(7),
        }
    }
    img
}

fn plan(disks: &[&Vec<u8>]) -> MigrationPlan {
    MigrationPlan {
        vm: VmSpec {
            name: "web01".into(),
            guest_os: "debian12_64Guest".into(),
            num_cpus: 2,
            cores_per_socket: None,
            memory_mib: 1024,
            firmware: None,
            bios_uuid: None,
            nics: vec![],
            controllers: vec![],
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskSpec {
                    key: format!("scsi0:{i}"),
                    capacity: d.len() as u64,
                })
                .collect(),
        },
        network_map: vec![],
        chunk_size: CS,
        disk_format: None,
        firewall: Default::default(),
        placement: Default::default(),
        source_descriptor_sha256: Some([0x5d; 32]),
        seed: None,
    }
}

/// The cloud's report of a migration (`vm_id` empty: of a validated plan).
fn report(vm_id: &str) -> crate::plan::MigrationReport {
    crate::plan::MigrationReport {
        migration_id: (!vm_id.is_empty()).then(|| "migration-1".into()),
        vm_name: "web01".into(),
        vm_id: (!vm_id.is_empty()).then(|| vm_id.into()),
        vm_path: None,
        folder_id: "group-v3".into(),
        folder_name: "vm".into(),
        datastore_id: "datastore-9".into(),
        datastore_name: "ds1".into(),
        host_id: "host-8".into(),
        host_name: "esx01".into(),
        disk_format: "vmdk".into(),
        num_cpus: 2,
        memory_mib: 1024,
        disks: vec![],
        logical_bytes: 0,
        zero_bytes: None,
        nics: vec![],
        rules_carried: vec![],
        not_carried: vec![crate::plan::NotCarried::new(
            crate::plan::NotCarriedKind::SpoofGuard,
            "default",
        )],
        committed_at: None,
        cluster_id: "domain-c7".into(),
        cluster_name: "cl1".into(),
        resource_pool_id: "resgroup-7".into(),
        resource_pool_name: "Resources".into(),
    }
}

type Tamper = Box<dyn FnMut(&ChunkHeader, &mut Vec<u8>)>;
type AlterReceipt = Box<dyn FnMut(&mut Receipt)>;

/// An endpoint certificate and key for the receipts of the in-memory cloud.
fn receipt_signer() -> ReceiptSigner {
    let ca = certs::Ca::generate("Protocol Test CA").unwrap();
    let issued = ca
        .issue_endpoint(&["localhost".into()], certs::Validity::days(1))
        .unwrap();
    ReceiptSigner::new(&[issued.cert_der()], &issued.key_der()).unwrap()
}

/// Both sessions, their in-memory drivers and the link between them.
struct Pair {
    now: Instant,
    sender: SenderSession,
    receiver: ReceiverSession,
    sources: Vec<Vec<u8>>,
    dests: Vec<Vec<u8>>,
    to_cloud: VecDeque<Vec<u8>>,
    to_edge: VecDeque<Vec<u8>>,
    data: VecDeque<(ChunkHeader, Vec<u8>)>,
    to_read: VecDeque<(u16, u64)>,
    sealer: Sealer,
    opener: Opener,
    tamper: Option<Tamper>,
    reorder: bool,
    duplicate: bool,
    writes: usize,
    data_frames: usize,
    refuse_plan: Option<Vec<String>>,
    committed: Option<String>,
    discarded: Option<String>,
    signer: ReceiptSigner,
    /// Changes the receipt before the cloud signs it (a lying endpoint).
    alter_receipt: Option<AlterReceipt>,
    /// The receipt the edge accepted with the commit.
    edge_receipt: Option<String>,
    /// Chunks the edge driver reads per step (0: all): lets a test cut a
    /// migration half way.
    reads_per_step: usize,
    /// The cloud driver's journal: what it synced (disk, index, hash).
    cloud_journal: Vec<(u16, u64, [u8; 32])>,
    /// The edge driver's checkpoint: what was acknowledged or zero.
    edge_checkpoint: Vec<(u16, u64, [u8; 32])>,
    /// Chunks hashed without sending (resumed, acknowledged but not in the
    /// edge's checkpoint).
    hashed: usize,
    /// What a validate-only session was told the plan would create.
    validated: Option<crate::plan::MigrationReport>,
    /// Bytes flipped in the cloud's copy (disk, byte offset) right before each
    /// read-back: a staged file changed on the cloud's disk.
    damage_before_verify: Vec<(u16, u64)>,
    /// Damage the copy again at every read-back (a datastore that keeps losing data).
    damage_every_time: bool,
    /// Chunks each read-back found damaged (data) and rewrote (zero).
    verify_rounds: Vec<(usize, usize)>,
    /// How many chunks each read-back was asked to read.
    verified_chunks: Vec<usize>,
    /// How many chunks each read-back ahead of a switchover was asked to read.
    early_chunks: Vec<usize>,
    /// What the read-back ahead of a switchover found intact, done at once (as of the
    /// replica then) and reported later if `hold_early` (the pass goes on meanwhile).
    early_found: Option<Vec<(u16, u64)>>,
    hold_early: bool,
    /// The cloud already registered the VM (roots, what it answered): a resume
    /// replays the commit.
    registered: Option<(Vec<[u8; 32]>, Registered)>,
    /// The cloud driver refuses the next abort with these problems.
    refuse_abort: Option<Vec<String>>,
    /// The migration the cloud driver aborted for the edge.
    aborted: Option<String>,
    /// A replication pass ended with the replica kept: the bytes it wrote.
    synced: Option<u64>,
    /// The scheduled switchover the cloud driver holds (Unix seconds).
    cloud_switchover_at: Option<i64>,
    /// The switchover window the cloud holds (set by the edge's `ScheduleWindow`).
    cloud_window: Option<crate::schedule::SwitchoverWindow>,
    /// What the edge learned of it with `Synced`.
    edge_switchover_at: Option<Option<i64>>,
    /// The cloud driver rolled back (false) or confirmed (true) this migration's
    /// switchover.
    ended: Option<(String, bool)>,
    /// What the edge was told when the switchover ended.
    ended_message: Option<String>,
    /// The cloud offers deduplication with `PlanAccepted`.
    offer_dedup: bool,
    /// Chunks the cloud holds on disks this edge may reuse, by hash (what its index
    /// says: a test may make the bytes disagree with the key, as a disk changed since).
    cloud_store: std::collections::HashMap<[u8; 32], Vec<u8>>,
    /// Chunks of the seed the plan named, by hash: looked up before `cloud_store`, and
    /// copies from it are answered as seeded.
    seed_store: std::collections::HashMap<[u8; 32], Vec<u8>>,
    /// Hash queries the cloud answered, and the chunks they asked about.
    lookups: Vec<usize>,
    /// Chunks the cloud driver copied, and those it found changed and refused.
    copies: usize,
    refused_copies: usize,
}

impl Pair {
    fn new(sources: Vec<Vec<u8>>, password: &str) -> Pair {
        let now = Instant::now();
        let plan = plan(&sources.iter().collect::<Vec<_>>());
        let sender = SenderSession::new(
            SenderConfig::new("edge-test", "migrator@cloud.local", password),
            plan,
            now,
        )
        .unwrap();
        Pair {
            now,
            sender,
            receiver: ReceiverSession::new(ReceiverConfig::default(), now),
            dests: sources.iter().map(|s| vec![0; s.len()]).collect(),
            sources,
            to_cloud: VecDeque::new(),
            to_edge: VecDeque::new(),
            data: VecDeque::new(),
            to_read: VecDeque::new(),
            sealer: Sealer::new(1).unwrap(),
            opener: Opener::new().unwrap(),
            tamper: None,
            reorder: false,
            duplicate: false,
            writes: 0,
            data_frames: 0,
            refuse_plan: None,
            committed: None,
            discarded: None,
            signer: receipt_signer(),
            alter_receipt: None,
            edge_receipt: None,
            reads_per_step: 0,
            cloud_journal: Vec::new(),
            edge_checkpoint: Vec::new(),
            hashed: 0,
            validated: None,
            damage_before_verify: Vec::new(),
            damage_every_time: false,
            verify_rounds: Vec::new(),
            verified_chunks: Vec::new(),
            early_chunks: Vec::new(),
            early_found: None,
            hold_early: false,
            registered: None,
            refuse_abort: None,
            aborted: None,
            synced: None,
            cloud_switchover_at: None,
            cloud_window: None,
            offer_dedup: false,
            cloud_store: std::collections::HashMap::new(),
            seed_store: std::collections::HashMap::new(),
            lookups: Vec::new(),
            copies: 0,
            refused_copies: 0,
            edge_switchover_at: None,
            ended: None,
            ended_message: None,
        }
    }

    /// The cloud driver's read-back: damage what the test asked for, then compare each
    /// chunk with its expected hash; zero chunks are rewritten here, the rest reported.
    fn verify_staged(&mut self, chunks: &[(u16, u64, [u8; 32])]) -> Vec<(u16, u64)> {
        let damage = if self.damage_every_time {
            self.damage_before_verify.clone()
        } else {
            std::mem::take(&mut self.damage_before_verify)
        };
        for (disk, at) in damage {
            self.dests[usize::from(disk)][at as usize] ^= 0x5a;
        }
        self.verified_chunks.push(chunks.len());
        let (mut damaged, mut rewritten) = (Vec::new(), 0);
        for &(disk, index, expected) in chunks {
            let dest = &mut self.dests[usize::from(disk)];
            let start = index as usize * CS as usize;
            let end = (start + CS as usize).min(dest.len());
            if crate::chunk::chunk_hash(&dest[start..end]) == expected {
                continue;
            }
            let h = crate::integrity::DiskHashes::new(dest.len() as u64, CS);
            if expected == h.zero_hash(index) {
                dest[start..end].fill(0);
                rewritten += 1;
            } else {
                damaged.push((disk, index));
            }
        }
        self.verify_rounds.push((damaged.len(), rewritten));
        damaged
    }

    /// The cloud driver's read-back ahead of a switchover: read-only, it reports the
    /// chunks whose bytes match and writes nothing (not even a zero chunk that is not zero).
    fn verify_early(&self, chunks: &[(u16, u64, [u8; 32])]) -> Vec<(u16, u64)> {
        chunks
            .iter()
            .filter(|&&(disk, index, expected)| {
                let dest = &self.dests[usize::from(disk)];
                let start = index as usize * CS as usize;
                let end = (start + CS as usize).min(dest.len());
                crate::chunk::chunk_hash(&dest[start..end]) == expected
            })
            .map(|&(disk, index, _)| (disk, index))
            .collect()
    }

    /// A new pair of sessions continuing `self`'s migration after a break:
    /// the destination and both drivers' records survive, nothing in flight does.
    fn resumed(self) -> Pair {
        let plan = self.sender.plan().clone();
        let sender = SenderSession::resuming(
            SenderConfig::new("edge-test", "migrator@cloud.local", "secret"),
            plan,
            "migration-1".into(),
            self.edge_checkpoint.clone(),
            self.now,
        )
        .unwrap();
        let mut next = Pair::new(self.sources.clone(), "secret");
        next.sender = sender;
        next.dests = self.dests;
        next.cloud_journal = self.cloud_journal;
        next.edge_checkpoint = self.edge_checkpoint;
        next.cloud_switchover_at = self.cloud_switchover_at;
        next.cloud_window = self.cloud_window;
        next
    }

    /// The next pass of this replication, over a new connection, after the source
    /// changed to `sources`: both drivers' records and the replica survive.
    fn next_pass(self, sources: Vec<Vec<u8>>, keep_replica: bool) -> Pair {
        let plan = self.sender.plan().clone();
        let mut sender = SenderSession::syncing(
            SenderConfig::new("edge-test", "migrator@cloud.local", "secret"),
            plan,
            "migration-1".into(),
            self.edge_checkpoint.clone(),
            self.now,
        )
        .unwrap();
        if keep_replica {
            sender.finish_as_replica();
        }
        let mut next = Pair::new(sources, "secret");
        next.sender = sender;
        next.dests = self.dests;
        next.cloud_journal = self.cloud_journal;
        next.edge_checkpoint = self.edge_checkpoint;
        next.cloud_switchover_at = self.cloud_switchover_at;
        next.cloud_window = self.cloud_window;
        next
    }

    /// One round: every queue is drained once. Returns whether anything moved.
    fn step(&mut self) -> bool {
        let mut moved = false;
        // Edge: transmit control (through the real codec), handle events.
        while let Some(msg) = self.sender.poll_transmit(self.now) {
            self.to_cloud.push_back(control::encode(&msg).unwrap());
            moved = true;
        }
        while let Some(ev) = self.sender.poll_event() {
            moved = true;
            match ev {
                SenderEvent::Accepted { .. } | SenderEvent::Resumed { .. } => {
                    for (d, src) in self.sources.iter().enumerate() {
                        for off in (0..src.len() as u64).step_by(CS as usize) {
                            self.to_read.push_back((d as u16, off));
                        }
                    }
                }
                SenderEvent::Resend { disk, offset } => self.to_read.push_back((disk, offset)),
                SenderEvent::Send { disk, offsets } => self.to_read.extend(offsets.into_iter().map(|o| (disk, o))),
                SenderEvent::Committed { receipt, .. } => self.edge_receipt = Some(receipt),
                SenderEvent::Validated(report) => self.validated = Some(*report),
                SenderEvent::Synced {
                    delta_bytes,
                    switchover_at,
                } => {
                    self.synced = Some(delta_bytes);
                    self.edge_switchover_at = Some(switchover_at);
                }
                SenderEvent::SwitchoverEnded { message } => self.ended_message = Some(message),
                SenderEvent::Acked { disk, chunks, .. } => self.edge_checkpoint.extend(
                    chunks
                        .into_iter()
                        .map(|(offset, hash)| (disk, offset / u64::from(CS), hash)),
                ),
                _ => {}
            }
        }
        // Edge driver: read, detect zeros, seal.
        let mut reads = 0;
        while let Some((disk, offset)) = self.to_read.pop_front() {
            moved = true;
            let src = &self.sources[disk as usize];
            let end = (offset as usize + CS as usize).min(src.len());
            let plain = &src[offset as usize..end];
            let index = offset / u64::from(CS);
            let zero = || {
                let h = crate::integrity::DiskHashes::new(src.len() as u64, CS);
                h.zero_hash(index)
            };
            match self.sender.work_for(disk, offset) {
                Work::Skip => continue,
                Work::Zero => {
                    self.sender.chunk_zero(disk, offset);
                    self.edge_checkpoint.push((disk, index, zero()));
                    continue;
                }
                Work::Hash => {
                    self.hashed += 1;
                    self.sender.chunk_hashed(disk, offset, crate::chunk::chunk_hash(plain));
                    continue;
                }
                Work::Compare(held) => {
                    let hash = crate::chunk::chunk_hash(plain);
                    if hash == held {
                        self.hashed += 1;
                        self.sender.chunk_hashed(disk, offset, hash);
                        continue;
                    }
                }
                Work::Probe => {
                    if crate::chunk::is_zero(plain) {
                        self.sender.chunk_zero(disk, offset);
                        self.edge_checkpoint.push((disk, index, zero()));
                    } else {
                        self.sender.chunk_probed(disk, offset, crate::chunk::chunk_hash(plain));
                    }
                    continue;
                }
                Work::Send => {}
            }
            reads += 1;
            if crate::chunk::is_zero(plain) {
                self.sender.chunk_zero(disk, offset);
                self.edge_checkpoint.push((disk, index, zero()));
            } else {
                let mut payload = Vec::new();
                let h = self.sealer.seal(disk, offset, plain, &mut payload);
                self.sender.chunk_sent(disk, offset, h.hash);
                if let Some(t) = self.tamper.as_mut() {
                    t(&h, &mut payload);
                }
                if self.duplicate {
                    // Sent twice by the driver, so counted twice: QUIC itself never
                    // delivers a frame twice.
                    self.sender.chunk_sent(disk, offset, h.hash);
                    self.data.push_back((h, payload.clone()));
                }
                self.data.push_back((h, payload));
            }
            if reads == self.reads_per_step {
                break;
            }
        }
        // Link: control both ways.
        while let Some(frame) = self.to_cloud.pop_front() {
            moved = true;
            let Decoded::Frame(msg, _) = control::decode::<EdgeMessage>(&frame).unwrap() else {
                panic!("whole frame")
            };
            let _ = self.receiver.handle_control(msg, self.now);
        }
        // Cloud driver: data frames, reversed if asked.
        if self.reorder {
            self.data.make_contiguous().reverse();
        }
        while let Some((h, payload)) = self.data.pop_front() {
            moved = true;
            self.data_frames += 1;
            let header = ChunkHeader::decode(&h.encode()).unwrap();
            match self.receiver.admit_chunk(&header) {
                Ok(Admission::Write) => {
                    let mut plain = Vec::new();
                    match self.opener.open(&header, &payload, &mut plain) {
                        Ok(data) => {
                            let dst = &mut self.dests[header.disk as usize];
                            dst[header.offset as usize..][..data.len()].copy_from_slice(data);
                            self.writes += 1;
                            self.receiver.chunk_written(header.disk, header.offset);
                        }
                        Err(e) => {
                            let _ = self.receiver.chunk_rejected(header.disk, header.offset, &e);
                        }
                    }
                }
                Ok(Admission::Duplicate) => {}
                Err(_) => break,
            }
        }
        // The cloud driver's sync: journal what was written, then acknowledge it.
        let batch = self.receiver.take_unsynced();
        if !batch.is_empty() {
            moved = true;
        }
        for &(disk, offset, hash) in &batch.chunks {
            self.cloud_journal.push((disk, offset / u64::from(CS), hash));
        }
        for &(disk, first, count) in &batch.zero_runs {
            let src_len = self.sources[usize::from(disk)].len() as u64;
            let h = crate::integrity::DiskHashes::new(src_len, CS);
            for index in first / u64::from(CS)..first / u64::from(CS) + count {
                self.cloud_journal.push((disk, index, h.zero_hash(index)));
            }
        }
        self.receiver.synced(&batch);
        while let Some(ev) = self.receiver.poll_event() {
            moved = true;
            match ev {
                ReceiverEvent::Authenticate { password, .. } => {
                    let res = if password == "secret" {
                        Ok("MigrationOperator".to_owned())
                    } else {
                        Err((RefusalCode::BadCredentials, "user or password not accepted".to_owned()))
                    };
                    self.receiver.authenticated(res, "cloud-test");
                }
                ReceiverEvent::ValidateResume { migration_id, .. } => match self.registered.clone() {
                    Some((roots, registered)) => {
                        self.receiver
                            .resume_committed(migration_id, "ds1".into(), &roots, registered)
                    }
                    None => {
                        let mut tables: Vec<_> = self
                            .sources
                            .iter()
                            .map(|s| crate::integrity::DiskHashes::new(s.len() as u64, CS))
                            .collect();
                        for &(disk, index, hash) in &self.cloud_journal {
                            tables[usize::from(disk)].set(index, hash);
                        }
                        self.receiver.resume_accepted(migration_id, "ds1".into(), tables);
                    }
                },
                ReceiverEvent::ValidatePlan(_) => match self.refuse_plan.take() {
                    Some(problems) => self.receiver.refuse(RefusalCode::PlanRejected, problems),
                    None => self
                        .receiver
                        .plan_accepted("migration-1".into(), "ds1".into(), self.offer_dedup),
                },
                ReceiverEvent::Lookup { disk, chunks } => {
                    // The cloud driver: copy what its index names, verified after the read.
                    self.lookups.push(chunks.len());
                    let mut results = Vec::new();
                    let mut seeded = Vec::new();
                    for (offset, len, hash) in chunks {
                        if let Some(data) = self.seed_store.get(&hash).filter(|d| d.len() == len as usize) {
                            self.dests[usize::from(disk)][offset as usize..][..data.len()].copy_from_slice(data);
                            self.copies += 1;
                            seeded.push(offset);
                            results.push((offset, true));
                            continue;
                        }
                        let copied = match self.cloud_store.get(&hash) {
                            Some(data) if data.len() == len as usize && crate::chunk::chunk_hash(data) == hash => {
                                self.dests[usize::from(disk)][offset as usize..][..data.len()].copy_from_slice(data);
                                self.copies += 1;
                                true
                            }
                            Some(_) => {
                                self.refused_copies += 1;
                                false
                            }
                            None => false,
                        };
                        results.push((offset, copied));
                    }
                    self.receiver.lookup_done_seeded(disk, results, &seeded);
                }
                ReceiverEvent::Finalize => {
                    self.committed = Some("vm-42".into());
                    let receipt = self.receipt();
                    let registered = Registered {
                        vm_id: "vm-42".into(),
                        vm_path: "[ds1] web01/web01.vmx".into(),
                        receipt,
                        report: Some(report("vm-42")),
                    };
                    let roots = self.receiver.disk_roots().expect("sealed");
                    self.registered = Some((roots, registered.clone()));
                    // The cloud driver "powers the VM on" at once: the downtime is what
                    // the edge stated (the test's clock does not move).
                    if let Some((request, _)) = self.receiver.switchover().cloned() {
                        self.receiver.switched_over(crate::wire::SwitchoverOutcome {
                            powered_on: request.power_on,
                            power_error: None,
                            downtime_ms: request.power_on.then_some(request.downtime_so_far_ms),
                            awaiting_confirm: !request.confirm,
                        });
                    }
                    self.receiver.finalized(Ok(registered));
                }
                ReceiverEvent::VerifyStaged { chunks } => {
                    let damaged = self.verify_staged(&chunks);
                    self.receiver.staged_verified(damaged);
                }
                ReceiverEvent::VerifyEarly { chunks } => {
                    self.early_chunks.push(chunks.len());
                    self.early_found = Some(self.verify_early(&chunks));
                }
                ReceiverEvent::Discard { reason } => self.discarded = Some(reason),
                ReceiverEvent::KeepReplica { schedule, .. } => {
                    let batch = self.receiver.take_unsynced();
                    for &(disk, offset, hash) in &batch.chunks {
                        self.cloud_journal.push((disk, offset / u64::from(CS), hash));
                    }
                    if let Some(at) = schedule {
                        self.cloud_switchover_at = at;
                    }
                    if let Some(window) = self.receiver.window_schedule() {
                        self.cloud_window = window;
                    }
                    self.receiver.synced(&batch);
                    self.receiver.set_held_window(self.cloud_window);
                    self.receiver.replica_kept(Ok(self.cloud_switchover_at));
                }
                ReceiverEvent::EndSwitchover { migration_id, confirm } => match self.refuse_abort.take() {
                    Some(problems) => self
                        .receiver
                        .switchover_ended(Err((RefusalCode::NotPermitted, problems))),
                    None => {
                        self.ended = Some((migration_id, confirm));
                        self.receiver
                            .switchover_ended(Ok(if confirm { "confirmed" } else { "rolled back" }.into()));
                    }
                },
                ReceiverEvent::CheckPlan(_) => match self.refuse_plan.take() {
                    Some(problems) => self.receiver.plan_checked(Err((RefusalCode::PlanRejected, problems))),
                    None => self.receiver.plan_checked(Ok(report(""))),
                },
                ReceiverEvent::AbortMigration { migration_id, .. } => match self.refuse_abort.take() {
                    Some(problems) => self
                        .receiver
                        .migration_aborted(Err((RefusalCode::NotPermitted, problems))),
                    None => {
                        self.aborted = Some(migration_id);
                        self.receiver.migration_aborted(Ok(()));
                    }
                },
            }
        }
        if !self.hold_early {
            if let Some(intact) = self.early_found.take() {
                moved = true;
                self.receiver.verified_early(intact);
            }
        }
        while let Some(msg) = self.receiver.poll_transmit() {
            moved = true;
            self.to_edge.push_back(control::encode(&msg).unwrap());
        }
        while let Some(frame) = self.to_edge.pop_front() {
            moved = true;
            let Decoded::Frame(msg, _) = control::decode::<CloudMessage>(&frame).unwrap() else {
                panic!("whole frame")
            };
            let _ = self.sender.handle_control(msg, self.now);
        }
        self.now += Duration::from_millis(1);
        moved
    }

    /// What the cloud driver signs at commit: the receiver's roots.
    fn receipt(&mut self) -> String {
        let roots = self.receiver.disk_roots().expect("every disk sealed before Finalize");
        let plan = self.receiver.plan().expect("a plan").clone();
        let mut receipt = Receipt {
            format_version: RECEIPT_FORMAT_VERSION,
            migration_id: "migration-1".into(),
            vm_name: plan.vm.name.clone(),
            source_descriptor_sha256: plan.source_descriptor_sha256.map(|d| crate::integrity::hex(&d)),
            chunk_hash: Some(crate::chunk::ChunkHash::CURRENT.name().into()),
            vm_id: "vm-42".into(),
            vm_path: "[ds1] web01/web01.vmx".into(),
            disks: plan
                .vm
                .disks
                .iter()
                .zip(&roots)
                .map(|(d, root)| ReceiptDisk {
                    key: d.key.clone(),
                    capacity: d.capacity.next_multiple_of(512),
                    chunk_size: plan.chunk_size,
                    merkle_root: crate::integrity::hex(root),
                    logical_bytes: d.capacity,
                })
                .collect(),
            planned_at: "2026-11-26T10:00:00Z".into(),
            committed_at: "2026-11-26T10:00:05Z".into(),
            endpoint: "cloud-test".into(),
            endpoint_certificate: self.signer.certificate_pem().to_owned(),
            endpoint_thumbprint: self.signer.thumbprint().to_string(),
        };
        if let Some(alter) = self.alter_receipt.as_mut() {
            alter(&mut receipt);
        }
        self.signer.sign(receipt).unwrap().to_json()
    }

    fn drive(&mut self) {
        for _ in 0..10_000 {
            if !self.step() {
                return;
            }
        }
        panic!("did not settle");
    }
}

#[test]
fn a_broken_migration_resumes_and_resends_only_what_was_not_acknowledged() {
    let sources = vec![disk_image(21, 24), disk_image(22, 9)];
    let chunks: usize = sources.iter().map(|s| s.len().div_ceil(CS as usize)).sum();
    let mut first = Pair::new(sources.clone(), "secret");
    first.reads_per_step = 2;
    // Cut where no acknowledgement is in flight (the plan rides with the hello: one step
    // sooner than a plan sent after the welcome).
    for _ in 0..11 {
        first.step();
    }
    assert!(!first.sender.is_finished());
    // The link breaks: what was sealed but not yet delivered is lost.
    first.data.clear();
    first.to_edge.clear();
    first.to_cloud.clear();
    let durable = first.cloud_journal.len();
    assert!(
        durable > 4 && durable < chunks,
        "{durable} of {chunks} chunks durable at the break"
    );
    // The edge's checkpoint missed the last acknowledgements it was sent.
    let acked_late = 2;
    first.edge_checkpoint.truncate(first.edge_checkpoint.len() - acked_late);

    let before = first.receiver.durable_bytes();
    assert!(before > 0 && before < sources.iter().map(|s| s.len() as u64).sum::<u64>());
    let mut second = first.resumed();
    while second.receiver.durable_bytes() == 0 && second.step() {}
    assert!(
        second.receiver.durable_bytes() >= before,
        "a resumed migration's progress starts at what its journal holds"
    );
    second.drive();
    assert!(second.sender.is_committed(), "{:?}", second.sender.error());
    assert!(second.receiver.is_committed());
    assert_eq!(second.dests, sources, "the resumed copy is identical");
    assert!(second.edge_receipt.is_some());
    assert_eq!(
        second.hashed, acked_late,
        "chunks the cloud had but the edge did not record are hashed, not sent"
    );
    // Only chunks the cloud did not hold durably crossed the link again.
    let zero_chunks_left = (0..sources.len())
        .flat_map(|d| {
            let src = &sources[d];
            (0..src.len().div_ceil(CS as usize)).map(move |i| (d, i))
        })
        .filter(|&(d, i)| {
            let src = &sources[d];
            let plain = &src[i * CS as usize..((i + 1) * CS as usize).min(src.len())];
            crate::chunk::is_zero(plain) && !first_journal_has(&second.cloud_journal[..durable], d, i)
        })
        .count();
    assert_eq!(second.data_frames + zero_chunks_left, chunks - durable);
    assert_eq!(
        second.sender.done_bytes(),
        sources.iter().map(|s| s.len() as u64).sum::<u64>()
    );
}

fn first_journal_has(journal: &[(u16, u64, [u8; 32])], disk: usize, index: usize) -> bool {
    journal
        .iter()
        .any(|&(d, i, _)| usize::from(d) == disk && i == index as u64)
}

#[test]
fn a_resume_that_names_another_migration_or_bad_bitmaps_fails() {
    let sources = [disk_image(31, 4)];
    let plan = plan(&sources.iter().collect::<Vec<_>>());
    let now = Instant::now();
    let config = || SenderConfig::new("edge-test", "migrator@cloud.local", "secret");
    let welcome = CloudMessage::Welcome {
        endpoint: "cloud".into(),
        role: "MigrationOperator".into(),
    };
    // The cloud answers for another migration.
    let mut s = SenderSession::resuming(config(), plan.clone(), "migration-1".into(), vec![], now).unwrap();
    s.handle_control(welcome.clone(), now).unwrap();
    assert!(matches!(s.poll_transmit(now), Some(EdgeMessage::Hello { .. })));
    assert!(
        matches!(s.poll_transmit(now), Some(EdgeMessage::Resume { migration_id, .. }) if migration_id == "migration-1")
    );
    let other = CloudMessage::Resumed {
        migration_id: "migration-2".into(),
        datastore: "ds1".into(),
        done: vec![vec![0]],
    };
    assert!(s.handle_control(other, now).is_err());
    // A bitmap of the wrong size.
    let mut s = SenderSession::resuming(config(), plan.clone(), "migration-1".into(), vec![], now).unwrap();
    s.handle_control(welcome.clone(), now).unwrap();
    let short = CloudMessage::Resumed {
        migration_id: "migration-1".into(),
        datastore: "ds1".into(),
        done: vec![vec![0; 5]],
    };
    assert!(matches!(
        s.handle_control(short, now),
        Err(ProtocolError::OutsidePlan(_))
    ));
    // A fresh migration never accepts Resumed, a resuming one never PlanAccepted.
    let mut s = SenderSession::new(config(), plan.clone(), now).unwrap();
    s.handle_control(welcome.clone(), now).unwrap();
    let resumed = CloudMessage::Resumed {
        migration_id: "migration-1".into(),
        datastore: "ds1".into(),
        done: vec![vec![0]],
    };
    assert!(s.handle_control(resumed, now).is_err());
    let mut s = SenderSession::resuming(config(), plan, "migration-1".into(), vec![], now).unwrap();
    s.handle_control(welcome, now).unwrap();
    let accepted = CloudMessage::PlanAccepted {
        migration_id: "migration-1".into(),
        datastore: "ds1".into(),
        dedup: false,
    };
    assert!(s.handle_control(accepted, now).is_err());
}

#[test]
fn acknowledgements_wait_for_the_sync_and_a_paused_migration_keeps_its_files() {
    let mut pair = Pair::new(vec![disk_image(41, 8)], "secret");
    // Up to the plan: no data yet.
    for _ in 0..4 {
        pair.step();
    }
    let mut r = ReceiverSession::new(ReceiverConfig::default(), pair.now);
    let plan = pair.sender.plan().clone();
    r.handle_control(
        EdgeMessage::Hello {
            agent: "a".into(),
            user: "u".into(),
            password: "p".into(),
        },
        pair.now,
    )
    .unwrap();
    r.authenticated(Ok("MigrationOperator".into()), "cloud");
    r.handle_control(EdgeMessage::Plan(plan), pair.now).unwrap();
    r.plan_accepted("migration-1".into(), "ds1".into(), false);
    while r.poll_transmit().is_some() {}
    while r.poll_event().is_some() {}
    let mut sealer = Sealer::new(1).unwrap();
    let mut payload = Vec::new();
    let src = &pair.sources[0];
    let h = sealer.seal(0, 0, &src[..CS as usize], &mut payload);
    assert_eq!(r.admit_chunk(&h), Ok(Admission::Write));
    r.chunk_written(0, 0);
    assert_eq!(r.poll_transmit(), None, "no acknowledgement before the sync");
    // A replay while the first copy waits for its sync is not acknowledged twice.
    assert_eq!(r.admit_chunk(&h), Ok(Admission::Duplicate));
    assert_eq!(r.poll_transmit(), None);
    let batch = r.take_unsynced();
    assert_eq!(batch.chunks, vec![(0, 0, h.hash)]);
    r.synced(&batch);
    assert_eq!(
        r.poll_transmit(),
        Some(CloudMessage::Acks {
            disk: 0,
            offsets: vec![0]
        })
    );
    assert!(r.is_resumable(), "a link lost while streaming keeps the files");
    r.pause(vec!["datastore full".into()]);
    assert!(matches!(
        r.poll_transmit(),
        Some(CloudMessage::Refused {
            code: RefusalCode::Paused,
            ..
        })
    ));
    assert!(r.poll_event().is_none(), "a pause discards nothing");
    assert!(r.is_resumable());
}

#[test]
fn a_vm_moves_and_the_copy_is_identical() {
    let mut pair = Pair::new(vec![disk_image(1, 16), disk_image(2, 5)], "secret");
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert!(pair.receiver.is_committed());
    assert_eq!(pair.committed.as_deref(), Some("vm-42"));
    assert_eq!(pair.dests, pair.sources);
    // 16+1 and 5+1 chunks, every fourth one zero: zeros never travel.
    assert_eq!(pair.writes, 13 + 5);
    assert_eq!(pair.sender.zero_bytes(), (4 + 1) * u64::from(CS));
    let logical = pair.sources.iter().map(|s| s.len() as u64).sum::<u64>();
    assert_eq!(pair.sender.done_bytes(), logical);
    // The cloud's progress counts zero chunks too, and ends at the whole VM.
    assert_eq!(pair.receiver.durable_bytes(), logical);
}

#[test]
fn the_commit_carries_a_signed_receipt_of_both_sides_roots() {
    let sources = vec![disk_image(11, 7), disk_image(12, 1)];
    let expected: Vec<String> = sources
        .iter()
        .map(|src| {
            let hashes: Vec<[u8; 32]> = src.chunks(CS as usize).map(crate::chunk::chunk_hash).collect();
            crate::integrity::hex(&crate::merkle::root(&hashes))
        })
        .collect();
    let mut pair = Pair::new(sources, "secret");
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    let sender_roots = pair.sender.disk_roots().unwrap();
    assert_eq!(pair.receiver.disk_roots().unwrap(), sender_roots);
    // Zero chunks are leaves too (the hash of their zeros), as if they were read.
    let hex: Vec<String> = sender_roots.iter().map(|r| crate::integrity::hex(r)).collect();
    assert_eq!(hex, expected);
    let signed = SignedReceipt::from_json(pair.edge_receipt.as_deref().unwrap()).unwrap();
    signed.verify_signature().unwrap();
    let roots: Vec<&str> = signed.receipt.disks.iter().map(|d| d.merkle_root.as_str()).collect();
    assert_eq!(roots, expected);
}

#[test]
fn a_receipt_that_misstates_the_migration_fails_it_at_the_edge() {
    let alterations: Vec<(AlterReceipt, &str)> = vec![
        (
            Box::new(|r| r.disks[0].merkle_root = "00".repeat(32)),
            "disk 0's Merkle root",
        ),
        (Box::new(|r| r.vm_id = "vm-7".into()), "the VM id"),
        (
            Box::new(|r| {
                r.disks.pop();
            }),
            "the number of disks",
        ),
        (Box::new(|r| r.migration_id = "migration-9".into()), "the migration id"),
    ];
    for (alter, what) in alterations {
        let mut pair = Pair::new(vec![disk_image(13, 3)], "secret");
        pair.alter_receipt = Some(alter);
        pair.drive();
        assert!(pair.receiver.is_committed());
        assert!(!pair.sender.is_committed());
        let err = pair.sender.error().expect("failed").to_string();
        assert!(err.contains(what) && err.contains("vm-42"), "{what}: {err}");
        assert!(pair.edge_receipt.is_none());
    }
    // A signature that does not verify is refused as well.
    let mut pair = Pair::new(vec![disk_image(14, 2)], "secret");
    pair.drive();
    let good = pair.edge_receipt.clone().unwrap();
    let mut forged = SignedReceipt::from_json(&good).unwrap();
    forged.receipt.vm_path = "[ds1] other/other.vmx".into();
    let sender = SenderSession::new(
        SenderConfig::new("edge-test", "migrator@cloud.local", "secret"),
        pair.sender.plan().clone(),
        pair.now,
    )
    .unwrap();
    let err = sender
        .check_receipt("vm-42", "[ds1] other/other.vmx", &forged.to_json())
        .unwrap_err();
    assert!(err.to_string().contains("signature does not verify"), "{err}");
}

#[test]
fn staging_damaged_before_the_commit_is_found_and_repaired_from_the_edge() {
    // disk_image: chunk 0 random, 1 text, 2 zero, 3 mostly zero; the tail is short.
    let sources = vec![disk_image(31, 8), disk_image(32, 3)];
    let mut pair = Pair::new(sources.clone(), "secret");
    let cs = u64::from(CS);
    // A data chunk of each disk, and a zero chunk (rewritten by the cloud itself).
    pair.damage_before_verify = vec![(0, cs + 17), (1, 5), (0, 2 * cs + 3)];
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.dests, sources, "the registered copy is what was sent");
    assert_eq!(
        pair.verify_rounds,
        vec![(2, 1), (0, 0)],
        "read back twice: damage, then clean"
    );
    assert_eq!(pair.receiver.repaired_chunks(), 2);
    // The receipt states the roots of what was sent, which the cloud now holds.
    let signed = SignedReceipt::from_json(pair.edge_receipt.as_deref().unwrap()).unwrap();
    let expected: Vec<String> = sources
        .iter()
        .map(|src| {
            let hashes: Vec<[u8; 32]> = src.chunks(CS as usize).map(crate::chunk::chunk_hash).collect();
            crate::integrity::hex(&crate::merkle::root(&hashes))
        })
        .collect();
    let roots: Vec<&str> = signed.receipt.disks.iter().map(|d| d.merkle_root.as_str()).collect();
    assert_eq!(roots, expected);
}

#[test]
fn a_datastore_that_keeps_damaging_the_copy_fails_the_migration() {
    let mut pair = Pair::new(vec![disk_image(33, 4)], "secret");
    pair.damage_before_verify = vec![(0, 100)];
    pair.damage_every_time = true;
    pair.drive();
    assert!(!pair.sender.is_committed());
    assert!(pair.committed.is_none(), "nothing is registered");
    let err = pair.sender.error().expect("failed").to_string();
    assert!(
        err.contains("after 2 repairs") && err.contains("disk 0 offset 0") && err.contains("nothing was registered"),
        "{err}"
    );
    assert!(pair.discarded.is_some(), "the staged VM is discarded");
}

#[test]
fn a_resumed_migration_reads_back_what_its_journal_vouched_for() {
    let sources = vec![disk_image(34, 12)];
    let mut first = Pair::new(sources.clone(), "secret");
    first.reads_per_step = 2;
    for _ in 0..8 {
        first.step();
    }
    assert!(!first.sender.is_finished());
    first.data.clear();
    first.to_edge.clear();
    first.to_cloud.clear();
    let journaled = first.cloud_journal.clone();
    let (disk, index, _) = *journaled
        .iter()
        .find(|(d, i, _)| !crate::chunk::is_zero(&sources[usize::from(*d)][*i as usize * CS as usize..][..CS as usize]))
        .expect("a data chunk was journaled");
    // While the migration waits, its staged file changes on the cloud's disk.
    first.dests[usize::from(disk)][index as usize * CS as usize + 9] ^= 0xff;
    let mut second = first.resumed();
    second.receiver = ReceiverSession::new(
        ReceiverConfig {
            verify: VerifyScope::Resumed,
            ..ReceiverConfig::default()
        },
        second.now,
    );
    second.drive();
    assert!(second.sender.is_committed(), "{:?}", second.sender.error());
    assert_eq!(second.dests, sources);
    assert_eq!(second.receiver.repaired_chunks(), 1);
}

#[test]
fn an_edge_that_missed_the_commit_resumes_and_gets_the_same_receipt() {
    let sources = vec![disk_image(35, 6), disk_image(36, 2)];
    let mut first = Pair::new(sources, "secret");
    first.drive();
    let registered = first.registered.clone().expect("registered");
    let receipt = first.edge_receipt.clone().unwrap();
    first.edge_checkpoint.truncate(3);
    let mut replay = first.resumed();
    replay.registered = Some(registered);
    replay.drive();
    assert!(replay.sender.is_committed(), "{:?}", replay.sender.error());
    assert_eq!(
        replay.edge_receipt.as_deref(),
        Some(receipt.as_str()),
        "the receipt as issued"
    );
    assert_eq!(replay.data_frames, 0, "nothing is sent again");
    assert!(
        replay.hashed > 0,
        "chunks the checkpoint missed are read to compute the roots"
    );
    assert!(replay.committed.is_none(), "nothing is registered again");
}

#[test]
fn a_source_changed_after_its_commit_does_not_get_the_old_receipt() {
    let mut first = Pair::new(vec![disk_image(37, 4)], "secret");
    first.drive();
    let registered = first.registered.clone().expect("registered");
    first.edge_checkpoint.clear();
    first.sources[0][10] ^= 1;
    let mut replay = first.resumed();
    replay.registered = Some(registered);
    replay.drive();
    assert!(!replay.sender.is_committed());
    let err = replay.sender.error().expect("refused").to_string();
    assert!(err.contains("the source changed since it was migrated"), "{err}");
}

#[test]
fn a_chunk_altered_in_flight_is_rejected_and_resent() {
    let mut pair = Pair::new(vec![disk_image(3, 8)], "secret");
    let mut altered = 0;
    pair.tamper = Some(Box::new(move |h, payload| {
        if h.offset == u64::from(CS) && altered < 2 {
            altered += 1;
            let mid = payload.len() / 2;
            payload[mid] ^= 0x40;
        }
    }));
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.dests, pair.sources);
}

#[test]
fn a_chunk_altered_every_time_fails_the_migration() {
    let mut pair = Pair::new(vec![disk_image(4, 4)], "secret");
    pair.tamper = Some(Box::new(|h, payload| {
        if h.offset == 0 {
            payload[0] ^= 1;
        }
    }));
    pair.drive();
    assert!(!pair.sender.is_committed());
    let err = pair.sender.error().expect("failed");
    assert_eq!(err.code(), RefusalCode::IntegrityFailure, "{err}");
    assert!(pair.discarded.is_some(), "the cloud discards the staged VM");
    assert!(pair.committed.is_none());
}

#[test]
fn a_wrong_password_is_refused_before_any_data() {
    let mut pair = Pair::new(vec![disk_image(5, 4)], "guess");
    pair.drive();
    let err = pair.sender.error().expect("refused");
    assert_eq!(err.code(), RefusalCode::BadCredentials);
    assert_eq!(pair.data_frames, 0);
    assert!(pair.receiver.is_finished() && !pair.receiver.is_committed());
}

#[test]
fn every_plan_problem_reaches_the_edge() {
    let mut pair = Pair::new(vec![disk_image(6, 4)], "secret");
    pair.refuse_plan = Some(vec!["name web01 is taken".into(), "network X is not mapped".into()]);
    pair.drive();
    match pair.sender.error() {
        Some(ProtocolError::Refused { code, problems }) => {
            assert_eq!(*code, RefusalCode::PlanRejected);
            assert_eq!(problems.len(), 2);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(pair.data_frames, 0);
}

#[test]
fn reordered_and_duplicated_chunks_are_written_once() {
    let mut pair = Pair::new(vec![disk_image(7, 12)], "secret");
    pair.reorder = true;
    pair.duplicate = true;
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.dests, pair.sources);
    assert_eq!(pair.writes, 9 + 1);
}

/// Drives a receiver to the streaming phase by hand.
/// A receiver that accepted the edge's credential and waits for its plan.
fn welcomed_receiver(now: Instant) -> ReceiverSession {
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    r.handle_control(
        EdgeMessage::Hello {
            agent: "a".into(),
            user: "u".into(),
            password: "p".into(),
        },
        now,
    )
    .unwrap();
    r.authenticated(Ok("Administrator".into()), "c");
    r
}

fn streaming_receiver(capacity: u64) -> ReceiverSession {
    let now = Instant::now();
    let mut r = welcomed_receiver(now);
    let img = vec![0u8; capacity as usize];
    r.handle_control(EdgeMessage::Plan(plan(&[&img])), now).unwrap();
    r.plan_accepted("m".into(), "ds".into(), false);
    while r.poll_transmit().is_some() {}
    while r.poll_event().is_some() {}
    r
}

fn header(disk: u16, offset: u64, plain_len: u32) -> ChunkHeader {
    ChunkHeader {
        disk,
        offset,
        plain_len,
        encoding: crate::wire::Encoding::Raw,
        hash: [1; 32],
        payload_len: plain_len,
    }
}

#[test]
fn chunks_at_impossible_places_are_refused() {
    let cap = 4 * u64::from(CS);
    for h in [
        header(1, 0, CS),                            // no such disk
        header(0, 1, CS),                            // not a chunk boundary
        header(0, cap, CS),                          // past the end
        header(0, 0, CS / 2),                        // wrong length
        header(0, u64::MAX - u64::from(CS) + 1, CS), // overflow bait
    ] {
        let mut r = streaming_receiver(cap);
        let err = r.admit_chunk(&h).unwrap_err();
        assert_eq!(err.code(), RefusalCode::ProtocolViolation, "{err}");
        assert!(r.is_finished());
        assert!(matches!(
            r.poll_transmit(),
            Some(CloudMessage::Refused {
                code: RefusalCode::ProtocolViolation,
                ..
            })
        ));
    }
}

#[test]
fn a_chunk_rewritten_with_other_content_is_refused() {
    let mut r = streaming_receiver(2 * u64::from(CS));
    assert_eq!(r.admit_chunk(&header(0, 0, CS)).unwrap(), Admission::Write);
    r.chunk_written(0, 0);
    // An exact replay is acknowledged, not rewritten.
    assert_eq!(r.admit_chunk(&header(0, 0, CS)).unwrap(), Admission::Duplicate);
    let mut other = header(0, 0, CS);
    other.hash = [2; 32];
    assert!(r.admit_chunk(&other).is_err());
}

/// A receiver with one disk of two chunks, each with its own hash, and the root the edge
/// would seal them with.
fn two_chunk_receiver() -> (ReceiverSession, [ChunkHeader; 2], [u8; 32]) {
    let r = streaming_receiver(2 * u64::from(CS));
    let first = header(0, 0, CS);
    let mut second = header(0, u64::from(CS), CS);
    second.hash = [2; 32];
    let root = crate::merkle::root(&[first.hash, second.hash]);
    (r, [first, second], root)
}

/// Drains the receiver's events: whether it asked for the read-back before the commit.
fn read_back_asked(r: &mut ReceiverSession) -> bool {
    std::iter::from_fn(|| r.poll_event()).any(|e| matches!(e, ReceiverEvent::VerifyStaged { .. }))
}

/// Drains the receiver's messages: whether one was a refusal.
fn refused(r: &mut ReceiverSession) -> bool {
    std::iter::from_fn(|| r.poll_transmit()).any(|m| matches!(m, CloudMessage::Refused { .. }))
}

/// The driver wrote the chunk and made it durable.
fn write_durably(r: &mut ReceiverSession, h: &ChunkHeader) {
    assert_eq!(r.admit_chunk(h).unwrap(), Admission::Write);
    r.chunk_written(h.disk, h.offset);
    let batch = r.take_unsynced();
    r.synced(&batch);
}

fn seal(root: [u8; 32], frames: u64) -> EdgeMessage {
    EdgeMessage::DiskSealed { disk: 0, root, frames }
}

#[test]
fn a_seal_sent_with_the_last_chunk_waits_until_every_frame_is_durable() {
    let (mut r, [first, second], root) = two_chunk_receiver();
    let now = Instant::now();
    // The edge sealed the disk and committed as it sent its last chunk: both arrive
    // before the data and are held, not refused as a seal with missing chunks.
    r.handle_control(seal(root, 2), now).unwrap();
    r.handle_control(EdgeMessage::Commit, now).unwrap();
    assert!(!read_back_asked(&mut r), "nothing arrived yet");
    for h in [first, second] {
        assert_eq!(r.admit_chunk(&h).unwrap(), Admission::Write);
        r.chunk_written(0, h.offset);
    }
    assert!(!read_back_asked(&mut r), "written is not durable: the seal still waits");
    assert!(r.seal_waits_for_sync(), "the driver is told to sync at once");
    let batch = r.take_unsynced();
    r.synced(&batch);
    assert!(!r.seal_waits_for_sync());
    assert!(
        read_back_asked(&mut r),
        "durable: the seal is checked and the commit taken up"
    );
    // The acknowledgements go out before anything the commit answers.
    assert!(matches!(r.poll_transmit(), Some(CloudMessage::Acks { disk: 0, .. })));
    assert!(!refused(&mut r));
}

#[test]
fn a_seal_counting_more_frames_than_arrived_is_never_checked() {
    let (mut r, [first, _], root) = two_chunk_receiver();
    let now = Instant::now();
    r.handle_control(seal(root, 2), now).unwrap();
    r.handle_control(EdgeMessage::Commit, now).unwrap();
    write_durably(&mut r, &first);
    assert!(!read_back_asked(&mut r), "one frame of two: the commit waits");
    // A second commit behind the held one is a protocol violation, not a second wait.
    let err = r.handle_control(EdgeMessage::Commit, now).unwrap_err();
    assert_eq!(err.code(), RefusalCode::ProtocolViolation, "{err}");
}

#[test]
fn a_chunk_rejected_after_the_seal_waits_for_the_seal_that_counts_its_resend() {
    let (mut r, [first, second], root) = two_chunk_receiver();
    let now = Instant::now();
    r.handle_control(seal(root, 2), now).unwrap();
    r.handle_control(EdgeMessage::Commit, now).unwrap();
    assert_eq!(r.admit_chunk(&first).unwrap(), Admission::Write);
    r.chunk_rejected(0, 0, &crate::chunk::ChunkError::HashMismatch).unwrap();
    write_durably(&mut r, &second);
    assert!(!read_back_asked(&mut r), "two frames of two, but one was rejected");
    // The resend arrives before the edge's second seal: still the first seal's count
    // (2) is not what arrived (3), so nothing is checked against a stale count.
    write_durably(&mut r, &first);
    assert!(!read_back_asked(&mut r));
    r.handle_control(seal(root, 3), now).unwrap();
    assert!(read_back_asked(&mut r), "the new seal counts the resend");
    assert!(!refused(&mut r));
}

#[test]
fn a_wrong_root_is_refused_once_its_frames_are_durable() {
    let (mut r, [first, second], _) = two_chunk_receiver();
    let now = Instant::now();
    r.handle_control(seal([9; 32], 2), now).unwrap();
    r.handle_control(EdgeMessage::Commit, now).unwrap();
    write_durably(&mut r, &first);
    assert!(!refused(&mut r));
    write_durably(&mut r, &second);
    assert!(refused(&mut r), "the root is checked as soon as the data is in");
    assert!(!read_back_asked(&mut r));
}

#[test]
fn the_edge_seals_and_commits_as_its_last_chunk_is_sent_and_times_the_answer_from_the_last_ack() {
    let img = disk_image(11, 3);
    let now = Instant::now();
    let mut s = SenderSession::new(SenderConfig::new("edge-test", "u", "p"), plan(&[&img]), now).unwrap();
    while s.poll_transmit(now).is_some() {}
    s.handle_control(
        CloudMessage::Welcome {
            endpoint: "cloud".into(),
            role: "MigrationOperator".into(),
        },
        now,
    )
    .unwrap();
    s.handle_control(
        CloudMessage::PlanAccepted {
            migration_id: "m".into(),
            datastore: "ds".into(),
            dedup: false,
        },
        now,
    )
    .unwrap();
    let mut sent = Vec::new();
    for (index, chunk) in img.chunks(CS as usize).enumerate() {
        let offset = index as u64 * u64::from(CS);
        assert_eq!(s.work_for(0, offset), Work::Send);
        if crate::chunk::is_zero(chunk) {
            s.chunk_zero(0, offset);
        } else {
            s.chunk_sent(0, offset, crate::chunk::chunk_hash(chunk));
            sent.push(offset);
        }
    }
    let out: Vec<EdgeMessage> = std::iter::from_fn(|| s.poll_transmit(now)).collect();
    assert!(
        out.iter()
            .any(|m| matches!(m, EdgeMessage::DiskSealed { frames, .. } if *frames == sent.len() as u64)),
        "sealed before any acknowledgement, counting every frame: {out:?}"
    );
    assert!(matches!(out.last(), Some(EdgeMessage::Commit)), "{out:?}");
    assert_eq!(s.poll_timeout(), None, "data in flight is not the cloud's delay");
    let later = now + Duration::from_secs(5);
    s.handle_control(CloudMessage::Acks { disk: 0, offsets: sent }, later)
        .unwrap();
    assert!(
        s.poll_timeout().is_some_and(|t| t > later),
        "the answer is due from the last acknowledgement"
    );
}

#[test]
fn sealing_a_disk_with_missing_chunks_fails() {
    let mut r = streaming_receiver(3 * u64::from(CS));
    r.handle_control(
        EdgeMessage::ZeroChunks {
            disk: 0,
            offset: 0,
            count: 2,
        },
        Instant::now(),
    )
    .unwrap();
    let err = r
        .handle_control(
            EdgeMessage::DiskSealed {
                disk: 0,
                root: [0; 32],
                frames: 0,
            },
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!(err.code(), RefusalCode::IntegrityFailure);
    assert!(err.to_string().contains("1 of 3"), "{err}");
}

#[test]
fn a_chunk_declared_zero_twice_is_refused_and_journaled_once() {
    let zero = |offset: u64, count: u64| EdgeMessage::ZeroChunks { disk: 0, offset, count };
    let cs = u64::from(CS);
    let mut r = streaming_receiver(8 * cs);
    r.handle_control(zero(0, 4), Instant::now()).unwrap();
    let first = r.take_unsynced();
    assert_eq!(first.zero_runs, vec![(0, 0, 4)]);
    // A run that overlaps the first by one chunk: refused as a whole, nothing set.
    let err = r.handle_control(zero(3 * cs, 5), Instant::now()).unwrap_err();
    assert_eq!(err.code(), RefusalCode::ProtocolViolation);
    assert!(
        err.to_string()
            .contains(&format!("chunk at offset {} declared zero again", 3 * cs)),
        "{err}"
    );
    assert!(r.take_unsynced().is_empty(), "the repeat is not journaled");
    assert!(r.is_finished());

    // Repeats on a fresh session: the first repeat ends it, however many follow, so
    // the journal holds one record whatever the edge sent.
    let mut r = streaming_receiver(8 * cs);
    let mut journaled = Vec::new();
    for _ in 0..600 {
        let _ = r.handle_control(zero(0, 8), Instant::now());
        journaled.extend(r.take_unsynced().zero_runs);
    }
    assert_eq!(journaled, vec![(0, 0, 8)]);
    // A chunk written as data and then declared zero keeps its own refusal.
    let mut r = streaming_receiver(2 * cs);
    assert_eq!(r.admit_chunk(&header(0, 0, CS)).unwrap(), Admission::Write);
    r.chunk_written(0, 0);
    let err = r.handle_control(zero(0, 1), Instant::now()).unwrap_err();
    assert!(err.to_string().contains("after data was written there"), "{err}");
}

#[test]
fn zero_runs_past_the_end_are_refused() {
    let mut r = streaming_receiver(3 * u64::from(CS));
    let err = r
        .handle_control(
            EdgeMessage::ZeroChunks {
                disk: 0,
                offset: u64::from(CS),
                count: u64::MAX,
            },
            Instant::now(),
        )
        .unwrap_err();
    assert_eq!(err.code(), RefusalCode::ProtocolViolation);
}

#[test]
fn data_before_a_plan_is_a_violation() {
    let now = Instant::now();
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    assert!(r.admit_chunk(&header(0, 0, CS)).is_err());
}

#[test]
fn the_hello_has_its_own_shorter_deadline() {
    let now = Instant::now();
    let config = ReceiverConfig {
        hello_timeout: Duration::from_secs(10),
        setup_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let mut r = ReceiverSession::new(config.clone(), now);
    assert_eq!(r.poll_timeout(), Some(now + Duration::from_secs(10)));
    r.handle_timeout(now + Duration::from_secs(10));
    match r.poll_transmit() {
        Some(CloudMessage::Refused { code, problems }) => {
            assert_eq!(code, RefusalCode::ProtocolViolation);
            assert!(problems[0].contains("before the edge said Hello"), "{problems:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Hello in time: the plan's deadline, counted from the connection, applies.
    let mut r = ReceiverSession::new(config, now);
    r.handle_control(
        EdgeMessage::Hello {
            agent: "a".into(),
            user: "u".into(),
            password: "p".into(),
        },
        now + Duration::from_secs(9),
    )
    .unwrap();
    assert_eq!(r.poll_timeout(), Some(now + Duration::from_secs(30)));
    r.handle_timeout(now + Duration::from_secs(29));
    assert!(!r.is_finished());
}

#[test]
fn a_silent_client_times_out() {
    let now = Instant::now();
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    let deadline = r.poll_timeout().unwrap();
    r.handle_timeout(deadline - Duration::from_millis(1));
    assert!(!r.is_finished());
    r.handle_timeout(deadline);
    assert!(r.is_finished());
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn an_edge_abort_discards_the_staged_vm() {
    let mut r = streaming_receiver(u64::from(CS));
    r.handle_control(
        EdgeMessage::Abort {
            reason: "operator cancelled".into(),
        },
        Instant::now(),
    )
    .unwrap();
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Discard { .. })));
    assert!(r.is_finished() && !r.is_committed());
}

#[test]
fn a_zstd_bomb_is_bounded_by_the_declared_length() {
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    let h = ChunkHeader {
        disk: 0,
        offset: 0,
        plain_len: CS,
        encoding: crate::wire::Encoding::Zstd,
        hash: [0; 32],
        payload_len: bomb.len() as u32,
    };
    let mut plain = Vec::new();
    let err = Opener::new().unwrap().open(&h, &bomb, &mut plain).unwrap_err();
    assert!(matches!(err, crate::chunk::ChunkError::Decompress(_)), "{err}");
    assert!(plain.capacity() <= CS as usize * 2);
}

#[test]
fn incompressible_chunks_go_raw() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut data = vec![0u8; CS as usize];
    rng.fill(&mut data[..]);
    let mut payload = Vec::new();
    let h = Sealer::new(1).unwrap().seal(0, 0, &data, &mut payload);
    assert_eq!(h.encoding, crate::wire::Encoding::Raw);
    assert_eq!(payload, data);
}

#[test]
fn the_report_reaches_the_edge_with_the_commit() {
    let mut pair = Pair::new(vec![disk_image(13, 3)], "secret");
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.sender.report(), Some(&report("vm-42")));
}

/// A pair whose edge only asks for the plan to be validated.
fn validating_pair() -> Pair {
    let mut pair = Pair::new(vec![disk_image(14, 3)], "secret");
    let plan = pair.sender.plan().clone();
    pair.sender = SenderSession::validating(
        SenderConfig::new("edge-test", "migrator@cloud.local", "secret"),
        plan,
        pair.now,
    )
    .unwrap();
    pair
}

#[test]
fn a_validated_plan_stages_nothing_and_ends_both_sessions() {
    let mut pair = validating_pair();
    pair.drive();
    assert_eq!(pair.validated, Some(report("")));
    assert!(pair.sender.is_finished() && !pair.sender.is_committed() && pair.sender.error().is_none());
    assert!(pair.receiver.is_finished() && !pair.receiver.is_committed() && !pair.receiver.is_resumable());
    assert!(
        pair.receiver.plan().is_none(),
        "a checked plan is not the migration's plan"
    );
    assert_eq!((pair.data_frames, pair.discarded.as_deref()), (0, None));
    assert_eq!(pair.receiver.poll_timeout(), None, "no setup timer after the answer");
}

#[test]
fn a_refused_validation_lists_every_problem() {
    let mut pair = validating_pair();
    pair.refuse_plan = Some(vec!["a".into(), "b".into(), "c".into()]);
    pair.drive();
    match pair.sender.error() {
        Some(ProtocolError::Refused { code, problems }) => {
            assert_eq!(*code, RefusalCode::PlanRejected);
            assert_eq!(problems.len(), 3);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(pair.validated.is_none() && pair.discarded.is_none());
}

#[test]
fn validation_messages_out_of_place_are_violations() {
    // A migrating edge does not expect Valid, nor a Report before the commit.
    let now = Instant::now();
    let mut s = SenderSession::new(SenderConfig::new("e", "u", "p"), plan(&[&disk_image(15, 1)]), now).unwrap();
    s.handle_control(
        CloudMessage::Welcome {
            endpoint: "c".into(),
            role: "r".into(),
        },
        now,
    )
    .unwrap();
    assert!(s.handle_control(CloudMessage::Valid(report("")), now).is_err());
    let mut s = SenderSession::new(SenderConfig::new("e", "u", "p"), plan(&[&disk_image(15, 1)]), now).unwrap();
    assert!(s.handle_control(CloudMessage::Report(report("vm-1")), now).is_err());
    // A cloud session takes Validate only where it would take a plan.
    let mut r = streaming_receiver(1 << 20);
    assert!(r
        .handle_control(EdgeMessage::Validate(plan(&[&disk_image(15, 1)])), now)
        .is_err());
}

/// A pair whose edge only asks the cloud to abort migration-1 (`edge-agent abort`).
fn aborting_pair() -> Pair {
    let mut pair = Pair::new(vec![disk_image(16, 3)], "secret");
    let plan = pair.sender.plan().clone();
    pair.sender = SenderSession::aborting(
        SenderConfig::new("edge-test", "migrator@cloud.local", "secret"),
        plan,
        "migration-1".into(),
        "operator gave up",
        pair.now,
    )
    .unwrap();
    pair
}

#[test]
fn an_abort_names_the_migration_and_waits_for_the_close() {
    let mut pair = aborting_pair();
    pair.drive();
    assert_eq!(pair.aborted.as_deref(), Some("migration-1"));
    // The cloud confirms by closing the connection: the driver's part, not a message.
    assert!(pair.receiver.edge_aborted() && pair.receiver.is_finished() && !pair.receiver.is_resumable());
    assert!(!pair.sender.is_finished() && pair.sender.error().is_none());
    assert!(pair.sender.migration_id().is_none(), "nothing was resumed to abort it");
    assert_eq!((pair.data_frames, pair.discarded.as_deref()), (0, None));
    assert_eq!(pair.receiver.poll_timeout(), None);
}

#[test]
fn a_refused_abort_reaches_the_edge_and_discards_nothing() {
    let mut pair = aborting_pair();
    pair.refuse_abort = Some(vec!["user auditor may not abort migration-1".into()]);
    pair.drive();
    match pair.sender.error() {
        Some(ProtocolError::Refused { code, problems }) => {
            assert_eq!(*code, RefusalCode::NotPermitted);
            assert!(problems[0].contains("may not abort"), "{problems:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(pair.aborted.is_none() && pair.discarded.is_none());
    assert!(!pair.receiver.edge_aborted() && !pair.receiver.is_resumable());
}

#[test]
fn an_abort_request_is_taken_only_in_place_of_a_plan() {
    let now = Instant::now();
    let mut r = streaming_receiver(1 << 20);
    let abort = EdgeMessage::AbortMigration {
        migration_id: "migration-1".into(),
        reason: "x".into(),
    };
    assert!(r.handle_control(abort.clone(), now).is_err());
    // A session that is aborting takes no plan, and no PlanAccepted reaches its edge.
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    r.handle_control(
        EdgeMessage::Hello {
            agent: "a".into(),
            user: "u".into(),
            password: "p".into(),
        },
        now,
    )
    .unwrap();
    r.authenticated(Ok("MigrationOperator".into()), "c");
    r.handle_control(abort, now).unwrap();
    assert!(r
        .handle_control(EdgeMessage::Plan(plan(&[&disk_image(17, 1)])), now)
        .is_err());
    let mut s = aborting_pair().sender;
    s.handle_control(
        CloudMessage::Welcome {
            endpoint: "c".into(),
            role: "r".into(),
        },
        now,
    )
    .unwrap();
    assert!(s
        .handle_control(
            CloudMessage::PlanAccepted {
                migration_id: "migration-1".into(),
                datastore: "ds".into(),
                dedup: false,
            },
            now
        )
        .is_err());
}

/// A chunk's bytes in one of the test images.
fn chunk_of(img: &mut [u8], index: usize) -> &mut [u8] {
    let end = ((index + 1) * CS as usize).min(img.len());
    &mut img[index * CS as usize..end]
}

#[test]
fn a_replica_is_kept_and_each_delta_pass_sends_only_what_changed() {
    let sources = vec![disk_image(41, 12)];
    let mut first = Pair::new(sources.clone(), "secret");
    first.sender.finish_as_replica();
    first.drive();
    assert!(first.sender.is_synced(), "{:?}", first.sender.error());
    assert!(first.receiver.is_synced() && first.receiver.is_resumable());
    assert!(first.committed.is_none(), "a replica is not registered");
    assert_eq!(first.dests, sources);
    assert_eq!(first.verified_chunks, vec![13], "the first pass reads its replica back");
    let full = first.data_frames;

    // The running source changes: new data in a data chunk (0), a text chunk zeroed (1),
    // data where there were zeros (2).
    let mut changed = sources.clone();
    rand::rngs::StdRng::seed_from_u64(5).fill(chunk_of(&mut changed[0], 0));
    chunk_of(&mut changed[0], 1).fill(0);
    chunk_of(&mut changed[0], 2)[..10].fill(9);
    let mut second = first.next_pass(changed.clone(), true);
    second.drive();
    assert!(second.sender.is_synced(), "{:?}", second.sender.error());
    assert_eq!(
        second.data_frames, 2,
        "two changed data chunks, of {full} in the first pass"
    );
    assert_eq!(second.synced, Some(2 * u64::from(CS)));
    assert_eq!(second.dests, changed, "the zeroed chunk is zero in the replica too");
    assert_eq!(
        second.verified_chunks,
        vec![3],
        "a delta pass reads back what it changed"
    );

    // The switchover: nothing changed since, nothing sent; the VM is registered with
    // the roots of the source as it is now.
    let mut last = second.next_pass(changed.clone(), false);
    last.drive();
    assert!(last.sender.is_committed(), "{:?}", last.sender.error());
    assert_eq!(last.data_frames, 0);
    assert_eq!(last.dests, changed);
    assert!(last.edge_receipt.is_some());
    assert_eq!(last.verified_chunks, vec![13], "the switchover reads everything back");
}

#[test]
fn a_delta_pass_repairs_a_replica_damaged_between_passes() {
    let sources = vec![disk_image(42, 8)];
    let mut first = Pair::new(sources.clone(), "secret");
    first.sender.finish_as_replica();
    first.drive();
    assert!(first.sender.is_synced());
    let mut last = first.next_pass(sources.clone(), false);
    // Bit rot in a data chunk and in a zero chunk of the replica.
    last.damage_before_verify = vec![(0, 5), (0, 2 * u64::from(CS) + 9)];
    last.drive();
    assert!(last.sender.is_committed(), "{:?}", last.sender.error());
    assert_eq!(last.dests, sources);
    assert_eq!(
        last.verify_rounds.first(),
        Some(&(1, 1)),
        "one chunk re-sent, one rewritten"
    );
}

#[test]
fn a_replaced_chunk_is_replaced_once_per_pass_and_only_in_a_delta_pass() {
    let cap = 2 * u64::from(CS);
    let mut r = streaming_receiver(cap);
    assert_eq!(r.admit_chunk(&header(0, 0, CS)).unwrap(), Admission::Write);
    r.chunk_written(0, 0);
    let mut other = header(0, 0, CS);
    other.hash = [2; 32];
    // A cold lift never replaces what it wrote.
    assert!(r.admit_chunk(&other).is_err());

    // A delta pass may replace a chunk the replica holds, once.
    let now = Instant::now();
    let mut r = welcomed_receiver(now);
    let img = vec![0u8; cap as usize];
    r.handle_control(
        EdgeMessage::Sync {
            migration_id: "m".into(),
            plan: plan(&[&img]),
            switchover: false,
        },
        now,
    )
    .unwrap();
    assert!(r.is_delta());
    let mut held = crate::integrity::DiskHashes::new(cap, CS);
    held.set(0, [1; 32]);
    held.set(1, [1; 32]);
    r.resume_accepted("m".into(), "ds".into(), vec![held]);
    assert_eq!(r.admit_chunk(&other).unwrap(), Admission::Write);
    r.chunk_written(0, 0);
    let mut third = header(0, 0, CS);
    third.hash = [3; 32];
    assert!(
        r.admit_chunk(&third).is_err(),
        "twice in one pass: the source is not read consistently"
    );
}

#[test]
fn a_switchover_states_the_downtime_and_the_power_on_and_awaits_confirmation() {
    let mut sources = vec![disk_image(43, 6)];
    let mut first = Pair::new(sources.clone(), "secret");
    first.sender.finish_as_replica();
    first.drive();
    assert!(first.sender.is_synced());
    chunk_of(&mut sources[0], 3)[..5].fill(9);
    let mut last = first.next_pass(sources.clone(), false);
    // The edge stopped the source 4.5 s before this pass's commit is sent.
    let stopped = last.now - Duration::from_millis(4500);
    last.sender
        .finish_as_switchover(true, false, stopped, crate::wire::DowntimeFrom::EdgeStop);
    // A repair round: the commit is sent twice; the downtime counts from the first. The
    // damage is in the chunk the pass wrote, which the switchover reads back.
    last.damage_before_verify = vec![(0, 3 * u64::from(CS) + 7)];
    last.drive();
    assert!(last.sender.is_committed(), "{:?}", last.sender.error());
    assert_eq!(last.dests, sources);
    let (request, _) = last.receiver.switchover().cloned().expect("a switchover");
    assert!(request.power_on && !request.confirm && request.downtime_from == crate::wire::DowntimeFrom::EdgeStop);
    // The test's clock moves a millisecond a step.
    assert!((4500..5500).contains(&request.downtime_so_far_ms), "{request:?}");
    let outcome = last.sender.switchover_outcome().expect("SwitchedOver before Committed");
    assert_eq!(
        (outcome.powered_on, outcome.downtime_ms, outcome.awaiting_confirm),
        (true, Some(request.downtime_so_far_ms), true)
    );
    assert_eq!(last.verify_rounds.len(), 2, "a repair, then the commit again");
}

/// A replica of `sources` kept by a first pass, and the source changed since: chunk 0
/// rewritten with new data, chunk 1 (text) zeroed, chunk 2 (zeros) written.
fn replica_then_changed(seed: u64) -> (Pair, Vec<Vec<u8>>) {
    let sources = vec![disk_image(seed, 12)];
    let mut first = Pair::new(sources.clone(), "secret");
    first.sender.finish_as_replica();
    first.drive();
    assert!(first.sender.is_synced(), "{:?}", first.sender.error());
    let mut changed = sources;
    rand::rngs::StdRng::seed_from_u64(seed + 1000).fill(chunk_of(&mut changed[0], 0));
    chunk_of(&mut changed[0], 1).fill(0);
    chunk_of(&mut changed[0], 2)[..10].fill(9);
    (first, changed)
}

/// The last pass of `first`'s replication, over `changed`, ending with the switchover.
fn switchover_pass(first: Pair, changed: &[Vec<u8>]) -> Pair {
    let mut last = first.next_pass(changed.to_vec(), false);
    let now = last.now;
    last.sender
        .finish_as_switchover(false, true, now, crate::wire::DowntimeFrom::SwitchoverStart);
    last
}

#[test]
fn a_switchover_reads_the_replica_back_while_its_last_pass_streams() {
    let (first, changed) = replica_then_changed(61);
    // A pass that keeps the replica asks for no read-back ahead.
    let mut middle = first.next_pass(changed.clone(), true);
    middle.drive();
    assert!(middle.sender.is_synced(), "{:?}", middle.sender.error());
    assert!(middle.early_chunks.is_empty());
    assert_eq!(middle.verified_chunks, vec![3], "what the pass changed");

    let mut changed_again = changed.clone();
    chunk_of(&mut changed_again[0], 4)[..3].fill(1);
    let mut last = switchover_pass(middle, &changed_again);
    last.drive();
    assert!(last.sender.is_committed(), "{:?}", last.sender.error());
    assert_eq!(last.dests, changed_again);
    assert_eq!(
        last.early_chunks,
        vec![13],
        "every chunk the replica holds, while the pass streams"
    );
    assert_eq!(
        last.verified_chunks,
        vec![1],
        "at the switchover, only the chunk the pass wrote"
    );
    assert_eq!(last.receiver.verified_early_chunks(), 12);
}

#[test]
fn a_replica_damaged_before_the_switchover_is_found_by_the_early_read_back_and_repaired() {
    let (mut first, changed) = replica_then_changed(62);
    // Between the passes the replica's file changes in the cloud: a data chunk the pass
    // leaves alone (5), and a zero chunk (6), which the early read-back must not rewrite.
    first.dests[0][5 * CS as usize + 11] ^= 0x5a;
    first.dests[0][6 * CS as usize + 3] = 1;
    let mut last = switchover_pass(first, &changed);
    last.drive();
    assert!(last.sender.is_committed(), "{:?}", last.sender.error());
    assert_eq!(last.dests, changed);
    assert_eq!(last.early_chunks, vec![13]);
    assert_eq!(
        last.verified_chunks,
        vec![5, 5],
        "the three chunks the pass replaced and the two found different early, at each commit"
    );
    assert_eq!(
        last.verify_rounds,
        vec![(1, 2), (0, 0)],
        "the damaged data chunk re-sent; the damaged zero chunk and the one the pass zeroed rewritten"
    );
}

#[test]
fn a_switchover_before_the_early_read_back_ended_waits_for_it_and_reads_what_the_pass_wrote() {
    let (first, changed) = replica_then_changed(63);
    let mut last = switchover_pass(first, &changed);
    // The early read-back read the replica as it was before the pass wrote anything
    // (every chunk intact), and reports only after the pass wrote its chunks and the
    // edge asked for the switchover.
    last.hold_early = true;
    last.drive();
    assert!(
        !last.sender.is_finished(),
        "the switchover waits for the early read-back"
    );
    assert!(last.verified_chunks.is_empty());
    assert_eq!(last.early_found.as_ref().map(Vec::len), Some(13));
    last.hold_early = false;
    last.drive();
    assert!(last.sender.is_committed(), "{:?}", last.sender.error());
    assert_eq!(last.dests, changed);
    assert_eq!(
        last.verified_chunks,
        vec![3],
        "the chunks the pass wrote during the early read-back, although it found them intact"
    );
    assert_eq!(last.receiver.verified_early_chunks(), 10);
}

#[test]
fn the_sync_of_a_switchover_says_so() {
    let (first, changed) = replica_then_changed(64);
    let mut last = switchover_pass(first, &changed);
    let request =
        std::iter::from_fn(|| last.sender.poll_transmit(last.now)).find(|m| matches!(m, EdgeMessage::Sync { .. }));
    assert!(
        matches!(request, Some(EdgeMessage::Sync { switchover: true, .. })),
        "{request:?}"
    );
    let mut plain = Pair::new(vec![disk_image(64, 2)], "secret")
        .next_pass(vec![disk_image(64, 2)], true)
        .sender;
    let request =
        std::iter::from_fn(|| plain.poll_transmit(Instant::now())).find(|m| matches!(m, EdgeMessage::Sync { .. }));
    assert!(
        matches!(request, Some(EdgeMessage::Sync { switchover: false, .. })),
        "{request:?}"
    );
}

#[test]
fn a_plain_commit_gets_no_switchover_answer_and_a_cold_edge_refuses_one() {
    let sources = vec![disk_image(44, 3)];
    let mut pair = Pair::new(sources, "secret");
    pair.drive();
    assert!(pair.sender.is_committed());
    assert!(pair.receiver.switchover().is_none() && pair.sender.switchover_outcome().is_none());
    // An edge that did not ask for a switchover takes no SwitchedOver.
    let mut s = Pair::new(vec![disk_image(44, 3)], "secret").sender;
    let now = Instant::now();
    s.handle_control(
        CloudMessage::Welcome {
            endpoint: "c".into(),
            role: "r".into(),
        },
        now,
    )
    .unwrap();
    let outcome = crate::wire::SwitchoverOutcome {
        powered_on: true,
        power_error: None,
        downtime_ms: Some(1),
        awaiting_confirm: false,
    };
    assert!(s.handle_control(CloudMessage::SwitchedOver(outcome), now).is_err());
}

#[test]
fn the_scheduled_switchover_is_set_by_the_edge_and_the_cloud_holds_it() {
    let sources = vec![disk_image(45, 4)];
    let mut first = Pair::new(sources.clone(), "secret");
    first.sender.finish_as_replica();
    first.sender.schedule(Some(1_796_608_800));
    first.drive();
    assert!(first.sender.is_synced(), "{:?}", first.sender.error());
    assert_eq!(first.cloud_switchover_at, Some(1_796_608_800));
    assert_eq!(first.edge_switchover_at, Some(Some(1_796_608_800)));
    // A later pass that says nothing learns the value the cloud holds (which the API
    // may have changed meanwhile).
    let mut second = first.next_pass(sources.clone(), true);
    second.cloud_switchover_at = Some(1_796_612_400);
    second.drive();
    assert_eq!(second.edge_switchover_at, Some(Some(1_796_612_400)));
    // Cleared by the edge.
    let mut third = second.next_pass(sources, true);
    third.sender.schedule(None);
    third.drive();
    assert_eq!(
        (third.cloud_switchover_at, third.edge_switchover_at),
        (None, Some(None))
    );
}

#[test]
fn the_switchover_window_is_set_by_the_edge_and_the_cloud_holds_it() {
    let night: crate::schedule::SwitchoverWindow = "02:00-04:00".parse().unwrap();
    let sources = vec![disk_image(47, 4)];
    let mut first = Pair::new(sources.clone(), "secret");
    first.sender.finish_as_replica();
    first.sender.schedule_window(Some(night));
    first.drive();
    assert!(first.sender.is_synced(), "{:?}", first.sender.error());
    assert_eq!(
        (first.cloud_window, first.sender.scheduled_window()),
        (Some(night), Some(night))
    );
    // A later pass that says nothing learns what the cloud holds (the API may move it).
    let moved: crate::schedule::SwitchoverWindow = "22:00-01:00".parse().unwrap();
    let mut second = first.next_pass(sources.clone(), true);
    second.cloud_window = Some(moved);
    second.drive();
    assert_eq!(second.sender.scheduled_window(), Some(moved));
    // Cleared by the edge.
    let mut third = second.next_pass(sources, true);
    third.sender.schedule_window(None);
    third.drive();
    assert_eq!((third.cloud_window, third.sender.scheduled_window()), (None, None));
    // Outside a pass it is a protocol violation, like `Schedule`.
    let now = Instant::now();
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    assert!(r
        .handle_control(EdgeMessage::ScheduleWindow { window: Some(night) }, now)
        .is_err());
}

fn ending_pair(confirm: bool) -> Pair {
    let mut pair = Pair::new(vec![disk_image(46, 2)], "secret");
    let plan = pair.sender.plan().clone();
    pair.sender = SenderSession::ending_switchover(
        SenderConfig::new("edge-test", "migrator@cloud.local", "secret"),
        plan,
        "migration-1".into(),
        confirm,
        pair.now,
    )
    .unwrap();
    pair
}

#[test]
fn a_rollback_or_confirm_names_the_migration_and_moves_no_data() {
    for confirm in [false, true] {
        let mut pair = ending_pair(confirm);
        pair.drive();
        assert_eq!(pair.ended, Some(("migration-1".to_owned(), confirm)));
        assert!(pair.sender.is_switchover_ended() && pair.sender.is_finished());
        assert!(pair.receiver.is_finished() && !pair.receiver.is_resumable());
        let said = pair.ended_message.clone().unwrap();
        assert_eq!(said, if confirm { "confirmed" } else { "rolled back" });
        assert_eq!((pair.data_frames, pair.discarded.as_deref()), (0, None));
    }
    // Refused: the edge is told why, nothing was done.
    let mut pair = ending_pair(false);
    pair.refuse_abort = Some(vec!["user auditor may not roll back migration-1".into()]);
    pair.drive();
    assert!(matches!(
        pair.sender.error(),
        Some(ProtocolError::Refused {
            code: RefusalCode::NotPermitted,
            ..
        })
    ));
    assert!(pair.ended.is_none() && pair.discarded.is_none());
}

#[test]
fn a_rollback_request_is_taken_only_in_place_of_a_plan() {
    let now = Instant::now();
    let mut r = streaming_receiver(1 << 20);
    let end = EdgeMessage::EndSwitchover {
        migration_id: "migration-1".into(),
        confirm: false,
    };
    assert!(r.handle_control(end, now).is_err());
    // A schedule outside a pass is refused too.
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    assert!(r
        .handle_control(EdgeMessage::Schedule { switchover_at: Some(1) }, now)
        .is_err());
}

/// The chunks of `img` (not zero) by hash: what a cloud holding `img` indexes.
fn store_of(img: &[u8]) -> std::collections::HashMap<[u8; 32], Vec<u8>> {
    img.chunks(CS as usize)
        .filter(|c| !crate::chunk::is_zero(c))
        .map(|c| (crate::chunk::chunk_hash(c), c.to_vec()))
        .collect()
}

#[test]
fn a_clone_of_a_held_template_sends_only_what_differs() {
    let template = disk_image(81, 40);
    let mut clone = template.clone();
    // One small change in one chunk, and one chunk of new data.
    clone[5 * CS as usize + 17] ^= 0xff;
    clone[9 * CS as usize..10 * CS as usize].fill(0x42);
    let mut pair = Pair::new(vec![clone.clone()], "secret");
    pair.offer_dedup = true;
    pair.cloud_store = store_of(&template);
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.dests, vec![clone.clone()], "the copy is identical");
    // Chunks 5 and 9 changed: only they crossed as data.
    assert_eq!(pair.data_frames, 2, "only the changed chunks are sent");
    let non_zero = clone.chunks(CS as usize).filter(|c| !crate::chunk::is_zero(c)).count();
    assert_eq!(pair.copies, non_zero - 2);
    let copied_bytes: u64 = clone
        .chunks(CS as usize)
        .enumerate()
        .filter(|(i, c)| !crate::chunk::is_zero(c) && *i != 5 && *i != 9)
        .map(|(_, c)| c.len() as u64)
        .sum();
    assert_eq!(pair.sender.dedup_bytes(), copied_bytes);
    assert_eq!(pair.receiver.dedup_bytes(), copied_bytes);
    // Batched: one query for the disk's 31 non-zero chunks, not one per chunk.
    assert_eq!(pair.lookups, vec![non_zero]);
    // The receipt and roots are as strict as for any lift.
    let roots = pair.sender.disk_roots().unwrap();
    assert_eq!(pair.receiver.disk_roots().unwrap(), roots);
    let hashes: Vec<[u8; 32]> = clone.chunks(CS as usize).map(crate::chunk::chunk_hash).collect();
    assert_eq!(roots[0], crate::merkle::root(&hashes));
    assert!(pair.edge_receipt.is_some());
    assert_eq!(pair.sender.done_bytes(), clone.len() as u64);
}

#[test]
fn a_held_chunk_that_changed_since_it_was_indexed_is_sent_not_copied() {
    let template = disk_image(82, 12);
    let mut pair = Pair::new(vec![template.clone()], "secret");
    pair.offer_dedup = true;
    pair.cloud_store = store_of(&template);
    // The disk holding chunk 0 was written since it was indexed: its bytes no longer
    // have the hash the index names.
    let key = crate::chunk::chunk_hash(&template[..CS as usize]);
    pair.cloud_store.get_mut(&key).unwrap()[3] ^= 1;
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.dests, vec![template]);
    assert_eq!((pair.refused_copies, pair.data_frames), (1, 1));
}

#[test]
fn a_query_of_more_than_the_limit_is_split_and_none_is_sent_without_an_offer() {
    // More non-zero chunks than one query may carry: two queries, still no round trip
    // per chunk.
    let n = crate::wire::control::MAX_HASH_QUERY + 10;
    let mut img = vec![0u8; n * CS as usize];
    for (i, c) in img.chunks_mut(CS as usize).enumerate() {
        c[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    }
    let mut pair = Pair::new(vec![img.clone()], "secret");
    pair.offer_dedup = true;
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.lookups, vec![crate::wire::control::MAX_HASH_QUERY, 10]);
    assert_eq!((pair.copies, pair.data_frames), (0, n));
    assert_eq!(pair.dests, vec![img.clone()]);
    // Without the cloud's offer the edge never asks.
    let mut plain = Pair::new(vec![img.clone()], "secret");
    plain.cloud_store = store_of(&img);
    plain.drive();
    assert!(plain.sender.is_committed());
    assert!(plain.lookups.is_empty());
    assert_eq!((plain.copies, plain.data_frames), (0, n));
}

#[test]
fn hash_queries_the_plan_does_not_allow_are_protocol_violations() {
    let img = disk_image(83, 4);
    let accept = |offer: bool| {
        let mut pair = Pair::new(vec![img.clone()], "secret");
        pair.offer_dedup = offer;
        // Hello, plan, accepted; nothing read yet.
        pair.reads_per_step = 0;
        let mut r = ReceiverSession::new(ReceiverConfig::default(), pair.now);
        r.handle_control(
            EdgeMessage::Hello {
                agent: "a".into(),
                user: "u".into(),
                password: "secret".into(),
            },
            pair.now,
        )
        .unwrap();
        r.authenticated(Ok("MigrationOperator".into()), "cloud");
        r.handle_control(EdgeMessage::Plan(pair.sender.plan().clone()), pair.now)
            .unwrap();
        r.plan_accepted("migration-1".into(), "ds1".into(), offer);
        r
    };
    let q = |chunks: Vec<(u64, [u8; 32])>| EdgeMessage::HashQuery { disk: 0, chunks };
    let now = Instant::now();
    // Not offered.
    assert!(accept(false).handle_control(q(vec![(0, [1; 32])]), now).is_err());
    // Empty, too long, off a chunk boundary, past the disk, another disk.
    assert!(accept(true).handle_control(q(vec![]), now).is_err());
    let long = vec![(0, [1; 32]); crate::wire::control::MAX_HASH_QUERY + 1];
    assert!(accept(true).handle_control(q(long), now).is_err());
    assert!(accept(true).handle_control(q(vec![(7, [1; 32])]), now).is_err());
    assert!(accept(true).handle_control(q(vec![(1 << 40, [1; 32])]), now).is_err());
    let other_disk = EdgeMessage::HashQuery {
        disk: 3,
        chunks: vec![(0, [1; 32])],
    };
    assert!(accept(true).handle_control(other_disk, now).is_err());
    // A chunk asked twice, in one query or in two: each chunk is asked once, so a
    // migration's queries add up to at most its chunk count.
    assert!(accept(true)
        .handle_control(q(vec![(0, [1; 32]), (0, [1; 32])]), now)
        .is_err());
    let mut r = accept(true);
    r.handle_control(q(vec![(0, [1; 32])]), now).unwrap();
    let lookup = std::iter::from_fn(|| r.poll_event()).find(|e| matches!(e, ReceiverEvent::Lookup { .. }));
    assert!(
        matches!(&lookup, Some(ReceiverEvent::Lookup { disk: 0, chunks }) if *chunks == vec![(0, CS, [1; 32])]),
        "{lookup:?}"
    );
    assert!(r.handle_control(q(vec![(0, [1; 32])]), now).is_err());
    // The edge refuses an answer about a chunk it did not ask for.
    let plan = plan(&[&img]);
    let mut s = SenderSession::new(SenderConfig::new("e", "u", "p"), plan, now).unwrap();
    s.handle_control(
        CloudMessage::Welcome {
            endpoint: "c".into(),
            role: "MigrationOperator".into(),
        },
        now,
    )
    .unwrap();
    s.handle_control(
        CloudMessage::PlanAccepted {
            migration_id: "migration-1".into(),
            datastore: "ds1".into(),
            dedup: true,
        },
        now,
    )
    .unwrap();
    assert_eq!(s.work_for(0, 0), Work::Probe);
    let answer = CloudMessage::HashAnswer {
        disk: 0,
        copied: vec![0],
        send: vec![],
        seeded: vec![],
    };
    assert!(matches!(
        s.handle_control(answer, now),
        Err(ProtocolError::OutsidePlan(_))
    ));
}

#[test]
fn a_seeded_first_pass_reports_what_the_seed_saved_apart_from_other_copies() {
    // The seed holds the source as it was; one chunk changed since, and one chunk the
    // seed lacks is held elsewhere in the index.
    let seed = disk_image(84, 20);
    let mut source = seed.clone();
    source[4 * CS as usize + 5] ^= 0x55;
    source[8 * CS as usize..9 * CS as usize].fill(0x17);
    let elsewhere = source[8 * CS as usize..9 * CS as usize].to_vec();
    let mut pair = Pair::new(vec![source.clone()], "secret");
    pair.offer_dedup = true;
    let mut seed_store = store_of(&seed);
    // Chunks 4 and 8 are random, so no other chunk shares their hashes.
    seed_store.remove(&crate::chunk::chunk_hash(&seed[8 * CS as usize..9 * CS as usize]));
    pair.seed_store = seed_store;
    pair.cloud_store = [(crate::chunk::chunk_hash(&elsewhere), elsewhere)].into();
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.dests, vec![source.clone()]);
    assert_eq!(pair.data_frames, 1, "only the changed chunk crosses");
    let non_zero: Vec<usize> = source
        .chunks(CS as usize)
        .enumerate()
        .filter(|(_, c)| !crate::chunk::is_zero(c))
        .map(|(i, _)| i)
        .collect();
    let bytes = |skip: &[usize]| -> u64 {
        non_zero
            .iter()
            .filter(|i| !skip.contains(i))
            .map(|&i| source[i * CS as usize..].len().min(CS as usize) as u64)
            .sum()
    };
    assert_eq!(pair.sender.dedup_bytes(), bytes(&[4]));
    assert_eq!(pair.sender.seeded_bytes(), bytes(&[4, 8]));
}

#[test]
fn a_seeded_offset_that_was_not_copied_is_a_protocol_violation() {
    let img = disk_image(85, 4);
    let now = Instant::now();
    let mut s = SenderSession::new(SenderConfig::new("e", "u", "p"), plan(&[&img]), now).unwrap();
    s.handle_control(
        CloudMessage::Welcome {
            endpoint: "c".into(),
            role: "MigrationOperator".into(),
        },
        now,
    )
    .unwrap();
    s.handle_control(
        CloudMessage::PlanAccepted {
            migration_id: "migration-1".into(),
            datastore: "ds1".into(),
            dedup: true,
        },
        now,
    )
    .unwrap();
    // Read and hash chunk 0 so that it is asked about.
    assert_eq!(s.work_for(0, 0), Work::Probe);
    let first = img[..CS as usize].to_vec();
    s.chunk_probed(0, 0, crate::chunk::chunk_hash(&first));
    let answer = CloudMessage::HashAnswer {
        disk: 0,
        copied: vec![],
        send: vec![0],
        seeded: vec![0],
    };
    assert!(matches!(
        s.handle_control(answer, now),
        Err(ProtocolError::OutsidePlan(m)) if m.contains("seed")
    ));
}

#[test]
fn a_pass_from_a_record_marked_switched_over_asks_without_a_commit_replay() {
    let sources = [disk_image(33, 2)];
    let plan = plan(&sources.iter().collect::<Vec<_>>());
    let now = Instant::now();
    let config = || SenderConfig::new("edge-test", "migrator@cloud.local", "secret");
    let welcome = CloudMessage::Welcome {
        endpoint: "cloud".into(),
        role: "MigrationOperator".into(),
    };
    let first_ask = |marked: bool| {
        let mut s = SenderSession::syncing(config(), plan.clone(), "migration-1".into(), vec![], now).unwrap();
        if marked {
            s.after_switchover();
        }
        s.handle_control(welcome.clone(), now).unwrap();
        assert!(matches!(s.poll_transmit(now), Some(EdgeMessage::Hello { .. })));
        s.poll_transmit(now).expect("the pass asks")
    };
    assert!(matches!(first_ask(false), EdgeMessage::Sync { .. }));
    let ask = first_ask(true);
    assert!(matches!(&ask, EdgeMessage::SyncSwitchedOver { migration_id, .. } if migration_id == "migration-1"));
    // The cloud's driver is told not to replay the commit, and the pass is a delta pass.
    let mut r = welcomed_receiver(now);
    r.handle_control(ask, now).unwrap();
    assert!(r.is_delta());
    let asked = std::iter::from_fn(|| r.poll_event()).find_map(|e| match e {
        ReceiverEvent::ValidateResume { switched_over, .. } => Some(switched_over),
        _ => None,
    });
    assert_eq!(asked, Some(true));
}

#[test]
fn the_request_follows_the_hello_without_waiting_for_the_welcome() {
    // Edge: the plan goes out right behind the hello, before any answer.
    let now = Instant::now();
    let sources = [disk_image(61, 2)];
    let plan = plan(&sources.iter().collect::<Vec<_>>());
    let config = || SenderConfig::new("edge-test", "migrator@cloud.local", "secret");
    let mut s = SenderSession::new(config(), plan.clone(), now).unwrap();
    assert!(matches!(s.poll_transmit(now), Some(EdgeMessage::Hello { .. })));
    assert!(matches!(s.poll_transmit(now), Some(EdgeMessage::Plan(_))));
    assert_eq!(s.poll_transmit(now), None, "one request");
    // A delta pass that ends as a replica: its Sync, whatever was set after construction.
    let mut s = SenderSession::syncing(config(), plan.clone(), "migration-1".into(), vec![], now).unwrap();
    s.finish_as_replica();
    s.after_switchover();
    assert!(matches!(s.poll_transmit(now), Some(EdgeMessage::Hello { .. })));
    assert!(
        matches!(s.poll_transmit(now), Some(EdgeMessage::SyncSwitchedOver { migration_id, .. }) if migration_id == "migration-1")
    );
    // The welcome sends nothing more: the answer to the request comes next.
    s.handle_control(
        CloudMessage::Welcome {
            endpoint: "c".into(),
            role: "r".into(),
        },
        now,
    )
    .unwrap();
    assert_eq!(s.poll_transmit(now), None);
    assert!(matches!(s.poll_event(), Some(SenderEvent::Welcomed { .. })));
    // Cloud: the request that came while the credential was checked waits for it.
    let hello = EdgeMessage::Hello {
        agent: "a".into(),
        user: "u".into(),
        password: "p".into(),
    };
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    r.handle_control(hello.clone(), now).unwrap();
    r.handle_control(EdgeMessage::Plan(plan.clone()), now).unwrap();
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::Authenticate { .. })));
    assert_eq!(r.poll_event(), None, "nothing looks at the plan before the login");
    r.authenticated(Ok("MigrationOperator".into()), "c");
    assert!(matches!(r.poll_transmit(), Some(CloudMessage::Welcome { .. })));
    assert!(matches!(r.poll_event(), Some(ReceiverEvent::ValidatePlan(_))));
    // A refused credential drops it: refused, and nothing else happens.
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    r.handle_control(hello.clone(), now).unwrap();
    r.handle_control(EdgeMessage::Plan(plan.clone()), now).unwrap();
    while r.poll_event().is_some() {}
    r.authenticated(Err((RefusalCode::BadCredentials, "no".into())), "c");
    assert!(matches!(
        r.poll_transmit(),
        Some(CloudMessage::Refused {
            code: RefusalCode::BadCredentials,
            ..
        })
    ));
    assert_eq!(r.poll_event(), None);
    assert!(r.is_finished());
    // One request per connection, early or not.
    let mut r = ReceiverSession::new(ReceiverConfig::default(), now);
    r.handle_control(hello, now).unwrap();
    r.handle_control(EdgeMessage::Plan(plan.clone()), now).unwrap();
    assert!(r.handle_control(EdgeMessage::Validate(plan), now).is_err());
}

#[test]
fn a_migration_with_the_early_request_takes_no_extra_round_trip() {
    // Each step delivers what is queued both ways: the plan reaches the cloud with the
    // hello, so the welcome and the acceptance come back in the same step.
    let mut pair = Pair::new(vec![disk_image(62, 4)], "secret");
    pair.step();
    pair.step();
    assert!(pair.sender.migration_id().is_some(), "accepted after one exchange");
    pair.drive();
    assert!(pair.sender.is_committed(), "{:?}", pair.sender.error());
    assert_eq!(pair.dests, pair.sources);
}
