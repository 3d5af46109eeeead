//! Acting on a migration an edge started before: who may resume or abort it (checked
//! before anything touches it), resuming it on a new connection, keeping it for a resume
//! when its connection ends, and aborting or expiring it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::plan::MigrationPlan;
use gateway::wire::RefusalCode;

use super::{
    disk_staging, endpoint_failure, home_format, map_nics, open_stagings, parse_formats, plan_bytes, resolve, Refusal,
    Staged,
};
use crate::config::Role;
use crate::datastore::DatastoreError;
use crate::inventory::{Principal, ResumeInfo};
use crate::Domain;

/// What a migration's journal holds: one table of chunk hashes per disk of its plan.
pub type Durable = Vec<gateway::integrity::DiskHashes>;

/// What an edge asks to do with a migration it started before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Continue it (`edge-agent migrate` with a checkpoint, or a reconnect).
    Resume,
    /// Discard it (`edge-agent abort`).
    Abort,
    /// Roll back or confirm its switchover (`edge-agent rollback`, `confirm`).
    EndSwitchover,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Resume => "resume",
            Action::Abort => "abort",
            Action::EndSwitchover => "roll back or confirm",
        }
    }
}

/// Whether `principal`, on the edge of certificate `edge_cert`, may `action` migration
/// `migration_id`: a role that migrates, the edge that started it, its user or an
/// Administrator, and the migration still RUNNING. Reads only, so a refusal changes
/// nothing: callers check this before anything touches the migration (the connection
/// that serves it, its files, the edge's checkpoint). Each refusal names the action.
pub fn authorize(
    domain: &Domain,
    principal: &Principal,
    edge_cert: &str,
    migration_id: &str,
    action: Action,
) -> Result<ResumeInfo, Refusal> {
    let verb = action.verb();
    let refused = |why: String| (RefusalCode::NotPermitted, vec![why]);
    if !principal.role.may_migrate() {
        return Err(refused(format!(
            "user {:?} has role {}, which may not {verb} migration {migration_id}: only a MigrationOperator or an \
             Administrator may {verb} migrations; nothing was changed",
            principal.user,
            principal.role.as_str()
        )));
    }
    let unknown = |why: String| (RefusalCode::UnknownMigration, vec![why]);
    let Some(info) = domain.inventory.resume_info(migration_id).map_err(endpoint_failure)? else {
        return Err(unknown(match action {
            Action::Resume => format!("the endpoint has no migration {migration_id}; start a new migration"),
            Action::Abort => format!("the endpoint has no migration {migration_id}; nothing to abort"),
            Action::EndSwitchover => {
                format!("the endpoint has no migration {migration_id}; no switchover to roll back or confirm")
            }
        }));
    };
    if info.edge_cert.as_deref() != Some(edge_cert) {
        return Err(refused(format!(
            "migration {migration_id} belongs to another edge agent (certificate {}); only that agent can {verb} it; \
             nothing was changed",
            info.edge_cert.as_deref().unwrap_or("unknown")
        )));
    }
    if info.user != principal.user && principal.role != Role::Administrator {
        return Err(refused(format!(
            "migration {migration_id} was started by {}; user {} (role {}) may {verb} only their own migrations: ask {} \
             or an Administrator; nothing was changed",
            info.user,
            principal.user,
            principal.role.as_str(),
            info.user
        )));
    }
    let next = match action {
        Action::Resume => "start a new migration",
        Action::Abort => "nothing to abort",
        Action::EndSwitchover => "nothing to roll back or confirm",
    };
    // Where the switchover stands (awaiting confirmation, or ended through the API) is
    // the caller's to check (`replica::end_switchover_as`), in the transaction that acts
    // on it.
    if action == Action::EndSwitchover {
        return match info.state.as_str() {
            "SUCCEEDED" | "RUNNING" => Ok(info),
            state => Err(unknown(format!(
                "migration {migration_id} is {state}, not a switched-over replication: {next}"
            ))),
        };
    }
    match info.state.as_str() {
        "RUNNING" => Ok(info),
        "SUCCEEDED" => Err(unknown(switched_over(
            domain,
            migration_id,
            info.vm.as_deref().unwrap_or("?"),
        ))),
        state => Err(unknown(format!(
            "migration {migration_id} is {state} ({}) and its files are gone; {next}",
            info.error.as_deref().unwrap_or("no reason recorded")
        ))),
    }
}

