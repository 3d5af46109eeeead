//! Replications: between passes the staged disks and their journal stay as the
//! replica of a source that keeps running, and a switchover commits them like a cold
//! lift's. What a pass does on the wire is in `gateway::protocol` (`Sync`, `SyncDone`).
//!
//! A switchover can power the VM on and stays reversible until the edge confirms it:
//! its folders keep the journal and the migration's mark, so that a rollback can power
//! the VM off, unregister it and move the folders back into staging, where the next
//! pass finds the replica (docs/replication.md).

use std::sync::Arc;
use std::time::Instant;

use gateway::protocol::Unsynced;
use gateway::wire::{RefusalCode, SwitchoverOutcome, SwitchoverRequest};

use super::{
    disk_staging, endpoint_failure, open_stagings, parse_formats, resolve, resume, Action, Domain, Refusal, Staged,
};
use crate::hosts::{Hosts, PowerOp};
use crate::inventory::{CommitMove, InventoryError, PassTimes, Principal};

/// A pass ended and its read-back found the replica as the edge sealed it: make what
/// the pass wrote durable (the disks, then the journal, with `unsynced`: the last zero
/// runs and chunks not yet journaled), then record the pass with its times and the
/// edge's change to the schedule (`schedule`, Unix seconds). The staging stays, for the
/// next pass or the switchover. Returns the scheduled switchover held now (Unix seconds).
pub fn keep_replica(
    domain: &Domain,
    staged: &Staged,
    unsynced: &Unsynced,
    delta_bytes: u64,
    pass: PassTimes,
    schedule: Option<Option<i64>>,
) -> Result<Option<i64>, (RefusalCode, String)> {
    let durable = staged.disks.iter().try_for_each(|d| d.sync_data()).and_then(|()| {
        if unsynced.is_empty() {
            Ok(())
        } else {
            staged.journal.append(unsynced)
        }
    });
    durable.map_err(|e| {
        (
            RefusalCode::EndpointFailure,
            format!(
                "cannot make the replica of {} durable: {e}; run the pass again once the datastore is writable",
                staged.migration_id
            ),
        )
    })?;
    let schedule = match schedule {
        Some(Some(at)) => Some(Some(rfc3339(at).ok_or_else(|| {
            (
                RefusalCode::ProtocolViolation,
                format!("the scheduled switchover {at} (Unix seconds) is not a time"),
            )
        })?)),
        Some(None) => Some(None),
        None => None,
    };
    let held = domain
        .inventory
        .record_replica_sync(
            &staged.migration_id,
            delta_bytes,
            pass,
            schedule.as_ref().map(Option::as_deref),
        )
        .map_err(|e| (RefusalCode::EndpointFailure, e.to_string()))?;
    Ok(held.as_deref().and_then(unix_seconds))
}

/// Unix seconds as the inventory writes times (RFC 3339, UTC).
pub fn rfc3339(unix: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .map(crate::inventory::timestamp)
}

