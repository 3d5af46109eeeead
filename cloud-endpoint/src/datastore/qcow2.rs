//! A qcow2 v3 writer for disks that arrive as chunks in any order, with no qemu-img at
//! run time.
//!
//! All metadata is preallocated at the start of the file for the whole capacity, so its
//! place never depends on what arrives; data clusters are appended after it in arrival
//! order:
//!
//! ```text
//! cluster 0            header
//! refcount table       points at every refcount block
//! refcount blocks      16-bit refcounts, enough for the largest file the disk can make
//! L1 table             points at every L2 table
//! L2 tables            one entry per guest cluster, in guest order
//! data clusters        appended as chunks arrive
//! ```
//!
//! Because the L2 tables are contiguous and in guest order, the entry of guest cluster
//! `g` sits at a fixed file offset (`L2 start + 8 g`). A write maps its clusters by
//! reading and updating those entries in place, under one lock that also hands out data
//! clusters, so a guest cluster is mapped once even if two writes touch it (chunk sizes
//! need only be multiples of 4 KiB, so neighbouring chunks can share a cluster). Entries
//! live in the file, not in memory: at 8 bytes per 64 KiB cluster (128 KiB per GiB) a
//! 64 TiB disk would need 8 GiB of RAM per migration, while the page cache holds the
//! tables being written and writes them back; memory stays O(chunk).
//!
//! Every used cluster has refcount 1 and the used clusters are exactly `0..next_free`
//! (untouched L2 tables and refcount blocks included: they are referenced, and stay
//! holes), so [`Qcow2Writer::finish`] fills the refcounts without a map and writes the
//! header last: until then the file does not open as qcow2.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// 64 KiB, qemu's default: large enough that the tables stay small (one 64 KiB L2 table
/// maps 512 MiB), small enough that a partly zero chunk keeps its zero clusters unallocated.
const CLUSTER_BITS: u32 = 16;
/// 16-bit refcounts, qemu's default.
const REFCOUNT_ORDER: u32 = 4;
const HEADER_LENGTH: u32 = 104;
/// An L1 or L2 entry's "refcount is exactly one" flag, which qemu-img check verifies.
const OFLAG_COPIED: u64 = 1 << 63;
/// Bits 9..=55 of an L1 or L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where each part of the file starts and how long it is, in clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub cluster_bits: u32,
    /// The virtual size in bytes.
    pub size: u64,
    pub guest_clusters: u64,
    pub refcount_table: u64,
    pub refcount_table_clusters: u64,
    pub refcount_blocks: u64,
    pub refcount_block_count: u64,
    pub l1_table: u64,
    pub l1_clusters: u64,
    pub l2_tables: u64,
    pub l2_count: u64,
    /// The first data cluster: everything before it is metadata.
    pub data: u64,
}

