//! Turning a staged migration into a registered VM, on one datastore or several, in a
//! sequence a crash can cut anywhere:
//!
//! ```text
//! 1 finish and fsync the disks, write descriptors and the .vmx, mark each folder
//! 2 record in the inventory which folders move where          (crash: moved back)
//! 3 rename each staging folder into place, the VM's home last  (crash: moved back)
//! 4 register the VM with its receipt, in one transaction      (crash: finished)
//! 5 remove the journal and the marks, clear the record        (crash: finished)
//! ```
//!
//! Until step 4 the journal moves with the folders, so a restart that undoes the commit
//! ([`recover_commits`]) leaves a migration its edge resumes with nothing to re-send;
//! after it, the restart only tidies up, and a resuming edge gets its receipt.

use std::path::PathBuf;
use std::sync::Arc;

use gateway::integrity::hex;
use gateway::plan::MigrationPlan;
use gateway::protocol::Registered;
use gateway::receipt::{Receipt, ReceiptDisk, RECEIPT_FORMAT_VERSION};

use super::validate::preview;
use super::{datastore_of, discard_stagings, disk_staging, Resolved, Staged};
use crate::datastore::{datastore_path, DiskFile, DiskFormat, Staging, VmxDisk, VmxNic, VmxSpec};
use crate::inventory::{CommitMove, Inventory, NewDisk, NewNic, NewVm, VmPlacement};
use crate::Domain;

/// Test hook: the endpoint aborts (as a `kill -9` would end it) when it reaches the
/// commit step this variable names (`disks-finished`, `moves-recorded`, `moved-1`, ...,
/// `registered`, `leftovers-removed`), so tests can check that a restart recovers from
/// a crash at every step. Unset in production.
pub const CRASH_AT_ENV: &str = "CLOUD_ENDPOINT_TEST_CRASH_AT";

fn crash_point(step: &str) {
    if std::env::var(CRASH_AT_ENV).is_ok_and(|at| at == step) {
        eprintln!("{CRASH_AT_ENV}={step}: aborting the endpoint at this commit step");
        std::process::abort();
    }
}

/// Makes the staged VM durable and registers it: finish every disk (qcow2 writes its
/// tables; all are fsynced), write the descriptors (VMDK only, beside their extents) and
/// the .vmx (on the VM's datastore), move each staging folder into place (the other
/// datastores' first, the VM's home folder last), then insert the VM and its signed
/// receipt (stating `roots`, each disk's Merkle root) in one transaction. If any step
/// fails, every folder it made is removed again, so no datastore holds files of a VM the
/// inventory does not know. A `reversible` commit (a switchover awaiting confirmation)
/// keeps each folder's journal and mark: a rollback turns the folders back into the
/// replica and compares the disks with the journal (see `replica.rs`).
pub fn finalize(
    domain: &Domain,
    plan: &MigrationPlan,
    staged: Staged,
    roots: &[[u8; 32]],
    zero_bytes: u64,
    reversible: bool,
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
    crash_point("disks-finished");
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
            // What binds the receipt to the source VM, beside its name and disks; a plan
            // without it was refused before it was staged.
            source_descriptor_sha256: plan.source_descriptor_sha256.map(|d| hex(&d)),
            chunk_hash: Some(gateway::chunk::ChunkHash::CURRENT.name().to_owned()),
            vm_id: ctx.vm_id.to_owned(),
            vm_path: new_vm.vmx_path.clone(),
            disks: receipt_disks.clone(),
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
    // Built in the registering transaction, which may run again on PostgreSQL: each
    // run fills in its own copy, and the last (the one committed) goes to the edge.
    let committed_report = std::cell::RefCell::new(None);
    let report_json = |ctx: &crate::inventory::ReceiptContext<'_>| {
        let mut report = report.clone();
        report.migration_id = Some(ctx.migration_id.to_owned());
        report.vm_id = Some(ctx.vm_id.to_owned());
        report.vm_path = Some(new_vm.vmx_path.clone());
        report.zero_bytes = Some(zero_bytes);
        report.committed_at = Some(ctx.committed_at.to_owned());
        let json = serde_json::to_string(&report).ok();
        *committed_report.borrow_mut() = Some(report);
        json
    };
    let folders = match commit_all(&domain.inventory, &migration_id, staging, other_staging) {
        Ok(folders) => folders,
        Err(e) => {
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            let _ = domain.inventory.clear_commit_moves(&migration_id);
            return Err(e);
        }
    };
    let registered = domain
        .inventory
        .register_vm_with_report(&migration_id, &new_vm, issue, report_json);
    match registered {
        Ok(registered) => {
            crash_point("registered");
            if reversible {
                if let Err(e) = domain.inventory.clear_commit_moves(&migration_id) {
                    tracing::warn!(migration = %migration_id, error = %e, "cannot clear the commit record; the next start does");
                }
            } else {
                tidy_committed(&domain.inventory, &migration_id, &folders);
            }
            Ok(Registered {
                vm_id: registered.vm_id,
                vm_path: new_vm.vmx_path.clone(),
                receipt: registered.receipt,
                report: Some(committed_report.take().unwrap_or(report)),
            })
        }
        Err(e) => {
            remove_folders(&folders);
            let e = format!("cannot register the VM: {e}");
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            let _ = domain.inventory.clear_commit_moves(&migration_id);
            Err(e)
        }
    }
}

