//! Live migration of a running QEMU VM into the cloud domain.
//!
//! The source keeps running until the cloud confirms the destination runs:
//! ```text
//! 1. check the source over QMP: running, the .vmx's disks on nodes drive0.., its memory
//! 2. forecast: link (a short link test, or --link-rate/--link-rtt) and the guest's
//!    dirty rate (QMP calc-dirty-rate): refuse if pre-copy cannot converge
//! 3. live plan -> cloud; the cloud starts the destination paused with -incoming and
//!    exports its new disks over NBD -> Ready
//! 4. storage: blockdev-mirror of every disk into the cloud's exports, through tunnel
//!    streams, until source and destination are in sync (BLOCK_JOB_READY); the mirror
//!    then keeps every guest write in sync
//! 5. memory: QEMU's pre-copy migration through a tunnel stream; QEMU pauses the source
//!    for the last pass when the rest fits the downtime limit
//! 6. the mirrors complete (the source is paused: nothing more to copy), Switchover ->
//!    the cloud runs the destination and registers it -> Committed; the source is quit
//! ```
//! Any failure before step 6 cancels the mirror and the migration and leaves the source
//! running (QEMU resumes it itself if the last pass failed). If the link breaks after
//! `Switchover` was sent, the outcome is unknown to the edge: the source stays paused so
//! that the VM never runs twice, and the error says how to decide.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::qemu::vm::{disk_node, machine_for_vm, MachineFiles};
use gateway::qemu::{DirectKernel, MachineSpec, Qmp};
use gateway::transport::{ControlReader, ControlWriter};
use gateway::transport::{PathEstimate, TransportError};
use gateway::tunnel::{splice, TunnelStats};
use gateway::wire::control::encode;
use gateway::wire::live::{
    BootFile, DirectBoot, LiveCloudMessage, LiveEdgeMessage, LivePlan, TunnelHeader, TunnelKind, BOOT_PIECE,
    MAX_TUNNEL_LANES,
};
use gateway::wire::{Preamble, StreamKind};
use serde::Serialize;
use serde_json::{json, Value};

use crate::migrate::{build_plan, MigrateOptions};
use crate::source::{DiskFormat as SourceFormat, SourceVm};
use crate::target::Target;
use crate::MigrateError;

/// How to migrate live, beyond what and where.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The source QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The source's direct kernel boot, if it boots that way.
    pub kernel: Option<DirectKernel>,
    /// The pause the switchover may cost (QEMU's downtime-limit).
    pub downtime: Duration,
    /// Pre-copy passes before the migration is given up (unless it converges).
    pub max_passes: u64,
    /// Let QEMU slow the guest's vCPUs when its memory changes faster than the link.
    pub auto_converge: bool,
    /// The path, if known; else a short link test measures it.
    pub link: Option<PathEstimate>,
    /// Only print the forecast.
    pub forecast_only: bool,
    /// zstd level of the tunnels (negative levels are faster).
    pub zstd_level: i32,
    /// Streams each tunnel is striped over; `None` sizes it from the path (see
    /// [`tunnel_lanes`]). 1 is one stream per tunnel, as before protocol version 10.
    pub tunnel_streams: Option<u16>,
    /// Name, network mapping, disk format, placement and transport, as for a cold lift.
    pub lift: MigrateOptions,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            qmp: PathBuf::new(),
            kernel: None,
            downtime: Duration::from_millis(300),
            max_passes: 30,
            auto_converge: false,
            link: None,
            forecast_only: false,
            zstd_level: 1,
            tunnel_streams: None,
            lift: MigrateOptions::default(),
        }
    }
}

/// Whether pre-copy converges, and how long it takes, from the measured figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Forecast {
    pub memory_bytes: u64,
    /// Bytes the guest dirties per second (QEMU's calc-dirty-rate).
    pub dirty_bytes_per_s: f64,
    /// Bytes per second the link carries edge to cloud.
    pub link_bytes_per_s: f64,
    pub rtt_ms: f64,
    /// Allocated bytes of the disks the mirror copies first.
    pub disk_bytes: u64,
    pub downtime_limit_ms: u64,
    pub converges: bool,
    /// Memory passes until the rest fits the downtime limit.
    pub passes: u64,
    pub storage_secs: f64,
    pub memory_secs: f64,
    pub total_secs: f64,
    /// The last pass's pause: what is left over the link rate, plus one round trip.
    pub expected_downtime_ms: f64,
    pub verdict: String,
}

