//! Resources of the gateway itself, under `/api/gateway` (vCenter has no such service):
//! the record of migrations into the domain, their signed receipts and reports, the
//! firewall rules carried with each VM, and the validation of a migration plan.

use std::collections::BTreeMap;

use gateway::plan::{FirewallSpec, MigrationPlan, VmSpec, DEFAULT_CHUNK_SIZE};
use serde::{Deserialize, Serialize};

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
/// next one (in sync as of its last pass), and how old that is; a switchover running,
/// awaiting confirmation, done or rolled back; and the forecast of a switchover.
pub(crate) fn replica_state(domain: &Domain, m: &mut MigrationRecord) {
    use crate::inventory::switchover::{AWAITING_CONFIRM, ROLLED_BACK, ROLLING_BACK};
    let running = m.state == "RUNNING" && domain.live.is_live(&m.id);
    let Some(r) = m.replica.as_mut() else {
        return;
    };
    r.state = Some(match (m.state.as_str(), r.switchover_state.as_deref()) {
        ("SUCCEEDED", Some(AWAITING_CONFIRM)) => "switched over (awaiting confirm)",
        ("SUCCEEDED", Some(ROLLING_BACK)) => "rolling back",
        ("SUCCEEDED", _) => "done",
        ("RUNNING", _) if domain.live.is_switching(&m.id) => "switching over",
        ("RUNNING", _) if running => "syncing",
        ("RUNNING", Some(ROLLED_BACK)) => "rolled back",
        ("RUNNING", _) => "in sync",
        _ => "failed",
    });
    r.switchover_window = domain.inventory.switchover_window(&m.id).ok().flatten();
    if m.state != "RUNNING" {
        return;
    }
    let now = time::OffsetDateTime::now_utc();
    let parse = |t: &str| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok();
    r.lag_seconds = parse(&r.last_sync).map(|t| (now - t).whole_seconds().max(0));
    // A switchover is a last pass plus the commit: without changed-block tracking it
    // reads the whole source as the last pass did and, the source stopped, sends about
    // what changed since (assumed as much as the last pass sent: D bytes at the last
    // pass's rate D / S, so S), then reads the replica back as the last pass did (R).
    if let (Some(pass), Some(read_back)) = (r.last_pass_ms, r.last_read_back_ms) {
        let seconds = (pass + read_back).div_ceil(1000).max(1);
        r.forecast_switchover_seconds = Some(seconds);
        // The switchover starts at its time, inside its window if it has one.
        let window = r.switchover_window.as_deref().and_then(|w| w.parse().ok());
        let at = r.switchover_at.as_deref().and_then(parse).map(|t| t.unix_timestamp());
        let start = match gateway::schedule::switchover_due(at, window, now.unix_timestamp()) {
            gateway::schedule::SwitchoverDue::At { at, .. } => {
                time::OffsetDateTime::from_unix_timestamp(at).unwrap_or(now)
            }
            _ => now,
        };
        let done = start + time::Duration::seconds(i64::try_from(seconds).unwrap_or(i64::MAX / 2));
        r.forecast_done_at = Some(crate::inventory::timestamp(done));
    }
}