/// An inventory time as Unix seconds.
pub fn unix_seconds(stored: &str) -> Option<i64> {
    time::OffsetDateTime::parse(stored, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// The VM of `migration_id` was registered by a switchover: power it on if the edge
/// asked, and record where the switchover stands and its downtime: what the edge counted
/// before its request (`downtime_so_far_ms`) plus this endpoint's time from the request's
/// arrival (`received`) to the VM running. A power-on that fails leaves the VM registered
/// and powered off, and says why.
pub async fn switched_over(
    domain: &Arc<Domain>,
    migration_id: &str,
    vm_id: &str,
    request: &SwitchoverRequest,
    received: Instant,
) -> SwitchoverOutcome {
    // The existing power path of the hosts (and of the API): the same checks and states,
    // on the endpoint of the VM's host when another endpoint runs it.
    let (powered_on, power_error) = if request.power_on {
        let on_behalf = format!("the switchover of {migration_id}");
        match Hosts::power(domain, vm_id, PowerOp::On, &on_behalf).await {
            Ok(()) => (true, None),
            Err(e) => {
                tracing::warn!(migration = %migration_id, vm = %vm_id, error = %e, "switchover: cannot power the VM on");
                (false, Some(e.to_string()))
            }
        }
    } else {
        (false, None)
    };
    let downtime_ms = powered_on.then(|| {
        let here = u64::try_from(received.elapsed().as_millis()).unwrap_or(u64::MAX);
        request.downtime_so_far_ms.saturating_add(here)
    });
    let from = request.downtime_from.describe();
    let awaiting_confirm = !request.confirm;
    let d = domain.clone();
    let id = migration_id.to_owned();
    let recorded =
        tokio::task::spawn_blocking(move || d.inventory.record_switchover(&id, awaiting_confirm, downtime_ms, from))
            .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::error!(migration = %migration_id, ?recorded, "cannot record the switchover's state and downtime");
    }
    tracing::info!(migration = %migration_id, vm = %vm_id, powered_on, ?downtime_ms, from, awaiting_confirm, "switched over");
    SwitchoverOutcome {
        powered_on,
        power_error,
        downtime_ms,
        awaiting_confirm,
    }
}

/// A step of a rollback or confirmation, run on the blocking pool.
type DomainWork<T> = Box<dyn FnOnce(&Domain) -> Result<T, Refusal> + Send>;

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(domain: &Arc<Domain>, f: DomainWork<T>) -> Result<T, Refusal> {
    let d = domain.clone();
    tokio::task::spawn_blocking(move || f(d.as_ref()))
        .await
        .unwrap_or_else(|e| Err(endpoint_failure(e.to_string())))
}

/// Through what a switchover is rolled back or confirmed: the edge that ran it
/// (`edge-agent rollback` or `confirm`, over QUIC) or the HTTPS API (`POST
/// /api/gateway/migrations/{id}?action=rollback|confirm`, and the dashboard). Both run
/// [`end_switchover_as`]; only what the answers tell the user to run differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndThrough {
    Edge,
    Api,
}

impl EndThrough {
    /// How it was asked, as the migration record keeps it after the user's name.
    pub fn how(self) -> &'static str {
        match self {
            EndThrough::Edge => "with edge-agent",
            EndThrough::Api => "through the API",
        }
    }

    /// What asks for the same again.
    fn again(self, migration_id: &str, confirm: bool) -> String {
        match (self, confirm) {
            (EndThrough::Edge, true) => "run `edge-agent confirm` again".to_owned(),
            (EndThrough::Edge, false) => "run `edge-agent rollback` again".to_owned(),
            (EndThrough::Api, true) => format!("POST /api/gateway/migrations/{migration_id}?action=confirm again"),
            (EndThrough::Api, false) => format!("POST /api/gateway/migrations/{migration_id}?action=rollback again"),
        }
    }
}

/// `edge-agent rollback` (`confirm: false`) or `edge-agent confirm` of the switchover
/// of `migration_id`, asked by `principal` on the edge of certificate `edge_cert`: the
/// edge's right to it is checked, then [`end_switchover_as`] does it. Returns what was
/// done, for the edge to print; a refusal changes nothing.
pub async fn end_switchover(
    domain: &Arc<Domain>,
    principal: &Principal,
    edge_cert: &str,
    migration_id: &str,
    confirm: bool,
) -> Result<String, Refusal> {
    let (p, cert, id) = (principal.clone(), edge_cert.to_owned(), migration_id.to_owned());
    blocking(
        domain,
        Box::new(move |d: &Domain| super::authorize(d, &p, &cert, &id, Action::EndSwitchover).map(|_| ())),
    )
    .await?;
    end_switchover_as(domain, principal, migration_id, confirm, EndThrough::Edge).await
}

/// Where the switchover of `migration_id` stands for a rollback or confirmation.
enum Standing {
    /// It awaits confirmation: go on, for VM `vm_name`.
    Awaiting { vm_name: String },
    /// The edge asks for what was done already (through the API, or by an earlier run
    /// whose answer it lost): this says so, and the edge brings its record in line.
    Already(String),
}

