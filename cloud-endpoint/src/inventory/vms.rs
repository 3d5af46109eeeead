//! Registered VMs: inserted at the end of a migration, listed for the API.

use std::collections::{HashMap, HashSet};

use super::store::{Row, StoreError, Tx};
use crate::store_params;

use super::{
    next_number, now, state_of, DiskRecord, Inventory, InventoryError, NewVm, NicRecord, ReceiptContext, RegisteredVm,
    VmRecord,
};

const SELECT_VM: &str = "SELECT v.id, v.name, v.guest_os, v.num_cpus, v.cores_per_socket, v.memory_mib, v.firmware,
        v.bios_uuid, v.power_state, v.host, v.datastore, v.folder, v.vmx_path, m.id, v.created,
        COALESCE(v.instance_uuid, ''), v.resource_pool, h.cluster
    FROM vm v LEFT JOIN migration m ON m.vm = v.id JOIN host h ON h.id = v.host";

fn vm_from_row(row: &Row) -> Result<VmRecord, StoreError> {
    Ok(VmRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        guest_os: row.get(2)?,
        num_cpus: row.get(3)?,
        cores_per_socket: row.get(4)?,
        memory_mib: row.get(5)?,
        firmware: row.get(6)?,
        bios_uuid: row.get(7)?,
        power_state: row.get(8)?,
        host: row.get(9)?,
        datastore: row.get(10)?,
        folder: row.get(11)?,
        vmx_path: row.get(12)?,
        disks: Vec::new(),
        controllers: Vec::new(),
        nics: Vec::new(),
        migration: row.get(13)?,
        created: row.get(14)?,
        instance_uuid: row.get(15)?,
        resource_pool: match row.get::<Option<String>>(16)? {
            Some(pool) => pool,
            None => super::root_resource_pool(&row.get::<String>(17)?),
        },
    })
}

/// Fills in disks and NICs, in their registered order.
fn with_devices(tx: &mut dyn Tx, mut vm: VmRecord) -> Result<VmRecord, StoreError> {
    vm.disks = tx.query_map(
        "SELECT key, path, capacity_bytes, COALESCE(datastore, ?2) FROM vm_disk WHERE vm = ?1 ORDER BY position",
        store_params![&vm.id, &vm.datastore],
        |row| {
            Ok(DiskRecord {
                key: row.get(0)?,
                path: row.get(1)?,
                capacity_bytes: row.get(2)?,
                datastore: row.get(3)?,
            })
        },
    )?;
    vm.nics = tx.query_map(
        "SELECT n.key, n.network, w.name, n.mac, n.virtual_dev, n.source_network, n.address_type
         FROM vm_nic n JOIN network w ON w.id = n.network WHERE n.vm = ?1 ORDER BY n.position",
        store_params![&vm.id],
        |row| {
            Ok(NicRecord {
                key: row.get(0)?,
                network: row.get(1)?,
                network_name: row.get(2)?,
                mac: row.get(3)?,
                virtual_dev: row.get(4)?,
                source_network: row.get(5)?,
                address_type: row.get(6)?,
            })
        },
    )?;
    vm.controllers = tx.query_map(
        "SELECT key, type FROM vm_controller WHERE vm = ?1 ORDER BY key",
        store_params![&vm.id],
        |row| {
            Ok(gateway::plan::ControllerSpec {
                key: row.get(0)?,
                kind: gateway::plan::ControllerType::from_name(&row.get::<String>(1)?),
            })
        },
    )?;
    Ok(vm)
}

/// A random (version 4) UUID in its canonical text form.
fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn check_new_vm(vm: &NewVm) -> Result<(), InventoryError> {
    let mut keys = HashSet::new();
    for key in vm.disks.iter().map(|d| &d.key).chain(vm.nics.iter().map(|n| &n.key)) {
        if key.is_empty() || !keys.insert(key) {
            return Err(InventoryError::Invalid(format!(
                "VM {:?}: device key {key:?} is empty or used twice",
                vm.name
            )));
        }
    }
    Ok(())
}