/// Why a SUCCEEDED migration takes no more passes: a replication whose switchover awaits
/// confirmation (through the API or the edge), or was confirmed (by whom, so that an
/// edge that did not confirm it learns who did), or a finished lift.
fn switched_over(domain: &Domain, migration_id: &str, vm: &str) -> String {
    use crate::inventory::switchover::{AWAITING_CONFIRM, CONFIRMED};
    let replica = domain
        .inventory
        .migration(migration_id)
        .ok()
        .flatten()
        .and_then(|m| m.replica);
    let stands = replica.as_ref().and_then(|r| r.switchover_state.as_deref());
    let by = replica
        .as_ref()
        .and_then(|r| r.switchover_ended_by.as_deref())
        .map(|b| format!(" by {b}"))
        .unwrap_or_default();
    match stands {
        Some(AWAITING_CONFIRM) => format!(
            "migration {migration_id} was switched over to {vm}, which awaits confirmation: nothing more is              replicated onto a VM that may run in the cloud; run `edge-agent confirm` (or POST              /api/gateway/migrations/{migration_id}?action=confirm) to make it final, or `edge-agent rollback` (or              ?action=rollback) to power the cloud VM off and go back to replicating"
        ),
        Some(CONFIRMED) => format!(
            "the switchover of migration {migration_id} to {vm} was confirmed{by}: it is final and the replication              is finished; run `edge-agent confirm` to remove this edge's record of it"
        ),
        _ => format!(
            "migration {migration_id} already SUCCEEDED: the VM is registered as {vm}; its receipt is at GET              /api/gateway/migrations/{migration_id}/receipt"
        ),
    }
}

/// [`authorize`] for a resume, and the plan is the one the migration started with.
pub fn check_resume(
    domain: &Domain,
    principal: &Principal,
    edge_cert: &str,
    migration_id: &str,
    plan: &MigrationPlan,
) -> Result<ResumeInfo, Refusal> {
    let info = authorize(domain, principal, edge_cert, migration_id, Action::Resume)?;
    let Some(stored) = info.plan.as_deref() else {
        return Err((
            RefusalCode::UnknownMigration,
            vec![format!(
                "migration {migration_id} was started by an endpoint version that kept no resume record; abort it and start a new migration"
            )],
        ));
    };
    // A replication's .vmx may change between passes (VMware rewrites it at each
    // snapshot): the plan it started with, with this pass's descriptor digest, which the
    // switchover's receipt signs.
    let replica = domain
        .inventory
        .migration(migration_id)
        .ok()
        .flatten()
        .is_some_and(|m| m.replica.is_some());
    // The seed shapes a first pass's copies, not the VM: a resume or a later pass need
    // not name it again.
    let same = if replica {
        match gateway::wire::control::decode::<MigrationPlan>(stored) {
            Ok(gateway::wire::Decoded::Frame(stored, _)) => {
                let stored = MigrationPlan {
                    source_descriptor_sha256: plan.source_descriptor_sha256,
                    seed: plan.seed.clone(),
                    ..stored
                };
                plan_bytes(&stored) == plan_bytes(plan)
            }
            _ => false,
        }
    } else {
        stored == plan_bytes(plan).as_slice()
            || match gateway::wire::control::decode::<MigrationPlan>(stored) {
                Ok(gateway::wire::Decoded::Frame(stored, _)) => {
                    plan_bytes(&MigrationPlan {
                        seed: plan.seed.clone(),
                        ..stored
                    }) == plan_bytes(plan)
                }
                _ => false,
            }
    };
    if !same {
        return Err((
            RefusalCode::PlanRejected,
            vec![format!(
                "the VM or the options differ from those migration {migration_id} started with; run `edge-agent abort` with the same arguments, then migrate again"
            )],
        ));
    }
    Ok(info)
}