/// The pre-copy model QEMU follows: pass 0 sends all memory; each next pass sends what
/// the guest dirtied during the previous one; the last pass (guest paused) starts when
/// what is left can be sent within the downtime limit. Compression is not counted: the
/// forecast errs on the slow side.
pub fn forecast(
    memory_bytes: u64,
    dirty_bytes_per_s: f64,
    link_bytes_per_s: f64,
    rtt: Duration,
    disk_bytes: u64,
    downtime: Duration,
    max_passes: u64,
) -> Forecast {
    let rate = link_bytes_per_s.max(1.0);
    let budget = rate * downtime.as_secs_f64();
    let mut left = memory_bytes as f64;
    let mut memory_secs = 0.0;
    let mut passes = 0;
    let mut converges = false;
    while passes < max_passes {
        if left <= budget {
            converges = true;
            break;
        }
        let secs = left / rate;
        memory_secs += secs;
        passes += 1;
        let next = (dirty_bytes_per_s * secs).min(memory_bytes as f64);
        if next >= left && passes > 1 {
            break;
        }
        left = next;
    }
    let storage_secs = disk_bytes as f64 / rate;
    let expected_downtime_ms = left / rate * 1000.0 + rtt.as_secs_f64() * 1000.0;
    let verdict = if converges {
        format!(
            "pre-copy converges in {passes} pass(es): about {:.1} s for the disks, {:.1} s for memory, {:.0} ms pause",
            storage_secs, memory_secs, expected_downtime_ms
        )
    } else {
        format!(
            "pre-copy does not converge: the guest dirties {:.1} MB/s and the link carries {:.1} MB/s; \
             pass --auto-converge to let QEMU slow the guest, raise --downtime-ms, or migrate when the guest is quieter",
            dirty_bytes_per_s / 1e6,
            rate / 1e6
        )
    };
    Forecast {
        memory_bytes,
        dirty_bytes_per_s,
        link_bytes_per_s: rate,
        rtt_ms: rtt.as_secs_f64() * 1000.0,
        disk_bytes,
        downtime_limit_ms: downtime.as_millis() as u64,
        converges,
        passes,
        storage_secs,
        memory_secs,
        total_secs: storage_secs + memory_secs,
        expected_downtime_ms,
        verdict,
    }
}

/// What the agent reports while a live migration runs.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LiveProgress {
    Forecast(Forecast),
    Ready {
        migration_id: String,
    },
    /// The storage mirror: bytes copied of the disks' total.
    Storage {
        done: u64,
        total: u64,
        ready: bool,
    },
    /// A memory pass: QEMU's figures.
    Memory {
        pass: u64,
        transferred: u64,
        remaining: u64,
        mbps: f64,
        expected_downtime_ms: u64,
        dirty_pages_rate: u64,
    },
    Switchover,
}

/// The end of a live migration that succeeded.
#[derive(Debug, Clone, Serialize)]
pub struct LiveSummary {
    pub migration_id: String,
    pub vm_id: String,
    pub vm_name: String,
    pub forecast: Forecast,
    /// From the Ready to the Committed.
    pub total_secs: f64,
    /// QEMU's figures for the memory migration.
    pub memory_secs: f64,
    pub downtime_ms: u64,
    pub passes: u64,
    pub ram_transferred: u64,
    /// Bytes the storage mirror copied.
    pub mirror_bytes: u64,
    /// Tunnel bytes: plaintext from the source's hypervisor, and what went on the stream.
    pub tunnel_plain_bytes: u64,
    pub tunnel_wire_bytes: u64,
}

/// One line for a person watching.
pub fn describe(p: &LiveProgress) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    match p {
        LiveProgress::Forecast(f) => format!(
            "forecast: {:.0} MB of memory, guest dirties {:.1} MB/s, link {:.1} MB/s at {:.0} ms RTT, {:.0} MB of disk: {}",
            mb(f.memory_bytes),
            f.dirty_bytes_per_s / 1e6,
            f.link_bytes_per_s / 1e6,
            f.rtt_ms,
            mb(f.disk_bytes),
            f.verdict
        ),
        LiveProgress::Ready { migration_id } => {
            format!("{migration_id}: the destination waits in the cloud; mirroring the disks")
        }
        LiveProgress::Storage { done, total, ready } => {
            if *ready {
                "storage in sync; the mirror keeps every write in sync from now on; copying memory".to_owned()
            } else {
                format!("storage: {:.0} of {:.0} MB", mb(*done), mb(*total))
            }
        }
        LiveProgress::Memory {
            pass,
            transferred,
            remaining,
            mbps,
            expected_downtime_ms,
            ..
        } => format!(
            "memory pass {pass}: {:.0} MB sent, {:.1} MB dirty left, {mbps:.0} Mbit/s, expected pause {expected_downtime_ms} ms",
            mb(*transferred),
            mb(*remaining)
        ),
        LiveProgress::Switchover => "switchover: the source is paused and in sync; starting the VM in the cloud".to_owned(),
    }
}

/// The summary for a person.
pub fn summary_text(s: &LiveSummary) -> String {
    format!(
        "{} runs in the cloud as {} ({}); the source has stopped.\n         total {:.1} s (memory {:.1} s in {} passes), pause {} ms, memory {:.1} MB, disks mirrored {:.1} MB, \
         tunnel {:.1} MB of data in {:.1} MB on the stream",
        s.vm_name,
        s.vm_id,
        s.migration_id,
        s.total_secs,
        s.memory_secs,
        s.passes,
        s.downtime_ms,
        s.ram_transferred as f64 / 1e6,
        s.mirror_bytes as f64 / 1e6,
        s.tunnel_plain_bytes as f64 / 1e6,
        s.tunnel_wire_bytes as f64 / 1e6,
    )
}

