//! SEsparse extents: the snapshot delta format of VMFS 6 and of every disk over 2 TB
//! (`createType="seSparse"`, extent type SESPARSE). VMware does not publish the format;
//! what is read here is the layout QEMU's read-only driver also reads.
//!
//! ```text
//! sector 0   constant header: magic 0xcafebabe, version 2.1, capacity (sectors), grain size
//!            (8 sectors: 4 KiB grains), grain table size (64 sectors: 4096 u64 entries, so
//!            one table maps 16 MiB), flags, then (offset, size) in sectors of each region:
//!            volatile header, journal header, journal, grain directory, grain tables,
//!            free bitmap, back map, grains
//! volatile   magic 0xcafecafe, ..., replay_journal (non-zero: the journal holds writes
//!            that were never applied, so the tables are not to be trusted)
//! directory  u64 entries: 0 no table; 0x1000_0000_nnnn_nnnn table n of the tables region
//! tables     u64 entries: top nibble 0 unallocated (the parent's bytes), 1 unmapped and
//!            2 zero (both read as zeros), 3 allocated (grain number in the other 60 bits)
//! ```
//!
//! Only reading: the agent never writes a source.

use super::grains::{ExtentFile, SparseExtent};
use super::{corrupt, read_sector, u64_at, Layout, SECTOR};
use crate::source::slice::FileSlice;
use crate::source::SourceError;

const CONST_MAGIC: u64 = 0xcafe_babe;
const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
const VERSION: u64 = 0x0000_0002_0000_0001;
const GRAIN_SECTORS: u64 = 8;
const TABLE_SECTORS: u64 = 64;
const GTES_PER_GT: u64 = TABLE_SECTORS * SECTOR / 8;
/// A directory entry that names a table has these 32 top bits; the low 32 are its number.
const TABLE_ALLOCATED: u64 = 0x1000_0000;
/// SEsparse disks stop just short of 64 TiB: 4 Mi tables of 16 MiB.
const MAX_TABLES: u64 = 1 << 22;

/// True if `head` (at least 8 bytes of a file) starts like an SEsparse extent.
pub(in crate::source) fn is_se_sparse(head: &[u8]) -> bool {
    head.len() >= 8 && u64_at(head, 0) == CONST_MAGIC
}