/// Checks that the edge of certificate `edge_cert`, as `principal`, may continue
/// `migration_id` with `plan` (the one it started with: [`check_resume`]), and reopens
/// its staged files and journal. Refusals say what the edge should do instead.
pub fn resume(
    domain: &Domain,
    principal: &Principal,
    edge_cert: &str,
    migration_id: &str,
    plan: &MigrationPlan,
) -> Result<(Staged, Durable), Refusal> {
    let inv = &domain.inventory;
    let info = check_resume(domain, principal, edge_cert, migration_id, plan)?;
    let Some(disk_formats) = info
        .disk_format
        .as_deref()
        .and_then(|text| parse_formats(text, plan.vm.disks.len()))
    else {
        return Err(endpoint_failure(format!(
            "migration {migration_id} has no disk format recorded for its {} disks",
            plan.vm.disks.len()
        )));
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
        for (i, (d, &format)) in plan.vm.disks.iter().zip(&disk_formats).enumerate() {
            let at = disk_staging(&staging, &other_staging, &placement, i);
            disks.push(at.reopen_disk(i, d.capacity, format)?);
        }
        let journal = staging.journal()?;
        let replay = journal.read(plan)?;
        let durable = rehash_stale(plan, staging.dir(), &disks, &journal, replay)?;
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
            format: home_format(domain, plan, &placement),
            placement,
            disk_formats,
            disks,
            journal: Arc::new(journal),
            nic_networks,
            lease: None,
        },
        durable,
    ))
}

/// Chunks an older endpoint journaled with SHA-256 (protocol version 7 and before) are
/// read from the staged disk and hashed again with this build's chunk hash, then
/// journaled so: a hash of another algorithm is never compared with the edge's, and
/// the staged bytes are not sent again when they are right. What a stale chunk holds is
/// checked as strictly as any: the edge compares the new hash with its own and re-sends
/// a chunk that differs, and the read-back and Merkle roots before the commit stand.
fn rehash_stale(
    plan: &MigrationPlan,
    dir: &std::path::Path,
    disks: &[Arc<crate::datastore::DiskFile>],
    journal: &crate::datastore::Journal,
    replay: crate::datastore::Replay,
) -> Result<Vec<gateway::integrity::DiskHashes>, DatastoreError> {
    let mut tables = replay.tables;
    if replay.stale.is_empty() {
        return Ok(tables);
    }
    tracing::warn!(
        chunks = replay.stale.len(),
        hash = gateway::chunk::ChunkHash::CURRENT.name(),
        "the journal holds SHA-256 chunk hashes of an older endpoint; re-hashing those chunks from the staged disks"
    );
    let cs = u64::from(plan.chunk_size);
    let mut buf = vec![0u8; plan.chunk_size as usize];
    let mut rehashed = gateway::protocol::Unsynced::default();
    for (disk, index) in replay.stale {
        let (Some(file), Some(spec)) = (disks.get(usize::from(disk)), plan.vm.disks.get(usize::from(disk))) else {
            continue;
        };
        let offset = index * cs;
        let len = (spec.capacity - offset).min(cs) as usize;
        file.read_at(&mut buf[..len], offset).map_err(|e| DatastoreError::Io {
            action: "re-hash a staged chunk of",
            path: dir.to_owned(),
            source: e,
        })?;
        let hash = gateway::chunk::chunk_hash(&buf[..len]);
        tables[usize::from(disk)].set(index, hash);
        rehashed.chunks.push((disk, offset, hash));
    }
    journal.append(&rehashed).map_err(|e| DatastoreError::Io {
        action: "journal re-hashed chunks",
        path: std::path::PathBuf::from(crate::datastore::JOURNAL_FILE),
        source: e,
    })?;
    Ok(tables)
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
    // Journaled and waiting: the edge may resume it at any endpoint now.
    if let Some(lease) = staged.lease {
        lease.release(&domain.inventory);
    }
    tracing::info!(migration = %staged.migration_id, ?reason, "migration interrupted; kept for a resume");
}

