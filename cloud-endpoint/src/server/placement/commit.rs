//! Turning a staged migration into a registered VM, on one datastore or several.

use std::path::PathBuf;
use std::sync::Arc;

use gateway::integrity::hex;
use gateway::plan::MigrationPlan;
use gateway::protocol::Registered;
use gateway::receipt::{Receipt, ReceiptDisk, RECEIPT_FORMAT_VERSION};

use super::validate::preview;
use super::{datastore_of, discard_stagings, disk_staging, Resolved, Staged};
use crate::datastore::{datastore_path, DiskFile, DiskFormat, Staging, VmxDisk, VmxNic, VmxSpec};
use crate::inventory::{NewDisk, NewNic, NewVm, VmPlacement};
use crate::Domain;

/// Makes the staged VM durable and registers it: finish every disk (qcow2 writes its
/// tables; all are fsynced), write the descriptors (VMDK only, beside their extents) and
/// the .vmx (on the VM's datastore), move each staging folder into place (the other
/// datastores' first, the VM's home folder last), then insert the VM and its signed
/// receipt (stating `roots`, each disk's Merkle root) in one transaction. If any step
/// fails, every folder it made is removed again, so no datastore holds files of a VM the
/// inventory does not know.
pub fn finalize(
    domain: &Domain,
    plan: &MigrationPlan,
    staged: Staged,
    roots: &[[u8; 32]],
    zero_bytes: u64,
) -> Result<Registered, String> {
    let vm = &plan.vm;
    let Staged {
        migration_id,
        staging,
        other_staging,
        placement,
        disk_formats,
        disks,
        nic_networks,
        ..
    } = staged;
    let fail = |staging: Staging, others: Vec<(String, Staging)>, e: String| {
        discard_stagings(staging, others);
        let _ = domain.inventory.fail_migration(&migration_id, &e);
        e
    };
    for (i, disk) in disks.iter().enumerate() {
        if let Err(e) = disk.finish() {
            return Err(fail(
                staging,
                other_staging,
                format!("cannot flush disk {i} to the datastore: {e}"),
            ));
        }
    }
    let new_vm = match write_vm_files(
        domain,
        plan,
        &staging,
        &other_staging,
        &placement,
        &disks,
        &nic_networks,
    ) {
        Ok(new_vm) => new_vm,
        Err(e) => return Err(fail(staging, other_staging, e)),
    };
    if roots.len() != vm.disks.len() {
        let e = format!("{} Merkle roots for {} disks", roots.len(), vm.disks.len());
        return Err(fail(staging, other_staging, e));
    }
    // Signed before the commit is visible: what goes into the receipt is known
    // now, except the VM id and the commit time, which the transaction supplies.
    let receipt_disks: Vec<ReceiptDisk> = vm
        .disks
        .iter()
        .zip(&disks)
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
    let mut report = preview(domain, &placement, plan, &nic_networks, &disk_formats);
    for (r, d) in report.disks.iter_mut().zip(&new_vm.disks) {
        r.path = Some(d.path.clone());
    }
    let report_json = |ctx: &crate::inventory::ReceiptContext<'_>| {
        report.migration_id = Some(ctx.migration_id.to_owned());
        report.vm_id = Some(ctx.vm_id.to_owned());
        report.vm_path = Some(new_vm.vmx_path.clone());
        report.zero_bytes = Some(zero_bytes);
        report.committed_at = Some(ctx.committed_at.to_owned());
        serde_json::to_string(&report).ok()
    };
    let folders = match commit_all(staging, other_staging) {
        Ok(folders) => folders,
        Err(e) => {
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
            remove_folders(&folders);
            let e = format!("cannot register the VM: {e}");
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            Err(e)
        }
    }
}

