//! A plan's placement choices resolved against the inventory: each named object found by
//! id or name, the relations between them checked (host and pool in the cluster), and the
//! datastore of every disk. Problems are collected, never returned early, so a refusal
//! lists them all; a choice that names nothing leaves the default in its place, so the
//! checks that need a host, a pool or a datastore still run.

use gateway::plan::MigrationPlan;

use crate::inventory::{ClusterInfo, DatastoreInfo, DomainInfo, FolderInfo, HostInfo, PoolInfo};
use crate::Domain;

/// Where a migration puts its VM, every choice an object of the inventory.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub folder: FolderInfo,
    pub cluster: ClusterInfo,
    pub host: HostInfo,
    pub pool: PoolInfo,
    /// The VM's datastore: its folder with the .vmx.
    pub datastore: DatastoreInfo,
    /// The datastore of each disk, in plan order.
    pub disk_datastores: Vec<DatastoreInfo>,
}

impl Resolved {
    /// The datastores of the disks other than the VM's, each once, in first-use order.
    pub fn other_datastores(&self) -> Vec<&DatastoreInfo> {
        let mut out: Vec<&DatastoreInfo> = Vec::new();
        for ds in &self.disk_datastores {
            if ds.id != self.datastore.id && !out.iter().any(|o| o.id == ds.id) {
                out.push(ds);
            }
        }
        out
    }

    /// Bytes the disks put on each datastore (id, name, bytes), the VM's first.
    pub fn space(&self, plan: &MigrationPlan) -> Vec<(&DatastoreInfo, u64)> {
        let mut out: Vec<(&DatastoreInfo, u64)> = vec![(&self.datastore, 0)];
        for (disk, ds) in plan.vm.disks.iter().zip(&self.disk_datastores) {
            match out.iter_mut().find(|(d, _)| d.id == ds.id) {
                Some((_, bytes)) => *bytes += disk.capacity,
                None => out.push((ds, disk.capacity)),
            }
        }
        out
    }
}

/// `name (id)` of each choice, for a problem's "choose one of".
fn choices<T>(items: &[&T], name: impl Fn(&T) -> &str, id: impl Fn(&T) -> &str) -> String {
    if items.is_empty() {
        return "none".to_owned();
    }
    items
        .iter()
        .map(|t| format!("{} ({})", name(t), id(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The object `wanted` names by id, else by name.
fn find<'a, T>(items: &[&'a T], wanted: &str, name: impl Fn(&T) -> &str, id: impl Fn(&T) -> &str) -> Option<&'a T> {
    items
        .iter()
        .find(|t| id(t) == wanted)
        .or_else(|| items.iter().find(|t| name(t) == wanted))
        .copied()
}

/// Picks `wanted` among `items`, or the default; a choice that names nothing is a problem
/// naming the choices (`what` and `flag` say which option it was), and the default is
/// picked in its place.
fn pick<'a, T>(
    items: &[&'a T],
    wanted: Option<&str>,
    default: Option<&'a T>,
    (what, flag): (&str, &str),
    name: impl Fn(&T) -> &str + Copy,
    id: impl Fn(&T) -> &str + Copy,
    problems: &mut Vec<String>,
) -> Option<&'a T> {
    match wanted {
        None => default,
        Some(wanted) => {
            let found = find(items, wanted, name, id);
            if found.is_none() {
                problems.push(format!(
                    "{what} {wanted:?} ({flag}) is not in the cloud domain; choose one of: {}",
                    choices(items, name, id)
                ));
            }
            found.or(default)
        }
    }
}

