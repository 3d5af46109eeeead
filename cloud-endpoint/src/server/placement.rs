//! The cloud domain's side of a migration, apart from the wire: checking a
//! plan against the inventory and the datastore, staging its files, and
//! turning them into a registered VM. All blocking (SQLite, argon2, fsync):
//! callers run these on tokio's blocking pool.

use std::sync::Arc;

use gateway::integrity::hex;
use gateway::plan::{CarriedRule, MigrationPlan, MigrationReport, NicMapping, ReportDisk};
use gateway::protocol::Registered;
use gateway::receipt::{Receipt, ReceiptDisk, RECEIPT_FORMAT_VERSION};
use gateway::wire::RefusalCode;

use crate::datastore::{datastore_path, DiskFile, DiskFormat, Journal, Staging, VmxDisk, VmxNic, VmxSpec};
use crate::inventory::{InventoryError, NewDisk, NewNic, NewVm, Principal};
use crate::Domain;

/// A plan that passed every check: its name is reserved, its disks exist as
/// sparse files in the staging folder.
#[derive(Debug)]
pub struct Staged {
    pub migration_id: String,
    pub staging: Staging,
    /// The format of every disk: the plan's, else the datastore's default.
    pub format: DiskFormat,
    pub disks: Vec<Arc<DiskFile>>,
    /// Which chunks are durably in `disks` (see [`Journal`]).
    pub journal: Arc<Journal>,
    /// Cloud network id of each NIC, in plan order.
    pub nic_networks: Vec<(String, String)>,
}

/// The plan as the inventory keeps it, to compare with a resuming edge's.
fn plan_bytes(plan: &MigrationPlan) -> Vec<u8> {
    gateway::wire::control::encode(plan).unwrap_or_default()
}

/// Cloud network (id, name) of each NIC, or the problems.
fn map_nics(
    domain: &Domain,
    plan: &MigrationPlan,
    problems: &mut Vec<String>,
) -> Result<Vec<(String, String)>, Refusal> {
    let networks = domain.inventory.networks().map_err(endpoint_failure)?;
    let names: Vec<&str> = networks.iter().map(|n| n.name.as_str()).collect();
    for (from, to) in &plan.network_map {
        if !names.contains(&to.as_str()) {
            problems.push(format!(
                "network mapping {from:?} -> {to:?}: the cloud domain has no network {to:?} (it has: {})",
                names.join(", ")
            ));
        }
    }
    let mut nic_networks = Vec::new();
    for nic in &plan.vm.nics {
        let target = plan.mapped_network(&nic.network);
        match networks.iter().find(|n| n.name == target) {
            Some(n) => nic_networks.push((n.id.clone(), n.name.clone())),
            None if target == nic.network => problems.push(format!(
                "NIC {} is on source network {:?}, which has no cloud network of that name; map it with --map-network \"{}=<one of: {}>\"",
                nic.key,
                nic.network,
                nic.network,
                names.join(", ")
            )),
            // Reported above with the mapping.
            None => {}
        }
    }
    Ok(nic_networks)
}

/// A refusal: the code and every problem found.
pub type Refusal = (RefusalCode, Vec<String>);

fn endpoint_failure(e: impl std::fmt::Display) -> Refusal {
    (RefusalCode::EndpointFailure, vec![e.to_string()])
}

/// `scsi0:1`, `sata0:0`, `nvme0:0`, `ide0:1`.
fn is_disk_key(key: &str) -> bool {
    let Some((bus, unit)) = key.split_once(':') else {
        return false;
    };
    let num = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    ["scsi", "sata", "nvme", "ide"]
        .iter()
        .any(|kind| bus.strip_prefix(kind).is_some_and(num))
        && num(unit)
}