/// Opens an SEsparse extent: checks both headers, reads the grain directory and checks that
/// every table it names lies within the file. Grain entries are checked as they are read.
pub(in crate::source) fn open(slice: FileSlice) -> Result<SparseExtent, SourceError> {
    let path = slice.path.clone();
    let bad = |message: String| corrupt(&path, message);
    let unsupported = |what: String| SourceError::Unsupported {
        path: path.clone(),
        what,
        advice: "consolidate the VM's snapshots in vSphere first (or export the disk with \
                 `vmkfstools -i` to a thick disk) and migrate the result"
            .to_owned(),
    };
    if slice.len < 2 * SECTOR {
        return Err(bad(format!(
            "{} bytes is too short for an SEsparse extent (its two headers alone are 1024 bytes); the file is truncated",
            slice.len
        )));
    }
    let header = read_sector(&slice, 0)?;
    let field = |i: usize| u64_at(&header, i * 8);
    if field(0) != CONST_MAGIC {
        return Err(bad("not an SEsparse extent (no 0xcafebabe magic)".to_owned()));
    }
    let version = field(1);
    if version != VERSION {
        return Err(unsupported(format!(
            "SEsparse version {version:#x} (this agent reads 2.1)"
        )));
    }
    let capacity_sectors = field(2);
    let (grain, table, flags) = (field(3), field(4), field(5));
    if grain != GRAIN_SECTORS || table != TABLE_SECTORS {
        return Err(unsupported(format!(
            "an SEsparse extent with grains of {grain} sectors and tables of {table} sectors \
             (every SEsparse disk VMware writes has 8 and 64)"
        )));
    }
    if flags != 0 || (6..10).any(|i| field(i) != 0) {
        return Err(unsupported(format!(
            "an SEsparse extent with flags {flags:#x} or reserved fields set (a newer variant)"
        )));
    }
    let region = |i: usize| (field(i), field(i + 1));
    let (volatile_at, _) = region(10);
    let (gd_at, gd_sectors) = region(16);
    let (tables_at, tables_sectors) = region(18);
    let (grains_at, grains_sectors) = region(24);
    let within = |what: &str, at: u64, sectors: u64| -> Result<(), SourceError> {
        let end = at.checked_add(sectors).and_then(|end| end.checked_mul(SECTOR));
        if at == 0 || end.is_none_or(|end| end > slice.len) {
            return Err(bad(format!(
                "its {what} ({sectors} sectors at sector {at}) does not lie within the file ({} bytes): \
                 the file is truncated or corrupt",
                slice.len
            )));
        }
        Ok(())
    };
    within("volatile header", volatile_at, 1)?;
    within("grain directory", gd_at, gd_sectors)?;
    let volatile = read_sector(&slice, volatile_at * SECTOR)?;
    if u64_at(&volatile, 0) != VOLATILE_MAGIC {
        return Err(bad(
            "its volatile header has no 0xcafecafe magic: the file is corrupt".to_owned()
        ));
    }
    if u64_at(&volatile, 24) != 0 {
        return Err(SourceError::Unsupported {
            path: path.clone(),
            what: "an SEsparse extent whose journal was not replayed (the VM or host stopped \
                   uncleanly while it was in use)"
                .to_owned(),
            advice: "power the VM on and off once in vSphere so that ESXi replays the journal, \
                     or consolidate its snapshots, then migrate again"
                .to_owned(),
        });
    }
    let capacity = capacity_sectors.checked_mul(SECTOR).filter(|&c| c > 0).ok_or_else(|| {
        bad(format!(
            "capacity {capacity_sectors} sectors is not a possible disk size: the header is corrupt"
        ))
    })?;
    let tables = capacity_sectors.div_ceil(GRAIN_SECTORS).div_ceil(GTES_PER_GT);
    if tables > MAX_TABLES || tables > gd_sectors.saturating_mul(SECTOR / 8) {
        return Err(bad(format!(
            "capacity {capacity_sectors} sectors needs {tables} grain tables, but its grain directory \
             has room for {} (at most {MAX_TABLES}): the header is corrupt",
            gd_sectors.saturating_mul(SECTOR / 8)
        )));
    }
    let directory = slice.read_vec(gd_at * SECTOR, (tables * 8) as usize)?;
    let table_count = tables_sectors / TABLE_SECTORS;
    let mut gd = Vec::with_capacity(tables as usize);
    for (index, word) in directory.chunks_exact(8).enumerate() {
        let entry = u64_at(word, 0);
        if entry == 0 {
            gd.push(0);
            continue;
        }
        let number = entry & 0xffff_ffff;
        if entry >> 32 != TABLE_ALLOCATED || number >= table_count {
            return Err(bad(format!(
                "grain directory entry {index} is {entry:#018x}, which names no table of the {table_count} \
                 the file holds: the file is corrupt"
            )));
        }
        gd.push(tables_at + number * TABLE_SECTORS);
    }
    if gd.iter().any(|&sector| sector != 0) {
        within("grain tables", tables_at, tables_sectors)?;
    }
    if grains_at == 0 || grains_at.checked_add(grains_sectors).is_none() {
        return Err(bad(format!(
            "its grains region ({grains_sectors} sectors at sector {grains_at}) is impossible: the header is corrupt"
        )));
    }
    let layout = Layout {
        capacity_sectors,
        grain_sectors: GRAIN_SECTORS,
        gtes_per_gt: GTES_PER_GT,
        gd_sector: gd_at,
    };
    Ok(SparseExtent::se_sparse(
        ExtentFile::Open(slice),
        capacity,
        layout,
        gd.into(),
        grains_at,
    ))
}

#[cfg(test)]
#[path = "se_sparse_tests.rs"]
mod tests;
