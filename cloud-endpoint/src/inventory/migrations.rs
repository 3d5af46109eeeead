//! The migration records: a RUNNING migration holds its VM name until it SUCCEEDS (the VM
//! is registered) or FAILS (the name is free again).

use super::store::{Row, StoreError, Tx};
use crate::store_params;

use super::{next_number, now, state_of, Inventory, InventoryError, MigrationRecord, Principal};

/// How long a replication pass took, as the endpoint measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassTimes {
    /// From the edge's login to its `SyncDone`: reading and hashing the source, sending
    /// what changed.
    pub pass_ms: u64,
    /// The read-back of the replica before it was kept.
    pub read_back_ms: u64,
}

/// What the endpoint recorded to let an edge resume a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeInfo {
    pub id: String,
    pub vm_name: String,
    pub user: String,
    /// RUNNING, SUCCEEDED or FAILED.
    pub state: String,
    pub error: Option<String>,
    /// The registered VM of a SUCCEEDED migration.
    pub vm: Option<String>,
    pub edge_cert: Option<String>,
    pub plan: Option<Vec<u8>>,
    pub disk_format: Option<String>,
    /// Since when no connection serves it.
    pub interrupted: Option<String>,
}

const SELECT_MIGRATION: &str =
    "SELECT id, vm_name, user_name, edge, state, error, vm, started, finished, logical_bytes,
        EXISTS (SELECT 1 FROM receipt r WHERE r.migration = migration.id),
        replica_syncs, replica_synced, replica_delta_bytes,
        switchover_at, switchover_state, downtime_ms, downtime_from, replica_pass_ms, replica_read_back_ms,
        (SELECT COUNT(*) FROM superseded_receipt s WHERE s.migration = migration.id),
        dedup_bytes, switchover_ended_by
    FROM migration";

fn migration_from_row(row: &Row) -> Result<MigrationRecord, StoreError> {
    Ok(MigrationRecord {
        id: row.get(0)?,
        vm_name: row.get(1)?,
        user: row.get(2)?,
        edge: row.get(3)?,
        state: row.get(4)?,
        error: row.get(5)?,
        vm: row.get(6)?,
        started: row.get(7)?,
        finished: row.get(8)?,
        logical_bytes: row.get(9)?,
        has_receipt: row.get(10)?,
        dedup_bytes: row.get::<Option<u64>>(21)?.unwrap_or(0),
        replica: match row.get::<Option<String>>(12)? {
            Some(last_sync) => Some(super::ReplicaRecord {
                syncs: row.get(11)?,
                last_sync,
                last_delta_bytes: row.get::<Option<u64>>(13)?.unwrap_or(0),
                state: None,
                lag_seconds: None,
                switchover_at: row.get(14)?,
                switchover_window: None,
                switchover_state: row.get(15)?,
                downtime_ms: row.get(16)?,
                downtime_from: row.get(17)?,
                last_pass_ms: row.get(18)?,
                last_read_back_ms: row.get(19)?,
                forecast_switchover_seconds: None,
                forecast_done_at: None,
                superseded_receipts: row.get(20)?,
                switchover_ended_by: row.get(22)?,
            }),
            None => None,
        },
    })
}

/// Whether a registered VM or a RUNNING migration holds `name`.
pub(super) fn name_taken(tx: &mut dyn Tx, name: &str) -> Result<bool, StoreError> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM vm WHERE name = ?1)
             OR EXISTS (SELECT 1 FROM migration WHERE vm_name = ?1 AND state = 'RUNNING')",
        store_params![name],
        |row| row.get(0),
    )
}

impl Inventory {
    /// Whether a registered VM or a RUNNING migration holds the name.
    pub fn vm_name_taken(&self, name: &str) -> Result<bool, InventoryError> {
        self.read(|tx| Ok(name_taken(tx, name)?))
    }

    /// Starts a migration record and reserves `vm_name` for it; fails with NameTaken if a
    /// VM or another RUNNING migration has the name, and NotPermitted for a role that may
    /// not migrate. Returns the migration id (`migration-N`).
    pub fn begin_migration(
        &self,
        principal: &Principal,
        edge: &str,
        vm_name: &str,
        logical_bytes: u64,
    ) -> Result<String, InventoryError> {
        self.begin_migration_on(principal, edge, vm_name, logical_bytes, &[], &|_, _| Ok(u64::MAX), None)
    }