/// Whether the switchover of `migration_id` can be rolled back or confirmed now, and if
/// not, what to do instead. Reads only.
fn standing(domain: &Domain, migration_id: &str, confirm: bool, through: EndThrough) -> Result<Standing, Refusal> {
    use crate::inventory::switchover::{AWAITING_CONFIRM, CONFIRMED, ROLLED_BACK, ROLLING_BACK};
    let refused = |why: String| {
        (
            RefusalCode::UnknownMigration,
            vec![format!("{why}; nothing was changed")],
        )
    };
    let Some(m) = domain.inventory.migration(migration_id).map_err(endpoint_failure)? else {
        return Err(refused(format!(
            "the endpoint has no migration {migration_id}, so no switchover to roll back or confirm"
        )));
    };
    let switchover = m.replica.as_ref().and_then(|r| r.switchover_state.as_deref());
    let by = m
        .replica
        .as_ref()
        .and_then(|r| r.switchover_ended_by.as_deref())
        .map(|b| format!(" by {b}"))
        .unwrap_or_default();
    let vm = m.vm.as_deref().unwrap_or("the cloud VM");
    let name = &m.vm_name;
    let edge = through == EndThrough::Edge;
    match (m.state.as_str(), switchover) {
        ("SUCCEEDED", Some(AWAITING_CONFIRM)) => Ok(Standing::Awaiting {
            vm_name: m.vm_name.clone(),
        }),
        ("SUCCEEDED", Some(ROLLING_BACK)) => Err(refused(format!(
            "the switchover of {name} (migration {migration_id}) is being rolled back now{by}, so it can no longer be \
             {}; wait for the rollback, then look at GET /api/gateway/migrations/{migration_id}",
            if confirm { "confirmed" } else { "rolled back again" }
        ))),
        ("SUCCEEDED", Some(CONFIRMED)) if confirm && edge => Ok(Standing::Already(format!(
            "the switchover of {name} was confirmed already{by}: {vm} in the cloud is final; its receipt stands; the \
             source may be retired"
        ))),
        ("SUCCEEDED", Some(CONFIRMED)) => Err(refused(format!(
            "the switchover of {name} (migration {migration_id}) to {vm} was confirmed{by}: it is final and can no \
             longer be {}{}",
            if confirm { "confirmed again" } else { "rolled back" },
            if edge {
                "; run `edge-agent confirm` to remove this edge's record of it"
            } else {
                ""
            }
        ))),
        ("RUNNING", Some(ROLLED_BACK)) if !confirm && edge => Ok(Standing::Already(format!(
            "the switchover of {name} was rolled back already{by}: the cloud VM was powered off and unregistered, \
             its disks are the replica again and its receipt is superseded; the source can be started again; \
             `edge-agent replicate` goes on from the replica"
        ))),
        ("RUNNING", Some(ROLLED_BACK)) => Err(refused(format!(
            "the switchover of {name} (migration {migration_id}) was rolled back{by}: no switchover awaits \
             confirmation; `edge-agent replicate` goes on from the replica, and `edge-agent switchover` switches \
             over again"
        ))),
        ("RUNNING", _) if m.replica.is_some() => Err(refused(format!(
            "migration {migration_id} is RUNNING, a replication of {name} that has not switched over: no switchover \
             awaits confirmation; run `edge-agent switchover` first (or schedule it with PATCH \
             /api/gateway/migrations/{migration_id} {{\"switchover_at\": ...}})"
        ))),
        (state, _) => Err(refused(format!(
            "migration {migration_id} is {state}, not a switched-over replication: nothing to {}",
            if confirm { "confirm" } else { "roll back" }
        ))),
    }
}

/// A write that rolls back or confirms the switchover of `migration_id` was refused
/// with `e` after [`standing`] let it go ahead: another request (the edge's, the API's,
/// another user's) ended or began ending the switchover in between. The answer is the
/// one a request after it gets (who ended it, what to do), not the inventory's refusal:
/// `Ok` for the edge asking for what was just done, as [`Standing::Already`]. If the
/// switchover still awaits confirmation, the write failed for another reason, which is
/// said as it is.
fn ended_meanwhile(
    domain: &Domain,
    migration_id: &str,
    confirm: bool,
    through: EndThrough,
    e: InventoryError,
) -> Result<String, Refusal> {
    match standing(domain, migration_id, confirm, through)? {
        Standing::Already(said) => Ok(said),
        Standing::Awaiting { .. } => Err((RefusalCode::UnknownMigration, vec![format!("{e}; nothing was changed")])),
    }
}