/// A registered VM's folders no longer need the journal and marks, nor the inventory
/// its record of the moves. A failure here leaves them for the next start to remove.
fn tidy_committed(inventory: &Inventory, migration_id: &str, folders: &[PathBuf]) {
    for folder in folders {
        if let Err(e) = crate::datastore::remove_commit_leftovers(folder) {
            tracing::warn!(folder = %folder.display(), error = %e, "cannot remove the commit's journal; the next start does");
            return;
        }
    }
    crash_point("leftovers-removed");
    if let Err(e) = inventory.clear_commit_moves(migration_id) {
        tracing::warn!(migration = %migration_id, error = %e, "cannot clear the commit record; the next start does");
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
            let controller = d
                .slot()
                .and_then(|s| vm.controller_type(&s.controller_key()))
                .unwrap_or(gateway::plan::ControllerType::LsiLogic);
            if let Err(e) = at.write_descriptor(i, disk.capacity(), &d.key, &controller) {
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
        controllers: vm.controllers.clone(),
        nics: vm
            .nics
            .iter()
            .zip(nic_networks)
            .map(|(n, (_, net_name))| VmxNic {
                key: n.key.clone(),
                network_name: net_name.clone(),
                virtual_dev: n.virtual_dev.clone(),
                mac: n.mac.clone(),
                address_type: n.address_type.clone(),
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
        controllers: vm.controllers.clone(),
        nics: vm
            .nics
            .iter()
            .zip(nic_networks)
            .map(|(n, (net_id, _))| NewNic {
                key: n.key.clone(),
                network_id: net_id.clone(),
                mac: n.mac.clone(),
                virtual_dev: n.virtual_dev.clone(),
                address_type: n.address_type.clone(),
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
    let folders = match commit_all(&domain.inventory, &migration_id, staging, other_staging) {
        Ok(folders) => folders,
        Err(e) => {
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            let _ = domain.inventory.clear_commit_moves(&migration_id);
            return Err(e);
        }
    };
    let vm_path = new_vm.vmx_path.clone();
    // As for a cold lift: the last run of the registering transaction's report is the
    // one committed, and the one returned.
    let committed_report = std::cell::RefCell::new(None);
    let registered = domain.inventory.register_running_vm(&migration_id, &new_vm, |ctx| {
        let mut report = report.clone();
        report.migration_id = Some(ctx.migration_id.to_owned());
        report.vm_id = Some(ctx.vm_id.to_owned());
        report.vm_path = Some(vm_path.clone());
        report.committed_at = Some(ctx.committed_at.to_owned());
        let json = serde_json::to_string(&report).ok();
        *committed_report.borrow_mut() = Some(report);
        json
    });
    match registered {
        Ok(vm_id) => {
            tidy_committed(&domain.inventory, &migration_id, &folders);
            Ok((vm_id, committed_report.take().unwrap_or(report)))
        }
        Err(e) => {
            remove_folders(&folders);
            let e = format!("cannot register the VM: {e}");
            let _ = domain.inventory.fail_migration(&migration_id, &e);
            let _ = domain.inventory.clear_commit_moves(&migration_id);
            Err(e)
        }
    }
}

/// Moves every staging folder into place, the other datastores' first: the VM's home
/// folder (with the .vmx) appears last, so a VM folder with a .vmx never names a disk
/// that is not in place. Each folder is marked as this migration's and the moves are
/// recorded in the inventory before the first one, so a restart can undo them. If one
/// move fails, the folders already moved and the staging folders not yet moved are
/// removed.
fn commit_all(
    inventory: &Inventory,
    migration_id: &str,
    home: Staging,
    others: Vec<(String, Staging)>,
) -> Result<Vec<PathBuf>, String> {
    let mut pending: Vec<Staging> = others.into_iter().map(|(_, s)| s).collect();
    pending.push(home);
    let moves: Vec<CommitMove> = pending
        .iter()
        .map(|s| CommitMove {
            staging: s.dir().to_owned(),
            target: s.target(),
        })
        .collect();
    let recorded = pending
        .iter()
        .try_for_each(|s| s.mark(migration_id).map_err(|e| e.to_string()))
        .and_then(|()| {
            inventory
                .record_commit_moves(migration_id, &moves)
                .map_err(|e| format!("cannot record the commit: {e}"))
        });
    if let Err(e) = recorded {
        for staging in pending {
            let _ = staging.discard();
        }
        return Err(e);
    }
    crash_point("moves-recorded");
    let mut done = Vec::new();
    let mut pending = pending.into_iter();
    while let Some(staging) = pending.next() {
        let dir = staging.dir().to_owned();
        match staging.commit() {
            Ok(folder) => {
                done.push(folder);
                crash_point(&format!("moved-{}", done.len()));
            }
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

/// At start, before staging is cleaned: finishes or undoes the commits a crash cut.
/// A migration whose VM was registered only has its journal and marks removed; one whose
/// VM was not has every folder that moved (and still carries its mark) moved back to
/// staging, where its edge resumes it with nothing to re-send; one that failed has its
/// moved folders removed. On a shared database, a commit another endpoint (not `me`)
/// holds the lease of is being made now, and is left to it. Returns the migrations
/// recovered.
pub fn recover_commits(inventory: &Inventory, me: &str) -> Result<Vec<String>, crate::inventory::InventoryError> {
    let mut recovered = Vec::new();
    for pending in inventory.pending_commits()? {
        let id = &pending.migration_id;
        if let Some(lease) = inventory.served_elsewhere(id, me, crate::inventory::LeaseClock::Database)? {
            tracing::debug!(migration = %id, owner = %lease.owner, "a commit in progress at another endpoint");
            continue;
        }
        let ours = |target: &std::path::Path| crate::datastore::marked_by(target).as_deref() == Some(id.as_str());
        match pending.state.as_str() {
            "SUCCEEDED" => {
                for m in &pending.moves {
                    if let Err(e) = crate::datastore::remove_commit_leftovers(&m.target) {
                        tracing::warn!(folder = %m.target.display(), error = %e, "cannot remove a committed VM's journal");
                    }
                }
                tracing::info!(migration = %id, "finished a commit cut by the last stop: the VM was registered");
            }
            "RUNNING" => {
                for m in pending.moves.iter().rev() {
                    if ours(&m.target) && !m.staging.exists() {
                        if let Err(e) = crate::datastore::move_back(&m.target, &m.staging) {
                            tracing::error!(folder = %m.target.display(), error = %e, "cannot move an unregistered VM's folder back to staging");
                            continue;
                        }
                    }
                }
                tracing::warn!(migration = %id, "undid a commit cut by the last stop: the VM was not registered; its edge resumes it");
            }
            _ => {
                for m in &pending.moves {
                    if ours(&m.target) {
                        remove_folders(std::slice::from_ref(&m.target));
                    }
                }
                tracing::warn!(migration = %id, "removed the folders of a failed commit cut by the last stop");
            }
        }
        inventory.clear_commit_moves(id)?;
        recovered.push(id.clone());
    }
    Ok(recovered)
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