    /// [`Self::begin_migration`], reserving `space` (datastore id, bytes) on each
    /// datastore the disks go to, in the same transaction, where each datastore's free
    /// space is checked again: `free` gives it (datastore id, what the inventory counts
    /// on it, this transaction's view). Two plans checked at the same time cannot both
    /// take the same free bytes: the second sees the first's reservation, or waits for it.
    /// `lease` (owner, period) gives the migration its first lease in the same
    /// transaction: no other endpoint may take it for an orphan before its owner keeps it.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_migration_on(
        &self,
        principal: &Principal,
        edge: &str,
        vm_name: &str,
        logical_bytes: u64,
        space: &[(String, u64)],
        free: &dyn Fn(&str, super::DatastoreUse) -> Result<u64, String>,
        lease: Option<(&str, std::time::Duration)>,
    ) -> Result<String, InventoryError> {
        if !principal.role.may_migrate() {
            return Err(InventoryError::NotPermitted {
                user: principal.user.clone(),
                role: principal.role,
            });
        }
        self.write(|tx| {
            if name_taken(tx, vm_name)? {
                return Err(InventoryError::NameTaken {
                    name: vm_name.to_owned(),
                });
            }
            for (datastore, needed) in space {
                let used = super::vms::space_on(tx, datastore)?;
                let free = free(datastore, used).map_err(|reason| InventoryError::FreeSpace {
                    datastore: datastore.clone(),
                    reason,
                })?;
                if *needed > free {
                    return Err(InventoryError::NoSpace {
                        datastore: datastore.clone(),
                        needed: *needed,
                        free,
                    });
                }
            }
            let num = next_number(tx, "migration")?;
            let id = format!("migration-{num}");
            tx.execute(
                "INSERT INTO migration (num, id, vm_name, user_name, edge, state, started, logical_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'RUNNING', ?6, ?7)",
                store_params![num, id, vm_name, principal.user, edge, now(), logical_bytes],
            )?;
            for (datastore, bytes) in space {
                tx.execute(
                    "INSERT INTO migration_space (migration, datastore, bytes) VALUES (?1, ?2, ?3)
                     ON CONFLICT (migration, datastore) DO UPDATE SET bytes = migration_space.bytes + excluded.bytes",
                    store_params![id, datastore, bytes],
                )?;
            }
            if let Some((owner, period)) = lease {
                super::leases::insert_first(tx, &id, owner, period)?;
            }
            Ok(id)
        })
    }

    /// Marks a RUNNING migration FAILED with `error`, which frees its VM name. Failing an
    /// already FAILED migration does nothing (the first error stays); a SUCCEEDED one is
    /// refused with MigrationNotRunning.
    pub fn fail_migration(&self, migration_id: &str, error: &str) -> Result<(), InventoryError> {
        self.write(|tx| {
            let (state, _) = state_of(tx, migration_id)?;
            match state.as_str() {
                "RUNNING" => {
                    tx.execute(
                        "UPDATE migration SET state = 'FAILED', error = ?2, finished = ?3 WHERE id = ?1",
                        store_params![migration_id, error, now()],
                    )?;
                    Ok(())
                }
                "FAILED" => Ok(()),
                _ => Err(InventoryError::MigrationNotRunning {
                    id: migration_id.to_owned(),
                    state,
                }),
            }
        })
    }

    /// Marks every RUNNING migration FAILED with `reason` (at start: a restart cut them);
    /// returns their ids in order.
    pub fn fail_running_migrations(&self, reason: &str) -> Result<Vec<String>, InventoryError> {
        self.write(|tx| {
            let ids: Vec<String> = tx.query_map(
                "SELECT id FROM migration WHERE state = 'RUNNING' ORDER BY num",
                &[],
                |row| row.get(0),
            )?;
            tx.execute(
                "UPDATE migration SET state = 'FAILED', error = ?1, finished = ?2 WHERE state = 'RUNNING'",
                store_params![reason, now()],
            )?;
            Ok(ids)
        })
    }

    /// Records what a resume needs (see the schema's step 4) for a RUNNING migration
    /// whose files are now staged; the migration counts as served by a connection.
    pub fn set_resume_info(
        &self,
        migration_id: &str,
        edge_cert: &str,
        plan: &[u8],
        disk_format: &str,
    ) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE migration SET edge_cert = ?2, plan = ?3, disk_format = ?4, interrupted = NULL
                 WHERE id = ?1 AND state = 'RUNNING'",
                store_params![migration_id, edge_cert, plan, disk_format],
            )?;
            Ok(())
        })
    }

    /// The resume record of a migration, or None if there is no such migration.
    pub fn resume_info(&self, migration_id: &str) -> Result<Option<ResumeInfo>, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row_opt(
                "SELECT id, vm_name, user_name, state, error, vm, edge_cert, plan, disk_format, interrupted
                     FROM migration WHERE id = ?1",
                store_params![migration_id],
                |row| {
                    Ok(ResumeInfo {
                        id: row.get(0)?,
                        vm_name: row.get(1)?,
                        user: row.get(2)?,
                        state: row.get(3)?,
                        error: row.get(4)?,
                        vm: row.get(5)?,
                        edge_cert: row.get(6)?,
                        plan: row.get(7)?,
                        disk_format: row.get(8)?,
                        interrupted: row.get(9)?,
                    })
                },
            )?)
        })
    }

    /// A RUNNING migration lost its connection (or the endpoint restarted): it waits
    /// for its edge to resume it. Keeps an earlier time if it was already waiting.
    pub fn mark_interrupted(&self, migration_id: &str) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE migration SET interrupted = COALESCE(interrupted, ?2) WHERE id = ?1 AND state = 'RUNNING'",
                store_params![migration_id, now()],
            )?;
            Ok(())
        })
    }

    /// A connection serves the migration again.
    pub fn mark_resumed(&self, migration_id: &str) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE migration SET interrupted = NULL WHERE id = ?1 AND state = 'RUNNING'",
                store_params![migration_id],
            )?;
            Ok(())
        })
    }

    /// At start: every RUNNING migration this endpoint (`me`) served lost its connection
    /// with the previous process, and so did those no endpoint holds a live lease of (on
    /// a shared database, migrations other endpoints serve now are left alone). Those
    /// that cannot be resumed (no plan recorded) are FAILED with `reason`; the others
    /// wait for their edge. The leases `me` held are given up: the restarted endpoint
    /// holds none until an edge comes back. Returns (failed, waiting) ids.
    pub fn interrupt_running_migrations(
        &self,
        reason: &str,
        me: &str,
    ) -> Result<(Vec<String>, Vec<String>), InventoryError> {
        self.write(|tx| {
            let db_now = super::leases::now_ms(tx, super::LeaseClock::Database)?;
            // Not served by another endpoint's live lease.
            const CUT: &str = "state = 'RUNNING' AND NOT EXISTS (SELECT 1 FROM migration_lease l
                 WHERE l.migration = migration.id AND l.owner <> ?1 AND l.expires_ms > ?2)";
            let cut: Vec<(String, bool)> = tx.query_map(
                &format!("SELECT id, plan IS NOT NULL FROM migration WHERE {CUT} ORDER BY num"),
                store_params![me, db_now],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let at = now();
            let (mut failed, mut waiting) = (Vec::new(), Vec::new());
            for (id, resumable) in cut {
                if resumable {
                    tx.execute(
                        "UPDATE migration SET interrupted = COALESCE(interrupted, ?2) WHERE id = ?1",
                        store_params![id, at],
                    )?;
                    waiting.push(id);
                } else {
                    tx.execute(
                        "UPDATE migration SET state = 'FAILED', error = ?2, finished = ?3 WHERE id = ?1",
                        store_params![id, reason, at],
                    )?;
                    failed.push(id);
                }
            }
            tx.execute(
                "UPDATE migration_lease SET expires_ms = 0 WHERE owner = ?1 AND expires_ms > 0",
                store_params![me],
            )?;
            Ok((failed, waiting))
        })
    }

    /// RUNNING migrations that have waited for their edge since before `cutoff`
    /// (RFC 3339, compared as text: every time here is UTC with the same layout).
    pub fn interrupted_before(&self, cutoff: &str) -> Result<Vec<String>, InventoryError> {
        self.read(|tx| {
            let ids = tx.query_map(
                "SELECT id FROM migration WHERE state = 'RUNNING' AND interrupted IS NOT NULL AND interrupted < ?1
                 AND replica_synced IS NULL ORDER BY num",
                store_params![cutoff],
                |row| row.get(0),
            )?;
            Ok(ids)
        })
    }

    /// A pass of the replication `migration_id` ended with its replica read back and
    /// durable: `delta_bytes` were written by it, in `pass` (the edge's login to its
    /// `SyncDone`) and `read_back` (the read-back). `schedule` is the edge's change to the
    /// scheduled switchover, if it sent one (`Some(None)` clears it). A rollback's state
    /// ends here: the replica is in sync again. Returns the scheduled switchover held now.
    pub fn record_replica_sync(
        &self,
        migration_id: &str,
        delta_bytes: u64,
        pass: PassTimes,
        schedule: Option<Option<&str>>,
    ) -> Result<Option<String>, InventoryError> {
        self.write(|tx| {
            let (state, _) = state_of(tx, migration_id)?;
            if state != "RUNNING" {
                return Err(InventoryError::MigrationNotRunning {
                    id: migration_id.to_owned(),
                    state,
                });
            }
            tx.execute(
                "UPDATE migration SET replica_syncs = replica_syncs + 1, replica_synced = ?2,
                     replica_delta_bytes = ?3, replica_pass_ms = ?4, replica_read_back_ms = ?5,
                     switchover_state = NULL WHERE id = ?1",
                store_params![migration_id, now(), delta_bytes, pass.pass_ms, pass.read_back_ms],
            )?;
            if let Some(at) = schedule {
                tx.execute(
                    "UPDATE migration SET switchover_at = ?2 WHERE id = ?1",
                    store_params![migration_id, at],
                )?;
            }
            let held: Option<String> = tx.query_row(
                "SELECT switchover_at FROM migration WHERE id = ?1",
                store_params![migration_id],
                |row| row.get(0),
            )?;
            Ok(held)
        })
    }

    /// Ids of RUNNING migrations (their staging folders are kept at start).
    pub fn running_migrations(&self) -> Result<Vec<String>, InventoryError> {
        self.read(|tx| {
            let ids = tx.query_map(
                "SELECT id FROM migration WHERE state = 'RUNNING' ORDER BY num",
                &[],
                |row| row.get(0),
            )?;
            Ok(ids)
        })
    }

    /// Every migration, oldest first.
    pub fn list_migrations(&self) -> Result<Vec<MigrationRecord>, InventoryError> {
        self.read(|tx| {
            let rows = tx.query_map(&format!("{SELECT_MIGRATION} ORDER BY num"), &[], migration_from_row)?;
            Ok(rows)
        })
    }

    /// One migration by id.
    pub fn migration(&self, migration_id: &str) -> Result<Option<MigrationRecord>, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row_opt(
                &format!("{SELECT_MIGRATION} WHERE id = ?1"),
                store_params![migration_id],
                migration_from_row,
            )?)
        })
    }
}

