//! Telling disk formats apart by their bytes, and reading raw images.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::claim::{self, Claim, Role};
use super::{check_range, vmdk, DiskFormat, DiskReader, SourceError};

/// An opened disk, with what [`super::open_vm`] needs beyond the reader.
#[derive(Debug)]
pub(crate) struct Opened {
    pub reader: Box<dyn DiskReader>,
    pub format: DiskFormat,
    /// Things that are readable but worth telling the operator, e.g. a short extent file.
    pub warnings: Vec<String>,
}

/// How many bytes of a file are enough to recognise its format.
const HEAD_LEN: u64 = 512;

/// How a disk file is to be read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpenAs<'a> {
    /// In the format its bytes show; raw only if it claims to be (see [`claim`]).
    Detect(Role<'a>),
    /// As a raw image whatever its bytes look like: the operator said so (`--raw-disk`).
    Raw,
}

/// Opens a disk file, whatever its format, read-only.
pub(crate) fn open(path: &Path) -> Result<Opened, SourceError> {
    open_as(path, OpenAs::Detect(Role::Disk(None)))
}

/// Opens a disk file read-only, as `open_as` says.
pub(crate) fn open_as(path: &Path, open_as: OpenAs<'_>) -> Result<Opened, SourceError> {
    let (file, len) = open_read_only(path, "open the disk file")?;
    if len == 0 {
        return Err(SourceError::EmptyImage { path: path.to_owned() });
    }
    let role = match open_as {
        OpenAs::Raw => return Ok(raw(path, file, len)),
        OpenAs::Detect(role) => role,
    };
    let head = read_head(path, &file, len)?;
    let tail = if len >= 2 * HEAD_LEN {
        read_bytes(path, &file, len - HEAD_LEN, HEAD_LEN as usize)?
    } else {
        Vec::new()
    };
    let claim = Claim::of(path);

    let mut opened = if head.starts_with(b"KDMV") {
        super::vmdk_chain::open_hosted(path, file, len)?
    } else if head.starts_with(b"COWD") {
        return Err(super::vmdk_chain::cowd_unsupported(path));
    } else if head.starts_with(super::qcow2::MAGIC) {
        super::qcow2::open(path)?
    } else if let Some((what, advice)) = foreign_format(&head, &tail) {
        return Err(SourceError::Unsupported {
            path: path.to_owned(),
            what: what.to_owned(),
            advice: advice.to_owned(),
        });
    } else if vmdk::looks_like_descriptor(&head) {
        vmdk::open_descriptor(path, &file, len)?
    } else {
        return open_formatless(path, file, len, &head, claim, role);
    };
    // Bytes of a known format under another format's name (a `.img` holding qcow2 is
    // common and says nothing): read as the bytes say, and told.
    let is_vmdk = matches!(
        opened.format,
        DiskFormat::VmdkFlat | DiskFormat::VmdkSparse | DiskFormat::VmdkStreamOptimized
    );
    let misnamed = match claim {
        Claim::Qcow2 => opened.format != DiskFormat::Qcow2,
        Claim::Vmdk => !is_vmdk,
        Claim::Foreign { .. } => true,
        Claim::Raw | Claim::Unclaimed => false,
    };
    if misnamed {
        opened.warnings.push(format!(
            "{} is named like another format but holds {}; it is read as what it holds",
            path.display(),
            describe_format(opened.format)
        ));
    }
    Ok(opened)
}

/// A file whose bytes show no known format: raw if it claims to be, else refused.
fn open_formatless(
    path: &Path,
    file: File,
    len: u64,
    head: &[u8],
    claim: Claim,
    role: Role<'_>,
) -> Result<Opened, SourceError> {
    // A flat extent holds disk sectors (a partition table has zeros) and is sector-sized; a
    // small, text-only .vmdk is a descriptor we failed to recognise, not a disk.
    if claim == Claim::Vmdk && len < vmdk::DESCRIPTOR_SIZE_LIMIT && !len.is_multiple_of(512) {
        let all = read_bytes(path, &file, 0, len as usize)?;
        if !all.contains(&0) && std::str::from_utf8(&all).is_ok() {
            return Err(SourceError::BadDescriptor {
                path: path.to_owned(),
                line: None,
                message: "this .vmdk is a text file but not a VMDK descriptor (no \
                          `# Disk DescriptorFile` header, no createType); restore the \
                          descriptor from the source datastore"
                    .to_owned(),
            });
        }
    }
    let raw_claimed = match claim {
        Claim::Raw => true,
        // A fullDevice disk, a LUN: a device has no format of its own.
        Claim::Unclaimed => matches!(role, Role::Backing) || is_block_device(&file),
        Claim::Qcow2 | Claim::Vmdk | Claim::Foreign { .. } => false,
    };
    if !raw_claimed {
        return Err(claim::refuse(path, claim, head, role));
    }
    Ok(raw(path, file, len))
}

