//! The journal of a migration in staging: which chunks are durably in its disk files.
//!
//! The connection driver appends a batch only after fdatasync of the disks the batch
//! wrote, then fdatasyncs the journal, and only then acknowledges the chunks to the edge.
//! So every record names data that is on disk, and every acknowledgement names a record.
//! A resumed migration reads the journal back instead of the disks: the destination is
//! never re-read or re-hashed.
//!
//! Records are fixed-size, so a record torn by a crash mid-append is a short tail that
//! [`Journal::open`] cuts off:
//!
//! ```text
//! disk u16 | kind u8 (0 data, 1 zero run) | hash u8 | 0u32 | offset u64 | count u64 | hash [32]
//! ```
//! All integers are big-endian; a data record has count 1 and the plaintext hash, a zero
//! run has a zero hash field (each chunk's zero hash is derived from its length). The
//! hash byte names the chunk hash: 0 SHA-256 (what endpoints of protocol version 7 and
//! older wrote there, as padding), 1 BLAKE3. A data record of another hash than this
//! build's is not trusted: [`Journal::read`] returns its chunk as stale, and the resume
//! re-hashes that chunk from the staged disk (`placement::resume`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use gateway::chunk::ChunkHash;
use gateway::integrity::DiskHashes;
use gateway::plan::MigrationPlan;
use gateway::protocol::Unsynced;

use super::{io_err, DatastoreError};

/// The journal's file name inside the staging folder; removed before the commit.
pub const JOURNAL_FILE: &str = ".chunks.journal";
const RECORD: usize = 56;
const DATA: u8 = 0;
const ZERO_RUN: u8 = 1;

/// The journal's byte for a chunk hash.
fn hash_id(alg: ChunkHash) -> u8 {
    match alg {
        ChunkHash::Sha256 => 0,
        ChunkHash::Blake3 => 1,
    }
}

/// What a journal holds for a plan.
#[derive(Debug)]
pub struct Replay {
    /// One table per disk of the plan: each chunk's hash, the last record winning.
    pub tables: Vec<DiskHashes>,
    /// Data chunks (disk, chunk index) whose last record carries another hash than this
    /// build's (an older endpoint wrote them): held on disk, but not in `tables` until
    /// they are re-hashed.
    pub stale: Vec<(u16, u64)>,
}

