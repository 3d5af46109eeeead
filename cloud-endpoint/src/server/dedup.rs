//! Deduplication on the cloud side: the index of the chunk hashes of the disks the cloud
//! holds (inventory `chunk_index`), and the copies a `HashQuery` asks for.
//!
//! A chunk is copied only from a disk that the migration's user, or its edge identity
//! (client certificate), lifted: never across tenants. Each copy is read from the disk
//! that holds it, hashed, and written into the staged disk only if its hash is the one
//! the edge sent; the read-back before the commit and the Merkle roots then check it as
//! they check every chunk.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use gateway::chunk::ChunkHash;
use gateway::integrity::DiskHashes;

use crate::datastore::{DiskFile, DiskFormat};
use crate::inventory::{ChunkScope, IndexedDisk};
use crate::Domain;

/// Places tried per chunk: a disk that changed since it was indexed is skipped.
const CANDIDATES: u32 = 3;

/// Who asks: only disks this user or edge lifted are read.
#[derive(Debug, Clone)]
pub struct Requester {
    pub user: String,
    pub edge_cert: String,
    pub migration: String,
    /// The seed the plan named, checked for this user or edge: its disk at the same
    /// offset is tried first, and copies from it are reported as seeded.
    pub seed: Option<std::sync::Arc<super::seed::Seed>>,
}

impl Requester {
    fn scope(&self) -> ChunkScope<'_> {
        ChunkScope {
            user: &self.user,
            edge_cert: &self.edge_cert,
            hash: ChunkHash::CURRENT.name(),
            migration: &self.migration,
        }
    }
}

/// Whether the cloud holds any disk `who` may reuse chunks of: then the edge is told to
/// ask before it sends.
pub fn offered(domain: &Domain, who: &Requester) -> bool {
    domain.inventory.has_reusable_chunks(who.scope()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the chunk index; this migration sends every chunk");
        false
    })
}

/// Copies each of `chunks` (offset, length, hash) of disk `disk` that the seed (at the
/// same offset) or an indexed disk of `who` holds into `target`, verified against its
/// hash after the read. Returns (offset, copied) for every chunk, in order (a chunk not
/// found, unreadable or changed is to be sent), and the offsets copied from the seed.
pub fn copy_chunks(
    domain: &Domain,
    who: &Requester,
    disk: u16,
    target: &DiskFile,
    chunks: &[(u64, u32, [u8; 32])],
) -> (Vec<(u64, bool)>, Vec<u64>) {
    let mut sources: HashMap<PathBuf, Option<DiskFile>> = HashMap::new();
    let mut buf = Vec::new();
    let mut results = Vec::with_capacity(chunks.len());
    let mut seeded = Vec::new();
    for &(offset, len, hash) in chunks {
        if let Some(seed) = &who.seed {
            if super::seed::copy_same_offset(seed, disk, target, (offset, len, hash), &mut buf) {
                results.push((offset, true));
                seeded.push(offset);
                continue;
            }
        }
        let found = domain
            .inventory
            .find_chunk(&hash, len, who.scope(), CANDIDATES)
            .unwrap_or_default();
        let mut copied = false;
        for place in found {
            let source = sources.entry(place.data_path.clone()).or_insert_with(|| {
                let format = place.format.parse::<DiskFormat>().ok()?;
                DiskFile::open_read_only(&place.data_path, place.capacity, format)
                    .map_err(|e| tracing::debug!(error = %e, "an indexed disk cannot be opened"))
                    .ok()
            });
            let Some(source) = source.as_ref() else {
                continue;
            };
            buf.resize(len as usize, 0);
            if source.read_at(&mut buf, place.offset).is_err() || gateway::chunk::chunk_hash(&buf) != hash {
                // Changed (a VM that ran) or shorter since it was indexed: not this one.
                continue;
            }
            match target.write_at(&buf, offset) {
                Ok(()) => {
                    copied = true;
                    // The seed's chunk at another offset (indexed on demand, or by its
                    // lift) still counts as the seed's.
                    if who.seed.as_ref().is_some_and(|s| s.holds(&place.data_path)) {
                        seeded.push(offset);
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, offset, "cannot write a deduplicated chunk; it will be sent");
                    break;
                }
            }
        }
        results.push((offset, copied));
    }
    (results, seeded)
}

