//! A disk being written into staging, whatever its format. Verified chunks arrive out of
//! order from several data streams at once, each on its own blocking-pool thread, so a
//! [`DiskFile`] takes positional writes through `&self` and needs no caller-side lock.
//!
//! Raw images and the extents of flat VMDKs are the same thing on disk, a sparse file
//! of the capacity, so one writer serves both; qcow2 has its own (see [`super::qcow2`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::qcow2::Qcow2Writer;
use super::{io_err, DatastoreError, DiskFormat, SECTOR};

/// How one format puts guest bytes into its file.
pub(super) trait DiskWriter: fmt::Debug + Send + Sync {
    /// Writes `data` at guest `offset`. Concurrent calls cover disjoint ranges, except
    /// that a range may be written again with the same bytes.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Completes the file after the last write and makes it durable.
    fn finish(&self) -> io::Result<()>;
    /// Makes the writes so far durable (data and the tables that map it).
    fn sync_data(&self) -> io::Result<()>;
    /// Reads guest bytes `offset..offset + buf.len()` as the file holds them now
    /// (never-written ranges read as zeros): the read-back before a commit.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Whether the file holds nothing in guest bytes `offset..offset + len`, so that
    /// they read as zeros without being read. False when it cannot tell.
    fn is_unallocated(&self, offset: u64, len: u64) -> io::Result<bool>;
}

/// A staged disk open for writing: see [`super::Staging::create_disk`].
#[derive(Debug)]
pub struct DiskFile {
    format: DiskFormat,
    /// Whole sectors: what the guest sees.
    capacity: u64,
    /// The file the .vmx and the inventory name.
    file_name: String,
    /// The file holding the data: the flat extent of a VMDK, else the image.
    path: PathBuf,
    writer: Box<dyn DiskWriter>,
}

