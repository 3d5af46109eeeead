//! The sealers: read, zero-check, hash and compress chunks on the blocking pool, and queue
//! those to send for the senders.
//!
//! A sealer's blocking task goes on from chunk to chunk, taking the next ones from the
//! queue, until one is to be sent. In a delta pass of a disk without changed-block
//! tracking nearly every chunk is read, hashed and found unchanged: a task per chunk (a
//! hand-off to the blocking pool and back, and a wake of the control writer) cost about
//! as much CPU as the read and the hash of its 64 KiB, and on a 10 GiB disk that is
//! 100,000 chunks.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use gateway::chunk::{chunk_hash, is_zero, Sealer};
use gateway::protocol::Work;
use gateway::wire::ChunkHeader;
use tokio::sync::mpsc;

use super::{Next, Shared};
use crate::source::DiskReader;
use crate::MigrateError;

/// Most chunks one blocking task runs: it holds a thread of the pool, and what it found
/// (a seal, zero runs) reaches the control writer when it ends.
const CHUNKS_PER_TASK: usize = 64;

/// A chunk ready for the wire.
pub(super) struct SealedChunk {
    pub(super) header: ChunkHeader,
    pub(super) payload: Vec<u8>,
}

/// Buffers a worker moves into the blocking pool and back, so nothing is
/// reallocated per chunk.
struct WorkerBufs {
    sealer: Sealer,
    plain: Vec<u8>,
    payload: Vec<u8>,
}

