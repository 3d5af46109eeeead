//! Where each host's endpoint answers its peers (schema step 14): in a scale-out domain
//! a VM's power operations and console are served by the endpoint of its host, and the
//! other endpoints find that endpoint here (see `crate::hosts::peers`).

use super::{Inventory, InventoryError};
use crate::store_params;

/// What an endpoint records of itself at each start, for the other endpoints.
#[derive(Clone, PartialEq, Eq)]
pub struct HostApi {
    /// `https://name:port` where its API answers the other endpoints; `None` when it
    /// has no address they can reach (no API, or one on an address it cannot name).
    pub url: Option<String>,
    /// The SHA-256 thumbprint of its API certificate (`AA:BB:...`), pinned by callers.
    pub thumbprint: String,
    /// The token it accepts from its peers; a new one at each start.
    pub token: String,
}

// The token stays out of logs and panics.
impl std::fmt::Debug for HostApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostApi")
            .field("url", &self.url)
            .field("thumbprint", &self.thumbprint)
            .field("token", &"(hidden)")
            .finish()
    }
}

/// A VM's host and what its endpoint recorded (see [`Inventory::vm_host`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHost {
    /// The host's id (`host-N`) and name.
    pub id: String,
    pub name: String,
    /// `None` until an endpoint of that host has started and recorded itself.
    pub api: Option<HostApi>,
}

impl Inventory {
    /// Records that the endpoint of host `name` answers at `api`. False when the domain
    /// has no host of that name (a single endpoint whose stored host has another name:
    /// it serves every host alone, and nobody asks).
    pub fn record_host_api(&self, name: &str, api: &HostApi) -> Result<bool, InventoryError> {
        self.write(|tx| {
            let changed = tx.execute(
                "UPDATE host SET api_url = ?2, api_thumbprint = ?3, api_token = ?4 WHERE name = ?1",
                store_params![name, api.url, api.thumbprint, api.token],
            )?;
            Ok(changed > 0)
        })
    }

    /// The host VM `vm_id` is placed on, with where its endpoint answers; `None` for an
    /// unknown VM.
    pub fn vm_host(&self, vm_id: &str) -> Result<Option<VmHost>, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row_opt(
                "SELECT h.id, h.name, h.api_url, h.api_thumbprint, h.api_token FROM vm v JOIN host h ON h.id = v.host
                 WHERE v.id = ?1",
                store_params![vm_id],
                |row| {
                    let url: Option<String> = row.get(2)?;
                    let thumbprint: Option<String> = row.get(3)?;
                    let token: Option<String> = row.get(4)?;
                    Ok(VmHost {
                        id: row.get(0)?,
                        name: row.get(1)?,
                        // Thumbprint and token are written together; a row with neither
                        // was never recorded by an endpoint.
                        api: thumbprint
                            .zip(token)
                            .map(|(thumbprint, token)| HostApi { url, thumbprint, token }),
                    })
                },
            )?)
        })
    }

    /// The API URL host `name`'s endpoint recorded last.
    #[cfg(test)]
    pub(crate) fn host_api_url(&self, name: &str) -> Result<Option<String>, InventoryError> {
        self.read(|tx| {
            Ok(tx
                .query_row_opt("SELECT api_url FROM host WHERE name = ?1", store_params![name], |row| {
                    row.get::<Option<String>>(0)
                })?
                .flatten())
        })
    }
}
