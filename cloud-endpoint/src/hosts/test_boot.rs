//! Test boots of replicas: a disposable copy of a replication's replica runs on the host
//! while the syncs go on, to check that the VM will boot in the cloud before the
//! switchover (docs/replication.md).
//!
//! The copy is taken between passes, point in time: the replica is held still while its
//! disks are copied (`cp --reflink=auto --sparse=always`: a reflink on file systems that
//! share blocks, XFS and Btrfs, so the copy is instant and takes no space until the guest
//! writes; a sparse copy elsewhere). A pass that starts meanwhile is told to retry in a
//! few seconds; one that runs refuses the test boot. The copy never shares a file with
//! the replica, so the next passes write the replica as before and the guest's writes
//! stay in the copy. It runs on an isolated network (QEMU's restricted user network: the
//! guest reaches nothing outside), its console is read through the API, and discarding it
//! removes its folder. A switchover or an abort of the replication discards it too, and
//! an endpoint start removes what a crashed one left.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway::qemu::{QemuBinary, QemuProcess};
use serde::Serialize;

use super::{machine_spec, HostError, MemoryReservation, VmFiles, STOP_GRACE};
use crate::datastore::DiskFormat;
use crate::inventory::{DiskRecord, NicRecord, VmRecord};
use crate::server::placement::{self, ReplicaFiles};
use crate::Domain;

/// The folder under the default datastore that holds the test boots, one folder each.
pub const TEST_BOOT_FOLDER: &str = ".testboot";

/// The file in a test boot's folder naming the host (`domain.host.name`) that runs it.
const HOST_MARKER: &str = "host";

/// What the API shows of a test boot.
#[derive(Debug, Clone, Serialize)]
pub struct TestBootInfo {
    pub migration: String,
    pub vm_name: String,
    /// `running`, or `stopped` once the guest powered itself off or QEMU ended.
    pub state: &'static str,
    /// RFC 3339, UTC.
    pub started: String,
    /// The passes the copy holds, and when the last of them ended: the copy is the
    /// source as it was read then.
    pub replica_syncs: u64,
    pub replica_last_sync: String,
    /// Bytes the copy took on the datastore when it started (0 with reflinks).
    pub copied_bytes: u64,
    /// Where to read the guest's serial console.
    pub console: String,
}

/// A test boot the host runs.
#[derive(Debug)]
pub(super) struct TestBoot {
    info: TestBootInfo,
    process: Arc<QemuProcess>,
    files: VmFiles,
    _memory: MemoryReservation,
}

impl TestBoot {
    fn info(&self) -> TestBootInfo {
        let state = match self.process.exit_status() {
            None => "running",
            Some(_) => "stopped",
        };
        TestBootInfo {
            state,
            ..self.info.clone()
        }
    }
}

