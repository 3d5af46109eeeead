//! The deduplication index: which disks the cloud holds hold a chunk of a given hash,
//! and whose they are.
//!
//! The rule, checked in the query itself: a chunk is reused only from a disk that the
//! same user lifted, or that the same edge identity (client certificate) lifted. Nothing
//! is reused across tenants, and the index answers nothing about other users' disks.

use std::path::PathBuf;

use crate::store_params;

use super::{Inventory, InventoryError};

/// One disk to index: where its data is and whose it is.
#[derive(Debug, Clone)]
pub struct IndexedDisk<'a> {
    pub migration: &'a str,
    /// The registered VM holding the disk; `None` for a replica.
    pub vm: Option<&'a str>,
    pub disk: u16,
    /// The file holding the disk's data (a VMDK's flat extent, a qcow2 or raw image).
    pub data_path: PathBuf,
    /// `vmdk`, `qcow2` or `raw` (the datastore's format names).
    pub format: &'a str,
    pub capacity: u64,
    pub user: &'a str,
    pub edge_cert: &'a str,
    /// The chunk hash's name (`blake3`): an index of another hash is never used.
    pub hash: &'a str,
    /// (offset, length, hash) of each chunk worth indexing (zero chunks never are).
    pub chunks: Vec<(u64, u32, [u8; 32])>,
}

/// Whose disks a look-up may read: those `user` or `edge_cert` lifted, indexed with the
/// chunk hash `hash`, other than `migration`'s own.
#[derive(Debug, Clone, Copy)]
pub struct ChunkScope<'a> {
    pub user: &'a str,
    pub edge_cert: &'a str,
    pub hash: &'a str,
    pub migration: &'a str,
}

/// Where a chunk with the asked hash is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSource {
    pub data_path: PathBuf,
    pub format: String,
    pub capacity: u64,
    pub offset: u64,
}

impl Inventory {
    /// Records (or replaces) the index of one disk of `disk.migration`.
    pub fn index_disk(&self, disk: &IndexedDisk<'_>) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM chunk_source WHERE migration = ?1 AND disk = ?2",
                store_params![disk.migration, disk.disk],
            )?;
            let source: i64 = tx.query_row(
                "INSERT INTO chunk_source (migration, vm, disk, data_path, format, capacity, user_name, edge_cert, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
                store_params![
                    disk.migration,
                    disk.vm,
                    disk.disk,
                    disk.data_path.to_string_lossy(),
                    disk.format,
                    i64::try_from(disk.capacity).unwrap_or(i64::MAX),
                    disk.user,
                    disk.edge_cert,
                    disk.hash
                ],
                |row| row.get(0),
            )?;
            for (offset, len, hash) in &disk.chunks {
                tx.execute(
                    "INSERT INTO chunk_index (hash, source, \"offset\", len) VALUES (?1, ?2, ?3, ?4)",
                    store_params![&hash[..], source, i64::try_from(*offset).unwrap_or(i64::MAX), len],
                )?;
            }
            Ok(())
        })
    }

    /// Forgets the index of `migration`'s disks (discarded, or its files moved).
    pub fn drop_chunk_sources(&self, migration: &str) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM chunk_source WHERE migration = ?1",
                store_params![migration],
            )?;
            Ok(())
        })
    }

    /// Whether any disk of `scope` is indexed.
    pub fn has_reusable_chunks(&self, scope: ChunkScope<'_>) -> Result<bool, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM chunk_source
                  WHERE hash = ?3 AND migration != ?4 AND (user_name = ?1 OR edge_cert = ?2))",
                store_params![scope.user, scope.edge_cert, scope.hash, scope.migration],
                |row| row.get(0),
            )?)
        })
    }

    /// Up to `limit` places holding a chunk of `len` bytes with `chunk_hash`, on disks of
    /// `scope`. Newest disks first.
    pub fn find_chunk(
        &self,
        chunk_hash: &[u8; 32],
        len: u32,
        scope: ChunkScope<'_>,
        limit: u32,
    ) -> Result<Vec<ChunkSource>, InventoryError> {
        self.read(|tx| {
            let rows = tx.query_map(
                "SELECT s.data_path, s.format, s.capacity, i.\"offset\" FROM chunk_index i
                   JOIN chunk_source s ON s.id = i.source
                  WHERE i.hash = ?1 AND i.len = ?2 AND s.hash = ?5 AND s.migration != ?6
                    AND (s.user_name = ?3 OR s.edge_cert = ?4)
                  ORDER BY s.id DESC LIMIT ?7",
                store_params![
                    &chunk_hash[..],
                    len,
                    scope.user,
                    scope.edge_cert,
                    scope.hash,
                    scope.migration,
                    limit
                ],
                |row| {
                    Ok(ChunkSource {
                        data_path: PathBuf::from(row.get::<String>(0)?),
                        format: row.get(1)?,
                        capacity: u64::try_from(row.get::<i64>(2)?).unwrap_or(0),
                        offset: u64::try_from(row.get::<i64>(3)?).unwrap_or(0),
                    })
                },
            )?;
            Ok(rows)
        })
    }

    /// Adds bytes one connection of `migration` copied inside the cloud instead of
    /// receiving them (a replication adds each pass's).
    pub fn add_dedup_bytes(&self, migration: &str, bytes: u64) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE migration SET dedup_bytes = COALESCE(dedup_bytes, 0) + ?2 WHERE id = ?1",
                store_params![migration, i64::try_from(bytes).unwrap_or(i64::MAX)],
            )?;
            Ok(())
        })
    }
}

