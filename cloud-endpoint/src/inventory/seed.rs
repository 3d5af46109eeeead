//! Makes the stored domain match the configured one: created whole on first start, then
//! only grown (networks, users) and adjusted (passwords, roles, capacity) on later starts.

use super::store::{StoreError, Tx};
use crate::store_params;

use super::{
    next_number, password, root_resource_pool, ClusterInfo, DatacenterInfo, DatastoreInfo, DomainInfo, FolderInfo,
    HostInfo, InventoryError, PoolInfo, ROOT_POOL_NAME,
};
use crate::config::{DomainConfig, UserConfig};

/// `shared`: the database is a scale-out domain's (PostgreSQL), which other endpoints
/// joined or will join. Each endpoint is a host of the cluster: one whose
/// `domain.host.name` the domain does not have yet joins it as a new host, where a
/// single endpoint's renamed host is only warned about (its VMs name the old one).
pub(super) fn reconcile(tx: &mut dyn Tx, domain: &DomainConfig, shared: bool) -> Result<(), InventoryError> {
    let placed: Option<String> = tx.query_row_opt("SELECT datacenter FROM placement", &[], |row| row.get(0))?;
    match placed {
        None => create_domain(tx, domain)?,
        Some(_) if shared => join_domain(tx, domain)?,
        Some(_) => check_fixed_names(tx, domain)?,
    }
    tx.execute(
        "UPDATE datastore SET capacity_bytes = ?1 WHERE id = (SELECT datastore FROM placement)",
        store_params![domain.datastore.capacity_bytes],
    )?;
    add_placement_objects(tx, domain)?;
    add_networks(tx, &domain.networks)?;
    sync_users(tx, &domain.users)?;
    Ok(())
}

fn next_id(tx: &mut dyn Tx, prefix: &str) -> Result<(i64, String), StoreError> {
    let n = next_number(tx, "moref")?;
    Ok((n, format!("{prefix}{n}")))
}

fn add_folder(
    tx: &mut dyn Tx,
    prefix: &str,
    name: &str,
    kind: &str,
    parent: Option<&str>,
) -> Result<String, StoreError> {
    let (num, id) = next_id(tx, prefix)?;
    tx.execute(
        "INSERT INTO folder (id, num, name, type, parent) VALUES (?1, ?2, ?3, ?4, ?5)",
        store_params![id, num, name, kind, parent],
    )?;
    Ok(id)
}

/// The first start: the same object tree a fresh vCenter with one datacenter has.
fn create_domain(tx: &mut dyn Tx, d: &DomainConfig) -> Result<(), InventoryError> {
    let root = add_folder(tx, "group-d", "Datacenters", "DATACENTER", None)?;
    let (dc_num, dc) = next_id(tx, "datacenter-")?;
    let vm_folder = add_folder(tx, "group-v", "vm", "VIRTUAL_MACHINE", Some(&dc))?;
    let host_folder = add_folder(tx, "group-h", "host", "HOST", Some(&dc))?;
    let ds_folder = add_folder(tx, "group-s", "datastore", "DATASTORE", Some(&dc))?;
    let net_folder = add_folder(tx, "group-n", "network", "NETWORK", Some(&dc))?;
    tx.execute(
        "INSERT INTO datacenter (id, num, name, parent, vm_folder, host_folder, datastore_folder, network_folder)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        store_params![
            dc,
            dc_num,
            d.datacenter,
            root,
            vm_folder,
            host_folder,
            ds_folder,
            net_folder
        ],
    )?;
    let landing = add_folder(tx, "group-v", &d.folder, "VIRTUAL_MACHINE", Some(&vm_folder))?;
    let (num, cluster) = next_id(tx, "domain-c")?;
    tx.execute(
        "INSERT INTO cluster (id, num, name, folder) VALUES (?1, ?2, ?3, ?4)",
        store_params![cluster, num, d.cluster, host_folder],
    )?;
    let (num, host) = next_id(tx, "host-")?;
    tx.execute(
        "INSERT INTO host (id, num, name, cluster, cpu_cores, memory_mib) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        store_params![host, num, d.host.name, cluster, d.host.cpu_cores, d.host.memory_mib],
    )?;
    let (num, datastore) = next_id(tx, "datastore-")?;
    tx.execute(
        "INSERT INTO datastore (id, num, name, folder, capacity_bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
        store_params![datastore, num, d.datastore.name, ds_folder, d.datastore.capacity_bytes],
    )?;
    tx.execute(
        "INSERT INTO placement (singleton, datacenter, folder, cluster, host, datastore) VALUES (0, ?1, ?2, ?3, ?4, ?5)",
        store_params![dc, landing, cluster, host, datastore],
    )?;
    tracing::info!(datacenter = %dc, "cloud domain created in the inventory");
    Ok(())
}