fn is_nic_key(key: &str) -> bool {
    key.strip_prefix("ethernet")
        .is_some_and(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A plan that passed every check, and what a migration of it would create.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Cloud network (id, name) of each NIC, in plan order.
    pub nic_networks: Vec<(String, String)>,
    pub format: DiskFormat,
    /// The migration report as far as it is known before anything moves.
    pub preview: MigrationReport,
}

/// Checks everything about a plan against the domain, touching nothing, and lists every
/// problem at once: the role, the name, the hardware against the host, the device keys,
/// the network mapping, the space on the datastore, the firewall rules. Shared by a
/// migration (before it stages), `edge-agent plan` and `POST /api/gateway/plans`. The
/// code is NotPermitted when the role may not migrate (its problem comes first), else
/// PlanRejected.
pub fn validate(domain: &Domain, principal: &Principal, plan: &MigrationPlan) -> Result<Validated, Refusal> {
    let inv = &domain.inventory;
    let vm = &plan.vm;
    let mut problems = Vec::new();
    let permitted = principal.role.may_migrate();
    if !permitted {
        let e = InventoryError::NotPermitted {
            user: principal.user.clone(),
            role: principal.role,
        };
        problems.push(e.to_string());
    }
    let info = inv.domain().map_err(endpoint_failure)?;

    match crate::datastore::Datastore::check_vm_name(&vm.name) {
        Err(e) => problems.push(e.to_string()),
        Ok(()) => {
            if inv.vm_name_taken(&vm.name).map_err(endpoint_failure)? || domain.datastore.vm_dir_exists(&vm.name) {
                problems.push(format!(
                    "a VM named {:?} already exists in the cloud domain (or is being migrated); pass --name to choose another",
                    vm.name
                ));
            }
        }
    }
    if vm.num_cpus == 0 || vm.memory_mib == 0 {
        problems.push(format!(
            "the VM declares {} vCPUs and {} MiB of memory; both must be at least 1",
            vm.num_cpus, vm.memory_mib
        ));
    }
    // A VM cannot have more vCPUs or memory than the host it is registered on.
    if vm.num_cpus > info.host.cpu_cores {
        problems.push(format!(
            "the VM has {} vCPUs but host {} ({}) has {} CPU cores; reduce numvcpus at the source or give the host more cores",
            vm.num_cpus, info.host.name, info.host.id, info.host.cpu_cores
        ));
    }
    if vm.memory_mib > info.host.memory_mib {
        problems.push(format!(
            "the VM has {} MiB of memory but host {} ({}) has {} MiB; reduce memsize at the source or give the host more memory",
            vm.memory_mib, info.host.name, info.host.id, info.host.memory_mib
        ));
    }
    for text in [&vm.guest_os]
        .into_iter()
        .chain(vm.firmware.iter())
        .chain(vm.bios_uuid.iter())
    {
        if text.chars().any(char::is_control) || text.len() > 256 {
            problems.push(format!("VM setting {text:?} has control characters or is too long"));
        }
    }

    let mut keys = std::collections::HashSet::new();
    for d in &vm.disks {
        if !is_disk_key(&d.key) {
            problems.push(format!(
                "disk key {:?} is not a controller slot like scsi0:1, sata0:0, nvme0:0 or ide0:1",
                d.key
            ));
        } else if !keys.insert(d.key.as_str()) {
            problems.push(format!("disk key {} appears twice", d.key));
        }
    }

    for nic in &vm.nics {
        if !is_nic_key(&nic.key) || !keys.insert(nic.key.as_str()) {
            problems.push(format!("NIC key {:?} is not a unique ethernetN", nic.key));
        }
    }
    let nic_networks = map_nics(domain, plan, &mut problems)?;

    let needed = plan.logical_bytes();
    let used = inv.used_bytes().map_err(endpoint_failure)?;
    let free = domain.datastore.free_bytes(used).map_err(endpoint_failure)?;
    if needed > free {
        problems.push(format!(
            "the disks need {needed} bytes but datastore {} has {free} bytes free; free space or choose a smaller VM",
            domain.datastore.name()
        ));
    }
    firewall_problems(domain, plan, &mut problems)?;

    if !problems.is_empty() {
        let code = if permitted {
            RefusalCode::PlanRejected
        } else {
            RefusalCode::NotPermitted
        };
        return Err((code, problems));
    }
    let format = plan.disk_format.unwrap_or(domain.datastore.disk_format());
    let preview = preview(&info, plan, &nic_networks, format);
    Ok(Validated {
        nic_networks,
        format,
        preview,
    })
}

/// What a migration of `plan` creates, as far as it is known before anything moves.
fn preview(
    info: &crate::inventory::DomainInfo,
    plan: &MigrationPlan,
    nic_networks: &[(String, String)],
    format: DiskFormat,
) -> MigrationReport {
    let vm = &plan.vm;
    let folder_name = info
        .folders
        .iter()
        .find(|f| f.id == info.vm_folder)
        .map(|f| f.name.clone())
        .unwrap_or_default();
    MigrationReport {
        migration_id: None,
        vm_name: vm.name.clone(),
        vm_id: None,
        vm_path: None,
        folder_id: info.vm_folder.clone(),
        folder_name,
        datastore_id: info.datastore.id.clone(),
        datastore_name: info.datastore.name.clone(),
        host_id: info.host.id.clone(),
        host_name: info.host.name.clone(),
        disk_format: format.as_str().to_owned(),
        num_cpus: vm.num_cpus,
        memory_mib: vm.memory_mib,
        disks: vm
            .disks
            .iter()
            .map(|d| ReportDisk {
                key: d.key.clone(),
                capacity: d.capacity,
            })
            .collect(),
        logical_bytes: plan.logical_bytes(),
        zero_bytes: None,
        nics: vm
            .nics
            .iter()
            .zip(nic_networks)
            .map(|(n, (id, name))| NicMapping {
                key: n.key.clone(),
                source_network: n.network.clone(),
                network_id: id.clone(),
                network_name: name.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        rules_carried: plan
            .firewall
            .rules
            .iter()
            .map(|r| CarriedRule {
                id: r.id.clone(),
                name: r.name.clone(),
                disabled: r.disabled,
            })
            .collect(),
        not_carried: plan.firewall.not_carried.clone(),
        committed_at: None,
    }
}

/// The firewall rules' problems: their own ([`gateway::plan::FirewallSpec::problems`])
/// and references to VMs that are neither this VM nor in the cloud domain.
fn firewall_problems(domain: &Domain, plan: &MigrationPlan, problems: &mut Vec<String>) -> Result<(), Refusal> {
    let fw = &plan.firewall;
    problems.extend(fw.problems());
    let origin = if fw.origin.is_empty() {
        "firewall rules".to_owned()
    } else {
        format!("firewall rules ({})", fw.origin)
    };
    let mut unknown = std::collections::BTreeSet::new();
    for name in fw.vm_references() {
        if name == fw.source_vm || name == plan.vm.name || unknown.contains(name) {
            continue;
        }
        if domain
            .inventory
            .vm_id_by_name(name)
            .map_err(endpoint_failure)?
            .is_none()
        {
            unknown.insert(name);
        }
    }
    for name in unknown {
        problems.push(format!(
            "{origin}: VM {name:?} is neither this VM ({:?}) nor a VM of the cloud domain; migrate it first, or refer to it by its addresses",
            fw.source_vm
        ));
    }
    for id in fw.vm_id_references() {
        if !domain.inventory.vm_exists(id).map_err(endpoint_failure)? {
            problems.push(format!("{origin}: VM id {id:?} is not in the cloud domain"));
        }
    }
    Ok(())
}

/// Checks everything about a plan before a byte of disk data moves ([`validate`]), and
/// lists every problem at once. On success the VM name is reserved and the disks are
/// created in staging.
pub fn validate_and_stage(
    domain: &Domain,
    principal: &Principal,
    edge: &str,
    edge_cert: &str,
    plan: &MigrationPlan,
) -> Result<Staged, Refusal> {
    let Validated {
        nic_networks, format, ..
    } = validate(domain, principal, plan)?;
    let inv = &domain.inventory;
    let vm = &plan.vm;
    let needed = plan.logical_bytes();

    let migration_id = inv
        .begin_migration(principal, edge, &vm.name, needed)
        .map_err(|e| match e {
            InventoryError::NameTaken { .. } => (RefusalCode::PlanRejected, vec![e.to_string()]),
            other => endpoint_failure(other),
        })?;
    let staged = (|| {
        let staging = domain.datastore.stage(&migration_id, &vm.name)?;
        let mut disks = Vec::new();
        let journal = (|| {
            for (i, d) in vm.disks.iter().enumerate() {
                disks.push(staging.create_disk(i, d.capacity, format)?);
            }
            staging.journal()
        })();
        match journal {
            Ok(journal) => Ok((staging, disks, journal)),
            Err(e) => {
                let _ = staging.discard();
                Err(e)
            }
        }
    })();
    match staged {
        Ok((staging, disks, journal)) => {
            if let Err(e) = inv.set_resume_info(&migration_id, edge_cert, &plan_bytes(plan), format.as_str()) {
                let _ = staging.discard();
                let _ = inv.fail_migration(&migration_id, &e.to_string());
                return Err(endpoint_failure(e));
            }
            Ok(Staged {
                migration_id,
                staging,
                format,
                disks,
                journal: Arc::new(journal),
                nic_networks,
            })
        }
        Err(e) => {
            let e: crate::datastore::DatastoreError = e;
            let _ = inv.fail_migration(&migration_id, &e.to_string());
            Err(endpoint_failure(e))
        }
    }
}

/// A journal entry: (disk, chunk index, plaintext hash).
pub type Durable = Vec<(u16, u64, [u8; 32])>;

/// Checks that the edge of certificate `edge_cert`, as `principal`, may continue
/// `migration_id` with `plan` (the one it started with), and reopens its staged files
/// and journal. Refusals say what the edge should do instead.
pub fn resume(
    domain: &Domain,
    principal: &Principal,
    edge_cert: &str,
    migration_id: &str,
    plan: &MigrationPlan,
) -> Result<(Staged, Durable), Refusal> {
    let inv = &domain.inventory;
    let unknown = |why: String| (RefusalCode::UnknownMigration, vec![why]);
    let Some(info) = inv.resume_info(migration_id).map_err(endpoint_failure)? else {
        return Err(unknown(format!(
            "the endpoint has no migration {migration_id}; start a new migration"
        )));
    };
    match info.state.as_str() {
        "RUNNING" => {}
        "SUCCEEDED" => {
            return Err(unknown(format!(
                "migration {migration_id} already SUCCEEDED: the VM is registered as {}; its receipt is at GET /api/gateway/migrations/{migration_id}/receipt",
                info.vm.as_deref().unwrap_or("?")
            )))
        }
        state => {
            return Err(unknown(format!(
                "migration {migration_id} is {state} ({}) and its files are gone; start a new migration",
                info.error.as_deref().unwrap_or("no reason recorded")
            )))
        }
    }
    if !principal.role.may_migrate() {
        let e = InventoryError::NotPermitted {
            user: principal.user.clone(),
            role: principal.role,
        };
        return Err((RefusalCode::NotPermitted, vec![e.to_string()]));
    }
    if info.edge_cert.as_deref() != Some(edge_cert) {
        return Err((
            RefusalCode::NotPermitted,
            vec![format!(
                "migration {migration_id} belongs to another edge agent (certificate {}); only that agent can resume it",
                info.edge_cert.as_deref().unwrap_or("unknown")
            )],
        ));
    }
    if info.user != principal.user && principal.role != crate::config::Role::Administrator {
        return Err((
            RefusalCode::NotPermitted,
            vec![format!(
                "migration {migration_id} was started by {}; only that user or an Administrator can resume it",
                info.user
            )],
        ));
    }
    let Some(stored) = info.plan.as_deref() else {
        return Err(unknown(format!(
            "migration {migration_id} was started by an endpoint version that kept no resume record; abort it and start a new migration"
        )));
    };
    if stored != plan_bytes(plan).as_slice() {
        return Err((
            RefusalCode::PlanRejected,
            vec![format!(
                "the VM or the options differ from those migration {migration_id} started with; run `edge-agent abort` with the same arguments, then migrate again"
            )],
        ));
    }
    let format = match info.disk_format.as_deref().map(str::parse::<DiskFormat>) {
        Some(Ok(format)) => format,
        _ => {
            return Err(endpoint_failure(format!(
                "migration {migration_id} has no disk format recorded"
            )))
        }
    };
    let mut problems = Vec::new();
    let nic_networks = map_nics(domain, plan, &mut problems)?;
    if !problems.is_empty() {
        return Err((RefusalCode::PlanRejected, problems));
    }
    let reopened = (|| {
        let staging = domain.datastore.reopen_staging(migration_id, &plan.vm.name)?;
        let mut disks = Vec::new();
        for (i, d) in plan.vm.disks.iter().enumerate() {
            disks.push(staging.reopen_disk(i, d.capacity, format)?);
        }
        let journal = staging.journal()?;
        let durable = journal.read(plan)?;
        Ok::<_, crate::datastore::DatastoreError>((staging, disks, journal, durable))
    })();
    let (staging, disks, journal, durable) = reopened.map_err(|e| {
        (
            RefusalCode::UnknownMigration,
            vec![format!(
                "migration {migration_id} cannot be resumed: {e}; run `edge-agent abort` with the same arguments, then migrate again"
            )],
        )
    })?;
    inv.mark_resumed(migration_id).map_err(endpoint_failure)?;
    Ok((
        Staged {
            migration_id: migration_id.to_owned(),
            staging,
            format,
            disks,
            journal: Arc::new(journal),
            nic_networks,
        },
        durable,
    ))
}

/// Keeps what a migration staged for a resume: its connection ended without a commit
/// or an abort. Chunks written but not yet journaled are synced and journaled now, so
/// the edge re-sends only what never reached the disk.
pub fn suspend(domain: &Domain, staged: Staged, unsynced: &gateway::protocol::Unsynced, reason: &str) {
    if !unsynced.is_empty() {
        let synced = staged.disks.iter().try_for_each(|d| d.sync_data());
        match synced.and_then(|()| staged.journal.append(unsynced)) {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "cannot journal the last chunks; they will be sent again"),
        }
    }
    if let Err(e) = domain.inventory.mark_interrupted(&staged.migration_id) {
        tracing::error!(migration = %staged.migration_id, error = %e, "cannot record the interruption");
    }
    tracing::info!(migration = %staged.migration_id, %reason, "migration interrupted; kept for a resume");
}

/// Makes the staged VM durable and registers it: finish every disk (qcow2
/// writes its tables; all are fsynced), write the descriptors (VMDK only) and
/// the .vmx, move the folder into place, then insert the VM and its signed
/// receipt (stating `roots`, each disk's Merkle root) in one transaction. If
/// registering fails the folder is removed again, so the datastore never holds
/// a VM the inventory does not know.
pub fn finalize(
    domain: &Domain,
    plan: &MigrationPlan,
    staged: Staged,
    roots: &[[u8; 32]],
    zero_bytes: u64,
) -> Result<Registered, String> {
    let vm = &plan.vm;
    let ds = domain.datastore.name().to_owned();
    let fail = |staging: Staging, e: String| {
        let _ = staging.discard();
        let _ = domain.inventory.fail_migration(&staged.migration_id, &e);
        e
    };
    for (i, disk) in staged.disks.iter().enumerate() {
        if let Err(e) = disk.finish() {
            return Err(fail(
                staged.staging,
                format!("cannot flush disk {i} to the datastore: {e}"),
            ));
        }
    }
    let new_vm = match write_vm_files(&ds, plan, &staged) {
        Ok(new_vm) => new_vm,
        Err(e) => return Err(fail(staged.staging, e)),
    };
    if roots.len() != vm.disks.len() {
        let e = format!("{} Merkle roots for {} disks", roots.len(), vm.disks.len());
        return Err(fail(staged.staging, e));
    }
    // Signed before the commit is visible: what goes into the receipt is known
    // now, except the VM id and the commit time, which the transaction supplies.
    let receipt_disks: Vec<ReceiptDisk> = vm
        .disks
        .iter()
        .zip(&staged.disks)
        .zip(roots)
        .map(|((d, disk), root)| ReceiptDisk {
            key: d.key.clone(),
            capacity: disk.capacity(),
            chunk_size: plan.chunk_size,
            merkle_root: hex(root),
            logical_bytes: d.capacity,
        })
        .collect();
    let issue = |ctx: &crate::inventory::ReceiptContext<'_>| {
        let receipt = Receipt {
            format_version: RECEIPT_FORMAT_VERSION,
            migration_id: ctx.migration_id.to_owned(),
            vm_name: vm.name.clone(),
            vm_id: ctx.vm_id.to_owned(),
            vm_path: new_vm.vmx_path.clone(),
            disks: receipt_disks,
            planned_at: ctx.planned_at.to_owned(),
            committed_at: ctx.committed_at.to_owned(),
            endpoint: domain.endpoint_name.clone(),
            endpoint_certificate: domain.receipts.certificate_pem().to_owned(),
            endpoint_thumbprint: domain.receipts.thumbprint().to_string(),
        };
        domain
            .receipts
            .sign(receipt)
            .map(|signed| signed.to_json())
            .map_err(|e| e.to_string())
    };
    // The report is kept with the migration and sent to the edge before `Committed`.
    let info = match domain.inventory.domain() {
        Ok(info) => info,
        Err(e) => return Err(fail(staged.staging, e.to_string())),
    };
    let mut report = preview(&info, plan, &staged.nic_networks, staged.format);
    let report_json = |ctx: &crate::inventory::ReceiptContext<'_>| {
        report.migration_id = Some(ctx.migration_id.to_owned());
        report.vm_id = Some(ctx.vm_id.to_owned());
        report.vm_path = Some(new_vm.vmx_path.clone());
        report.zero_bytes = Some(zero_bytes);
        report.committed_at = Some(ctx.committed_at.to_owned());
        serde_json::to_string(&report).ok()
    };
    let migration_id = staged.migration_id.clone();
    let folder = match staged.staging.commit() {
        Ok(folder) => folder,
        Err(e) => {
            let e = e.to_string();
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            return Err(e);
        }
    };
    let registered = domain
        .inventory
        .register_vm_with_report(&migration_id, &new_vm, issue, report_json);
    match registered {
        Ok(registered) => Ok(Registered {
            vm_id: registered.vm_id,
            vm_path: new_vm.vmx_path.clone(),
            receipt: registered.receipt,
            report: Some(report),
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&folder);
            let e = format!("cannot register the VM: {e}");
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            Err(e)
        }
    }
}

