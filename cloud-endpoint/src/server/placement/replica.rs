//! Replications: between passes the staged disks and their journal stay as the
//! replica of a source that keeps running, and a switchover commits them like a cold
//! lift's. What a pass does on the wire is in `gateway::protocol` (`Sync`, `SyncDone`).

use gateway::protocol::Unsynced;

use super::{Domain, Staged};
use gateway::wire::RefusalCode;

/// A pass ended and its read-back found the replica as the edge sealed it: make what
/// the pass wrote durable (the disks, then the journal, with `unsynced`: the last zero
/// runs and chunks not yet journaled), then record the pass. The staging stays, for the
/// next pass or the switchover.
pub fn keep_replica(
    domain: &Domain,
    staged: &Staged,
    unsynced: &Unsynced,
    delta_bytes: u64,
) -> Result<(), (RefusalCode, String)> {
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
    domain
        .inventory
        .record_replica_sync(&staged.migration_id, delta_bytes)
        .map_err(|e| (RefusalCode::EndpointFailure, e.to_string()))
}
