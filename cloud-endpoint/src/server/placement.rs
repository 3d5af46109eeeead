//! The cloud domain's side of a migration, apart from the wire: checking a
//! plan against the inventory and the datastore, staging its files, and
//! turning them into a registered VM. All blocking (SQLite, argon2, fsync):
//! callers run these on tokio's blocking pool.

use std::sync::Arc;

use gateway::plan::{CarriedRule, MigrationPlan, MigrationReport, NicMapping, ReportDisk};
use gateway::wire::RefusalCode;

use crate::datastore::{DatastoreError, DiskFile, DiskFormat, Journal, Staging};
use crate::inventory::{InventoryError, Principal};
use crate::Domain;

mod commit;
mod resolve;
pub use commit::{finalize, finalize_live, recover_commits, CRASH_AT_ENV};
pub use resolve::Resolved;

#[cfg(test)]
mod tests;

/// A plan that passed every check: its name is reserved, its disks exist as
/// sparse files in the staging folder.
#[derive(Debug)]
pub struct Staged {
    pub migration_id: String,
    /// On the VM's datastore: the disks placed there, the journal, the .vmx.
    pub staging: Staging,
    /// On each other datastore a disk was placed on (datastore name, its staging
    /// folder of this migration), in first-use order.
    pub other_staging: Vec<(String, Staging)>,
    /// Where the VM and each disk go.
    pub placement: Resolved,
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
    pub placement: Resolved,
}

