//! The cloud domain's host runs its powered-on VMs: one QEMU process per VM, started,
//! watched and stopped here over QMP.
//!
//! ```text
//! mod.rs    Hosts: power on, power off, reset; the watcher that notices a QEMU exit;
//!           finding running VMs again after a restart
//! spec.rs   an inventory VM as a gateway::qemu::MachineSpec; its runtime files
//! test_boot.rs  disposable copies of replicas, booted while the syncs go on
//! peers.rs  a scale-out domain's other endpoints: which one runs a VM, and calling it
//! ```
//!
//! The inventory's `power_state` follows the processes: POWERED_ON once QEMU runs,
//! POWERED_OFF when it has stopped, whether through the API, the guest shutting down, or
//! QEMU crashing.
//!
//! An endpoint that stops leaves its VMs running, as an ESXi host keeps its VMs while
//! vCenter restarts: QEMU runs in its own process group, and the VM folder keeps its
//! QMP socket and pid file. On start, [`Hosts::recover`] finds each VM the inventory
//! says is POWERED_ON again by that pid and socket, or marks it POWERED_OFF.
//!
//! In a scale-out domain each endpoint is one host and runs only the VMs placed on it:
//! [`Hosts::power`] and [`Hosts::console`] hand another host's VM to its endpoint
//! ([`peers`]), and the local operations refuse it.

pub mod confine;
pub mod peers;
#[cfg(test)]
mod scale_out_tests;
mod spec;
pub mod test_boot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway::qemu::{QemuBinary, QemuError, QemuProcess};

pub use peers::{PowerOp, ThisHost};
pub use spec::{machine_spec, resolve_datastore_path, tail, VmFiles};

use crate::inventory::{InventoryError, VmRecord};
use crate::Domain;

pub const POWERED_ON: &str = "POWERED_ON";
pub const POWERED_OFF: &str = "POWERED_OFF";

/// How long a VM has to stop after `quit` before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why a power operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    #[error("VM {0} is not in the inventory")]
    NotFound(String),
    #[error("VM {vm} is already {state}")]
    AlreadyInState { vm: String, state: &'static str },
    #[error("VM {vm} is {state}; power it on first")]
    NotRunning { vm: String, state: &'static str },
    #[error(
        "VM {vm} is not powered on: the switchover of migration {migration} is being rolled back, and the VM must \
         never run in the cloud while its source may run again; replicate and switch over again to run it here"
    )]
    RolledBack { vm: String, migration: String },
    #[error(
        "VM {vm} needs {need} MiB of memory; the host has {host} MiB and its powered-on VMs use {used} MiB; \
         power off another VM or raise the host's memory_mib"
    )]
    Memory {
        vm: String,
        need: u64,
        used: u64,
        host: u64,
    },
    #[error("VM {vm} has {vcpus} vCPUs, more than the host's {cores} cores; give it fewer vCPUs")]
    Cpus { vm: String, vcpus: u32, cores: u32 },
    #[error("VM disk {path} cannot be opened: {reason}")]
    Disk { path: String, reason: String },
    #[error("VM {vm} has hardware the host cannot run: {reason}; change it in the VM's .vmx")]
    Hardware { vm: String, reason: String },
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no test boot of migration {migration}: {reason}")]
    TestBoot { migration: String, reason: String },
    #[error("an endpoint worker failed: {0}")]
    Worker(String),
    #[error(
        "VM {vm} is placed on host {host}, which another endpoint of the domain runs; this endpoint runs host \
         {this}'s VMs only: ask the endpoint of {host}"
    )]
    OtherHost { vm: String, host: String, this: String },
    #[error("VM {vm} runs on host {host}, and its endpoint cannot be asked: {reason}")]
    NoPeer {
        vm: String,
        host: String,
        reason: &'static str,
    },
    #[error(
        "the endpoint of host {host} at {url} cannot be reached ({reason}); check that it runs and that this \
         endpoint reaches {url} (that endpoint's `domain.host.api_url`)"
    )]
    PeerUnreachable { host: String, url: String, reason: String },
    /// The peer's own answer (its REST error type and message), passed on.
    #[error("the endpoint of host {host} answered: {message}")]
    Peer {
        host: String,
        error_type: String,
        message: String,
    },
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(
        "the endpoint runs as root, and runs each VM's QEMU as the unprivileged user {user:?}, which {problem}: \
         create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {user}` (tests/setup.sh does), \
         or name another unprivileged user in `qemu_user`"
    )]
    QemuUser { user: String, problem: String },
    #[error(
        "QEMU's unprivileged user cannot reach the VM folder {}: the folder {} above it lets others no \
         passage (mode {mode}); allow it with `chmod o+x` (others may pass through, not list it)",
        folder.display(), above.display()
    )]
    Unreachable {
        folder: std::path::PathBuf,
        above: std::path::PathBuf,
        mode: String,
    },
}