/// Writes the staged VM's .vmx (and each flat VMDK's descriptor) and returns its
/// inventory record.
fn write_vm_files(ds: &str, plan: &MigrationPlan, staged: &Staged) -> Result<NewVm, String> {
    let vm = &plan.vm;
    let mut vmx_disks = Vec::new();
    let mut new_disks = Vec::new();
    for (i, (d, disk)) in vm.disks.iter().zip(&staged.disks).enumerate() {
        // The disk counts whole sectors; a partial last sector (rare: raw
        // images of odd size) was rounded up when it was created, reading zeros.
        if disk.format() == DiskFormat::VmdkFlat {
            staged
                .staging
                .write_descriptor(i, disk.capacity(), &d.key)
                .map_err(|e| e.to_string())?;
        }
        // The descriptor of a VMDK, the image itself for qcow2 and raw.
        let file_name = disk.file_name().to_owned();
        new_disks.push(NewDisk {
            key: d.key.clone(),
            path: datastore_path(ds, &vm.name, &file_name),
            capacity_bytes: d.capacity,
        });
        vmx_disks.push(VmxDisk {
            key: d.key.clone(),
            file_name,
        });
    }
    let spec = VmxSpec {
        name: vm.name.clone(),
        guest_os: vm.guest_os.clone(),
        num_cpus: vm.num_cpus,
        cores_per_socket: vm.cores_per_socket,
        memory_mib: vm.memory_mib,
        firmware: vm.firmware.clone(),
        bios_uuid: vm.bios_uuid.clone(),
        disks: vmx_disks,
        nics: vm
            .nics
            .iter()
            .zip(&staged.nic_networks)
            .map(|(n, (_, net_name))| VmxNic {
                key: n.key.clone(),
                network_name: net_name.clone(),
                virtual_dev: n.virtual_dev.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
    };
    staged.staging.write_vmx(&spec).map_err(|e| e.to_string())?;
    Ok(NewVm {
        name: vm.name.clone(),
        guest_os: vm.guest_os.clone(),
        num_cpus: vm.num_cpus,
        cores_per_socket: vm.cores_per_socket,
        memory_mib: vm.memory_mib,
        firmware: vm.firmware.clone(),
        bios_uuid: vm.bios_uuid.clone(),
        vmx_path: datastore_path(ds, &vm.name, &format!("{}.vmx", vm.name)),
        disks: new_disks,
        nics: vm
            .nics
            .iter()
            .zip(&staged.nic_networks)
            .map(|(n, (net_id, _))| NewNic {
                key: n.key.clone(),
                network_id: net_id.clone(),
                mac: n.mac.clone(),
                virtual_dev: n.virtual_dev.clone(),
                source_network: n.network.clone(),
            })
            .collect(),
        firewall: plan.firewall.clone(),
    })
}

/// Registers a live-migrated VM whose destination hypervisor runs it already from the
/// staged disks: writes its .vmx, moves the staging folder into place (open files move
/// with it) and registers it POWERED_ON with its report. On failure the files are
/// removed and the migration failed; the caller stops the hypervisor.
pub fn finalize_live(
    domain: &Domain,
    plan: &MigrationPlan,
    staged: Staged,
) -> Result<(String, MigrationReport), String> {
    let ds = domain.datastore.name().to_owned();
    let fail = |staging: Staging, e: String| {
        let _ = staging.discard();
        let _ = domain.inventory.fail_migration(&staged.migration_id, &e);
        e
    };
    let new_vm = match write_vm_files(&ds, plan, &staged) {
        Ok(new_vm) => new_vm,
        Err(e) => return Err(fail(staged.staging, e)),
    };
    let info = match domain.inventory.domain() {
        Ok(info) => info,
        Err(e) => return Err(fail(staged.staging, e.to_string())),
    };
    let mut report = preview(&info, plan, &staged.nic_networks, staged.format);
    let migration_id = staged.migration_id.clone();
    let folder = match staged.staging.commit() {
        Ok(folder) => folder,
        Err(e) => {
            let e = e.to_string();
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            return Err(e);
        }
    };
    let vm_path = new_vm.vmx_path.clone();
    let registered = domain.inventory.register_running_vm(&migration_id, &new_vm, |ctx| {
        report.migration_id = Some(ctx.migration_id.to_owned());
        report.vm_id = Some(ctx.vm_id.to_owned());
        report.vm_path = Some(vm_path.clone());
        report.committed_at = Some(ctx.committed_at.to_owned());
        serde_json::to_string(&report).ok()
    });
    match registered {
        Ok(vm_id) => Ok((vm_id, report)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&folder);
            let e = format!("cannot register the VM: {e}");
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            Err(e)
        }
    }
}

/// Fails the migrations that have waited longer than `window` for their edge, and
/// removes their staged files. Returns their ids.
pub fn expire(domain: &Domain, window: std::time::Duration) -> Vec<String> {
    let cutoff = time::OffsetDateTime::now_utc() - window;
    let ids = match domain
        .inventory
        .interrupted_before(&crate::inventory::timestamp(cutoff))
    {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!(error = %e, "cannot list interrupted migrations");
            return Vec::new();
        }
    };
    let hours = window.as_secs() / 3600;
    let mut expired = Vec::new();
    for id in ids {
        if domain.live.is_live(&id) {
            continue;
        }
        let reason = format!("not resumed within {hours} hours (resume_window_hours); its partial files were removed");
        discard_files(domain, &id, &reason);
        expired.push(id);
    }
    expired
}

