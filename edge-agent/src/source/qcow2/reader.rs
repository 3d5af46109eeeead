//! Reading a qcow2 image's clusters: L1 table (kept in memory) → L2 tables (loaded on
//! demand into a bounded cache) → data, zero, compressed or unallocated clusters, the last
//! read from the backing file.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::header::{Compression, Header};
use crate::source::slice::FileSlice;
use crate::source::{check_range, DiskReader, SourceError};

/// Memory for cached L2 tables, per image. One table maps `cluster_size² / 8` bytes of disk
/// (512 MiB with 64 KiB clusters), so this covers 512 TiB of such a disk, or 4 GiB of a disk
/// with 512-byte clusters.
const L2_CACHE_BYTES: u64 = 64 << 20;

/// Largest zstd window accepted: twice the largest cluster. QEMU writes each cluster as its
/// own frame with a window no larger than the cluster; a frame asking for more is hostile and
/// would otherwise make the decoder allocate up to 128 MiB.
const ZSTD_WINDOW_LOG_MAX: u32 = 22;

/// Bits 9-55 of L1 and standard L2 entries: a cluster-aligned host offset.
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(super) const L2_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (v3): the cluster reads as zeros.
pub(super) const L2_ZERO: u64 = 1;

/// How one guest cluster is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Read from the backing file, or zeros without one.
    Unallocated,
    Zero,
    /// At this host offset.
    Data(u64),
    /// `len` bytes of compressed data at host offset `offset` (not aligned).
    Compressed {
        offset: u64,
        len: u64,
    },
}

pub(super) struct Qcow2Disk {
    file: FileSlice,
    capacity: u64,
    cluster_bits: u32,
    /// v3 only: bit 0 of an L2 entry marks a zero cluster (reserved in v2).
    zero_flag: bool,
    compression: Compression,
    l1: Box<[u64]>,
    backing: Option<Box<dyn DiskReader>>,
    l2_cache: Mutex<L2Cache>,
    /// Bytes read from the image file (metadata and data), for tests of what is read.
    bytes_read: AtomicU64,
}

/// Without the tables: an L1 table may hold millions of entries.
impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.file.path)
            .field("capacity", &self.capacity)
            .field("cluster_bits", &self.cluster_bits)
            .field("compression", &self.compression)
            .field("l1_entries", &self.l1.len())
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

