//! A live migration's connection: the destination hypervisor, the tunnels into it, and
//! the switchover (the protocol is [`gateway::protocol::live`]).
//!
//! The destination runs from the migration's staging folder, started paused and waiting
//! for the memory stream (`-incoming defer -S`) with its new disks exported over NBD on a
//! private unix socket; the edge's tunnels connect there. At the switchover it runs
//! (`cont`) only once it has all of the memory and the mirror has been finished, then the
//! staging folder becomes the VM's folder and the VM is registered POWERED_ON. Anything
//! else tears it down: QEMU is stopped and the staged files removed, and the edge lets
//! the source run on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gateway::protocol::live::{LiveEvent, LiveReceiver, LiveTimeouts};
use gateway::qemu::vm::{machine_for_vm, MachineFiles};
use gateway::qemu::{DirectKernel, QemuBinary, QemuProcess};
use gateway::transport::{ControlReader, ControlWriter};
use gateway::tunnel::{splice, TunnelStats};
use gateway::wire::live::{LiveEdgeMessage, LivePlan, TunnelHeader, TunnelKind, MAX_TUNNELS};

use super::tunnels::{Lane, Lanes};
use gateway::wire::{control, Preamble, RefusalCode, StreamKind, PREAMBLE_LEN};
use serde_json::{json, Value};
use tracing::Instrument;

use super::placement::{self, Staged};
use crate::datastore::{DiskFormat, ScratchSpace};
use crate::inventory::Principal;
use crate::Domain;

/// How long the destination may take to load the last of the memory after the edge
/// reports the source paused.
const SWITCHOVER_WAIT: Duration = Duration::from_secs(120);
/// How long QEMU gets to quit before it is killed when a migration is torn down.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// zstd level of what the endpoint sends back through tunnels (NBD replies: tiny).
const TUNNEL_LEVEL: i32 = 1;

/// The destination of a live migration while it is being built.
struct Destination {
    process: Arc<QemuProcess>,
    staged: Staged,
    /// Private folder of the NBD and memory sockets (unix socket paths are short).
    sockets: tempfile::TempDir,
    /// Set by the one memory tunnel a migration may have.
    memory_claimed: Arc<std::sync::atomic::AtomicBool>,
    /// Tunnel streams accepted so far (at most [`MAX_TUNNELS`] tunnels of `lanes` each).
    streams: u32,
    /// The lanes of tunnels whose streams have not all arrived yet.
    lanes: Arc<std::sync::Mutex<Lanes>>,
}

impl Destination {
    fn nbd_socket(&self) -> PathBuf {
        self.sockets.path().join("nbd.sock")
    }

    fn memory_socket(&self) -> PathBuf {
        self.sockets.path().join("mem.sock")
    }
}