impl Layout {
    pub fn new(size: u64, cluster_bits: u32) -> Layout {
        let cluster = 1u64 << cluster_bits;
        let guest_clusters = size.div_ceil(cluster);
        let l2_count = guest_clusters.div_ceil(cluster / 8);
        let l1_clusters = (l2_count * 8).div_ceil(cluster).max(1);
        // The refcount blocks must cover every cluster of the largest file this disk can
        // make, themselves and the refcount table included: grow both until they do.
        let others = 1 + l1_clusters + l2_count + guest_clusters;
        let refcounts_per_block = cluster * 8 / (1 << REFCOUNT_ORDER);
        let (mut blocks, mut table) = (0, 0);
        loop {
            let need_blocks = (others + table + blocks).div_ceil(refcounts_per_block);
            let need_table = (need_blocks * 8).div_ceil(cluster).max(1);
            if (need_blocks, need_table) == (blocks, table) {
                break;
            }
            (blocks, table) = (need_blocks, need_table);
        }
        let refcount_table = 1;
        let refcount_blocks = refcount_table + table;
        let l1_table = refcount_blocks + blocks;
        let l2_tables = l1_table + l1_clusters;
        Layout {
            cluster_bits,
            size,
            guest_clusters,
            refcount_table,
            refcount_table_clusters: table,
            refcount_blocks,
            refcount_block_count: blocks,
            l1_table,
            l1_clusters,
            l2_tables,
            l2_count,
            data: l2_tables + l2_count,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Byte offset of cluster `n`.
    fn at(&self, n: u64) -> u64 {
        n << self.cluster_bits
    }

    /// One past the last cluster the file can ever use: every guest cluster written.
    fn end(&self) -> u64 {
        self.data + self.guest_clusters
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER_LENGTH as usize + 8);
        h.extend_from_slice(b"QFI\xfb");
        h.extend_from_slice(&3u32.to_be_bytes()); // version
        h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset: none
        h.extend_from_slice(&0u32.to_be_bytes()); // backing file name length
        h.extend_from_slice(&self.cluster_bits.to_be_bytes());
        h.extend_from_slice(&self.size.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // encryption: none
        h.extend_from_slice(&(self.l2_count as u32).to_be_bytes()); // L1 entries
        h.extend_from_slice(&self.at(self.l1_table).to_be_bytes());
        h.extend_from_slice(&self.at(self.refcount_table).to_be_bytes());
        h.extend_from_slice(&(self.refcount_table_clusters as u32).to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
        h.extend_from_slice(&0u64.to_be_bytes()); // snapshot table offset
        h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
        h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
        h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
        h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
        debug_assert_eq!(h.len(), HEADER_LENGTH as usize);
        // The end of the (empty) list of header extensions.
        h.extend_from_slice(&[0; 8]);
        h
    }
}

/// Writes one qcow2 image: see the module documentation.
#[derive(Debug)]
pub(super) struct Qcow2Writer {
    file: File,
    layout: Layout,
    /// The next free host cluster. Held while a write maps its guest clusters.
    next_free: Mutex<u64>,
}

impl Qcow2Writer {
    /// Lays out the metadata for a `size`-byte disk in the empty `file`.
    pub fn create(file: File, size: u64) -> io::Result<Qcow2Writer> {
        Qcow2Writer::with_cluster_bits(file, size, CLUSTER_BITS)
    }

    /// Like [`Qcow2Writer::create`] with clusters of `1 << cluster_bits` bytes (9..=21):
    /// tests use small clusters to reach many tables with little data.
    pub fn with_cluster_bits(file: File, size: u64, cluster_bits: u32) -> io::Result<Qcow2Writer> {
        assert!((9..=21).contains(&cluster_bits), "qcow2 clusters are 512 B to 2 MiB");
        let layout = Layout::new(size, cluster_bits);
        // The whole metadata area exists from the start, as holes: unmapped L2 entries
        // read as zeros.
        file.set_len(layout.at(layout.data))?;
        let table: Vec<u8> = (0..layout.refcount_block_count)
            .flat_map(|b| layout.at(layout.refcount_blocks + b).to_be_bytes())
            .collect();
        file.write_all_at(&table, layout.at(layout.refcount_table))?;
        let l1: Vec<u8> = (0..layout.l2_count)
            .flat_map(|t| (layout.at(layout.l2_tables + t) | OFLAG_COPIED).to_be_bytes())
            .collect();
        file.write_all_at(&l1, layout.at(layout.l1_table))?;
        Ok(Qcow2Writer {
            file,
            next_free: Mutex::new(layout.data),
            layout,
        })
    }

    /// Reopens an image [`Qcow2Writer::create`] laid out, to continue writing it: the
    /// tables are where the layout puts them, and the next free cluster follows the
    /// highest one an L2 entry maps (a cluster allocated but never mapped before a crash
    /// is handed out again).
    pub fn reopen(file: File, size: u64) -> io::Result<Qcow2Writer> {
        let layout = Layout::new(size, CLUSTER_BITS);
        let len = file.metadata()?.len();
        if len < layout.at(layout.data) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{len} bytes is shorter than the {} bytes of metadata a disk of this size lays out",
                    layout.at(layout.data)
                ),
            ));
        }
        let mut next_free = layout.data;
        let entries_at = layout.at(layout.l2_tables);
        // One L2 table at a time: memory stays one cluster however big the disk.
        let per_table = layout.cluster_size() / 8;
        let mut table = vec![0u8; layout.cluster_size() as usize];
        let mut first = 0;
        while first < layout.guest_clusters {
            let count = (layout.guest_clusters - first).min(per_table);
            let bytes = &mut table[..count as usize * 8];
            file.read_exact_at(bytes, entries_at + first * 8)?;
            for entry in bytes.chunks_exact(8) {
                let host = u64::from_be_bytes(entry.try_into().expect("8-byte entry")) & OFFSET_MASK;
                if host != 0 {
                    next_free = next_free.max((host >> layout.cluster_bits) + 1);
                }
            }
            first += count;
        }
        if next_free > layout.end() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "an L2 entry maps a cluster past the image's preallocated end",
            ));
        }
        Ok(Qcow2Writer {
            file,
            next_free: Mutex::new(next_free),
            layout,
        })
    }

    #[cfg(test)]
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Host offsets of the guest clusters `first..first + zero.len()`, allocating those
    /// not mapped yet, except the ones `zero` marks: those stay unmapped (read as zeros).
    fn map(&self, first: u64, zero: &[bool]) -> io::Result<Vec<Option<u64>>> {
        let entries_at = self.layout.at(self.layout.l2_tables) + first * 8;
        let mut entries = vec![0u8; zero.len() * 8];
        let mut next_free = self.next_free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.file.read_exact_at(&mut entries, entries_at)?;
        let mut changed = false;
        let mut hosts = Vec::with_capacity(zero.len());
        for (entry, &zero) in entries.chunks_exact_mut(8).zip(zero) {
            let mapped = u64::from_be_bytes(entry.try_into().expect("8-byte entry")) & OFFSET_MASK;
            let host = if mapped != 0 {
                Some(mapped)
            } else if zero {
                None
            } else {
                if *next_free >= self.layout.end() {
                    // Each guest cluster is mapped at most once, so this cannot happen.
                    return Err(io::Error::other("the qcow2 image ran out of preallocated clusters"));
                }
                let host = self.layout.at(*next_free);
                *next_free += 1;
                entry.copy_from_slice(&(host | OFLAG_COPIED).to_be_bytes());
                changed = true;
                Some(host)
            };
            hosts.push(host);
        }
        if changed {
            self.file.write_all_at(&entries, entries_at)?;
        }
        Ok(hosts)
    }
}

