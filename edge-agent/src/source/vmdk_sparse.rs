//! Hosted sparse VMDK extents ("KDMV", VMware's "Virtual Disk Format 1.1"): monolithicSparse,
//! the extents of twoGbMaxExtentSparse, Workstation and qemu snapshot deltas, and
//! streamOptimized (the OVA format).
//!
//! An extent is a 512-byte header, a grain directory (GD: the sector of each grain table, 0
//! for none), grain tables (GT: 512 entries, the sector of each grain) and grains of
//! `grainSize` sectors. A GT entry of 0 is unallocated (the parent's bytes, or zeros); 1 is a
//! zero grain when flags bit 2 says so. In a streamOptimized extent each grain is a marker
//! (lba u64, size u32) followed by `size` bytes of zlib data, and the header may defer the GD
//! to a footer near the end of the file (gdOffset = GD_AT_END).
//!
//! The GD is read at open; GTs are read on demand, a few neighbours at a time, and kept in a
//! bounded cache. Every offset read from the file is checked against its length before it
//! is followed, and nothing is allocated from a header field before it is bounded.

use std::path::Path;

use super::disk::Opened;
use super::slice::FileSlice;
use super::vmdk::{Descriptor, DESCRIPTOR_SIZE_LIMIT};
use super::SourceError;

mod check;
mod grains;
mod se_sparse;

pub(super) use grains::{ExtentFile, SparseExtent};
pub(super) use se_sparse::{is_se_sparse, open as open_se_sparse};

pub(super) const SECTOR: u64 = 512;
const GD_AT_END: u64 = u64::MAX;
const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZERO_GTE: u32 = 1 << 2;
const FLAG_MARKERS: u32 = 1 << 17;
const COMPRESS_DEFLATE: u16 = 1;
/// The spec fixes hosted grain tables at 512 entries.
const HOSTED_GTES_PER_GT: u32 = 512;
/// Grains are powers of two from 4 KiB (the spec's minimum for hosted extents) to 1 MiB; real
/// ones are 64 KiB. A larger grain would let one read allocate without bound.
const HOSTED_GRAIN_SECTORS: std::ops::RangeInclusive<u64> = 8..=2048;
/// 4 Mi entries (16 MiB) cover 8 TiB, the largest hosted disk, with the smallest grains.
const MAX_GD_ENTRIES: u64 = 1 << 22;

/// A hosted sparse extent file, opened: the extent, and what its header says beside it.
#[derive(Debug)]
pub(super) struct HostedSparse {
    pub(super) extent: SparseExtent,
    /// The embedded descriptor of a monolithicSparse or streamOptimized file; `None` for the
    /// extents of a twoGbMaxExtentSparse disk, which leave the space empty.
    pub(super) descriptor: Option<Descriptor>,
    pub(super) warnings: Vec<String>,
}

/// The fields of a hosted sparse header (or footer) that reading needs.
#[derive(Debug, Clone, Copy)]
struct Header {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_size: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    gtes_per_gt: u32,
    rgd_offset: u64,
    gd_offset: u64,
    unclean_shutdown: bool,
    compress_algorithm: u16,
}

pub(super) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

pub(super) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

impl Header {
    /// Parses a 512-byte sector that starts with "KDMV".
    fn parse(sector: &[u8; 512]) -> Header {
        Header {
            version: u32_at(sector, 4),
            flags: u32_at(sector, 8),
            capacity: u64_at(sector, 12),
            grain_size: u64_at(sector, 20),
            descriptor_offset: u64_at(sector, 28),
            descriptor_size: u64_at(sector, 36),
            gtes_per_gt: u32_at(sector, 44),
            rgd_offset: u64_at(sector, 48),
            gd_offset: u64_at(sector, 56),
            unclean_shutdown: sector[72] != 0,
            compress_algorithm: u16::from_le_bytes([sector[77], sector[78]]),
        }
    }
}

/// A damaged or impossible sparse extent: the file and what is wrong with it.
pub(super) fn corrupt(path: &Path, message: String) -> SourceError {
    SourceError::BadDescriptor {
        path: path.to_owned(),
        line: None,
        message,
    }
}

fn read_sector(slice: &FileSlice, offset: u64) -> Result<[u8; 512], SourceError> {
    let mut sector = [0; 512];
    slice
        .read_exact_at(&mut sector, offset)
        .map_err(|source| SourceError::Io {
            path: slice.path.clone(),
            action: "read the sparse VMDK",
            source,
        })?;
    Ok(sector)
}