/// The file as a raw image.
fn raw(path: &Path, file: File, len: u64) -> Opened {
    let mut warnings = Vec::new();
    if !len.is_multiple_of(512) {
        warnings.push(format!(
            "{} is {len} bytes, not a whole number of 512-byte sectors; it is migrated as is",
            path.display()
        ));
    }
    Opened {
        reader: Box::new(RawDisk {
            path: path.to_owned(),
            file,
            capacity: len,
        }),
        format: DiskFormat::Raw,
        warnings,
    }
}

fn is_block_device(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata().is_ok_and(|m| m.file_type().is_block_device())
}

/// A format as the operator knows it.
fn describe_format(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Raw => "a raw image",
        DiskFormat::VmdkFlat => "a VMDK descriptor",
        DiskFormat::VmdkSparse => "a sparse VMDK",
        DiskFormat::VmdkStreamOptimized => "a streamOptimized VMDK",
        DiskFormat::Qcow2 => "a qcow2 image",
    }
}

/// Opens a disk stored as a member of an archive (an OVA), read in place.
pub(crate) fn open_member(
    archive: &Path,
    member: &super::ArchiveMember,
    open_as: OpenAs<'_>,
) -> Result<Opened, SourceError> {
    super::ova::open_member(archive, member, open_as)
}

/// Recognises image formats we do not read, by magic: the head of the file for most, the
/// last sector for VHD (a fixed VHD is raw data followed by a footer).
pub(crate) fn foreign_format(head: &[u8], tail: &[u8]) -> Option<(&'static str, &'static str)> {
    const CONVERT: &str =
        "convert it to raw with `qemu-img convert -O raw SOURCE DEST.raw` and point the .vmx at the result";
    if head.starts_with(b"COWD") {
        return Some((
            "ESX sparse VMDK (COWD, a vmfsSparse snapshot or redo log)",
            "consolidate the VM's snapshots first, or convert the chain with `qemu-img convert -O raw`",
        ));
    }
    if head.starts_with(b"vhdxfile") {
        return Some(("a VHDX image", CONVERT));
    }
    if head.starts_with(b"conectix") || tail.starts_with(b"conectix") {
        return Some(("a VHD image", CONVERT));
    }
    if head.get(64..68) == Some(&[0x7f, 0x10, 0xda, 0xbe]) {
        return Some(("a VirtualBox VDI image", CONVERT));
    }
    None
}

/// A plain image: the file's bytes are the disk's bytes.
#[derive(Debug)]
struct RawDisk {
    path: PathBuf,
    file: File,
    capacity: u64,
}

impl DiskReader for RawDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.capacity, offset, buf.len())?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| read_error(&self.path, offset, e))
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        super::file_range_is_hole(&self.file, offset, len)
    }

    fn hole_run(&self, offset: u64, max: u64, _step: u64) -> u64 {
        super::file_hole_run(&self.file, offset, max.min(self.capacity.saturating_sub(offset)))
    }
}

/// Opens `path` read-only and measures it by seeking to its end, which unlike the metadata
/// length also works for block devices (a fullDevice extent, a raw image on /dev).
pub(crate) fn open_read_only(path: &Path, action: &'static str) -> Result<(File, u64), SourceError> {
    let io_err = |source| SourceError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    let meta = fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return Err(io_err(io::Error::new(io::ErrorKind::IsADirectory, "it is a directory")));
    }
    let mut file = File::open(path).map_err(io_err)?;
    let len = file.seek(SeekFrom::End(0)).map_err(io_err)?;
    Ok((file, len))
}

