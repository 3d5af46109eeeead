//! The cloud domain's side of a migration, apart from the wire: checking a
//! plan against the inventory and the datastore, staging its files, and
//! turning them into a registered VM. All blocking (SQLite, argon2, fsync):
//! callers run these on tokio's blocking pool.
//!
//! ```text
//! placement.rs   staging a checked plan's files on its datastores, discarding them
//! validate.rs    every check of a plan, listed at once; what a migration would create
//! resolve.rs     the placement choices found in the inventory
//! resume.rs      who may resume or abort a migration; resuming, suspending, aborting
//! commit.rs      the staged files turned into a registered VM
//! ```

use std::sync::Arc;

use gateway::plan::MigrationPlan;
use gateway::wire::RefusalCode;

use crate::datastore::{DatastoreError, DiskFile, DiskFormat, Journal, Staging};
use crate::inventory::{InventoryError, Principal};
use crate::Domain;

mod commit;
mod replica;
mod resolve;
mod resume;
mod validate;
pub use commit::{finalize, finalize_live, recover_commits, CRASH_AT_ENV};
pub use replica::{
    end_switchover, end_switchover_as, keep_replica, replica_files, rfc3339, switched_over, unix_seconds, EndThrough,
    ReplicaFiles,
};
pub use resolve::Resolved;
pub use resume::{
    abort, adopt_orphans, authorize, check_resume, discard_files, expire, resume, suspend, Action, Durable,
};
pub use validate::{validate, Validated};

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
    /// The format of the disks on the VM's datastore (see [`Staged::disk_formats`]).
    pub format: DiskFormat,
    /// The format of each disk, in plan order: the plan's, else its datastore's.
    pub disk_formats: Vec<DiskFormat>,
    pub disks: Vec<Arc<DiskFile>>,
    /// Which chunks are durably in `disks` (see [`Journal`]).
    pub journal: Arc<Journal>,
    /// Cloud network id of each NIC, in plan order.
    pub nic_networks: Vec<(String, String)>,
    /// This endpoint's lease of the migration while it serves it: given up once the
    /// files are journaled for a resume, committed or discarded.
    pub lease: Option<crate::cluster::ownership::HeldLease>,
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