impl HostError {
    /// The VM is in the state asked for already, whether this host or a peer said so.
    pub fn already_in_state(&self) -> bool {
        match self {
            HostError::AlreadyInState { .. } => true,
            HostError::Peer { error_type, .. } => error_type == "ALREADY_IN_DESIRED_STATE",
            _ => false,
        }
    }
}

/// A VM whose QEMU runs.
#[derive(Debug)]
struct Running {
    process: Arc<QemuProcess>,
    memory_mib: u64,
    /// Tells this run from a later one of the same VM: a watcher only cleans up its own.
    generation: u64,
    files: VmFiles,
}

/// The host's running VMs.
#[derive(Debug)]
pub struct Hosts {
    memory_mib: u64,
    cpu_cores: u32,
    /// One lock for every power operation: they are rare, and a start that checks the
    /// memory of the others must not race another start.
    running: tokio::sync::Mutex<HashMap<String, Running>>,
    generation: AtomicU64,
    /// Set when the endpoint stops: watchers let go of their VMs, which run on.
    detached: tokio::sync::watch::Sender<bool>,
    /// The user QEMU runs as when the endpoint runs as root (see [`confine`]).
    qemu_user: String,
    /// Memory of live migrations' destinations from their plan's acceptance until they are
    /// adopted as running VMs (see [`Hosts::reserve`]).
    reserved_mib: Arc<std::sync::Mutex<u64>>,
    /// Test boots of replicas, by migration id (see [`test_boot`]).
    test_boots: tokio::sync::Mutex<HashMap<String, test_boot::TestBoot>>,
    /// Which host of the domain this endpoint is, and whether others share it.
    this: ThisHost,
}

/// Memory held for a live migration's destination; given back when dropped (the VM was
/// adopted, or the migration ended without one).
#[derive(Debug)]
pub struct MemoryReservation {
    reserved_mib: Arc<std::sync::Mutex<u64>>,
    mib: u64,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        let mut r = self.reserved_mib.lock().unwrap_or_else(|p| p.into_inner());
        *r = r.saturating_sub(self.mib);
    }
}

impl Hosts {
    /// QEMU runs as `user` when the endpoint runs as root (config `qemu_user`).
    pub fn with_qemu_user(mut self, user: &str) -> Hosts {
        user.clone_into(&mut self.qemu_user);
        self
    }

    /// This endpoint is host `this` of its domain (see [`peers`]); without it, an
    /// endpoint runs every VM of the inventory.
    pub fn on_host(mut self, this: ThisHost) -> Hosts {
        self.this = this;
        self
    }

    /// Which host of the domain this endpoint is.
    pub fn this(&self) -> &ThisHost {
        &self.this
    }

    /// The QEMU process of a running VM (QMP, for tools and tests).
    pub async fn process(&self, vm: &str) -> Option<Arc<QemuProcess>> {
        self.running.lock().await.get(vm).map(|r| r.process.clone())
    }

    /// A host with this much memory and this many cores (the domain config's host).
    pub fn new(memory_mib: u64, cpu_cores: u32) -> Hosts {
        Hosts {
            memory_mib,
            cpu_cores,
            running: Default::default(),
            generation: AtomicU64::new(0),
            detached: tokio::sync::watch::channel(false).0,
            qemu_user: confine::DEFAULT_QEMU_USER.to_owned(),
            reserved_mib: Default::default(),
            test_boots: Default::default(),
            this: ThisHost::default(),
        }
    }

    /// The host's memory and what powered-on VMs and live migrations under way hold of
    /// it, in MiB. Call from a blocking thread.
    pub fn memory_mib(&self) -> (u64, u64) {
        let running = self.running.blocking_lock();
        let used: u64 = running.values().map(|r| r.memory_mib).sum();
        (self.memory_mib, used.saturating_add(self.reserved()))
    }

