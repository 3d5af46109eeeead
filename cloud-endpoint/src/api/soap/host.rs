//! A HostSystem's properties in vim25's types: `runtime`, `summary` and `hardware`, and
//! the host's uuid (`hardware.systemInfo.uuid`, `summary.hardware.uuid`), which
//! `SearchIndex.FindByUuid` with `vmSearch=false` finds.

use super::value::{MoRef, Value};
use crate::inventory::HostInfo;

/// What a host says of its hardware. A host of the cloud domain is the endpoint's machine
/// running each VM under QEMU, not a server whose maker is known here.
const VENDOR: &str = "Cloud migration gateway";
const MODEL: &str = "QEMU/KVM host";

/// The namespace of the hosts' name-based uuids (RFC 9562 version 5): any fixed uuid
/// works; this one is the gateway's own, so its host uuids do not meet another
/// generator's.
const HOST_UUID_NAMESPACE: [u8; 16] = [
    0x6b, 0x1d, 0x2f, 0x4e, 0x93, 0x0c, 0x4a, 0x57, 0x8e, 0x21, 0xc4, 0x5d, 0x70, 0xa9, 0x3b, 0x16,
];

/// The host's hardware uuid. vCenter reads it from the server's firmware; a host here has
/// none of its own, so it is derived from the host's identity in the inventory (its id
/// and name): the same at every start and after a restore of the inventory, without a
/// column to keep, and another for each host.
pub fn uuid(h: &HostInfo) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(&HOST_UUID_NAMESPACE);
    ctx.update(format!("host:{}:{}", h.id, h.name).as_bytes());
    let digest = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
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

fn memory_bytes(h: &HostInfo) -> Value {
    Value::Long((h.memory_mib as i64) << 20)
}

/// Top-level property `prop` of a host (other than name, parent, overallStatus and its
/// lists of VMs, datastores and networks).
pub fn property(h: &HostInfo, prop: &str) -> Option<Value> {
    Some(match prop {
        "runtime" => Value::Data(
            "HostRuntimeInfo",
            vec![
                (
                    "connectionState",
                    Value::Enum("HostSystemConnectionState", "connected".into()),
                ),
                ("powerState", Value::Enum("HostSystemPowerState", "poweredOn".into())),
                ("inMaintenanceMode", Value::Bool(false)),
            ],
        ),
        "summary" => Value::Data(
            "HostListSummary",
            vec![
                ("host", Value::Ref(MoRef::new("HostSystem", &h.id))),
                (
                    "hardware",
                    Value::Data(
                        "HostHardwareSummary",
                        vec![
                            ("vendor", Value::str(VENDOR)),
                            ("model", Value::str(MODEL)),
                            ("uuid", Value::Str(uuid(h))),
                            ("memorySize", memory_bytes(h)),
                            ("numCpuCores", Value::Int(i64::from(h.cpu_cores))),
                        ],
                    ),
                ),
                (
                    "config",
                    Value::Data("HostConfigSummary", vec![("name", Value::str(&h.name))]),
                ),
                ("overallStatus", Value::Enum("ManagedEntityStatus", "green".into())),
            ],
        ),
        "hardware" => Value::Data(
            "HostHardwareInfo",
            vec![
                (
                    "systemInfo",
                    Value::Data(
                        "HostSystemInfo",
                        vec![
                            ("vendor", Value::str(VENDOR)),
                            ("model", Value::str(MODEL)),
                            ("uuid", Value::Str(uuid(h))),
                        ],
                    ),
                ),
                ("memorySize", memory_bytes(h)),
            ],
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, name: &str) -> HostInfo {
        HostInfo {
            id: id.into(),
            name: name.into(),
            cluster: "domain-c7".into(),
            cpu_cores: 16,
            memory_mib: 65536,
        }
    }

    #[test]
    fn a_host_uuid_is_a_stable_version_5_uuid_of_its_identity() {
        let a = uuid(&host("host-9", "esx-cloud-01.local"));
        assert_eq!(a, uuid(&host("host-9", "esx-cloud-01.local")), "stable");
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "5", "version 5: {a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "RFC variant: {a}");
        assert_ne!(a, uuid(&host("host-10", "esx-cloud-01.local")));
        assert_ne!(a, uuid(&host("host-9", "esx-cloud-02.local")));
    }

    #[test]
    fn the_uuid_is_in_the_hardware_and_its_summary() {
        let h = host("host-9", "esx-cloud-01.local");
        let want = Value::Str(uuid(&h));
        let hardware = property(&h, "hardware").unwrap();
        assert_eq!(hardware.field("systemInfo").and_then(|s| s.field("uuid")), Some(&want));
        assert_eq!(hardware.field("memorySize"), Some(&Value::Long(65536 << 20)));
        let summary = property(&h, "summary").unwrap();
        assert_eq!(summary.field("hardware").and_then(|s| s.field("uuid")), Some(&want));
    }
}
