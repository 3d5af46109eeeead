//! An explicit seed (`edge-agent replicate --seed`): a VM the cloud holds, named by the
//! plan, whose disks seed a replication's first pass.
//!
//! The seed is checked before anything is staged (it exists, the same user or edge
//! registered it: the tenancy rule of deduplication, and its disks have the plan's count
//! and sizes), then indexed at the plan's chunk size if nothing indexed it so (a VM
//! lifted with other chunks, or registered without a lift): its disks are read and
//! hashed in the cloud, one seed at a time, stopping when the edge goes away. The index
//! is written in one transaction at the end, so a stop leaves nothing half-indexed.
//! During the pass, a chunk is first looked for at the same offset of the seed's disk
//! (what a clone keeps), then anywhere in the index, as deduplication does.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use gateway::chunk::ChunkHash;
use gateway::plan::MigrationPlan;

use crate::datastore::{DiskFile, DiskFormat};
use crate::inventory::{seed_disk_number, IndexedDisk, Principal, VmRecord};
use crate::Domain;

/// One seed indexing at a time on an endpoint: it reads whole disks, and two at once
/// would only share the datastore's bandwidth. A second waits (cancellably).
static INDEXING: Mutex<()> = Mutex::new(());

/// A seed that passed the checks: its VM and where each disk's data is.
#[derive(Debug)]
pub struct Seed {
    pub vm_id: String,
    pub vm_name: String,
    /// The migration that registered it, and whose it is: the on-demand index is
    /// recorded under them, so only the same user or edge finds it.
    owner_migration: String,
    owner_user: String,
    owner_edge_cert: String,
    /// Disk `i` of the seed, opened read-only (a write through it fails).
    pub disks: Vec<DiskFile>,
}

impl Seed {
    /// Whether `path` is the data file of one of the seed's disks.
    pub fn holds(&self, path: &std::path::Path) -> bool {
        self.disks.iter().any(|d| d.path() == path)
    }
}