/// Reads, zero-checks, hashes and compresses chunks on the blocking pool, and
/// queues them for the senders.
pub(super) async fn sealer(
    shared: &Arc<Shared>,
    disks: &Arc<Vec<Box<dyn DiskReader>>>,
    sealed: mpsc::Sender<SealedChunk>,
) -> Result<(), MigrateError> {
    let level = shared.level.load(Ordering::Relaxed);
    let mut bufs = Some(WorkerBufs {
        sealer: Sealer::new(level).map_err(|e| MigrateError::Target(format!("zstd level {level}: {e}")))?,
        plain: Vec::new(),
        payload: Vec::new(),
    });
    // Disk keys (scsi0:0), for read errors.
    let keys: Arc<[String]> = shared.session().plan().vm.disks.iter().map(|d| d.key.clone()).collect();
    while let Some(first) = shared.next_job().await {
        let mut b = bufs.take().expect("buffers returned after each task");
        let (task, disks, keys) = (shared.clone(), disks.clone(), keys.clone());
        let (b, to_send) = tokio::task::spawn_blocking(move || {
            let to_send = run_chunks(&task, &disks, &keys, first, &mut b);
            (b, to_send)
        })
        .await
        .expect("sealing does not panic");
        bufs = Some(b);
        // Zero runs, seals and the end of the pass go out now.
        shared.wake_writer.notify_one();
        if let Some(chunk) = to_send? {
            let waiting = Instant::now();
            if sealed.send(chunk).await.is_err() {
                // The senders are gone: the migration is ending.
                return Ok(());
            }
            shared
                .sealers_blocked_ns
                .fetch_add(waiting.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Runs `first`, then the next chunks of the queue, until one is to be sent (returned),
/// [`CHUNKS_PER_TASK`] ran, or the queue has none for now. Blocking.
fn run_chunks(
    shared: &Shared,
    disks: &[Box<dyn DiskReader>],
    keys: &[String],
    first: (u16, u64),
    b: &mut WorkerBufs,
) -> Result<Option<SealedChunk>, MigrateError> {
    let mut job = Some(first);
    let mut ran = 0;
    while let Some((disk, offset)) = job.take() {
        if let Some(chunk) = run_chunk(shared, disks, keys, disk, offset, b)? {
            return Ok(Some(chunk));
        }
        ran += 1;
        if ran < CHUNKS_PER_TASK {
            if let Next::Job(d, o) = shared.jobs.lock().expect("jobs lock poisoned").next() {
                job = Some((d, o));
            }
        }
    }
    Ok(None)
}

/// One chunk: what the session says to do with it, done; the sealed chunk if it is to be
/// sent.
fn run_chunk(
    shared: &Shared,
    disks: &[Box<dyn DiskReader>],
    keys: &[String],
    disk: u16,
    offset: u64,
    b: &mut WorkerBufs,
) -> Result<Option<SealedChunk>, MigrateError> {
    let chunk_size = u64::from(shared.session().plan().chunk_size);
    // After a resume most chunks are done; some are known zero or only need their hash.
    let work = shared.session().work_for(disk, offset);
    match work {
        Work::Skip => return Ok(None),
        Work::Zero => {
            zero_done(shared, disk, offset);
            return Ok(None);
        }
        // The source's tracking (QEMU's dirty bitmap, or the snapshot chain) knows it
        // unchanged since the replica got it: the replica's copy stays, unread.
        // Or it was read and found unchanged while the connection was set up.
        Work::Compare(held)
            if shared.run.unchanged(disk, offset, chunk_size)
                || shared.run.prehash.take(disk, offset / chunk_size) == Some(held) =>
        {
            shared.session().chunk_hashed(disk, offset, held);
            return Ok(None);
        }
        Work::Send | Work::Hash | Work::Compare(_) | Work::Probe => {}
    }
    let reader = &disks[usize::from(disk)];
    let len = (reader.capacity() - offset).min(chunk_size) as usize;
    // Holes of a sparse source are zeros without reading them; the run a hole starts is
    // remembered for the chunks after it.
    let holes = &shared.holes;
    if holes.known(disk, offset, len as u64) || holes.find(disk, reader.as_ref(), offset, len as u64, chunk_size) {
        zero_found(shared, disk, offset, work, len);
        return Ok(None);
    }
    b.plain.resize(len, 0);
    if let Err(e) = reader.read_at(offset, &mut b.plain) {
        return Err(MigrateError::Read {
            what: format!("disk {} at offset {offset}", keys[usize::from(disk)]),
            source: e,
        });
    }
    shared.run.read_bytes.fetch_add(len as u64, Ordering::Relaxed);
    match work {
        // Deduplication: the hash goes into a query; the data waits for the answer.
        Work::Probe if !is_zero(&b.plain) => {
            shared.session().chunk_probed(disk, offset, chunk_hash(&b.plain));
            return Ok(None);
        }
        Work::Hash => {
            let hash = chunk_hash(&b.plain);
            shared.session().chunk_hashed(disk, offset, hash);
            shared.run.record(disk, offset / chunk_size, hash);
            return Ok(None);
        }
        // A delta pass: what the replica holds already stays (its record is there from
        // an earlier pass).
        Work::Compare(held) if chunk_hash(&b.plain) == held => {
            shared.session().chunk_hashed(disk, offset, held);
            return Ok(None);
        }
        _ if is_zero(&b.plain) => {
            zero_found(shared, disk, offset, work, len);
            return Ok(None);
        }
        _ => {}
    }
    if b.payload.capacity() == 0 {
        if let Some(spare) = shared.spare.lock().expect("spare lock poisoned").pop() {
            b.payload = spare;
        }
    }
    // A level zstd refuses keeps the previous one: still correct.
    let _ = b.sealer.set_level(shared.level.load(Ordering::Relaxed));
    let header = b.sealer.seal(disk, offset, &b.plain, &mut b.payload);
    shared.session().chunk_sent(disk, offset, header.hash);
    Ok(Some(SealedChunk {
        header,
        payload: std::mem::take(&mut b.payload),
    }))
}

/// A chunk of `work` found zero (read, or a hole): hashed where the cloud holds it,
/// unchanged where the replica holds zeros, declared zero otherwise.
fn zero_found(shared: &Shared, disk: u16, offset: u64, work: Work, chunk_len: usize) {
    match work {
        Work::Hash => {
            let zero = chunk_hash(&vec![0; chunk_len]);
            shared.session().chunk_hashed(disk, offset, zero);
            let chunk_size = u64::from(shared.session().plan().chunk_size);
            shared.run.record(disk, offset / chunk_size, zero);
        }
        // Zeros (a hole) where the replica holds zeros: unchanged.
        Work::Compare(held) if shared.session().zero_hash(disk, offset) == Some(held) => {
            shared.session().chunk_hashed(disk, offset, held);
        }
        _ => zero_done(shared, disk, offset),
    }
}

/// A chunk found (or known) to be zero: declared, and recorded as done.
fn zero_done(shared: &Shared, disk: u16, offset: u64) {
    let mut s = shared.session();
    s.chunk_zero(disk, offset);
    if let Some(hash) = s.chunk_hash(disk, offset) {
        let index = offset / u64::from(s.plan().chunk_size);
        drop(s);
        shared.run.record(disk, index, hash);
    }
}
