//! Disks with hosted sparse extents, and snapshot chains, read as one flattened disk.
//!
//! A snapshot delta is a VMDK whose descriptor names its parent (`parentFileNameHint`, resolved
//! against the delta's folder) and the parent's content ID (`parentCID`); the parent may be
//! flat, sparse or itself a delta. A grain the delta does not hold reads from the parent (or
//! as zeros past the parent's end); the chain's capacity is the delta's. The parent's `CID`
//! must equal the child's `parentCID`: otherwise the parent changed after the snapshot was
//! taken and the chain would read as a mix of two disks.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk::{open_read_only, Opened};
use super::slice::FileSlice;
use super::vmdk::{self, Descriptor, DESCRIPTOR_SIZE_LIMIT};
use super::vmdk_sparse::{self, corrupt, ExtentFile, HostedSparse, SparseExtent, SECTOR};
use super::vmx::quote;
use super::{check_range, ChainLink, DiskFormat, DiskReader, SourceError};

/// More disks than any real snapshot chain has (VMware allows 32 snapshots); bounds the work
/// and the recursion of a hostile chain.
pub(super) const MAX_CHAIN_DEPTH: usize = 255;

/// Up to this many extent files of one descriptor stay open; beyond that each read opens its
/// extent, as for flat extents.
const KEEP_OPEN_EXTENTS: usize = 64;

const CHAIN_ADVICE: &str = "copy every .vmdk of the VM's folder together, or consolidate the \
     VM's snapshots (delete all snapshots) and copy it again";

/// The error for an ESX sparse extent ("COWD") opened on its own: it is read through the
/// descriptor that names it and its parent.
pub(super) fn cowd_unsupported(path: &Path) -> SourceError {
    SourceError::Unsupported {
        path: path.to_owned(),
        what: "an ESX sparse extent (COWD, the -delta file of a vmfsSparse snapshot) read on its own".to_owned(),
        advice: "open the snapshot's descriptor instead (the .vmdk without -delta in its name), which \
                 names this file and its parent"
            .to_owned(),
    }
}

/// A disk made of extents laid end to end, over an optional parent.
#[derive(Debug)]
pub(super) struct LayeredDisk {
    capacity: u64,
    /// Sorted by `start`, contiguous, none empty.
    pieces: Vec<Piece>,
    parent: Option<Parent>,
    /// This disk as a link of its chain.
    link: ChainLink,
}

/// The disk a delta was taken from.
#[derive(Debug)]
struct Parent {
    disk: Box<dyn DiskReader>,
    link: ChainLink,
}

#[derive(Debug)]
struct Piece {
    /// Logical byte range `[start, end)` of the disk.
    start: u64,
    end: u64,
    data: PieceData,
}

#[derive(Debug)]
enum PieceData {
    Sparse(SparseExtent),
    /// A FLAT / VMFS extent: the file's bytes from `offset` (checked at open to hold the
    /// whole extent).
    Flat {
        file: ExtentFile,
        offset: u64,
    },
    Zero,
}

impl LayeredDisk {
    /// Whether this is one or more streamOptimized extents of their own.
    fn is_stream_optimized(&self) -> bool {
        self.parent.is_none()
            && self
                .pieces
                .iter()
                .all(|piece| matches!(&piece.data, PieceData::Sparse(extent) if extent.is_compressed()))
    }

    /// Reads the parent's bytes at `offset`; zeros where there is no parent or past its end.
    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let inside = match self.parent.as_ref().map(|p| &p.disk) {
            None => 0,
            Some(parent) => {
                let inside = parent.capacity().saturating_sub(offset).min(buf.len() as u64) as usize;
                if inside > 0 {
                    parent.read_at(offset, &mut buf[..inside])?;
                }
                inside
            }
        };
        buf[inside..].fill(0);
        Ok(())
    }

    fn parent_is_hole(&self, offset: u64, len: u64) -> bool {
        match self.parent.as_ref().map(|p| &p.disk) {
            None => true,
            Some(parent) => {
                let inside = parent.capacity().saturating_sub(offset).min(len);
                inside == 0 || parent.is_hole(offset, inside)
            }
        }
    }
}

