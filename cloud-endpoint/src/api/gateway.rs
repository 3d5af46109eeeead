//! Resources of the gateway itself, under `/api/gateway` (vCenter has no such service):
//! the record of migrations into the domain, their signed receipts and reports, the
//! firewall rules carried with each VM, and the validation of a migration plan.

use std::collections::BTreeMap;

use gateway::plan::{FirewallSpec, MigrationPlan, VmSpec, DEFAULT_CHUNK_SIZE};
use serde::Deserialize;

use crate::api::error::ApiError;
use crate::inventory::MigrationRecord;
use crate::Domain;

/// Every migration, oldest first, running ones included.
pub fn list_migrations(domain: &Domain) -> Result<Vec<MigrationRecord>, ApiError> {
    let mut all = domain.inventory.list_migrations()?;
    all.iter_mut().for_each(|m| replica_state(domain, m));
    Ok(all)
}

pub fn get_migration(domain: &Domain, id: &str) -> Result<MigrationRecord, ApiError> {
    let mut m = domain
        .inventory
        .migration(id)?
        .ok_or_else(|| ApiError::not_found(format!("migration {id} is not in the inventory")))?;
    replica_state(domain, &mut m);
    Ok(m)
}

/// A replication's state as an operator reads it: a pass running now, or waiting for the
/// next one (in sync as of its last pass), and how old that is.
fn replica_state(domain: &Domain, m: &mut MigrationRecord) {
    let running = m.state == "RUNNING" && domain.live.is_live(&m.id);
    if let Some(r) = m.replica.as_mut() {
        r.state = Some(if m.state != "RUNNING" {
            "done"
        } else if running {
            "syncing"
        } else {
            "in sync"
        });
        r.lag_seconds = time::OffsetDateTime::parse(&r.last_sync, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|t| (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0));
    }
}

/// The signed receipt of a migration, exactly as the endpoint issued it to the edge.
pub fn get_receipt(domain: &Domain, id: &str) -> Result<String, ApiError> {
    domain.inventory.receipt(id)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "migration {id} has no receipt: only a migration that registered its VM (state SUCCEEDED) has one"
        ))
    })
}

/// The report of a migration (what was created, the NIC mapping, the rules carried and
/// not carried), as stored at commit.
pub fn get_report(domain: &Domain, id: &str) -> Result<String, ApiError> {
    domain.inventory.migration_report(id)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "migration {id} has no report: only a migration that registered its VM (state SUCCEEDED) has one"
        ))
    })
}

/// The firewall rules carried with a VM, references to VMs rewritten to their ids.
pub fn get_vm_firewall(domain: &Domain, vm: &str) -> Result<crate::inventory::VmFirewall, ApiError> {
    domain
        .inventory
        .vm_firewall(vm)?
        .ok_or_else(|| ApiError::not_found(format!("VM {vm} is not in the inventory")))
}

/// The body of `POST /api/gateway/plans`: what `edge-agent migrate` would send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// As in the wire plan: name, guest_os, num_cpus, memory_mib, nics (key, network,
    /// virtual_dev, mac), disks (key, capacity); optional fields may be left out.
    pub vm: VmSpec,
    /// Source network name to cloud network name.
    #[serde(default)]
    pub network_map: BTreeMap<String, String>,
    /// `vmdk`, `qcow2` or `raw`; absent: the datastore's default.
    #[serde(default)]
    pub disk_format: Option<String>,
    /// The firewall rules as a rules file has them (`rules`, `groups`, `ip_sets`) plus
    /// `source_vm` (default: the VM's name) and `not_carried`.
    #[serde(default)]
    pub firewall: FirewallSpec,
    /// Where the VM goes, as vSphere's relocate spec places it; absent fields take the
    /// domain's default.
    #[serde(default)]
    pub placement: PlacementRequest,
}

/// `placement` of a plan request: each object by name or id; `disks` maps a disk key to
/// the datastore of that disk (`{"scsi0:1": "cloud-ds2"}`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementRequest {
    pub folder: Option<String>,
    pub cluster: Option<String>,
    pub host: Option<String>,
    pub resource_pool: Option<String>,
    pub datastore: Option<String>,
    #[serde(default)]
    pub disks: BTreeMap<String, String>,
}

