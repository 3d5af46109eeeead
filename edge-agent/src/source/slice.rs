//! A byte range of a file, read by position: a whole disk file, or a member of
//! an OVA (tar) archive read in place without unpacking it. Format readers
//! read through a slice so the same code serves both.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::SourceError;

#[derive(Debug, Clone)]
pub struct FileSlice {
    /// The file, for messages (for an archive member: the archive).
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Where the slice starts in the file.
    pub start: u64,
    pub len: u64,
}

impl FileSlice {
    /// The whole file, opened read-only.
    pub fn whole(path: &Path) -> Result<FileSlice, SourceError> {
        let (file, len) = super::disk::open_read_only(path, "open the disk file")?;
        Ok(FileSlice {
            path: path.to_owned(),
            file: Arc::new(file),
            start: 0,
            len,
        })
    }

    /// A part of this slice; `None` if it does not fit.
    pub fn sub(&self, offset: u64, len: u64) -> Option<FileSlice> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| FileSlice {
            path: self.path.clone(),
            file: self.file.clone(),
            start: self.start + offset,
            len,
        })
    }

    /// Fills `buf` from `offset` within the slice; reading past the slice's end
    /// is an `UnexpectedEof` error naming the file (a truncated image).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let fits = offset.checked_add(buf.len() as u64).is_some_and(|end| end <= self.len);
        if !fits {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: {} bytes at offset {offset} lie past its end ({} bytes): the file is truncated or corrupt",
                    self.path.display(),
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.file
            .read_exact_at(buf, self.start + offset)
            .map_err(|e| super::disk::read_error(&self.path, self.start + offset, e))
    }

    /// `len` bytes at `offset` as a new buffer. Callers bound `len` (it is
    /// also checked against the slice, so a lying header cannot allocate more
    /// than the file holds).
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(SourceError::Io {
                path: self.path.clone(),
                action: "read the disk file",
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes at offset {offset} lie past the end ({} bytes): truncated or corrupt",
                        self.len
                    ),
                ),
            });
        }
        let mut buf = vec![0; len];
        self.read_exact_at(&mut buf, offset).map_err(|source| SourceError::Io {
            path: self.path.clone(),
            action: "read the disk file",
            source,
        })?;
        Ok(buf)
    }

    /// Whether `[offset, offset + len)` of the slice is a hole of the file.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        super::file_range_is_hole(&self.file, self.start + offset, len)
    }
}
