//! VMDK text descriptors and the FLAT / VMFS / ZERO extents they describe.
//!
//! A descriptor is a small text file: header keys (`createType`, `parentCID`,
//! `parentFileNameHint`), extent lines (`RW 2097152 FLAT "disk-flat.vmdk" 0`: access, size in
//! 512-byte sectors, type, file, offset in sectors) and `ddb.*` keys. The disk is the
//! extents one after the other. Descriptors with sparse extents or a parent are handed to
//! [`super::vmdk_chain`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::disk::{open_read_only, read_bytes, read_error, Opened};
use super::vmx::quote;
use super::{check_range, DiskFormat, DiskReader, SourceError};

/// Most descriptors are a few hundred bytes, but a twoGbMaxExtentFlat one has a ~45-byte line
/// per 2 GiB: about 200 KiB for an 8 TiB disk (the largest hosted disk). 64 KiB would refuse
/// disks over ~3 TiB; 1 MiB still keeps a mistaken multi-GiB file out of memory.
pub(crate) const DESCRIPTOR_SIZE_LIMIT: u64 = 1024 * 1024;

/// More extents than any real disk has; bounds the work done for a hostile descriptor.
pub(crate) const MAX_EXTENTS: usize = 10_000;

/// Up to this many extent files stay open; beyond that (a large twoGbMaxExtentFlat) each read
/// opens its extent, so one disk cannot use up the process's file descriptors.
const KEEP_OPEN_EXTENTS: usize = 64;

const SECTOR: u64 = 512;

const SPARSE_ADVICE: &str = "convert it with `qemu-img convert -O raw` (or `-O vmdk -o subformat=monolithicFlat`) \
     and point the .vmx at the result";

/// True when the first bytes of a file are a VMDK text descriptor.
pub(crate) fn looks_like_descriptor(head: &[u8]) -> bool {
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let start = head.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(head.len());
    if head[start..].starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    // Hand-written descriptors sometimes lack the header comment.
    !head.contains(&0)
        && String::from_utf8_lossy(head)
            .to_ascii_lowercase()
            .contains("createtype")
}

/// Parses the descriptor in `file` and opens its extents.
pub(crate) fn open_descriptor(path: &Path, file: &File, len: u64) -> Result<Opened, SourceError> {
    if len > DESCRIPTOR_SIZE_LIMIT {
        return Err(SourceError::TooLarge {
            path: path.to_owned(),
            what: "VMDK descriptor",
            size: len,
            limit: DESCRIPTOR_SIZE_LIMIT,
        });
    }
    let bytes = read_bytes(path, file, 0, len as usize)?;
    let descriptor = Descriptor::parse(path, &bytes)?;
    descriptor.check_supported(path)?;
    if descriptor.needs_chain_reader() {
        return super::vmdk_chain::open_descriptor(path, &descriptor);
    }
    FlatVmdk::open(path, &descriptor)
}

/// What a descriptor says, before any extent file is looked at.
#[derive(Debug, Default)]
pub(super) struct Descriptor {
    pub(super) create_type: Option<String>,
    pub(super) cid: Option<String>,
    pub(super) parent_cid: Option<String>,
    pub(super) parent_hint: Option<String>,
    pub(super) extents: Vec<ExtentLine>,
}

#[derive(Debug)]
pub(super) struct ExtentLine {
    pub(super) line: usize,
    pub(super) access: String,
    pub(super) sectors: u64,
    pub(super) kind: String,
    pub(super) file_name: Option<String>,
    pub(super) offset_sectors: u64,
}

impl Descriptor {
    pub(super) fn parse(path: &Path, bytes: &[u8]) -> Result<Self, SourceError> {
        let bad = |line: Option<usize>, message: String| SourceError::BadDescriptor {
            path: path.to_owned(),
            line,
            message,
        };
        // qemu-img pads the descriptor it writes to a whole sector with NULs, and when it
        // rewrites a CID in place with a shorter one it can leave a stray NUL inside the
        // text: NULs are noise, any other control byte means a damaged file.
        let bytes: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0).collect();
        if bytes.iter().any(|&b| b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) {
            return Err(bad(
                None,
                "the descriptor contains binary data; it is damaged, restore it from the source datastore".to_owned(),
            ));
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            bad(
                None,
                "the descriptor is not valid UTF-8; it is damaged, restore it from the source datastore".to_owned(),
            )
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);

