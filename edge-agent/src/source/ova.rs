//! An OVA: a tar archive holding an OVF package (the `.ovf` first, then an optional `.mf`
//! manifest and `.cert`, then the disk files), read in place without unpacking it.
//!
//! The archive is indexed once by reading its 512-byte tar headers (ustar, with GNU long
//! names, base-256 sizes and pax `path`/`size` records); every disk then becomes a
//! [`SourceDisk`] naming the archive and its member's byte range, and is read through a
//! [`FileSlice`] of the archive.
//!
//! The headers are parsed here rather than with the `tar` crate because its iterator reads
//! GNU long-name and pax records into memory whatever size their header declares, and an
//! OVA comes from outside; here every size is checked before anything is allocated from it.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::claim::{self, Claim};
use super::disk::{self, OpenAs, Opened};
use super::manifest::{self, Manifest};
use super::ovf::{self, Package};
use super::slice::FileSlice;
use super::{check_range, vmdk, ArchiveMember, DiskFormat, DiskReader, SourceError, SourceOptions, SourceVm};

const BLOCK: u64 = 512;

/// More members than any OVA has; bounds the index.
const MAX_MEMBERS: usize = 10_000;

/// Longest member name accepted from a GNU long-name record.
const MAX_NAME_LEN: u64 = 4096;

/// Largest pax extended header accepted.
const MAX_PAX_LEN: u64 = 64 * 1024;