/// Reads `buf` at `at`, the part past the end of the file as zeros. A cluster shared by
/// two chunks is allocated by the first one written; if the other is a zero chunk (never
/// sent) and the cluster is the last in the file, the file ends inside it until
/// [`super::disk::DiskWriter::finish`] sizes it to its clusters. Those bytes are zeros, as qemu reads
/// them.
fn read_or_zeros(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Qcow2Writer {
    /// The host offset of each cluster that guest bytes `offset..end` touch (0: not
    /// allocated, reads as zeros), from the L2 entries as the file holds them: what qemu
    /// would read, not what a writer meant to map.
    fn mapped_clusters(&self, offset: u64, end: u64) -> io::Result<Vec<u64>> {
        let first = offset >> self.layout.cluster_bits;
        let last = (end - 1) >> self.layout.cluster_bits;
        let mut entries = vec![0u8; (last - first + 1) as usize * 8];
        self.file
            .read_exact_at(&mut entries, self.layout.at(self.layout.l2_tables) + first * 8)?;
        Ok(entries
            .chunks_exact(8)
            .map(|entry| u64::from_be_bytes(entry.try_into().expect("8-byte entry")) & OFFSET_MASK)
            .collect())
    }
}

impl super::disk::DiskWriter for Qcow2Writer {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= self.layout.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past the virtual size"))?;
        let cluster = self.layout.cluster_size();
        let first = offset >> self.layout.cluster_bits;
        let last = (end - 1) >> self.layout.cluster_bits;
        // The guest range of cluster g that this write covers, as indices into `data`.
        let span = |g: u64| {
            let from = (g * cluster).max(offset);
            let to = ((g + 1) * cluster).min(end);
            ((from - offset) as usize, (to - offset) as usize)
        };
        // A cluster this write fills on its own (up to the virtual size) and finds all
        // zero is left unmapped: it reads as zeros and takes no space.
        let zero: Vec<bool> = (first..=last)
            .map(|g| {
                let whole = g * cluster >= offset && ((g + 1) * cluster).min(self.layout.size) <= end;
                let (from, to) = span(g);
                whole && data[from..to].iter().all(|&b| b == 0)
            })
            .collect();
        let hosts = self.map(first, &zero)?;
        // One pwrite per run of clusters that landed next to each other.
        let mut i = 0;
        while i < hosts.len() {
            let Some(host) = hosts[i] else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < hosts.len() && hosts[j] == Some(host + (j - i) as u64 * cluster) {
                j += 1;
            }
            let g = first + i as u64;
            let (from, _) = span(g);
            let (_, to) = span(first + j as u64 - 1);
            let within = (g * cluster).max(offset) - g * cluster;
            self.file.write_all_at(&data[from..to], host + within)?;
            i = j;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        // The L2 entries live in the same file, so one fdatasync covers data and map.
        self.file.sync_data()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.layout.size)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past the virtual size"))?;
        let cluster = self.layout.cluster_size();
        let first = offset >> self.layout.cluster_bits;
        for (g, host) in (first..).zip(self.mapped_clusters(offset, end)?) {
            let from = (g * cluster).max(offset);
            let to = ((g + 1) * cluster).min(end);
            let part = &mut buf[(from - offset) as usize..(to - offset) as usize];
            if host == 0 {
                part.fill(0);
            } else {
                read_or_zeros(&self.file, part, host + (from - g * cluster))?;
            }
        }
        Ok(())
    }

    fn is_unallocated(&self, offset: u64, len: u64) -> io::Result<bool> {
        let Some(end) = offset
            .checked_add(len)
            .filter(|&end| end <= self.layout.size && len > 0)
        else {
            return Ok(false);
        };
        Ok(self.mapped_clusters(offset, end)?.iter().all(|&host| host == 0))
    }

    fn finish(&self) -> io::Result<()> {
        let layout = &self.layout;
        let used = *self.next_free.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let per_block = layout.cluster_size() / 2;
        let full: Vec<u8> = (0..per_block).flat_map(|_| 1u16.to_be_bytes()).collect();
        for b in 0..used.div_ceil(per_block) {
            let counted = (used - b * per_block).min(per_block) as usize;
            // The rest of the last block stays a hole: refcount 0.
            self.file
                .write_all_at(&full[..counted * 2], layout.at(layout.refcount_blocks + b))?;
        }
        // The last data cluster may be partly written; the file ends at a cluster boundary.
        self.file.set_len(layout.at(used))?;
        self.file.write_all_at(&layout.header(), 0)?;
        self.file.sync_all()
    }
}
