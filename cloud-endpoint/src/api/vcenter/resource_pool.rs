//! `com.vmware.vcenter.ResourcePool`: each cluster's root pool ("Resources") and the
//! child pools of the configuration (`domain.resource_pools`).

use serde::Serialize;

use super::{check_list_size, not_found, Filter};
use crate::api::error::ApiError;
use crate::Domain;

#[derive(Debug, Clone, Serialize)]
pub struct ResourcePoolSummary {
    pub resource_pool: String,
    pub name: String,
}

/// vSphere's `ResourcePool.Info`: the name and the ids of the child pools. Allocations
/// are optional there and left out here; a child pool's per-VM limits show in its
/// placement problems instead.
#[derive(Debug, Clone, Serialize)]
pub struct ResourcePoolInfo {
    pub name: String,
    pub resource_pools: Vec<String>,
}

/// Filters: `resource_pools`, `names`, `parent_resource_pools`, `datacenters`, `hosts`,
/// `clusters`. A pool belongs to a host through its cluster.
pub fn list(domain: &Domain, filter: &Filter) -> Result<Vec<ResourcePoolSummary>, ApiError> {
    let d = domain.inventory.domain()?;
    let list: Vec<ResourcePoolSummary> = d
        .resource_pools
        .iter()
        .filter(|p| {
            filter.allows("resource_pools", &p.id)
                && filter.allows("names", &p.name)
                && filter
                    .get("parent_resource_pools")
                    .is_none_or(|set| p.parent.as_ref().is_some_and(|parent| set.contains(parent)))
                && filter.allows("datacenters", &d.datacenter.id)
                && filter.allows("clusters", &p.cluster)
                && filter
                    .get("hosts")
                    .is_none_or(|set| d.hosts.iter().any(|h| h.cluster == p.cluster && set.contains(&h.id)))
        })
        .map(|p| ResourcePoolSummary {
            resource_pool: p.id.clone(),
            name: p.name.clone(),
        })
        .collect();
    check_list_size("resource pools", list.len())?;
    Ok(list)
}

pub fn get(domain: &Domain, id: &str) -> Result<ResourcePoolInfo, ApiError> {
    let d = domain.inventory.domain()?;
    let pool = d
        .resource_pools
        .iter()
        .find(|p| p.id == id)
        .ok_or_else(|| not_found("resource pool", id))?;
    Ok(ResourcePoolInfo {
        name: pool.name.clone(),
        resource_pools: d
            .resource_pools
            .iter()
            .filter(|c| c.parent.as_deref() == Some(id))
            .map(|c| c.id.clone())
            .collect(),
    })
}
