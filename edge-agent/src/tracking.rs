//! Changed-block tracking of a source VM that QEMU runs (`replicate --qmp`,
//! `switchover --qmp`), through QEMU's own incremental backup in push mode.
//!
//! A running VM's disk files are not a consistent image, and reading all of them at each
//! pass costs the whole disk. QEMU gives both a point-in-time copy and the set of changed
//! blocks:
//!
//! - A pass starts, in one QMP `transaction`, a new persistent dirty bitmap on each disk's
//!   node (granularity one chunk, so a dirty bit is a whole chunk) and a `blockdev-backup`
//!   of the disk into a temporary qcow2 image under `--state-dir`: `sync: full` when
//!   nothing can be trusted (the first pass, or a fallback), else `sync: bitmap` with the
//!   bitmap of the last successful pass. The backup is copy-before-write: the image holds
//!   the disk as it was at the transaction, whatever the guest writes meanwhile.
//! - An incremental backup writes exactly the dirty chunks into its image: data, or a
//!   zero cluster where the source reads as zeros (QEMU's block-copy writes zeros with
//!   `write-zeroes`; the target node is opened with `discard: ignore`, so qcow2 records a
//!   zero cluster instead of leaving the cluster unallocated). The image's mapped
//!   clusters are therefore the chunks that changed, a chunk that became zero included;
//!   everything else is unchanged since the last pass and is not read.
//! - The backup runs with `bitmap-mode: never`, not QEMU's `on-success`: `on-success`
//!   clears the bitmap when QEMU's copy ends, before the edge has sent anything, so a
//!   pass that failed afterwards (link lost, agent killed) would lose those changes. Here
//!   the old bitmap stays until the cloud has recorded the pass, and the new one (made
//!   at the backup's start) records everything since; the edge then drops the old one.
//!   A failed pass drops the new one instead, and the next pass starts from the old one
//!   again.
//!
//! A bitmap that is missing (QEMU restarted without it: only qcow2 images keep one
//! across a restart; another QEMU), marked inconsistent (QEMU did not save it: a crash),
//! of another granularity, or on a disk of another size leads to a full backup and a full
//! compare against the replica, with the reason in the pass's report; never to a skip.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gateway::qemu::Qmp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::migrate::PassSource;
use crate::source::{open_source_disk, BackupImage, DiskReader, SourceDisk, SourceVm};
use crate::MigrateError;

/// Every bitmap, block node and job this module makes starts with this.
const PREFIX: &str = "gateway-replica";

/// How one pass found what changed, for its report.
#[derive(Debug, Clone, Serialize)]
pub struct TrackingReport {
    /// `bitmap`: only the chunks QEMU's dirty bitmap marked were read; `full`: a full
    /// backup, every chunk read and compared.
    pub mode: &'static str,
    /// Why a pass that had a replica could not use the bitmap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Chunks the backup copied (an incremental pass), of `chunks`.
    pub changed_chunks: u64,
    pub chunks: u64,
}

impl TrackingReport {
    pub fn describe(&self) -> String {
        match (&self.fallback, self.mode) {
            (_, "bitmap") => format!(
                "QEMU dirty bitmap: {} of {} chunks changed, only those were read",
                self.changed_chunks, self.chunks
            ),
            (Some(why), _) => format!("full backup, every chunk read and compared: {why}"),
            (None, _) => "full backup of the running VM (the first pass)".into(),
        }
    }
}

/// What the edge keeps between passes, beside the replication's checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    /// The bitmap made at the start of the last successful pass.
    bitmap: String,
    granularity: u64,
    /// Each disk's capacity then, in the VM's order.
    capacities: Vec<u64>,
}

#[derive(Debug, Clone)]
struct Node {
    key: String,
    disk: SourceDisk,
    name: String,
    /// A qcow2 node keeps a persistent bitmap across QEMU restarts; others only while
    /// QEMU runs.
    persistent: bool,
    capacity: u64,
    /// The node's bitmaps, as `query-named-block-nodes` showed them.
    bitmaps: Vec<Value>,
}

/// The QEMU that runs a replicated VM.
#[derive(Debug)]
pub struct QemuSource {
    qmp: Qmp,
    socket: PathBuf,
    nodes: Vec<Node>,
    chunk_size: u64,
    state_path: PathBuf,
    work_dir: PathBuf,
    /// Whether [`QemuSource::stop`] stopped a running guest (then a failure resumes it).
    stopped_by_us: bool,
}

/// One pass's temporary state: the new bitmap and the backup images.
#[derive(Debug)]
pub struct Pass {
    bitmap: String,
    images: Vec<PathBuf>,
    pub report: TrackingReport,
}

