//! The switchover lifecycle of a replication (see docs/replication.md): a switchover
//! registers the VM and may leave it reversible (`awaiting confirm`) until the edge
//! confirms it (`done`) or rolls it back (`rolling back`, then `rolled back`: the VM is
//! unregistered, the migration RUNNING again with its disks as the replica, its receipt
//! superseded). The scheduled switchover time lives here too.

use super::store::Tx;
use crate::store_params;

use super::{now, state_of, CommitMove, Inventory, InventoryError};

/// A switchover that can still be rolled back.
pub const AWAITING_CONFIRM: &str = "awaiting confirm";
/// Confirmed: final.
pub const CONFIRMED: &str = "done";
/// Being rolled back: the VM is being powered off; the host refuses to power it on.
pub const ROLLING_BACK: &str = "rolling back";
/// Rolled back: the VM is unregistered, its disks are the replica again.
pub const ROLLED_BACK: &str = "rolled back";

/// Refuses a migration that is not RUNNING, or not a replication with a pass done: only
/// such a replication's switchover `what` (can be scheduled, has a window).
fn running_replica(tx: &mut dyn Tx, migration_id: &str, what: &str) -> Result<(), InventoryError> {
    let (state, _) = state_of(tx, migration_id)?;
    if state != "RUNNING" {
        return Err(InventoryError::MigrationNotRunning {
            id: migration_id.to_owned(),
            state,
        });
    }
    let replica: bool = tx.query_row(
        "SELECT replica_synced IS NOT NULL FROM migration WHERE id = ?1",
        store_params![migration_id],
        |row| row.get(0),
    )?;
    if !replica {
        return Err(InventoryError::Invalid(format!(
            "migration {migration_id} is not a replication with a pass done; only a replication's switchover {what}"
        )));
    }
    Ok(())
}

impl Inventory {
    /// Sets (`Some`, RFC 3339 UTC) or clears the scheduled switchover of the RUNNING
    /// replication `migration_id`. Refused for a migration that is not a replication
    /// with a first pass done, or not RUNNING.
    pub fn set_switchover_at(&self, migration_id: &str, at: Option<&str>) -> Result<(), InventoryError> {
        self.write(|tx| {
            running_replica(tx, migration_id, "can be scheduled")?;
            tx.execute(
                "UPDATE migration SET switchover_at = ?2 WHERE id = ?1",
                store_params![migration_id, at],
            )?;
            Ok(())
        })
    }

    /// Sets (`Some`, `HH:MM-HH:MM` UTC) or clears the daily window the scheduled
    /// switchover of the RUNNING replication `migration_id` must start in. Refused as
    /// [`Self::set_switchover_at`] is.
    pub fn set_switchover_window(&self, migration_id: &str, window: Option<&str>) -> Result<(), InventoryError> {
        self.write(|tx| {
            running_replica(tx, migration_id, "has a window")?;
            tx.execute(
                "UPDATE migration SET switchover_window = ?2 WHERE id = ?1",
                store_params![migration_id, window],
            )?;
            Ok(())
        })
    }

    /// The daily window of `migration_id`'s scheduled switchover, if one is set.
    pub fn switchover_window(&self, migration_id: &str) -> Result<Option<String>, InventoryError> {
        self.read(|tx| {
            Ok(tx
                .query_row_opt(
                    "SELECT switchover_window FROM migration WHERE id = ?1",
                    store_params![migration_id],
                    |row| row.get::<Option<String>>(0),
                )?
                .flatten())
        })
    }