/// An open journal, appended to by one connection at a time.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    /// Opens (creating if absent) the journal in `dir`, cutting a torn last record.
    pub fn open(dir: &Path) -> Result<Journal, DatastoreError> {
        let path = dir.join(JOURNAL_FILE);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_err("open journal", &path))?;
        let len = file.metadata().map_err(io_err("inspect journal", &path))?.len();
        let whole = len - len % RECORD as u64;
        if whole != len {
            file.set_len(whole)
                .map_err(io_err("cut the torn end of journal", &path))?;
        }
        Ok(Journal {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends `batch` and makes it durable. The caller has already synced the disks.
    pub fn append(&self, batch: &Unsynced) -> io::Result<()> {
        let buf = records(batch);
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(&buf)?;
        file.sync_data()
    }

    /// Replaces the journal in `dir` with one holding exactly `batch`: written beside it,
    /// made durable, then renamed over it, so a crash leaves the old journal or the new
    /// one. A rollback uses it to forget chunks the cloud VM changed.
    pub fn replace(dir: &Path, batch: &Unsynced) -> Result<(), DatastoreError> {
        let path = dir.join(JOURNAL_FILE);
        let next = dir.join(format!("{JOURNAL_FILE}.next"));
        let written = (|| {
            let mut file = File::create(&next)?;
            file.write_all(&records(batch))?;
            file.sync_all()?;
            std::fs::rename(&next, &path)?;
            File::open(dir)?.sync_all()
        })();
        written.map_err(io_err("replace journal", &path))
    }

    /// What the journal holds: one table per disk of `plan`, each chunk's plaintext hash
    /// (zero chunks with their zero hash), the last record naming a chunk winning. The
    /// file is read record by record into tables of the plan's size, so neither its
    /// length nor its runs (an older endpoint journaled every zero run an edge sent,
    /// repeats included) can make replay hold more than the plan's chunk hashes. A record
    /// that does not fit `plan` means the file is not this migration's journal: an
    /// error, never a guess.
    pub fn read(&self, plan: &MigrationPlan) -> Result<Replay, DatastoreError> {
        let corrupt = |why: String| DatastoreError::Io {
            action: "read journal",
            path: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, why),
        };
        let file = File::open(&self.path).map_err(io_err("read journal", &self.path))?;
        let mut reader = io::BufReader::new(file);
        let cs = u64::from(plan.chunk_size);
        let mut tables: Vec<DiskHashes> = plan
            .vm
            .disks
            .iter()
            .map(|d| DiskHashes::new(d.capacity, plan.chunk_size))
            .collect();
        let mut stale = std::collections::BTreeSet::new();
        let current = hash_id(ChunkHash::CURRENT);
        let mut r = [0u8; RECORD];
        loop {
            match reader.read_exact(&mut r) {
                Ok(()) => {}
                // The torn tail was cut at open; a shorter rest is a record being appended.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io_err("read journal", &self.path)(e)),
            }
            let disk = u16::from_be_bytes([r[0], r[1]]);
            let kind = r[2];
            let offset = u64::from_be_bytes(r[8..16].try_into().expect("8 bytes"));
            let count = u64::from_be_bytes(r[16..24].try_into().expect("8 bytes"));
            let hash: [u8; 32] = r[24..56].try_into().expect("32 bytes");
            let disks = tables.len();
            let Some(h) = tables.get_mut(usize::from(disk)) else {
                return Err(corrupt(format!("a record names disk {disk}, the plan has {disks}")));
            };
            let first = offset / cs;
            let fits = offset % cs == 0
                && count >= 1
                && first.checked_add(count).is_some_and(|end| end <= h.chunk_count())
                && (kind == ZERO_RUN || (kind == DATA && count == 1));
            if !fits {
                return Err(corrupt(format!(
                    "a record (kind {kind}, disk {disk}, offset {offset}, count {count}) does not fit the plan"
                )));
            }
            if kind == DATA && r[3] != current {
                h.unset(first);
                stale.insert((disk, first));
            } else if kind == DATA {
                h.set(first, hash);
                stale.remove(&(disk, first));
            } else {
                for i in first..first + count {
                    let zero = h.zero_hash(i);
                    h.set(i, zero);
                    stale.remove(&(disk, i));
                }
            }
        }
        Ok(Replay {
            tables,
            stale: stale.into_iter().collect(),
        })
    }
}