impl HostedSparse {
    /// Opens the hosted sparse extent ("KDMV") held in `slice`: checks its header, finds its
    /// footer if the grain directory is at the end, reads the grain directory and the
    /// embedded descriptor.
    pub(super) fn open(slice: FileSlice) -> Result<HostedSparse, SourceError> {
        let path = slice.path.clone();
        let bad = |message: String| corrupt(&path, message);
        if slice.len < SECTOR {
            return Err(bad(format!(
                "{} bytes is too short for a sparse VMDK (its header alone is 512 bytes); the file is truncated",
                slice.len
            )));
        }
        let first = read_sector(&slice, 0)?;
        if &first[..4] != b"KDMV" {
            return Err(bad("not a hosted sparse VMDK extent (no KDMV magic)".to_owned()));
        }
        let mut header = Header::parse(&first);
        if !(1..=3).contains(&header.version) {
            return Err(SourceError::Unsupported {
                path: path.clone(),
                what: format!("sparse VMDK version {}", header.version),
                advice: "convert it with `qemu-img convert -O raw` and point the .vmx at the result".to_owned(),
            });
        }
        let mut warnings = Vec::new();
        if header.gd_offset == GD_AT_END {
            let footer = find_footer(&slice)?;
            let descriptor = (header.descriptor_offset, header.descriptor_size);
            header = footer;
            // The footer repeats the header; keep the header's word on the descriptor.
            (header.descriptor_offset, header.descriptor_size) = descriptor;
            if header.gd_offset == GD_AT_END {
                return Err(bad(
                    "the footer too says the grain directory is at the end (GD_AT_END): the file is corrupt".to_owned(),
                ));
            }
        }
        if header.unclean_shutdown {
            warnings.push(format!(
                "{} was not closed cleanly (its uncleanShutdown flag is set): if the VM is running, \
                 power it off or take a snapshot first, or the copy may be inconsistent",
                path.display()
            ));
        }
        let compressed = match header.compress_algorithm {
            0 => false,
            COMPRESS_DEFLATE => true,
            other => {
                return Err(SourceError::Unsupported {
                    path: path.clone(),
                    what: format!("sparse VMDK compression algorithm {other} (only 1, deflate, is known)"),
                    advice: "convert it with `qemu-img convert -O raw` and point the .vmx at the result".to_owned(),
                });
            }
        };
        if header.gtes_per_gt != HOSTED_GTES_PER_GT {
            return Err(bad(format!(
                "numGTEsPerGT is {}, but hosted sparse extents have {HOSTED_GTES_PER_GT}: the header is corrupt",
                header.gtes_per_gt
            )));
        }
        let grain = header.grain_size;
        if !grain.is_power_of_two() || !HOSTED_GRAIN_SECTORS.contains(&grain) {
            return Err(bad(format!(
                "grain size {grain} sectors is not a power of two from {} to {} (4 KiB to 1 MiB): the header is corrupt",
                HOSTED_GRAIN_SECTORS.start(),
                HOSTED_GRAIN_SECTORS.end()
            )));
        }
        let mut gd_sector = header.gd_offset;
        if gd_sector == 0 && header.flags & FLAG_RGD != 0 {
            // Only the redundant copy is recorded; it is as good as the primary.
            gd_sector = header.rgd_offset;
        }
        let layout = Layout {
            capacity_sectors: header.capacity,
            grain_sectors: grain,
            gtes_per_gt: u64::from(header.gtes_per_gt),
            gd_sector,
        };
        let (capacity, gd) = layout.read_gd(&slice)?;
        let zero_gte = header.flags & FLAG_ZERO_GTE != 0;
        layout.check_grains(&slice, &gd, zero_gte, compressed)?;
        let descriptor = read_embedded_descriptor(&slice, &header)?;
        Ok(HostedSparse {
            extent: SparseExtent::new(
                ExtentFile::Open(slice),
                capacity,
                layout,
                &gd,
                zero_gte,
                compressed,
                header.flags & FLAG_MARKERS != 0,
            ),
            descriptor,
            warnings,
        })
    }
}

/// Where a sparse extent's grain directory is and what it maps; shared by KDMV and COWD.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    pub(super) capacity_sectors: u64,
    pub(super) grain_sectors: u64,
    pub(super) gtes_per_gt: u64,
    pub(super) gd_sector: u64,
}