    /// The switchover of `migration_id` registered its VM: it awaits confirmation
    /// (`awaiting_confirm`) or is final, and cost `downtime_ms` from `downtime_from`
    /// (`gateway::wire::DowntimeFrom::describe`)
    /// (absent when the VM was not powered on). The schedule is done with.
    pub fn record_switchover(
        &self,
        migration_id: &str,
        awaiting_confirm: bool,
        downtime_ms: Option<u64>,
        downtime_from: &str,
    ) -> Result<(), InventoryError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE migration SET switchover_state = ?2, downtime_ms = ?3, downtime_from = ?4, switchover_at = NULL,
                     switchover_ended_by = NULL
                 WHERE id = ?1 AND state = 'SUCCEEDED'",
                store_params![
                    migration_id,
                    if awaiting_confirm { AWAITING_CONFIRM } else { CONFIRMED },
                    downtime_ms,
                    downtime_from
                ],
            )?;
            Ok(())
        })
    }

    /// The rollback of `migration_id`'s switchover starts, asked by `by` (who, and how,
    /// recorded so that a request that comes meanwhile is told who is rolling it back):
    /// from now on the host refuses to power its VM on. Refused unless the switchover
    /// awaits confirmation. Returns the VM.
    pub fn begin_rollback(&self, migration_id: &str, by: &str) -> Result<String, InventoryError> {
        self.move_switchover(migration_id, AWAITING_CONFIRM, ROLLING_BACK, Some(by))
    }

    /// A rollback that could not power the VM off: the switchover stands, reversible,
    /// and ended by no one.
    pub fn cancel_rollback(&self, migration_id: &str) -> Result<String, InventoryError> {
        self.move_switchover(migration_id, ROLLING_BACK, AWAITING_CONFIRM, None)
    }

    /// Confirms the switchover of `migration_id`, as `by` says (who, and how): final,
    /// no rollback. Returns the VM.
    pub fn confirm_switchover(&self, migration_id: &str, by: &str) -> Result<String, InventoryError> {
        self.move_switchover(migration_id, AWAITING_CONFIRM, CONFIRMED, Some(by))
    }

    /// Moves the switchover of `migration_id` from state `from` to `to`, recording who
    /// ends it (`by`; `None` when it is back to awaiting confirmation).
    fn move_switchover(
        &self,
        migration_id: &str,
        from: &str,
        to: &str,
        by: Option<&str>,
    ) -> Result<String, InventoryError> {
        self.write(|tx| {
            let (state, _) = state_of(tx, migration_id)?;
            let (switchover, vm): (Option<String>, Option<String>) = tx.query_row(
                "SELECT switchover_state, vm FROM migration WHERE id = ?1",
                store_params![migration_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let (Some(vm), true) = (vm, state == "SUCCEEDED" && switchover.as_deref() == Some(from)) else {
                return Err(InventoryError::Invalid(format!(
                    "migration {migration_id} is {state}{}, not a switchover that is {from}",
                    switchover.map(|s| format!(" (switchover {s})")).unwrap_or_default()
                )));
            };
            tx.execute(
                "UPDATE migration SET switchover_state = ?2, switchover_ended_by = ?3 WHERE id = ?1",
                store_params![migration_id, to, by],
            )?;
            Ok(vm)
        })
    }

    /// The VM of a rollback is powered off: unregister it and make `migration_id` a
    /// RUNNING replication again, in one transaction. Its receipt moves to the
    /// superseded ones (unchanged: it still says what the cloud registered then), its
    /// report goes, and `moves` (each VM folder back to its staging folder) are recorded
    /// so that a restart finishes moving them; `by` says who rolled it back, and how.
    /// Returns the VM that was unregistered.
    pub fn finish_rollback(
        &self,
        migration_id: &str,
        moves: &[CommitMove],
        by: &str,
    ) -> Result<String, InventoryError> {
        let json = serde_json::to_string(moves).map_err(|e| InventoryError::Invalid(e.to_string()))?;
        self.write(|tx| {
            let (state, _) = state_of(tx, migration_id)?;
            let (switchover, vm): (Option<String>, Option<String>) = tx.query_row(
                "SELECT switchover_state, vm FROM migration WHERE id = ?1",
                store_params![migration_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let (Some(vm), true) = (vm, state == "SUCCEEDED" && switchover.as_deref() == Some(ROLLING_BACK)) else {
                return Err(InventoryError::Invalid(format!(
                    "migration {migration_id} is {state}, not a switchover being rolled back"
                )));
            };
            let at = now();
            tx.execute(
                "INSERT INTO superseded_receipt (migration, vm, signed, created, superseded)
                 SELECT migration, vm, signed, created, ?2 FROM receipt WHERE migration = ?1",
                store_params![migration_id, at],
            )?;
            tx.execute("DELETE FROM receipt WHERE migration = ?1", store_params![migration_id])?;
            tx.execute(
                "DELETE FROM migration_report WHERE migration = ?1",
                store_params![migration_id],
            )?;
            tx.execute(
                "UPDATE migration SET state = 'RUNNING', vm = NULL, finished = NULL, error = NULL,
                     switchover_state = ?2, interrupted = ?3, commit_moves = ?4, switchover_ended_by = ?5 WHERE id = ?1",
                store_params![migration_id, ROLLED_BACK, at, json, by],
            )?;
            tx.execute("DELETE FROM vm WHERE id = ?1", store_params![&vm])?;
            Ok(vm)
        })
    }

    /// Whether the host must refuse to power `vm_id` on: its migration's switchover is
    /// being rolled back. Returns the migration.
    pub fn power_on_blocked(&self, vm_id: &str) -> Result<Option<String>, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row_opt(
                "SELECT id FROM migration WHERE vm = ?1 AND switchover_state IN (?2, ?3)",
                store_params![vm_id, ROLLING_BACK, ROLLED_BACK],
                |row| row.get(0),
            )?)
        })
    }

    /// The receipts of `migration_id`'s rolled-back switchovers, oldest first.
    pub fn superseded_receipts(&self, migration_id: &str) -> Result<Vec<String>, InventoryError> {
        self.read(|tx| {
            state_of(tx, migration_id)?;
            let rows = tx.query_map(
                "SELECT signed FROM superseded_receipt WHERE migration = ?1 ORDER BY superseded",
                store_params![migration_id],
                |row| row.get(0),
            )?;
            Ok(rows)
        })
    }
}
