//! Firewall rules carried with migrated VMs, and the migration reports. Both are written
//! by the transaction that registers the VM (see `vms.rs`), so a registered VM always has
//! the rules it came with and its migration the report of what was created.

use super::store::Tx;
use crate::store_params;
use gateway::plan::{FirewallGroup, FirewallRule, FirewallSpec, IpSet, NotCarried};
use serde::Serialize;

use super::{Inventory, InventoryError};

/// A VM's firewall rules as the cloud domain keeps them: references to VMs are ids.
#[derive(Debug, Clone, Serialize)]
pub struct VmFirewall {
    pub vm: String,
    pub rules: Vec<FirewallRule>,
    pub groups: Vec<FirewallGroup>,
    pub ip_sets: Vec<IpSet>,
    /// What the source had that was not carried (from the migration's report).
    pub not_carried: Vec<NotCarried>,
}

/// The part of a stored report [`Inventory::vm_firewall`] reads.
#[derive(serde::Deserialize)]
struct NotCarriedOf {
    #[serde(default)]
    not_carried: Vec<NotCarried>,
}

fn json<T: Serialize>(value: &T) -> Result<String, InventoryError> {
    serde_json::to_string(value).map_err(|e| InventoryError::Invalid(format!("cannot encode a firewall rule: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, InventoryError> {
    serde_json::from_str(text).map_err(|e| InventoryError::Invalid(format!("stored {what} is unreadable: {e}")))
}

/// Stores `spec` for VM `vm_id` (named `vm_name` in the cloud), inside the registering
/// transaction: references to the VM (its source name or its cloud name) become `vm_id`,
/// and references to other VMs of the domain their ids.
pub(super) fn insert(tx: &mut dyn Tx, vm_id: &str, vm_name: &str, spec: &FirewallSpec) -> Result<(), InventoryError> {
    if spec.rules.is_empty() && spec.groups.is_empty() && spec.ip_sets.is_empty() {
        return Ok(());
    }
    let mut spec = spec.clone();
    let own = [spec.source_vm.clone(), vm_name.to_owned()];
    let mut lookup_failed = None;
    spec.resolve_vms(|name| {
        if own.iter().any(|o| o == name) {
            return Some(vm_id.to_owned());
        }
        match tx.query_row_opt("SELECT id FROM vm WHERE name = ?1", store_params![name], |r| {
            r.get::<String>(0)
        }) {
            Ok(id) => id,
            Err(e) => {
                lookup_failed = Some(e);
                None
            }
        }
    });
    if let Some(e) = lookup_failed {
        return Err(e.into());
    }
    for (position, rule) in spec.rules.iter().enumerate() {
        tx.execute(
            "INSERT INTO firewall_rule (vm, position, rule_id, name, action, direction, disabled, rule)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            store_params![
                vm_id,
                position as i64,
                rule.id,
                rule.name,
                rule.action.as_str(),
                rule.direction.as_str(),
                rule.disabled,
                json(rule)?
            ],
        )?;
    }
    for g in &spec.groups {
        tx.execute(
            "INSERT INTO firewall_group (vm, kind, name, members) VALUES (?1, 'GROUP', ?2, ?3)",
            store_params![vm_id, g.name, json(&g.members)?],
        )?;
    }
    for s in &spec.ip_sets {
        tx.execute(
            "INSERT INTO firewall_group (vm, kind, name, members) VALUES (?1, 'IP_SET', ?2, ?3)",
            store_params![vm_id, s.name, json(&s.addresses)?],
        )?;
    }
    Ok(())
}

impl Inventory {
    /// The firewall rules of a VM, in their original order; `None` if there is no such VM.
    pub fn vm_firewall(&self, vm_id: &str) -> Result<Option<VmFirewall>, InventoryError> {
        self.read(|tx| {
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM vm WHERE id = ?1)",
                store_params![vm_id],
                |r| r.get(0),
            )?;
            if !exists {
                return Ok(None);
            }
            let rules: Vec<String> = tx.query_map(
                "SELECT rule FROM firewall_rule WHERE vm = ?1 ORDER BY position",
                store_params![vm_id],
                |r| r.get(0),
            )?;
            let groups: Vec<(String, String, String)> = tx.query_map(
                "SELECT kind, name, members FROM firewall_group WHERE vm = ?1 ORDER BY kind, name",
                store_params![vm_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let report: Option<String> = tx.query_row_opt(
                "SELECT r.report FROM migration_report r JOIN migration m ON m.id = r.migration WHERE m.vm = ?1",
                store_params![vm_id],
                |r| r.get(0),
            )?;
            let mut fw = VmFirewall {
                vm: vm_id.to_owned(),
                rules: rules
                    .iter()
                    .map(|r| parse(r, "firewall rule"))
                    .collect::<Result<_, _>>()?,
                groups: Vec::new(),
                ip_sets: Vec::new(),
                // Only this part of the report: it may gain fields over versions.
                not_carried: match report {
                    Some(r) => parse::<NotCarriedOf>(&r, "migration report")?.not_carried,
                    None => Vec::new(),
                },
            };
            for (kind, name, members) in groups {
                if kind == "GROUP" {
                    fw.groups.push(FirewallGroup {
                        name,
                        members: parse(&members, "firewall group")?,
                    });
                } else {
                    fw.ip_sets.push(IpSet {
                        name,
                        addresses: parse(&members, "IP set")?,
                    });
                }
            }
            Ok(Some(fw))
        })
    }

    /// The report of a migration (JSON, as stored at commit); `None` if it registered no
    /// VM (running or failed). NotFound if there is no such migration.
    pub fn migration_report(&self, migration_id: &str) -> Result<Option<String>, InventoryError> {
        self.read(|tx| {
            super::state_of(tx, migration_id)?;
            Ok(tx.query_row_opt(
                "SELECT report FROM migration_report WHERE migration = ?1",
                store_params![migration_id],
                |row| row.get(0),
            )?)
        })
    }

    /// The id of the VM named `name`, if there is one.
    pub fn vm_id_by_name(&self, name: &str) -> Result<Option<String>, InventoryError> {
        self.read(|tx| Ok(tx.query_row_opt("SELECT id FROM vm WHERE name = ?1", store_params![name], |r| r.get(0))?))
    }

    /// Whether a VM of this id exists.
    pub fn vm_exists(&self, vm_id: &str) -> Result<bool, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM vm WHERE id = ?1)",
                store_params![vm_id],
                |r| r.get(0),
            )?)
        })
    }
}
