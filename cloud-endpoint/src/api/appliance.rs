//! `com.vmware.appliance.system.version`: what scripts read to learn which vSphere API
//! they talk to before they pick calls (the `/api` paths came with vSphere 7.0 U2).

use serde::Serialize;

use super::error::ApiError;
use crate::Domain;

/// The vSphere release whose API shapes the endpoint answers in (`/api` with the filter
/// specs and device maps of 8.0, and `/rest` as 8.0 still serves it).
pub const VSPHERE_API_VERSION: &str = "8.0.3.00000";

/// `GET /api/appliance/system/version`. `product` and `summary` say what answers;
/// `type` is vCenter's, since clients branch on it to tell a vCenter from an ESXi host.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    pub version: &'static str,
    pub product: &'static str,
    pub build: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub summary: String,
    pub releasedate: &'static str,
    pub install_time: String,
}

pub fn system_version(domain: &Domain) -> Result<VersionInfo, ApiError> {
    // When the cloud domain was set up: its inventory's creation (or last change where
    // the filesystem keeps no birth time).
    let install_time = std::fs::metadata(domain.inventory.path())
        .and_then(|m| m.created().or_else(|_| m.modified()))
        .map(|t| super::session::rfc3339_millis(t.into()))
        .unwrap_or_default();
    Ok(VersionInfo {
        version: VSPHERE_API_VERSION,
        product: "Hybrid migration gateway cloud endpoint (vCenter Server API)",
        build: env!("CARGO_PKG_VERSION"),
        kind: "vCenter Server with an embedded Platform Services Controller",
        summary: format!(
            "cloud-endpoint {}: the cloud domain of the migration gateway, in vSphere {} shapes",
            env!("CARGO_PKG_VERSION"),
            VSPHERE_API_VERSION
        ),
        releasedate: "",
        install_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_has_vsphere_field_names() {
        let info = VersionInfo {
            version: VSPHERE_API_VERSION,
            product: "p",
            build: "0.1.0",
            kind: "vCenter Server with an embedded Platform Services Controller",
            summary: "s".into(),
            releasedate: "",
            install_time: "2026-12-06T17:00:00.000Z".into(),
        };
        let json = serde_json::to_value(&info).unwrap();
        let mut fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "build",
                "install_time",
                "product",
                "releasedate",
                "summary",
                "type",
                "version"
            ]
        );
        assert!(VSPHERE_API_VERSION.starts_with("8.0."));
    }
}