/// Opens an `.ova`: indexes the archive, verifies the manifest, parses the descriptor and
/// opens every disk in place to check it against the descriptor.
pub(crate) fn open_ova(path: &Path, options: &SourceOptions) -> Result<SourceVm, SourceError> {
    let path = std::path::absolute(path).map_err(|source| SourceError::Io {
        path: path.to_owned(),
        action: "resolve the .ova path",
        source,
    })?;
    let (file, len) = disk::open_read_only(&path, "open the OVA archive")?;
    let archive = FileSlice {
        path: path.clone(),
        file: std::sync::Arc::new(file),
        start: 0,
        len,
    };
    let members = index(&archive)?;
    let mut notes = Vec::new();
    // `tar -x` would keep the last of two members with one name, this reader the first: an
    // archive where they could disagree is refused.
    let mut names = std::collections::HashSet::new();
    if let Some(twice) = members.iter().find(|m| !names.insert(m.name.as_str())) {
        return Err(SourceError::BadOvf {
            path: path.clone(),
            member: Some(twice.name.clone()),
            line: None,
            message: "the archive holds two members of this name: it was altered; download it again".to_owned(),
        });
    }

    let descriptors: Vec<&ArchiveMember> = members.iter().filter(|m| has_extension(&m.name, "ovf")).collect();
    let descriptor_member = match descriptors.as_slice() {
        [] => {
            return Err(SourceError::BadOvf {
                path: path.clone(),
                member: None,
                line: None,
                message: "the archive holds no .ovf descriptor: this is not an OVA".to_owned(),
            })
        }
        [one] => *one,
        [..] => {
            let names: Vec<&str> = descriptors.iter().map(|m| m.name.as_str()).collect();
            return Err(SourceError::Unsupported {
                path: path.clone(),
                what: format!("an OVA with several descriptors ({})", names.join(", ")),
                advice: "export each VM as its own OVA".to_owned(),
            });
        }
    };
    if !std::ptr::eq(descriptor_member, &members[0]) {
        notes.push(format!(
            "{} is not the archive's first member, as the OVF specification requires; read anyway",
            descriptor_member.name
        ));
    }
    let package = Package {
        path: path.clone(),
        member: Some(descriptor_member.name.clone()),
        disks_unchecked: options.configuration_only,
    };
    if descriptor_member.len > ovf::DESCRIPTOR_SIZE_LIMIT {
        return Err(SourceError::TooLarge {
            path: path.clone(),
            what: "OVF descriptor",
            size: descriptor_member.len,
            limit: ovf::DESCRIPTOR_SIZE_LIMIT,
        });
    }
    let descriptor_bytes = archive.read_vec(descriptor_member.offset, descriptor_member.len as usize)?;

    let manifest = match find_manifest(&path, &members, descriptor_member)? {
        None => {
            notes.push(ovf::no_manifest_note());
            None
        }
        Some(member) => {
            if member.len > manifest::SIZE_LIMIT {
                return Err(SourceError::TooLarge {
                    path: path.clone(),
                    what: "manifest (.mf)",
                    size: member.len,
                    limit: manifest::SIZE_LIMIT,
                });
            }
            let bytes = archive.read_vec(member.offset, member.len as usize)?;
            let manifest = Manifest::parse(&path, Some(&member.name), &bytes)?;
            manifest.check_bytes(&package, &descriptor_member.name, &descriptor_bytes)?;
            Some(manifest)
        }
    };
    for cert in members.iter().filter(|m| has_extension(&m.name, "cert")) {
        notes.push(format!(
            "the OVA is signed ({}); the signature is not checked, only the manifest's digests",
            cert.name
        ));
    }

    let descriptor = ovf::parse(&package, &descriptor_bytes)?;

    if let Some(manifest) = manifest.as_ref().filter(|_| !package.disks_unchecked) {
        let mut jobs = Vec::new();
        for entry in manifest.entries.iter().filter(|e| e.file != descriptor_member.name) {
            let member = find_member(&members, &entry.file).ok_or_else(|| {
                package.error(
                    None,
                    format!(
                        "the manifest {} lists {}, which is not in the archive: the OVA is incomplete or altered; download it again",
                        manifest.name, entry.file
                    ),
                )
            })?;
            jobs.push((entry, member_slice(&archive, member)?));
        }
        manifest::verify(&package, manifest, &jobs)?;
        let files = std::iter::once(descriptor_member.name.as_str()).chain(ovf::descriptor_files(&descriptor));
        notes.extend(ovf::unlisted_notes(manifest, files));
    }

    let mut disks = Vec::new();
    for described in &descriptor.disks {
        let member = find_member(&members, &described.file.href).ok_or_else(|| {
            package.error(
                Some(described.line),
                format!(
                    "disk {} is {} ({}), which is not in the archive: the OVA is incomplete; download it again",
                    described.key, described.file.id, described.file.href
                ),
            )
        })?;
        let open_as = ovf::open_as(options, &described.key);
        let opened = open_member(&path, member, open_as).map_err(|e| ovf::wrap(&package, &described.key, e))?;
        disks.push(ovf::attach(
            &package,
            described,
            path.clone(),
            Some(member.clone()),
            Some(member.len),
            opened,
            &mut notes,
        )?);
    }
    Ok(ovf::finish(path, descriptor, notes, disks))
}

fn has_extension(name: &str, extension: &str) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(extension))
}

/// The member an href or a manifest line names: as written, else percent-decoded.
fn find_member<'m>(members: &'m [ArchiveMember], name: &str) -> Option<&'m ArchiveMember> {
    let name = name.strip_prefix("./").unwrap_or(name);
    members.iter().find(|m| m.name == name).or_else(|| {
        let decoded = ovf::percent_decode(name)?;
        members.iter().find(|m| m.name == decoded)
    })
}

/// The manifest: the `.mf` named like the descriptor, else the only `.mf`.
fn find_manifest<'m>(
    path: &Path,
    members: &'m [ArchiveMember],
    descriptor: &ArchiveMember,
) -> Result<Option<&'m ArchiveMember>, SourceError> {
    let manifests: Vec<&ArchiveMember> = members.iter().filter(|m| has_extension(&m.name, "mf")).collect();
    let stem = |name: &str| Path::new(name).with_extension("");
    if let Some(named) = manifests.iter().find(|m| stem(&m.name) == stem(&descriptor.name)) {
        return Ok(Some(named));
    }
    match manifests.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        [..] => Err(SourceError::BadOvf {
            path: path.to_owned(),
            member: None,
            line: None,
            message: format!(
                "the archive holds several manifests and none is named like {}: which one applies is unclear",
                descriptor.name
            ),
        }),
    }
}

