//! Reading a sparse extent's grains: the grain directory in memory, grain tables read on
//! demand (a few neighbours at a time) into a bounded cache, grains read plain or inflated.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use flate2::{Decompress, FlushDecompress, Status};

use super::{u32_at, u64_at, Layout, SECTOR};
use crate::source::disk::read_error;
use crate::source::slice::FileSlice;

/// Each extent keeps at most this many bytes of grain tables in memory: 4096 hosted tables,
/// which map 128 GiB of 64 KiB grains. The agent reads a disk front to back, so the tables it
/// drops (oldest first) are ones it is done with; a table read again costs one 2 KiB read.
const GT_CACHE_BYTES: usize = 8 << 20;
/// Grain tables that lie one after the other in the file are read together, up to this many.
const GT_BATCH: usize = 16;
/// Size of a grain marker: lba (u64) and size (u32).
const MARKER_LEN: u64 = 12;

/// The file an extent reads: kept open, or opened for each read when a disk has more extents
/// than may be kept open.
#[derive(Debug)]
pub(in crate::source) enum ExtentFile {
    Open(FileSlice),
    Reopen { path: PathBuf, len: u64 },
}

impl ExtentFile {
    pub(in crate::source) fn path(&self) -> &Path {
        match self {
            ExtentFile::Open(slice) => &slice.path,
            ExtentFile::Reopen { path, .. } => path,
        }
    }

    pub(in crate::source) fn len(&self) -> u64 {
        match self {
            ExtentFile::Open(slice) => slice.len,
            ExtentFile::Reopen { len, .. } => *len,
        }
    }

    pub(in crate::source) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            ExtentFile::Open(slice) => slice.read_exact_at(buf, offset),
            ExtentFile::Reopen { path, len } => {
                let file = File::open(path).map_err(|e| read_error(path, offset, e))?;
                let slice = FileSlice {
                    path: path.clone(),
                    file: Arc::new(file),
                    start: 0,
                    len: *len,
                };
                slice.read_exact_at(buf, offset)
            }
        }
    }

    pub(in crate::source) fn is_hole(&self, offset: u64, len: u64) -> bool {
        match self {
            ExtentFile::Open(slice) => slice.is_hole(offset, len),
            ExtentFile::Reopen { .. } => false,
        }
    }

    /// From now on, open the file for each read instead of keeping it open.
    pub(in crate::source) fn close(&mut self) {
        if let ExtentFile::Open(slice) = self {
            // A slice of a bigger file (an archive member) has no path of its own to reopen.
            if slice.start == 0 {
                *self = ExtentFile::Reopen {
                    path: slice.path.clone(),
                    len: slice.len,
                };
            }
        }
    }
}

/// What a grain table entry says about one grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    /// Not in this extent: the parent's bytes, or zeros.
    Unallocated,
    /// Reads as zeros, whatever the parent holds.
    Zero,
    /// Stored at this byte offset of the file (for a compressed extent: its marker).
    At(u64),
}

/// How an extent's grain tables say where each grain is.
#[derive(Debug, Clone, Copy)]
pub(in crate::source) enum Entries {
    /// Hosted (KDMV) and ESX (COWD) extents: u32 entries, each a grain's sector; 0 is
    /// unallocated, and 1 a zero grain when `zero_gte` (the header's flag) says so.
    Sectors { zero_gte: bool },
    /// SEsparse extents: u64 entries whose top nibble is the grain's state (0 unallocated,
    /// 1 unmapped and 2 zero, both reading as zeros, 3 allocated) and whose other 60 bits
    /// number the grain in the grains region, which starts at `grains_sector`.
    SeSparse { grains_sector: u64 },
}

impl Entries {
    fn bytes(self) -> u64 {
        match self {
            Entries::Sectors { .. } => 4,
            Entries::SeSparse { .. } => 8,
        }
    }
}

/// A sparse extent: grain directory in memory, grain tables cached, grains read on demand.
#[derive(Debug)]
pub(in crate::source) struct SparseExtent {
    file: ExtentFile,
    /// Logical size in bytes, from the header.
    capacity: u64,
    grain_bytes: u64,
    gtes_per_gt: u64,
    /// Sector of each grain table, 0 for none.
    gd: Box<[u64]>,
    entries: Entries,
    compressed: bool,
    /// Whether each compressed grain starts with a marker giving its size.
    markers: bool,
    tables: Mutex<TableCache>,
}

/// The grain tables in memory, dropped oldest first beyond `limit`.
#[derive(Debug, Default)]
struct TableCache {
    tables: HashMap<u64, Arc<[u64]>>,
    order: VecDeque<u64>,
    limit: usize,
}