    fn reserved(&self) -> u64 {
        *self.reserved_mib.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `vm` has a QEMU now.
    pub async fn is_running(&self, vm: &str) -> bool {
        self.running.lock().await.contains_key(vm)
    }

    /// QEMU's pid for `vm`, while it runs.
    pub async fn pid(&self, vm: &str) -> Option<u32> {
        self.running.lock().await.get(vm).map(|r| r.process.pid())
    }

    /// Powers `vm` on: builds its machine from the inventory, starts QEMU and marks it
    /// POWERED_ON. Refused if it runs already or the host's memory would not hold it.
    pub async fn power_on(domain: &Arc<Domain>, vm_id: &str) -> Result<(), HostError> {
        let hosts = &domain.hosts;
        let mut running = hosts.running.lock().await;
        let vm = load_own_vm(domain, vm_id).await?;
        if running.contains_key(vm_id) {
            return Err(HostError::AlreadyInState {
                vm: vm_id.to_owned(),
                state: POWERED_ON,
            });
        }
        // Checked under the power lock: a rollback marks the migration before it powers
        // the VM off, so no power-on slips in between.
        let d = domain.clone();
        let id = vm_id.to_owned();
        let blocked = tokio::task::spawn_blocking(move || d.inventory.power_on_blocked(&id))
            .await
            .map_err(|e| HostError::Worker(e.to_string()))??;
        if let Some(migration) = blocked {
            return Err(HostError::RolledBack {
                vm: vm_id.to_owned(),
                migration,
            });
        }
        // Live migrations' destinations count from their plan's acceptance.
        let used: u64 = running.values().map(|r| r.memory_mib).sum::<u64>() + hosts.reserved();
        if used.saturating_add(vm.memory_mib) > hosts.memory_mib {
            return Err(HostError::Memory {
                vm: vm_id.to_owned(),
                need: vm.memory_mib,
                used,
                host: hosts.memory_mib,
            });
        }
        if vm.num_cpus > hosts.cpu_cores {
            return Err(HostError::Cpus {
                vm: vm_id.to_owned(),
                vcpus: vm.num_cpus,
                cores: hosts.cpu_cores,
            });
        }
        let files = VmFiles::of_vm(domain, &vm);
        let spec = machine_spec(domain, &vm, &files)?;
        let binary = QemuBinary::from_env()?;
        // Its folder, and the folders of disks placed on other datastores.
        let mut folders: Vec<&std::path::Path> = vec![&files.folder];
        folders.extend(spec.disks.iter().filter_map(|d| d.path.parent()));
        let confinement = hosts.confine(&folders, &[])?;
        let process = QemuProcess::spawn_confined(&binary, &spec, &files.qemu_log, &confinement).await?;
        let pid = process.pid();
        if let Err(source) = std::fs::write(&files.pid_file, format!("{pid}\n")) {
            // Without the pid file a restart could not find the VM: do not run it.
            let _ = process.stop(STOP_GRACE).await;
            files.clean_runtime();
            return Err(HostError::Io {
                path: files.pid_file.clone(),
                source,
            });
        }
        let process = Arc::new(process);
        if let Err(e) = set_state(domain, vm_id, POWERED_ON).await {
            let _ = process.stop(STOP_GRACE).await;
            files.clean_runtime();
            return Err(e);
        }
        tracing::info!(vm = %vm_id, name = ?vm.name, pid, "powered on");
        let generation = hosts.generation.fetch_add(1, Ordering::Relaxed);
        running.insert(
            vm_id.to_owned(),
            Running {
                process: process.clone(),
                memory_mib: vm.memory_mib,
                generation,
                files,
            },
        );
        watch(domain.clone(), vm_id.to_owned(), process, generation);
        Ok(())
    }

    /// Powers `vm` off as a power cut would (vSphere's `stop`): QEMU quits, or is killed
    /// after a grace period. The VM is POWERED_OFF when this returns.
    pub async fn power_off(domain: &Arc<Domain>, vm_id: &str) -> Result<(), HostError> {
        let mut running = domain.hosts.running.lock().await;
        load_own_vm(domain, vm_id).await?;
        let Some(run) = running.remove(vm_id) else {
            return Err(HostError::AlreadyInState {
                vm: vm_id.to_owned(),
                state: POWERED_OFF,
            });
        };
        let how = run.process.stop(STOP_GRACE).await;
        // Whether QEMU went quietly or was killed, or even refused to die, the VM is
        // no longer this host's to run; the error says what is left behind.
        run.files.clean_runtime();
        set_state(domain, vm_id, POWERED_OFF).await?;
        let how = how?;
        tracing::info!(vm = %vm_id, pid = run.process.pid(), ended = %how, "powered off");
        Ok(())
    }

    /// Resets a running VM (QMP `system_reset`), as the reset button does.
    pub async fn reset(domain: &Arc<Domain>, vm_id: &str) -> Result<(), HostError> {
        let running = domain.hosts.running.lock().await;
        load_own_vm(domain, vm_id).await?;
        let Some(run) = running.get(vm_id) else {
            return Err(HostError::NotRunning {
                vm: vm_id.to_owned(),
                state: POWERED_OFF,
            });
        };
        run.process
            .qmp()
            .execute("system_reset", serde_json::Value::Null)
            .await?;
        tracing::info!(vm = %vm_id, "reset");
        Ok(())
    }

    /// After a restart: each VM of this host the inventory shows POWERED_ON is found
    /// again by the pid file and QMP socket in its folder, or, its QEMU gone, marked
    /// POWERED_OFF. Another host's VMs are its endpoint's: their files are on the shared
    /// datastore too, and marking them off or attaching to their QEMU would take them
    /// from it.
    pub async fn recover(domain: &Arc<Domain>) -> Result<(), HostError> {
        let d = domain.clone();
        let vms = tokio::task::spawn_blocking(move || d.inventory.list_vms())
            .await
            .map_err(|e| HostError::Worker(e.to_string()))??;
        let mut running = domain.hosts.running.lock().await;
        let this = &domain.hosts.this;
        for vm in vms
            .into_iter()
            .filter(|vm| vm.power_state == POWERED_ON && this.runs(&vm.host))
        {
            let files = VmFiles::of_vm(domain, &vm);
            let attached = match files.read_pid() {
                Some(pid) => QemuProcess::attach(pid, &files.qmp_socket).await.ok(),
                None => None,
            };
            let Some(process) = attached else {
                tracing::warn!(vm = %vm.id, name = ?vm.name, "its QEMU stopped while the endpoint was down: POWERED_OFF");
                files.clean_runtime();
                set_state(domain, &vm.id, POWERED_OFF).await?;
                continue;
            };
            tracing::info!(vm = %vm.id, name = ?vm.name, pid = process.pid(), "still running: attached");
            let process = Arc::new(process);
            let generation = domain.hosts.generation.fetch_add(1, Ordering::Relaxed);
            running.insert(
                vm.id.clone(),
                Running {
                    process: process.clone(),
                    memory_mib: vm.memory_mib,
                    generation,
                    files,
                },
            );
            watch(domain.clone(), vm.id, process, generation);
        }
        Ok(())
    }
}

impl Hosts {
    /// Takes over a VM that already runs: a live migration's destination, registered
    /// POWERED_ON once it ran, its files moved into the VM's folder (its QMP socket and
    /// pid file with them). From here on it is powered off, reset and watched like any
    /// VM this host started.
    pub async fn adopt(domain: &Arc<Domain>, vm_id: &str, process: Arc<QemuProcess>) {
        let vm = match load_vm(domain, vm_id).await {
            Ok(vm) => vm,
            Err(e) => {
                tracing::error!(vm = %vm_id, error = %e, "cannot take over a migrated VM");
                return;
            }
        };
        let files = VmFiles::of_vm(domain, &vm);
        let mut running = domain.hosts.running.lock().await;
        let generation = domain.hosts.generation.fetch_add(1, Ordering::Relaxed);
        running.insert(
            vm_id.to_owned(),
            Running {
                process: process.clone(),
                memory_mib: vm.memory_mib,
                generation,
                files,
            },
        );
        tracing::info!(vm = %vm_id, name = ?vm.name, pid = process.pid(), "runs on this host after a live migration");
        watch(domain.clone(), vm_id.to_owned(), process, generation);
    }