impl Qcow2Disk {
    /// Reads the L1 table (the header has checked that it lies within the file).
    pub(super) fn open(
        file: FileSlice,
        header: &Header,
        backing: Option<Box<dyn DiskReader>>,
    ) -> Result<Self, SourceError> {
        let bytes = file.read_vec(header.l1_table_offset, (header.l1_entries * 8) as usize)?;
        let l1: Box<[u64]> = bytes
            .chunks_exact(8)
            .map(|entry| u64::from_be_bytes(entry.try_into().unwrap_or_default()))
            .collect();
        super::check::check(&super::check::Tables {
            file: &file,
            l1: &l1,
            cluster_bits: header.cluster_bits,
            zero_flag: header.version >= 3,
            capacity: header.size,
        })?;
        let cluster_size = 1u64 << header.cluster_bits;
        Ok(Qcow2Disk {
            bytes_read: AtomicU64::new(bytes.len() as u64),
            file,
            capacity: header.size,
            cluster_bits: header.cluster_bits,
            zero_flag: header.version >= 3,
            compression: header.compression,
            l1,
            backing,
            l2_cache: Mutex::new(L2Cache::new((L2_CACHE_BYTES / cluster_size) as usize)),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    #[cfg(test)]
    pub(super) fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(super) fn set_l2_cache_tables(&self, tables: usize) {
        *self.l2_cache.lock().unwrap_or_else(PoisonError::into_inner) = L2Cache::new(tables);
    }

    #[cfg(test)]
    pub(super) fn l2_cached(&self) -> usize {
        self.l2_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tables
            .len()
    }

    /// An error for metadata that cannot be right.
    fn corrupt(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {what}: the qcow2 image is corrupt; check it with `qemu-img check` (and repair a \
                 copy with `qemu-img check -r all`)",
                self.file.path.display()
            ),
        )
    }

    /// Reads from the image file, counting the bytes.
    fn read_file(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        self.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The L2 table of L1 entry `index`; `None` if it has none (all its clusters unallocated).
    fn l2_table(&self, index: usize) -> io::Result<Option<Arc<[u64]>>> {
        let offset = self.l1[index] & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if let Some(table) = self.l2_cache.lock().unwrap_or_else(PoisonError::into_inner).get(offset) {
            return Ok(Some(table));
        }
        let cluster_size = self.cluster_size();
        if !offset.is_multiple_of(cluster_size) {
            return Err(self.corrupt(format!(
                "L1 entry {index} points to an L2 table at offset {offset}, which is not cluster-aligned"
            )));
        }
        if offset.checked_add(cluster_size).is_none_or(|end| end > self.file.len) {
            return Err(self.corrupt(format!(
                "L1 entry {index} points to an L2 table at offset {offset}, past the end of the file \
                 ({} bytes; is it truncated?)",
                self.file.len
            )));
        }
        // Read outside the lock: other threads go on with cached tables meanwhile.
        let mut bytes = vec![0; cluster_size as usize];
        self.read_file(&mut bytes, offset)?;
        let table: Arc<[u64]> = bytes
            .chunks_exact(8)
            .map(|entry| u64::from_be_bytes(entry.try_into().unwrap_or_default()))
            .collect();
        self.l2_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(offset, table.clone());
        Ok(Some(table))
    }

    /// How the cluster holding guest offset `guest` (< capacity) is stored.
    fn mapping(&self, guest: u64) -> io::Result<Mapping> {
        let cluster = guest >> self.cluster_bits;
        let l2_bits = self.cluster_bits - 3;
        // Below l1.len(): the header checked the L1 table covers the capacity.
        let l1_index = (cluster >> l2_bits) as usize;
        let Some(table) = self.l2_table(l1_index)? else {
            return Ok(Mapping::Unallocated);
        };
        let entry = table[(cluster & ((1 << l2_bits) - 1)) as usize];
        if entry & L2_COMPRESSED != 0 {
            // Bits 0..x-1 the offset, x..61 the number of 512-byte sectors after the first.
            let x = 62 - (self.cluster_bits - 8);
            let offset = entry & ((1 << x) - 1);
            let sectors = ((entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (offset & 511);
            if offset == 0 || offset >= self.file.len {
                return Err(self.corrupt(format!(
                    "the compressed cluster at guest offset {} has its data at offset {offset}, \
                     outside the file ({} bytes; is it truncated?)",
                    cluster << self.cluster_bits,
                    self.file.len
                )));
            }
            // The last compressed cluster's sector count may run past the end of the file.
            let len = len.min(self.file.len - offset);
            return Ok(Mapping::Compressed { offset, len });
        }
        let host = entry & OFFSET_MASK;
        if self.zero_flag && entry & L2_ZERO != 0 {
            return Ok(Mapping::Zero);
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(self.corrupt(format!(
                "the cluster at guest offset {} is mapped to offset {host}, which is not cluster-aligned",
                cluster << self.cluster_bits
            )));
        }
        Ok(Mapping::Data(host))
    }

    /// Whether any cluster of `[offset, offset + len)` is mapped in this image itself (data,
    /// compressed or a zero cluster), whatever its backing file holds. A QEMU backup job
    /// writes exactly the clusters it copied, zeroed ones as zero clusters (see
    /// [`crate::tracking`]), so this says which chunks a backup copied.
    pub(super) fn is_written(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len).min(self.capacity);
        let l2_span = 1u64 << (2 * self.cluster_bits - 3);
        let mut pos = offset;
        while pos < end {
            // No L2 table: the whole span is unallocated, without reading anything.
            if self.l1[(pos / l2_span) as usize] & OFFSET_MASK == 0 {
                pos = (pos / l2_span + 1) * l2_span;
                continue;
            }
            if self.mapping(pos)? != Mapping::Unallocated {
                return Ok(true);
            }
            pos = (pos | (self.cluster_size() - 1)) + 1;
        }
        Ok(false)
    }

    /// The mapping at `pos` and how many bytes from `pos` (at most `max`) it covers: runs of
    /// zero or unallocated clusters, or of data clusters contiguous in the file, are one read.
    /// A data mapping's host offset is that of `pos` itself.
    fn extent_at(&self, pos: u64, max: u64) -> io::Result<(Mapping, u64)> {
        let cluster_size = self.cluster_size();
        let within = pos & (cluster_size - 1);
        let mut len = (cluster_size - within).min(max);
        let first = match self.mapping(pos)? {
            Mapping::Data(host) => Mapping::Data(host + within),
            compressed @ Mapping::Compressed { .. } => return Ok((compressed, len)),
            other => other,
        };
        while len < max {
            let next = self.mapping(pos + len)?;
            let joins = match (first, next) {
                (Mapping::Data(host), Mapping::Data(next)) => next == host + len,
                (a, b) => a == b && matches!(a, Mapping::Zero | Mapping::Unallocated),
            };
            if !joins {
                break;
            }
            len += cluster_size.min(max - len);
        }
        Ok((first, len))
    }

    /// Data clusters at `host`. The file may end inside the last cluster (QEMU does not always
    /// write a cluster's tail); that part reads as zeros, as QEMU reads it.
    fn read_data(&self, host: u64, buf: &mut [u8]) -> io::Result<()> {
        let file_len = self.file.len;
        let limit = file_len.next_multiple_of(self.cluster_size());
        let end = host + buf.len() as u64;
        if end > limit {
            return Err(self.corrupt(format!(
                "data at offset {host}..{end} lies past the end of the file ({file_len} bytes; is it truncated?)"
            )));
        }
        let stored = file_len.saturating_sub(host).min(buf.len() as u64) as usize;
        let (data, past_end) = buf.split_at_mut(stored);
        self.read_file(data, host)?;
        past_end.fill(0);
        Ok(())
    }

    /// Unallocated clusters at guest offset `pos`: the backing file's bytes, zeros past its end.
    fn read_backing(&self, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let stored = backing.capacity().saturating_sub(pos).min(buf.len() as u64) as usize;
        let (data, past_end) = buf.split_at_mut(stored);
        if !data.is_empty() {
            backing.read_at(pos, data)?;
        }
        past_end.fill(0);
        Ok(())
    }

    /// Part of a compressed cluster: `buf` at guest offset `pos`, within one cluster.
    fn read_compressed(&self, pos: u64, offset: u64, len: u64, buf: &mut [u8]) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        let mut input = vec![0; len as usize];
        self.read_file(&mut input, offset)?;
        let mut cluster = vec![0; cluster_size as usize];
        let result = match self.compression {
            Compression::Deflate => inflate(&input, &mut cluster),
            Compression::Zstd => unzstd(&input, &mut cluster),
        };
        let guest = pos & !(cluster_size - 1);
        result.map_err(|problem| {
            self.corrupt(format!(
                "the compressed cluster at guest offset {guest} (data at offset {offset}) does not \
                 decompress to one cluster: {problem}"
            ))
        })?;
        let within = (pos - guest) as usize;
        buf.copy_from_slice(&cluster[within..within + buf.len()]);
        Ok(())
    }

    /// Whether `[pos, pos + len)`, unallocated here, reads as zeros from the backing file.
    fn backing_is_hole(&self, pos: u64, len: u64) -> bool {
        let Some(backing) = &self.backing else {
            return true;
        };
        let stored = backing.capacity().saturating_sub(pos).min(len);
        stored == 0 || backing.is_hole(pos, stored)
    }
}

impl DiskReader for Qcow2Disk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, len) = self.extent_at(pos, (buf.len() - done) as u64)?;
            // Bounded by the buffer's length, so it fits in usize.
            let chunk = &mut buf[done..done + len as usize];
            match mapping {
                Mapping::Zero => chunk.fill(0),
                Mapping::Unallocated => self.read_backing(pos, chunk)?,
                Mapping::Data(host) => self.read_data(host, chunk)?,
                Mapping::Compressed { offset, len } => self.read_compressed(pos, offset, len, chunk)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    /// Zero clusters, and unallocated clusters that are holes of the backing chain (or past
    /// its end), are holes; so are data clusters that are holes of the image file. Reads L2
    /// tables, never data. Any error says no: the read will report it.
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.capacity);
        let l2_span = 1u64 << (2 * self.cluster_bits - 3);
        let mut pos = offset;
        while pos < end {
            // A whole L2 table's span without a table: one question to the backing file.
            let l1_index = (pos / l2_span) as usize;
            if self.l1[l1_index] & OFFSET_MASK == 0 {
                let span = ((pos / l2_span + 1) * l2_span).min(end) - pos;
                if !self.backing_is_hole(pos, span) {
                    return false;
                }
                pos += span;
                continue;
            }
            let Ok((mapping, span)) = self.extent_at(pos, end - pos) else {
                return false;
            };
            let hole = match mapping {
                Mapping::Zero => true,
                Mapping::Unallocated => self.backing_is_hole(pos, span),
                Mapping::Data(host) => self.file.is_hole(host, span),
                Mapping::Compressed { .. } => false,
            };
            if !hole {
                return false;
            }
            pos += span;
        }
        true
    }
}