/// `[datastore] folder/file` to its path under that datastore of the domain, if it stays
/// inside it.
fn resolve(domain: &Domain, path: &str) -> Option<PathBuf> {
    let (name, rest) = path.strip_prefix('[')?.split_once("] ")?;
    let datastore = domain.datastore_named(name)?;
    let relative = Path::new(rest);
    relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| datastore.root().join(relative))
}

/// The data file and format of a disk the inventory names (`[datastore] folder/file`),
/// if it is one of this endpoint's datastores' files in a format it writes.
pub fn data_file_of(domain: &Domain, path: &str) -> Option<(PathBuf, DiskFormat)> {
    resolve(domain, path).as_deref().and_then(data_file)
}

/// The file holding the data of a disk the inventory names by its descriptor or image,
/// and its format: `<base>.vmdk` keeps its data in `<base>-flat.vmdk`.
fn data_file(descriptor: &Path) -> Option<(PathBuf, DiskFormat)> {
    let ext = descriptor.extension()?.to_str()?;
    match ext {
        "vmdk" => {
            let stem = descriptor.file_stem()?.to_str()?;
            Some((
                descriptor.with_file_name(format!("{stem}-flat.vmdk")),
                DiskFormat::VmdkFlat,
            ))
        }
        "qcow2" => Some((descriptor.to_owned(), DiskFormat::Qcow2)),
        "img" | "raw" => Some((descriptor.to_owned(), DiskFormat::Raw)),
        _ => None,
    }
}

/// The non-zero chunks of a disk's hash table: what is worth indexing.
fn indexable(hashes: &DiskHashes) -> Vec<(u64, u32, [u8; 32])> {
    let (capacity, chunk_size) = hashes.shape();
    let cs = u64::from(chunk_size);
    (0..hashes.chunk_count())
        .filter_map(|i| {
            let hash = hashes.get(i)?;
            (hash != hashes.zero_hash(i)).then(|| {
                let offset = i * cs;
                (offset, (capacity - offset).min(cs) as u32, hash)
            })
        })
        .collect()
}

/// After a commit: indexes the registered VM's disks, so that later migrations of this
/// user or edge can copy their chunks. A failure costs only later deduplication.
pub fn index_committed(domain: &Domain, who: &Requester, vm_id: &str, hashes: &[DiskHashes]) {
    let vm = match domain.inventory.vm(vm_id) {
        Ok(Some(vm)) => vm,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot index the committed VM's chunks");
            return;
        }
    };
    for (i, (disk, table)) in vm.disks.iter().zip(hashes).enumerate() {
        let Some((data_path, format)) = resolve(domain, &disk.path).as_deref().and_then(data_file) else {
            continue;
        };
        let at = DiskAt {
            data_path,
            format,
            capacity: disk.capacity_bytes,
        };
        index(domain, who, Some(vm_id), i as u16, at, table);
    }
}

/// After a replication pass: indexes the replica's staged disks.
pub fn index_replica(domain: &Domain, who: &Requester, disks: &[std::sync::Arc<DiskFile>], hashes: &[DiskHashes]) {
    for (i, (disk, table)) in disks.iter().zip(hashes).enumerate() {
        let at = DiskAt {
            data_path: disk.path().to_owned(),
            format: disk.format(),
            capacity: disk.capacity(),
        };
        index(domain, who, None, i as u16, at, table);
    }
}

/// Where a disk's data is.
struct DiskAt {
    data_path: PathBuf,
    format: DiskFormat,
    capacity: u64,
}

fn index(domain: &Domain, who: &Requester, vm: Option<&str>, disk: u16, at: DiskAt, table: &DiskHashes) {
    let indexed = IndexedDisk {
        migration: &who.migration,
        vm,
        disk,
        data_path: at.data_path,
        format: at.format.as_str(),
        capacity: at.capacity,
        user: &who.user,
        edge_cert: &who.edge_cert,
        hash: ChunkHash::CURRENT.name(),
        chunks: indexable(table),
    };
    if let Err(e) = domain.inventory.index_disk(&indexed) {
        tracing::warn!(error = %e, disk, "cannot index a disk's chunks; later migrations will send them");
    }
}
