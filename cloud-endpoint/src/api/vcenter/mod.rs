//! The `com.vmware.vcenter` services over the inventory, apart from any wire protocol:
//! each operation takes the domain and a [`Filter`] or an id and returns serde structs in
//! vSphere 7's shapes. REST serialises them as they are; the vAPI JSON-RPC layer wraps
//! the same values in its STRUCTURE/OPTIONAL encoding.
//!
//! Every operation blocks (SQLite, statvfs): call them from `spawn_blocking`.

pub mod hardware;
pub mod power;
pub mod resource_pool;
pub mod vm;

use std::collections::BTreeMap;

use serde::Serialize;

use super::error::ApiError;
use crate::inventory::DomainInfo;
use crate::Domain;

/// A list's filter spec: field name (`names`, `datacenters`, ...) to the values it allows.
/// A field that is absent allows everything; a field given with values allows only those.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    fields: BTreeMap<String, Vec<String>>,
}

impl Filter {
    /// Adds `value` to the set of field `name`.
    pub fn add(&mut self, name: &str, value: &str) {
        self.fields.entry(name.to_owned()).or_default().push(value.to_owned());
    }

    /// The values of a field, if it was given.
    pub fn get(&self, name: &str) -> Option<&[String]> {
        self.fields.get(name).map(Vec::as_slice)
    }

    /// Whether `value` passes field `name`.
    pub fn allows(&self, name: &str, value: &str) -> bool {
        self.get(name).is_none_or(|set| set.iter().any(|v| v == value))
    }

