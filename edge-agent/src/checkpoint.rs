//! The edge's record of a migration in progress, so that a restarted agent (or one whose
//! link dropped) continues instead of starting over.
//!
//! Two files per migration in the state folder, named by a key of (source, target,
//! VM name in the cloud). The target is its one endpoint address, or for a target of
//! several endpoints their URLs together, so that a migration resumed on another
//! endpoint of the same domain keeps its record (`Target::record_keys`):
//!
//! ```text
//! <key>.json     header: migration id, target, plan digest, source fingerprint
//! <key>.chunks   appended: (disk u16, chunk index u64, hash [32]) per chunk the
//!                cloud acknowledged or that was declared zero; the header names the
//!                chunk hash (a record without one is SHA-256, by an older agent)
//! ```
//! The cloud's journal decides what is done; this record only spares reading and
//! hashing those chunks again (a chunk the cloud holds but this file misses is read and
//! hashed, not sent). The fingerprint (size, modification and change times, inode of
//! the .vmx and every disk file) and a re-hash of a few recorded chunks detect a source
//! that changed while the migration was paused: resuming it would mix old and new blocks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use gateway::protocol::DoneChunk;
use serde::{Deserialize, Serialize};

use crate::source::{ChainLink, SourceVm};

const RECORD: usize = 2 + 8 + 32;

/// The state folder when none is given: `$EDGE_AGENT_STATE_DIR`, else
/// `$XDG_STATE_HOME/edge-agent`, else `~/.local/state/edge-agent`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("edge-agent");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/edge-agent"),
        None => PathBuf::from("/var/lib/edge-agent"),
    }
}

/// One file's identity at the time the migration started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: PathBuf,
    pub len: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub inode: u64,
}

/// Stamps of the .vmx (or OVF/OVA) and every disk file.
pub fn fingerprint(vm: &SourceVm) -> io::Result<Vec<FileStamp>> {
    let mut paths: Vec<&Path> = vec![&vm.vmx_path];
    paths.extend(vm.disks.iter().map(|d| d.path.as_path()));
    paths.dedup();
    paths
        .into_iter()
        .map(|p| {
            let m = fs::metadata(p)?;
            Ok(FileStamp {
                path: p.to_owned(),
                len: m.len(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
                inode: m.ino(),
            })
        })
        .collect()
}

/// What the header records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub migration_id: String,
    /// The target the record is filed under: one endpoint's address, or the URLs of a
    /// target of several (`Target::record_keys`).
    pub endpoint: String,
    pub vm_name: String,
    /// SHA-256 of the plan's wire encoding.
    pub plan_digest: String,
    /// The plan's wire encoding itself: `edge-agent abort` names the migration with
    /// it even when the source changed since.
    #[serde(default)]
    pub plan: Vec<u8>,
    pub source: Vec<FileStamp>,
    pub started: String,
    /// A replication (`edge-agent replicate`): the record outlives each pass, and the
    /// source is expected to change between passes.
    #[serde(default)]
    pub replica: bool,
    /// A replication of VMware files: per disk, the frozen part of its snapshot chain that
    /// the last complete pass read, newest first (see `source::snapshot_tracking`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frozen_chains: Vec<Vec<ChainLink>>,
    /// A replication switched over to this VM in the cloud, awaiting `edge-agent
    /// confirm` (the record is then removed) or `rollback` (then replication goes on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_over: Option<String>,
    /// When the last complete pass of a replication started (Unix seconds, the edge's
    /// clock): a switchover's estimate of the source's stop is not earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pass_started: Option<i64>,
    /// The hash of the recorded chunks. A record without it was written by an agent of
    /// protocol version 7 or older, with SHA-256: [`Checkpoint::load`] drops its chunks.
    #[serde(default)]
    pub chunk_hash: gateway::chunk::ChunkHash,
}

/// The two files of one migration's record.
#[derive(Debug)]
pub struct Checkpoint {
    header_path: PathBuf,
    chunks_path: PathBuf,
    chunks: Option<File>,
    pending: Vec<u8>,
}

impl Checkpoint {
    /// The record for `source` migrated to `endpoint` as `vm_name`, under `dir`.
    pub fn at(dir: &Path, source: &Path, endpoint: &str, vm_name: &str) -> Checkpoint {
        let source = fs::canonicalize(source).unwrap_or_else(|_| source.to_owned());
        let key = gateway::chunk::sha256(format!("{}\n{endpoint}\n{vm_name}", source.display()).as_bytes());
        let safe: String = vm_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let base = format!("{safe}-{}", &gateway::integrity::hex(&key)[..16]);
        Checkpoint {
            header_path: dir.join(format!("{base}.json")),
            chunks_path: dir.join(format!("{base}.chunks")),
            chunks: None,
            pending: Vec::new(),
        }
    }