/// Serves one live migration to its end. `control_streams` is its first stream, the
/// preamble already read by the dispatch; `connected` is when the handshake completed
/// (the deadlines count from it), `hello` the time the edge has to say Hello.
pub async fn serve(
    connected: std::time::Instant,
    conn: quinn::Connection,
    domain: Arc<Domain>,
    control_streams: (quinn::SendStream, quinn::RecvStream),
    slots: Arc<tokio::sync::Semaphore>,
    hello: Duration,
) {
    let peer = conn.remote_address();
    let edge_cert = super::probe::edge_thumbprint(&conn).unwrap_or_default();
    let span = tracing::info_span!("live", %peer, migration_id = tracing::field::Empty);
    async move {
        tracing::info!(edge_cert = ?edge_cert, "edge connected for a live migration");
        let (send, recv) = control_streams;
        let mut writer = match ControlWriter::open(send, false).await {
            Ok(w) => w,
            Err(_) => return,
        };
        // The reader runs on its own: a frame read must not be cut by the select below.
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let reader = tokio::spawn(async move {
            let Ok(mut reader) = ControlReader::open(recv, false).await else {
                return;
            };
            loop {
                let msg = reader.recv::<LiveEdgeMessage>().await;
                let end = !matches!(msg, Ok(Some(_)));
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        let mut run = Run {
            domain,
            conn: conn.clone(),
            edge: format!("{peer} cert {edge_cert}"),
            edge_cert,
            session: LiveReceiver::new(
                LiveTimeouts {
                    hello,
                    ..Default::default()
                },
                connected,
            ),
            principal: None,
            slot: None,
            slots,
            memory: None,
            boot: None,
            dest: None,
            stats: Arc::new(TunnelStats::default()),
        };
        let mut tunnels_allowed = false;
        let mut last_moved = run.stats.snapshot();
        loop {
            while let Some(msg) = run.session.poll_transmit() {
                if writer.send(&msg).await.is_err() {
                    break;
                }
            }
            while let Some(event) = run.session.poll_event() {
                run.handle(event).await;
                while let Some(msg) = run.session.poll_transmit() {
                    let _ = writer.send(&msg).await;
                }
            }
            if run.session.is_finished() && !run.session.is_done() {
                break;
            }
            let tunnels_open = run.session.tunnels_open();
            if tunnels_open && !tunnels_allowed {
                // Tunnel streams only once the destination waits for them: before, a
                // stream the peer may open is memory it can fill without being read.
                let (tunnels, lanes) = run.session.plan().map_or((1, 1), |p| {
                    // The memory stream and one mirror connection per disk, open together.
                    let tunnels = (p.plan.vm.disks.len() + 1).min(MAX_TUNNELS as usize) as u16;
                    (tunnels, p.tunnel_lanes)
                });
                gateway::transport::allow_streams(
                    &conn,
                    gateway::transport::StreamPhase::Tunnels { tunnels, lanes },
                );
                tunnels_allowed = true;
            }
            let deadline = run.session.poll_timeout();
            tokio::select! {
                _ = sleep_until(deadline) => {
                    let now = std::time::Instant::now();
                    let moved = run.stats.snapshot();
                    if moved != last_moved {
                        last_moved = moved;
                        run.session.progress(now);
                    }
                    run.session.handle_timeout(now);
                }
                msg = rx.recv() => match msg {
                    Some(Ok(Some(msg))) => {
                        if let Err(e) = run.session.handle(msg) {
                            run.session.refuse(RefusalCode::ProtocolViolation, vec![e.to_string()]);
                        }
                    }
                    Some(Ok(None)) | None => {
                        if run.session.is_done() {
                            break;
                        }
                        run.session.refuse(RefusalCode::Aborted, vec!["the edge closed the live migration's stream".into()]);
                    }
                    Some(Err(e)) => {
                        if run.session.is_done() {
                            break;
                        }
                        run.session.refuse(RefusalCode::Aborted, vec![format!("the link to the edge broke: {e}")]);
                    }
                },
                bi = conn.accept_bi(), if tunnels_open => match bi {
                    Ok((send, recv)) => run.tunnel(send, recv),
                    Err(e) => run.session.refuse(RefusalCode::Aborted, vec![format!("the link to the edge broke: {e}")]),
                },
            }
        }
        // Tell the edge why, then close.
        while let Some(msg) = run.session.poll_transmit() {
            let _ = writer.send(&msg).await;
        }
        writer.finish();
        reader.abort();
        if let Some(dest) = run.dest.take() {
            run.tear_down(dest, "the live migration ended before its switchover").await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        conn.close(RefusalCode::Aborted.close_code().into(), b"live migration ended");
    }
    .instrument(span)
    .await
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

struct Run {
    domain: Arc<Domain>,
    conn: quinn::Connection,
    edge: String,
    edge_cert: String,
    session: LiveReceiver,
    principal: Option<Principal>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    slots: Arc<tokio::sync::Semaphore>,
    /// The destination's memory on the host, held from the plan's acceptance until the
    /// VM is adopted or the migration ends.
    memory: Option<crate::hosts::MemoryReservation>,
    /// The boot files as they arrive, on disk (see [`BootFiles`]).
    boot: Option<BootFiles>,
    dest: Option<Destination>,
    stats: Arc<TunnelStats>,
}

impl Run {
    async fn handle(&mut self, event: LiveEvent) {
        match event {
            LiveEvent::Authenticate { agent, user, password } => {
                let domain = self.domain.clone();
                let source = self.conn.remote_address().ip();
                let check = domain.clone();
                let result = domain
                    .logins
                    .login(source, "live", move || {
                        check
                            .logins
                            .authenticate(&check.inventory, &user, &password, source, "live")
                    })
                    .await;
                match result {
                    Ok(p) => {
                        tracing::info!(user = ?p.user, role = %p.role.as_str(), ?agent, "authenticated");
                        let role = p.role.as_str().to_owned();
                        self.principal = Some(p);
                        self.session
                            .authenticated(Ok((self.domain.endpoint_name.clone(), role)));
                    }
                    Err(e) => self.session.authenticated(Err(crate::logins::refusal(&e))),
                }
            }
            LiveEvent::CheckPlan(plan) => {
                let Some(principal) = self.principal.clone() else {
                    return self.session.refuse(
                        RefusalCode::ProtocolViolation,
                        vec!["a plan before authentication".into()],
                    );
                };
                let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                    return self.session.refuse(
                        RefusalCode::Busy,
                        vec!["the cloud endpoint is at its limit of concurrent migrations; retry later".into()],
                    );
                };
                self.slot = Some(slot);
                let has_boot = plan.boot.is_some();
                let domain = self.domain.clone();
                let result = tokio::task::spawn_blocking(move || check_live_plan(&domain, &principal, &plan))
                    .await
                    .expect("validation does not panic");
                // The boot files' folder only for a plan the cloud accepted: a refused one
                // leaves nothing in the datastore.
                let result = match result {
                    Ok((memory, space)) => {
                        if has_boot {
                            match BootFiles::create(&self.domain, space) {
                                Ok(files) => self.boot = Some(files),
                                Err(problem) => {
                                    return self.session.refuse(RefusalCode::EndpointFailure, vec![problem])
                                }
                            }
                        }
                        Ok(memory)
                    }
                    Err(refusal) => Err(refusal),
                };
                let result = result.map(|reservation| self.memory = Some(reservation));
                self.session.plan_checked(result);
            }
            LiveEvent::BootBytes { file, bytes, .. } => {
                let stored = match self.boot.as_mut() {
                    Some(files) => files.append(file, &bytes).await,
                    None => Err("boot file bytes without a place to store them".to_owned()),
                };
                if let Err(problem) = stored {
                    self.session.refuse(RefusalCode::EndpointFailure, vec![problem]);
                }
            }
            LiveEvent::StartDestination => {
                let plan = self.session.plan().cloned().expect("a plan was checked");
                match self.start_destination(&plan).await {
                    Ok((dest, id, exports)) => {
                        tracing::info!(migration = %id, pid = dest.process.pid(), "destination waits for the memory stream");
                        self.dest = Some(dest);
                        self.session.destination_ready(id, exports, std::time::Instant::now());
                    }
                    Err((code, problem)) => self.session.refuse(code, vec![problem]),
                }
            }
            LiveEvent::Switchover => {
                let plan = self.session.plan().cloned().expect("a plan was checked");
                let Some(dest) = self.dest.take() else {
                    return self.session.refuse(
                        RefusalCode::ProtocolViolation,
                        vec!["switchover without a destination".into()],
                    );
                };
                match self.switch_over(&plan, dest).await {
                    Ok((vm_id, report)) => {
                        let (_, _, plain, wire) = self.stats.snapshot();
                        tracing::info!(vm = %vm_id, tunnel_plain = plain, tunnel_wire = wire, "live migration committed");
                        self.session.committed(vm_id, report);
                    }
                    Err(problem) => self.session.refuse(RefusalCode::EndpointFailure, vec![problem]),
                }
            }
            LiveEvent::TearDown { reason } => {
                if let Some(dest) = self.dest.take() {
                    self.tear_down(dest, &reason).await;
                }
            }
        }
    }

    /// Stages the disks, writes the boot files, starts QEMU paused with `-incoming defer`
    /// and exports its disks. Returns the migration id and the export names.
    async fn start_destination(
        &mut self,
        plan: &LivePlan,
    ) -> Result<(Destination, String, Vec<String>), (RefusalCode, String)> {
        let principal = self.principal.clone().expect("authenticated");
        let domain = self.domain.clone();
        let (edge, edge_cert) = (self.edge.clone(), self.edge_cert.clone());
        let cold =
            on_this_host(domain.hosts.this(), &plan.plan).map_err(|problem| (RefusalCode::PlanRejected, problem))?;
        let staged = tokio::task::spawn_blocking(move || {
            placement::validate_and_stage(&domain, &principal, &edge, &edge_cert, &cold)
        })
        .await
        .expect("staging does not panic")
        .map_err(|(code, problems)| (code, problems.join("; ")))?;
        let id = staged.migration_id.clone();
        // Another endpoint may take the migration once this one cannot keep its lease:
        // the live migration stops here (the source keeps running).
        if let Some(lease) = &staged.lease {
            let conn = self.conn.clone();
            lease.when_lost(Box::new(move |why| {
                gateway::transport::close(
                    &conn,
                    RefusalCode::Busy,
                    &format!("this cloud endpoint stops the live migration: {why}; the source VM keeps running"),
                );
            }));
        }
        // The connection's span (this runs in it): every later line carries the id.
        tracing::Span::current().record("migration_id", tracing::field::display(&id));
        let fail = |staged: Staged, domain: &Domain, problem: String| {
            placement::discard(domain, staged, &problem);
            (RefusalCode::EndpointFailure, problem)
        };
        let files = match prepare_files(&staged, plan, self.boot.take()).await {
            Ok(files) => files,
            Err(e) => return Err(fail(staged, &self.domain, e)),
        };
        let sockets = match tempfile::Builder::new().prefix("ce-live-").tempdir() {
            Ok(d) => d,
            Err(e) => {
                return Err(fail(
                    staged,
                    &self.domain,
                    format!("cannot create a folder for the tunnel sockets: {e}"),
                ))
            }
        };
        let mut spec = machine_for_vm(&plan.plan.vm, files);
        spec.incoming_defer = true;
        spec.paused = true;
        let started = async {
            let binary = QemuBinary::from_env().map_err(|e| e.to_string())?;
            let log = staged.staging.dir().join(format!("{}.qemu.log", plan.plan.vm.name));
            // Confined as the hosts' VMs are: it loads a memory stream the edge controls.
            // Its staged files and its sockets' folder become its user's; the staging
            // area around them, the inventory and the keys stay out of its reach.
            let folders: Vec<&Path> = std::iter::once(staged.staging.dir())
                .chain(staged.other_staging.iter().map(|(_, s)| s.dir()))
                .collect();
            let confinement = self
                .domain
                .hosts
                .confine(&folders, &[sockets.path()])
                .map_err(|e| format!("cannot confine the destination's QEMU: {e}"))?;
            QemuProcess::spawn_confined(&binary, &spec, &log, &confinement)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        let process = match started {
            Ok(p) => Arc::new(p),
            Err(e) => {
                return Err(fail(
                    staged,
                    &self.domain,
                    format!("the destination VM did not start: {e}"),
                ))
            }
        };
        let dest = Destination {
            process,
            staged,
            sockets,
            memory_claimed: Arc::default(),
            streams: 0,
            lanes: Arc::new(std::sync::Mutex::new(Lanes::new(plan.tunnel_lanes, MAX_TUNNELS))),
        };
        let pid_file = dest.staged.staging.dir().join(format!("{}.pid", plan.plan.vm.name));
        let _ = std::fs::write(&pid_file, format!("{}\n", dest.process.pid()));
        let qmp = dest.process.qmp().clone();
        let nbd = dest.nbd_socket();
        let mem = dest.memory_socket();
        let exports: Vec<String> = (0..plan.plan.vm.disks.len()).map(|i| format!("disk{i}")).collect();
        let setup = async {
            qmp.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "events", "state": true}]}),
            )
            .await?;
            // nbd-server-start takes the legacy address form ({type, data}).
            qmp.execute(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": nbd.to_string_lossy()}}}),
            )
            .await?;
            for (i, name) in exports.iter().enumerate() {
                // Without allow-inactive: the export activates the waiting
                // destination's node, so the mirror can write to it.
                qmp.execute(
                    "block-export-add",
                    json!({"type": "nbd", "id": format!("export{i}"), "node-name": gateway::qemu::vm::disk_node(i),
                           "name": name, "writable": true}),
                )
                .await?;
            }
            qmp.execute("migrate-incoming", json!({"uri": format!("unix:{}", mem.display())}))
                .await?;
            Ok::<_, gateway::qemu::QemuError>(())
        }
        .await;
        if let Err(e) = setup {
            let problem = format!("the destination VM could not be prepared for the migration: {e}");
            self.tear_down(dest, &problem).await;
            return Err((RefusalCode::EndpointFailure, problem));
        }
        Ok((dest, id, exports))
    }

    /// Takes a tunnel stream (one lane of a tunnel); once all the lanes of its tunnel
    /// are here, connects the tunnel to the destination's NBD server or memory socket.
    fn tunnel(&mut self, send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let Some(dest) = self.dest.as_mut() else {
            return;
        };
        let most = MAX_TUNNELS * u32::from(self.session.plan().map_or(1, |p| p.tunnel_lanes));
        if dest.streams >= most {
            self.session.refuse(
                RefusalCode::ProtocolViolation,
                vec![format!(
                    "more than {MAX_TUNNELS} tunnels ({most} streams) in one live migration"
                )],
            );
            return;
        }
        dest.streams += 1;
        let (nbd, mem) = (dest.nbd_socket(), dest.memory_socket());
        let migration_id = dest.staged.migration_id.clone();
        let memory_claimed = dest.memory_claimed.clone();
        let lanes = dest.lanes.clone();
        let stats = self.stats.clone();
        let conn = self.conn.clone();
        // The header is read in the tunnel's own task: a slow or silent opener must
        // not hold up the control stream.
        tokio::spawn(
            async move {
                let refuse = |e: &str| {
                    tracing::warn!(error = %e, "bad tunnel stream");
                    transport_close(&conn, RefusalCode::ProtocolViolation, e);
                };
                let header = match read_tunnel_header(&mut recv).await {
                    Ok(h) => h,
                    Err(e) => return refuse(&e),
                };
                if header.migration_id != migration_id {
                    return refuse(&format!(
                        "a tunnel for {} on the connection of {migration_id}",
                        header.migration_id
                    ));
                }
                let kind = header.kind;
                let added = lanes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add(&header, Lane { send, recv });
                let streams = match added {
                    Ok(Some(streams)) => streams,
                    // The tunnel's other lanes are still on their way; the last one connects it.
                    Ok(None) => return,
                    Err(e) => return refuse(&e),
                };
                let path = match kind {
                    TunnelKind::Nbd => nbd,
                    TunnelKind::Memory if !memory_claimed.swap(true, std::sync::atomic::Ordering::SeqCst) => mem,
                    TunnelKind::Memory => return refuse("a second memory tunnel"),
                };
                let local = match tokio::net::UnixStream::connect(&path).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, socket = %path.display(), "the destination does not accept the tunnel");
                        return;
                    }
                };
                let streams = streams.into_iter().map(|l| (l.send, l.recv)).collect();
                if let Err(e) = splice(local, streams, TUNNEL_LEVEL, stats).await {
                    tracing::warn!(?kind, error = %e, "tunnel ended");
                    if e.is_peer_violation() {
                        transport_close(&conn, RefusalCode::ProtocolViolation, &e.to_string());
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// The source is paused and its disks in sync: once the destination has loaded all
    /// of the memory, stop the exports, run it, and register it.
    async fn switch_over(
        &mut self,
        plan: &LivePlan,
        dest: Destination,
    ) -> Result<(String, gateway::plan::MigrationReport), String> {
        let qmp = dest.process.qmp().clone();
        let mut events = qmp.events();
        let loaded = async {
            loop {
                let m = qmp
                    .execute("query-migrate", Value::Null)
                    .await
                    .map_err(|e| e.to_string())?;
                match m["status"].as_str().unwrap_or("") {
                    "completed" => return Ok(()),
                    "failed" | "cancelled" => {
                        return Err(format!(
                            "the destination could not load the memory stream: {}",
                            m["error-desc"].as_str().unwrap_or("see its qemu.log")
                        ))
                    }
                    _ => {}
                }
                // The MIGRATION event, or a short poll if it was missed.
                let _ = tokio::time::timeout(Duration::from_millis(20), events.recv()).await;
            }
        };
        let result = match tokio::time::timeout(SWITCHOVER_WAIT, loaded).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the destination did not finish loading the memory within {} s",
                SWITCHOVER_WAIT.as_secs()
            )),
        };
        let result = match result {
            Ok(()) => async {
                qmp.execute("nbd-server-stop", Value::Null).await?;
                qmp.execute("cont", Value::Null).await
            }
            .await
            .map_err(|e| format!("the destination could not be started: {e}")),
            Err(e) => Err(e),
        };
        if let Err(problem) = result {
            self.tear_down(dest, &problem).await;
            return Err(problem);
        }
        let Destination { process, staged, .. } = dest;
        let domain = self.domain.clone();
        let cold = plan.plan.clone();
        let registered = tokio::task::spawn_blocking(move || placement::finalize_live(&domain, &cold, staged))
            .await
            .expect("registering does not panic");
        match registered {
            Ok((vm_id, report)) => {
                crate::hosts::Hosts::adopt(&self.domain, &vm_id, process).await;
                // Counted as running now.
                self.memory = None;
                Ok((vm_id, report))
            }
            Err(e) => {
                // The files are gone already: the VM must not run on without them.
                let _ = process.stop(STOP_GRACE).await;
                Err(e)
            }
        }
    }

    async fn tear_down(&self, dest: Destination, reason: &str) {
        tracing::warn!(migration = %dest.staged.migration_id, ?reason, "tearing the destination down");
        let _ = dest.process.stop(STOP_GRACE).await;
        let domain = self.domain.clone();
        let reason = reason.to_owned();
        let staged = dest.staged;
        let _ = tokio::task::spawn_blocking(move || placement::discard(&domain, staged, &reason)).await;
    }
}