/// An endpoint starting on a shared database: its host joins the cluster if it is new.
fn join_domain(tx: &mut dyn Tx, d: &DomainConfig) -> Result<(), InventoryError> {
    if exists(tx, "SELECT EXISTS (SELECT 1 FROM host WHERE name = ?1)", &d.host.name)? {
        return Ok(());
    }
    let cluster: String = tx.query_row("SELECT cluster FROM placement", &[], |row| row.get(0))?;
    let (num, id) = next_id(tx, "host-")?;
    tx.execute(
        "INSERT INTO host (id, num, name, cluster, cpu_cores, memory_mib) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        store_params![id, num, d.host.name, cluster, d.host.cpu_cores, d.host.memory_mib],
    )?;
    tracing::info!(host = %id, name = %d.host.name, "this endpoint joined the domain as a host of its cluster");
    Ok(())
}

/// Renaming the datacenter, folder, cluster, host or datastore in the config does not
/// rename the stored objects (VM paths name the datastore); say so instead of diverging
/// silently.
fn check_fixed_names(tx: &mut dyn Tx, d: &DomainConfig) -> Result<(), InventoryError> {
    let stored: [String; 5] = tx.query_row(
        "SELECT dc.name, f.name, c.name, h.name, ds.name FROM placement p
         JOIN datacenter dc ON dc.id = p.datacenter JOIN folder f ON f.id = p.folder
         JOIN cluster c ON c.id = p.cluster JOIN host h ON h.id = p.host JOIN datastore ds ON ds.id = p.datastore",
        &[],
        |row| Ok([row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?]),
    )?;
    let configured = [&d.datacenter, &d.folder, &d.cluster, &d.host.name, &d.datastore.name];
    let keys = [
        "domain.datacenter",
        "domain.folder",
        "domain.cluster",
        "domain.host.name",
        "domain.datastore.name",
    ];
    for ((stored, configured), key) in stored.iter().zip(configured).zip(keys) {
        if stored != configured {
            tracing::warn!(
                key,
                stored = %stored,
                configured = %configured,
                "the inventory keeps the name it was created with; the configured name is ignored"
            );
        }
    }
    Ok(())
}

/// Hosts, datastores, VM folders and resource pools beyond the first: added by name when
/// absent, on the first start as on later ones, so a config that grows grows the
/// inventory. Nothing is removed or renamed (VMs and disk paths name them).
fn add_placement_objects(tx: &mut dyn Tx, d: &DomainConfig) -> Result<(), InventoryError> {
    let (cluster, ds_folder, vm_folder): (String, String, String) = tx.query_row(
        "SELECT p.cluster, dc.datastore_folder, dc.vm_folder FROM placement p JOIN datacenter dc ON dc.id = p.datacenter",
        &[],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    for h in &d.extra_hosts {
        if !exists(tx, "SELECT EXISTS (SELECT 1 FROM host WHERE name = ?1)", &h.name)? {
            let (num, id) = next_id(tx, "host-")?;
            tx.execute(
                "INSERT INTO host (id, num, name, cluster, cpu_cores, memory_mib) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                store_params![id, num, h.name, cluster, h.cpu_cores, h.memory_mib],
            )?;
            tracing::info!(host = %id, name = %h.name, "host added to the cluster");
        }
    }
    for ds in &d.extra_datastores {
        if !exists(tx, "SELECT EXISTS (SELECT 1 FROM datastore WHERE name = ?1)", &ds.name)? {
            let (num, id) = next_id(tx, "datastore-")?;
            tx.execute(
                "INSERT INTO datastore (id, num, name, folder, capacity_bytes) VALUES (?1, ?2, ?3, ?4, ?5)",
                store_params![id, num, ds.name, ds_folder, ds.capacity_bytes],
            )?;
            tracing::info!(datastore = %id, name = %ds.name, "datastore added");
        }
        tx.execute(
            "UPDATE datastore SET capacity_bytes = ?2 WHERE name = ?1",
            store_params![ds.name, ds.capacity_bytes],
        )?;
    }
    for name in &d.folders {
        let known: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM folder WHERE name = ?1 AND type = 'VIRTUAL_MACHINE' AND parent = ?2)",
            store_params![name, vm_folder],
            |row| row.get(0),
        )?;
        if !known {
            let id = add_folder(tx, "group-v", name, "VIRTUAL_MACHINE", Some(&vm_folder))?;
            tracing::info!(folder = %id, name = %name, "VM folder added");
        }
    }
    for pool in &d.resource_pools {
        let known: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM resource_pool WHERE name = ?1 AND cluster = ?2)",
            store_params![pool.name, cluster],
            |row| row.get(0),
        )?;
        if !known {
            let (num, id) = next_id(tx, "resgroup-")?;
            tx.execute(
                "INSERT INTO resource_pool (id, num, name, cluster, memory_limit_mib, cpu_limit_cores)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                store_params![id, num, pool.name, cluster, pool.memory_limit_mib, pool.cpu_limit_cores],
            )?;
            tracing::info!(resource_pool = %id, name = %pool.name, "resource pool added");
        } else {
            tx.execute(
                "UPDATE resource_pool SET memory_limit_mib = ?3, cpu_limit_cores = ?4 WHERE name = ?1 AND cluster = ?2",
                store_params![pool.name, cluster, pool.memory_limit_mib, pool.cpu_limit_cores],
            )?;
        }
    }
    Ok(())
}

