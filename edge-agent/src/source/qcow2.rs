//! qcow2 images (v2 and v3), with their backing chains flattened into one disk.
//!
//! Read: standard, zero, unallocated and compressed (deflate or zstd) clusters; a backing
//! file of any format [`super::disk::open`] reads (raw, qcow2, flat VMDK), named relative to
//! the image's folder. Only the active state is read; internal snapshots are left out with a
//! note. Refused with a clear error: encryption, external data files, extended L2 entries
//! (subclusters), images QEMU marked corrupt, and features this reader does not know.

mod check;
mod header;
pub(crate) use header::MAGIC;
mod reader;

#[cfg(test)]
mod damage_tests;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::claim::Role;
use super::disk::{self, Opened};
use super::slice::FileSlice;
use super::vmx::quote;
use super::{check_range, DiskFormat, DiskReader, SourceError};

/// Longest backing chain followed; QEMU itself has no limit, but real chains are short.
const MAX_CHAIN_DEPTH: usize = 64;

const FLATTEN: &str = "flatten the chain where it is complete with `qemu-img convert -O qcow2 IMAGE.qcow2 \
                       FLAT.qcow2` and point the .vmx at the result";

/// A qcow2 image a QEMU backup job wrote (see [`crate::tracking`]): read like any qcow2
/// image, and asked which chunks the job copied into it.
#[derive(Debug)]
pub struct BackupImage {
    disk: reader::Qcow2Disk,
}

impl BackupImage {
    /// Opens `path`, which must have no backing file: a backup target stands alone.
    pub fn open(path: &Path) -> Result<BackupImage, SourceError> {
        let (disk, _) = open_image(path)?;
        Ok(BackupImage { disk })
    }

    /// Whether the job wrote anything (data or zeros) in `[offset, offset + len)`.
    pub fn written(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.disk.is_written(offset, len)
    }
}

impl DiskReader for BackupImage {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.disk.read_at(offset, buf)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.disk.is_hole(offset, len)
    }
}

/// Opens a qcow2 image and, recursively, its backing chain.
pub(crate) fn open(path: &Path) -> Result<Opened, SourceError> {
    let _link = ChainLink::enter(path)?;
    let (disk, warnings) = open_image(path)?;
    Ok(Opened {
        reader: Box::new(disk),
        format: DiskFormat::Qcow2,
        warnings,
    })
}

fn open_image(path: &Path) -> Result<(reader::Qcow2Disk, Vec<String>), SourceError> {
    let file = FileSlice::whole(path)?;
    let header = header::parse(&file)?;
    let mut warnings = header.warnings.clone();
    let backing = match &header.backing_file {
        None => None,
        Some(name) => Some(open_backing(
            path,
            name,
            header.backing_format.as_deref(),
            &mut warnings,
        )?),
    };
    let disk = reader::Qcow2Disk::open(file, &header, backing)?;
    Ok((disk, warnings))
}