impl DiskReader for LayeredDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        let mut pos = offset;
        let mut done = 0;
        while done < buf.len() {
            let index = self.pieces.partition_point(|piece| piece.end <= pos);
            let piece = &self.pieces[index];
            let within = pos - piece.start;
            // Bounded by the buffer's length, so it fits in usize.
            let count = (piece.end - pos).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + count];
            match &piece.data {
                PieceData::Zero => chunk.fill(0),
                PieceData::Sparse(extent) => {
                    let start = piece.start;
                    extent.read_at(within, chunk, &mut |at, part| self.read_parent(start + at, part))?;
                }
                PieceData::Flat { file, offset } => file.read_exact_at(chunk, offset + within)?,
            }
            done += count;
            pos += count as u64;
        }
        Ok(())
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.capacity);
        let mut pos = offset;
        while pos < end {
            let index = self.pieces.partition_point(|piece| piece.end <= pos);
            let Some(piece) = self.pieces.get(index) else {
                return false;
            };
            let within = pos - piece.start;
            let count = piece.end.min(end) - pos;
            let hole = match &piece.data {
                PieceData::Zero => true,
                PieceData::Sparse(extent) => {
                    let start = piece.start;
                    extent.is_hole(within, count, &mut |at, n| self.parent_is_hole(start + at, n))
                }
                PieceData::Flat { file, offset } => file.is_hole(offset + within, count),
            };
            if !hole {
                return false;
            }
            pos += count;
        }
        true
    }

    fn snapshot_chain(&self) -> Vec<ChainLink> {
        let mut chain = vec![self.link.clone()];
        if let Some(parent) = &self.parent {
            let above = parent.disk.snapshot_chain();
            // A flat base does not know its place in the chain.
            if above.is_empty() {
                chain.push(parent.link.clone());
            } else {
                chain.extend(above);
            }
        }
        chain
    }

    fn written_by_newest(&self) -> Option<io::Result<Vec<Range<u64>>>> {
        self.parent.as_ref()?;
        let mut written: Vec<Range<u64>> = Vec::new();
        for piece in &self.pieces {
            let ranges: Vec<Range<u64>> = match &piece.data {
                PieceData::Sparse(extent) => match extent.written_grains() {
                    Ok(ranges) => ranges
                        .into_iter()
                        .map(|r| piece.start + r.start..(piece.start + r.end).min(piece.end))
                        .collect(),
                    Err(e) => return Some(Err(e)),
                },
                // A delta's flat or zero extent replaces its parent's bytes entirely.
                PieceData::Flat { .. } | PieceData::Zero => std::iter::once(piece.start..piece.end).collect(),
            };
            for range in ranges.into_iter().filter(|r| r.start < r.end) {
                match written.last_mut() {
                    Some(last) if last.end == range.start => last.end = range.end,
                    _ => written.push(range),
                }
            }
        }
        Some(Ok(written))
    }
}

/// One disk of a chain, opened with its parents.
struct Layer {
    disk: Box<dyn DiskReader>,
    /// The disk's content ID, from its descriptor.
    cid: Option<String>,
    stream_optimized: bool,
}

/// The disks of a chain opened so far (to find loops) and what to tell the operator.
struct Walk {
    /// Canonical paths, child first.
    visited: Vec<PathBuf>,
    names: Vec<String>,
    warnings: Vec<String>,
}

impl Walk {
    fn start(path: &Path) -> Walk {
        let mut walk = Walk {
            visited: Vec::new(),
            names: Vec::new(),
            warnings: Vec::new(),
        };
        walk.visit(path);
        walk
    }

    /// Records `path`; returns its canonical form if it was already in the chain.
    fn visit(&mut self, path: &Path) -> Option<PathBuf> {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        if self.visited.contains(&canonical) {
            return Some(canonical);
        }
        self.visited.push(canonical);
        self.names.push(display_name(path));
        None
    }

    fn finish(mut self, top: Layer) -> Opened {
        if self.names.len() > 1 {
            self.warnings.push(format!(
                "a snapshot chain of {} disks is migrated as one disk, as the VM sees it now: {}",
                self.names.len(),
                self.names.join(" → ")
            ));
        }
        Opened {
            reader: top.disk,
            format: if top.stream_optimized {
                DiskFormat::VmdkStreamOptimized
            } else {
                DiskFormat::VmdkSparse
            },
            warnings: self.warnings,
        }
    }
}