/// Rolls back (`confirm: false`) or confirms the switchover of `migration_id` for
/// `principal`, whose right to it the caller checked (the edge's certificate and user,
/// or the API's roles). The one path of both the edge and the API: a rollback powers
/// the VM off first, and only then unregisters it and moves its folders back into
/// staging; a confirmation makes it final. Returns what was done; a refusal changes
/// nothing, and says what to do.
pub async fn end_switchover_as(
    domain: &Arc<Domain>,
    principal: &Principal,
    migration_id: &str,
    confirm: bool,
    through: EndThrough,
) -> Result<String, Refusal> {
    let id = migration_id.to_owned();
    let vm_name = match blocking(domain, Box::new(move |d: &Domain| standing(d, &id, confirm, through))).await? {
        Standing::Awaiting { vm_name } => vm_name,
        Standing::Already(said) => return Ok(said),
    };
    let by = format!("{} {}", principal.user, through.how());
    let refused = |e: InventoryError| (RefusalCode::UnknownMigration, vec![format!("{e}; nothing was changed")]);
    if confirm {
        let id = migration_id.to_owned();
        return blocking(
            domain,
            Box::new(move |d: &Domain| {
                let vm = match d.inventory.confirm_switchover(&id, &by) {
                    Ok(vm) => vm,
                    Err(e) => return ended_meanwhile(d, &id, confirm, through, e),
                };
                // The journal and marks only a rollback needed; left behind, they are harmless.
                for folder in vm_folders(d, &vm_name) {
                    if let Err(e) = crate::datastore::remove_commit_leftovers(&folder) {
                        tracing::warn!(folder = %folder.display(), error = %e, "cannot remove a confirmed VM's journal");
                    }
                }
                Ok(format!(
                    "switchover of {vm_name} confirmed: {vm} in the cloud is final and can no longer be rolled back; \
                     its receipt stands; the source may be retired"
                ))
            }),
        )
        .await;
    }

    // From here the host refuses to power the VM on: the rollback powers it off next, and
    // the VM never runs in the cloud once the source may run again.
    let (id, rolling_back_by) = (migration_id.to_owned(), by.clone());
    // Ok(vm): the rollback began; Err(said): another request had just rolled it back,
    // and the edge, asking for the same, is told so.
    let began = blocking(
        domain,
        Box::new(
            move |d: &Domain| match d.inventory.begin_rollback(&id, &rolling_back_by) {
                Ok(vm) => Ok(Ok(vm)),
                Err(e) => ended_meanwhile(d, &id, confirm, through, e).map(Err),
            },
        ),
    )
    .await?;
    let vm = match began {
        Ok(vm) => vm,
        Err(said) => return Ok(said),
    };
    let on_behalf = format!(
        "the rollback of {migration_id} by user {} {}",
        principal.user,
        through.how()
    );
    match Hosts::power(domain, &vm, PowerOp::Off, &on_behalf).await {
        Ok(()) => {}
        Err(e) if e.already_in_state() => {}
        Err(e) => {
            let id = migration_id.to_owned();
            let undone = blocking(
                domain,
                Box::new(move |d: &Domain| d.inventory.cancel_rollback(&id).map_err(refused)),
            )
            .await;
            return Err((
                RefusalCode::EndpointFailure,
                vec![format!(
                    "cannot power {vm} off ({e}){}: the switchover stands, awaiting confirmation; do not start the \
                     source; {}",
                    if undone.is_ok() {
                        ""
                    } else {
                        " and cannot record that the rollback stopped"
                    },
                    through.again(migration_id, false)
                )],
            ));
        }
    }
    let (p, id) = (principal.clone(), migration_id.to_owned());
    blocking(
        domain,
        Box::new(move |d: &Domain| {
            let moves: Vec<CommitMove> = vm_folders(d, &vm_name)
                .into_iter()
                .filter_map(|target| {
                    let root = target.parent()?.to_owned();
                    Some(CommitMove {
                        staging: root.join(".staging").join(&id),
                        target,
                    })
                })
                .collect();
            // Marked, so that a restart that finds the moves unfinished moves these back.
            for m in &moves {
                crate::datastore::mark_folder(&m.target, &id).map_err(|e| endpoint_failure(e.to_string()))?;
            }
            let vm = d.inventory.finish_rollback(&id, &moves, &by).map_err(refused)?;
            let mut problems = Vec::new();
            for m in &moves {
                if let Err(e) = crate::datastore::move_back(&m.target, &m.staging) {
                    problems.push(format!("{} stays in place until the endpoint's next start ({e})", m.target.display()));
                }
            }
            if problems.is_empty() {
                if let Err(e) = d.inventory.clear_commit_moves(&id) {
                    tracing::warn!(migration = %id, error = %e, "cannot clear the rollback's record of moves; the next start does");
                }
            }
            let changed = if problems.is_empty() {
                forget_changed_chunks(d, &p, &id)
            } else {
                Err(problems.join("; "))
            };
            let next = match changed {
                Ok(0) => "the next `edge-agent replicate` pass compares every chunk with the source".to_owned(),
                Ok(n) => format!(
                    "the cloud VM changed {n} chunk(s) of its disks: the next `edge-agent replicate` pass sends them again"
                ),
                Err(e) => format!("the next pass checks the replica ({e})"),
            };
            Ok(format!(
                "switchover of {vm_name} rolled back: {vm} was powered off and unregistered, its disks are the replica \
                 again (state rolled back), and its receipt is superseded; the source can be started again; {next}"
            ))
        }),
    )
    .await
}