/// Removes the staged files of a migration no connection serves and fails it.
pub fn discard_files(domain: &Domain, migration_id: &str, reason: &str) {
    let dir = domain.datastore.root().join(".staging").join(migration_id);
    if crate::datastore::Datastore::check_vm_name(migration_id).is_ok() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(dir = %dir.display(), error = %e, "cannot remove staging folder");
            }
        }
    }
    match domain.inventory.fail_migration(migration_id, reason) {
        Ok(()) => tracing::warn!(migration = %migration_id, %reason, "migration discarded"),
        Err(e) => tracing::error!(migration = %migration_id, error = %e, "cannot record the discarded migration"),
    }
}

/// Removes what a failed migration staged and records why it failed.
pub fn discard(domain: &Domain, staged: Staged, reason: &str) {
    let dir = staged.staging.dir().to_owned();
    if let Err(e) = staged.staging.discard() {
        tracing::error!(dir = %dir.display(), error = %e, "cannot remove staging folder; it is removed at the next start");
    }
    if let Err(e) = domain.inventory.fail_migration(&staged.migration_id, reason) {
        tracing::error!(migration = %staged.migration_id, error = %e, "cannot record the failed migration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys() {
        for ok in ["scsi0:0", "sata1:29", "nvme3:14", "ide0:1"] {
            assert!(is_disk_key(ok), "{ok}");
        }
        for bad in ["scsi0", "scsi:0", "usb0:0", "scsi0:0.fileName", "../x:0", "scsi0:a"] {
            assert!(!is_disk_key(bad), "{bad}");
        }
        assert!(is_nic_key("ethernet0") && !is_nic_key("ethernet") && !is_nic_key("eth0"));
    }
}