fn transport_close(conn: &quinn::Connection, code: RefusalCode, why: &str) {
    gateway::transport::close(conn, code, why);
}

/// A tunnel stream's preamble and header.
async fn read_tunnel_header(recv: &mut quinn::RecvStream) -> Result<TunnelHeader, String> {
    let mut pre = [0u8; PREAMBLE_LEN];
    recv.read_exact(&mut pre).await.map_err(|e| e.to_string())?;
    let p = Preamble::decode(&pre).map_err(|e| e.to_string())?;
    if p.kind != StreamKind::Tunnel {
        return Err(format!("a {:?} stream where a tunnel was expected", p.kind));
    }
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
    let len = control::frame_len(prefix).map_err(|e| e.to_string())?;
    if len > 4096 {
        return Err(format!("a tunnel header of {len} bytes"));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    control::decode_body(&body).map_err(|e| e.to_string())
}

/// The plan as this endpoint places it. In a domain of several endpoints the destination
/// VM runs here, so it is registered on this endpoint's host: the default when the plan
/// names none, and a refusal when it names another host (its endpoint must take it).
fn on_this_host(
    this: &crate::hosts::ThisHost,
    plan: &gateway::plan::MigrationPlan,
) -> Result<gateway::plan::MigrationPlan, String> {
    if !this.shared {
        return Ok(plan.clone());
    }
    match plan.placement.host.as_deref() {
        None => {
            let mut pinned = plan.clone();
            pinned.placement.host = Some(this.name.clone());
            Ok(pinned)
        }
        Some(host) if host == this.name || this.id.as_deref() == Some(host) => Ok(plan.clone()),
        Some(host) => Err(format!(
            "a live migration runs on the host of the endpoint it reaches ({}), and the plan names host {host}: \
             leave --host out or name {}, or send the live migration to the endpoint of {host}",
            this.name, this.name
        )),
    }
}

/// The plan against the domain, plus what a live migration needs: a hypervisor here,
/// room for the VM on the host, and room for its boot files in the default datastore
/// (they arrive before the disks' space is reserved), each held from now on.
fn check_live_plan(
    domain: &Domain,
    principal: &Principal,
    plan: &LivePlan,
) -> Result<(crate::hosts::MemoryReservation, Option<ScratchSpace>), (RefusalCode, Vec<String>)> {
    let (pinned, mut problems) = match on_this_host(domain.hosts.this(), &plan.plan) {
        Ok(pinned) => (pinned, Vec::new()),
        Err(problem) => (plan.plan.clone(), vec![problem]),
    };
    match placement::validate(domain, principal, &pinned) {
        Ok(_) => {}
        Err((RefusalCode::PlanRejected, more)) => problems.extend(more),
        Err(other) => return Err(other),
    }
    if let Err(e) = QemuBinary::from_env() {
        problems.push(format!(
            "this endpoint cannot run VMs, so it cannot take a live migration: {e}"
        ));
    }
    // Counted from now, not from when the destination is adopted: concurrent live plans
    // must not each see the same free memory.
    let reservation = match domain.hosts.reserve(plan.plan.vm.memory_mib) {
        Ok(r) => Some(r),
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    // Checked beside the other problems, so that all are listed at once.
    let boot_space = match &plan.boot {
        Some(boot) => {
            let bytes = boot
                .kernel
                .len
                .saturating_add(boot.initrd.as_ref().map_or(0, |f| f.len));
            let _deciding = crate::datastore::space_decision();
            let info = domain.inventory.datastore().map_err(placement::endpoint_failure)?;
            let used = domain
                .inventory
                .space_on(&info.id)
                .map_err(placement::endpoint_failure)?;
            // The plan's disks there are reserved only when the destination starts, after
            // the boot files arrived: they must fit beside them from now on.
            let disks = disks_on(&plan.plan, &info);
            match domain.datastore.reserve_scratch(
                bytes,
                used.used.saturating_add(disks),
                used.reserved.saturating_add(disks),
                "the kernel and initrd of the live migration, beside its disks,",
            ) {
                Ok(space) => Some(space),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            }
        }
        None => None,
    };
    match (problems.is_empty(), reservation) {
        (true, Some(reservation)) => Ok((reservation, boot_space)),
        _ => Err((RefusalCode::PlanRejected, problems)),
    }
}

/// Bytes of the plan's disks placed on datastore `info` (by its name or id, or by
/// default: the plan names no datastore for them).
fn disks_on(plan: &gateway::plan::MigrationPlan, info: &crate::inventory::DatastoreInfo) -> u64 {
    plan.vm
        .disks
        .iter()
        .filter(|d| {
            plan.placement
                .disk_datastore(&d.key)
                .or(plan.placement.datastore.as_deref())
                .is_none_or(|ds| ds == info.name || ds == info.id)
        })
        .map(|d| d.capacity)
        .sum()
}

/// The staged disks as QEMU opens them, the boot files written beside them, and the
/// console and QMP paths the VM keeps once it is registered (see crate::hosts).
async fn prepare_files(staged: &Staged, plan: &LivePlan, boot: Option<BootFiles>) -> Result<MachineFiles, String> {
    let dir = staged.staging.dir().to_owned();
    let name = plan.plan.vm.name.clone();
    let mut disks = Vec::new();
    for (i, disk) in staged.disks.iter().enumerate() {
        let capacity = plan.plan.vm.disks[i].capacity;
        let path = disk.path().to_owned();
        let format = match disk.format() {
            // The flat extent is a raw image; its descriptor is written at the commit.
            DiskFormat::VmdkFlat | DiskFormat::Raw => gateway::qemu::DiskFormat::Raw,
            DiskFormat::Qcow2 => {
                // Our qcow2 writer lays out its tables as it goes; QEMU writes this
                // image, so qemu-img makes it, empty.
                recreate_qcow2(&path, capacity).await?;
                gateway::qemu::DiskFormat::Qcow2
            }
        };
        disks.push((path, format));
    }
    let kernel = match &plan.boot {
        None => None,
        Some(b) => {
            let mut received = boot.ok_or("the boot files were not received")?;
            let kernel = dir.join(format!("{name}.vmlinuz"));
            received.place(0, &kernel).await?;
            let initrd = match b.initrd {
                Some(_) => {
                    let path = dir.join(format!("{name}.initrd"));
                    received.place(1, &path).await?;
                    Some(path)
                }
                None => None,
            };
            // Kept beside the disks: a later power on boots the same way (see
            // crate::hosts::VmFiles::direct_kernel).
            std::fs::write(dir.join(format!("{name}.append")), &b.append)
                .map_err(|e| format!("cannot write the kernel command line: {e}"))?;
            Some(DirectKernel {
                kernel,
                initrd,
                append: (!b.append.is_empty()).then(|| b.append.clone()),
            })
        }
    };
    Ok(MachineFiles {
        disks,
        kernel,
        serial_log: dir.join(format!("{name}.console.log")),
        qmp_socket: dir.join(format!("{name}.qmp")),
    })
}

async fn recreate_qcow2(path: &Path, capacity: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(capacity.to_string())
        .output()
        .await
        .map_err(|e| {
            format!(
                "cannot run qemu-img to create {}: {e}; install qemu-utils",
                path.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img could not create {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A live migration's boot files as they arrive: written piece by piece to a private
/// folder in the default datastore's staging area, never held in memory (a kernel and an
/// initrd may be 256 MiB each), then moved beside the staged disks when the destination
/// starts. The folder goes with this value (and a restart cleans `.staging`).
struct BootFiles {
    dir: tempfile::TempDir,
    files: [Option<tokio::fs::File>; 2],
    /// Their declared size, promised in the datastore while they arrive.
    _space: Option<ScratchSpace>,
}

const BOOT_NAMES: [&str; 2] = ["kernel", "initrd"];

impl BootFiles {
    fn create(domain: &Domain, space: Option<ScratchSpace>) -> Result<BootFiles, String> {
        let staging = domain.datastore.root().join(".staging");
        let dir = tempfile::Builder::new()
            .prefix(".boot-")
            .tempdir_in(&staging)
            .map_err(|e| {
                format!(
                    "cannot create a folder for the boot files in {}: {e}; check the datastore",
                    staging.display()
                )
            })?;
        Ok(BootFiles {
            dir,
            files: [None, None],
            _space: space,
        })
    }

    /// Appends `bytes` to boot file `file` (0 the kernel, 1 the initrd); the session
    /// checked their order and length.
    async fn append(&mut self, file: u8, bytes: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let index = usize::from(file).min(1);
        let path = self.dir.path().join(BOOT_NAMES[index]);
        let what = |e: std::io::Error| {
            format!(
                "cannot store the {} in {}: {e}; free space in the datastore",
                BOOT_NAMES[index],
                path.display()
            )
        };
        if self.files[index].is_none() {
            self.files[index] = Some(tokio::fs::File::create(&path).await.map_err(what)?);
        }
        let f = self.files[index].as_mut().expect("opened above");
        f.write_all(bytes).await.map_err(what)
    }

    /// Moves boot file `file` to `to` (copied when `to` is on another file system).
    async fn place(&mut self, file: usize, to: &Path) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let from = self.dir.path().join(BOOT_NAMES[file]);
        let failed = |e: std::io::Error| format!("cannot place the {} at {}: {e}", BOOT_NAMES[file], to.display());
        if let Some(mut f) = self.files[file].take() {
            f.flush().await.map_err(failed)?;
        }
        if tokio::fs::rename(&from, to).await.is_err() {
            tokio::fs::copy(&from, to).await.map_err(failed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::on_this_host;
    use crate::hosts::ThisHost;

    fn plan(host: Option<&str>) -> gateway::plan::MigrationPlan {
        gateway::plan::MigrationPlan {
            vm: gateway::plan::VmSpec {
                name: "live01".into(),
                guest_os: "otherGuest".into(),
                num_cpus: 1,
                cores_per_socket: None,
                memory_mib: 256,
                firmware: None,
                bios_uuid: None,
                nics: vec![],
                controllers: vec![],
                disks: vec![],
            },
            network_map: vec![],
            chunk_size: gateway::plan::DEFAULT_CHUNK_SIZE,
            disk_format: None,
            firewall: Default::default(),
            placement: gateway::plan::Placement {
                host: host.map(str::to_owned),
                ..Default::default()
            },
            source_descriptor_sha256: None,
            seed: None,
        }
    }

    #[test]
    fn a_live_migration_lands_on_the_host_of_the_endpoint_it_reaches() {
        let esx_b = ThisHost::new("esx-b".into(), Some("host-2".into()), true, None);
        let placed = |host| on_this_host(&esx_b, &plan(host)).map(|p| p.placement.host);
        assert_eq!(placed(None), Ok(Some("esx-b".to_owned())));
        assert_eq!(placed(Some("host-2")), Ok(Some("host-2".to_owned())));
        let refused = placed(Some("esx-a")).unwrap_err();
        assert!(refused.contains("esx-a") && refused.contains("(esx-b)"), "{refused}");
        // One endpoint runs every host's VMs: the plan stays as it is.
        let alone = ThisHost::new("esx-b".into(), Some("host-2".into()), false, None);
        assert_eq!(
            on_this_host(&alone, &plan(Some("esx-a")))
                .unwrap()
                .placement
                .host
                .as_deref(),
            Some("esx-a")
        );
    }
}