impl Inventory {
    /// In one transaction: registers the VM of a RUNNING migration (POWERED_OFF, on the
    /// domain's host, in its VM folder, on its datastore) with its disks and NICs in the
    /// given order, stores the receipt `issue` makes for it, and marks the migration
    /// SUCCEEDED with a link to the VM. The VM must have the name the migration reserved.
    /// `issue` runs inside the transaction (it learns the VM id and the commit time there);
    /// if it fails nothing is registered. Returns the VM id and the receipt.
    pub fn register_vm(
        &self,
        migration_id: &str,
        vm: &NewVm,
        issue: impl Fn(&ReceiptContext<'_>) -> Result<String, String>,
    ) -> Result<RegisteredVm, InventoryError> {
        self.register_vm_with_report(migration_id, vm, issue, |_| None)
    }

    /// [`Self::register_vm`], also storing the VM's firewall rules (`vm.firewall`) and the
    /// migration report `report` makes (JSON; `None` for none) in the same transaction.
    pub fn register_vm_with_report(
        &self,
        migration_id: &str,
        vm: &NewVm,
        issue: impl Fn(&ReceiptContext<'_>) -> Result<String, String>,
        report: impl Fn(&ReceiptContext<'_>) -> Option<String>,
    ) -> Result<RegisteredVm, InventoryError> {
        self.register(migration_id, vm, Some(Box::new(issue)), Box::new(report), "POWERED_OFF")
    }

    /// Registers a live-migrated VM, which already runs on the host: POWERED_ON, with
    /// its report. It has no receipt: its disks changed while they moved, so there are
    /// no fixed disk contents to sign (QUIC's AEAD authenticated every byte in transit).
    pub fn register_running_vm(
        &self,
        migration_id: &str,
        vm: &NewVm,
        report: impl Fn(&ReceiptContext<'_>) -> Option<String>,
    ) -> Result<String, InventoryError> {
        self.register(migration_id, vm, None, Box::new(report), "POWERED_ON")
            .map(|r| r.vm_id)
    }

    #[allow(clippy::type_complexity)]
    fn register(
        &self,
        migration_id: &str,
        vm: &NewVm,
        issue: Option<Box<dyn Fn(&ReceiptContext<'_>) -> Result<String, String> + '_>>,
        report: Box<dyn Fn(&ReceiptContext<'_>) -> Option<String> + '_>,
        power_state: &'static str,
    ) -> Result<RegisteredVm, InventoryError> {
        check_new_vm(vm)?;
        self.write(|tx| {
            let (state, reserved) = state_of(tx, migration_id)?;
            if state != "RUNNING" {
                return Err(InventoryError::MigrationNotRunning {
                    id: migration_id.to_owned(),
                    state,
                });
            }
            if reserved != vm.name {
                return Err(InventoryError::Invalid(format!(
                    "migration {migration_id} reserved the name {reserved:?}, not {:?}",
                    vm.name
                )));
            }
            let exists: bool = tx.query_row("SELECT EXISTS (SELECT 1 FROM vm WHERE name = ?1)", store_params![&vm.name], |r| {
                r.get(0)
            })?;
            if exists {
                return Err(InventoryError::NameTaken { name: vm.name.clone() });
            }
            for nic in &vm.nics {
                let known: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM network WHERE id = ?1)",
                    store_params![&nic.network_id],
                    |r| r.get(0),
                )?;
                if !known {
                    return Err(InventoryError::NotFound {
                        what: format!("network {}", nic.network_id),
                    });
                }
            }
            let (default_host, default_datastore, default_folder): (String, String, String) =
                tx.query_row("SELECT host, datastore, folder FROM placement", &[], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
            let p = &vm.placement;
            let host = p.host.clone().unwrap_or(default_host);
            let datastore = p.datastore.clone().unwrap_or(default_datastore);
            let folder = p.folder.clone().unwrap_or(default_folder);
            // A root pool has no row: the VM then names none (its host's cluster's root).
            let pool = match &p.resource_pool {
                Some(id) => tx
                    .query_row_opt("SELECT id FROM resource_pool WHERE id = ?1", store_params![id], |r| r.get::<String>(0))?,
                None => None,
            };
            let num = next_number(tx, "moref")?;
            let id = format!("vm-{num}");
            tx.execute(
                "INSERT INTO vm (id, num, name, guest_os, num_cpus, cores_per_socket, memory_mib, firmware, bios_uuid,
                                 power_state, host, datastore, folder, vmx_path, created, instance_uuid, resource_pool)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?17, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                store_params![
                    id,
                    num,
                    vm.name,
                    vm.guest_os,
                    vm.num_cpus,
                    vm.cores_per_socket,
                    vm.memory_mib,
                    vm.firmware,
                    vm.bios_uuid,
                    host,
                    datastore,
                    folder,
                    vm.vmx_path,
                    now(),
                    random_uuid(),
                    pool,
                    power_state
                ],
            )?;
            for (position, disk) in vm.disks.iter().enumerate() {
                tx.execute(
                    "INSERT INTO vm_disk (vm, position, key, path, capacity_bytes, datastore) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    store_params![
                        id,
                        position as i64,
                        disk.key,
                        disk.path,
                        disk.capacity_bytes,
                        disk.datastore.as_ref().unwrap_or(&datastore)
                    ],
                )?;
            }
            for (position, nic) in vm.nics.iter().enumerate() {
                tx.execute(
                    "INSERT INTO vm_nic (vm, position, key, network, mac, virtual_dev, source_network, address_type)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    store_params![
                        id,
                        position as i64,
                        nic.key,
                        nic.network_id,
                        nic.mac,
                        nic.virtual_dev,
                        nic.source_network,
                        nic.address_type
                    ],
                )?;
            }
            for controller in &vm.controllers {
                tx.execute(
                    "INSERT INTO vm_controller (vm, key, type) VALUES (?1, ?2, ?3)",
                    store_params![id, controller.key, controller.kind.name()],
                )?;
            }
            let started: String = tx.query_row("SELECT started FROM migration WHERE id = ?1", store_params![migration_id], |r| {
                r.get(0)
            })?;
            super::firewall::insert(tx, &id, &vm.name, &vm.firewall)?;
            let finished = now();
            let ctx = ReceiptContext {
                migration_id,
                vm_id: &id,
                planned_at: &started,
                committed_at: &finished,
            };
            let receipt = match &issue {
                Some(issue) => issue(&ctx).map_err(|reason| InventoryError::Receipt {
                    id: migration_id.to_owned(),
                    reason,
                })?,
                None => String::new(),
            };
            if let Some(report) = report(&ctx) {
                tx.execute(
                    "INSERT INTO migration_report (migration, report, created) VALUES (?1, ?2, ?3)",
                    store_params![migration_id, report, finished],
                )?;
            }
            if !receipt.is_empty() {
                tx.execute(
                    "INSERT INTO receipt (migration, vm, signed, created) VALUES (?1, ?2, ?3, ?4)",
                    store_params![migration_id, id, receipt, finished],
                )?;
            }
            tx.execute(
                "UPDATE migration SET state = 'SUCCEEDED', vm = ?2, finished = ?3 WHERE id = ?1",
                store_params![migration_id, id, finished],
            )?;
            Ok(RegisteredVm { vm_id: id, receipt })
        })
    }

    /// Every registered VM, ordered by id number.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, InventoryError> {
        self.read(|tx| {
            let mut vms: Vec<VmRecord> = tx.query_map(&format!("{SELECT_VM} ORDER BY v.num"), &[], vm_from_row)?;
            // Every VM's devices in one query a kind, not three a VM: the SOAP API reads
            // the whole list at each call, and 3,000 statements for 1,000 VMs were most
            // of its time.
            let at: HashMap<String, usize> = vms.iter().enumerate().map(|(i, vm)| (vm.id.clone(), i)).collect();
            for row in tx.query(
                "SELECT d.vm, d.key, d.path, d.capacity_bytes, COALESCE(d.datastore, v.datastore)
                 FROM vm_disk d JOIN vm v ON v.id = d.vm ORDER BY d.vm, d.position",
                &[],
            )? {
                if let Some(&i) = at.get(&row.get::<String>(0)?) {
                    vms[i].disks.push(DiskRecord {
                        key: row.get(1)?,
                        path: row.get(2)?,
                        capacity_bytes: row.get(3)?,
                        datastore: row.get(4)?,
                    });
                }
            }
            for row in tx.query(
                "SELECT n.vm, n.key, n.network, w.name, n.mac, n.virtual_dev, n.source_network, n.address_type
                 FROM vm_nic n JOIN network w ON w.id = n.network ORDER BY n.vm, n.position",
                &[],
            )? {
                if let Some(&i) = at.get(&row.get::<String>(0)?) {
                    vms[i].nics.push(NicRecord {
                        key: row.get(1)?,
                        network: row.get(2)?,
                        network_name: row.get(3)?,
                        mac: row.get(4)?,
                        virtual_dev: row.get(5)?,
                        source_network: row.get(6)?,
                        address_type: row.get(7)?,
                    });
                }
            }
            for row in tx.query("SELECT vm, key, type FROM vm_controller ORDER BY vm, key", &[])? {
                if let Some(&i) = at.get(&row.get::<String>(0)?) {
                    vms[i].controllers.push(gateway::plan::ControllerSpec {
                        key: row.get(1)?,
                        kind: gateway::plan::ControllerType::from_name(&row.get::<String>(2)?),
                    });
                }
            }
            Ok(vms)
        })
    }

    pub fn vm_by_name(&self, name: &str) -> Result<Option<VmRecord>, InventoryError> {
        self.vm_where("v.name = ?1", name)
    }

    /// One VM by id (`vm-N`).
    pub fn vm(&self, id: &str) -> Result<Option<VmRecord>, InventoryError> {
        self.vm_where("v.id = ?1", id)
    }

    fn vm_where(&self, condition: &str, value: &str) -> Result<Option<VmRecord>, InventoryError> {
        self.read(|tx| {
            let vm = tx.query_row_opt(
                &format!("{SELECT_VM} WHERE {condition}"),
                store_params![value],
                vm_from_row,
            )?;
            Ok(vm.map(|vm| with_devices(tx, vm)).transpose()?)
        })
    }

    /// Records a VM's power state (POWERED_ON, POWERED_OFF), as its host sees it.
    pub fn set_power_state(&self, id: &str, state: &str) -> Result<(), InventoryError> {
        self.write(|tx| {
            let changed = tx.execute("UPDATE vm SET power_state = ?2 WHERE id = ?1", store_params![id, state])?;
            if changed == 0 {
                return Err(InventoryError::NotFound {
                    what: format!("VM {id}"),
                });
            }
            Ok(())
        })
    }

    /// Bytes datastore `datastore_id` holds or has promised: its registered disks and the
    /// space running migrations reserved on it. Migrations that reserved nothing per
    /// datastore (started before placements) count on the default datastore.
    pub fn used_bytes_on(&self, datastore_id: &str) -> Result<u64, InventoryError> {
        Ok(self.space_on(datastore_id)?.used)
    }

    /// [`Self::used_bytes_on`], with the part running migrations reserved.
    pub fn space_on(&self, datastore_id: &str) -> Result<DatastoreUse, InventoryError> {
        self.read(|tx| Ok(space_on(tx, datastore_id)?))
    }

    pub fn used_bytes(&self) -> Result<u64, InventoryError> {
        self.read(|tx| {
            Ok(tx.query_row(
                "SELECT (SELECT CAST(COALESCE(SUM(capacity_bytes), 0) AS BIGINT) FROM vm_disk)
                      + (SELECT CAST(COALESCE(SUM(logical_bytes), 0) AS BIGINT) FROM migration WHERE state = 'RUNNING')",
                &[],
                |row| row.get(0),
            )?)
        })
    }
}

/// What a datastore holds and has promised, as the inventory counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatastoreUse {
    /// Its registered disks' capacities plus `reserved`.
    pub used: u64,
    /// What RUNNING migrations reserved on it: their disks, still being filled.
    pub reserved: u64,
}

/// [`Inventory::space_on`] on a connection (or inside a transaction).
pub(super) fn space_on(tx: &mut dyn Tx, datastore_id: &str) -> Result<DatastoreUse, StoreError> {
    let (registered, reserved): (u64, u64) = tx.query_row(
        "SELECT (SELECT CAST(COALESCE(SUM(d.capacity_bytes), 0) AS BIGINT) FROM vm_disk d JOIN vm v ON v.id = d.vm
                 WHERE COALESCE(d.datastore, v.datastore) = ?1),
                (SELECT CAST(COALESCE(SUM(s.bytes), 0) AS BIGINT) FROM migration_space s JOIN migration m ON m.id = s.migration
                 WHERE m.state = 'RUNNING' AND s.datastore = ?1)
              + (SELECT CAST(COALESCE(SUM(m.logical_bytes), 0) AS BIGINT) FROM migration m
                 WHERE m.state = 'RUNNING' AND ?1 = (SELECT datastore FROM placement)
                   AND NOT EXISTS (SELECT 1 FROM migration_space s WHERE s.migration = m.id))",
        store_params![datastore_id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    Ok(DatastoreUse {
        used: registered.saturating_add(reserved),
        reserved,
    })
}