fn hv(socket: &Path, what: impl std::fmt::Display) -> MigrateError {
    MigrateError::Target(format!("source QEMU ({}): {what}", socket.display()))
}

impl QemuSource {
    /// Connects to the QMP socket of the QEMU that runs `vm` and finds each of the .vmx's
    /// disks among its block nodes, by file name. `state` is the replication's checkpoint
    /// file: the tracking's own record and backup images are kept beside it.
    pub async fn connect(
        socket: &Path,
        vm: &SourceVm,
        chunk_size: u32,
        state: &Path,
    ) -> Result<QemuSource, MigrateError> {
        let chunk_size = u64::from(chunk_size);
        if !chunk_size.is_power_of_two() {
            return Err(hv(
                socket,
                format!(
                    "the chunk size ({} KiB) is not a power of two, which QEMU's dirty bitmaps need; \
                     choose --chunk-kib 64, 128, 256, ... (the same for every pass of the replication)",
                    chunk_size / 1024
                ),
            ));
        }
        let qmp = Qmp::connect(socket).await.map_err(|e| {
            hv(
                socket,
                format!("{e}; start the VM with a QMP socket (`edge-agent qemu`), or leave out --qmp"),
            )
        })?;
        let mut source = QemuSource {
            qmp,
            socket: socket.to_owned(),
            nodes: Vec::new(),
            chunk_size,
            state_path: state.with_extension("qemu.json"),
            work_dir: state.with_extension("qemu"),
            stopped_by_us: false,
        };
        match source.find_nodes(vm).await {
            Ok(nodes) => source.nodes = nodes,
            Err(e) => {
                source.close().await;
                return Err(e);
            }
        }
        Ok(source)
    }

    async fn exec(&self, command: &str, arguments: Value) -> Result<Value, MigrateError> {
        self.qmp
            .execute(command, arguments)
            .await
            .map_err(|e| hv(&self.socket, format!("{command}: {e}")))
    }

    async fn find_nodes(&self, vm: &SourceVm) -> Result<Vec<Node>, MigrateError> {
        let all = self.exec("query-named-block-nodes", json!({"flat": true})).await?;
        let all = all.as_array().cloned().unwrap_or_default();
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        let mut nodes = Vec::new();
        let mut problems = Vec::new();
        for d in &vm.disks {
            let want = canonical(&d.path);
            // The format node (qcow2, raw, vmdk) over the file: the one the guest writes
            // through and the one bitmaps belong on.
            let found = all.iter().find(|n| {
                n["drv"] != "file"
                    && !n["node-name"].as_str().unwrap_or(PREFIX).starts_with(PREFIX)
                    && n["file"].as_str().is_some_and(|f| canonical(Path::new(f)) == want)
            });
            let Some(n) = found else {
                problems.push(format!("no block node has disk {}'s file {}", d.key, d.path.display()));
                continue;
            };
            let capacity = n["image"]["virtual-size"].as_u64().unwrap_or(0);
            if capacity != d.capacity {
                problems.push(format!(
                    "disk {} is {capacity} bytes in QEMU but {} bytes in its file",
                    d.key, d.capacity
                ));
            }
            nodes.push(Node {
                key: d.key.clone(),
                disk: d.clone(),
                name: n["node-name"].as_str().unwrap_or_default().to_owned(),
                persistent: n["drv"] == "qcow2",
                capacity,
                bitmaps: n["dirty-bitmaps"].as_array().cloned().unwrap_or_default(),
            });
        }
        if problems.is_empty() {
            Ok(nodes)
        } else {
            Err(hv(
                &self.socket,
                format!(
                    "it does not run {} as its .vmx describes it: {}; give the QMP socket of the QEMU that runs this VM",
                    vm.vmx_path.display(),
                    problems.join("; ")
                ),
            ))
        }
    }