/// Checks the seed `plan` names for `principal` on the edge of certificate `edge_cert`,
/// and opens its disks. Every problem is listed, each saying what to do.
pub fn resolve(
    domain: &Domain,
    principal: &Principal,
    edge_cert: &str,
    plan: &MigrationPlan,
) -> Result<Option<Seed>, Vec<String>> {
    let Some(name) = plan.seed.as_deref() else {
        return Ok(None);
    };
    let leave_out = "or leave --seed out (deduplication still copies what this user or edge lifted before)";
    let inv = &domain.inventory;
    let found = inv
        .vm(name)
        .and_then(|vm| match vm {
            Some(vm) => Ok(Some(vm)),
            None => inv.vm_by_name(name),
        })
        .map_err(|e| vec![format!("cannot read the inventory to find seed {name:?}: {e}; retry")])?;
    let Some(vm) = found else {
        return Err(vec![format!(
            "seed {name:?} is not a VM of this cloud: name a registered VM by its name or id \
             (`cloud-endpoint inventory` or GET /api/vcenter/vm lists them), {leave_out}"
        )]);
    };
    let owner = inv
        .vm_owner(&vm.id)
        .map_err(|e| vec![format!("cannot read who registered seed {name:?}: {e}; retry")])?;
    let Some(owner) = owner else {
        return Err(vec![format!(
            "seed {name:?} ({}) has no migration record saying who registered it, so no user may seed from it: \
             name a VM this user or edge lifted, {leave_out}",
            vm.id
        )]);
    };
    let same_edge = !edge_cert.is_empty() && owner.edge_cert.as_deref() == Some(edge_cert);
    if owner.user != principal.user && !same_edge {
        // Nothing of the seed's disks is read, and nothing about them is said, beyond
        // what the inventory already shows every user (its name).
        return Err(vec![format!(
            "seed {name:?} ({}) was registered by another user from another edge; a seed must be a VM that user {} \
             or this edge lifted (deduplication never reads another tenant's disks): name one of yours, {leave_out}",
            vm.id, principal.user
        )]);
    }
    let mut problems = Vec::new();
    check_shape(&vm, plan, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut disks = Vec::new();
    for disk in &vm.disks {
        match open_disk(domain, &disk.path, disk.capacity_bytes) {
            Ok(file) => disks.push(file),
            Err(why) => problems.push(format!(
                "seed {name:?} ({}): its disk {} ({}) cannot be read: {why}; name another seed, {leave_out}",
                vm.id, disk.key, disk.path
            )),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Some(Seed {
        vm_id: vm.id.clone(),
        vm_name: vm.name.clone(),
        owner_migration: owner.migration,
        owner_user: owner.user,
        owner_edge_cert: owner.edge_cert.unwrap_or_default(),
        disks,
    }))
}

/// The seed's disks must be the plan's, disk for disk: as many, each of the same size.
fn check_shape(vm: &VmRecord, plan: &MigrationPlan, problems: &mut Vec<String>) {
    let describe = |sizes: Vec<(&str, u64)>| {
        sizes
            .iter()
            .map(|(k, c)| format!("{k} {c} B"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let seed: Vec<(&str, u64)> = vm.disks.iter().map(|d| (d.key.as_str(), d.capacity_bytes)).collect();
    let source: Vec<(&str, u64)> = plan.vm.disks.iter().map(|d| (d.key.as_str(), d.capacity)).collect();
    let same = seed.len() == source.len() && seed.iter().zip(&source).all(|(a, b)| a.1 == b.1);
    if !same {
        problems.push(format!(
            "seed {:?} ({}) has {} disk(s) ({}) and this VM {} ({}): a seed must have as many disks, each of the same \
             size, in the same order; name a seed cloned from the same template, or leave --seed out",
            vm.name,
            vm.id,
            seed.len(),
            describe(seed.clone()),
            source.len(),
            describe(source.clone()),
        ));
    }
}

/// Opens a disk the inventory names (`[datastore] folder/file`) read-only.
fn open_disk(domain: &Domain, path: &str, capacity: u64) -> Result<DiskFile, String> {
    let (data_path, format): (PathBuf, DiskFormat) = super::dedup::data_file_of(domain, path)
        .ok_or_else(|| "it is not a file of a datastore of this endpoint in a format it writes".to_owned())?;
    DiskFile::open_read_only(&data_path, capacity, format).map_err(|e| e.to_string())
}

/// Why the seed could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("the edge went away while the seed was being hashed; nothing was indexed")]
    Cancelled,
    #[error("cannot read seed {seed}'s disk {disk} at offset {offset}: {error}; check the datastore, then retry")]
    Read {
        seed: String,
        disk: usize,
        offset: u64,
        error: std::io::Error,
    },
    #[error("cannot record seed {seed}'s index: {error}; retry")]
    Record { seed: String, error: String },
}

/// Indexes the seed's disks at `chunk_size` unless they are already (by its lift, or an
/// earlier seeding at this size). `cancelled` is polled between chunks. Returns the
/// bytes hashed (0 when nothing needed to be).
pub fn ensure_indexed(
    domain: &Domain,
    seed: &Seed,
    chunk_size: u32,
    cancelled: &dyn Fn() -> bool,
) -> Result<u64, IndexError> {
    let hash = ChunkHash::CURRENT.name();
    let disks = seed.disks.len() as u16;
    let indexed = |domain: &Domain| {
        domain
            .inventory
            .vm_indexed_at(&seed.vm_id, disks, chunk_size, hash)
            .unwrap_or(false)
    };
    if indexed(domain) {
        return Ok(0);
    }
    let _one_at_a_time = loop {
        match INDEXING.try_lock() {
            Ok(guard) => break guard,
            Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if cancelled() {
                    return Err(IndexError::Cancelled);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    // Another connection may have indexed it while this one waited.
    if indexed(domain) {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    let tables = hash_disks(seed, chunk_size, cancelled)?;
    let hashed: u64 = seed.disks.iter().map(|d| d.capacity()).sum();
    let entries: Vec<IndexedDisk<'_>> = tables
        .into_iter()
        .enumerate()
        .map(|(i, chunks)| IndexedDisk {
            migration: &seed.owner_migration,
            vm: Some(&seed.vm_id),
            disk: seed_disk_number(i as u16),
            data_path: seed.disks[i].path().to_owned(),
            format: seed.disks[i].format().as_str(),
            capacity: seed.disks[i].capacity(),
            user: &seed.owner_user,
            edge_cert: &seed.owner_edge_cert,
            hash,
            chunks,
        })
        .collect();
    for entry in &entries {
        domain.inventory.index_disk(entry).map_err(|e| IndexError::Record {
            seed: seed.vm_name.clone(),
            error: e.to_string(),
        })?;
    }
    tracing::info!(
        seed = %seed.vm_id,
        chunk_size,
        bytes = hashed,
        ms = started.elapsed().as_millis() as u64,
        "seed indexed at the replication's chunk size"
    );
    Ok(hashed)
}

/// (offset, length, hash) of every non-zero chunk of one disk: what the index records.
type ChunkTable = Vec<(u64, u32, [u8; 32])>;

/// The [`ChunkTable`] of each of the seed's disks.
fn hash_disks(seed: &Seed, chunk_size: u32, cancelled: &dyn Fn() -> bool) -> Result<Vec<ChunkTable>, IndexError> {
    let cs = u64::from(chunk_size);
    let mut buf = vec![0u8; chunk_size as usize];
    let mut tables = Vec::with_capacity(seed.disks.len());
    for (i, disk) in seed.disks.iter().enumerate() {
        let mut chunks = Vec::new();
        let mut offset = 0;
        while offset < disk.capacity() {
            if cancelled() {
                return Err(IndexError::Cancelled);
            }
            let len = (disk.capacity() - offset).min(cs) as usize;
            let chunk = &mut buf[..len];
            disk.read_at(chunk, offset).map_err(|error| IndexError::Read {
                seed: seed.vm_name.clone(),
                disk: i,
                offset,
                error,
            })?;
            if !gateway::chunk::is_zero(chunk) {
                chunks.push((offset, len as u32, gateway::chunk::chunk_hash(chunk)));
            }
            offset += cs;
        }
        tables.push(chunks);
    }
    Ok(tables)
}

/// Copies the chunk `(offset, len, hash)` of disk `disk` from the same offset of the
/// seed's disk into `target`, if it holds those bytes now. `buf` is scratch space.
pub fn copy_same_offset(
    seed: &Seed,
    disk: u16,
    target: &DiskFile,
    (offset, len, hash): (u64, u32, [u8; 32]),
    buf: &mut Vec<u8>,
) -> bool {
    let Some(source) = seed.disks.get(usize::from(disk)) else {
        return false;
    };
    buf.resize(len as usize, 0);
    if source.read_at(buf, offset).is_err() || gateway::chunk::chunk_hash(buf) != hash {
        return false;
    }
    match target.write_at(buf, offset) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, offset, "cannot write a seeded chunk; it will be sent");
            false
        }
    }
}
