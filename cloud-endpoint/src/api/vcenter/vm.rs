//! `com.vmware.vcenter.VM`: list with vSphere's filter spec, and get with the device maps
//! vSphere keys by device id.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{check_list_size, not_found, Filter};
use crate::api::error::ApiError;
use crate::datastore::{parse_disk_key, VIRTUAL_HW_VERSION};
use crate::inventory::{DiskRecord, NicRecord, VmRecord};
use crate::Domain;

pub const POWER_STATES: &[&str] = &["POWERED_ON", "POWERED_OFF", "SUSPENDED"];

#[derive(Debug, Clone, Serialize)]
pub struct VmSummary {
    pub vm: String,
    pub name: String,
    pub power_state: String,
    pub cpu_count: u32,
    #[serde(rename = "memory_size_MiB")]
    pub memory_size_mib: u64,
}

/// Filters: `vms`, `names`, `folders`, `datacenters`, `hosts`, `clusters`,
/// `resource_pools`, `power_states`. More than [`super::MAX_LIST_RESULTS`] matches is an
/// error, as in vSphere.
pub fn list(domain: &Domain, filter: &Filter) -> Result<Vec<VmSummary>, ApiError> {
    filter.check_enum("power_states", POWER_STATES)?;
    let d = domain.inventory.domain()?;
    let cluster_of = |host: &str| d.hosts.iter().find(|h| h.id == host).map(|h| h.cluster.as_str());
    let list: Vec<VmSummary> = domain
        .inventory
        .list_vms()?
        .into_iter()
        .filter(|vm| {
            filter.allows("vms", &vm.id)
                && filter.allows("names", &vm.name)
                && filter.allows("folders", &vm.folder)
                // One datacenter holds every VM.
                && filter.allows("datacenters", &d.datacenter.id)
                && filter.allows("hosts", &vm.host)
                && filter
                    .get("clusters")
                    .is_none_or(|set| cluster_of(&vm.host).is_some_and(|c| set.iter().any(|s| s == c)))
                // A VM is in exactly one pool (vSphere's filter does not descend into
                // child pools either).
                && filter.allows("resource_pools", &vm.resource_pool)
                && filter.allows("power_states", &vm.power_state)
        })
        .map(|vm| VmSummary {
            vm: vm.id,
            name: vm.name,
            power_state: vm.power_state,
            cpu_count: vm.num_cpus,
            memory_size_mib: vm.memory_mib,
        })
        .collect();
    check_list_size("VMs", list.len())?;
    Ok(list)
}

pub fn get(domain: &Domain, id: &str) -> Result<VmInfo, ApiError> {
    let vm = domain.inventory.vm(id)?.ok_or_else(|| not_found("VM", id))?;
    Ok(VmInfo::from_record(&vm))
}