fn display_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// Opens a hosted sparse file ("KDMV" magic) given by path, with its parents if it is a delta.
pub(super) fn open_hosted(path: &Path, file: File, len: u64) -> Result<Opened, SourceError> {
    let slice = FileSlice {
        path: path.to_owned(),
        file: Arc::new(file),
        start: 0,
        len,
    };
    let mut walk = Walk::start(path);
    let layer = open_kdmv_layer(path, slice, &mut walk)?;
    Ok(walk.finish(layer))
}

/// Opens a parsed text descriptor that has SPARSE extents or a parent.
pub(super) fn open_descriptor(path: &Path, descriptor: &Descriptor) -> Result<Opened, SourceError> {
    let mut walk = Walk::start(path);
    let layer = open_descriptor_layer(path, descriptor, &mut walk)?;
    Ok(walk.finish(layer))
}

/// A lone hosted sparse extent (no parent) as an opened disk.
pub(super) fn single_extent(path: &Path, hosted: HostedSparse) -> Opened {
    let mut walk = Walk::start(path);
    walk.warnings.extend(hosted.warnings);
    let stream_optimized = hosted.extent.is_compressed();
    let capacity = hosted.extent.capacity();
    let disk = LayeredDisk {
        capacity,
        pieces: vec![Piece {
            start: 0,
            end: capacity,
            data: PieceData::Sparse(hosted.extent),
        }],
        parent: None,
        link: link_of(path, None),
    };
    walk.finish(Layer {
        disk: Box::new(disk),
        cid: None,
        stream_optimized,
    })
}

fn open_kdmv_layer(path: &Path, slice: FileSlice, walk: &mut Walk) -> Result<Layer, SourceError> {
    let hosted = HostedSparse::open(slice)?;
    walk.warnings.extend(hosted.warnings);
    let capacity = hosted.extent.capacity();
    let parent = match &hosted.descriptor {
        Some(descriptor) => open_parent(path, descriptor, walk)?,
        None => None,
    };
    let cid = hosted.descriptor.as_ref().and_then(|d| d.cid.clone());
    let disk = LayeredDisk {
        capacity,
        pieces: vec![Piece {
            start: 0,
            end: capacity,
            data: PieceData::Sparse(hosted.extent),
        }],
        parent,
        link: link_of(path, cid),
    };
    Ok(Layer {
        stream_optimized: disk.is_stream_optimized(),
        disk: Box::new(disk),
        cid: hosted.descriptor.and_then(|d| d.cid),
    })
}