impl TableCache {
    fn insert(&mut self, index: u64, table: Arc<[u64]>) {
        if self.tables.insert(index, table).is_none() {
            self.order.push_back(index);
            while self.order.len() > self.limit {
                if let Some(old) = self.order.pop_front() {
                    self.tables.remove(&old);
                }
            }
        }
    }
}

/// Pieces of a read that can be done together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    Unallocated,
    Zero,
    /// Plain grains stored one after the other, from this byte of the file.
    File(u64),
}

impl SparseExtent {
    pub(in crate::source) fn new(
        file: ExtentFile,
        capacity: u64,
        layout: Layout,
        gd: &[u32],
        zero_gte: bool,
        compressed: bool,
        markers: bool,
    ) -> SparseExtent {
        let gd = gd.iter().map(|&sector| u64::from(sector)).collect();
        SparseExtent::with_entries(
            file,
            capacity,
            layout,
            gd,
            Entries::Sectors { zero_gte },
            compressed,
            markers,
        )
    }

    /// An SEsparse extent: `gd` holds the sector of each grain table (0 for none).
    pub(in crate::source) fn se_sparse(
        file: ExtentFile,
        capacity: u64,
        layout: Layout,
        gd: Box<[u64]>,
        grains_sector: u64,
    ) -> SparseExtent {
        SparseExtent::with_entries(
            file,
            capacity,
            layout,
            gd,
            Entries::SeSparse { grains_sector },
            false,
            false,
        )
    }

    fn with_entries(
        file: ExtentFile,
        capacity: u64,
        layout: Layout,
        gd: Box<[u64]>,
        entries: Entries,
        compressed: bool,
        markers: bool,
    ) -> SparseExtent {
        // Tables are kept as u64 entries whatever their size in the file.
        let table_bytes = (layout.gtes_per_gt * 8) as usize;
        SparseExtent {
            file,
            capacity,
            grain_bytes: layout.grain_sectors * SECTOR,
            gtes_per_gt: layout.gtes_per_gt,
            gd,
            entries,
            compressed,
            markers,
            tables: Mutex::new(TableCache {
                limit: (GT_CACHE_BYTES / table_bytes).max(GT_BATCH),
                ..TableCache::default()
            }),
        }
    }

    /// Logical size in bytes, from the header.
    pub(in crate::source) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(in crate::source) fn is_compressed(&self) -> bool {
        self.compressed
    }

    pub(in crate::source) fn path(&self) -> &Path {
        self.file.path()
    }

    /// Opens the file for each read from now on (see [`ExtentFile::close`]).
    pub(in crate::source) fn close_file(&mut self) {
        self.file.close();
    }