impl Layout {
    /// Checks the sizes and reads the grain directory; returns the capacity in bytes and
    /// the directory. Every table the directory names must lie within the file.
    pub(super) fn read_gd(&self, slice: &FileSlice) -> Result<(u64, Box<[u32]>), SourceError> {
        let bad = |message: String| corrupt(&slice.path, message);
        let capacity = self
            .capacity_sectors
            .checked_mul(SECTOR)
            .filter(|&bytes| bytes > 0)
            .ok_or_else(|| {
                bad(format!(
                    "capacity {} sectors is not a possible disk size: the header is corrupt",
                    self.capacity_sectors
                ))
            })?;
        let grains = self.capacity_sectors.div_ceil(self.grain_sectors);
        let tables = grains.div_ceil(self.gtes_per_gt);
        if tables > MAX_GD_ENTRIES {
            return Err(bad(format!(
                "capacity {} sectors in grains of {} sectors needs {tables} grain tables, more than \
                 the {MAX_GD_ENTRIES} of any real disk: the header is corrupt",
                self.capacity_sectors, self.grain_sectors
            )));
        }
        let gd_bytes = tables * 4;
        let gd_at = self.gd_sector.checked_mul(SECTOR);
        let fits = gd_at
            .and_then(|at| at.checked_add(gd_bytes))
            .is_some_and(|end| end <= slice.len);
        if self.gd_sector == 0 || !fits {
            return Err(bad(format!(
                "the grain directory ({tables} entries at sector {}) does not lie within the file \
                 ({} bytes): the file is truncated or corrupt",
                self.gd_sector, slice.len
            )));
        }
        let gd_at = self.gd_sector * SECTOR;
        // Bounded by MAX_GD_ENTRIES and by the file's length.
        let bytes = slice.read_vec(gd_at, gd_bytes as usize)?;
        let gd: Box<[u32]> = bytes.chunks_exact(4).map(|w| u32_at(w, 0)).collect();
        let table_bytes = self.gtes_per_gt * 4;
        for (index, &sector) in gd.iter().enumerate() {
            let end = u64::from(sector) * SECTOR + table_bytes;
            if sector != 0 && end > slice.len {
                return Err(bad(format!(
                    "grain directory entry {index} points to sector {sector}, but a grain table \
                     there would end past the end of the file ({} bytes): the file is truncated or corrupt",
                    slice.len
                )));
            }
        }
        Ok((capacity, gd))
    }
}

/// A streamOptimized file whose header says GD_AT_END keeps its real header in a footer:
/// footer marker, footer, end-of-stream marker (a zero sector), the footer 1024 bytes before
/// the end. Padding after the stream is tolerated: the footer is the last sector that is not
/// all zeros, within the last MiB.
fn find_footer(slice: &FileSlice) -> Result<Header, SourceError> {
    let whole_sectors = slice.len / SECTOR;
    let tail_sectors = whole_sectors.min(2048);
    let tail_at = (whole_sectors - tail_sectors) * SECTOR;
    let tail = slice.read_vec(tail_at, (tail_sectors * SECTOR) as usize)?;
    let last_data = tail
        .chunks_exact(SECTOR as usize)
        .rposition(|sector| sector.iter().any(|&b| b != 0));
    let footer = last_data.and_then(|index| {
        let at = tail_at + index as u64 * SECTOR;
        let sector = &tail[index * SECTOR as usize..(index + 1) * SECTOR as usize];
        (at > 0 && sector.starts_with(b"KDMV")).then(|| {
            let mut copy = [0; 512];
            copy.copy_from_slice(sector);
            Header::parse(&copy)
        })
    });
    footer.ok_or_else(|| {
        corrupt(
            &slice.path,
            "the header says the grain directory is at the end of the file (GD_AT_END), but \
             there is no footer there: the streamOptimized file is truncated"
                .to_owned(),
        )
    })
}

fn read_embedded_descriptor(slice: &FileSlice, header: &Header) -> Result<Option<Descriptor>, SourceError> {
    if header.descriptor_offset == 0 || header.descriptor_size == 0 {
        return Ok(None);
    }
    let size = header
        .descriptor_size
        .checked_mul(SECTOR)
        .filter(|&size| size <= DESCRIPTOR_SIZE_LIMIT);
    let at = header.descriptor_offset.checked_mul(SECTOR);
    let (Some(size), Some(at)) = (size, at) else {
        return Err(corrupt(
            &slice.path,
            format!(
                "the embedded descriptor ({} sectors at sector {}) is larger than any descriptor: the header is corrupt",
                header.descriptor_size, header.descriptor_offset
            ),
        ));
    };
    if at.checked_add(size).is_none_or(|end| end > slice.len) {
        return Err(corrupt(
            &slice.path,
            format!(
                "the embedded descriptor ({} sectors at sector {}) lies past the end of the file \
                 ({} bytes): the file is truncated",
                header.descriptor_size, header.descriptor_offset, slice.len
            ),
        ));
    }
    let bytes = slice.read_vec(at, size as usize)?;
    if bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    Descriptor::parse(&slice.path, &bytes).map(Some)
}