fn open_descriptor_layer(path: &Path, descriptor: &Descriptor, walk: &mut Walk) -> Result<Layer, SourceError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let keep_open = descriptor.extents.len() <= KEEP_OPEN_EXTENTS;
    let mut pieces = Vec::with_capacity(descriptor.extents.len());
    let mut start = 0u64;
    for line in &descriptor.extents {
        let bad = |message: String| SourceError::BadDescriptor {
            path: path.to_owned(),
            line: Some(line.line),
            message,
        };
        let len = line.sectors.checked_mul(SECTOR).ok_or_else(|| {
            bad(format!(
                "extent size {} sectors is too large to be a disk; the descriptor is damaged",
                line.sectors
            ))
        })?;
        let end = start
            .checked_add(len)
            .ok_or_else(|| bad("the extents add up to more than 16 EiB; the descriptor is damaged".to_owned()))?;
        let kind = line.kind.to_ascii_uppercase();
        let data = match (&line.file_name, kind.as_str()) {
            (None, _) | (_, "ZERO") => PieceData::Zero,
            (Some(file_name), "FLAT" | "VMFS") => {
                let offset = line.offset_sectors.checked_mul(SECTOR).ok_or_else(|| {
                    bad(format!(
                        "extent offset {} sectors is too large; the descriptor is damaged",
                        line.offset_sectors
                    ))
                })?;
                let resolved = existing_extent(path, dir, file_name)?;
                let (file, file_len) = open_read_only(&resolved, "open the VMDK extent")?;
                vmdk::check_extent_len(path, line.line, &resolved, file_len, offset, len)?;
                let mut file = ExtentFile::Open(FileSlice {
                    path: resolved,
                    file: Arc::new(file),
                    start: 0,
                    len: file_len,
                });
                if !keep_open {
                    file.close();
                }
                PieceData::Flat { file, offset }
            }
            (Some(file_name), "SPARSE" | "VMFSSPARSE" | "SESPARSE") => {
                let resolved = existing_extent(path, dir, file_name)?;
                let slice = FileSlice::whole(&resolved)?;
                // The file's magic, not the extent type, says which sparse format it is.
                let head = slice.read_vec(0, slice.len.min(8) as usize)?;
                let magic = &head[..head.len().min(4)];
                let mut extent = if magic == b"COWD" {
                    vmdk_sparse::open_cowd(slice)?
                } else if vmdk_sparse::is_se_sparse(&head) {
                    vmdk_sparse::open_se_sparse(slice)?
                } else if magic != b"KDMV" {
                    return Err(bad(format!(
                        "extent {} is a {kind} extent but neither a hosted (KDMV), an ESX (COWD) nor \
                         an SEsparse file; restore it from the source datastore",
                        quote(file_name)
                    )));
                } else {
                    let hosted = HostedSparse::open(slice)?;
                    walk.warnings.extend(hosted.warnings);
                    hosted.extent
                };
                let stored = extent.capacity();
                if stored < len {
                    return Err(SourceError::ExtentShort {
                        descriptor: path.to_owned(),
                        line: line.line,
                        extent: resolved,
                        holds: format!("holds {stored} bytes (the capacity its header gives)"),
                        declared: len,
                    });
                }
                if stored > len {
                    walk.warnings.push(format!(
                        "sparse extent {} holds {stored} bytes but {} line {} gives it {len}; the \
                         rest of the extent is not read",
                        resolved.display(),
                        path.display(),
                        line.line,
                    ));
                }
                if !keep_open {
                    extent.close_file();
                }
                PieceData::Sparse(extent)
            }
            // check_supported refused every other kind.
            (Some(_), _) => {
                return Err(bad(format!("extent type `{}` cannot be read here", quote(&line.kind))));
            }
        };
        if len > 0 {
            pieces.push(Piece { start, end, data });
        }
        start = end;
    }
    if start == 0 {
        return Err(SourceError::EmptyImage { path: path.to_owned() });
    }
    let parent = open_parent(path, descriptor, walk)?;
    let disk = LayeredDisk {
        capacity: start,
        pieces,
        parent,
        link: link_of(path, descriptor.cid.clone()),
    };
    Ok(Layer {
        stream_optimized: disk.is_stream_optimized(),
        disk: Box::new(disk),
        cid: descriptor.cid.clone(),
    })
}

fn existing_extent(descriptor: &Path, dir: &Path, file_name: &str) -> Result<PathBuf, SourceError> {
    let resolved = dir.join(file_name);
    if resolved.exists() {
        Ok(resolved)
    } else {
        Err(SourceError::ExtentMissing {
            descriptor: descriptor.to_owned(),
            file_name: file_name.to_owned(),
            resolved,
        })
    }
}

fn is_no_cid(cid: &str) -> bool {
    cid.eq_ignore_ascii_case("ffffffff")
}

fn same_cid(a: &str, b: &str) -> bool {
    match (u32::from_str_radix(a.trim(), 16), u32::from_str_radix(b.trim(), 16)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.trim().eq_ignore_ascii_case(b.trim()),
    }
}