fn exists(tx: &mut dyn Tx, sql: &str, name: &str) -> Result<bool, StoreError> {
    tx.query_row(sql, store_params![name], |row| row.get(0))
}

fn add_networks(tx: &mut dyn Tx, networks: &[String]) -> Result<(), InventoryError> {
    let folder: String = tx.query_row(
        "SELECT dc.network_folder FROM placement p JOIN datacenter dc ON dc.id = p.datacenter",
        &[],
        |row| row.get(0),
    )?;
    for name in networks {
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM network WHERE name = ?1)",
            store_params![name],
            |row| row.get(0),
        )?;
        if !exists {
            let (num, id) = next_id(tx, "network-")?;
            tx.execute(
                "INSERT INTO network (id, num, name, folder) VALUES (?1, ?2, ?3, ?4)",
                store_params![id, num, name, folder],
            )?;
            tracing::info!(network = %id, name = %name, "cloud network added");
        }
    }
    Ok(())
}

/// The config is the authority on who may log in: a changed password or role applies at
/// the next start, and a user left out of the config is deactivated (not deleted, since
/// migrations name it). Otherwise an operator who replaces the demo password in the
/// config would keep the published one working.
fn sync_users(tx: &mut dyn Tx, users: &[UserConfig]) -> Result<(), InventoryError> {
    for user in users {
        let stored: Option<(String, String, bool)> = tx.query_row_opt(
            "SELECT password_hash, role, active FROM app_user WHERE name = ?1",
            store_params![&user.name],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )?;
        let role = user.role.as_str();
        let hash = match (&user.password_hash, &user.password, &stored) {
            (Some(given), _, _) => given.clone(),
            // Unchanged password: keep the stored hash (a new salt would be churn).
            (None, Some(plain), Some((old, _, _))) if password::verify(old, plain) => old.clone(),
            (None, Some(plain), _) => password::hash_password(plain).map_err(|e| match e {
                InventoryError::PasswordHash { reason, .. } => InventoryError::PasswordHash {
                    user: user.name.clone(),
                    reason,
                },
                other => other,
            })?,
            (None, None, _) => {
                return Err(InventoryError::Invalid(format!(
                    "user {:?} has neither password nor password_hash",
                    user.name
                )))
            }
        };
        match stored {
            None => {
                tx.execute(
                    "INSERT INTO app_user (name, password_hash, role, active) VALUES (?1, ?2, ?3, 1)",
                    store_params![user.name, hash, role],
                )?;
                tracing::info!(user = %user.name, role, "user added to the cloud domain");
            }
            Some((old_hash, old_role, active)) => {
                if old_hash != hash || old_role != role || !active {
                    tx.execute(
                        "UPDATE app_user SET password_hash = ?2, role = ?3, active = 1 WHERE name = ?1",
                        store_params![user.name, hash, role],
                    )?;
                    tracing::info!(user = %user.name, role, "user updated from the configuration");
                }
            }
        }
    }
    let active: Vec<String> = tx.query_map("SELECT name FROM app_user WHERE active = 1", &[], |row| row.get(0))?;
    for name in active {
        if !users.iter().any(|u| u.name == name) {
            tx.execute("UPDATE app_user SET active = 0 WHERE name = ?1", store_params![&name])?;
            tracing::warn!(user = %name, "user no longer configured: deactivated (kept for the migration history)");
        }
    }
    Ok(())
}