/// ESX sparse extents (COWD: the `-delta.vmdk` of a vmfsSparse snapshot) have tables of 4096
/// entries.
const COWD_GTES_PER_GT: u64 = 4096;

/// Opens an ESX sparse extent ("COWD", the VMFSSPARSE extent of a vmfsSparse snapshot delta):
/// a 2048-byte header (magic, version 1, flags, numSectors, grainSize, gdOffset,
/// numGDEntries, all u32; then the parent's name, which the descriptor also gives), a grain
/// directory and tables of 4096 entries, grains usually of one sector. No zero grains, no
/// compression: an entry of 0 reads from the parent.
pub(super) fn open_cowd(slice: FileSlice) -> Result<SparseExtent, SourceError> {
    let bad = |message: String| corrupt(&slice.path, message);
    if slice.len < 4 * SECTOR {
        return Err(bad(format!(
            "{} bytes is too short for an ESX sparse extent (its header alone is 2048 bytes); the file is truncated",
            slice.len
        )));
    }
    let header = read_sector(&slice, 0)?;
    if &header[..4] != b"COWD" {
        return Err(bad("not an ESX sparse extent (no COWD magic)".to_owned()));
    }
    let version = u32_at(&header, 4);
    if version != 1 {
        return Err(SourceError::Unsupported {
            path: slice.path.clone(),
            what: format!("ESX sparse extent (COWD) version {version}"),
            advice: "consolidate the VM's snapshots first, or convert the chain with `qemu-img convert -O raw`"
                .to_owned(),
        });
    }
    let capacity_sectors = u64::from(u32_at(&header, 12));
    let grain = u64::from(u32_at(&header, 16));
    let gd_sector = u64::from(u32_at(&header, 20));
    let gd_entries = u64::from(u32_at(&header, 24));
    if !grain.is_power_of_two() || grain > *HOSTED_GRAIN_SECTORS.end() {
        return Err(bad(format!(
            "grain size {grain} sectors is not a power of two from 1 to {} (512 bytes to 1 MiB): the header is corrupt",
            HOSTED_GRAIN_SECTORS.end()
        )));
    }
    let needed = capacity_sectors.div_ceil(grain).div_ceil(COWD_GTES_PER_GT);
    if gd_entries < needed {
        return Err(bad(format!(
            "the grain directory has {gd_entries} entries but {capacity_sectors} sectors in grains of              {grain} need {needed}: the header is corrupt"
        )));
    }
    let layout = Layout {
        capacity_sectors,
        grain_sectors: grain,
        gtes_per_gt: COWD_GTES_PER_GT,
        gd_sector,
    };
    let (capacity, gd) = layout.read_gd(&slice)?;
    layout.check_grains(&slice, &gd, false, false)?;
    Ok(SparseExtent::new(
        ExtentFile::Open(slice),
        capacity,
        layout,
        &gd,
        false,
        false,
        false,
    ))
}

/// Opens a hosted sparse or streamOptimized VMDK stored in `slice` (for example a member of
/// an OVA archive, read in place). It is read on its own: a snapshot delta, which would need
/// its parent, is refused.
pub(crate) fn open_sparse_slice(slice: FileSlice) -> Result<Opened, SourceError> {
    let path = slice.path.clone();
    let mut magic = [0; 4];
    if slice.len >= 4 {
        slice.read_exact_at(&mut magic, 0).map_err(|source| SourceError::Io {
            path: path.clone(),
            action: "read the sparse VMDK",
            source,
        })?;
    }
    if &magic == b"COWD" {
        return Err(super::vmdk_chain::cowd_unsupported(&path));
    }
    let hosted = HostedSparse::open(slice)?;
    if let Some(hint) = hosted.descriptor.as_ref().and_then(|d| d.parent_hint.as_deref()) {
        return Err(SourceError::Unsupported {
            path,
            what: format!("a snapshot delta (of {}) on its own", super::vmx::quote(hint)),
            advice: "consolidate the VM's snapshots before exporting it".to_owned(),
        });
    }
    Ok(super::vmdk_chain::single_extent(&path, hosted))
}

#[cfg(test)]
#[path = "vmdk_sparse_tests.rs"]
mod tests;