/// Sets or clears the scheduled switchover of a RUNNING replication (`switchover_at`,
/// RFC 3339 or null) and its daily window (`switchover_window`, `HH:MM-HH:MM` UTC or
/// null): the edge learns them at its next pass (`Synced`) and switches over at the first
/// pass at or after the time, inside the window. A MigrationOperator sets their own
/// replications', an Administrator anyone's.
pub fn patch_migration(
    domain: &Domain,
    principal: &crate::inventory::Principal,
    id: &str,
    body: &[u8],
) -> Result<MigrationRecord, ApiError> {
    let example =
        r#"{"switchover_at": "2026-12-07T02:00:00Z"} or {"switchover_window": "02:00-04:00"} (null clears either)"#;
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_argument(format!("the body is not JSON ({e}); send {example}")))?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::invalid_argument(format!(
            "the body must be a JSON object: {example}"
        )));
    };
    if let Some(other) = fields
        .keys()
        .find(|k| *k != "switchover_at" && *k != "switchover_window")
    {
        return Err(ApiError::invalid_argument(format!(
            "unknown field {other:?}: switchover_at and switchover_window are the only fields that can be changed"
        )));
    }
    if fields.is_empty() {
        return Err(ApiError::invalid_argument(format!(
            "the body must set switchover_at (an RFC 3339 time such as \"2026-12-07T02:00:00Z\") or switchover_window \
             (a daily window such as \"02:00-04:00\", UTC), or null to clear it: {example}"
        )));
    }
    let text_or_null = |name: &str| -> Result<Option<Option<String>>, ApiError> {
        match fields.get(name) {
            None => Ok(None),
            Some(serde_json::Value::Null) => Ok(Some(None)),
            Some(serde_json::Value::String(s)) => Ok(Some(Some(s.clone()))),
            Some(other) => Err(ApiError::invalid_argument(format!(
                "{name} is {other}: give a string or null ({example})"
            ))),
        }
    };
    let at = match text_or_null("switchover_at")? {
        None => None,
        Some(None) => Some(None),
        Some(Some(text)) => {
            let t =
                time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).map_err(|e| {
                    ApiError::invalid_argument(format!(
                        "switchover_at {text:?} is not an RFC 3339 time ({e}); write it like 2026-12-07T02:00:00Z"
                    ))
                })?;
            Some(Some(crate::inventory::timestamp(t.to_offset(time::UtcOffset::UTC))))
        }
    };
    let window = match text_or_null("switchover_window")? {
        None => None,
        Some(None) => Some(None),
        Some(Some(text)) => {
            let w: gateway::schedule::SwitchoverWindow = text
                .parse()
                .map_err(|e: String| ApiError::invalid_argument(format!("switchover_window: {e}")))?;
            Some(Some(w.to_string()))
        }
    };
    let record = owned_migration(domain, principal, id, "schedule switchovers of")?;
    if record.state != "RUNNING" || record.replica.is_none() {
        return Err(ApiError::invalid_argument(format!(
            "migration {id} is {}{}: only a RUNNING replication whose first pass ended has a switchover to schedule",
            record.state,
            if record.replica.is_none() {
                ", not a replication"
            } else {
                ""
            }
        )));
    }
    let refused = |e| match e {
        e @ (crate::inventory::InventoryError::Invalid(_)
        | crate::inventory::InventoryError::MigrationNotRunning { .. }) => ApiError::invalid_argument(e.to_string()),
        other => ApiError::from(other),
    };
    if let Some(at) = at {
        domain.inventory.set_switchover_at(id, at.as_deref()).map_err(refused)?;
    }
    if let Some(window) = window {
        domain
            .inventory
            .set_switchover_window(id, window.as_deref())
            .map_err(refused)?;
    }
    get_migration(domain, id)
}