    /// The confinement of a VM's QEMU (see [`confine`]), every VM's alike, whether a
    /// power-on or a live migration's destination starts it: the sandbox, and when the
    /// endpoint runs as root, QEMU's own user, to whom `folders` (in datastores: the VM's
    /// files) and `private` (a private folder elsewhere, such as one for sockets) are
    /// handed over. Nothing else of the endpoint's is reachable by that user.
    pub fn confine(
        &self,
        folders: &[&std::path::Path],
        private: &[&std::path::Path],
    ) -> Result<gateway::qemu::Confinement, HostError> {
        let confinement = confine::confinement(&self.qemu_user)?;
        if let Some(user) = confinement.run_as {
            let mut folders = folders.to_vec();
            folders.sort();
            folders.dedup();
            for folder in folders {
                confine::hand_over(folder, user)?;
            }
            for folder in private {
                confine::give(folder, user)?;
            }
        }
        Ok(confinement)
    }

    /// Holds `memory_mib` for a live migration's destination from its plan's acceptance
    /// until the reservation is dropped (after the VM is adopted, or when the migration
    /// ends without one): concurrent live plans, and power-ons meanwhile, see it as used.
    /// Refused, saying why, when the running VMs and the other reservations leave no room.
    /// Call from a blocking thread.
    pub fn reserve(&self, memory_mib: u64) -> Result<MemoryReservation, String> {
        // The running set's lock first, as a power-on takes it: the check and the
        // reservation are one step against both.
        let running = self.running.blocking_lock();
        let used: u64 = running.values().map(|r| r.memory_mib).sum();
        let mut reserved = self.reserved_mib.lock().unwrap_or_else(|p| p.into_inner());
        if used.saturating_add(*reserved).saturating_add(memory_mib) > self.memory_mib {
            return Err(format!(
                "the host has {} MiB of memory, its running VMs use {used} MiB and live migrations under way hold {} MiB: a VM of {memory_mib} MiB does not fit; power off a VM, wait for a migration to end, or give the host more memory",
                self.memory_mib, *reserved
            ));
        }
        *reserved += memory_mib;
        Ok(MemoryReservation {
            reserved_mib: self.reserved_mib.clone(),
            mib: memory_mib,
        })
    }