/// The folders of VM `vm_name` on every datastore (its home, and those of disks placed
/// elsewhere).
fn vm_folders(domain: &Domain, vm_name: &str) -> Vec<std::path::PathBuf> {
    if crate::datastore::Datastore::check_vm_name(vm_name).is_err() {
        return Vec::new();
    }
    domain
        .datastores()
        .map(|ds| ds.root().join(vm_name))
        .filter(|f| f.is_dir())
        .collect()
}

/// After a rollback: the cloud VM may have run and written its disks, and the journal
/// states the replica as the switchover left it. Every journaled chunk is read back and
/// compared; those that differ are dropped from the journal, so that the next pass sends
/// them (expected-zero ones are rewritten with zeros here, as before a commit). Returns
/// how many were dropped. A replica without a journal (a restart removed it) holds
/// nothing for the next pass, which then sends every chunk.
fn forget_changed_chunks(domain: &Domain, principal: &Principal, id: &str) -> Result<usize, String> {
    let info = domain
        .inventory
        .resume_info(id)
        .map_err(|e| e.to_string())?
        .ok_or("the migration is gone")?;
    // Reopened as the edge that owns it would (a rollback through the API has no edge).
    let edge_cert = info.edge_cert.clone().unwrap_or_default();
    let plan = match info
        .plan
        .as_deref()
        .map(gateway::wire::control::decode::<gateway::plan::MigrationPlan>)
    {
        Some(Ok(gateway::wire::Decoded::Frame(plan, _))) => plan,
        _ => return Err("the migration's plan is not recorded".into()),
    };
    let (staged, durable) = resume(domain, principal, &edge_cert, id, &plan).map_err(|(_, p)| p.join("; "))?;
    let cs = u64::from(plan.chunk_size);
    let mut chunks = Vec::new();
    for (disk, table) in durable.iter().enumerate() {
        for index in 0..table.chunk_count() {
            if let Some(hash) = table.get(index) {
                chunks.push((disk as u16, index, hash));
            }
        }
    }
    let capacities: Vec<u64> = plan.vm.disks.iter().map(|d| d.capacity).collect();
    let found = crate::datastore::read_back(&staged.disks, &capacities, plan.chunk_size, &chunks, 2)
        .map_err(|e| format!("the replica cannot be read: {e}"))?;
    let changed: std::collections::HashSet<(u16, u64)> = found.damaged.iter().copied().collect();
    let mut kept = Unsynced::default();
    for (disk, index, hash) in chunks {
        if changed.contains(&(disk, index)) {
            continue;
        }
        if hash == durable[usize::from(disk)].zero_hash(index) {
            kept.zero_runs.push((disk, index * cs, 1));
        } else {
            kept.chunks.push((disk, index * cs, hash));
        }
    }
    staged
        .disks
        .iter()
        .try_for_each(|d| d.sync_data())
        .map_err(|e| e.to_string())?;
    crate::datastore::Journal::replace(staged.staging.dir(), &kept).map_err(|e| e.to_string())?;
    // The files stay as the replica (dropping `staged` closes them): nothing serves the
    // migration until the next pass.
    let _ = domain.inventory.mark_interrupted(id);
    Ok(changed.len())
}

