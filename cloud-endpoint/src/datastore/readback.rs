//! The read-back before a commit: every staged chunk the receiver names is read from the
//! file as it is now and compared with the hash the edge sent for it.
//!
//! Why: a migration's chunks were verified when they arrived, but a staged file can change
//! after that (while a migration waits for its edge to resume, a disk fault, a hand on the
//! datastore), and the receipt states Merkle roots of the recorded hashes. Reading the
//! bytes back makes the receipt speak of what the cloud registers.
//!
//! A chunk expected to be all zeros that is not is rewritten with zeros here (its content
//! is known without the edge); any other chunk that differs is reported, and the receiver
//! asks the edge to send it again.
//!
//! [`read_back_early`] is the same read without any write, for the replica of a pass that
//! ends with the switchover, while the pass streams (and writes the same files): what it
//! finds intact is not read again at the switchover; anything else is, by [`read_back`].

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gateway::chunk::{chunk_hash, is_zero};

use super::DiskFile;

/// What one read-back found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadBack {
    /// Chunks (disk, chunk index) whose bytes differ from their hash: to be re-sent.
    pub damaged: Vec<(u16, u64)>,
    /// Expected-zero chunks that held other bytes and were rewritten with zeros.
    pub rewritten_zero: Vec<(u16, u64)>,
    /// Bytes read.
    pub bytes_read: u64,
    /// Expected-zero chunks the file does not allocate: zeros without a read.
    pub unallocated: u64,
}

/// Reads back `chunks` (disk, chunk index, expected plaintext chunk hash) of `disks` on up to
/// `threads` threads. `capacities` are the disks' sizes in the plan, which the chunks
/// cover (a staged file may be longer: whole sectors). A read or write error fails the
/// whole read-back: the caller pauses the migration rather than register a VM whose disks
/// cannot be read.
pub fn read_back(
    disks: &[Arc<DiskFile>],
    capacities: &[u64],
    chunk_size: u32,
    chunks: &[(u16, u64, [u8; 32])],
    threads: usize,
) -> io::Result<ReadBack> {
    scan(disks, capacities, chunk_size, chunks, threads, true, &|| false)
}

/// [`read_back`] without writing anything, while a pass writes the same files: returns the
/// chunks (disk, chunk index) whose bytes match their hash. An expected-zero chunk that
/// is not zero is not rewritten, only left out (the read-back at the switchover rewrites
/// it). A chunk the pass writes meanwhile may be found either way; the receiver reads it
/// again at the switchover whatever is found here. `stop` is asked before each chunk: once
/// it says yes (the connection is gone), the read ends with [`io::ErrorKind::Interrupted`].
pub fn read_back_early(
    disks: &[Arc<DiskFile>],
    capacities: &[u64],
    chunk_size: u32,
    chunks: &[(u16, u64, [u8; 32])],
    threads: usize,
    stop: &(dyn Fn() -> bool + Sync),
) -> io::Result<(Vec<(u16, u64)>, ReadBack)> {
    let found = scan(disks, capacities, chunk_size, chunks, threads, false, stop)?;
    let different: std::collections::HashSet<(u16, u64)> = found.damaged.iter().copied().collect();
    let intact = chunks
        .iter()
        .map(|&(disk, index, _)| (disk, index))
        .filter(|c| !different.contains(c))
        .collect();
    Ok((intact, found))
}

/// The read of both: `rewrite_zero` rewrites expected-zero chunks that are not zero (else
/// they are reported with the damaged ones).
fn scan(
    disks: &[Arc<DiskFile>],
    capacities: &[u64],
    chunk_size: u32,
    chunks: &[(u16, u64, [u8; 32])],
    threads: usize,
    rewrite_zero: bool,
    stop: &(dyn Fn() -> bool + Sync),
) -> io::Result<ReadBack> {
    let cs = u64::from(chunk_size);
    let zero_full = chunk_hash(&vec![0u8; chunk_size as usize]);
    let next = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    let holes = AtomicU64::new(0);
    let found = Mutex::new(ReadBack::default());
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    let worker = || {
        let mut buf = vec![0u8; chunk_size as usize];
        loop {
            if first_error.lock().expect("error lock").is_some() {
                return;
            }
            if stop() {
                first_error
                    .lock()
                    .expect("error lock")
                    .get_or_insert_with(|| io::Error::new(io::ErrorKind::Interrupted, "the read-back was stopped"));
                return;
            }
            let i = next.fetch_add(1, Ordering::Relaxed) as usize;
            let Some(&(disk, index, expected)) = chunks.get(i) else {
                return;
            };
            let result = (|| {
                let (Some(file), Some(&capacity)) = (disks.get(usize::from(disk)), capacities.get(usize::from(disk)))
                else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no staged disk {disk}"),
                    ));
                };
                let offset = index * cs;
                let len = offset.saturating_add(cs).min(capacity).saturating_sub(offset) as usize;
                let zero_expected = if len == chunk_size as usize {
                    expected == zero_full
                } else {
                    expected == chunk_hash(&vec![0u8; len])
                };
                // A zero chunk is never written, so on a realistic disk most chunks are
                // holes: the file system says they are zeros without a read (reading
                // them was most of the read-back's cost).
                if zero_expected && file.is_unallocated(offset, len as u64)? {
                    holes.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                let data = &mut buf[..len];
                file.read_at(data, offset)?;
                bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                if zero_expected && !rewrite_zero {
                    if !is_zero(data) {
                        found.lock().expect("found lock").damaged.push((disk, index));
                    }
                } else if zero_expected {
                    if !is_zero(data) {
                        data.fill(0);
                        file.write_at(data, offset)?;
                        found.lock().expect("found lock").rewritten_zero.push((disk, index));
                    }
                } else if chunk_hash(data) != expected {
                    found.lock().expect("found lock").damaged.push((disk, index));
                }
                Ok::<_, io::Error>(())
            })();
            if let Err(e) = result {
                first_error.lock().expect("error lock").get_or_insert(e);
                return;
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            // The closure holds only references, so each thread gets a copy.
            scope.spawn(worker);
        }
    });
    if let Some(e) = first_error.into_inner().expect("error lock") {
        return Err(e);
    }
    let mut found = found.into_inner().expect("found lock");
    if !found.rewritten_zero.is_empty() {
        for disk in found
            .rewritten_zero
            .iter()
            .map(|(d, _)| *d)
            .collect::<std::collections::BTreeSet<_>>()
        {
            disks[usize::from(disk)].sync_data()?;
        }
    }
    found.damaged.sort_unstable();
    found.rewritten_zero.sort_unstable();
    found.bytes_read = bytes_read.into_inner();
    found.unallocated = holes.into_inner();
    Ok(found)
}