/// The record of migration `id` if `principal` may act on it as an operator: their own
/// migration with a role that migrates, or any as an Administrator.
fn owned_migration(
    domain: &Domain,
    principal: &crate::inventory::Principal,
    id: &str,
    what: &str,
) -> Result<MigrationRecord, ApiError> {
    if !principal.role.may_migrate() {
        return Err(ApiError::new(
            crate::api::error::ErrorKind::Unauthorized,
            format!(
                "user {} has role {}, which may not {what} migrations; ask a MigrationOperator or Administrator",
                principal.user,
                principal.role.as_str()
            ),
        ));
    }
    let record = get_migration(domain, id)?;
    if principal.role != crate::config::Role::Administrator && record.user != principal.user {
        return Err(ApiError::new(
            crate::api::error::ErrorKind::Unauthorized,
            format!(
                "migration {id} was started by {}; user {} (role {}) may {what} only their own migrations: ask an Administrator",
                record.user,
                principal.user,
                principal.role.as_str()
            ),
        ));
    }
    Ok(record)
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
        seed: None,
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
    // An operator stops their own migrations; someone else's is an administrator's call.
    let record = owned_migration(domain, principal, id, "abort")?;
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

/// What a rollback or confirmation through the API answers: what the endpoint did (as
/// `edge-agent rollback` or `confirm` prints it) and the migration afterwards.
#[derive(Debug, Serialize)]
pub struct SwitchoverEnded {
    pub message: String,
    pub migration: MigrationRecord,
}

/// Rolls back (`confirm: false`) or confirms the switchover of replication `id`, for its
/// operator or an Administrator: the same path as `edge-agent rollback` and `confirm`
/// (`placement::end_switchover_as`). A rollback powers the cloud VM off before anything
/// else; if it cannot, nothing changes and the error says to ask again. The edge learns
/// of it the next time it talks to the cloud (docs/replication.md).
pub async fn end_switchover(
    domain: &std::sync::Arc<Domain>,
    principal: &crate::inventory::Principal,
    id: &str,
    confirm: bool,
) -> Result<SwitchoverEnded, ApiError> {
    use crate::api::error::ErrorKind;
    let what = if confirm {
        "confirm switchovers of"
    } else {
        "roll back switchovers of"
    };
    let (p, i) = (principal.clone(), id.to_owned());
    crate::api::blocking(domain, move |d| owned_migration(d, &p, &i, what)).await?;
    let through = crate::server::placement::EndThrough::Api;
    let message = crate::server::placement::end_switchover_as(domain, principal, id, confirm, through)
        .await
        .map_err(|(code, problems)| {
            let kind = match code {
                gateway::wire::RefusalCode::NotPermitted => ErrorKind::Unauthorized,
                gateway::wire::RefusalCode::UnknownMigration => ErrorKind::NotAllowedInCurrentState,
                gateway::wire::RefusalCode::EndpointFailure => ErrorKind::Error,
                _ => ErrorKind::InvalidArgument,
            };
            ApiError::new(kind, problems.join("; "))
        })?;
    tracing::info!(migration = ?id, user = ?principal.user, confirm, ?message, "switchover ended through the API");
    let i = id.to_owned();
    let migration = crate::api::blocking(domain, move |d| get_migration(d, &i)).await?;
    Ok(SwitchoverEnded { message, migration })
}

/// Starts a test boot of replication `id`'s replica (`crate::hosts::test_boot`), for
/// whoever may act on the replication: its operator, or an Administrator.
pub async fn start_test_boot(
    domain: &std::sync::Arc<Domain>,
    principal: &crate::inventory::Principal,
    id: &str,
) -> Result<crate::hosts::test_boot::TestBootInfo, ApiError> {
    let (p, i) = (principal.clone(), id.to_owned());
    crate::api::blocking(domain, move |d| owned_migration(d, &p, &i, "test-boot")).await?;
    tracing::info!(migration = ?id, user = ?principal.user, "test boot asked for");
    Ok(crate::hosts::Hosts::start_test_boot(domain, id).await?)
}

/// The test boot of replication `id`, as it runs (or has stopped on its own).
pub async fn test_boot(domain: &Domain, id: &str) -> Result<crate::hosts::test_boot::TestBootInfo, ApiError> {
    domain.hosts.test_boot(id).await.ok_or_else(|| no_test_boot(id))
}

fn no_test_boot(id: &str) -> ApiError {
    ApiError::new(
        crate::api::error::ErrorKind::NotFound,
        format!("no test boot of migration {id} runs; start one with POST /api/gateway/migrations/{id}/test-boot"),
    )
}

/// The end of the test boot's serial console (it shows what the guest prints, secrets
/// included: operators only, as for a VM's console).
pub async fn test_boot_console(
    domain: &Domain,
    principal: &crate::inventory::Principal,
    id: &str,
    bytes: u64,
) -> Result<Vec<u8>, ApiError> {
    crate::api::vcenter::power::may_operate(principal, "read consoles")?;
    let path = domain
        .hosts
        .test_boot_console(id)
        .await
        .ok_or_else(|| no_test_boot(id))?;
    tokio::task::spawn_blocking(move || crate::api::vcenter::power::tail(&path, bytes))
        .await
        .map_err(|e| ApiError::internal("an endpoint worker failed", &e))?
}

/// Stops the test boot of replication `id` and removes its copy.
pub async fn discard_test_boot(
    domain: &std::sync::Arc<Domain>,
    principal: &crate::inventory::Principal,
    id: &str,
) -> Result<(), ApiError> {
    let (p, i) = (principal.clone(), id.to_owned());
    crate::api::blocking(domain, move |d| owned_migration(d, &p, &i, "discard test boots of")).await?;
    match domain.hosts.discard_test_boot(id).await? {
        true => Ok(()),
        false => Err(no_test_boot(id)),
    }
}