fn hv(what: impl std::fmt::Display) -> MigrateError {
    MigrateError::Target(format!("source hypervisor: {what}"))
}

fn qmp_err(context: &str) -> impl Fn(gateway::qemu::QemuError) -> MigrateError + '_ {
    move |e| hv(format!("{context}: {e}"))
}

/// The QEMU machine of a source VM, for `edge-agent qemu-command`: the command line the
/// on-prem QEMU must run so that a live migration's destination matches it device for
/// device.
pub fn source_machine(
    vm: &SourceVm,
    kernel: Option<DirectKernel>,
    serial_log: &Path,
    qmp: &Path,
) -> Result<MachineSpec, MigrateError> {
    let plan = build_plan(vm, &MigrateOptions::default());
    let mut disks = Vec::new();
    for d in &vm.disks {
        let format = match d.format {
            SourceFormat::Raw => gateway::qemu::DiskFormat::Raw,
            SourceFormat::Qcow2 => gateway::qemu::DiskFormat::Qcow2,
            SourceFormat::VmdkFlat | SourceFormat::VmdkSparse => gateway::qemu::DiskFormat::Vmdk,
            other => {
                return Err(hv(format!(
                    "disk {} is {other:?}, which a running QEMU cannot use; convert it (qemu-img convert) first",
                    d.key
                )))
            }
        };
        if d.archive_member.is_some() {
            return Err(hv(format!(
                "disk {} is inside an archive; a running VM needs its disks as files",
                d.key
            )));
        }
        disks.push((d.path.clone(), format));
    }
    Ok(machine_for_vm(
        &plan.vm,
        MachineFiles {
            disks,
            kernel,
            serial_log: serial_log.to_owned(),
            qmp_socket: qmp.to_owned(),
        },
    ))
}

/// Checks that the QEMU behind `qmp` runs the VM the plan describes: running, the
/// memory, and each disk on its node. Every mismatch is listed.
async fn check_source(qmp: &Qmp, plan: &LivePlan) -> Result<(), MigrateError> {
    let status = qmp
        .execute("query-status", Value::Null)
        .await
        .map_err(qmp_err("query-status"))?;
    let mut problems = Vec::new();
    if status["status"] != "running" {
        problems.push(format!(
            "the VM is {} (not running); start it, or use `edge-agent migrate` for a powered-off VM",
            status["status"]
        ));
    }
    let mem = qmp
        .execute("query-memory-size-summary", Value::Null)
        .await
        .map_err(qmp_err("query-memory-size-summary"))?;
    let want = plan.plan.vm.memory_mib << 20;
    if mem["base-memory"].as_u64() != Some(want) {
        problems.push(format!(
            "it has {} bytes of memory, the .vmx says {} MiB",
            mem["base-memory"], plan.plan.vm.memory_mib
        ));
    }
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(qmp_err("query-named-block-nodes"))?;
    for (i, d) in plan.plan.vm.disks.iter().enumerate() {
        let node = disk_node(i);
        let found = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["node-name"] == node.as_str());
        match found {
            None => problems.push(format!(
                "disk {} should be block node {node}, which the VM does not have",
                d.key
            )),
            Some(n) if n["image"]["virtual-size"].as_u64() != Some(d.capacity) => problems.push(format!(
                "disk {} is {} bytes in the VM but {} bytes in the .vmx",
                d.key, n["image"]["virtual-size"], d.capacity
            )),
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(hv(format!(
            "the running VM is not the one the .vmx describes: {}; start it with the command `edge-agent qemu-command` prints",
            problems.join("; ")
        )))
    }
}

/// The guest's dirty rate over one second, in bytes per second.
async fn dirty_rate(qmp: &Qmp) -> Result<f64, MigrateError> {
    qmp.execute("calc-dirty-rate", json!({"calc-time": 1}))
        .await
        .map_err(qmp_err("calc-dirty-rate"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = qmp
            .execute("query-dirty-rate", Value::Null)
            .await
            .map_err(qmp_err("query-dirty-rate"))?;
        if r["status"] == "measured" {
            return Ok(r["dirty-rate"].as_f64().unwrap_or(0.0) * 1024.0 * 1024.0);
        }
        if Instant::now() > deadline {
            return Err(hv("the dirty rate was not measured within 10 s"));
        }
    }
}

/// Allocated bytes of the source disks (what the mirror copies first).
fn allocated_bytes(vm: &SourceVm) -> u64 {
    use std::os::unix::fs::MetadataExt;
    vm.disks
        .iter()
        .map(|d| {
            std::fs::metadata(&d.path)
                .map(|m| (m.blocks() * 512).min(d.capacity))
                .unwrap_or(d.capacity)
        })
        .sum()
}

fn boot_of(kernel: &Option<DirectKernel>) -> Result<(Option<DirectBoot>, Vec<Vec<u8>>), MigrateError> {
    let Some(k) = kernel else {
        return Ok((None, Vec::new()));
    };
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| MigrateError::Read {
            what: p.display().to_string(),
            source,
        })
    };
    let kernel_bytes = read(&k.kernel)?;
    let initrd_bytes = k.initrd.as_deref().map(read).transpose()?;
    let file = |b: &[u8]| BootFile {
        len: b.len() as u64,
        sha256: gateway::chunk::sha256(b),
    };
    let boot = DirectBoot {
        kernel: file(&kernel_bytes),
        initrd: initrd_bytes.as_deref().map(file),
        append: k.append.clone().unwrap_or_default(),
    };
    let mut files = vec![kernel_bytes];
    files.extend(initrd_bytes);
    Ok((Some(boot), files))
}