fn member_slice(archive: &FileSlice, member: &ArchiveMember) -> Result<FileSlice, SourceError> {
    archive
        .sub(member.offset, member.len)
        .ok_or_else(|| truncated(&archive.path, member))
}

fn truncated(archive: &Path, member: &ArchiveMember) -> SourceError {
    SourceError::BadOvf {
        path: archive.to_owned(),
        member: Some(member.name.clone()),
        line: None,
        message: format!(
            "the member's {} bytes at offset {} lie past the end of the archive: the OVA is truncated; download it again",
            member.len, member.offset
        ),
    }
}

/// Opens a disk that is a member of an archive, read in place: a sparse or streamOptimized
/// VMDK ("KDMV"), or a raw image (one whose member name says so, or `open_as` raw).
pub(crate) fn open_member(archive: &Path, member: &ArchiveMember, open_as: OpenAs<'_>) -> Result<Opened, SourceError> {
    let (file, len) = disk::open_read_only(archive, "open the OVA archive")?;
    let whole = FileSlice {
        path: archive.to_owned(),
        file: std::sync::Arc::new(file),
        start: 0,
        len,
    };
    let slice = member_slice(&whole, member)?;
    if slice.len == 0 {
        return Err(SourceError::BadOvf {
            path: archive.to_owned(),
            member: Some(member.name.clone()),
            line: None,
            message: "the disk file is empty (0 bytes): the OVA is incomplete; download it again".to_owned(),
        });
    }
    let role = match open_as {
        OpenAs::Raw => return Ok(raw_member(member, slice)),
        OpenAs::Detect(role) => role,
    };
    let head = slice.read_vec(0, slice.len.min(BLOCK) as usize)?;
    if head.starts_with(b"KDMV") {
        return super::vmdk_sparse::open_sparse_slice(slice);
    }
    if head.starts_with(super::qcow2::MAGIC) {
        return Err(SourceError::Unsupported {
            path: archive.to_owned(),
            what: format!("a qcow2 image as the disk file {} of an OVA", member.name),
            advice: "export the VM again as an OVA with VMDK disks (ovftool's default)".to_owned(),
        });
    }
    let tail = if slice.len >= 2 * BLOCK {
        slice.read_vec(slice.len - BLOCK, BLOCK as usize)?
    } else {
        Vec::new()
    };
    if let Some((what, _)) = disk::foreign_format(&head, &tail) {
        return Err(SourceError::Unsupported {
            path: archive.to_owned(),
            what: format!("{what} as the disk file {} of an OVA", member.name),
            advice: "export the VM again as an OVA with VMDK disks (ovftool's default)".to_owned(),
        });
    }
    if vmdk::looks_like_descriptor(&head) {
        return Err(SourceError::Unsupported {
            path: archive.to_owned(),
            what: format!(
                "the VMDK descriptor {} inside an OVA (its extents are separate files)",
                member.name
            ),
            advice: "export the VM again as an OVA with streamOptimized disks (ovftool's default)".to_owned(),
        });
    }
    // The member's name is its only claim: a `.vmdk` whose KDMV magic is damaged is no raw disk.
    let claim = Claim::of(Path::new(&member.name));
    if claim != Claim::Raw {
        return Err(claim::refuse(&archive.join(&member.name), claim, &head, role));
    }
    Ok(raw_member(member, slice))
}

/// A member read as a raw image.
fn raw_member(member: &ArchiveMember, slice: FileSlice) -> Opened {
    let mut warnings = Vec::new();
    if !slice.len.is_multiple_of(BLOCK) {
        warnings.push(format!(
            "{} is {} bytes, not a whole number of 512-byte sectors; it is migrated as is",
            member.name, slice.len
        ));
    }
    Opened {
        reader: Box::new(SliceDisk { slice }),
        format: DiskFormat::Raw,
        warnings,
    }
}

