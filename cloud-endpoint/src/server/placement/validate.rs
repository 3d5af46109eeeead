//! Every check of a plan against the domain, touching nothing and listing every problem
//! at once, and the report of what a migration of it would create.

use gateway::plan::{CarriedRule, MigrationPlan, MigrationReport, NicMapping, ReportDisk};
use gateway::wire::RefusalCode;

use super::{disk_format, endpoint_failure, home_format, map_nics, resolve, Refusal, Resolved};
use crate::datastore::DiskFormat;
use crate::inventory::{InventoryError, Principal};
use crate::Domain;

/// `scsi0:1`, `sata0:0`, `nvme0:0`, `ide0:1`.
pub(super) fn is_disk_key(key: &str) -> bool {
    let Some((bus, unit)) = key.split_once(':') else {
        return false;
    };
    let num = |s: &str| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit());
    ["scsi", "sata", "nvme", "ide"]
        .iter()
        .any(|kind| bus.strip_prefix(kind).is_some_and(num))
        && num(unit)
}

pub(super) fn is_nic_key(key: &str) -> bool {
    key.strip_prefix("ethernet")
        .is_some_and(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A plan that passed every check, and what a migration of it would create.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Cloud network (id, name) of each NIC, in plan order.
    pub nic_networks: Vec<(String, String)>,
    /// The format of each disk, in plan order: the plan's, else its datastore's.
    pub disk_formats: Vec<DiskFormat>,
    /// The migration report as far as it is known before anything moves.
    pub preview: MigrationReport,
    pub placement: Resolved,
}

/// Checks everything about a plan against the domain, touching nothing, and lists every
/// problem at once: the role, the name, the placement (every object exists, host and pool
/// in the cluster), the hardware against the host and pool, the device keys, the network
/// mapping, the space on each datastore, the firewall rules. A choice that names nothing
/// is a problem, and the checks that depend on it go on against the default it leaves (a
/// VM too big for any host is told so beside its unknown folder). Shared by a
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
    // What the hosts cannot run, named device by device: never swapped for something
    // they can.
    problems.extend(plan.hardware_problems());
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
    // Each disk takes its own datastore's format: a datastore set up for qcow2 (a KVM
    // cluster's) holds qcow2 images, whichever datastore the VM's .vmx is on.
    let disk_formats = disk_formats(domain, plan, &placement);
    let preview = preview(domain, &placement, plan, &nic_networks, &disk_formats);
    Ok(Validated {
        nic_networks,
        disk_formats,
        preview,
        placement,
    })
}

/// The format of each disk of `plan` placed so, in plan order.
pub(super) fn disk_formats(domain: &Domain, plan: &MigrationPlan, placement: &Resolved) -> Vec<DiskFormat> {
    placement
        .disk_datastores
        .iter()
        .map(|ds| disk_format(domain, plan, &ds.name))
        .collect()
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
        let used = domain.inventory.space_on(&info.id).map_err(endpoint_failure)?;
        let free = ds.free_bytes(used.used, used.reserved).map_err(endpoint_failure)?;
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
pub(super) fn preview(
    domain: &Domain,
    placement: &Resolved,
    plan: &MigrationPlan,
    nic_networks: &[(String, String)],
    disk_formats: &[DiskFormat],
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
        disk_format: home_format(domain, plan, placement).as_str().to_owned(),
        num_cpus: vm.num_cpus,
        memory_mib: vm.memory_mib,
        disks: vm
            .disks
            .iter()
            .zip(&placement.disk_datastores)
            .zip(disk_formats)
            .map(|((d, ds), format)| ReportDisk {
                key: d.key.clone(),
                capacity: d.capacity,
                datastore_id: ds.id.clone(),
                datastore_name: ds.name.clone(),
                path: None,
                format: format.as_str().to_owned(),
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
