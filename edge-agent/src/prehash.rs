//! Reading the source while the connection is being set up, for a delta pass.
//!
//! A delta pass reads and hashes every chunk the replica holds to find the few that
//! changed. It used to start once the cloud had answered the QUIC handshake, the login
//! and the resume: three round trips (0.45 s on a 150 ms link) with the disk idle, and on
//! a source without changed-block tracking the read is most of the pass. The hashes do
//! not depend on those answers: the edge compares each chunk with the hash it recorded
//! itself when the replica got it. So workers read and hash from the start of the pass,
//! in disk order, and stop when the cloud resumes it; the sealers then take an unchanged
//! chunk's hash from here instead of reading it again, and read only the changed ones
//! (to send them) and the rest of the disk.
//!
//! Only the connection these hashes were taken for uses them: a pass resumed over a new
//! connection reads everything again, because the source may have changed in between
//! (it runs during a sync pass).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::holes::Holes;
use crate::source::DiskReader;

/// Hashes of source chunks taken before the cloud resumed the pass.
#[derive(Debug, Default)]
pub struct Prehash {
    /// (disk, chunk index) to the source's hash of that chunk.
    hashes: Mutex<HashMap<(u16, u64), [u8; 32]>>,
    /// The sealers have started (or the attempt ended): the workers stop.
    stopped: AtomicBool,
    /// Chunks hashed, for the log.
    hashed: AtomicU64,
}

impl Prehash {
    /// One worker's loop: takes the next chunk of `chunks` (in disk order) until none is
    /// left or [`Self::stop`] was called. Holes are left to the sealers, which skip them
    /// without reading; a run of them is found with one question (see [`Holes`]).
    /// `read_bytes` counts what is read.
    pub fn hash_ahead(
        &self,
        disks: &[Box<dyn DiskReader>],
        chunks: &[(u16, u64)],
        next: &AtomicUsize,
        chunk_size: u64,
        read_bytes: &AtomicU64,
    ) {
        let mut buf = Vec::new();
        let holes = Holes::new(disks.len());
        while !self.stopped.load(Ordering::Relaxed) {
            let Some(&(disk, index)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            let Some(reader) = disks.get(usize::from(disk)) else {
                continue;
            };
            let offset = index * chunk_size;
            let len = reader.capacity().saturating_sub(offset).min(chunk_size);
            if len == 0 || holes.known(disk, offset, len) || holes.find(disk, reader.as_ref(), offset, len, chunk_size)
            {
                continue;
            }
            buf.resize(len as usize, 0);
            // A read error is the sealers' to report, with the disk's name: they read
            // the chunk again since it has no hash here.
            if reader.read_at(offset, &mut buf).is_err() {
                continue;
            }
            read_bytes.fetch_add(len, Ordering::Relaxed);
            let hash = gateway::chunk::chunk_hash(&buf);
            self.hashes
                .lock()
                .expect("prehash lock poisoned")
                .insert((disk, index), hash);
            self.hashed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The workers stop after their current chunk; returns how many chunks they hashed.
    pub fn stop(&self) -> u64 {
        self.stopped.store(true, Ordering::Relaxed);
        self.hashed.load(Ordering::Relaxed)
    }

    /// Stops the workers and forgets every hash: a new connection reads everything again.
    pub fn discard(&self) {
        self.stop();
        self.hashes.lock().expect("prehash lock poisoned").clear();
    }

    /// The source's hash of a chunk, if a worker took it (once: it is removed).
    pub fn take(&self, disk: u16, index: u64) -> Option<[u8; 32]> {
        self.hashes
            .lock()
            .expect("prehash lock poisoned")
            .remove(&(disk, index))
    }
}

/// The chunks worth hashing ahead, in disk order: those with a recorded hash (the replica
/// holds them; the others are sent whatever they hold), less those the source's tracking
/// knows unchanged (not read at all).
pub fn candidates(
    recorded: impl IntoIterator<Item = (u16, u64)>,
    unchanged: impl Fn(u16, u64) -> bool,
) -> Vec<(u16, u64)> {
    let mut chunks: Vec<(u16, u64)> = recorded.into_iter().filter(|&(d, i)| !unchanged(d, i)).collect();
    chunks.sort_unstable();
    chunks.dedup();
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Mem(Vec<u8>);

    impl DiskReader for Mem {
        fn capacity(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let start = offset as usize;
            buf.copy_from_slice(&self.0[start..start + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn hashes_the_candidates_until_stopped_and_forgets_on_discard() {
        let disk: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let disks: Vec<Box<dyn DiskReader>> = vec![Box::new(Mem(disk.clone()))];
        // Chunk 1 is known unchanged, chunk 3 recorded twice; chunk 2 has no record.
        let chunks = candidates([(0, 3), (0, 0), (0, 1), (0, 3)], |_, i| i == 1);
        assert_eq!(chunks, vec![(0, 0), (0, 3)]);
        let p = Prehash::default();
        let (next, read) = (AtomicUsize::new(0), AtomicU64::new(0));
        p.hash_ahead(&disks, &chunks, &next, 4096, &read);
        // The last chunk is short (10,000 bytes in chunks of 4 KiB: 3 chunks).
        assert_eq!(read.load(Ordering::Relaxed), 4096);
        assert_eq!(p.take(0, 0), Some(gateway::chunk::chunk_hash(&disk[..4096])));
        assert_eq!(p.take(0, 0), None, "taken once");
        assert_eq!(p.stop(), 1);
        // Stopped: nothing more is read.
        let p2 = Prehash::default();
        p2.stop();
        p2.hash_ahead(&disks, &[(0, 0), (0, 2)], &AtomicUsize::new(0), 4096, &read);
        assert_eq!(p2.take(0, 2), None);
        let p3 = Prehash::default();
        p3.hash_ahead(&disks, &[(0, 2)], &AtomicUsize::new(0), 4096, &read);
        p3.discard();
        assert_eq!(p3.take(0, 2), None);
    }
}