/// The folder of `vm_name`'s test boot. VM names are reserved across the domain by
/// their replication, so one folder per name serves.
fn folder(domain: &Domain, vm_name: &str) -> PathBuf {
    domain.datastore.root().join(TEST_BOOT_FOLDER).join(vm_name)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HostError + '_ {
    move |source| HostError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The copy's file for disk `index`: QEMU opens a VMDK's flat extent as raw data.
fn copy_name(index: usize, format: DiskFormat) -> String {
    match format {
        DiskFormat::Qcow2 => format!("disk{index}.qcow2"),
        DiskFormat::VmdkFlat | DiskFormat::Raw => format!("disk{index}.img"),
    }
}

/// Copies `from` to `to`, sharing blocks where the file system can, skipping holes
/// elsewhere.
fn copy_disk(from: &Path, to: &Path) -> Result<(), HostError> {
    let out = std::process::Command::new("cp")
        .args(["--reflink=auto", "--sparse=always", "--"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(io_err(to))?;
    if !out.status.success() {
        return Err(HostError::Disk {
            path: from.display().to_string(),
            reason: format!(
                "it cannot be copied for the test boot: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Bytes a folder's files take on disk.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The replica's VM as a record the host's machine builder takes, its disks the copies
/// in `dir` (given by datastore path, as the inventory gives a VM's).
fn copy_record(domain: &Domain, migration_id: &str, replica: &ReplicaFiles) -> VmRecord {
    let vm = &replica.plan.vm;
    let ds = domain.datastore.name();
    let at = |file: &str| format!("[{ds}] {TEST_BOOT_FOLDER}/{}/{file}", vm.name);
    VmRecord {
        id: format!("test-boot-of-{migration_id}"),
        name: vm.name.clone(),
        guest_os: vm.guest_os.clone(),
        num_cpus: vm.num_cpus,
        cores_per_socket: vm.cores_per_socket,
        memory_mib: vm.memory_mib,
        firmware: vm.firmware.clone(),
        bios_uuid: vm.bios_uuid.clone(),
        power_state: super::POWERED_OFF.to_owned(),
        host: String::new(),
        datastore: String::new(),
        folder: String::new(),
        resource_pool: String::new(),
        vmx_path: at(&format!("{}.vmx", vm.name)),
        disks: vm
            .disks
            .iter()
            .zip(&replica.disks)
            .enumerate()
            .map(|(i, (d, (_, format)))| DiskRecord {
                key: d.key.clone(),
                path: at(&copy_name(i, *format)),
                capacity_bytes: d.capacity,
                datastore: String::new(),
            })
            .collect(),
        controllers: vm.controllers.clone(),
        nics: vm
            .nics
            .iter()
            .map(|n| NicRecord {
                key: n.key.clone(),
                network: String::new(),
                network_name: n.network.clone(),
                mac: n.mac.clone(),
                virtual_dev: n.virtual_dev.clone(),
                address_type: n.address_type.clone(),
                source_network: n.network.clone(),
            })
            .collect(),
        migration: Some(migration_id.to_owned()),
        created: crate::inventory::timestamp(time::OffsetDateTime::now_utc()),
        instance_uuid: String::new(),
    }
}

/// The copy, its record, its files and the memory held for it: everything a test boot
/// needs before QEMU starts. Blocking (file copies, SQLite); the replica is held still
/// while its disks are copied.
fn prepare(
    domain: &Domain,
    migration_id: &str,
) -> Result<(ReplicaFiles, VmRecord, VmFiles, MemoryReservation, u64), HostError> {
    let refused = |reason: String| HostError::TestBoot {
        migration: migration_id.to_owned(),
        reason,
    };
    let hold = domain.live.begin_copy(migration_id).map_err(refused)?;
    let replica = placement::replica_files(domain, migration_id).map_err(refused)?;
    let vm = &replica.plan.vm;
    let memory = domain.hosts.reserve(vm.memory_mib).map_err(refused)?;
    let dir = folder(domain, &vm.name);
    let parent = dir.parent().expect("a folder under the datastore");
    {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        // QEMU's own user passes through to its folder, as through a datastore's.
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711)).map_err(io_err(parent))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        // The datastore may be shared: a later start cleans its own host's test boots only.
        let marker = dir.join(HOST_MARKER);
        std::fs::write(&marker, &domain.hosts.this().name).map_err(io_err(&marker))?;
    }
    let copied = replica
        .disks
        .iter()
        .enumerate()
        .try_for_each(|(i, (from, format))| copy_disk(from, &dir.join(copy_name(i, *format))));
    drop(hold);
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    let record = copy_record(domain, migration_id, &replica);
    let file = |name: &str| dir.join(name);
    let files = VmFiles {
        qmp_socket: file("qmp"),
        pid_file: file("pid"),
        console_log: file("console.log"),
        qemu_log: file("qemu.log"),
        efi_vars: file("ovmf-vars.fd"),
        folder: dir.clone(),
    };
    let copied_bytes = allocated_bytes(&dir);
    Ok((replica, record, files, memory, copied_bytes))
}

impl super::Hosts {
    /// Starts a test boot of replication `migration_id`'s replica (see the module).
    /// Refused while one runs for it already, while a pass writes the replica, and when
    /// the host's memory would not hold it.
    pub async fn start_test_boot(domain: &Arc<Domain>, migration_id: &str) -> Result<TestBootInfo, HostError> {
        let mut boots = domain.hosts.test_boots.lock().await;
        if let Some(boot) = boots.get(migration_id) {
            return Err(HostError::TestBoot {
                migration: migration_id.to_owned(),
                reason: format!(
                    "a test boot of it runs already (started {}); discard it first (DELETE \
                     /api/gateway/migrations/{migration_id}/test-boot)",
                    boot.info.started
                ),
            });
        }
        let (d, id) = (domain.clone(), migration_id.to_owned());
        let (replica, record, files, memory, copied_bytes) = tokio::task::spawn_blocking(move || prepare(&d, &id))
            .await
            .map_err(|e| HostError::Worker(e.to_string()))??;
        let started = async {
            let spec = machine_spec(domain, &record, &files)?;
            let binary = QemuBinary::from_env()?;
            let confinement = domain.hosts.confine(&[files.folder.as_path()], &[])?;
            let process = QemuProcess::spawn_confined(&binary, &spec, &files.qemu_log, &confinement).await?;
            std::fs::write(&files.pid_file, format!("{}\n", process.pid())).map_err(io_err(&files.pid_file))?;
            Ok::<_, HostError>(process)
        };
        let process = match started.await {
            Ok(process) => Arc::new(process),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&files.folder);
                return Err(e);
            }
        };
        let info = TestBootInfo {
            migration: migration_id.to_owned(),
            vm_name: replica.plan.vm.name.clone(),
            state: "running",
            started: crate::inventory::timestamp(time::OffsetDateTime::now_utc()),
            replica_syncs: replica.syncs,
            replica_last_sync: replica.last_sync,
            copied_bytes,
            console: format!("/api/gateway/migrations/{migration_id}/test-boot/console"),
        };
        tracing::info!(migration = %migration_id, vm = ?info.vm_name, pid = process.pid(), syncs = info.replica_syncs, "test boot started");
        boots.insert(
            migration_id.to_owned(),
            TestBoot {
                info: info.clone(),
                process,
                files,
                _memory: memory,
            },
        );
        Ok(info)
    }

    /// The test boot of `migration_id`, if one was started and not discarded.
    pub async fn test_boot(&self, migration_id: &str) -> Option<TestBootInfo> {
        self.test_boots.lock().await.get(migration_id).map(TestBoot::info)
    }

    /// The guest console's file of `migration_id`'s test boot.
    pub async fn test_boot_console(&self, migration_id: &str) -> Option<PathBuf> {
        let boots = self.test_boots.lock().await;
        boots.get(migration_id).map(|b| b.files.console_log.clone())
    }

    /// Stops `migration_id`'s test boot and removes its copy. False if none ran.
    pub async fn discard_test_boot(&self, migration_id: &str) -> Result<bool, HostError> {
        let Some(boot) = self.test_boots.lock().await.remove(migration_id) else {
            return Ok(false);
        };
        let stopped = boot.process.stop(STOP_GRACE).await;
        std::fs::remove_dir_all(&boot.files.folder).map_err(io_err(&boot.files.folder))?;
        let how = stopped?;
        tracing::info!(migration = %migration_id, ended = %how, "test boot discarded");
        Ok(true)
    }

    /// Discards every test boot (the endpoint stops: nobody would discard them after).
    pub async fn discard_test_boots(&self) {
        let ids: Vec<String> = self.test_boots.lock().await.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.discard_test_boot(&id).await {
                tracing::warn!(migration = %id, error = %e, "cannot discard a test boot");
            }
        }
    }
}

/// Removes the test boots a stopped or crashed endpoint left: their QEMU (found by the
/// pid file and QMP socket in their folder, so never another process) and their copy.
///
/// When other endpoints share the datastore, only this host's: another endpoint's test
/// boot runs on, and one without a marker (being prepared, or left by an older build)
/// cannot be told apart from it.
pub async fn remove_leftovers(domain: &Domain) {
    let root = domain.datastore.root().join(TEST_BOOT_FOLDER);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    let this = domain.hosts.this();
    for entry in entries.flatten() {
        let dir = entry.path();
        if this.shared {
            let host = std::fs::read_to_string(dir.join(HOST_MARKER)).ok();
            if host.as_deref().map(str::trim) != Some(this.name.as_str()) {
                tracing::debug!(folder = %dir.display(), host = ?host, "a test boot of another host: left to its endpoint");
                continue;
            }
        }
        let pid = std::fs::read_to_string(dir.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            if let Ok(process) = QemuProcess::attach(pid, &dir.join("qmp")).await {
                let _ = process.stop(STOP_GRACE).await;
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(folder = %dir.display(), "removed a test boot left by an earlier run"),
            Err(e) => {
                tracing::warn!(folder = %dir.display(), error = %e, "cannot remove a test boot left by an earlier run")
            }
        }
    }
}