        let mut descriptor = Descriptor::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let first = trimmed.split_whitespace().next().unwrap_or_default();
            if ["RW", "RDONLY", "NOACCESS"]
                .iter()
                .any(|access| first.eq_ignore_ascii_case(access))
            {
                if descriptor.extents.len() == MAX_EXTENTS {
                    return Err(bad(
                        Some(line),
                        format!("more than {MAX_EXTENTS} extents; this is not a real disk descriptor"),
                    ));
                }
                let extent = parse_extent(trimmed, line).map_err(|m| bad(Some(line), m))?;
                descriptor.extents.push(extent);
            } else if let Some((key, value)) = trimmed.split_once('=') {
                let value = unquote(value.trim()).map_err(|m| bad(Some(line), m))?;
                let slot = match key.trim().to_ascii_lowercase().as_str() {
                    "createtype" => &mut descriptor.create_type,
                    "cid" => &mut descriptor.cid,
                    "parentcid" => &mut descriptor.parent_cid,
                    "parentfilenamehint" => &mut descriptor.parent_hint,
                    // version, encoding, isNativeSnapshot, ddb.*: nothing we need.
                    _ => continue,
                };
                *slot = Some(value);
            } else {
                return Err(bad(
                    Some(line),
                    format!(
                        "expected an extent line such as `RW 2097152 FLAT \"disk-flat.vmdk\" 0` \
                         or `key = \"value\"`, found `{}`; the descriptor is damaged, restore it \
                         from the source datastore",
                        quote(trimmed)
                    ),
                ));
            }
        }
        if descriptor.extents.is_empty() {
            return Err(bad(
                None,
                "the descriptor has no extent lines (it may be truncated); restore it from the source datastore"
                    .to_owned(),
            ));
        }
        Ok(descriptor)
    }

    /// Whether this is a snapshot delta or has hosted sparse extents, read by
    /// [`super::vmdk_chain`] rather than [`FlatVmdk`].
    pub(super) fn needs_chain_reader(&self) -> bool {
        self.parent_hint.is_some()
            || self
                .parent_cid
                .as_deref()
                .is_some_and(|cid| !cid.eq_ignore_ascii_case("ffffffff"))
            || self.extents.iter().any(|e| {
                ["SPARSE", "VMFSSPARSE", "SESPARSE"]
                    .iter()
                    .any(|k| e.kind.eq_ignore_ascii_case(k))
            })
    }

    /// Refuses what no reader here can read: raw device mappings, unknown
    /// and NOACCESS extents.
    pub(super) fn check_supported(&self, path: &Path) -> Result<(), SourceError> {
        let unsupported = |what: String, advice: &str| SourceError::Unsupported {
            path: path.to_owned(),
            what,
            advice: advice.to_owned(),
        };
        let create_type = self.create_type.as_deref().unwrap_or("no createType");
        let lower = create_type.to_ascii_lowercase();
        if lower.contains("rawdevicemap") || lower == "vmfsraw" {
            return Err(unsupported(
                format!("a raw device mapping ({})", quote(create_type)),
                "copy the mapped LUN to a raw image (for example with dd) and point the .vmx at it",
            ));
        }
        for extent in &self.extents {
            let kind = extent.kind.to_ascii_uppercase();
            match kind.as_str() {
                "FLAT" | "VMFS" | "ZERO" | "SPARSE" | "VMFSSPARSE" | "SESPARSE" => {}
                "VMFSRDM" | "VMFSRAW" => {
                    return Err(unsupported(
                        format!("a raw device mapping ({kind} extent)"),
                        "copy the mapped LUN to a raw image (for example with dd) and point the .vmx at it",
                    ));
                }
                _ => {
                    return Err(SourceError::BadDescriptor {
                        path: path.to_owned(),
                        line: Some(extent.line),
                        message: format!(
                            "unknown extent type `{}`; expected FLAT, VMFS, ZERO, SPARSE, \
                             VMFSSPARSE, SESPARSE, VMFSRDM or VMFSRAW",
                            quote(&extent.kind)
                        ),
                    });
                }
            }
            if extent.access.eq_ignore_ascii_case("NOACCESS") {
                return Err(SourceError::BadDescriptor {
                    path: path.to_owned(),
                    line: Some(extent.line),
                    message: "the extent is marked NOACCESS, so the disk cannot be read; \
                              restore the descriptor from the source datastore"
                        .to_owned(),
                });
            }
        }
        let has_sparse = self.needs_chain_reader();
        if lower.contains("sparse") && !has_sparse {
            return Err(unsupported(
                format!("VMDK with SPARSE extents ({})", quote(create_type)),
                SPARSE_ADVICE,
            ));
        }
        Ok(())
    }
}

