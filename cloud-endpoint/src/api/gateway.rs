//! Resources of the gateway itself, under `/api/gateway` (vCenter has no such service):
//! the record of migrations into the domain.

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