/// One folder a commit moves: a migration's staging folder and the VM folder it becomes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitMove {
    pub staging: std::path::PathBuf,
    pub target: std::path::PathBuf,
}

/// A commit a restart found unfinished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCommit {
    pub migration_id: String,
    /// RUNNING (the VM was not registered) or SUCCEEDED (it was).
    pub state: String,
    pub moves: Vec<CommitMove>,
}

impl Inventory {
    /// Records the folders a commit is about to move, durably, before the first move.
    pub fn record_commit_moves(&self, migration_id: &str, moves: &[CommitMove]) -> Result<(), InventoryError> {
        let json = serde_json::to_string(moves).map_err(|e| InventoryError::Invalid(e.to_string()))?;
        self.write(|tx| {
            tx.execute(
                "UPDATE migration SET commit_moves = ?2 WHERE id = ?1",
                store_params![migration_id, json],
            )?;
            Ok(())
        })
    }

    /// The commit is done, or undone: nothing to finish at the next start.
    pub fn clear_commit_moves(&self, migration_id: &str) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE migration SET commit_moves = NULL WHERE id = ?1",
                store_params![migration_id],
            )?;
            Ok(())
        })
    }

    /// Commits that a crash cut, in the order they were started.
    pub fn pending_commits(&self) -> Result<Vec<PendingCommit>, InventoryError> {
        self.read(|tx| {
            let rows = tx.query_map(
                "SELECT id, state, commit_moves FROM migration WHERE commit_moves IS NOT NULL ORDER BY num",
                &[],
                |row| Ok((row.get::<String>(0)?, row.get::<String>(1)?, row.get::<String>(2)?)),
            )?;
            rows.into_iter()
                .map(|(migration_id, state, json)| {
                    let moves = serde_json::from_str(&json).map_err(|e| {
                        InventoryError::Invalid(format!(
                            "the commit record of migration {migration_id} is unreadable: {e}"
                        ))
                    })?;
                    Ok(PendingCommit {
                        migration_id,
                        state,
                        moves,
                    })
                })
                .collect()
        })
    }
}