/// Fails the migrations that have waited longer than `window` for their edge, and
/// removes their staged files. Returns their ids.
pub fn expire(domain: &Domain, window: Duration) -> Vec<String> {
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
        // Never under an endpoint that serves it now (its edge came back there).
        match domain
            .ownership
            .while_held(&domain.inventory, &id, || discard_files(domain, &id, &reason))
        {
            Ok(Some(())) => expired.push(id),
            Ok(None) => {}
            Err(e) => tracing::warn!(migration = %id, error = %e, "cannot take the lease to expire the migration"),
        }
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
        Ok(()) => tracing::warn!(migration = ?migration_id, ?reason, "migration discarded"),
        Err(e) => tracing::error!(migration = %migration_id, error = %e, "cannot record the discarded migration"),
    }
}

/// How long an abort waits for the connection that serves the migration to let go.
const ABORT_WAIT: Duration = Duration::from_secs(10);

/// Aborts RUNNING migration `migration_id` for `reason`: the connection that serves it,
/// if any, is closed and its cleanup discards the staged files (waited for, up to 10 s);
/// one that waits for a resume is discarded now. Blocking. The caller checked who asks
/// ([`authorize`], or the API's rule).
pub fn abort(domain: &Domain, migration_id: &str, reason: &str) -> Result<(), crate::inventory::InventoryError> {
    // Another endpoint of the domain serves it: only that one can stop its connection.
    if let Some(lease) = domain.inventory.served_elsewhere(
        migration_id,
        domain.ownership.me(),
        crate::inventory::LeaseClock::Database,
    )? {
        return Err(crate::inventory::InventoryError::ServedElsewhere {
            id: migration_id.to_owned(),
            owner: lease.owner,
        });
    }
    if domain.live.abort(migration_id, reason) {
        // If that cleanup had already decided to keep the files for a resume, they are
        // still there once the connection lets go: discarded below.
        let deadline = Instant::now() + ABORT_WAIT;
        while domain.live.is_live(migration_id) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let running = domain
        .inventory
        .resume_info(migration_id)?
        .is_some_and(|m| m.state == "RUNNING");
    if running && !domain.live.is_live(migration_id) {
        let discarded = domain.ownership.while_held(&domain.inventory, migration_id, || {
            discard_files(domain, migration_id, reason)
        })?;
        if discarded.is_none() {
            let owner = domain
                .inventory
                .served_elsewhere(
                    migration_id,
                    domain.ownership.me(),
                    crate::inventory::LeaseClock::Database,
                )?
                .map_or_else(|| "another endpoint".to_owned(), |l| l.owner);
            return Err(crate::inventory::InventoryError::ServedElsewhere {
                id: migration_id.to_owned(),
                owner,
            });
        }
    }
    Ok(())
}

/// Every lease period: the migrations of endpoints that died while serving them (their
/// leases expired) wait for their edges from now on, which may resume them at any
/// endpoint; those that never recorded a plan cannot resume and are discarded. Runs
/// until dropped.
pub async fn adopt_orphans(domain: Arc<Domain>) {
    let mut tick = tokio::time::interval(domain.ownership.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let domain = domain.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let (unresumable, waiting) = match domain.inventory.interrupt_orphans(crate::inventory::LeaseClock::Database) {
                Ok(found) => found,
                Err(e) => return tracing::warn!(error = %e, "cannot look for migrations of stopped endpoints"),
            };
            for id in &waiting {
                tracing::warn!(migration = %id, "its endpoint stopped renewing its lease; waiting for its edge to resume it at any endpoint");
            }
            for id in unresumable {
                let reason = "its cloud endpoint stopped before the migration's plan was recorded; migrate again";
                let _ = domain
                    .ownership
                    .while_held(&domain.inventory, &id, || discard_files(&domain, &id, reason));
            }
        })
        .await;
    }
}