    /// Fails with INVALID_ARGUMENT if field `name` holds a value outside `allowed`.
    pub fn check_enum(&self, name: &str, allowed: &[&str]) -> Result<(), ApiError> {
        for value in self.get(name).unwrap_or_default() {
            if !allowed.contains(&value.as_str()) {
                return Err(ApiError::invalid_argument(format!(
                    "{name}: {value:?} is not one of {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// vSphere's limit on what one list call returns.
pub const MAX_LIST_RESULTS: usize = 4000;

fn check_list_size(what: &str, len: usize) -> Result<(), ApiError> {
    if len > MAX_LIST_RESULTS {
        return Err(ApiError::new(
            super::error::ErrorKind::UnableToAllocateResource,
            format!("{len} {what} match, more than the {MAX_LIST_RESULTS} a list may return; narrow the filter"),
        ));
    }
    Ok(())
}

fn not_found(kind: &str, id: &str) -> ApiError {
    ApiError::not_found(format!("{kind} {id} is not in the inventory"))
}

/// The root folder (`group-d1`), which holds the datacenter.
fn root_folder(d: &DomainInfo) -> &str {
    d.folders
        .iter()
        .find(|f| f.parent.is_none())
        .map_or("group-d1", |f| f.id.as_str())
}

// --- datacenter ---------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct DatacenterSummary {
    pub datacenter: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatacenterInfo {
    pub name: String,
    pub datastore_folder: String,
    pub host_folder: String,
    pub network_folder: String,
    pub vm_folder: String,
}

/// Filters: `datacenters`, `names`, `folders`.
pub fn list_datacenters(domain: &Domain, filter: &Filter) -> Result<Vec<DatacenterSummary>, ApiError> {
    let d = domain.inventory.domain()?;
    let dc = &d.datacenter;
    let pass = filter.allows("datacenters", &dc.id)
        && filter.allows("names", &dc.name)
        && filter.allows("folders", root_folder(&d));
    Ok(pass
        .then(|| DatacenterSummary {
            datacenter: dc.id.clone(),
            name: dc.name.clone(),
        })
        .into_iter()
        .collect())
}

pub fn get_datacenter(domain: &Domain, id: &str) -> Result<DatacenterInfo, ApiError> {
    let dc = domain.inventory.domain()?.datacenter;
    if dc.id != id {
        return Err(not_found("datacenter", id));
    }
    Ok(DatacenterInfo {
        name: dc.name,
        datastore_folder: dc.datastore_folder,
        host_folder: dc.host_folder,
        network_folder: dc.network_folder,
        vm_folder: dc.vm_folder,
    })
}

// --- cluster -----------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct ClusterSummary {
    pub cluster: String,
    pub name: String,
    pub ha_enabled: bool,
    pub drs_enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterInfo {
    pub name: String,
    /// See [`root_resource_pool`].
    pub resource_pool: String,
}

pub use crate::inventory::root_resource_pool;

/// Filters: `clusters`, `names`, `folders`, `datacenters`, `ha_enabled`, `drs_enabled`.
pub fn list_clusters(domain: &Domain, filter: &Filter) -> Result<Vec<ClusterSummary>, ApiError> {
    filter.check_enum("ha_enabled", &["true", "false"])?;
    filter.check_enum("drs_enabled", &["true", "false"])?;
    let d = domain.inventory.domain()?;
    // Every cluster sits in the datacenter's host folder.
    let in_place = filter.allows("folders", &d.datacenter.host_folder)
        && filter.allows("datacenters", &d.datacenter.id)
        && filter.allows("ha_enabled", "false")
        && filter.allows("drs_enabled", "false");
    let list: Vec<ClusterSummary> = d
        .clusters
        .iter()
        .filter(|c| in_place && filter.allows("clusters", &c.id) && filter.allows("names", &c.name))
        .map(|c| ClusterSummary {
            cluster: c.id.clone(),
            name: c.name.clone(),
            ha_enabled: false,
            drs_enabled: false,
        })
        .collect();
    check_list_size("clusters", list.len())?;
    Ok(list)
}

pub fn get_cluster(domain: &Domain, id: &str) -> Result<ClusterInfo, ApiError> {
    let c = domain
        .inventory
        .domain()?
        .clusters
        .into_iter()
        .find(|c| c.id == id)
        .ok_or_else(|| not_found("cluster", id))?;
    Ok(ClusterInfo {
        resource_pool: root_resource_pool(&c.id),
        name: c.name,
    })
}

// --- host --------------------------------------------------------------------------

/// The endpoint's host: connected and powered on while the endpoint runs.
#[derive(Debug, Clone, Serialize)]
pub struct HostSummary {
    pub host: String,
    pub name: String,
    pub connection_state: &'static str,
    pub power_state: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub name: String,
    pub connection_state: &'static str,
    pub power_state: &'static str,
}

/// Filters: `hosts`, `names`, `folders`, `datacenters`, `clusters`, `connection_states`,
/// `standalone`, `host_uuids`.
pub fn list_hosts(domain: &Domain, filter: &Filter) -> Result<Vec<HostSummary>, ApiError> {
    filter.check_enum("connection_states", &["CONNECTED", "DISCONNECTED", "NOT_RESPONDING"])?;
    filter.check_enum("standalone", &["true", "false"])?;
    let d = domain.inventory.domain()?;
    // A host in a cluster sits in the cluster, not in a folder. Every host is in a
    // cluster, not standalone; the inventory keeps no host UUID, so a host_uuids filter
    // matches nothing.
    let in_place = filter.get("folders").is_none()
        && filter.allows("datacenters", &d.datacenter.id)
        && filter.allows("connection_states", "CONNECTED")
        && filter.allows("standalone", "false")
        && filter.get("host_uuids").is_none();
    let list: Vec<HostSummary> = d
        .hosts
        .iter()
        .filter(|h| {
            in_place
                && filter.allows("hosts", &h.id)
                && filter.allows("names", &h.name)
                && filter.allows("clusters", &h.cluster)
        })
        .map(|h| HostSummary {
            host: h.id.clone(),
            name: h.name.clone(),
            connection_state: "CONNECTED",
            power_state: "POWERED_ON",
        })
        .collect();
    check_list_size("hosts", list.len())?;
    Ok(list)
}

pub fn get_host(domain: &Domain, id: &str) -> Result<HostInfo, ApiError> {
    let h = domain
        .inventory
        .domain()?
        .hosts
        .into_iter()
        .find(|h| h.id == id)
        .ok_or_else(|| not_found("host", id))?;
    Ok(HostInfo {
        name: h.name,
        connection_state: "CONNECTED",
        power_state: "POWERED_ON",
    })
}

// --- datastore ---------------------------------------------------------------------

/// Shown as VMFS: the datastore holds vSphere's VM folder layout and the clients that
/// matter here pick datastores by that type.
const DATASTORE_TYPE: &str = "VMFS";
const DATASTORE_TYPES: &[&str] = &["VMFS", "NFS", "NFS41", "CIFS", "VSAN", "VFFS", "VVOL"];

#[derive(Debug, Clone, Serialize)]
pub struct DatastoreSummary {
    pub datastore: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub free_space: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatastoreInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub accessible: bool,
    pub free_space: u64,
    pub multiple_host_access: bool,
    pub thin_provisioning_supported: bool,
}

/// Free bytes and capacity of a datastore, as the migration placement counts them. A
/// datastore the inventory knows but this endpoint has no folder for shows neither.
pub(crate) fn datastore_space(domain: &Domain, ds: &crate::inventory::DatastoreInfo) -> Result<(u64, u64), ApiError> {
    let Some(store) = domain.datastore_named(&ds.name) else {
        return Ok((0, 0));
    };
    let used = domain.inventory.space_on(&ds.id)?;
    let space = || -> Result<(u64, u64), crate::datastore::DatastoreError> {
        Ok((store.free_bytes(used.used, used.reserved)?, store.capacity_bytes()?))
    };
    space().map_err(|e| ApiError::internal("the datastore's size could not be read", &e))
}

/// Filters: `datastores`, `names`, `types`, `folders`, `datacenters`.
pub fn list_datastores(domain: &Domain, filter: &Filter) -> Result<Vec<DatastoreSummary>, ApiError> {
    filter.check_enum("types", DATASTORE_TYPES)?;
    let d = domain.inventory.domain()?;
    let in_place = filter.allows("types", DATASTORE_TYPE)
        && filter.allows("folders", &d.datacenter.datastore_folder)
        && filter.allows("datacenters", &d.datacenter.id);
    let mut list = Vec::new();
    for ds in &d.datastores {
        if !(in_place && filter.allows("datastores", &ds.id) && filter.allows("names", &ds.name)) {
            continue;
        }
        let (free_space, capacity) = datastore_space(domain, ds)?;
        list.push(DatastoreSummary {
            datastore: ds.id.clone(),
            name: ds.name.clone(),
            kind: DATASTORE_TYPE,
            free_space,
            capacity,
        });
    }
    check_list_size("datastores", list.len())?;
    Ok(list)
}

pub fn get_datastore(domain: &Domain, id: &str) -> Result<DatastoreInfo, ApiError> {
    let ds = domain
        .inventory
        .domain()?
        .datastores
        .into_iter()
        .find(|d| d.id == id)
        .ok_or_else(|| not_found("datastore", id))?;
    let (free_space, _) = datastore_space(domain, &ds)?;
    Ok(DatastoreInfo {
        accessible: domain.datastore_named(&ds.name).is_some(),
        name: ds.name,
        kind: DATASTORE_TYPE,
        free_space,
        multiple_host_access: false,
        thin_provisioning_supported: true,
    })
}

// --- network -----------------------------------------------------------------------

const NETWORK_TYPE: &str = "STANDARD_PORTGROUP";

#[derive(Debug, Clone, Serialize)]
pub struct NetworkSummary {
    pub network: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetworkInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

/// Filters: `networks`, `names`, `types`, `folders`, `datacenters`.
pub fn list_networks(domain: &Domain, filter: &Filter) -> Result<Vec<NetworkSummary>, ApiError> {
    filter.check_enum(
        "types",
        &["STANDARD_PORTGROUP", "DISTRIBUTED_PORTGROUP", "OPAQUE_NETWORK"],
    )?;
    let d = domain.inventory.domain()?;
    let in_place = filter.allows("types", NETWORK_TYPE)
        && filter.allows("folders", &d.datacenter.network_folder)
        && filter.allows("datacenters", &d.datacenter.id);
    if !in_place {
        return Ok(Vec::new());
    }
    let list: Vec<NetworkSummary> = domain
        .inventory
        .networks()?
        .into_iter()
        .filter(|n| filter.allows("networks", &n.id) && filter.allows("names", &n.name))
        .map(|n| NetworkSummary {
            network: n.id,
            name: n.name,
            kind: NETWORK_TYPE,
        })
        .collect();
    check_list_size("networks", list.len())?;
    Ok(list)
}

pub fn get_network(domain: &Domain, id: &str) -> Result<NetworkInfo, ApiError> {
    domain
        .inventory
        .networks()?
        .into_iter()
        .find(|n| n.id == id)
        .map(|n| NetworkInfo {
            name: n.name,
            kind: NETWORK_TYPE,
        })
        .ok_or_else(|| not_found("network", id))
}

// --- folder ------------------------------------------------------------------------

pub const FOLDER_TYPES: &[&str] = &["DATACENTER", "DATASTORE", "HOST", "NETWORK", "VIRTUAL_MACHINE"];

#[derive(Debug, Clone, Serialize)]
pub struct FolderSummary {
    pub folder: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FolderInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// Filters: `type` (one value), `folders`, `names`, `parent_folders`, `datacenters`.
pub fn list_folders(domain: &Domain, filter: &Filter) -> Result<Vec<FolderSummary>, ApiError> {
    filter.check_enum("type", FOLDER_TYPES)?;
    if filter.get("type").is_some_and(|t| t.len() > 1) {
        return Err(ApiError::invalid_argument("type: give one folder type"));
    }
    let d = domain.inventory.domain()?;
    // Every folder but the root lies in the one datacenter.
    let list: Vec<FolderSummary> = d
        .folders
        .iter()
        .filter(|f| {
            filter.allows("type", &f.kind)
                && filter.allows("folders", &f.id)
                && filter.allows("names", &f.name)
                && filter.get("parent_folders").is_none_or(|set| {
                    // The datacenter's top folders have the datacenter as parent, not a folder.
                    f.parent.as_ref().is_some_and(|p| set.contains(p))
                })
                && filter
                    .get("datacenters")
                    .is_none_or(|set| f.parent.is_some() && set.contains(&d.datacenter.id))
        })
        .map(|f| FolderSummary {
            folder: f.id.clone(),
            name: f.name.clone(),
            kind: f.kind.clone(),
        })
        .collect();
    check_list_size("folders", list.len())?;
    Ok(list)
}

pub fn get_folder(domain: &Domain, id: &str) -> Result<FolderInfo, ApiError> {
    domain
        .inventory
        .domain()?
        .folders
        .into_iter()
        .find(|f| f.id == id)
        .map(|f| FolderInfo {
            name: f.name,
            kind: f.kind,
        })
        .ok_or_else(|| not_found("folder", id))
}