pub(super) fn domain_info(tx: &mut dyn Tx) -> Result<DomainInfo, InventoryError> {
    let (datacenter, vm_folder, cluster_id, host_id, ds_id): (String, String, String, String, String) = tx.query_row(
        "SELECT datacenter, folder, cluster, host, datastore FROM placement",
        &[],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
    )?;
    let datacenter = tx.query_row(
        "SELECT id, name, vm_folder, host_folder, datastore_folder, network_folder FROM datacenter WHERE id = ?1",
        store_params![&datacenter],
        |row| {
            Ok(DatacenterInfo {
                id: row.get(0)?,
                name: row.get(1)?,
                vm_folder: row.get(2)?,
                host_folder: row.get(3)?,
                datastore_folder: row.get(4)?,
                network_folder: row.get(5)?,
            })
        },
    )?;
    let folders = tx.query_map("SELECT id, name, type, parent FROM folder ORDER BY num", &[], |row| {
        Ok(FolderInfo {
            id: row.get(0)?,
            name: row.get(1)?,
            kind: row.get(2)?,
            parent: row.get(3)?,
        })
    })?;
    let cluster = tx.query_row(
        "SELECT id, name FROM cluster WHERE id = ?1",
        store_params![&cluster_id],
        |row| {
            Ok(ClusterInfo {
                id: row.get(0)?,
                name: row.get(1)?,
            })
        },
    )?;
    let host = tx.query_row(
        "SELECT id, name, cluster, cpu_cores, memory_mib FROM host WHERE id = ?1",
        store_params![&host_id],
        |row| {
            Ok(HostInfo {
                id: row.get(0)?,
                name: row.get(1)?,
                cluster: row.get(2)?,
                cpu_cores: row.get(3)?,
                memory_mib: row.get(4)?,
            })
        },
    )?;
    let datastore = tx.query_row(
        "SELECT id, name, capacity_bytes FROM datastore WHERE id = ?1",
        store_params![&ds_id],
        |row| {
            Ok(DatastoreInfo {
                id: row.get(0)?,
                name: row.get(1)?,
                capacity_bytes: row.get(2)?,
            })
        },
    )?;
    let clusters = tx.query_map("SELECT id, name FROM cluster ORDER BY num", &[], |row| {
        Ok(ClusterInfo {
            id: row.get(0)?,
            name: row.get(1)?,
        })
    })?;
    let hosts = tx.query_map(
        "SELECT id, name, cluster, cpu_cores, memory_mib FROM host ORDER BY num",
        &[],
        |row| {
            Ok(HostInfo {
                id: row.get(0)?,
                name: row.get(1)?,
                cluster: row.get(2)?,
                cpu_cores: row.get(3)?,
                memory_mib: row.get(4)?,
            })
        },
    )?;
    let datastores = tx.query_map(
        "SELECT id, name, capacity_bytes FROM datastore ORDER BY num",
        &[],
        |row| {
            Ok(DatastoreInfo {
                id: row.get(0)?,
                name: row.get(1)?,
                capacity_bytes: row.get(2)?,
            })
        },
    )?;
    // Each cluster's root pool first, then the child pools.
    let mut resource_pools: Vec<PoolInfo> = clusters
        .iter()
        .map(|c| PoolInfo {
            id: root_resource_pool(&c.id),
            name: ROOT_POOL_NAME.to_owned(),
            cluster: c.id.clone(),
            parent: None,
            memory_limit_mib: None,
            cpu_limit_cores: None,
        })
        .collect();
    let children = tx.query_map(
        "SELECT id, name, cluster, memory_limit_mib, cpu_limit_cores FROM resource_pool ORDER BY num",
        &[],
        |row| {
            let cluster: String = row.get(2)?;
            Ok(PoolInfo {
                id: row.get(0)?,
                name: row.get(1)?,
                parent: Some(root_resource_pool(&cluster)),
                cluster,
                memory_limit_mib: row.get(3)?,
                cpu_limit_cores: row.get(4)?,
            })
        },
    )?;
    resource_pools.extend(children);
    Ok(DomainInfo {
        datacenter,
        folders,
        cluster,
        host,
        datastore,
        vm_folder,
        clusters,
        hosts,
        datastores,
        resource_pools,
    })
}