/// Who registered a VM: the migration that brought it in (a lift, a switchover, a live
/// migration, or a tool that registered it through [`Inventory::register_vm`]), and that
/// migration's user and edge certificate. A seed is read only for the same user or edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOwner {
    pub migration: String,
    pub user: String,
    pub edge_cert: Option<String>,
}

/// The `disk` number under which a VM's disk `i` is indexed on demand for a seed, at a
/// chunk size other than its lift's (or because nothing indexed it): apart from the
/// numbers of its own disks (below [`gateway::plan::MAX_DISKS`]), so the index its lift
/// made stays. One on-demand size per VM: seeding at another size replaces it.
pub fn seed_disk_number(disk: u16) -> u16 {
    gateway::plan::MAX_DISKS as u16 + disk
}

impl Inventory {
    /// Who registered `vm_id`; `None` for a VM no migration record names.
    pub fn vm_owner(&self, vm_id: &str) -> Result<Option<VmOwner>, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row_opt(
                "SELECT id, user_name, edge_cert FROM migration WHERE vm = ?1",
                store_params![vm_id],
                |row| {
                    Ok(VmOwner {
                        migration: row.get(0)?,
                        user: row.get(1)?,
                        edge_cert: row.get(2)?,
                    })
                },
            )?)
        })
    }

    /// Whether every disk of `vm_id` (`disks` of them) is indexed with chunks of
    /// `chunk_size` bytes and the hash `hash`, by its lift or on demand for a seed. A disk
    /// indexed with no chunk of that size (all zero, or smaller than one chunk) counts
    /// as not indexed: hashing it again costs little.
    pub fn vm_indexed_at(&self, vm_id: &str, disks: u16, chunk_size: u32, hash: &str) -> Result<bool, InventoryError> {
        self.read(|tx| {
            for disk in 0..disks {
                let found: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM chunk_source s JOIN chunk_index i ON i.source = s.id
                      WHERE s.vm = ?1 AND s.hash = ?2 AND (s.disk = ?3 OR s.disk = ?4) AND i.len = ?5)",
                    store_params![vm_id, hash, disk, seed_disk_number(disk), chunk_size],
                    |row| row.get(0),
                )?;
                if !found {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }
}