impl DiskFile {
    /// Creates `path` (never replacing a file) for a disk of `capacity` bytes, rounded up
    /// to whole sectors: hypervisors address disks by sector, and the rounded tail reads as
    /// zeros, as it does when a flat VMDK's descriptor counts whole sectors.
    pub(super) fn create(
        path: &Path,
        file_name: String,
        capacity: u64,
        format: DiskFormat,
    ) -> Result<DiskFile, DatastoreError> {
        let bad = |rule| DatastoreError::BadCapacity {
            capacity,
            format: format.as_str(),
            rule,
        };
        let capacity = capacity
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| bad("it does not fit in whole sectors"))?;
        if format == DiskFormat::Qcow2 && capacity > gateway::plan::MAX_DISK_BYTES {
            // The metadata is preallocated for the whole capacity; the protocol's limit
            // keeps it to 8 GiB of sparse L2 tables.
            return Err(bad("it is larger than the 64 TiB a migration can carry"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err("create disk file", path))?;
        let writer: Box<dyn DiskWriter> = match format {
            DiskFormat::VmdkFlat | DiskFormat::Raw => {
                file.set_len(capacity).map_err(io_err("size disk file", path))?;
                Box::new(SparseWriter { file })
            }
            DiskFormat::Qcow2 => {
                Box::new(Qcow2Writer::create(file, capacity).map_err(io_err("lay out qcow2 metadata in", path))?)
            }
        };
        Ok(DiskFile {
            format,
            capacity,
            file_name,
            path: path.to_owned(),
            writer,
        })
    }

    /// Reopens a disk [`DiskFile::create`] made for a resumed migration: the same
    /// capacity and format, the file already there.
    pub(super) fn reopen(
        path: &Path,
        file_name: String,
        capacity: u64,
        format: DiskFormat,
    ) -> Result<DiskFile, DatastoreError> {
        let capacity = capacity
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| DatastoreError::BadCapacity {
                capacity,
                format: format.as_str(),
                rule: "it does not fit in whole sectors",
            })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("reopen disk file", path))?;
        let writer: Box<dyn DiskWriter> = match format {
            DiskFormat::VmdkFlat | DiskFormat::Raw => {
                let len = file.metadata().map_err(io_err("inspect disk file", path))?.len();
                if len != capacity {
                    return Err(io_err("reopen disk file", path)(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("it has {len} bytes, the migration's disk {capacity}"),
                    )));
                }
                Box::new(SparseWriter { file })
            }
            DiskFormat::Qcow2 => {
                Box::new(Qcow2Writer::reopen(file, capacity).map_err(io_err("read qcow2 tables of", path))?)
            }
        };
        Ok(DiskFile {
            format,
            capacity,
            file_name,
            path: path.to_owned(),
            writer,
        })
    }

    /// Opens a disk the cloud holds (a registered VM's, a replica's) to read chunks from
    /// it for deduplication. Read-only at the OS level: a write through it fails, so a
    /// copy can never change the disk it copies from.
    pub fn open_read_only(path: &Path, capacity: u64, format: DiskFormat) -> Result<DiskFile, DatastoreError> {
        let capacity = capacity.next_multiple_of(SECTOR);
        let file = File::open(path).map_err(io_err("open disk to copy chunks from", path))?;
        let writer: Box<dyn DiskWriter> = match format {
            DiskFormat::VmdkFlat | DiskFormat::Raw => Box::new(SparseWriter { file }),
            DiskFormat::Qcow2 => {
                Box::new(Qcow2Writer::reopen(file, capacity).map_err(io_err("read qcow2 tables of", path))?)
            }
        };
        Ok(DiskFile {
            format,
            capacity,
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_owned(),
            writer,
        })
    }

    /// Makes every write so far durable (fdatasync), before the journal records it.
    pub fn sync_data(&self) -> io::Result<()> {
        self.writer.sync_data()
    }

    /// Writes `data` (a chunk's plaintext, up to 16 MiB) at guest `offset`. Safe to call
    /// from several threads at once for different chunks, in any order; writing a chunk
    /// again with the same bytes is harmless. A range past the capacity is refused.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > self.capacity) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes at offset {offset} end past the disk's {} bytes",
                    data.len(),
                    self.capacity
                ),
            ));
        }
        self.writer.write_at(data, offset)
    }

    /// Reads guest bytes at `offset` into `buf` from the file as it is now, to check it
    /// against what was sent. A range past the capacity is refused.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.capacity) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes at offset {offset} end past the disk's {} bytes",
                    buf.len(),
                    self.capacity
                ),
            ));
        }
        self.writer.read_at(buf, offset)
    }

    /// Whether guest bytes `offset..offset + len` are unallocated in the file (a hole, a
    /// qcow2 cluster never mapped): they read as zeros without a read. False when the
    /// file cannot tell, or for a range past the capacity.
    pub fn is_unallocated(&self, offset: u64, len: u64) -> io::Result<bool> {
        if offset.checked_add(len).is_none_or(|end| end > self.capacity) {
            return Ok(false);
        }
        self.writer.is_unallocated(offset, len)
    }

    /// Completes the file after the last write (qcow2: its tables and header) and fsyncs
    /// it. Call once, when every chunk is written.
    pub fn finish(&self) -> io::Result<()> {
        self.writer.finish()
    }

    pub fn format(&self) -> DiskFormat {
        self.format
    }

    /// The size the guest sees: the requested capacity rounded up to whole sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The file the .vmx and the inventory name: the descriptor for a VMDK, else the image.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// The staged file that holds the data (for a VMDK, its flat extent).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A raw image or flat extent: the file is the disk, byte for byte. It was sized to the
/// capacity up front, so never-written ranges (all-zero chunks are never sent) are holes.
#[derive(Debug)]
struct SparseWriter {
    file: File,
}

impl DiskWriter for SparseWriter {
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn finish(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Asked of the file system (`SEEK_DATA`): a hole is zeros by definition. A file
    /// system without hole support answers with the next byte, which says "data".
    fn is_unallocated(&self, offset: u64, len: u64) -> io::Result<bool> {
        use nix::unistd::{lseek, Whence};
        let Ok(start) = i64::try_from(offset) else {
            return Ok(false);
        };
        match lseek(&self.file, start, Whence::SeekData) {
            Ok(data) => Ok(u64::try_from(data).is_ok_and(|d| d >= offset.saturating_add(len))),
            // No data at or after `offset`.
            Err(nix::errno::Errno::ENXIO) => Ok(true),
            // EINVAL: the file system cannot tell (or a bad offset): read the bytes.
            Err(nix::errno::Errno::EINVAL) => Ok(false),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}
