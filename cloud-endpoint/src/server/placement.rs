//! The cloud domain's side of a migration, apart from the wire: checking a
//! plan against the inventory and the datastore, staging its files, and
//! turning them into a registered VM. All blocking (SQLite, argon2, fsync):
//! callers run these on tokio's blocking pool.

use std::sync::Arc;

use gateway::integrity::hex;
use gateway::plan::MigrationPlan;
use gateway::protocol::Registered;
use gateway::receipt::{Receipt, ReceiptDisk, RECEIPT_FORMAT_VERSION};
use gateway::wire::RefusalCode;

use crate::datastore::{datastore_path, DiskFile, DiskFormat, Staging, VmxDisk, VmxNic, VmxSpec};
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
    /// Cloud network id of each NIC, in plan order.
    pub nic_networks: Vec<(String, String)>,
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

/// Checks everything about a plan before a byte of disk data moves, and lists
/// every problem at once. On success the VM name is reserved and the disks
/// are created in staging.
pub fn validate_and_stage(
    domain: &Domain,
    principal: &Principal,
    edge: &str,
    plan: &MigrationPlan,
) -> Result<Staged, Refusal> {
    if !principal.role.may_migrate() {
        let e = InventoryError::NotPermitted {
            user: principal.user.clone(),
            role: principal.role,
        };
        return Err((RefusalCode::NotPermitted, vec![e.to_string()]));
    }
    let inv = &domain.inventory;
    let vm = &plan.vm;
    let mut problems = Vec::new();

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

    let networks = inv.networks().map_err(endpoint_failure)?;
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
    for nic in &vm.nics {
        if !is_nic_key(&nic.key) || !keys.insert(nic.key.as_str()) {
            problems.push(format!("NIC key {:?} is not a unique ethernetN", nic.key));
        }
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

    let needed = plan.logical_bytes();
    let used = inv.used_bytes().map_err(endpoint_failure)?;
    let free = domain.datastore.free_bytes(used).map_err(endpoint_failure)?;
    if needed > free {
        problems.push(format!(
            "the disks need {needed} bytes but datastore {} has {free} bytes free; free space or choose a smaller VM",
            domain.datastore.name()
        ));
    }

    if !problems.is_empty() {
        return Err((RefusalCode::PlanRejected, problems));
    }

    let migration_id = inv
        .begin_migration(principal, edge, &vm.name, needed)
        .map_err(|e| match e {
            InventoryError::NameTaken { .. } => (RefusalCode::PlanRejected, vec![e.to_string()]),
            other => endpoint_failure(other),
        })?;
    let format = plan.disk_format.unwrap_or(domain.datastore.disk_format());
    let staged = (|| {
        let staging = domain.datastore.stage(&migration_id, &vm.name)?;
        let mut disks = Vec::new();
        for (i, d) in vm.disks.iter().enumerate() {
            match staging.create_disk(i, d.capacity, format) {
                Ok(disk) => disks.push(disk),
                Err(e) => {
                    let _ = staging.discard();
                    return Err(e);
                }
            }
        }
        Ok((staging, disks))
    })();
    match staged {
        Ok((staging, disks)) => Ok(Staged {
            migration_id,
            staging,
            format,
            disks,
            nic_networks,
        }),
        Err(e) => {
            let e: crate::datastore::DatastoreError = e;
            let _ = inv.fail_migration(&migration_id, &e.to_string());
            Err(endpoint_failure(e))
        }
    }
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
    let mut vmx_disks = Vec::new();
    let mut new_disks = Vec::new();
    for (i, (d, disk)) in vm.disks.iter().zip(&staged.disks).enumerate() {
        // The disk counts whole sectors; a partial last sector (rare: raw
        // images of odd size) was rounded up when it was created, reading zeros.
        if disk.format() == DiskFormat::VmdkFlat {
            if let Err(e) = staged.staging.write_descriptor(i, disk.capacity(), &d.key) {
                return Err(fail(staged.staging, e.to_string()));
            }
        }
        // The descriptor of a VMDK, the image itself for qcow2 and raw.
        let file_name = disk.file_name().to_owned();
        new_disks.push(NewDisk {
            key: d.key.clone(),
            path: datastore_path(&ds, &vm.name, &file_name),
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
    if let Err(e) = staged.staging.write_vmx(&spec) {
        return Err(fail(staged.staging, e.to_string()));
    }
    let new_vm = NewVm {
        name: vm.name.clone(),
        guest_os: vm.guest_os.clone(),
        num_cpus: vm.num_cpus,
        cores_per_socket: vm.cores_per_socket,
        memory_mib: vm.memory_mib,
        firmware: vm.firmware.clone(),
        bios_uuid: vm.bios_uuid.clone(),
        vmx_path: datastore_path(&ds, &vm.name, &format!("{}.vmx", vm.name)),
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
    let migration_id = staged.migration_id.clone();
    let folder = match staged.staging.commit() {
        Ok(folder) => folder,
        Err(e) => {
            let e = e.to_string();
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            return Err(e);
        }
    };
    match domain.inventory.register_vm(&migration_id, &new_vm, issue) {
        Ok(registered) => Ok(Registered {
            vm_id: registered.vm_id,
            vm_path: new_vm.vmx_path.clone(),
            receipt: registered.receipt,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&folder);
            let e = format!("cannot register the VM: {e}");
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            Err(e)
        }
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