/// Checks everything about a plan against the domain, touching nothing, and lists every
/// problem at once: the role, the name, the placement (every object exists, host and pool
/// in the cluster), the hardware against the host and pool, the device keys, the network
/// mapping, the space on each datastore, the firewall rules. Shared by a
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
    let placement = resolve::resolve(domain, &info, plan, &mut problems);

    match crate::datastore::Datastore::check_vm_name(&vm.name) {
        Err(e) => problems.push(e.to_string()),
        Ok(()) => {
            // Names stay unique across the whole domain, not per folder as vSphere allows:
            // the VM's folder on a datastore is named after it, and the REST API's
            // clients look VMs up by name.
            let on_disk = match &placement {
                Some(r) => r.space(plan).iter().any(|(ds, _)| {
                    domain
                        .datastore_named(&ds.name)
                        .is_some_and(|d| d.vm_dir_exists(&vm.name))
                }),
                None => domain.datastores().any(|d| d.vm_dir_exists(&vm.name)),
            };
            if inv.vm_name_taken(&vm.name).map_err(endpoint_failure)? || on_disk {
                problems.push(format!(
                    "a VM named {:?} already exists in the cloud domain (or is being migrated); VM names are unique across all folders of the domain; pass --name to choose another",
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
    if let Some(r) = &placement {
        hardware_problems(plan, r, &mut problems);
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

    if let Some(r) = &placement {
        space_problems(domain, plan, r, &mut problems)?;
    }
    firewall_problems(domain, plan, &mut problems)?;

    let placement = match placement {
        Some(placement) if problems.is_empty() => placement,
        _ => {
            let code = if permitted {
                RefusalCode::PlanRejected
            } else {
                RefusalCode::NotPermitted
            };
            return Err((code, problems));
        }
    };
    // The VM's datastore decides the format of all its disks, so one VM has one format.
    let format = plan.disk_format.unwrap_or_else(|| {
        domain
            .datastore_named(&placement.datastore.name)
            .map_or(domain.datastore.disk_format(), |d| d.disk_format())
    });
    let preview = preview(&placement, plan, &nic_networks, format);
    Ok(Validated {
        nic_networks,
        format,
        preview,
        placement,
    })
}

/// A VM cannot have more vCPUs or memory than the host it is registered on, nor than its
/// resource pool allows one VM.
fn hardware_problems(plan: &MigrationPlan, r: &Resolved, problems: &mut Vec<String>) {
    let vm = &plan.vm;
    let host = &r.host;
    if vm.num_cpus > host.cpu_cores {
        problems.push(format!(
            "the VM has {} vCPUs but host {} ({}) has {} CPU cores; reduce numvcpus at the source, choose another host (--host) or give the host more cores",
            vm.num_cpus, host.name, host.id, host.cpu_cores
        ));
    }
    if vm.memory_mib > host.memory_mib {
        problems.push(format!(
            "the VM has {} MiB of memory but host {} ({}) has {} MiB; reduce memsize at the source, choose another host (--host) or give the host more memory",
            vm.memory_mib, host.name, host.id, host.memory_mib
        ));
    }
    let pool = &r.pool;
    if let Some(limit) = pool.cpu_limit_cores.filter(|&l| vm.num_cpus > l) {
        problems.push(format!(
            "the VM has {} vCPUs but resource pool {} ({}) allows {limit} per VM; choose another pool (--resource-pool) or raise its cpu_limit_cores",
            vm.num_cpus, pool.name, pool.id
        ));
    }
    if let Some(limit) = pool.memory_limit_mib.filter(|&l| vm.memory_mib > l) {
        problems.push(format!(
            "the VM has {} MiB of memory but resource pool {} ({}) allows {limit} MiB per VM; choose another pool (--resource-pool) or raise its memory_limit_mib",
            vm.memory_mib, pool.name, pool.id
        ));
    }
}

/// Each datastore must hold the disks placed on it, next to what it holds and what
/// running migrations reserved on it.
fn space_problems(
    domain: &Domain,
    plan: &MigrationPlan,
    r: &Resolved,
    problems: &mut Vec<String>,
) -> Result<(), Refusal> {
    for (info, needed) in r.space(plan) {
        let Some(ds) = domain.datastore_named(&info.name) else {
            continue;
        };
        let used = domain.inventory.used_bytes_on(&info.id).map_err(endpoint_failure)?;
        let free = ds.free_bytes(used).map_err(endpoint_failure)?;
        if needed > free {
            let keys: Vec<&str> = plan
                .vm
                .disks
                .iter()
                .zip(&r.disk_datastores)
                .filter(|(_, d)| d.id == info.id)
                .map(|(d, _)| d.key.as_str())
                .collect();
            problems.push(format!(
                "the disks placed on datastore {} ({}) ({}) need {needed} bytes but it has {free} bytes free; free space or choose a smaller VM, or put the disks on another datastore (--datastore, --disk-datastore)",
                info.name,
                info.id,
                keys.join(", ")
            ));
        }
    }
    Ok(())
}

/// What a migration of `plan` creates, as far as it is known before anything moves.
fn preview(
    placement: &Resolved,
    plan: &MigrationPlan,
    nic_networks: &[(String, String)],
    format: DiskFormat,
) -> MigrationReport {
    let vm = &plan.vm;
    MigrationReport {
        migration_id: None,
        vm_name: vm.name.clone(),
        vm_id: None,
        vm_path: None,
        folder_id: placement.folder.id.clone(),
        folder_name: placement.folder.name.clone(),
        datastore_id: placement.datastore.id.clone(),
        datastore_name: placement.datastore.name.clone(),
        host_id: placement.host.id.clone(),
        host_name: placement.host.name.clone(),
        cluster_id: placement.cluster.id.clone(),
        cluster_name: placement.cluster.name.clone(),
        resource_pool_id: placement.pool.id.clone(),
        resource_pool_name: placement.pool.name.clone(),
        disk_format: format.as_str().to_owned(),
        num_cpus: vm.num_cpus,
        memory_mib: vm.memory_mib,
        disks: vm
            .disks
            .iter()
            .zip(&placement.disk_datastores)
            .map(|(d, ds)| ReportDisk {
                key: d.key.clone(),
                capacity: d.capacity,
                datastore_id: ds.id.clone(),
                datastore_name: ds.name.clone(),
                path: None,
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
/// lists every problem at once. On success the VM name is reserved, the space on each
/// datastore too, and the disks are created in staging on their datastores.
pub fn validate_and_stage(
    domain: &Domain,
    principal: &Principal,
    edge: &str,
    edge_cert: &str,
    plan: &MigrationPlan,
) -> Result<Staged, Refusal> {
    let Validated {
        nic_networks,
        format,
        placement,
        ..
    } = validate(domain, principal, plan)?;
    let inv = &domain.inventory;
    let vm = &plan.vm;
    let needed = plan.logical_bytes();
    let space: Vec<(String, u64)> = placement
        .space(plan)
        .into_iter()
        .map(|(ds, bytes)| (ds.id.clone(), bytes))
        .collect();

    let migration_id = inv
        .begin_migration_on(principal, edge, &vm.name, needed, &space)
        .map_err(|e| match e {
            InventoryError::NameTaken { .. } => (RefusalCode::PlanRejected, vec![e.to_string()]),
            other => endpoint_failure(other),
        })?;
    let staged = (|| {
        let (staging, other_staging) = open_stagings(domain, &migration_id, &vm.name, &placement, true)?;
        let mut disks = Vec::new();
        let journal = (|| {
            for (i, d) in vm.disks.iter().enumerate() {
                let at = disk_staging(&staging, &other_staging, &placement, i);
                disks.push(at.create_disk(i, d.capacity, format)?);
            }
            staging.journal()
        })();
        match journal {
            Ok(journal) => Ok((staging, other_staging, disks, journal)),
            Err(e) => {
                discard_stagings(staging, other_staging);
                Err(e)
            }
        }
    })();
    match staged {
        Ok((staging, other_staging, disks, journal)) => {
            if let Err(e) = inv.set_resume_info(&migration_id, edge_cert, &plan_bytes(plan), format.as_str()) {
                discard_stagings(staging, other_staging);
                let _ = inv.fail_migration(&migration_id, &e.to_string());
                return Err(endpoint_failure(e));
            }
            Ok(Staged {
                migration_id,
                staging,
                other_staging,
                placement,
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

/// The datastore of that name among this endpoint's folders.
fn datastore_of<'a>(domain: &'a Domain, name: &str) -> Result<&'a crate::datastore::Datastore, DatastoreError> {
    domain.datastore_named(name).ok_or_else(|| DatastoreError::Io {
        action: "find the folder of datastore",
        path: name.into(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

/// The staging folders of a migration: on the VM's datastore and on each other datastore
/// a disk goes to; created fresh (`create`) or reopened for a resume. On failure none
/// that this call created is left.
fn open_stagings(
    domain: &Domain,
    migration_id: &str,
    vm_name: &str,
    placement: &Resolved,
    create: bool,
) -> Result<(Staging, Vec<(String, Staging)>), DatastoreError> {
    let open = |name: &str| {
        let ds = datastore_of(domain, name)?;
        if create {
            ds.stage(migration_id, vm_name)
        } else {
            ds.reopen_staging(migration_id, vm_name)
        }
    };
    let home = open(&placement.datastore.name)?;
    let mut others = Vec::new();
    for ds in placement.other_datastores() {
        match open(&ds.name) {
            Ok(staging) => others.push((ds.name.clone(), staging)),
            Err(e) => {
                if create {
                    discard_stagings(home, others);
                }
                return Err(e);
            }
        }
    }
    Ok((home, others))
}

/// The staging folder disk `index` lives in.
fn disk_staging<'a>(
    home: &'a Staging,
    others: &'a [(String, Staging)],
    placement: &Resolved,
    index: usize,
) -> &'a Staging {
    let name = placement
        .disk_datastores
        .get(index)
        .map_or(placement.datastore.name.as_str(), |d| d.name.as_str());
    others
        .iter()
        .find(|(ds, _)| ds == name)
        .map_or(home, |(_, staging)| staging)
}

fn discard_stagings(home: Staging, others: Vec<(String, Staging)>) {
    for staging in std::iter::once(home).chain(others.into_iter().map(|(_, s)| s)) {
        let dir = staging.dir().to_owned();
        if let Err(e) = staging.discard() {
            tracing::error!(dir = %dir.display(), error = %e, "cannot remove staging folder; it is removed at the next start");
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
    // The same plan resolves to the same objects, unless the domain lost one since.
    let domain_info = inv.domain().map_err(endpoint_failure)?;
    let placement = resolve::resolve(domain, &domain_info, plan, &mut problems);
    let Some(placement) = placement.filter(|_| problems.is_empty()) else {
        return Err((RefusalCode::PlanRejected, problems));
    };
    let reopened = (|| {
        let (staging, other_staging) = open_stagings(domain, migration_id, &plan.vm.name, &placement, false)?;
        let mut disks = Vec::new();
        for (i, d) in plan.vm.disks.iter().enumerate() {
            let at = disk_staging(&staging, &other_staging, &placement, i);
            disks.push(at.reopen_disk(i, d.capacity, format)?);
        }
        let journal = staging.journal()?;
        let durable = journal.read(plan)?;
        Ok::<_, DatastoreError>((staging, other_staging, disks, journal, durable))
    })();
    let (staging, other_staging, disks, journal, durable) = reopened.map_err(|e| {
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
            other_staging,
            placement,
            format,
            disks,
            journal: Arc::new(journal),
            nic_networks,
        },
        durable,
    ))
}

/// What a migration whose VM is already registered answers a resume with (see
/// [`committed_replay`]).
#[derive(Debug)]
pub struct CommittedReplay {
    pub roots: Vec<[u8; 32]>,
    pub registered: gateway::protocol::Registered,
}

/// A resume of a SUCCEEDED migration by the edge that ran it, as a user who may resume
/// it, with the same plan: the edge missed the commit (its link broke, or the endpoint
/// stopped, after the VM was registered). It gets the registered roots, report and
/// receipt to replay the commit; `None` for any other migration, which
/// [`resume`] checks (and refuses) as before.
pub fn committed_replay(
    domain: &Domain,
    principal: &Principal,
    edge_cert: &str,
    migration_id: &str,
    plan: &MigrationPlan,
) -> Result<Option<CommittedReplay>, Refusal> {
    let inv = &domain.inventory;
    let Some(info) = inv.resume_info(migration_id).map_err(endpoint_failure)? else {
        return Ok(None);
    };
    if info.state != "SUCCEEDED"
        || info.edge_cert.as_deref() != Some(edge_cert)
        || !principal.role.may_migrate()
        || (info.user != principal.user && principal.role != crate::config::Role::Administrator)
        || info.plan.as_deref() != Some(plan_bytes(plan).as_slice())
    {
        return Ok(None);
    }
    let (Some(receipt), Some(vm_id)) = (inv.receipt(migration_id).map_err(endpoint_failure)?, info.vm) else {
        return Ok(None);
    };
    let signed = gateway::receipt::SignedReceipt::from_json(&receipt).map_err(endpoint_failure)?;
    let roots = signed
        .receipt
        .disks
        .iter()
        .map(|d| {
            let bytes: Option<Vec<u8>> = (0..d.merkle_root.len())
                .step_by(2)
                .map(|i| d.merkle_root.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .collect();
            bytes.and_then(|b| <[u8; 32]>::try_from(b).ok())
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            endpoint_failure(format!(
                "the stored receipt of {migration_id} has an unreadable Merkle root"
            ))
        })?;
    let report = inv
        .migration_report(migration_id)
        .map_err(endpoint_failure)?
        .and_then(|json| serde_json::from_str(&json).ok());
    Ok(Some(CommittedReplay {
        roots,
        registered: gateway::protocol::Registered {
            vm_id,
            vm_path: signed.receipt.vm_path.clone(),
            receipt,
            report,
        },
    }))
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

/// Removes the staged files of a migration no connection serves and fails it. Its
/// disks may be staged on any datastore, so every one is looked at.
pub fn discard_files(domain: &Domain, migration_id: &str, reason: &str) {
    if crate::datastore::Datastore::check_vm_name(migration_id).is_ok() {
        for ds in domain.datastores() {
            let dir = ds.root().join(".staging").join(migration_id);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot remove staging folder");
                }
            }
        }
    }
    match domain.inventory.fail_migration(migration_id, reason) {
        Ok(()) => tracing::warn!(migration = %migration_id, %reason, "migration discarded"),
        Err(e) => tracing::error!(migration = %migration_id, error = %e, "cannot record the discarded migration"),
    }
}

/// Removes what a failed migration staged, on every datastore, and records why it failed.
pub fn discard(domain: &Domain, staged: Staged, reason: &str) {
    discard_stagings(staged.staging, staged.other_staging);
    if let Err(e) = domain.inventory.fail_migration(&staged.migration_id, reason) {
        tracing::error!(migration = %staged.migration_id, error = %e, "cannot record the failed migration");
    }
}
