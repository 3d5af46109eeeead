//! Resources of the gateway itself, under `/api/gateway` (vCenter has no such service):
//! the record of migrations into the domain and their signed receipts.

use crate::api::error::ApiError;
use crate::inventory::MigrationRecord;
use crate::Domain;

/// Every migration, oldest first, running ones included.
pub fn list_migrations(domain: &Domain) -> Result<Vec<MigrationRecord>, ApiError> {
    Ok(domain.inventory.list_migrations()?)
}

pub fn get_migration(domain: &Domain, id: &str) -> Result<MigrationRecord, ApiError> {
    domain
        .inventory
        .migration(id)?
        .ok_or_else(|| ApiError::not_found(format!("migration {id} is not in the inventory")))
}

/// The signed receipt of a migration, exactly as the endpoint issued it to the edge.
pub fn get_receipt(domain: &Domain, id: &str) -> Result<String, ApiError> {
    domain.inventory.receipt(id)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "migration {id} has no receipt: only a migration that registered its VM (state SUCCEEDED) has one"
        ))
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
    if record.state != "RUNNING" {
        return Err(ApiError::invalid_argument(format!(
            "migration {id} is {}; only a RUNNING migration can be aborted",
            record.state
        )));
    }
    let reason = format!("aborted through the API by {}", principal.user);
    if !domain.live.abort(id, &reason) {
        crate::server::placement::discard_files(domain, id, &reason);
    }
    get_migration(domain, id)
}