/// Parses `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
fn parse_extent(text: &str, line: usize) -> Result<ExtentLine, String> {
    let tokens = tokenize(text)?;
    let mut tokens = tokens.into_iter();
    let access = tokens.next().unwrap_or_default();
    let number = |token: Option<String>, what: &str| -> Result<u64, String> {
        let token = token.ok_or_else(|| format!("the extent line has no {what}"))?;
        token.parse::<u64>().map_err(|_| {
            format!(
                "the extent {what} `{}` is not a whole number (of 512-byte sectors)",
                quote(&token)
            )
        })
    };
    let sectors = number(tokens.next(), "size")?;
    let kind = tokens
        .next()
        .ok_or_else(|| "the extent line has no type (FLAT, VMFS, ZERO, ...)".to_owned())?;
    let file_name = tokens.next();
    if file_name.is_none() && !kind.eq_ignore_ascii_case("ZERO") {
        return Err(format!("the {kind} extent line has no file name"));
    }
    let offset_sectors = match tokens.next() {
        Some(token) => number(Some(token), "offset")?,
        None => 0,
    };
    if let Some(extra) = tokens.next() {
        return Err(format!("unexpected `{}` after the extent's offset", quote(&extra)));
    }
    Ok(ExtentLine {
        line,
        access,
        sectors,
        kind,
        file_name,
        offset_sectors,
    })
}

/// Splits on whitespace, keeping `"quoted strings"` (which may hold spaces) as one token.
fn tokenize(text: &str) -> Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted
                .find('"')
                .ok_or("a quoted file name has no closing `\"`; the descriptor may be truncated")?;
            tokens.push(quoted[..end].to_owned());
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            tokens.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
    }
    Ok(tokens)
}

fn unquote(value: &str) -> Result<String, String> {
    match value.strip_prefix('"') {
        Some(inner) => inner
            .strip_suffix('"')
            .map(str::to_owned)
            .ok_or_else(|| "a quoted value has no closing `\"`; the descriptor may be truncated".to_owned()),
        None => Ok(value.to_owned()),
    }
}

/// Refuses a FLAT / VMFS extent whose file ends before the `len` bytes at `offset` that
/// descriptor line `line` declares: read on, the missing part would arrive as zeros.
pub(super) fn check_extent_len(
    descriptor: &Path,
    line: usize,
    extent: &Path,
    file_len: u64,
    offset: u64,
    len: u64,
) -> Result<(), SourceError> {
    if offset.checked_add(len).is_some_and(|end| end <= file_len) {
        return Ok(());
    }
    let holds = if offset == 0 {
        format!("is {file_len} bytes")
    } else {
        format!(
            "is {file_len} bytes, {} of them from the extent's offset of {offset} bytes",
            file_len.saturating_sub(offset)
        )
    };
    Err(SourceError::ExtentShort {
        descriptor: descriptor.to_owned(),
        line,
        extent: extent.to_owned(),
        holds,
        declared: len,
    })
}