/// `GET /api/vcenter/vm/{vm}`.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    #[serde(rename = "guest_OS")]
    pub guest_os: String,
    pub name: String,
    pub power_state: String,
    pub identity: Identity,
    pub hardware: Hardware,
    pub boot: Boot,
    pub boot_devices: Vec<serde_json::Value>,
    pub cpu: Cpu,
    pub memory: Memory,
    pub disks: BTreeMap<String, Disk>,
    pub nics: BTreeMap<String, Nic>,
    pub cdroms: BTreeMap<String, serde_json::Value>,
    pub floppies: BTreeMap<String, serde_json::Value>,
    pub parallel_ports: BTreeMap<String, serde_json::Value>,
    pub serial_ports: BTreeMap<String, serde_json::Value>,
    pub sata_adapters: BTreeMap<String, SataAdapter>,
    pub scsi_adapters: BTreeMap<String, ScsiAdapter>,
    pub nvme_adapters: BTreeMap<String, NvmeAdapter>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Identity {
    pub name: String,
    /// Absent when the source VM had no `uuid.bios` (the cloud writes none either).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bios_uuid: Option<String>,
    pub instance_uuid: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hardware {
    pub version: String,
    pub upgrade_policy: &'static str,
    pub upgrade_status: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Boot {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub delay: u64,
    pub retry: bool,
    pub retry_delay: u64,
    pub enter_setup_mode: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub count: u32,
    pub cores_per_socket: u32,
    pub hot_add_enabled: bool,
    pub hot_remove_enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    #[serde(rename = "size_MiB")]
    pub size_mib: u64,
    pub hot_add_enabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub capacity: u64,
    pub backing: DiskBacking,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scsi: Option<BusAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sata: Option<BusAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvme: Option<BusAddress>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ide: Option<IdeAddress>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskBacking {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub vmdk_file: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BusAddress {
    pub bus: u32,
    pub unit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IdeAddress {
    pub primary: bool,
    pub master: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nic {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub mac_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    pub state: &'static str,
    pub start_connected: bool,
    pub allow_guest_control: bool,
    pub wake_on_lan_enabled: bool,
    pub backing: NicBacking,
}

#[derive(Debug, Clone, Serialize)]
pub struct NicBacking {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub network: String,
    pub network_name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScsiAdapter {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub scsi: BusAddress,
    pub sharing: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct SataAdapter {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub bus: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct NvmeAdapter {
    pub label: String,
    pub bus: u32,
}

/// vSphere's first device keys: disks 2000.., NICs 4000.., SCSI controllers 1000 + bus,
/// SATA controllers 15000 + bus, NVMe controllers 31000 + bus. Disks and NICs are numbered
/// in their registered order, which is slot order.
const DISK_KEY_BASE: usize = 2000;
const NIC_KEY_BASE: usize = 4000;
const SCSI_ADAPTER_KEY_BASE: u32 = 1000;
const SATA_ADAPTER_KEY_BASE: u32 = 15000;
const NVME_ADAPTER_KEY_BASE: u32 = 31000;

/// vSphere's SCSI adapter type (`Vcenter.Vm.Hardware.Adapter.Scsi.Type`) for the
/// controller type the .vmx declares.
fn scsi_adapter_type(kind: Option<gateway::plan::ControllerType>) -> &'static str {
    use gateway::plan::ControllerType;
    match kind {
        Some(ControllerType::Pvscsi) => "PVSCSI",
        Some(ControllerType::LsiSas1068) => "LSILOGICSAS",
        Some(ControllerType::BusLogic) => "BUSLOGIC",
        _ => "LSILOGIC",
    }
}

impl VmInfo {
    pub fn from_record(vm: &VmRecord) -> VmInfo {
        let mut info = VmInfo {
            guest_os: guest_os_enum(&vm.guest_os),
            name: vm.name.clone(),
            power_state: vm.power_state.clone(),
            identity: Identity {
                name: vm.name.clone(),
                bios_uuid: vm.bios_uuid.as_deref().map(canonical_uuid),
                instance_uuid: vm.instance_uuid.clone(),
            },
            hardware: Hardware {
                version: format!("VMX_{VIRTUAL_HW_VERSION:02}"),
                upgrade_policy: "NEVER",
                upgrade_status: "NONE",
            },
            boot: Boot {
                kind: if vm.firmware.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("efi")) {
                    "EFI"
                } else {
                    "BIOS"
                },
                delay: 0,
                retry: false,
                retry_delay: 10_000,
                enter_setup_mode: false,
            },
            boot_devices: Vec::new(),
            cpu: Cpu {
                count: vm.num_cpus,
                cores_per_socket: vm.cores_per_socket.unwrap_or(1).max(1),
                hot_add_enabled: false,
                hot_remove_enabled: false,
            },
            memory: Memory {
                size_mib: vm.memory_mib,
                hot_add_enabled: false,
            },
            disks: BTreeMap::new(),
            nics: BTreeMap::new(),
            cdroms: BTreeMap::new(),
            floppies: BTreeMap::new(),
            parallel_ports: BTreeMap::new(),
            serial_ports: BTreeMap::new(),
            sata_adapters: BTreeMap::new(),
            scsi_adapters: BTreeMap::new(),
            nvme_adapters: BTreeMap::new(),
        };
        for (index, record) in vm.disks.iter().enumerate() {
            let disk = disk(index, record);
            if let Some(a) = disk.scsi {
                info.scsi_adapters
                    .entry((SCSI_ADAPTER_KEY_BASE + a.bus).to_string())
                    .or_insert_with(|| ScsiAdapter {
                        label: format!("SCSI controller {}", a.bus),
                        kind: scsi_adapter_type(vm.controller_type(&format!("scsi{}", a.bus))),
                        scsi: BusAddress { bus: a.bus, unit: 7 },
                        sharing: "NONE",
                    });
            }
            if let Some(a) = disk.sata {
                info.sata_adapters
                    .entry((SATA_ADAPTER_KEY_BASE + a.bus).to_string())
                    .or_insert_with(|| SataAdapter {
                        label: format!("SATA controller {}", a.bus),
                        kind: "AHCI",
                        bus: a.bus,
                    });
            }
            if let Some(a) = disk.nvme {
                info.nvme_adapters
                    .entry((NVME_ADAPTER_KEY_BASE + a.bus).to_string())
                    .or_insert_with(|| NvmeAdapter {
                        label: format!("NVME controller {}", a.bus),
                        bus: a.bus,
                    });
            }
            info.disks.insert((DISK_KEY_BASE + index).to_string(), disk);
        }
        for (index, record) in vm.nics.iter().enumerate() {
            info.nics
                .insert((NIC_KEY_BASE + index).to_string(), nic(index, record, &vm.power_state));
        }
        info
    }
}

fn disk(index: usize, d: &DiskRecord) -> Disk {
    let mut disk = Disk {
        label: format!("Hard disk {}", index + 1),
        kind: "SCSI",
        capacity: d.capacity_bytes,
        // vSphere knows no other backing; qcow2 and raw files are named all the same.
        backing: DiskBacking {
            kind: "VMDK_FILE",
            vmdk_file: d.path.clone(),
        },
        scsi: None,
        sata: None,
        nvme: None,
        ide: None,
    };
    // Keys were checked when the VM was registered; an odd one is shown without an address.
    if let Ok((bus_kind, bus, unit)) = parse_disk_key(&d.key) {
        let address = Some(BusAddress { bus, unit });
        match bus_kind {
            "sata" => (disk.kind, disk.sata) = ("SATA", address),
            "nvme" => (disk.kind, disk.nvme) = ("NVME", address),
            "ide" => {
                disk.kind = "IDE";
                disk.ide = Some(IdeAddress {
                    primary: bus == 0,
                    master: unit == 0,
                });
            }
            _ => disk.scsi = address,
        }
    }
    disk
}

fn nic(index: usize, n: &NicRecord, power_state: &str) -> Nic {
    Nic {
        label: format!("Network adapter {}", index + 1),
        kind: nic_type(n.virtual_dev.as_deref()),
        mac_type: mac_type(n.address_type.as_deref(), n.mac.is_some()),
        mac_address: n.mac.clone(),
        // A powered-off VM's NIC is not connected; a running one's is, to the host's
        // isolated user-mode network (see crate::hosts).
        state: if power_state == crate::hosts::POWERED_ON {
            "CONNECTED"
        } else {
            "NOT_CONNECTED"
        },
        start_connected: true,
        allow_guest_control: true,
        wake_on_lan_enabled: false,
        backing: NicBacking {
            kind: "STANDARD_PORTGROUP",
            network: n.network.clone(),
            network_name: n.network_name.clone(),
        },
    }
}

/// vSphere's `mac_type` for a .vmx `addressType`: `static` is MANUAL, `generated` (by the
/// host) GENERATED, `vpx` (given by vCenter) ASSIGNED. Without one, a kept MAC was written
/// static, and no MAC is generated when the VM first powers on.
fn mac_type(address_type: Option<&str>, has_mac: bool) -> &'static str {
    match address_type.map(str::to_ascii_lowercase).as_deref() {
        Some("static") => "MANUAL",
        Some("vpx") => "ASSIGNED",
        Some("generated") => "GENERATED",
        _ if has_mac => "MANUAL",
        _ => "GENERATED",
    }
}

/// vSphere's NIC type for a .vmx `ethernetN.virtualDev`. Without one ESXi picks E1000 for
/// the guests that matter here.
fn nic_type(virtual_dev: Option<&str>) -> &'static str {
    match virtual_dev.map(str::to_ascii_lowercase).as_deref() {
        Some("vmxnet3") => "VMXNET3",
        Some("vmxnet2") => "VMXNET2",
        Some("vmxnet") => "VMXNET",
        Some("e1000e") => "E1000E",
        Some("vlance" | "pcnet32") => "PCNET32",
        Some("vrdma") | Some("vmxnet3vrdma") => "VMXNET3_VRDMA",
        _ => "E1000",
    }
}

/// The REST guest OS enum for a .vmx `guestOS` id: `debian12-64` is `DEBIAN_12_64`,
/// `windows2019srv-64` is `WINDOWS_2019SRV_64`, `otherlinux-64` is `OTHER_LINUX_64`.
/// Ids given in vim's form (`ubuntu64Guest`) lose the `Guest` suffix the same way.
pub fn guest_os_enum(vmx_id: &str) -> String {
    let id = vmx_id.strip_suffix("Guest").unwrap_or(vmx_id).to_ascii_lowercase();
    let id = id
        .strip_prefix("otherlinux")
        .map(|rest| format!("other_linux{rest}"))
        .or_else(|| id.strip_prefix("other").map(|rest| format!("other_{rest}")))
        .unwrap_or(id);
    let mut out = String::new();
    let mut prev: Option<char> = None;
    for c in id.chars() {
        let c = if c == '-' { '_' } else { c };
        // A letter run followed by a number starts a new word: debian12 -> DEBIAN_12.
        if c.is_ascii_digit() && prev.is_some_and(|p| p.is_ascii_alphabetic()) {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
        prev = Some(c);
    }
    let out = out.trim_matches('_').replace("__", "_");
    if out.is_empty() {
        "OTHER".to_owned()
    } else {
        out
    }
}

/// vSphere's text form of a .vmx `uuid.bios` (`56 4d 12 34 ... -de f0 ...`):
/// `564d1234-5678-9abc-def0-123456789abc`. Anything else is shown as stored.
pub fn canonical_uuid(vmx: &str) -> String {
    let hex: String = vmx
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return vmx.to_owned();
    }
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_os_ids_map_to_rest_enums() {
        for (vmx, rest) in [
            ("debian12-64", "DEBIAN_12_64"),
            ("rhel8-64", "RHEL_8_64"),
            ("ubuntu-64", "UBUNTU_64"),
            ("ubuntu64Guest", "UBUNTU_64"),
            ("windows2019srv-64", "WINDOWS_2019SRV_64"),
            ("otherlinux-64", "OTHER_LINUX_64"),
            ("other-64", "OTHER_64"),
            ("centos7-64", "CENTOS_7_64"),
            ("", "OTHER"),
        ] {
            assert_eq!(guest_os_enum(vmx), rest, "{vmx}");
        }
    }

    #[test]
    fn bios_uuids_take_vsphere_form() {
        assert_eq!(
            canonical_uuid("56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc"),
            "564d1234-5678-9abc-def0-123456789abc"
        );
        assert_eq!(canonical_uuid("not a uuid"), "not a uuid");
    }

    #[test]
    fn devices_get_vsphere_keys_labels_and_addresses() {
        let vm = VmRecord {
            id: "vm-20".into(),
            name: "db01".into(),
            guest_os: "debian12-64".into(),
            num_cpus: 4,
            cores_per_socket: Some(2),
            memory_mib: 4096,
            firmware: Some("efi".into()),
            bios_uuid: None,
            power_state: "POWERED_OFF".into(),
            host: "host-9".into(),
            datastore: "datastore-10".into(),
            folder: "group-v7".into(),
            resource_pool: "resgroup-8".into(),
            vmx_path: "[cloud-ds1] db01/db01.vmx".into(),
            disks: vec![
                DiskRecord {
                    key: "scsi0:0".into(),
                    path: "[cloud-ds1] db01/db01.vmdk".into(),
                    capacity_bytes: 1 << 30,
                    datastore: "datastore-10".into(),
                },
                DiskRecord {
                    key: "sata0:1".into(),
                    path: "[cloud-ds1] db01/db01_1.vmdk".into(),
                    capacity_bytes: 1 << 20,
                    datastore: "datastore-10".into(),
                },
                DiskRecord {
                    key: "ide0:1".into(),
                    path: "[cloud-ds1] db01/db01_2.qcow2".into(),
                    capacity_bytes: 512,
                    datastore: "datastore-10".into(),
                },
                DiskRecord {
                    key: "scsi1:0".into(),
                    path: "[cloud-ds1] db01/db01_3.vmdk".into(),
                    capacity_bytes: 512,
                    datastore: "datastore-10".into(),
                },
            ],
            controllers: vec![gateway::plan::ControllerSpec {
                key: "scsi1".into(),
                kind: gateway::plan::ControllerType::Pvscsi,
            }],
            nics: vec![
                NicRecord {
                    key: "ethernet0".into(),
                    network: "network-12".into(),
                    network_name: "cloud-db".into(),
                    mac: None,
                    virtual_dev: Some("e1000e".into()),
                    address_type: None,
                    source_network: "DB".into(),
                },
                NicRecord {
                    key: "ethernet1".into(),
                    network: "network-12".into(),
                    network_name: "cloud-db".into(),
                    mac: Some("00:50:56:9a:00:01".into()),
                    virtual_dev: Some("vmxnet3".into()),
                    address_type: Some("vpx".into()),
                    source_network: "DB".into(),
                },
            ],
            migration: None,
            created: "2024-01-01T00:00:00Z".into(),
            instance_uuid: "5003a1b2-0000-4000-8000-000000000001".into(),
        };
        let json = serde_json::to_value(VmInfo::from_record(&vm)).unwrap();
        assert_eq!(json["guest_OS"], "DEBIAN_12_64");
        assert_eq!(json["boot"]["type"], "EFI");
        assert_eq!(json["cpu"]["cores_per_socket"], 2);
        assert_eq!(json["memory"]["size_MiB"], 4096);
        assert_eq!(json["hardware"]["version"], "VMX_14");
        assert!(json["identity"].get("bios_uuid").is_none());
        assert_eq!(json["disks"]["2000"]["scsi"], serde_json::json!({"bus": 0, "unit": 0}));
        assert_eq!(json["disks"]["2001"]["type"], "SATA");
        assert_eq!(json["disks"]["2001"]["sata"], serde_json::json!({"bus": 0, "unit": 1}));
        assert_eq!(json["disks"]["2002"]["label"], "Hard disk 3");
        assert_eq!(
            json["disks"]["2002"]["ide"],
            serde_json::json!({"primary": true, "master": false})
        );
        // scsi0 has no controller row (registered before they were kept): what its .vmx says.
        assert_eq!(json["scsi_adapters"]["1000"]["type"], "LSILOGIC");
        assert_eq!(json["scsi_adapters"]["1001"]["type"], "PVSCSI");
        assert_eq!(
            json["scsi_adapters"]["1001"]["scsi"],
            serde_json::json!({"bus": 1, "unit": 7})
        );
        assert_eq!(json["disks"]["2003"]["scsi"], serde_json::json!({"bus": 1, "unit": 0}));
        assert_eq!(json["nics"]["4001"]["type"], "VMXNET3");
        assert_eq!(json["nics"]["4001"]["mac_type"], "ASSIGNED");
        assert_eq!(json["nics"]["4001"]["mac_address"], "00:50:56:9a:00:01");
        assert_eq!(json["sata_adapters"]["15000"]["bus"], 0);
        assert_eq!(json["nvme_adapters"], serde_json::json!({}));
        assert_eq!(json["nics"]["4000"]["type"], "E1000E");
        assert_eq!(json["nics"]["4000"]["mac_type"], "GENERATED");
        assert!(json["nics"]["4000"].get("mac_address").is_none());
        assert_eq!(json["cdroms"], serde_json::json!({}));
    }
}
