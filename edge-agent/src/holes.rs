//! Runs of holes of the source disks, as the readers and sealers found them.
//!
//! A sparse disk's holes read as zeros without a read, but asking per chunk cost one
//! `lseek(SEEK_DATA)` and, in the sealers, one blocking task per chunk: on a 10 GiB disk
//! 60 % full, 65,000 of its 163,840 chunks of 64 KiB. One question finds the whole run
//! ([`DiskReader::hole_run`]); the chunks after the first of a run are then known zero
//! here, without a syscall or a blocking task.
//!
//! A run is what the disk held when it was asked. A running source may write into it
//! afterwards; a chunk of the run is then declared zero as of that moment, as a chunk read
//! earlier in the pass holds what it held when it was read (a pass of a running source is
//! not a point in time; the next pass compares it again).

use std::ops::Range;
use std::sync::Mutex;

use crate::source::DiskReader;

/// Longest run asked for at once: a reader without a better way walks it chunk by chunk
/// ([`DiskReader::hole_run`]'s default), and one blocking task should stay short.
pub const MAX_RUN: u64 = 1 << 30;

/// The last run of holes found on each disk. Workers take chunks in disk order, so the
/// last run found is the one the next chunks fall into.
#[derive(Debug)]
pub struct Holes {
    runs: Mutex<Vec<Range<u64>>>,
}

impl Holes {
    pub fn new(disks: usize) -> Holes {
        Holes {
            runs: Mutex::new(vec![0..0; disks]),
        }
    }

    /// Whether `[offset, offset + len)` of `disk` lies in a run of holes found before.
    pub fn known(&self, disk: u16, offset: u64, len: u64) -> bool {
        let runs = self.runs.lock().expect("holes lock poisoned");
        runs.get(usize::from(disk))
            .is_some_and(|run| run.start <= offset && offset.saturating_add(len) <= run.end)
    }

    /// Asks `reader` (disk `disk`) for the run of holes at `offset`, remembers it, and
    /// says whether the chunk of `len` bytes there is a hole. Blocking: a system call.
    pub fn find(&self, disk: u16, reader: &dyn DiskReader, offset: u64, len: u64, chunk_size: u64) -> bool {
        let max = reader.capacity().saturating_sub(offset).min(MAX_RUN.max(len));
        let run = reader.hole_run(offset, max, chunk_size);
        if run >= len {
            if let Some(r) = self
                .runs
                .lock()
                .expect("holes lock poisoned")
                .get_mut(usize::from(disk))
            {
                *r = offset..offset + run;
            }
        }
        run >= len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk of `chunks` chunks of 4 KiB whose holes are the chunks `holes` says, counting
    /// the questions it is asked.
    #[derive(Debug)]
    struct Sparse {
        holes: Vec<bool>,
        asked: std::sync::atomic::AtomicU64,
    }

    impl DiskReader for Sparse {
        fn capacity(&self) -> u64 {
            self.holes.len() as u64 * 4096
        }
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill(1);
            Ok(())
        }
        fn is_hole(&self, offset: u64, len: u64) -> bool {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (offset / 4096..(offset + len).div_ceil(4096)).all(|i| self.holes.get(i as usize) == Some(&true))
        }
    }

    #[test]
    fn a_run_is_found_once_and_its_chunks_are_known_after() {
        let disk = Sparse {
            holes: vec![false, true, true, true, false, true],
            asked: Default::default(),
        };
        let holes = Holes::new(1);
        assert!(!holes.find(0, &disk, 0, 4096, 4096), "data");
        assert!(!holes.known(0, 4096, 4096));
        assert!(holes.find(0, &disk, 4096, 4096, 4096));
        assert!(holes.known(0, 2 * 4096, 4096) && holes.known(0, 3 * 4096, 4096));
        assert!(!holes.known(0, 4 * 4096, 4096), "the data after the run");
        assert!(!holes.known(0, 3 * 4096, 8192), "a range past the run's end");
        assert!(!holes.known(1, 2 * 4096, 4096), "another disk");
        // The last chunk is a hole up to the disk's end.
        assert!(holes.find(0, &disk, 5 * 4096, 4096, 4096));
        assert!(!holes.known(0, 2 * 4096, 4096), "the last run found is the one kept");
    }

    #[test]
    fn a_sparse_file_tells_a_whole_run_with_one_seek() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let file = std::fs::File::create(&path).unwrap();
        // Data in the first and the last MiB, a hole of 6 MiB between (if the file
        // system keeps holes: tmpfs and ext4 do; without, the run is empty and nothing
        // is known).
        file.write_all_at(&[7; 4096], 0).unwrap();
        file.write_all_at(&[7; 4096], 7 << 20).unwrap();
        file.set_len(8 << 20).unwrap();
        drop(file);
        let disk = crate::source::open_disk(&path).unwrap();
        let holes = Holes::new(1);
        if holes.find(0, disk.as_ref(), 1 << 20, 65536, 65536) {
            assert!(holes.known(0, 6 << 20, 65536));
            assert!(!holes.known(0, 7 << 20, 65536));
        }
        assert!(!holes.find(0, disk.as_ref(), 0, 65536, 65536), "data");
    }
}