    fn load_state(&self) -> Option<State> {
        let text = std::fs::read(&self.state_path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Why the bitmap of the last pass cannot be trusted, if it cannot.
    fn untrusted(&self, state: Option<&State>) -> Option<String> {
        let Some(state) = state else {
            return Some(format!(
                "the edge has no record of a QEMU bitmap for this replication ({} is missing: an earlier pass ran without --qmp, or --state-dir changed)",
                self.state_path.display()
            ));
        };
        if state.granularity != self.chunk_size {
            return Some(format!(
                "the bitmap was made for {} KiB chunks, this pass uses {} KiB",
                state.granularity / 1024,
                self.chunk_size / 1024
            ));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if state.capacities.get(i) != Some(&node.capacity) {
                return Some(format!("disk {} was resized since the last pass", node.key));
            }
            let Some(b) = node.bitmaps.iter().find(|b| b["name"] == state.bitmap.as_str()) else {
                return Some(format!(
                    "disk {}'s dirty bitmap {} is missing in QEMU (QEMU was restarted without it{}, or another QEMU runs the VM)",
                    node.key,
                    state.bitmap,
                    if node.persistent { "" } else { ": only a qcow2 disk keeps one across a restart" }
                ));
            };
            if b["inconsistent"] == true {
                return Some(format!(
                    "disk {}'s dirty bitmap {} is marked inconsistent by QEMU (it was not saved, e.g. QEMU crashed)",
                    node.key, state.bitmap
                ));
            }
            if b["granularity"].as_u64() != Some(self.chunk_size) {
                return Some(format!(
                    "disk {}'s dirty bitmap {} has a granularity of {} bytes, not the chunk size {}",
                    node.key, state.bitmap, b["granularity"], self.chunk_size
                ));
            }
            if b["recording"] != true {
                return Some(format!(
                    "disk {}'s dirty bitmap {} does not record writes (it was disabled)",
                    node.key, state.bitmap
                ));
            }
        }
        None
    }

    /// Starts a pass: backs every disk up into a temporary image (incrementally when the
    /// last pass's bitmap can be trusted and `replica` says the cloud holds a replica)
    /// and returns the readers the pass uses and which chunks changed.
    pub async fn begin_pass(&mut self, replica: bool) -> Result<(Pass, PassSource), MigrateError> {
        let state = self.load_state();
        let fallback = if replica { self.untrusted(state.as_ref()) } else { None };
        let incremental = replica && fallback.is_none();
        let base = state.as_ref().map(|s| s.bitmap.clone()).filter(|_| incremental);
        // A backup job and its target node left by a killed pass.
        for node in &self.nodes {
            self.abandon_job(&target_node(&node.name)).await;
            let _ = self
                .qmp
                .execute("blockdev-del", json!({"node-name": target_node(&node.name)}))
                .await;
        }
        // Bitmaps of ours that are not the base: a failed or killed pass's, or one that
        // cannot be trusted. Each would only cost QEMU work at every write.
        for node in &self.nodes {
            for b in &node.bitmaps {
                let name = b["name"].as_str().unwrap_or_default();
                if name.starts_with(PREFIX) && Some(name) != base.as_deref() {
                    self.remove_bitmap(&node.name, name).await;
                }
            }
        }
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let bitmap = format!("{PREFIX}-{nanos}");
        std::fs::create_dir_all(&self.work_dir)
            .map_err(|e| hv(&self.socket, format!("cannot create {}: {e}", self.work_dir.display())))?;
        let mut pass = Pass {
            bitmap: bitmap.clone(),
            images: Vec::new(),
            report: TrackingReport {
                mode: if incremental { "bitmap" } else { "full" },
                fallback,
                changed_chunks: 0,
                chunks: 0,
            },
        };
        match self.backup(&mut pass, base.as_deref()).await {
            Ok(source) => Ok((pass, source)),
            Err(e) => {
                self.pass_failed(pass).await;
                Err(e)
            }
        }
    }

    async fn backup(&self, pass: &mut Pass, base: Option<&str>) -> Result<PassSource, MigrateError> {
        let mut actions = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let image = self.work_dir.join(format!("disk{i}.qcow2"));
            let _ = std::fs::remove_file(&image);
            // Default qcow2 (v3, 64 KiB clusters): zero clusters exist, and a cluster is
            // never larger than a chunk, so a copied chunk is whole in the image.
            let out = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&image)
                .arg(node.capacity.to_string())
                .output()
                .map_err(|e| hv(&self.socket, format!("cannot run qemu-img (from qemu-utils): {e}")))?;
            if !out.status.success() {
                return Err(hv(
                    &self.socket,
                    format!(
                        "qemu-img create {} failed: {}",
                        image.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                ));
            }
            pass.images.push(image.clone());
            // discard: ignore keeps zeroed chunks as zero clusters (mapped), never
            // unallocated: a chunk that became zero must look changed.
            self.exec(
                "blockdev-add",
                json!({
                    "driver": "qcow2",
                    "node-name": target_node(&node.name),
                    "discard": "ignore",
                    "detect-zeroes": "off",
                    "file": {"driver": "file", "filename": image.to_string_lossy()},
                }),
            )
            .await?;
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": node.name, "name": pass.bitmap, "granularity": self.chunk_size,
                "persistent": node.persistent,
            }}));
            let mut backup = json!({
                "job-id": target_node(&node.name),
                "device": node.name,
                "target": target_node(&node.name),
                "sync": "full",
                "auto-dismiss": false,
            });
            if let Some(base) = base {
                backup["sync"] = "bitmap".into();
                backup["bitmap"] = base.into();
                backup["bitmap-mode"] = "never".into();
            }
            actions.push(json!({"type": "blockdev-backup", "data": backup}));
        }
        self.exec("transaction", json!({ "actions": actions })).await?;
        for node in &self.nodes {
            self.wait_job(&target_node(&node.name)).await?;
        }
        let mut readers: Vec<Box<dyn DiskReader>> = Vec::new();
        let mut changed_all = Vec::new();
        for (node, image) in self.nodes.iter().zip(&pass.images) {
            self.exec("blockdev-del", json!({"node-name": target_node(&node.name)}))
                .await?;
            let backup = BackupImage::open(image)?;
            let chunks = node.capacity.div_ceil(self.chunk_size);
            pass.report.chunks += chunks;
            if base.is_none() {
                readers.push(Box::new(backup));
                continue;
            }
            let mut changed = Vec::with_capacity(chunks as usize);
            for index in 0..chunks {
                let offset = index * self.chunk_size;
                let len = (node.capacity - offset).min(self.chunk_size);
                let written = backup.written(offset, len).map_err(|e| MigrateError::Read {
                    what: format!("the backup image {}", image.display()),
                    source: e,
                })?;
                changed.push(written);
            }
            pass.report.changed_chunks += changed.iter().filter(|&&c| c).count() as u64;
            readers.push(Box::new(Tracked {
                backup,
                changed: changed.clone(),
                live: open_source_disk(&node.disk).ok(),
                chunk_size: self.chunk_size,
                key: node.key.clone(),
            }));
            changed_all.push(changed);
        }
        Ok(PassSource {
            readers,
            changed: base.map(|_| changed_all),
            commit_sent: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Waits for a backup job to end, then dismisses it.
    async fn wait_job(&self, id: &str) -> Result<(), MigrateError> {
        loop {
            let jobs = self.exec("query-jobs", Value::Null).await?;
            let job = jobs
                .as_array()
                .and_then(|jobs| jobs.iter().find(|j| j["id"] == id).cloned());
            match job {
                Some(job) if job["status"] == "concluded" => {
                    let _ = self.qmp.execute("job-dismiss", json!({"id": id})).await;
                    if let Some(error) = job["error"].as_str() {
                        return Err(hv(&self.socket, format!("the backup job {id} failed: {error}")));
                    }
                    return Ok(());
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                None => return Err(hv(&self.socket, format!("the backup job {id} disappeared"))),
            }
        }
    }

    /// Cancels a backup job that may still run (another disk's failed) and dismisses
    /// it, so that its target node can go.
    async fn abandon_job(&self, id: &str) {
        if self.qmp.execute("job-cancel", json!({"id": id})).await.is_err() {
            // No such job (it never started, or is dismissed already); a concluded one
            // refuses to be cancelled but can still be dismissed.
            let _ = self.qmp.execute("job-dismiss", json!({"id": id})).await;
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.wait_job(id)).await;
    }

    async fn remove_bitmap(&self, node: &str, name: &str) {
        if let Err(e) = self
            .qmp
            .execute("block-dirty-bitmap-remove", json!({"node": node, "name": name}))
            .await
        {
            tracing::warn!(node, bitmap = name, error = %e, "cannot remove a dirty bitmap of an earlier pass");
        }
    }

    /// The cloud recorded the pass: its bitmap becomes the base of the next one.
    pub async fn pass_succeeded(&mut self, pass: Pass) -> Result<(), MigrateError> {
        let state = State {
            bitmap: pass.bitmap.clone(),
            granularity: self.chunk_size,
            capacities: self.nodes.iter().map(|n| n.capacity).collect(),
        };
        // Recorded before the old bitmap goes: killed in between, the next pass finds the
        // old one as a leftover, never a record without its bitmap.
        let written = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = self.state_path.with_extension("json.tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &self.state_path)
            });
        self.remove_images(&pass);
        written.map_err(|e| {
            hv(
                &self.socket,
                format!(
                    "cannot record the dirty bitmap in {}: {e}; the next pass makes a full backup",
                    self.state_path.display()
                ),
            )
        })?;
        for node in &self.nodes {
            for b in &node.bitmaps {
                let name = b["name"].as_str().unwrap_or_default();
                if name.starts_with(PREFIX) && name != pass.bitmap {
                    self.remove_bitmap(&node.name, name).await;
                }
            }
        }
        Ok(())
    }

    /// The pass failed: its bitmap goes, the last successful pass's stays (with every
    /// write since), so the next pass loses nothing.
    pub async fn pass_failed(&mut self, pass: Pass) {
        for node in &self.nodes {
            self.abandon_job(&target_node(&node.name)).await;
            let _ = self
                .qmp
                .execute("blockdev-del", json!({"node-name": target_node(&node.name)}))
                .await;
            let _ = self
                .qmp
                .execute(
                    "block-dirty-bitmap-remove",
                    json!({"node": node.name, "name": pass.bitmap}),
                )
                .await;
        }
        self.remove_images(&pass);
    }

    /// Removes the pass's backup images (a switchover's, once the cloud registered the VM).
    pub fn discard(&self, pass: &Pass) {
        self.remove_images(pass);
    }

    fn remove_images(&self, pass: &Pass) {
        for image in &pass.images {
            let _ = std::fs::remove_file(image);
        }
        let _ = std::fs::remove_dir(&self.work_dir);
    }

    /// Stops the guest (`stop`) for a switchover. Returns when it was stopped, if this
    /// call stopped it (`None`: it was not running, e.g. paused or shut down already).
    pub async fn stop(&mut self) -> Result<Option<SystemTime>, MigrateError> {
        let status = self.exec("query-status", Value::Null).await?;
        if status["running"] != true {
            return Ok(None);
        }
        self.exec("stop", Value::Null).await?;
        self.stopped_by_us = true;
        Ok(Some(SystemTime::now()))
    }

    /// Undoes [`QemuSource::stop`] after a failed switchover. Returns what happened, for
    /// the operator.
    pub async fn resume(&mut self) -> String {
        if !self.stopped_by_us {
            return "the source VM was not running when the switchover started and was left as it was".into();
        }
        match self.qmp.execute("cont", Value::Null).await {
            Ok(_) => {
                self.stopped_by_us = false;
                "the source VM was resumed (QMP cont) and runs on".into()
            }
            Err(e) => format!("the source VM could NOT be resumed ({e}): it is paused; resume it with QMP `cont`"),
        }
    }

    /// After the cloud registered the VM: drops this replication's bitmaps and record, and
    /// quits the source QEMU. Its disks stay as they were at the stop.
    pub async fn finish_switchover(&mut self) -> Result<(), MigrateError> {
        for node in &self.nodes {
            let fresh = self.exec("query-named-block-nodes", json!({"flat": true})).await?;
            let bitmaps: Vec<String> = fresh
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| n["node-name"] == node.name.as_str())
                .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
                .filter_map(|b| b["name"].as_str().map(str::to_owned))
                .filter(|name| name.starts_with(PREFIX))
                .collect();
            for name in bitmaps {
                self.remove_bitmap(&node.name, &name).await;
            }
        }
        let _ = std::fs::remove_file(&self.state_path);
        self.exec("quit", Value::Null).await?;
        let _ = tokio::time::timeout(Duration::from_secs(30), self.qmp.closed()).await;
        Ok(())
    }

    /// Ends the QMP connection (QEMU serves one client at a time).
    pub async fn close(&self) {
        self.qmp.close().await;
    }
}

