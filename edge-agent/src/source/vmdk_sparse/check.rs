//! Checking at open that a sparse extent's grain tables point only inside its file.

use super::{corrupt, u32_at, Layout, SECTOR};
use crate::source::slice::FileSlice;
use crate::source::SourceError;

/// Grain tables are read this many bytes at a time when they are checked at open.
const GT_CHECK_BATCH: u64 = 1 << 20;

impl Layout {
    /// Reads every grain table and checks that each grain it points to lies within the file,
    /// so that a file cut short (an incomplete copy) is refused before anything moves, naming
    /// both sizes, rather than failing partway through a migration. `zero_gte`: an entry of 1
    /// is a zero grain. `compressed`: only a grain's marker is checked (its length is in the
    /// marker; a cut-short streamOptimized file has also lost its footer, refused for that).
    pub(super) fn check_grains(
        &self,
        slice: &FileSlice,
        gd: &[u32],
        zero_gte: bool,
        compressed: bool,
    ) -> Result<(), SourceError> {
        let table_bytes = self.gtes_per_gt * 4;
        let grain_bytes = self.grain_sectors * SECTOR;
        let capacity = self.capacity_sectors * SECTOR;
        let mut tables: Vec<(u64, usize)> = gd
            .iter()
            .enumerate()
            .filter(|(_, &sector)| sector != 0)
            .map(|(index, &sector)| (u64::from(sector) * SECTOR, index))
            .collect();
        tables.sort_unstable();
        // (needed end, table, entry, sector) of the grain that reaches furthest.
        let mut furthest: Option<(u64, usize, usize, u32)> = None;
        let mut i = 0;
        while i < tables.len() {
            // A run of tables that lie one after the other, read at once.
            let mut run = 1;
            while i + run < tables.len()
                && tables[i + run].0 == tables[i].0 + run as u64 * table_bytes
                && (run as u64 + 1) * table_bytes <= GT_CHECK_BATCH
            {
                run += 1;
            }
            // read_gd checked that every table lies within the file.
            let bytes = slice.read_vec(tables[i].0, run * table_bytes as usize)?;
            for (k, table) in bytes.chunks_exact(table_bytes as usize).enumerate() {
                let index = tables[i + k].1;
                for (entry, word) in table.chunks_exact(4).enumerate() {
                    let sector = u32_at(word, 0);
                    if sector == 0 || (sector == 1 && zero_gte) {
                        continue;
                    }
                    let grain = index as u64 * self.gtes_per_gt + entry as u64;
                    // The last grain of a disk may be stored only up to the capacity.
                    let len = if compressed {
                        12
                    } else {
                        grain_bytes.min(capacity.saturating_sub(grain * grain_bytes)).max(1)
                    };
                    let end = u64::from(sector) * SECTOR + len;
                    if furthest.is_none_or(|(far, ..)| end > far) {
                        furthest = Some((end, index, entry, sector));
                    }
                }
            }
            i += run;
        }
        match furthest {
            Some((end, table, entry, sector)) if end > slice.len => Err(corrupt(
                &slice.path,
                format!(
                    "the file is {} bytes, but its grain tables point to data up to byte {end} \
                     (grain table {table} entry {entry}: sector {sector}): the file is cut short \
                     (an incomplete copy?) or corrupt; copy it again from the source datastore",
                    slice.len
                ),
            )),
            _ => Ok(()),
        }
    }
}