/// Opens the backing file `name` of the image at `path`, in `format` if the image records it,
/// else in the format its bytes show.
fn open_backing(
    path: &Path,
    name: &[u8],
    format: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Box<dyn DiskReader>, SourceError> {
    let shown = String::from_utf8_lossy(name).into_owned();
    let bad = |message: String| SourceError::BadImage {
        path: path.to_owned(),
        message,
    };
    if shown.starts_with("json:") || shown.contains("://") {
        return Err(SourceError::Unsupported {
            path: path.to_owned(),
            what: format!(
                "a backing file given as a QEMU protocol or JSON spec (`{}`)",
                quote(&shown)
            ),
            advice: FLATTEN.to_owned(),
        });
    }
    // Relative names are relative to the image's folder (an absolute name stays as is).
    let resolved = path.parent().unwrap_or(Path::new(".")).join(OsStr::from_bytes(name));
    match resolved.try_exists() {
        Ok(true) => {}
        Ok(false) => {
            return Err(bad(format!(
                "backing file `{}` does not exist ({}); copy the whole backing chain (`qemu-img info \
                 --backing-chain` lists it) next to the image, or {FLATTEN}",
                quote(&shown),
                resolved.display()
            )))
        }
        Err(source) => {
            return Err(SourceError::Io {
                path: resolved,
                action: "look for the backing file",
                source,
            })
        }
    }
    let is_qcow2 = || -> Result<bool, SourceError> {
        let file = FileSlice::whole(&resolved)?;
        Ok(file.len >= 4 && file.read_vec(0, 4)? == header::MAGIC)
    };
    let opened = match format {
        Some("raw") => RawFile::open(&resolved),
        Some("qcow2") => {
            if is_qcow2().map_err(|e| wrap(path, &shown, e))? {
                open(&resolved)
            } else {
                return Err(bad(format!(
                    "backing file `{}` ({}) is recorded as qcow2 but is not a qcow2 image; fix the \
                     record with `qemu-img rebase -u -b BACKING -F FORMAT IMAGE` or restore the file",
                    quote(&shown),
                    resolved.display()
                )));
            }
        }
        // Any other format, or none recorded: the bytes tell.
        _ => {
            let qcow2 = is_qcow2().map_err(|e| wrap(path, &shown, e))?;
            if format.is_none() {
                warnings.push(format!(
                    "{} does not record its backing file's format; {} was read as {}",
                    path.display(),
                    resolved.display(),
                    if qcow2 { "qcow2" } else { "the format its contents show" }
                ));
            }
            if qcow2 {
                open(&resolved)
            } else {
                // Read as QEMU reads it: in the format its bytes show, raw if they show none
                // (unless its name claims a format they are not).
                disk::open_as(&resolved, disk::OpenAs::Detect(Role::Backing))
            }
        }
    };
    let opened = opened.map_err(|e| wrap(path, &shown, e))?;
    warnings.extend(opened.warnings);
    Ok(opened.reader)
}

/// Says which image's backing file failed, once: an error that already does passes through,
/// so a deep chain gives one line, not one per level.
fn wrap(path: &Path, backing: &str, error: SourceError) -> SourceError {
    match error {
        SourceError::Backing { .. } => error,
        source => SourceError::Backing {
            path: path.to_owned(),
            backing: backing.to_owned(),
            source: Box::new(source),
        },
    }
}

thread_local! {
    /// The images being opened on this thread, outermost first: a backing chain in progress.
    static CHAIN: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

/// Membership of the chain being opened on this thread, left when dropped. Kept per thread
/// rather than passed down so that a chain through another format (a backing file opened by
/// [`disk::open`] that leads back to a qcow2 image) is caught too.
struct ChainLink;

impl ChainLink {
    fn enter(path: &Path) -> Result<ChainLink, SourceError> {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        CHAIN.with(|chain| {
            let mut chain = chain.borrow_mut();
            if let Some(start) = chain.iter().position(|p| *p == key) {
                let names: Vec<String> = chain[start..]
                    .iter()
                    .chain([&key])
                    .map(|p| p.display().to_string())
                    .collect();
                return Err(SourceError::BadImage {
                    path: path.to_owned(),
                    message: format!(
                        "the backing chain loops ({}); point the image at its real backing file with \
                         `qemu-img rebase -u -b BACKING -F FORMAT IMAGE`, or restore the chain",
                        names.join(" → ")
                    ),
                });
            }
            if chain.len() >= MAX_CHAIN_DEPTH {
                return Err(SourceError::BadImage {
                    path: path.to_owned(),
                    message: format!("the backing chain is more than {MAX_CHAIN_DEPTH} images deep; {FLATTEN}"),
                });
            }
            chain.push(key);
            Ok(ChainLink)
        })
    }
}

impl Drop for ChainLink {
    fn drop(&mut self) {
        CHAIN.with(|chain| chain.borrow_mut().pop());
    }
}

/// A backing file recorded as raw: its bytes are the disk's, whatever they look like (a raw
/// disk may start with any magic, so it is never probed).
#[derive(Debug)]
struct RawFile {
    file: FileSlice,
}

impl RawFile {
    fn open(path: &Path) -> Result<Opened, SourceError> {
        Ok(Opened {
            reader: Box::new(RawFile {
                file: FileSlice::whole(path)?,
            }),
            format: DiskFormat::Raw,
            warnings: Vec::new(),
        })
    }
}

impl DiskReader for RawFile {
    fn capacity(&self) -> u64 {
        self.file.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.file.len, offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.file.is_hole(offset, len)
    }
}