/// The first [`HEAD_LEN`] bytes of the file (fewer if it is shorter).
fn read_head(path: &Path, file: &File, len: u64) -> Result<Vec<u8>, SourceError> {
    read_bytes(path, file, 0, len.min(HEAD_LEN) as usize)
}

/// `count` bytes at `offset`; callers bound `count`.
pub(crate) fn read_bytes(path: &Path, file: &File, offset: u64, count: usize) -> Result<Vec<u8>, SourceError> {
    let mut buf = vec![0; count];
    file.read_exact_at(&mut buf, offset).map_err(|source| SourceError::Io {
        path: path.to_owned(),
        action: "read the disk file",
        source,
    })?;
    Ok(buf)
}

/// An I/O error from a read, with the file and offset it happened at.
pub(crate) fn read_error(path: &Path, offset: u64, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        // Every read was checked against the file's length when it was opened.
        return io::Error::new(
            e.kind(),
            format!(
                "reading {} at offset {offset}: the file ends before that, though it was longer when \
                 it was opened: it was cut or replaced while being read",
                path.display()
            ),
        );
    }
    io::Error::new(e.kind(), format!("reading {} at offset {offset}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::open_disk;
    use crate::source::testutil::{pseudo_random, qemu_img};

    #[test]
    fn reads_a_raw_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let data = pseudo_random(1 << 20, 7);
        fs::write(&path, &data).unwrap();

        let opened = open(&path).unwrap();
        assert_eq!(opened.format, DiskFormat::Raw);
        assert!(opened.warnings.is_empty());
        let disk = opened.reader;
        assert_eq!(disk.capacity(), data.len() as u64);
        let mut buf = vec![0; 4099];
        disk.read_at(12_345, &mut buf).unwrap();
        assert_eq!(buf, data[12_345..12_345 + 4099]);
        let mut all = vec![0; data.len()];
        disk.read_at(0, &mut all).unwrap();
        assert_eq!(all, data);

        // Reads past the capacity are refused, not short.
        let err = disk.read_at(data.len() as u64 - 10, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = disk.read_at(u64::MAX, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        disk.read_at(data.len() as u64, &mut []).unwrap();

        // Reading never changed the source.
        assert_eq!(fs::read(&path).unwrap(), data);
    }

    #[test]
    fn refuses_an_empty_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.img");
        fs::write(&path, b"").unwrap();
        let err = open_disk(&path).unwrap_err();
        assert!(matches!(err, SourceError::EmptyImage { .. }), "{err}");
        assert!(err.to_string().contains("empty disk image"), "{err}");
    }

    #[test]
    fn refuses_missing_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_disk(&dir.path().join("nope.raw")).unwrap_err();
        assert!(
            matches!(&err, SourceError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        let err = open_disk(dir.path()).unwrap_err();
        assert!(matches!(err, SourceError::Io { .. }), "{err}");
    }

    #[test]
    fn refuses_foreign_image_formats() {
        let dir = tempfile::tempdir().unwrap();
        for (format, file, what) in [
            ("vhdx", "disk.vhdx", "VHDX"),
            ("vpc", "dynamic.vhd", "VHD"),
            ("vdi", "disk.vdi", "VDI"),
        ] {
            let path = dir.path().join(file);
            qemu_img(&["create", "-f", format, path.to_str().unwrap(), "4M"]);
            let err = open_disk(&path).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, SourceError::Unsupported { .. }), "{msg}");
            assert!(msg.contains(what) && msg.contains("not supported yet"), "{msg}");
            assert!(msg.contains("qemu-img convert"), "{msg}");
        }
        // A fixed VHD is raw data with a footer: only the last sector tells.
        let path = dir.path().join("fixed.vhd");
        qemu_img(&[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=fixed",
            path.to_str().unwrap(),
            "4M",
        ]);
        let err = open_disk(&path).unwrap_err();
        assert!(err.to_string().contains("VHD image"), "{err}");
    }

    #[test]
    fn warns_about_a_partial_last_sector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.img");
        fs::write(&path, pseudo_random(1000, 3)).unwrap();
        let opened = open(&path).unwrap();
        assert_eq!(opened.reader.capacity(), 1000);
        assert_eq!(opened.warnings.len(), 1, "{:?}", opened.warnings);
    }
}
