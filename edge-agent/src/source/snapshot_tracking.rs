//! Changed-block tracking for a replication of VMware files, from the snapshot chain.
//!
//! A running VMware VM writes only the newest delta of each disk's snapshot chain; every
//! disk below it is frozen. A pass reads the frozen part, so what it reads does not change
//! under it, and the next pass knows what changed since without reading anything else:
//! the deltas frozen since then hold exactly the grains the VM wrote in between (VMware's
//! snapshot-based changed-block model). A chain that is not the one recorded (a snapshot
//! deleted or consolidated, a frozen disk written, the disk resized) cannot say what
//! changed: the pass then compares every chunk, and says why.

use std::ops::Range;

use super::{open_source_disk, ChainLink, DiskReader, SourceDisk, SourceError};

/// How one disk is read by a replication pass.
#[derive(Debug)]
pub struct DiskPass {
    /// What the pass reads: the newest frozen disk of the chain, with its parents.
    pub reader: Box<dyn DiskReader>,
    /// The frozen part of the chain the pass reads, newest first: the record the next pass
    /// compares against. Empty when nothing is frozen (a running VM without a snapshot).
    pub frozen: Vec<ChainLink>,
    /// The chunks that may differ from the last pass; `None`: any chunk may, compare all.
    pub changed: Option<ChangedChunks>,
    /// For the operator: what the tracking found, or why every chunk is compared.
    pub note: String,
}

/// Chunk indices of one disk that may have changed, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedChunks(Vec<u64>);

impl ChangedChunks {
    /// The chunks of `chunk_size` bytes that `ranges` (sorted byte ranges) touch.
    pub fn covering(ranges: &[Range<u64>], chunk_size: u64) -> ChangedChunks {
        let mut chunks: Vec<u64> = Vec::new();
        for range in ranges.iter().filter(|r| r.start < r.end) {
            let first = range.start / chunk_size;
            let last = (range.end - 1) / chunk_size;
            let from = chunks.last().map_or(first, |&l| first.max(l + 1));
            chunks.extend(from..=last);
        }
        ChangedChunks(chunks)
    }

    pub fn contains(&self, index: u64) -> bool {
        self.0.binary_search(&index).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn union(mut self, other: ChangedChunks) -> ChangedChunks {
        self.0.extend(other.0);
        self.0.sort_unstable();
        self.0.dedup();
        self
    }
}

/// Plans how a replication pass reads `disk`.
///
/// `running`: the VM holds its lock, so the newest delta is being written and only what
/// is below it is read. `previous`: the frozen chain the last pass read (None when no pass
/// is recorded). A disk that is not a VMDK chain is read whole and compared chunk by chunk.
pub fn plan_disk_pass(
    disk: &SourceDisk,
    running: bool,
    previous: Option<&[ChainLink]>,
    chunk_size: u64,
) -> Result<DiskPass, SourceError> {
    let live = open_source_disk(disk)?;
    let chain = live.snapshot_chain();
    let untracked = |reader: Box<dyn DiskReader>, note: String| DiskPass {
        reader,
        frozen: Vec::new(),
        changed: None,
        note,
    };
    if chain.is_empty() || disk.archive_member.is_some() {
        return Ok(untracked(
            live,
            format!(
                "{}: not a VMDK snapshot chain, every chunk is read and compared",
                disk.key
            ),
        ));
    }
    let (reader, frozen) = if running {
        if chain.len() < 2 {
            return Ok(untracked(
                live,
                format!(
                    "{}: the VM runs and its disk has no snapshot, so the pass reads a disk being \
                     written and the next pass compares every chunk; take a snapshot of the VM \
                     before each pass to send only what changed",
                    disk.key
                ),
            ));
        }
        let below = SourceDisk {
            path: chain[1].path.clone(),
            ..disk.clone()
        };
        let reader = open_source_disk(&below)?;
        if reader.capacity() != disk.capacity {
            return Ok(untracked(
                live,
                format!(
                    "{}: the disk was resized after its newest snapshot ({} bytes below it, {} \
                     now), so the pass reads the running disk and the next one compares every chunk",
                    disk.key,
                    reader.capacity(),
                    disk.capacity
                ),
            ));
        }
        (reader, chain[1..].to_vec())
    } else {
        (live, chain)
    };
    let Some(previous) = previous.filter(|p| !p.is_empty()) else {
        return Ok(DiskPass {
            reader,
            frozen,
            changed: None,
            note: format!(
                "{}: no frozen snapshot chain recorded by an earlier pass, every chunk is read and compared",
                disk.key
            ),
        });
    };
    let Some(since) = frozen.len().checked_sub(previous.len()) else {
        return Ok(DiskPass {
            reader,
            note: format!(
                "{}: the snapshot chain is shorter than at the last pass (snapshots were deleted or \
                 consolidated), every chunk is read and compared",
                disk.key
            ),
            frozen,
            changed: None,
        });
    };
    if let Some(why) = first_difference(&frozen[since..], previous) {
        return Ok(DiskPass {
            reader,
            note: format!("{}: {why}, every chunk is read and compared", disk.key),
            frozen,
            changed: None,
        });
    }
    let mut changed = ChangedChunks::default();
    for link in &frozen[..since] {
        let delta = SourceDisk {
            path: link.path.clone(),
            ..disk.clone()
        };
        let written = match open_source_disk(&delta)?.written_by_newest() {
            Some(Ok(written)) => written,
            Some(Err(e)) => {
                return Err(SourceError::Io {
                    path: link.path.clone(),
                    action: "read the grain tables of the snapshot delta",
                    source: e,
                })
            }
            None => {
                return Ok(DiskPass {
                    reader,
                    note: format!(
                        "{}: {} is not a snapshot delta, every chunk is read and compared",
                        disk.key,
                        link.path.display()
                    ),
                    frozen,
                    changed: None,
                })
            }
        };
        changed = changed.union(ChangedChunks::covering(&written, chunk_size));
    }
    let chunks = disk.capacity.div_ceil(chunk_size);
    Ok(DiskPass {
        reader,
        note: format!(
            "{}: {} snapshot delta(s) frozen since the last pass changed {} of {chunks} chunks; only those are read",
            disk.key,
            since,
            changed.len()
        ),
        frozen,
        changed: Some(changed),
    })
}

/// Why `now` (the older part of today's frozen chain) is not the chain `recorded` by the
/// last pass, or None if it is.
fn first_difference(now: &[ChainLink], recorded: &[ChainLink]) -> Option<String> {
    for (now, recorded) in now.iter().zip(recorded) {
        if now.path != recorded.path {
            return Some(format!(
                "{} is no longer in the snapshot chain (snapshots were deleted or consolidated)",
                recorded.path.display()
            ));
        }
        if now.cid.is_none() || now.cid != recorded.cid {
            return Some(format!(
                "{} was written since the last pass (its CID is {}, it was {})",
                now.path.display(),
                now.cid.as_deref().unwrap_or("missing"),
                recorded.cid.as_deref().unwrap_or("missing")
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_covering_byte_ranges() {
        let ranges = [0..1, 65_536..131_072, 131_072..131_073, 300_000..300_001];
        assert_eq!(ChangedChunks::covering(&ranges, 65_536).0, vec![0, 1, 2, 4]);
        assert!(ChangedChunks::covering(&[], 65_536).is_empty());
        assert_eq!(ChangedChunks::covering(&[10..20, 30..40], 1 << 20).0, vec![0]);
    }
}