/// The outcome of checking a plan through the API.
#[derive(Debug)]
pub enum PlanVerdict {
    Valid(Box<gateway::plan::MigrationReport>),
    /// The error kind (INVALID_ARGUMENT, or UNAUTHORIZED for a role that may not
    /// migrate) and every problem.
    Refused(crate::api::error::ErrorKind, Vec<String>),
}

/// The migration plan a `POST /api/gateway/plans` body describes, within the limits of
/// any plan; nothing about the inventory yet. Pure: the fuzz target of API bodies runs it.
pub(crate) fn plan_of_body(body: &[u8]) -> Result<MigrationPlan, ApiError> {
    let req: PlanRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_argument(format!(
            "the plan is not valid JSON of the documented shape ({e}); see POST /api/gateway/plans in the README"
        ))
    })?;
    let disk_format = req
        .disk_format
        .as_deref()
        .map(str::parse::<gateway::plan::DiskFormat>)
        .transpose()
        .map_err(ApiError::invalid_argument)?;
    let mut firewall = req.firewall;
    if firewall.source_vm.is_empty() {
        firewall.source_vm = req.vm.name.clone();
    }
    for n in &mut firewall.not_carried {
        if n.reason.is_empty() {
            n.reason = n.kind.reason().to_owned();
        }
    }
    let mut plan = MigrationPlan {
        vm: req.vm,
        network_map: req.network_map.into_iter().collect(),
        chunk_size: DEFAULT_CHUNK_SIZE,
        disk_format,
        firewall,
        placement: gateway::plan::Placement {
            folder: req.placement.folder,
            cluster: req.placement.cluster,
            host: req.placement.host,
            resource_pool: req.placement.resource_pool,
            datastore: req.placement.datastore,
            disk_datastores: req.placement.disks.into_iter().collect(),
        },
        // A plan checked, not migrated: no source file was read.
        source_descriptor_sha256: None,
    };
    plan.fit_chunk_size();
    plan.check_limits()
        .map_err(|e| ApiError::invalid_argument(e.to_string()))?;
    Ok(plan)
}

/// Checks a plan as a migration's would be checked, staging and recording nothing.
pub fn check_plan(
    domain: &Domain,
    principal: &crate::inventory::Principal,
    body: &[u8],
) -> Result<PlanVerdict, ApiError> {
    let plan = plan_of_body(body)?;
    Ok(match crate::server::placement::validate(domain, principal, &plan) {
        Ok(v) => PlanVerdict::Valid(Box::new(v.preview)),
        Err((gateway::wire::RefusalCode::NotPermitted, problems)) => {
            PlanVerdict::Refused(crate::api::error::ErrorKind::Unauthorized, problems)
        }
        Err((gateway::wire::RefusalCode::PlanRejected, problems)) => {
            PlanVerdict::Refused(crate::api::error::ErrorKind::InvalidArgument, problems)
        }
        Err((_, problems)) => {
            return Err(ApiError::internal(
                "the plan could not be checked",
                &problems.join("; "),
            ))
        }
    })
}

/// Aborts a RUNNING migration: the connection serving it (if any) is closed and its
/// cleanup discards the staged files; one that waits for a resume is discarded now. The
/// edge's next resume is then refused as unknown. Returns the record afterwards.
pub fn abort_migration(
    domain: &Domain,
    principal: &crate::inventory::Principal,
    id: &str,
) -> Result<MigrationRecord, ApiError> {
    if !principal.role.may_migrate() {
        return Err(ApiError::new(
            crate::api::error::ErrorKind::Unauthorized,
            format!(
                "user {} has role {}, which may not abort migrations; ask a MigrationOperator or Administrator",
                principal.user,
                principal.role.as_str()
            ),
        ));
    }
    let record = get_migration(domain, id)?;
    // An operator stops their own migrations; someone else's is an administrator's call.
    if principal.role != crate::config::Role::Administrator && record.user != principal.user {
        return Err(ApiError::new(
            crate::api::error::ErrorKind::Unauthorized,
            format!(
                "migration {id} was started by {}; user {} (role {}) may abort only their own migrations: ask an Administrator",
                record.user,
                principal.user,
                principal.role.as_str()
            ),
        ));
    }
    if record.state != "RUNNING" {
        return Err(ApiError::invalid_argument(format!(
            "migration {id} is {}; only a RUNNING migration can be aborted",
            record.state
        )));
    }
    let reason = format!("aborted through the API by {}", principal.user);
    crate::server::placement::abort(domain, id, &reason)?;
    get_migration(domain, id)
}