fn target_node(node: &str) -> String {
    format!("{PREFIX}-backup-{node}")
}

/// A disk read from its incremental backup where it changed, from the VM's own file
/// elsewhere. The pass reads only changed chunks; an unchanged one is read only when the
/// cloud asks for it again (a repair of its replica): exact once the guest is stopped (a
/// switchover), and while it runs the next pass finds any write since in its bitmap.
#[derive(Debug)]
struct Tracked {
    backup: BackupImage,
    changed: Vec<bool>,
    /// The VM's own file; `None` if it could not be opened (then such a read fails).
    live: Option<Box<dyn DiskReader>>,
    chunk_size: u64,
    key: String,
}

impl DiskReader for Tracked {
    fn capacity(&self) -> u64 {
        self.backup.capacity()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let index = (at / self.chunk_size) as usize;
            let end = (((index as u64 + 1) * self.chunk_size - at) as usize).min(buf.len() - pos);
            let part = &mut buf[pos..pos + end];
            if self.changed.get(index).copied().unwrap_or(true) {
                self.backup.read_at(at, part)?;
            } else {
                match &self.live {
                    Some(live) => live.read_at(at, part)?,
                    None => {
                        return Err(std::io::Error::other(format!(
                            "disk {}'s chunk at offset {at} is unchanged and not in the backup",
                            self.key
                        )))
                    }
                }
            }
            pos += end;
        }
        Ok(())
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let index = (offset / self.chunk_size) as usize;
        self.changed.get(index).copied().unwrap_or(true) && self.backup.is_hole(offset, len)
    }
}