    /// The record for `source` migrated to a target as `vm_name`, under `dir`: the first
    /// of the target's `keys` (`Target::record_keys`) that has one, so that a record an
    /// older agent or a single-endpoint run filed under one address is found; else a new
    /// one under the first key.
    pub fn find(dir: &Path, source: &Path, keys: &[String], vm_name: &str) -> Checkpoint {
        let mut candidates = keys.iter().map(|key| Checkpoint::at(dir, source, key, vm_name));
        let Some(first) = candidates.next() else {
            return Checkpoint::at(dir, source, "", vm_name);
        };
        if first.header_path.exists() {
            return first;
        }
        candidates.find(|c| c.header_path.exists()).unwrap_or(first)
    }

    pub fn path(&self) -> &Path {
        &self.header_path
    }

    /// The recorded header and chunks, if a record exists. A torn last chunk record is
    /// ignored.
    pub fn load(&self) -> io::Result<Option<(Header, Vec<DoneChunk>)>> {
        let text = match fs::read_to_string(&self.header_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut header: Header = serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", self.header_path.display()),
            )
        })?;
        if header.chunk_hash != gateway::chunk::ChunkHash::CURRENT {
            // Hashes of another algorithm would be taken for this build's and mix into
            // the Merkle roots: forget them (the chunks are read and hashed again, and
            // the cloud's journal still spares sending what it holds).
            tracing::warn!(
                record = %self.header_path.display(),
                "the record's chunk hashes are {}; reading and hashing those chunks again",
                header.chunk_hash.name()
            );
            header.chunk_hash = gateway::chunk::ChunkHash::CURRENT;
            match fs::remove_file(&self.chunks_path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.rewrite_header(&header)?;
        }
        let mut data = Vec::new();
        match File::open(&self.chunks_path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let chunks = data
            .chunks_exact(RECORD)
            .map(|r| {
                (
                    u16::from_be_bytes([r[0], r[1]]),
                    u64::from_be_bytes(r[2..10].try_into().expect("8 bytes")),
                    r[10..42].try_into().expect("32 bytes"),
                )
            })
            .collect();
        Ok(Some((header, chunks)))
    }

    /// Starts a record (replacing any): the header, and an empty chunk list.
    pub fn start(&mut self, header: &Header) -> io::Result<()> {
        if let Some(dir) = self.header_path.parent() {
            fs::create_dir_all(dir)?;
        }
        self.chunks = None;
        let _ = fs::remove_file(&self.chunks_path);
        self.rewrite_header(header)?;
        self.open_chunks()
    }

    /// Replaces the header of an existing record, keeping its chunks.
    pub fn rewrite_header(&self, header: &Header) -> io::Result<()> {
        let tmp = self.header_path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(header)
                .map_err(io::Error::other)?
                .as_bytes(),
        )?;
        f.sync_all()?;
        fs::rename(&tmp, &self.header_path)
    }

    /// Continues an existing record (once: later calls keep the open file).
    pub fn open_chunks(&mut self) -> io::Result<()> {
        if self.chunks.is_some() {
            return Ok(());
        }
        let f = OpenOptions::new().create(true).append(true).open(&self.chunks_path)?;
        // Cut a torn last record, so appends stay aligned.
        let len = f.metadata()?.len();
        if len % RECORD as u64 != 0 {
            f.set_len(len - len % RECORD as u64)?;
        }
        self.chunks = Some(f);
        Ok(())
    }

    /// Queues chunk records; [`Checkpoint::flush`] writes them.
    pub fn record(&mut self, disk: u16, index: u64, hash: &[u8; 32]) {
        self.pending.extend_from_slice(&disk.to_be_bytes());
        self.pending.extend_from_slice(&index.to_be_bytes());
        self.pending.extend_from_slice(hash);
    }

    /// Writes and syncs the queued records.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Some(f) = self.chunks.as_mut() {
            f.write_all(&self.pending)?;
            f.sync_data()?;
        }
        self.pending.clear();
        Ok(())
    }

    /// Removes the record (the migration committed, or the cloud discarded it).
    pub fn remove(&mut self) {
        self.chunks = None;
        self.pending.clear();
        let _ = fs::remove_file(&self.chunks_path);
        let _ = fs::remove_file(&self.header_path);
    }
}