/// What to undo on the source if the migration stops before the switchover.
#[derive(Default)]
struct SourceState {
    mirrors: Vec<String>,
    targets: Vec<String>,
    migrating: bool,
}

async fn roll_back(qmp: &Qmp, state: &SourceState) {
    if state.migrating {
        let _ = qmp.execute("migrate_cancel", Value::Null).await;
    }
    for job in &state.mirrors {
        let _ = qmp
            .execute("block-job-cancel", json!({"device": job, "force": true}))
            .await;
    }
    // The jobs let go of their targets once cancelled.
    for _ in 0..50 {
        let jobs = qmp
            .execute("query-block-jobs", Value::Null)
            .await
            .unwrap_or(Value::Null);
        if jobs.as_array().is_none_or(|j| j.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in &state.targets {
        let _ = qmp.execute("blockdev-del", json!({"node-name": node})).await;
    }
    // A migration that failed in its last pass resumes the source itself; one
    // cancelled at that moment may leave it paused.
    if let Ok(s) = qmp.execute("query-status", Value::Null).await {
        if s["status"] == "paused" || s["status"] == "postmigrate" {
            let _ = qmp.execute("cont", Value::Null).await;
        }
    }
}

/// Live-migrates the running VM `vm` (its .vmx) whose QEMU listens on `opts.qmp`.
pub async fn run(
    vm: &SourceVm,
    target: &Target,
    opts: &LiveOptions,
    progress: &(dyn Fn(LiveProgress) + Send + Sync),
) -> Result<LiveSummary, MigrateError> {
    // Every line of the migration carries its id, recorded once the cloud gave one.
    let span = tracing::info_span!("live_migration", vm = ?vm.name, migration_id = tracing::field::Empty);
    tracing::Instrument::instrument(run_in(vm, target, opts, progress), span).await
}

async fn run_in(
    vm: &SourceVm,
    target: &Target,
    opts: &LiveOptions,
    progress: &(dyn Fn(LiveProgress) + Send + Sync),
) -> Result<LiveSummary, MigrateError> {
    let plan = build_plan(vm, &opts.lift);
    let (boot, boot_files) = boot_of(&opts.kernel)?;
    let live_plan = LivePlan {
        plan,
        boot,
        downtime_limit_ms: opts.downtime.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
        // Sized from the path once it is known (`migrate_connected`).
        tunnel_lanes: opts.tunnel_streams.unwrap_or(1).clamp(1, MAX_TUNNEL_LANES),
    };
    live_plan
        .check_limits()
        .map_err(|e| MigrateError::Target(format!("{e}")))?;
    let qmp = Qmp::connect(&opts.qmp).await.map_err(|e| {
        hv(format!(
            "cannot reach QMP at {}: {e}; start the VM with the command `edge-agent qemu-command` prints \
             (QEMU's monitor serves one client at a time: close any other QMP client of it)",
            opts.qmp.display()
        ))
    })?;
    let result = migrate_connected(vm, target, opts, progress, &qmp, live_plan, boot_files).await;
    // QEMU's monitor serves one client at a time: let go of it for whoever is next.
    qmp.close().await;
    result
}

async fn migrate_connected(
    vm: &SourceVm,
    target: &Target,
    opts: &LiveOptions,
    progress: &(dyn Fn(LiveProgress) + Send + Sync),
    qmp: &Qmp,
    mut live_plan: LivePlan,
    boot_files: Vec<Vec<u8>>,
) -> Result<LiveSummary, MigrateError> {
    let qmp = qmp.clone();
    check_source(&qmp, &live_plan).await?;

    // The forecast, before anything is created in the cloud.
    let link = match opts.link {
        Some(path) => path,
        None => {
            let report = crate::linktest::run(
                target,
                &crate::linktest::LinkTestOptions {
                    seconds: 2,
                    agent: opts.lift.agent.clone(),
                    tuning: opts.lift.tuning.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| MigrateError::Target(format!("measuring the link for the forecast: {e}")))?;
            PathEstimate {
                rate_bps: (report.upload.mbit_s * 1e6) as u64,
                rtt: Duration::from_secs_f64(report.rtt.mean_ms / 1000.0),
            }
        }
    };
    let dirty = dirty_rate(&qmp).await?;
    let fc = forecast(
        live_plan.plan.vm.memory_mib << 20,
        dirty,
        link.rate_bps as f64 / 8.0,
        link.rtt,
        allocated_bytes(vm),
        opts.downtime,
        opts.max_passes,
    );
    progress(LiveProgress::Forecast(fc.clone()));
    if opts.forecast_only {
        return Err(MigrateError::Target(format!("forecast only: {}", fc.verdict)));
    }
    if !fc.converges && !opts.auto_converge {
        return Err(MigrateError::Target(fc.verdict.clone()));
    }

    let (_endpoint, conn) = target.connect(&opts.lift.tuning).await?;
    live_plan.tunnel_lanes = opts
        .tunnel_streams
        .unwrap_or_else(|| tunnel_lanes(&opts.lift.tuning, link, conn.rtt()));
    tracing::info!(lanes = live_plan.tunnel_lanes, "streams per tunnel");
    let (send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
    let mut send = send;
    send.write_all(&Preamble::new(StreamKind::Live).encode())
        .await
        .map_err(|e| MigrateError::Target(format!("the cloud endpoint closed the live stream: {e}")))?;
    let mut writer = ControlWriter::open(send, false).await?;
    let mut reader = ControlReader::open(recv, false).await?;
    let next = |m: Option<LiveCloudMessage>| match m {
        Some(LiveCloudMessage::Refused { code, problems }) => Err(MigrateError::Refused { code, problems }),
        Some(other) => Ok(other),
        None => Err(MigrateError::Target(
            "the cloud endpoint ended the live migration without an answer".into(),
        )),
    };
    writer
        .send(&LiveEdgeMessage::Hello {
            agent: opts.lift.agent.clone(),
            user: target.user.clone(),
            password: target.password.clone(),
        })
        .await?;
    match next(reader.recv().await?)? {
        LiveCloudMessage::Welcome { .. } => {}
        other => return Err(MigrateError::Target(format!("unexpected answer to hello: {other:?}"))),
    }
    let sent = async {
        writer.send(&LiveEdgeMessage::Plan(Box::new(live_plan.clone()))).await?;
        for (file, bytes) in boot_files.iter().enumerate() {
            for (i, piece) in bytes.chunks(BOOT_PIECE).enumerate() {
                writer
                    .send(&LiveEdgeMessage::BootFile {
                        file: file as u8,
                        offset: (i * BOOT_PIECE) as u64,
                        bytes: piece.to_vec(),
                    })
                    .await?;
            }
        }
        Ok::<_, TransportError>(())
    }
    .await;
    if let Err(e) = sent {
        // The cloud refuses a plan while its boot files are still on their way, and
        // stops reading: its answer says why.
        return match reader.recv::<LiveCloudMessage>().await {
            Ok(Some(LiveCloudMessage::Refused { code, problems })) => Err(MigrateError::Refused { code, problems }),
            _ => Err(e.into()),
        };
    }
    let (migration_id, exports) = match next(reader.recv().await?)? {
        LiveCloudMessage::Ready { migration_id, exports } => (migration_id, exports),
        other => {
            return Err(MigrateError::Target(format!(
                "unexpected answer to the live plan: {other:?}"
            )))
        }
    };
    tracing::Span::current().record("migration_id", migration_id.as_str());
    progress(LiveProgress::Ready {
        migration_id: migration_id.clone(),
    });
    let started = Instant::now();

    // Local sockets the source's QEMU connects to; each connection becomes a tunnel.
    let sockets = tempfile::Builder::new()
        .prefix("edge-live-")
        .tempdir()
        .map_err(|source| MigrateError::Read {
            what: "a folder for the tunnel sockets".into(),
            source,
        })?;
    let nbd_path = sockets.path().join("nbd.sock");
    let mem_path = sockets.path().join("mem.sock");
    let stats = Arc::new(TunnelStats::default());
    let tunnels = Tunnels::listen(
        &conn,
        &migration_id,
        &nbd_path,
        &mem_path,
        opts.zstd_level,
        live_plan.tunnel_lanes,
        stats.clone(),
    )?;

    let mut state = SourceState::default();
    let outcome = drive_source(
        &qmp, &live_plan, &exports, &nbd_path, &mem_path, opts, &mut state, progress,
    )
    .await;
    let (memory, mirror_bytes) = match outcome {
        Ok(done) => done,
        Err(e) => {
            roll_back(&qmp, &state).await;
            let _ = writer.send(&LiveEdgeMessage::Abort { reason: e.to_string() }).await;
            writer.finish();
            tunnels.stop();
            // Let the cloud hear the abort before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), reader.recv::<LiveCloudMessage>()).await;
            return Err(e);
        }
    };

    // The source is paused and in sync: the cloud may run the destination.
    progress(LiveProgress::Switchover);
    writer
        .send(&LiveEdgeMessage::Switchover)
        .await
        .map_err(|e| unknown_outcome(&migration_id, e))?;
    let answer = reader.recv::<LiveCloudMessage>().await;
    tunnels.stop();
    match answer {
        Ok(Some(LiveCloudMessage::Committed { vm_id, .. })) => {
            // Only now does the source stop for good.
            let _ = qmp.execute("quit", Value::Null).await;
            let (plain, wire, _, _) = stats.snapshot();
            Ok(LiveSummary {
                migration_id,
                vm_id,
                vm_name: live_plan.plan.vm.name.clone(),
                forecast: fc,
                total_secs: started.elapsed().as_secs_f64(),
                memory_secs: memory["total-time"].as_f64().unwrap_or(0.0) / 1000.0,
                downtime_ms: memory["downtime"].as_u64().unwrap_or(0),
                passes: memory["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                ram_transferred: memory["ram"]["transferred"].as_u64().unwrap_or(0),
                mirror_bytes,
                tunnel_plain_bytes: plain,
                tunnel_wire_bytes: wire,
            })
        }
        Ok(Some(LiveCloudMessage::Refused { code, problems })) => {
            // The destination never ran: the source resumes.
            let _ = qmp.execute("cont", Value::Null).await;
            Err(MigrateError::Refused { code, problems })
        }
        Ok(other) => Err(unknown_outcome(&migration_id, format!("unexpected answer {other:?}"))),
        Err(e) => Err(unknown_outcome(&migration_id, e)),
    }
}

fn unknown_outcome(migration_id: &str, e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Target(format!(
        "the link to the cloud broke during the switchover of {migration_id} ({e}): the source VM is left paused so it \
         never runs twice. Check task {migration_id} in the cloud (GET /api/cis/tasks/{migration_id}): if it SUCCEEDED, \
         quit the source; if it FAILED, resume the source (QMP `cont`)"
    ))
}

/// Mirrors the disks, then migrates memory; returns QEMU's final query-migrate and the
/// mirrored bytes. Leaves the source paused with its disks in sync.
#[allow(clippy::too_many_arguments)]
async fn drive_source(
    qmp: &Qmp,
    plan: &LivePlan,
    exports: &[String],
    nbd: &Path,
    mem: &Path,
    opts: &LiveOptions,
    state: &mut SourceState,
    progress: &(dyn Fn(LiveProgress) + Send + Sync),
) -> Result<(Value, u64), MigrateError> {
    if exports.len() != plan.plan.vm.disks.len() {
        return Err(MigrateError::Target(format!(
            "the cloud exported {} disks for {} planned",
            exports.len(),
            plan.plan.vm.disks.len()
        )));
    }
    let mut events = qmp.events();
    for (i, export) in exports.iter().enumerate() {
        let target = format!("mirror-target{i}");
        qmp.execute(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": target,
                   "server": {"type": "unix", "path": nbd.to_string_lossy()},
                   "export": export}),
        )
        .await
        .map_err(qmp_err("connecting the mirror to the cloud's disk"))?;
        state.targets.push(target.clone());
        let job = format!("mirror{i}");
        qmp.execute(
            "blockdev-mirror",
            json!({"job-id": job, "device": disk_node(i), "target": target, "sync": "full"}),
        )
        .await
        .map_err(qmp_err("starting the storage mirror"))?;
        state.mirrors.push(job);
    }
    // Storage first: wait until every mirror is in sync.
    let mut ready = std::collections::HashSet::new();
    let total: u64 = plan.plan.vm.disks.iter().map(|d| d.capacity).sum();
    while ready.len() < state.mirrors.len() {
        match tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
            Ok(Ok(ev)) if ev.name == "BLOCK_JOB_READY" => {
                if let Some(dev) = ev.data["device"].as_str() {
                    ready.insert(dev.to_owned());
                }
            }
            Ok(Ok(ev)) if ev.name == "BLOCK_JOB_COMPLETED" || ev.name == "BLOCK_JOB_ERROR" => {
                return Err(hv(format!(
                    "the storage mirror stopped: {}",
                    ev.data["error"]
                        .as_str()
                        .unwrap_or("the link to the cloud's disk failed")
                )));
            }
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                return Err(hv("QMP closed: the source VM stopped"));
            }
            _ => {
                let jobs = qmp
                    .execute("query-block-jobs", Value::Null)
                    .await
                    .map_err(qmp_err("query-block-jobs"))?;
                let jobs = jobs.as_array().cloned().unwrap_or_default();
                if jobs.len() < state.mirrors.len() {
                    return Err(hv(
                        "a storage mirror ended before it was in sync: the link to the cloud's disk failed",
                    ));
                }
                let done: u64 = jobs.iter().filter_map(|j| j["offset"].as_u64()).sum();
                for j in &jobs {
                    if j["ready"] == true {
                        if let Some(dev) = j["device"].as_str() {
                            ready.insert(dev.to_owned());
                        }
                    }
                }
                progress(LiveProgress::Storage {
                    done,
                    total,
                    ready: false,
                });
            }
        }
    }
    progress(LiveProgress::Storage {
        done: total,
        total,
        ready: true,
    });

    // Then memory. pause-before-switchover: when QEMU has paused the source for the last
    // pass it waits for us, so the mirrors complete while the source is stopped but its
    // disks are still active (libvirt's order); the wait is downtime, so react to the
    // event at once rather than on a poll.
    let mut caps = vec![
        json!({"capability": "events", "state": true}),
        json!({"capability": "pause-before-switchover", "state": true}),
    ];
    if opts.auto_converge {
        caps.push(json!({"capability": "auto-converge", "state": true}));
    }
    qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .await
        .map_err(qmp_err("migrate-set-capabilities"))?;
    // QEMU caps a migration at 128 MiB/s by default; the tunnel's flow control is the
    // real limit.
    qmp.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": opts.downtime.as_millis() as u64, "max-bandwidth": 10_000_000_000u64}),
    )
    .await
    .map_err(qmp_err("migrate-set-parameters"))?;
    qmp.execute("migrate", json!({"uri": format!("unix:{}", mem.display())}))
        .await
        .map_err(qmp_err("starting the memory migration"))?;
    state.migrating = true;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut mirrored = 0u64;
    loop {
        let status = tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) if ev.name == "MIGRATION" => ev.data["status"].as_str().unwrap_or("").to_owned(),
                Ok(ev) if ev.name == "BLOCK_JOB_ERROR" || (ev.name == "BLOCK_JOB_COMPLETED" && !state.mirrors.is_empty()) => {
                    return Err(hv(format!(
                        "the storage mirror stopped during the memory migration: {}",
                        ev.data["error"].as_str().unwrap_or("the link to the cloud's disk failed")
                    )));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err(hv("QMP closed: the source VM stopped")),
            },
            _ = tick.tick() => {
                let m = qmp.execute("query-migrate", Value::Null).await.map_err(qmp_err("query-migrate"))?;
                let ram = &m["ram"];
                let pass = ram["dirty-sync-count"].as_u64().unwrap_or(0);
                if m["status"] == "active" {
                    progress(LiveProgress::Memory {
                        pass,
                        transferred: ram["transferred"].as_u64().unwrap_or(0),
                        remaining: ram["remaining"].as_u64().unwrap_or(0),
                        mbps: ram["mbps"].as_f64().unwrap_or(0.0),
                        expected_downtime_ms: m["expected-downtime"].as_u64().unwrap_or(0),
                        dirty_pages_rate: ram["dirty-pages-rate"].as_u64().unwrap_or(0),
                    });
                }
                if pass > opts.max_passes && m["status"] == "active" {
                    return Err(hv(format!(
                        "pre-copy did not converge in {} passes (the guest dirties memory faster than the link \
                         carries it); the source runs on. Pass --auto-converge, raise --downtime-ms or --max-passes",
                        opts.max_passes
                    )));
                }
                m["status"].as_str().unwrap_or("").to_owned()
            }
        };
        match status.as_str() {
            "pre-switchover" if !state.mirrors.is_empty() => {
                // The source is paused: the mirrors have nothing left to copy.
                // Cancelling a READY mirror completes it, flushing what is in flight.
                if let Ok(jobs) = qmp.execute("query-block-jobs", Value::Null).await {
                    mirrored = jobs
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|j| j["offset"].as_u64())
                        .sum();
                }
                for job in std::mem::take(&mut state.mirrors) {
                    qmp.execute("block-job-cancel", json!({"device": job}))
                        .await
                        .map_err(qmp_err("completing the storage mirror"))?;
                    let done = qmp
                        .wait_for_event(&mut events, "BLOCK_JOB_COMPLETED", Duration::from_secs(60))
                        .await
                        .map_err(qmp_err("waiting for the storage mirror to complete"))?;
                    if let Some(e) = done.data["error"].as_str() {
                        return Err(hv(format!("the storage mirror failed at the switchover: {e}")));
                    }
                }
                qmp.execute("migrate-continue", json!({"state": "pre-switchover"}))
                    .await
                    .map_err(qmp_err("migrate-continue"))?;
            }
            "completed" => break,
            "failed" | "cancelled" => {
                let m = qmp.execute("query-migrate", Value::Null).await.unwrap_or(Value::Null);
                return Err(hv(format!(
                    "the memory migration {status}: {}",
                    m["error-desc"].as_str().unwrap_or("the link to the cloud failed")
                )));
            }
            _ => {}
        }
    }
    state.migrating = false;
    let last = qmp
        .execute("query-migrate", Value::Null)
        .await
        .map_err(qmp_err("query-migrate"))?;
    for node in std::mem::take(&mut state.targets) {
        let _ = qmp.execute("blockdev-del", json!({"node-name": node})).await;
    }
    Ok((last, mirrored))
}