    /// Lets go of the running VMs as the endpoint stops: their QMP connections close
    /// (QEMU's monitor takes one client, and the next endpoint run will be it) and their
    /// watchers end. The VMs keep running and stay POWERED_ON.
    pub async fn detach(&self) {
        // Disposable, and nobody would discard them after: test boots stop with the endpoint.
        self.discard_test_boots().await;
        self.detached.send_replace(true);
        let mut running = self.running.lock().await;
        for (vm, run) in running.drain() {
            let _ = tokio::time::timeout(Duration::from_secs(2), run.process.qmp().close()).await;
            tracing::info!(vm = %vm, pid = run.process.pid(), "left running for the next start of the endpoint");
        }
    }
}

/// Marks the VM POWERED_OFF when its QEMU exits on its own (guest shutdown, crash, a
/// kill from outside). A power off through the API has removed the run already.
fn watch(domain: Arc<Domain>, vm_id: String, process: Arc<QemuProcess>, generation: u64) {
    let mut detached = domain.hosts.detached.subscribe();
    tokio::spawn(async move {
        let how = tokio::select! {
            how = process.wait() => how,
            _ = detached.wait_for(|d| *d) => return,
        };
        let mut running = domain.hosts.running.lock().await;
        if running.get(&vm_id).is_none_or(|r| r.generation != generation) {
            return;
        }
        let Some(run) = running.remove(&vm_id) else { return };
        run.files.clean_runtime();
        tracing::info!(vm = %vm_id, ended = %how, "QEMU exited: POWERED_OFF");
        if let Err(e) = set_state(&domain, &vm_id, POWERED_OFF).await {
            tracing::error!(vm = %vm_id, error = %e, "cannot record POWERED_OFF");
        }
    });
}

impl Hosts {
    /// Powers VM `vm_id` on, off or resets it, on this host or, when another endpoint
    /// runs its host, through that one; `on_behalf` (a user, a migration) goes into that
    /// endpoint's log.
    pub async fn power(domain: &Arc<Domain>, vm_id: &str, op: PowerOp, on_behalf: &str) -> Result<(), HostError> {
        match route_of(domain, vm_id).await? {
            peers::Route::Here => Hosts::power_here(domain, vm_id, op).await,
            peers::Route::Peer(peer) => {
                tracing::info!(vm = %vm_id, host = %peer.host, url = %peer.url, op = op.action(), "power operation forwarded to the VM's host");
                peer.power(vm_id, op, &domain.hosts.this, on_behalf).await
            }
        }
    }

