//! Signed migration receipts: one per migration that registered a VM, stored in the
//! transaction that registers it, so a registered VM always has its receipt.

use crate::store_params;

use super::{Inventory, InventoryError};

impl Inventory {
    /// The signed receipt of a migration, exactly as it was issued; `None` if the migration
    /// registered no VM (running or failed). NotFound if there is no such migration.
    pub fn receipt(&self, migration_id: &str) -> Result<Option<String>, InventoryError> {
        self.read(|tx| {
            super::state_of(tx, migration_id)?;
            Ok(tx.query_row_opt(
                "SELECT signed FROM receipt WHERE migration = ?1",
                store_params![migration_id],
                |row| row.get(0),
            )?)
        })
    }
}