/// The endpoint itself failed (its database, a datastore): one problem, saying what.
pub fn endpoint_failure(e: impl std::fmt::Display) -> Refusal {
    (RefusalCode::EndpointFailure, vec![e.to_string()])
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
        disk_formats,
        placement,
        ..
    } = validate(domain, principal, plan)?;
    // The receipt binds the source VM by this digest: a migration without it could not
    // get one. (The API's plan check has none, and `validate` does not ask for it.)
    if plan.source_descriptor_sha256.is_none() {
        return Err((
            RefusalCode::PlanRejected,
            vec!["the plan does not carry the SHA-256 of the source's .vmx or OVF descriptor, which the migration's receipt signs; migrate with an edge agent of this version".into()],
        ));
    }
    let format = home_format(domain, plan, &placement);
    let inv = &domain.inventory;
    let vm = &plan.vm;
    let (migration_id, lease) = reserve(domain, principal, edge, plan, &placement)?;
    let staged = (|| {
        let (staging, other_staging) = open_stagings(domain, &migration_id, &vm.name, &placement, true)?;
        let mut disks = Vec::new();
        let journal = (|| {
            for (i, (d, &format)) in vm.disks.iter().zip(&disk_formats).enumerate() {
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
            if let Err(e) = inv.set_resume_info(
                &migration_id,
                edge_cert,
                &plan_bytes(plan),
                &formats_text(&disk_formats),
            ) {
                discard_stagings(staging, other_staging);
                let _ = inv.fail_migration(&migration_id, &e.to_string());
                lease.release(inv);
                return Err(endpoint_failure(e));
            }
            Ok(Staged {
                migration_id,
                staging,
                other_staging,
                placement,
                format,
                disk_formats,
                disks,
                journal: Arc::new(journal),
                nic_networks,
                lease: Some(lease),
            })
        }
        Err(e) => {
            let e: crate::datastore::DatastoreError = e;
            let _ = inv.fail_migration(&migration_id, &e.to_string());
            lease.release(inv);
            Err(endpoint_failure(e))
        }
    }
}

/// Starts the migration's record: reserves the VM name, and the space on each datastore
/// its disks go to, checking that space again in the transaction that reserves it
/// ([`validate`] checked it before, but another plan may have taken it since). Returns
/// the migration id and this endpoint's lease of it, taken in the same transaction.
fn reserve(
    domain: &Domain,
    principal: &Principal,
    edge: &str,
    plan: &MigrationPlan,
    placement: &Resolved,
) -> Result<(String, crate::cluster::ownership::HeldLease), Refusal> {
    let vm = &plan.vm;
    let needed = plan.logical_bytes();
    let space: Vec<(String, u64)> = placement
        .space(plan)
        .into_iter()
        .map(|(ds, bytes)| (ds.id.clone(), bytes))
        .collect();
    // Against what other plans reserved meanwhile, and boot files promised.
    let free = |id: &str, used: crate::inventory::DatastoreUse| {
        let name = placement
            .space(plan)
            .into_iter()
            .find(|(ds, _)| ds.id == id)
            .map(|(ds, _)| ds.name.clone())
            .unwrap_or_default();
        match domain.datastore_named(&name) {
            Some(ds) => ds.free_bytes(used.used, used.reserved).map_err(|e| e.to_string()),
            // Not one of this endpoint's folders: `validate` refused it already.
            None => Ok(u64::MAX),
        }
    };
    let _deciding = crate::datastore::space_decision();
    let owner = &domain.ownership;
    let asked = std::time::Instant::now();
    domain
        .inventory
        .begin_migration_on(
            principal,
            edge,
            &vm.name,
            needed,
            &space,
            &free,
            Some((owner.me(), owner.period())),
        )
        .map(|id| {
            let lease = owner.keep(&id, 1, asked, Box::new(|_| {}));
            (id, lease)
        })
        .map_err(|e| match e {
            InventoryError::NameTaken { .. } | InventoryError::NoSpace { .. } => {
                (RefusalCode::PlanRejected, vec![e.to_string()])
            }
            other => endpoint_failure(other),
        })
}

/// The format a disk placed on `datastore` takes: the plan's, else the datastore's.
fn disk_format(domain: &Domain, plan: &MigrationPlan, datastore: &str) -> DiskFormat {
    plan.disk_format.unwrap_or_else(|| {
        domain
            .datastore_named(datastore)
            .map_or(domain.datastore.disk_format(), |d| d.disk_format())
    })
}

/// The format of the disks on the VM's own datastore: the report's `disk_format`.
fn home_format(domain: &Domain, plan: &MigrationPlan, placement: &Resolved) -> DiskFormat {
    disk_format(domain, plan, &placement.datastore.name)
}

/// Each disk's format as the inventory's resume record keeps it: one name when all
/// disks share it (what endpoints before per-disk formats wrote), else one per disk,
/// comma-separated in plan order.
fn formats_text(formats: &[DiskFormat]) -> String {
    match formats.split_first() {
        Some((first, rest)) if rest.iter().all(|f| f == first) => first.as_str().to_owned(),
        _ => formats.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(","),
    }
}

/// [`formats_text`] read back for a plan of `disks` disks; `None` if it does not fit.
fn parse_formats(text: &str, disks: usize) -> Option<Vec<DiskFormat>> {
    if disks == 0 {
        return Some(Vec::new());
    }
    let formats: Vec<DiskFormat> = text.split(',').map(str::parse).collect::<Result<_, _>>().ok()?;
    match formats.len() {
        1 => Some(vec![formats[0]; disks]),
        n if n == disks => Some(formats),
        _ => None,
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

/// Removes what a failed migration staged, on every datastore, and records why it failed.
pub fn discard(domain: &Domain, staged: Staged, reason: &str) {
    discard_stagings(staged.staging, staged.other_staging);
    if let Err(e) = domain.inventory.fail_migration(&staged.migration_id, reason) {
        tracing::error!(migration = %staged.migration_id, error = %e, "cannot record the failed migration");
    }
    if let Some(lease) = staged.lease {
        lease.release(&domain.inventory);
    }
}