/// A raw disk image that is a byte range of a file (a member of an OVA).
#[derive(Debug)]
struct SliceDisk {
    slice: FileSlice,
}

impl DiskReader for SliceDisk {
    fn capacity(&self) -> u64 {
        self.slice.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        check_range(self.slice.len, offset, buf.len())?;
        self.slice.read_exact_at(buf, offset)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.slice.is_hole(offset, len)
    }
}

/// Every regular file of the tar archive, with its data's byte range. Directories, links and
/// other entries are skipped; GNU sparse members are refused (their data is not one range).
pub(crate) fn index(archive: &FileSlice) -> Result<Vec<ArchiveMember>, SourceError> {
    let bad = |offset: u64, message: String| SourceError::BadOvf {
        path: archive.path.clone(),
        member: None,
        line: None,
        message: format!("tar header at offset {offset}: {message}"),
    };
    let mut members = Vec::new();
    let mut long_name: Option<String> = None;
    let mut pax = Pax::default();
    let mut offset = 0u64;
    let mut header = [0u8; BLOCK as usize];
    loop {
        if offset == archive.len {
            // No end-of-archive blocks: tolerated, as GNU tar does.
            break;
        }
        if offset.checked_add(BLOCK).is_none_or(|end| end > archive.len) {
            return Err(bad(
                offset,
                "the archive ends in the middle of a header: the OVA is truncated; download it again".to_owned(),
            ));
        }
        archive
            .file
            .read_exact_at(&mut header, archive.start + offset)
            .map_err(|source| SourceError::Io {
                path: archive.path.clone(),
                action: "read the OVA archive",
                source,
            })?;
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let header = Header(&header);
        header.check_checksum().map_err(|m| bad(offset, m))?;
        let size = match pax.size.take() {
            Some(size) => size,
            None => header.size().map_err(|m| bad(offset, m))?,
        };
        let data = offset + BLOCK;
        let next = size
            .checked_add(BLOCK - 1)
            .map(|s| s / BLOCK * BLOCK)
            .and_then(|s| data.checked_add(s))
            .ok_or_else(|| bad(offset, format!("absurd member size {size}")))?;
        let name = pax.path.take().or(long_name.take()).unwrap_or_else(|| header.name());
        if data.checked_add(size).is_none_or(|end| end > archive.len) {
            return Err(truncated(
                &archive.path,
                &ArchiveMember {
                    name,
                    offset: data,
                    len: size,
                },
            ));
        }
        let read_record = |limit: u64, what: &str| -> Result<Vec<u8>, SourceError> {
            if size > limit {
                return Err(bad(offset, format!("{what} of {size} bytes (limit {limit})")));
            }
            archive.read_vec(data, size as usize)
        };
        match header.type_flag() {
            b'0' | b'\0' | b'7' => {
                if members.len() == MAX_MEMBERS {
                    return Err(bad(offset, format!("more than {MAX_MEMBERS} members; this is no OVA")));
                }
                if pax.sparse {
                    return Err(sparse_member(&archive.path, &name));
                }
                let name = name.strip_prefix("./").map(str::to_owned).unwrap_or(name);
                members.push(ArchiveMember {
                    name,
                    offset: data,
                    len: size,
                });
                pax = Pax::default();
            }
            b'L' => {
                let record = read_record(MAX_NAME_LEN, "GNU long name")?;
                let end = record.iter().position(|&b| b == 0).unwrap_or(record.len());
                long_name = Some(String::from_utf8_lossy(&record[..end]).into_owned());
            }
            b'x' => {
                pax = Pax::parse(&read_record(MAX_PAX_LEN, "pax header")?).map_err(|m| bad(offset, m))?;
            }
            b'S' => return Err(sparse_member(&archive.path, &name)),
            // Directories, links, devices, pax global headers, GNU long link names: their
            // data (if any) is skipped.
            _ => pax = Pax::default(),
        }
        offset = next;
    }
    Ok(members)
}