/// Resolves `plan.placement` against `info`, adding a problem for every choice that names
/// nothing, a host or pool outside the cluster, a per-disk datastore for a disk the VM
/// does not have, and a datastore whose folder this endpoint lacks. The placement is
/// usable only if no problem was added; otherwise it is what the later checks (hardware,
/// space) run against, each unknown choice replaced by its default. `None` only when the
/// domain lacks a default (a cluster without a host): its problem is listed.
pub fn resolve(
    domain: &Domain,
    info: &DomainInfo,
    plan: &MigrationPlan,
    problems: &mut Vec<String>,
) -> Option<Resolved> {
    let p = &plan.placement;
    let folders: Vec<&FolderInfo> = info.folders.iter().filter(|f| f.kind == "VIRTUAL_MACHINE").collect();
    let default_folder = info.folders.iter().find(|f| f.id == info.vm_folder);
    let folder = pick(
        &folders,
        p.folder.as_deref(),
        default_folder,
        ("VM folder", "--folder"),
        |f| &f.name,
        |f| &f.id,
        problems,
    );

    let clusters: Vec<&ClusterInfo> = info.clusters.iter().collect();
    let cluster = pick(
        &clusters,
        p.cluster.as_deref(),
        Some(&info.cluster),
        ("cluster", "--cluster"),
        |c| &c.name,
        |c| &c.id,
        problems,
    );

    let hosts: Vec<&HostInfo> = info.hosts.iter().collect();
    // Without a choice: the default host if it is in the cluster, else the cluster's first.
    let default_host = match cluster {
        Some(c) if info.host.cluster != c.id => info.hosts.iter().find(|h| h.cluster == c.id),
        _ => Some(&info.host),
    };
    let host = pick(
        &hosts,
        p.host.as_deref(),
        default_host,
        ("host", "--host"),
        |h| &h.name,
        |h| &h.id,
        problems,
    );
    if let (Some(c), Some(h)) = (cluster, host) {
        if h.cluster != c.id {
            let of_cluster: Vec<&HostInfo> = info.hosts.iter().filter(|h| h.cluster == c.id).collect();
            problems.push(format!(
                "host {} ({}) is not in cluster {} ({}); choose one of its hosts: {}",
                h.name,
                h.id,
                c.name,
                c.id,
                choices(&of_cluster, |h| &h.name, |h| &h.id)
            ));
        }
    } else if cluster.is_some() && host.is_none() && p.host.is_none() {
        problems.push("the chosen cluster has no host; choose another cluster".to_owned());
    }

    let pools: Vec<&PoolInfo> = info.resource_pools.iter().collect();
    let root = cluster.and_then(|c| {
        info.resource_pools
            .iter()
            .find(|r| r.cluster == c.id && r.parent.is_none())
    });
    let pool = pick(
        &pools,
        p.resource_pool.as_deref(),
        root,
        ("resource pool", "--resource-pool"),
        |r| &r.name,
        |r| &r.id,
        problems,
    );
    if let (Some(c), Some(r)) = (cluster, pool) {
        if r.cluster != c.id {
            let of_cluster: Vec<&PoolInfo> = info.resource_pools.iter().filter(|r| r.cluster == c.id).collect();
            problems.push(format!(
                "resource pool {} ({}) is not in cluster {} ({}); choose one of its pools: {}",
                r.name,
                r.id,
                c.name,
                c.id,
                choices(&of_cluster, |r| &r.name, |r| &r.id)
            ));
        }
    }

    let datastores: Vec<&DatastoreInfo> = info.datastores.iter().collect();
    let datastore = pick(
        &datastores,
        p.datastore.as_deref(),
        Some(&info.datastore),
        ("datastore", "--datastore"),
        |d| &d.name,
        |d| &d.id,
        problems,
    );
    let mut disk_datastores = Vec::new();
    for (key, _) in &p.disk_datastores {
        if !plan.vm.disks.iter().any(|d| &d.key == key) {
            let keys: Vec<&str> = plan.vm.disks.iter().map(|d| d.key.as_str()).collect();
            problems.push(format!(
                "--disk-datastore names disk {key:?}, which the VM does not have (its disks: {})",
                keys.join(", ")
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (key, _) in &p.disk_datastores {
        if !seen.insert(key) {
            problems.push(format!(
                "--disk-datastore names disk {key:?} twice; give one datastore per disk"
            ));
        }
    }
    for disk in &plan.vm.disks {
        let chosen = match p.disk_datastore(&disk.key) {
            Some(wanted) => pick(
                &datastores,
                Some(wanted),
                datastore,
                ("datastore", &format!("--disk-datastore {}", disk.key)),
                |d| &d.name,
                |d| &d.id,
                problems,
            ),
            None => datastore,
        };
        disk_datastores.extend(chosen.cloned());
    }
    // The inventory may know a datastore whose folder is no longer configured here.
    let mut missing = std::collections::BTreeSet::new();
    for ds in datastore.into_iter().chain(disk_datastores.iter()) {
        if domain.datastore_named(&ds.name).is_none() {
            missing.insert((ds.name.clone(), ds.id.clone()));
        }
    }
    for (name, id) in missing {
        problems.push(format!(
            "datastore {name} ({id}) has no folder configured on this endpoint (domain.extra_datastores); choose another datastore or configure its `dir`"
        ));
    }
    Some(Resolved {
        folder: folder?.clone(),
        cluster: cluster?.clone(),
        host: host?.clone(),
        pool: pool?.clone(),
        datastore: datastore?.clone(),
        disk_datastores,
    })
}