/// Opens the parent that `descriptor` (of the delta at `child`) names, if any, and checks
/// that it is the disk the delta was taken from.
fn open_parent(child: &Path, descriptor: &Descriptor, walk: &mut Walk) -> Result<Option<Parent>, SourceError> {
    let bad = |message: String| SourceError::BadDescriptor {
        path: child.to_owned(),
        line: None,
        message,
    };
    let parent_cid = descriptor.parent_cid.as_deref().filter(|cid| !is_no_cid(cid));
    let Some(hint) = descriptor.parent_hint.as_deref() else {
        return match parent_cid {
            None => Ok(None),
            Some(cid) => Err(bad(format!(
                "parentCID is {cid}, so this is a snapshot delta, but there is no \
                 parentFileNameHint naming its parent; restore the descriptor from the source datastore"
            ))),
        };
    };
    let parent = resolve_parent(child, hint, walk)?;
    if walk.visited.len() >= MAX_CHAIN_DEPTH {
        return Err(bad(format!(
            "the snapshot chain is more than {MAX_CHAIN_DEPTH} disks deep (at parent {}); \
             consolidate the VM's snapshots",
            parent.display()
        )));
    }
    if walk.visit(&parent).is_some() {
        return Err(bad(format!(
            "the snapshot chain loops: parent {} is already in it ({} → {}); the descriptors are \
             damaged, restore them from the source datastore",
            parent.display(),
            walk.names.join(" → "),
            display_name(&parent)
        )));
    }
    let layer = open_parent_layer(&parent, walk)?;
    match (parent_cid, layer.cid.as_deref()) {
        (Some(expected), Some(actual)) if !same_cid(expected, actual) => {
            return Err(bad(format!(
                "the snapshot chain is broken: its parentCID {expected} does not match the CID \
                 {actual} of its parent {} (the parent was changed after the snapshot was taken, \
                 or it is another disk of the same name); {CHAIN_ADVICE}",
                parent.display()
            )));
        }
        (Some(_), Some(_)) => {}
        (Some(expected), None) => {
            return Err(bad(format!(
                "the parent {} has no CID to check against this delta's parentCID {expected}, \
                 so it cannot be the disk the snapshot was taken from; {CHAIN_ADVICE}",
                parent.display()
            )));
        }
        (None, _) => walk.warnings.push(format!(
            "{} names parent {} without a parentCID; the chain is read unchecked",
            child.display(),
            parent.display()
        )),
    }
    Ok(Some(Parent {
        disk: layer.disk,
        link: link_of(&parent, layer.cid),
    }))
}

fn link_of(path: &Path, cid: Option<String>) -> ChainLink {
    ChainLink {
        path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
        cid,
    }
}

/// The parent's path: the hint resolved against the child's folder; if that does not exist
/// (a hint written as an absolute path on the original host), the same file name in the
/// child's folder.
fn resolve_parent(child: &Path, hint: &str, walk: &mut Walk) -> Result<PathBuf, SourceError> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let direct = dir.join(hint);
    if direct.exists() {
        return Ok(direct);
    }
    let base = hint.rsplit(['/', '\\']).next().unwrap_or(hint);
    let local = dir.join(base);
    if !base.is_empty() && local.exists() {
        walk.warnings.push(format!(
            "{}: parent {} not found there; using {} from the same folder",
            child.display(),
            quote(hint),
            local.display()
        ));
        return Ok(local);
    }
    Err(SourceError::BadDescriptor {
        path: child.to_owned(),
        line: None,
        message: format!(
            "this snapshot delta's parent {} does not exist ({}); {CHAIN_ADVICE}",
            quote(hint),
            direct.display()
        ),
    })
}

/// Opens a parent disk of any VMDK kind: hosted sparse, a descriptor (sparse, delta or flat).
fn open_parent_layer(path: &Path, walk: &mut Walk) -> Result<Layer, SourceError> {
    let slice = FileSlice::whole(path)?;
    if slice.len == 0 {
        return Err(SourceError::EmptyImage { path: path.to_owned() });
    }
    let head = slice.read_vec(0, slice.len.min(SECTOR) as usize)?;
    if head.starts_with(b"KDMV") {
        return open_kdmv_layer(path, slice, walk);
    }
    if head.starts_with(b"COWD") {
        return Err(cowd_unsupported(path));
    }
    if !vmdk::looks_like_descriptor(&head) {
        return Err(corrupt(
            path,
            "this snapshot parent is not a VMDK (neither a descriptor nor a sparse extent); \
             restore it from the source datastore"
                .to_owned(),
        ));
    }
    if slice.len > DESCRIPTOR_SIZE_LIMIT {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
            what: "VMDK descriptor",
            size: slice.len,
            limit: DESCRIPTOR_SIZE_LIMIT,
        });
    }
    let bytes = slice.read_vec(0, slice.len as usize)?;
    let descriptor = Descriptor::parse(path, &bytes)?;
    descriptor.check_supported(path)?;
    if descriptor.needs_chain_reader() {
        return open_descriptor_layer(path, &descriptor, walk);
    }
    // A flat base disk: the flat reader, which also bounds how many extent files stay open.
    let opened = vmdk::open_descriptor(path, &slice.file, slice.len)?;
    walk.warnings.extend(opened.warnings);
    Ok(Layer {
        disk: opened.reader,
        cid: descriptor.cid,
        stream_optimized: false,
    })
}

#[cfg(test)]
#[path = "vmdk_chain_tests.rs"]
mod tests;
