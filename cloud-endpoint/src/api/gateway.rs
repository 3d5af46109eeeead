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