fn sparse_member(archive: &Path, name: &str) -> SourceError {
    SourceError::Unsupported {
        path: archive.to_owned(),
        what: format!("the sparse tar member {name}"),
        advice: "create the OVA again without --sparse (ovftool never writes sparse members)".to_owned(),
    }
}

/// A 512-byte tar header block.
struct Header<'a>(&'a [u8; BLOCK as usize]);

impl Header<'_> {
    fn type_flag(&self) -> u8 {
        self.0[156]
    }

    /// The name, with the ustar prefix if it has one (GNU headers use that space otherwise).
    fn name(&self) -> String {
        let name = c_string(&self.0[..100]);
        let is_ustar = &self.0[257..263] == b"ustar\0";
        let prefix = if is_ustar { c_string(&self.0[345..500]) } else { &[] };
        let full = if prefix.is_empty() {
            name.to_vec()
        } else {
            [prefix, b"/", name].concat()
        };
        String::from_utf8_lossy(&full).into_owned()
    }

    /// The size field: octal, or GNU base-256 for members of 8 GiB and more.
    fn size(&self) -> Result<u64, String> {
        let field = &self.0[124..136];
        if field[0] & 0x80 != 0 {
            if field[0] == 0xff {
                return Err("negative member size".to_owned());
            }
            return field[1..]
                .iter()
                .try_fold(u64::from(field[0] & 0x7f), |size, &b| {
                    size.checked_mul(256).and_then(|s| s.checked_add(u64::from(b)))
                })
                .ok_or_else(|| "member size overflows 64 bits".to_owned());
        }
        octal(field).ok_or_else(|| format!("size field {:?} is not an octal number", String::from_utf8_lossy(field)))
    }

    fn check_checksum(&self) -> Result<(), String> {
        let stored = octal(&self.0[148..156]).ok_or("the checksum field is not an octal number: not a tar archive")?;
        // The checksum is computed with its own field as spaces; old tars summed signed bytes.
        let unsigned: u64 = self.0.iter().map(|&b| u64::from(b)).sum::<u64>()
            - self.0[148..156].iter().map(|&b| u64::from(b)).sum::<u64>()
            + 8 * u64::from(b' ');
        let signed: i64 = self.0.iter().map(|&b| i64::from(b as i8)).sum::<i64>()
            - self.0[148..156].iter().map(|&b| i64::from(b as i8)).sum::<i64>()
            + 8 * i64::from(b' ');
        if stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed) {
            Ok(())
        } else {
            Err("checksum mismatch: not a tar archive, or a damaged one; download it again".to_owned())
        }
    }
}

/// Bytes up to the first NUL.
fn c_string(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// An octal field, padded with spaces or NULs; empty is 0.
fn octal(field: &[u8]) -> Option<u64> {
    let text = field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| b != b' ' && b != 0);
    text.into_iter().try_fold(0u64, |value, &b| {
        let digit = (b as char).to_digit(8)?;
        value.checked_mul(8)?.checked_add(u64::from(digit))
    })
}

/// What a pax extended header says about the next member.
#[derive(Debug, Default)]
struct Pax {
    path: Option<String>,
    size: Option<u64>,
    /// GNU.sparse.* records: the member's data is not its content.
    sparse: bool,
}

impl Pax {
    /// Records of the form "<length> <key>=<value>\n".
    fn parse(mut data: &[u8]) -> Result<Pax, String> {
        let mut pax = Pax::default();
        while !data.is_empty() && data[0] != 0 {
            let bad = || "malformed pax record".to_owned();
            let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|l| l.parse().ok())
                .ok_or_else(bad)?;
            if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
                return Err(bad());
            }
            let record = &data[space + 1..len - 1];
            let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"path" => pax.path = Some(String::from_utf8_lossy(value).into_owned()),
                b"size" => {
                    pax.size = Some(
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .ok_or("pax size record is not a number")?,
                    )
                }
                _ if key.starts_with(b"GNU.sparse.") => pax.sparse = true,
                _ => {}
            }
            data = &data[len..];
        }
        Ok(pax)
    }
}

#[cfg(test)]
#[path = "ova_tests.rs"]
mod tests;