/// Streams per tunnel for this connection: enough stream windows to cover what the
/// connection may have in flight, its send window (twice the bandwidth-delay product of
/// the path the transport is tuned for), or twice the BDP of the measured link at the
/// larger of its RTT and the handshake's, if that is more. Too many lanes cost a few
/// idle streams; too few cap the memory stream at lanes x window / RTT.
pub fn tunnel_lanes(tuning: &gateway::transport::TransportTuning, link: PathEstimate, conn_rtt: Duration) -> u16 {
    let measured = PathEstimate {
        rate_bps: link.rate_bps,
        rtt: link.rtt.max(conn_rtt),
    };
    let in_flight = tuning.send_window.max(2 * measured.bdp());
    gateway::tunnel::lanes_for(in_flight, MAX_TUNNEL_LANES)
}

/// The accept loops of the local sockets.
struct Tunnels {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Tunnels {
    fn listen(
        conn: &quinn::Connection,
        migration_id: &str,
        nbd: &Path,
        mem: &Path,
        level: i32,
        lanes: u16,
        stats: Arc<TunnelStats>,
    ) -> Result<Tunnels, MigrateError> {
        let mut tasks = Vec::new();
        // Tunnel numbers are unique within the migration, across both sockets.
        let numbers = Arc::new(std::sync::atomic::AtomicU32::new(0));
        for (path, kind) in [(nbd, TunnelKind::Nbd), (mem, TunnelKind::Memory)] {
            let listener = tokio::net::UnixListener::bind(path).map_err(|source| MigrateError::Read {
                what: format!("a tunnel socket at {}", path.display()),
                source,
            })?;
            let conn = conn.clone();
            let migration_id = migration_id.to_owned();
            let stats = stats.clone();
            let numbers = numbers.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((local, _)) = listener.accept().await {
                    let conn = conn.clone();
                    let stats = stats.clone();
                    let tunnel = numbers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let migration_id = migration_id.clone();
                    tokio::spawn(async move {
                        let mut streams = Vec::with_capacity(usize::from(lanes));
                        for lane in 0..lanes {
                            let header = encode(&TunnelHeader {
                                migration_id: migration_id.clone(),
                                kind,
                                tunnel,
                                lane,
                                lanes,
                            })
                            .expect("a tunnel header encodes");
                            let Ok((mut send, recv)) = conn.open_bi().await else {
                                return;
                            };
                            let mut head = Preamble::new(StreamKind::Tunnel).encode().to_vec();
                            head.extend_from_slice(&header);
                            if send.write_all(&head).await.is_err() {
                                return;
                            }
                            streams.push((send, recv));
                        }
                        if let Err(e) = splice(local, streams, level, stats).await {
                            tracing::warn!(?kind, error = %e, "tunnel ended");
                            if e.is_peer_violation() {
                                gateway::transport::close(
                                    &conn,
                                    gateway::wire::RefusalCode::ProtocolViolation,
                                    &e.to_string(),
                                );
                            }
                        }
                    });
                }
            }));
        }
        Ok(Tunnels { tasks })
    }

    fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_quiet_guest_converges_and_a_busy_one_does_not() {
        let link = 12.5e6; // 100 Mbit/s
        let quiet = forecast(
            512 * MIB,
            1e6,
            link,
            Duration::from_millis(150),
            0,
            Duration::from_millis(300),
            30,
        );
        assert!(quiet.converges, "{quiet:?}");
        assert!(quiet.passes >= 2 && quiet.passes < 6, "{quiet:?}");
        assert!(quiet.memory_secs > 40.0 && quiet.memory_secs < 50.0, "{quiet:?}");
        assert!(quiet.expected_downtime_ms <= 300.0 + 150.0, "{quiet:?}");
        let busy = forecast(
            512 * MIB,
            20e6,
            link,
            Duration::from_millis(150),
            0,
            Duration::from_millis(300),
            30,
        );
        assert!(!busy.converges, "{busy:?}");
        assert!(busy.verdict.contains("--auto-converge"), "{}", busy.verdict);
        // Disks come first and add their time.
        let disks = forecast(
            64 * MIB,
            0.0,
            link,
            Duration::from_millis(1),
            1_250_000_000,
            Duration::from_millis(300),
            30,
        );
        assert!((disks.storage_secs - 100.0).abs() < 0.1, "{disks:?}");
        assert!(disks.converges);
    }

    #[test]
    fn a_guest_that_dirties_as_fast_as_the_link_gives_up_within_the_passes() {
        let f = forecast(
            256 * MIB,
            12.5e6,
            12.5e6,
            Duration::from_millis(10),
            0,
            Duration::from_millis(300),
            30,
        );
        assert!(!f.converges);
        assert!(f.passes <= 30);
    }

    #[test]
    fn tunnels_get_streams_for_twice_the_path_in_flight() {
        use gateway::transport::TransportTuning;
        let long = PathEstimate {
            rate_bps: 1_000_000_000,
            rtt: Duration::from_millis(150),
        };
        let tuning = TransportTuning::for_known_path(long);
        // 2 x 18.75 MB over 1.25 MB windows.
        assert_eq!(tunnel_lanes(&tuning, long, Duration::from_millis(150)), 30);
        // A slow short link still fills the connection's send window (8 MB at least).
        let lan = PathEstimate {
            rate_bps: 100_000_000,
            rtt: Duration::from_millis(1),
        };
        assert_eq!(
            tunnel_lanes(&TransportTuning::for_known_path(lan), lan, Duration::from_millis(1)),
            7
        );
        // A measured RTT longer than the configured one asks for more, within the bound.
        let lanes = tunnel_lanes(&TransportTuning::for_known_path(lan), long, Duration::from_millis(600));
        assert_eq!(lanes, MAX_TUNNEL_LANES);
    }
}