/// The records of `batch`, in the journal's layout.
fn records(batch: &Unsynced) -> Vec<u8> {
    let mut buf = Vec::with_capacity(RECORD * (batch.chunks.len() + batch.zero_runs.len()));
    let mut record = |disk: u16, kind: u8, offset: u64, count: u64, hash: &[u8; 32]| {
        buf.extend_from_slice(&disk.to_be_bytes());
        buf.push(kind);
        buf.push(hash_id(ChunkHash::CURRENT));
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&count.to_be_bytes());
        buf.extend_from_slice(hash);
    };
    for (disk, offset, hash) in &batch.chunks {
        record(*disk, DATA, *offset, 1, hash);
    }
    for (disk, offset, count) in &batch.zero_runs {
        record(*disk, ZERO_RUN, *offset, *count, &[0; 32]);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::plan::{DiskSpec, VmSpec};

    fn plan() -> MigrationPlan {
        MigrationPlan {
            vm: VmSpec {
                name: "web01".into(),
                guest_os: "other".into(),
                num_cpus: 1,
                cores_per_socket: None,
                memory_mib: 64,
                firmware: None,
                bios_uuid: None,
                nics: vec![],
                controllers: vec![],
                disks: vec![DiskSpec {
                    key: "scsi0:0".into(),
                    capacity: 10 << 20,
                }],
            },
            network_map: vec![],
            chunk_size: 1 << 20,
            disk_format: None,
            firewall: Default::default(),
            placement: Default::default(),
            source_descriptor_sha256: None,
            seed: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan();
        let j = Journal::open(dir.path()).unwrap();
        j.append(&Unsynced {
            chunks: vec![(0, 0, [7; 32]), (0, 3 << 20, [8; 32])],
            zero_runs: vec![(0, 5 << 20, 2)],
        })
        .unwrap();
        drop(j);
        // A crash in the middle of the next append.
        let path = dir.path().join(JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0, 0, 0, 9]).unwrap();
        drop(f);
        let j = Journal::open(dir.path()).unwrap();
        let read = j.read(&plan).unwrap();
        assert!(read.stale.is_empty());
        let read = read.tables;
        let zero = DiskHashes::new(10 << 20, 1 << 20);
        let held: Vec<(u64, [u8; 32])> = (0..10).filter_map(|i| read[0].get(i).map(|h| (i, h))).collect();
        assert_eq!(
            held,
            vec![
                (0, [7; 32]),
                (3, [8; 32]),
                (5, zero.zero_hash(5)),
                (6, zero.zero_hash(6))
            ]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * RECORD as u64);
    }

    #[test]
    fn records_outside_the_plan_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan();
        let j = Journal::open(dir.path()).unwrap();
        j.append(&Unsynced {
            chunks: vec![(1, 0, [7; 32])],
            zero_runs: vec![],
        })
        .unwrap();
        let e = j.read(&plan).unwrap_err().to_string();
        assert!(e.contains("disk 1") && e.contains(JOURNAL_FILE), "{e}");
        let j2 = tempfile::tempdir().unwrap();
        let j2 = Journal::open(j2.path()).unwrap();
        j2.append(&Unsynced {
            chunks: vec![],
            zero_runs: vec![(0, 9 << 20, 2)],
        })
        .unwrap();
        assert!(j2.read(&plan).unwrap_err().to_string().contains("does not fit"));
    }

    #[test]
    fn repeated_runs_replay_into_one_table_of_the_plan_size() {
        // What an older endpoint journaled for an edge that declared the whole disk zero
        // 600 times: replayed, it is one state per chunk, not 600 entries per chunk.
        let dir = tempfile::tempdir().unwrap();
        let plan = plan();
        let j = Journal::open(dir.path()).unwrap();
        let whole = Unsynced {
            chunks: vec![],
            zero_runs: vec![(0, 0, 10); 600],
        };
        j.append(&whole).unwrap();
        j.append(&Unsynced {
            chunks: vec![(0, 2 << 20, [9; 32])],
            zero_runs: vec![],
        })
        .unwrap();
        let read = j.read(&plan).unwrap().tables;
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].chunk_count(), read[0].known()), (10, 10));
        // The last record naming a chunk wins.
        assert_eq!(read[0].get(2), Some([9; 32]));
        assert_eq!(read[0].get(9), Some(read[0].zero_hash(9)));
    }

    #[test]
    fn sha256_records_of_an_older_endpoint_are_stale_not_trusted() {
        // Protocol version 7 wrote 0 in the hash byte and SHA-256 hashes: such a data
        // record must not be replayed as a hash of this build, whatever it says.
        let dir = tempfile::tempdir().unwrap();
        let plan = plan();
        let j = Journal::open(dir.path()).unwrap();
        j.append(&Unsynced {
            chunks: vec![(0, 0, [7; 32]), (0, 1 << 20, [8; 32]), (0, 4 << 20, [6; 32])],
            zero_runs: vec![(0, 2 << 20, 1)],
        })
        .unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        for r in bytes.chunks_mut(RECORD) {
            r[3] = 0;
        }
        std::fs::write(&path, &bytes).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        // Chunk 4 was written again by this build: its new record wins.
        j.append(&Unsynced {
            chunks: vec![(0, 4 << 20, [5; 32])],
            zero_runs: vec![],
        })
        .unwrap();
        let read = j.read(&plan).unwrap();
        assert_eq!(read.stale, vec![(0, 0), (0, 1)]);
        let t = &read.tables[0];
        assert_eq!((t.get(0), t.get(1)), (None, None));
        // Zero runs carry no hash: the zero hash is derived with this build's hash.
        assert_eq!(t.get(2), Some(t.zero_hash(2)));
        assert_eq!(t.get(4), Some([5; 32]));
    }
}