/// Writes the descriptors (VMDK only, beside their extents) and the .vmx (on the VM's
/// datastore) of a staged VM, and returns its inventory record.
fn write_vm_files(
    domain: &Domain,
    plan: &MigrationPlan,
    staging: &Staging,
    other_staging: &[(String, Staging)],
    placement: &Resolved,
    disks: &[Arc<DiskFile>],
    nic_networks: &[(String, String)],
) -> Result<NewVm, String> {
    let vm = &plan.vm;
    let home_ds = placement.datastore.name.clone();
    let mut vmx_disks = Vec::new();
    let mut new_disks = Vec::new();
    for (i, (d, disk)) in vm.disks.iter().zip(disks).enumerate() {
        let at = disk_staging(staging, other_staging, placement, i);
        // The disk counts whole sectors; a partial last sector (rare: raw
        // images of odd size) was rounded up when it was created, reading zeros.
        if disk.format() == DiskFormat::VmdkFlat {
            if let Err(e) = at.write_descriptor(i, disk.capacity(), &d.key) {
                return Err(e.to_string());
            }
        }
        // The descriptor of a VMDK, the image itself for qcow2 and raw.
        let file_name = disk.file_name().to_owned();
        let ds = &placement.disk_datastores[i];
        // A disk beside the .vmx is named by its file name; one on another datastore
        // by its absolute path, as vSphere's .vmx names disks on other datastores
        // (`/vmfs/volumes/<datastore>/<vm>/<file>`): here, the datastore's folder.
        let vmx_name = if ds.id == placement.datastore.id {
            file_name.clone()
        } else {
            let absolute = datastore_of(domain, &ds.name)
                .map(|d| d.root().join(&vm.name).join(&file_name))
                .and_then(|p| {
                    std::path::absolute(&p).map_err(|source| crate::datastore::DatastoreError::Io {
                        action: "resolve the path of",
                        path: p,
                        source,
                    })
                });
            match absolute {
                Ok(path) => path.to_string_lossy().into_owned(),
                Err(e) => return Err(e.to_string()),
            }
        };
        new_disks.push(NewDisk {
            key: d.key.clone(),
            path: datastore_path(&ds.name, &vm.name, &file_name),
            capacity_bytes: d.capacity,
            datastore: Some(ds.id.clone()),
        });
        vmx_disks.push(VmxDisk {
            key: d.key.clone(),
            file_name: vmx_name,
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
            .zip(nic_networks)
            .map(|(n, (_, net_name))| VmxNic {
                key: n.key.clone(),
                network_name: net_name.clone(),
                virtual_dev: n.virtual_dev.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
    };
    staging.write_vmx(&spec).map_err(|e| e.to_string())?;
    Ok(NewVm {
        name: vm.name.clone(),
        guest_os: vm.guest_os.clone(),
        num_cpus: vm.num_cpus,
        cores_per_socket: vm.cores_per_socket,
        memory_mib: vm.memory_mib,
        firmware: vm.firmware.clone(),
        bios_uuid: vm.bios_uuid.clone(),
        vmx_path: datastore_path(&home_ds, &vm.name, &format!("{}.vmx", vm.name)),
        disks: new_disks,
        nics: vm
            .nics
            .iter()
            .zip(nic_networks)
            .map(|(n, (net_id, _))| NewNic {
                key: n.key.clone(),
                network_id: net_id.clone(),
                mac: n.mac.clone(),
                virtual_dev: n.virtual_dev.clone(),
                source_network: n.network.clone(),
            })
            .collect(),
        firewall: plan.firewall.clone(),
        placement: VmPlacement {
            host: Some(placement.host.id.clone()),
            datastore: Some(placement.datastore.id.clone()),
            folder: Some(placement.folder.id.clone()),
            resource_pool: Some(placement.pool.id.clone()),
        },
    })
}

/// Registers a live-migrated VM whose destination hypervisor already runs it from the
/// staged disks: writes its .vmx, moves the staging folders into place (open files move
/// with them) and registers it POWERED_ON with its report, without a receipt (its disks
/// changed while they moved). On failure every folder is removed and the migration
/// failed; the caller stops the hypervisor.
pub fn finalize_live(
    domain: &Domain,
    plan: &MigrationPlan,
    staged: Staged,
) -> Result<(String, gateway::plan::MigrationReport), String> {
    let Staged {
        migration_id,
        staging,
        other_staging,
        placement,
        disk_formats,
        disks,
        nic_networks,
        ..
    } = staged;
    let new_vm = match write_vm_files(
        domain,
        plan,
        &staging,
        &other_staging,
        &placement,
        &disks,
        &nic_networks,
    ) {
        Ok(new_vm) => new_vm,
        Err(e) => {
            discard_stagings(staging, other_staging);
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            return Err(e);
        }
    };
    let mut report = preview(domain, &placement, plan, &nic_networks, &disk_formats);
    for (r, d) in report.disks.iter_mut().zip(&new_vm.disks) {
        r.path = Some(d.path.clone());
    }
    let folders = match commit_all(staging, other_staging) {
        Ok(folders) => folders,
        Err(e) => {
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
            remove_folders(&folders);
            let e = format!("cannot register the VM: {e}");
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            Err(e)
        }
    }
}

/// Moves every staging folder into place, the other datastores' first: the VM's home
/// folder (with the .vmx) appears last, so a VM folder with a .vmx never names a disk
/// that is not in place. If one move fails, the folders already moved and the staging
/// folders not yet moved are removed.
fn commit_all(home: Staging, others: Vec<(String, Staging)>) -> Result<Vec<PathBuf>, String> {
    let mut done = Vec::new();
    let mut pending: Vec<Staging> = others.into_iter().map(|(_, s)| s).collect();
    pending.push(home);
    let mut pending = pending.into_iter();
    while let Some(staging) = pending.next() {
        let dir = staging.dir().to_owned();
        match staging.commit() {
            Ok(folder) => done.push(folder),
            Err(e) => {
                remove_folders(&done);
                remove_folders(&[dir]);
                for rest in pending {
                    let _ = rest.discard();
                }
                return Err(e.to_string());
            }
        }
    }
    Ok(done)
}

fn remove_folders(folders: &[PathBuf]) {
    for folder in folders {
        if let Err(e) = std::fs::remove_dir_all(folder) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(dir = %folder.display(), error = %e, "cannot remove the folder of a VM that was not registered");
            }
        }
    }
}