/// SHA-256 of a plan's wire encoding, hex.
///
/// Without the source descriptor's digest: a replication's .vmx changes between passes
/// (VMware rewrites it at each snapshot) while the VM stays the same; a cold lift's
/// record also holds the .vmx's file stamp, which catches an edited one. Without the
/// seed either: it shapes the first pass's copies, not the VM, so a later pass need not
/// name it again.
pub fn plan_digest(plan: &gateway::plan::MigrationPlan) -> String {
    let plan = gateway::plan::MigrationPlan {
        source_descriptor_sha256: None,
        seed: None,
        ..plan.clone()
    };
    let bytes = gateway::wire::control::encode(&plan).unwrap_or_default();
    gateway::integrity::hex(&gateway::chunk::sha256(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            migration_id: "migration-7".into(),
            endpoint: "127.0.0.1:4433".into(),
            vm_name: "web01".into(),
            plan_digest: "ab".into(),
            plan: vec![1, 2],
            source: vec![],
            started: "2026-11-26T10:00:00Z".into(),
            replica: false,
            frozen_chains: Vec::new(),
            switched_over: None,
            last_pass_started: None,
            chunk_hash: gateway::chunk::ChunkHash::CURRENT,
        }
    }

    #[test]
    fn sha256_chunks_of_an_older_agent_are_dropped_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::at(dir.path(), Path::new("/vms/web01.vmx"), "127.0.0.1:4433", "web01");
        c.start(&header()).unwrap();
        c.record(0, 3, &[9; 32]);
        c.flush().unwrap();
        drop(c);
        // As an agent of protocol version 7 wrote the header: no chunk_hash field.
        let mut v: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(
                Checkpoint::at(dir.path(), Path::new("/vms/web01.vmx"), "127.0.0.1:4433", "web01").path(),
            )
            .unwrap(),
        )
        .unwrap();
        v.as_object_mut().unwrap().remove("chunk_hash");
        let c = Checkpoint::at(dir.path(), Path::new("/vms/web01.vmx"), "127.0.0.1:4433", "web01");
        fs::write(c.path(), v.to_string()).unwrap();
        let (h, records) = c.load().unwrap().unwrap();
        assert!(records.is_empty(), "{records:?}");
        assert_eq!(h, header());
        // The record now names this build's hash, and holds nothing of the old one.
        let (_, again) = c.load().unwrap().unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn a_record_filed_under_one_address_is_found_by_a_target_of_several() {
        let dir = tempfile::tempdir().unwrap();
        let vmx = Path::new("/vms/web01.vmx");
        let keys = |k: &[&str]| k.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        let several = keys(&["a.example:4433,b.example:4433", "10.0.0.1:4433", "10.0.0.2:4433"]);
        // Nothing recorded: a new record goes under the target as a whole.
        let fresh = Checkpoint::find(dir.path(), vmx, &several, "web01");
        assert_eq!(
            fresh.path(),
            Checkpoint::at(dir.path(), vmx, "a.example:4433,b.example:4433", "web01").path()
        );
        // An agent that named the second endpoint alone filed it under its address.
        let mut single = Checkpoint::at(dir.path(), vmx, "10.0.0.2:4433", "web01");
        single.start(&header()).unwrap();
        let found = Checkpoint::find(dir.path(), vmx, &several, "web01");
        assert_eq!(found.path(), single.path());
        assert_eq!(found.load().unwrap().unwrap().0, header());
        // Once the target's own record exists, it is the one.
        let mut whole = Checkpoint::find(dir.path(), vmx, &several[..1], "web01");
        whole.start(&header()).unwrap();
        assert_eq!(
            Checkpoint::find(dir.path(), vmx, &several, "web01").path(),
            whole.path()
        );
        // Another VM name is another record.
        assert!(Checkpoint::find(dir.path(), vmx, &several, "web02")
            .load()
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_record_survives_a_restart_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpoint::at(dir.path(), Path::new("/vms/web01.vmx"), "127.0.0.1:4433", "web 01");
        assert!(c.load().unwrap().is_none());
        c.start(&header()).unwrap();
        c.record(0, 3, &[9; 32]);
        c.record(1, 0, &[8; 32]);
        c.flush().unwrap();
        drop(c);
        let chunks = dir.path().join(
            fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .find(|n| n.to_string_lossy().ends_with(".chunks"))
                .unwrap(),
        );
        OpenOptions::new()
            .append(true)
            .open(&chunks)
            .unwrap()
            .write_all(&[1, 2, 3])
            .unwrap();
        let mut c = Checkpoint::at(dir.path(), Path::new("/vms/web01.vmx"), "127.0.0.1:4433", "web 01");
        let (h, records) = c.load().unwrap().unwrap();
        assert_eq!(h, header());
        assert_eq!(records, vec![(0, 3, [9; 32]), (1, 0, [8; 32])]);
        c.open_chunks().unwrap();
        c.record(0, 4, &[7; 32]);
        c.flush().unwrap();
        assert_eq!(c.load().unwrap().unwrap().1.len(), 3);
        // Another endpoint or name is another record.
        let other = Checkpoint::at(dir.path(), Path::new("/vms/web01.vmx"), "10.0.0.1:4433", "web 01");
        assert!(other.load().unwrap().is_none());
        c.remove();
        assert!(c.load().unwrap().is_none());
    }
}
