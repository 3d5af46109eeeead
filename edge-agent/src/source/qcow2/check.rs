//! Checking at open that a qcow2 image's tables point only inside its file, as `qemu-img
//! check` does for leaks and errors but only for what reading needs: an image cut short (an
//! incomplete copy) is refused before anything moves, naming both sizes, rather than failing
//! partway through a migration and leaving the cloud with half a disk.

use super::reader::{L2_COMPRESSED, L2_ZERO, OFFSET_MASK};
use crate::source::slice::FileSlice;
use crate::source::SourceError;

/// What `check` needs of the image.
pub(super) struct Tables<'a> {
    pub file: &'a FileSlice,
    pub l1: &'a [u64],
    pub cluster_bits: u32,
    /// v3: bit 0 of an L2 entry marks a zero cluster, whose data is not read.
    pub zero_flag: bool,
    pub capacity: u64,
}

/// The furthest byte a table points to, and where the pointer is, for the message.
struct Furthest {
    end: u64,
    what: String,
}

/// Reads every L2 table once (each distinct table, in file order, so a hostile L1 that
/// names one table many times costs one read) and refuses the image if any table or cluster
/// lies past the end of the file.
pub(super) fn check(t: &Tables<'_>) -> Result<(), SourceError> {
    let cluster_size = 1u64 << t.cluster_bits;
    let l2_entries = cluster_size / 8;
    let file_len = t.file.len;
    // QEMU may leave the tail of the last cluster unwritten: that part reads as zeros.
    let limit = file_len.next_multiple_of(cluster_size);
    // Only what lies past the end is recorded; the furthest of it is named.
    let mut furthest: Option<Furthest> = None;
    let mut past_end = |end: u64, what: &dyn Fn() -> String| {
        if furthest.as_ref().is_none_or(|f| end > f.end) {
            furthest = Some(Furthest { end, what: what() });
        }
    };
    let mut tables: Vec<(u64, usize)> =
        t.l1.iter()
            .enumerate()
            .map(|(index, entry)| (entry & OFFSET_MASK, index))
            .filter(|&(offset, _)| offset != 0)
            .collect();
    tables.sort_unstable();
    tables.dedup_by_key(|(offset, _)| *offset);
    let mut table = vec![0; cluster_size as usize];
    for (offset, index) in tables {
        if !offset.is_multiple_of(cluster_size) {
            // The read reports it, as it always did; nothing here is about the file's length.
            continue;
        }
        if offset + cluster_size > file_len {
            past_end(offset + cluster_size, &|| {
                format!("L1 entry {index}: an L2 table at offset {offset}")
            });
            continue;
        }
        t.file
            .read_exact_at(&mut table, offset)
            .map_err(|source| SourceError::Io {
                path: t.file.path.clone(),
                action: "read the qcow2 image's L2 tables",
                source,
            })?;
        let first_guest = (index as u64) * l2_entries * cluster_size;
        for (i, word) in table.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes(word.try_into().unwrap_or_default());
            let guest = first_guest + i as u64 * cluster_size;
            if entry == 0 || guest >= t.capacity {
                continue;
            }
            if entry & L2_COMPRESSED != 0 {
                let x = 62 - (t.cluster_bits - 8);
                let data = entry & ((1 << x) - 1);
                // Its sector count may run past the end of the file: only the start counts.
                if data >= file_len {
                    past_end(data + 1, &|| {
                        format!("the compressed cluster at guest offset {guest}: data at offset {data}")
                    });
                }
                continue;
            }
            let host = entry & OFFSET_MASK;
            if host == 0 || (t.zero_flag && entry & L2_ZERO != 0) {
                continue;
            }
            let end = host + cluster_size.min(t.capacity - guest);
            if end > limit {
                past_end(end, &|| {
                    format!("the cluster at guest offset {guest}: data at offset {host}")
                });
            }
        }
    }
    match furthest {
        Some(Furthest { end, what }) => Err(SourceError::BadImage {
            path: t.file.path.clone(),
            message: format!(
                "the file is {file_len} bytes, but its tables point to data up to byte {end} \
                 ({what}): the image is cut short (an incomplete copy?) or corrupt; copy it again \
                 from the source, and check it with `qemu-img check`"
            ),
        }),
        None => Ok(()),
    }
}