    fn corrupt_io(&self, message: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {message}: the sparse VMDK is truncated or corrupt",
                self.path().display()
            ),
        )
    }

    /// The grain table at `index` of the directory, from the cache or the file; `None` if the
    /// directory has no table there.
    fn table(&self, index: u64) -> io::Result<Option<Arc<[u64]>>> {
        let Some(&sector) = self.gd.get(index as usize) else {
            return Ok(None);
        };
        if sector == 0 {
            return Ok(None);
        }
        let cache = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(table) = cache.tables.get(&index) {
            return Ok(Some(Arc::clone(table)));
        }
        drop(cache);
        // Read this table and the following ones if they lie right after it, as they do in
        // files made by VMware and qemu, so a sequential read costs one read per batch.
        let entry_bytes = self.entries.bytes();
        let table_bytes = self.gtes_per_gt * entry_bytes;
        let table_sectors = table_bytes / SECTOR;
        let mut count = 1;
        while count < GT_BATCH {
            let next = self.gd.get(index as usize + count);
            let expected = sector + count as u64 * table_sectors;
            if next.is_none_or(|&s| s != expected) {
                break;
            }
            count += 1;
        }
        let mut bytes = vec![0; count * table_bytes as usize];
        self.file.read_exact_at(&mut bytes, sector * SECTOR)?;
        let mut cache = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let mut first = None;
        for (i, chunk) in bytes.chunks_exact(table_bytes as usize).enumerate() {
            let table: Arc<[u64]> = match entry_bytes {
                4 => chunk.chunks_exact(4).map(|w| u64::from(u32_at(w, 0))).collect(),
                _ => chunk.chunks_exact(8).map(|w| u64_at(w, 0)).collect(),
            };
            if i == 0 {
                first = Some(Arc::clone(&table));
            }
            cache.insert(index + i as u64, table);
        }
        Ok(first)
    }

    /// What the tables say about grain `grain`, using `current` to avoid a cache lookup per
    /// grain of the same table.
    fn grain(&self, grain: u64, current: &mut Option<(u64, Option<Arc<[u64]>>)>) -> io::Result<Grain> {
        let index = grain / self.gtes_per_gt;
        if current.as_ref().is_none_or(|(i, _)| *i != index) {
            *current = Some((index, self.table(index)?));
        }
        let Some((_, Some(table))) = current else {
            return Ok(Grain::Unallocated);
        };
        let entry = (grain % self.gtes_per_gt) as usize;
        let raw = table[entry];
        let sector = match self.entries {
            Entries::Sectors { .. } if raw == 0 => return Ok(Grain::Unallocated),
            Entries::Sectors { zero_gte: true } if raw == 1 => return Ok(Grain::Zero),
            Entries::Sectors { .. } => raw,
            Entries::SeSparse { grains_sector } => match raw >> 60 {
                0 if raw == 0 => return Ok(Grain::Unallocated),
                1 | 2 => return Ok(Grain::Zero),
                3 => {
                    // The grain's number is split: its low 12 bits sit in bits 48-59.
                    let number = ((raw >> 48) & 0xfff) | ((raw & 0xffff_ffff_ffff) << 12);
                    number
                        .checked_mul(self.grain_bytes / SECTOR)
                        .and_then(|s| s.checked_add(grains_sector))
                        .unwrap_or(u64::MAX / SECTOR)
                }
                _ => {
                    return Err(self.corrupt_io(format!(
                        "grain table {index} entry {entry} is {raw:#018x}, which is no SEsparse grain state"
                    )))
                }
            },
        };
        let at = sector.saturating_mul(SECTOR);
        if at >= self.file.len() {
            return Err(self.corrupt_io(format!(
                "grain table {index} entry {entry} points to sector {sector}, past the end of \
                 the file ({} bytes)",
                self.file.len()
            )));
        }
        Ok(Grain::At(at))
    }

    /// Fills `buf` with the extent's bytes at `offset`. Unallocated parts (and anything past
    /// the header's capacity) are filled by `unallocated(offset, buf)`.
    pub(in crate::source) fn read_at(
        &self,
        offset: u64,
        buf: &mut [u8],
        unallocated: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut current = None;
        // A run of pieces of one kind, done with one read: (kind, start in buf, length).
        let mut run: Option<(RunKind, usize, usize)> = None;
        let mut pos = offset;
        while pos < end {
            let grain = pos / self.grain_bytes;
            let within = pos % self.grain_bytes;
            let count = (self.grain_bytes - within).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            let state = if pos >= self.capacity {
                Grain::Unallocated
            } else {
                self.grain(grain, &mut current)?
            };
            let kind = match state {
                Grain::Unallocated => RunKind::Unallocated,
                Grain::Zero => RunKind::Zero,
                Grain::At(grain_at) if self.compressed => {
                    let data = self.inflate_grain(grain, grain_at)?;
                    buf[at..at + count].copy_from_slice(&data[within as usize..within as usize + count]);
                    pos += count as u64;
                    continue;
                }
                Grain::At(grain_at) => RunKind::File(grain_at + within),
            };
            match &mut run {
                Some((run_kind, start, len)) if *start + *len == at && continues(*run_kind, kind, *len) => {
                    *len += count;
                }
                _ => {
                    if let Some(done) = run.take() {
                        self.finish_run(done, offset, buf, unallocated)?;
                    }
                    run = Some((kind, at, count));
                }
            }
            pos += count as u64;
        }
        if let Some(done) = run {
            self.finish_run(done, offset, buf, unallocated)?;
        }
        Ok(())
    }

    fn finish_run(
        &self,
        (kind, start, len): (RunKind, usize, usize),
        offset: u64,
        buf: &mut [u8],
        unallocated: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let piece = &mut buf[start..start + len];
        match kind {
            RunKind::Unallocated => unallocated(offset + start as u64, piece),
            RunKind::Zero => {
                piece.fill(0);
                Ok(())
            }
            RunKind::File(at) => self.file.read_exact_at(piece, at),
        }
    }

    /// True if `[offset, offset + len)` holds no data of this extent: zero grains, and
    /// unallocated grains for which `unallocated_is_hole` says yes. An unreadable table says
    /// no (the read that follows reports the error).
    pub(in crate::source) fn is_hole(
        &self,
        offset: u64,
        len: u64,
        unallocated_is_hole: &mut dyn FnMut(u64, u64) -> bool,
    ) -> bool {
        let end = offset.saturating_add(len);
        let mut current = None;
        let mut unallocated_from: Option<u64> = None;
        let mut pos = offset;
        while pos < end {
            let grain = pos / self.grain_bytes;
            let next = ((grain + 1) * self.grain_bytes).min(end);
            let state = if pos >= self.capacity {
                Ok(Grain::Unallocated)
            } else {
                self.grain(grain, &mut current)
            };
            match state {
                Ok(Grain::Unallocated) => {
                    unallocated_from.get_or_insert(pos);
                }
                Ok(Grain::Zero) => {
                    if let Some(from) = unallocated_from.take() {
                        if !unallocated_is_hole(from, pos - from) {
                            return false;
                        }
                    }
                }
                Ok(Grain::At(_)) | Err(_) => return false,
            }
            pos = next;
        }
        unallocated_from.is_none_or(|from| unallocated_is_hole(from, end - from))
    }

    /// The byte ranges of the extent's allocated and zero grains (what it holds itself, as
    /// opposed to what reads from its parent), sorted and merged, within its capacity.
    pub(in crate::source) fn written_grains(&self) -> io::Result<Vec<Range<u64>>> {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        let table_span = self.gtes_per_gt * self.grain_bytes;
        for index in 0..self.gd.len() as u64 {
            let Some(table) = self.table(index)? else {
                continue;
            };
            // Any entry but 0 is something this extent says itself (data, or zeros).
            for (entry, &raw) in table.iter().enumerate() {
                if raw == 0 {
                    continue;
                }
                let start = index * table_span + entry as u64 * self.grain_bytes;
                if start >= self.capacity {
                    break;
                }
                let end = (start + self.grain_bytes).min(self.capacity);
                match ranges.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => ranges.push(start..end),
                }
            }
        }
        Ok(ranges)
    }

    /// The bytes of compressed grain `grain` whose marker (or data) is at byte `at`: exactly
    /// one grain, zero-filled if the stream is shorter; an error if it would inflate to more.
    fn inflate_grain(&self, grain: u64, at: u64) -> io::Result<Vec<u8>> {
        let grain_bytes = self.grain_bytes as usize;
        // zlib's worst case is a few bytes per 16 KiB over the input; allow much more.
        let limit = self.grain_bytes + self.grain_bytes / 64 + 1024;
        let file_len = self.file.len();
        let (data_at, size) = if self.markers {
            let mut marker = [0; MARKER_LEN as usize];
            self.file.read_exact_at(&mut marker, at)?;
            let lba = u64_at(&marker, 0);
            let size = u64::from(u32_at(&marker, 8));
            if size == 0 {
                return Err(self.corrupt_io(format!(
                    "the grain table points grain {grain} to a metadata marker at byte {at}, not a grain"
                )));
            }
            let expected = grain * (self.grain_bytes / SECTOR);
            if lba != expected {
                return Err(self.corrupt_io(format!(
                    "the grain marker at byte {at} is for sector {lba}, but the grain table puts grain \
                     {grain} (sector {expected}) there"
                )));
            }
            if size > limit {
                return Err(self.corrupt_io(format!(
                    "the compressed grain at byte {at} claims {size} bytes, more than a grain of \
                     {grain_bytes} bytes can take"
                )));
            }
            (at + MARKER_LEN, size)
        } else {
            // No marker: the stream's own end tells where the grain ends.
            (at, limit.min(file_len.saturating_sub(at)))
        };
        if data_at.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(self.corrupt_io(format!(
                "the compressed grain at byte {at} ({size} bytes) runs past the end of the file ({file_len} bytes)"
            )));
        }
        let mut input = vec![0; size as usize];
        self.file.read_exact_at(&mut input, data_at)?;
        let mut out = vec![0; grain_bytes];
        let mut inflater = Decompress::new(true);
        let damaged =
            |e: flate2::DecompressError| self.corrupt_io(format!("the compressed grain at byte {at} is damaged ({e})"));
        let status = inflater
            .decompress(&input, &mut out, FlushDecompress::None)
            .map_err(damaged)?;
        if status != Status::StreamEnd {
            let produced = inflater.total_out();
            if produced < self.grain_bytes {
                return Err(self.corrupt_io(format!(
                    "the compressed grain at byte {at} ends before its stream does ({produced} bytes inflated)"
                )));
            }
            // The output is full: the stream must end here, adding nothing.
            let rest = &input[inflater.total_in() as usize..];
            let mut extra = [0; 1];
            let status = inflater
                .decompress(rest, &mut extra, FlushDecompress::None)
                .map_err(damaged)?;
            if inflater.total_out() > produced || status != Status::StreamEnd {
                return Err(self.corrupt_io(format!(
                    "the compressed grain at byte {at} inflates to more than a grain ({grain_bytes} bytes)"
                )));
            }
        }
        Ok(out)
    }
}

/// Whether a piece of `next` kind continues a run of `kind` that is `len` bytes long.
fn continues(kind: RunKind, next: RunKind, len: usize) -> bool {
    match (kind, next) {
        (RunKind::File(at), RunKind::File(next_at)) => at + len as u64 == next_at,
        (a, b) => a == b,
    }
}