/// A disk made of FLAT / VMFS / ZERO extents laid end to end.
#[derive(Debug)]
struct FlatVmdk {
    capacity: u64,
    /// Sorted by `start`, contiguous, none empty.
    extents: Vec<Extent>,
}

#[derive(Debug)]
struct Extent {
    /// Logical byte range `[start, end)` of the disk.
    start: u64,
    end: u64,
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    Zero,
    File {
        path: PathBuf,
        /// `None` when the extent is opened for each read (see [`KEEP_OPEN_EXTENTS`]).
        file: Option<File>,
        /// Byte offset of the extent in the file.
        offset: u64,
    },
}

impl FlatVmdk {
    fn open(path: &Path, descriptor: &Descriptor) -> Result<Opened, SourceError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let keep_open = descriptor.extents.len() <= KEEP_OPEN_EXTENTS;
        let mut extents = Vec::with_capacity(descriptor.extents.len());
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
            let backing = match &line.file_name {
                None => Backing::Zero,
                Some(_) if line.kind.eq_ignore_ascii_case("ZERO") => Backing::Zero,
                Some(file_name) => {
                    let offset = line.offset_sectors.checked_mul(SECTOR).ok_or_else(|| {
                        bad(format!(
                            "extent offset {} sectors is too large; the descriptor is damaged",
                            line.offset_sectors
                        ))
                    })?;
                    let resolved = dir.join(file_name);
                    if !resolved.exists() {
                        return Err(SourceError::ExtentMissing {
                            descriptor: path.to_owned(),
                            file_name: file_name.clone(),
                            resolved,
                        });
                    }
                    let (file, file_len) = open_read_only(&resolved, "open the VMDK extent")?;
                    check_extent_len(path, line.line, &resolved, file_len, offset, len)?;
                    Backing::File {
                        path: resolved,
                        file: keep_open.then_some(file),
                        offset,
                    }
                }
            };
            if len > 0 {
                extents.push(Extent { start, end, backing });
            }
            start = end;
        }
        if start == 0 {
            return Err(SourceError::EmptyImage { path: path.to_owned() });
        }
        Ok(Opened {
            reader: Box::new(FlatVmdk {
                capacity: start,
                extents,
            }),
            format: DiskFormat::VmdkFlat,
            warnings: Vec::new(),
        })
    }
}

impl DiskReader for FlatVmdk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        let mut pos = offset;
        let mut done = 0;
        while done < buf.len() {
            let index = self.extents.partition_point(|extent| extent.end <= pos);
            let extent = &self.extents[index];
            let within = pos - extent.start;
            // Bounded by the buffer's length, so it fits in usize.
            let count = (extent.end - pos).min((buf.len() - done) as u64) as usize;
            let chunk = &mut buf[done..done + count];
            match &extent.backing {
                Backing::Zero => chunk.fill(0),
                // The extent was checked to lie within its file at open: a read that ends
                // early now means the file shrank since, an UnexpectedEof.
                Backing::File { path, file, offset } => {
                    let at = offset + within;
                    let result = match file {
                        Some(file) => file.read_exact_at(chunk, at),
                        None => File::open(path).and_then(|file| file.read_exact_at(chunk, at)),
                    };
                    result.map_err(|e| read_error(path, at, e))?;
                }
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
            let index = self.extents.partition_point(|extent| extent.end <= pos);
            let Some(extent) = self.extents.get(index) else {
                return false;
            };
            let within = pos - extent.start;
            let count = extent.end.min(end) - pos;
            let hole = match &extent.backing {
                Backing::Zero => true,
                Backing::File { file, offset, .. } => file
                    .as_ref()
                    .is_some_and(|f| super::file_range_is_hole(f, offset + within, count)),
            };
            if !hole {
                return false;
            }
            pos += count;
        }
        true
    }
}

#[cfg(test)]
#[path = "vmdk_tests.rs"]
mod tests;