/// A replica as a test boot copies it (crate::hosts::test_boot).
#[derive(Debug)]
pub struct ReplicaFiles {
    /// The plan the replication started with: the VM's hardware.
    pub plan: gateway::plan::MigrationPlan,
    /// The file holding each disk's data, in plan order, and its format.
    pub disks: Vec<(std::path::PathBuf, crate::datastore::DiskFormat)>,
    /// Passes the replica holds, and when the last one ended (RFC 3339 UTC).
    pub syncs: u64,
    pub last_sync: String,
    /// Who started the replication.
    pub user: String,
}

/// The replica of replication `migration_id`: refused, saying why, unless it is a
/// RUNNING replication with at least one pass kept. Its files are as the last pass (or
/// the one running now) left them: the caller holds them still while it reads them
/// (`LiveMigrations::begin_copy`).
pub fn replica_files(domain: &Domain, migration_id: &str) -> Result<ReplicaFiles, String> {
    let inv = &domain.inventory;
    let failed = |e: InventoryError| format!("cannot read migration {migration_id} from the inventory: {e}");
    let record = inv.migration(migration_id).map_err(failed)?;
    let info = inv.resume_info(migration_id).map_err(failed)?;
    let (Some(record), Some(info)) = (record, info) else {
        return Err(format!("the endpoint has no migration {migration_id}"));
    };
    let Some(replica) = record.replica.filter(|r| r.syncs > 0) else {
        return Err(format!(
            "migration {migration_id} is no replication with a replica yet: only a replication (`edge-agent \
             replicate`) whose first pass has ended can be test-booted"
        ));
    };
    if record.state != "RUNNING" {
        return Err(format!(
            "migration {migration_id} is {}: its replica is no longer kept (a switched-over VM runs as {}; power \
             it on instead)",
            record.state,
            record.vm.as_deref().unwrap_or("no VM")
        ));
    }
    let plan = info
        .plan
        .as_deref()
        .and_then(
            |bytes| match gateway::wire::control::decode::<gateway::plan::MigrationPlan>(bytes) {
                Ok(gateway::wire::Decoded::Frame(plan, _)) => Some(plan),
                _ => None,
            },
        )
        .ok_or_else(|| format!("migration {migration_id} has no readable plan recorded"))?;
    let formats = info
        .disk_format
        .as_deref()
        .and_then(|text| parse_formats(text, plan.vm.disks.len()))
        .ok_or_else(|| format!("migration {migration_id} has no disk format recorded for its disks"))?;
    let domain_info = inv.domain().map_err(failed)?;
    let mut problems = Vec::new();
    let placement = resolve::resolve(domain, &domain_info, &plan, &mut problems)
        .filter(|_| problems.is_empty())
        .ok_or_else(|| format!("the replica of {migration_id} cannot be found: {}", problems.join("; ")))?;
    let (home, others) = open_stagings(domain, migration_id, &plan.vm.name, &placement, false)
        .map_err(|e| format!("the replica of {migration_id} cannot be found: {e}"))?;
    let disks = formats
        .iter()
        .enumerate()
        .map(|(i, &format)| {
            let at = disk_staging(&home, &others, &placement, i);
            (at.disk_data_path(i, format), format)
        })
        .collect();
    Ok(ReplicaFiles {
        plan,
        disks,
        syncs: replica.syncs,
        last_sync: replica.last_sync,
        user: record.user,
    })
}