    /// [`Hosts::power`] on this host only (a peer forwarded it: never again).
    pub async fn power_here(domain: &Arc<Domain>, vm_id: &str, op: PowerOp) -> Result<(), HostError> {
        match op {
            PowerOp::On => Hosts::power_on(domain, vm_id).await,
            PowerOp::Off => Hosts::power_off(domain, vm_id).await,
            PowerOp::Reset => Hosts::reset(domain, vm_id).await,
        }
    }

    /// The last `bytes` of VM `vm_id`'s serial console, read here or by the endpoint of
    /// its host: the log is written where QEMU runs (on a shared datastore the file
    /// might be readable from here too, but its host decides what it holds).
    pub async fn console(domain: &Arc<Domain>, vm_id: &str, bytes: u64, on_behalf: &str) -> Result<Vec<u8>, HostError> {
        match route_of(domain, vm_id).await? {
            peers::Route::Here => Hosts::console_here(domain, vm_id, bytes).await,
            peers::Route::Peer(peer) => peer.console(vm_id, bytes, &domain.hosts.this, on_behalf).await,
        }
    }

    /// [`Hosts::console`] on this host only.
    pub async fn console_here(domain: &Arc<Domain>, vm_id: &str, bytes: u64) -> Result<Vec<u8>, HostError> {
        let vm = load_own_vm(domain, vm_id).await?;
        let path = VmFiles::of_vm(domain, &vm).console_log;
        let read = path.clone();
        tokio::task::spawn_blocking(move || tail(&read, bytes))
            .await
            .map_err(|e| HostError::Worker(e.to_string()))?
            .map_err(|source| HostError::Io { path, source })
    }
}

/// Who serves VM `vm_id`: this endpoint or its host's (see [`peers::route`]).
async fn route_of(domain: &Arc<Domain>, vm_id: &str) -> Result<peers::Route, HostError> {
    if !domain.hosts.this.shared {
        return Ok(peers::Route::Here);
    }
    let d = domain.clone();
    let id = vm_id.to_owned();
    let host = tokio::task::spawn_blocking(move || d.inventory.vm_host(&id))
        .await
        .map_err(|e| HostError::Worker(e.to_string()))??
        .ok_or_else(|| HostError::NotFound(vm_id.to_owned()))?;
    peers::route(&domain.hosts.this, vm_id, &host)
}

/// The VM, if this endpoint runs its host (always, for a single endpoint).
async fn load_own_vm(domain: &Arc<Domain>, vm_id: &str) -> Result<VmRecord, HostError> {
    let vm = load_vm(domain, vm_id).await?;
    let this = &domain.hosts.this;
    if !this.runs(&vm.host) {
        let d = domain.clone();
        let host_id = vm.host.clone();
        let host = tokio::task::spawn_blocking(move || d.inventory.domain())
            .await
            .map_err(|e| HostError::Worker(e.to_string()))??
            .hosts
            .into_iter()
            .find(|h| h.id == host_id)
            .map_or(host_id, |h| h.name);
        return Err(HostError::OtherHost {
            vm: vm_id.to_owned(),
            host,
            this: this.name.clone(),
        });
    }
    Ok(vm)
}

async fn load_vm(domain: &Arc<Domain>, vm_id: &str) -> Result<VmRecord, HostError> {
    let d = domain.clone();
    let id = vm_id.to_owned();
    tokio::task::spawn_blocking(move || d.inventory.vm(&id))
        .await
        .map_err(|e| HostError::Worker(e.to_string()))??
        .ok_or_else(|| HostError::NotFound(vm_id.to_owned()))
}

async fn set_state(domain: &Arc<Domain>, vm_id: &str, state: &'static str) -> Result<(), HostError> {
    let d = domain.clone();
    let id = vm_id.to_owned();
    tokio::task::spawn_blocking(move || d.inventory.set_power_state(&id, state))
        .await
        .map_err(|e| HostError::Worker(e.to_string()))??;
    Ok(())
}