/// Raw deflate (QEMU writes no zlib header) into exactly `out`; more output than that is a
/// bomb or damage, and fails after at most one extra byte.
fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut decoder = flate2::read::DeflateDecoder::new(input);
    decoder
        .read_exact(out)
        .map_err(|e| format!("deflate data ends early or is damaged ({e})"))?;
    // The stream must end here; what follows it in the sector is another cluster's data.
    match decoder.read(&mut [0]) {
        Ok(0) | Err(_) => Ok(()),
        Ok(_) => Err("the deflate data expands to more than one cluster".to_owned()),
    }
}

/// Zstd frames (QEMU may write several) into exactly `out`, as QEMU decodes them: a frame
/// that is not complete when `out` is full expands to more than a cluster and fails.
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let mut decoder = Decoder::new().map_err(|e| format!("cannot start a zstd decoder: {e}"))?;
    decoder
        .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(|e| format!("cannot set up the zstd decoder: {e}"))?;
    let mut input = InBuffer::around(input);
    let mut output = OutBuffer::around(out);
    let mut remaining_hint = 0;
    while output.pos() < output.capacity() {
        let before = (input.pos(), output.pos());
        remaining_hint = decoder
            .run(&mut input, &mut output)
            .map_err(|e| format!("the zstd data is damaged ({e})"))?;
        if (input.pos(), output.pos()) == before {
            return Err("the zstd data ends before a whole cluster".to_owned());
        }
    }
    if remaining_hint > 0 {
        return Err("the zstd data expands to more than one cluster".to_owned());
    }
    Ok(())
}

/// L2 tables by host offset, evicted oldest first: workers read a disk roughly in order, so
/// first-in first-out does about as well as least-recently-used, at O(1).
#[derive(Debug)]
struct L2Cache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
    limit: usize,
}

impl L2Cache {
    fn new(limit: usize) -> Self {
        L2Cache {
            tables: HashMap::new(),
            order: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    fn get(&self, offset: u64) -> Option<Arc<[u64]>> {
        self.tables.get(&offset).cloned()
    }

    fn insert(&mut self, offset: u64, table: Arc<[u64]>) {
        // Two threads may have loaded the same table; keep one.
        if self.tables.insert(offset, table).is_some() {
            return;
        }
        self.order.push_back(offset);
        while self.order.len() > self.limit {
            if let Some(oldest) = self.order.pop_front() {
                self.tables.remove(&oldest);
            }
        }
    }
}
