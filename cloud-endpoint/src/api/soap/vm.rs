//! A VirtualMachine's properties in vim25's types: `config` (with the device list),
//! `runtime`, `summary` and the lists. Devices are those of the REST view
//! ([`VmInfo`]), with the same keys, so both APIs name a disk `2000` alike.

use super::value::{MoRef, Value};
use crate::api::vcenter::vm::{canonical_uuid, VmInfo};
use crate::datastore::VIRTUAL_HW_VERSION;
use crate::inventory::VmRecord;

/// `config.uuid`: the BIOS uuid, or the instance uuid for a VM whose .vmx had none
/// (vim25 always has one, and scripts key on it).
pub fn bios_uuid(vm: &VmRecord) -> String {
    vm.bios_uuid
        .as_deref()
        .map_or_else(|| vm.instance_uuid.clone(), canonical_uuid)
}

/// vim25's guest id for a .vmx `guestOS`: `debian12-64` is `debian12_64Guest`,
/// `ubuntu-64` `ubuntu64Guest`, `otherlinux-64` `otherLinux64Guest`.
pub fn guest_id(vmx: &str) -> String {
    if vmx.ends_with("Guest") {
        return vmx.to_owned();
    }
    let id = vmx.replace("otherlinux", "otherLinux");
    match id.split_once("-64") {
        Some((base, _)) if base.contains(|c: char| c.is_ascii_digit()) => format!("{base}_64Guest"),
        Some((base, _)) => format!("{base}64Guest"),
        None if id.is_empty() => "otherGuest".to_owned(),
        None => format!("{id}Guest"),
    }
}

fn power_state(vm: &VmRecord) -> Value {
    let state = match vm.power_state.as_str() {
        "POWERED_ON" => "poweredOn",
        "SUSPENDED" => "suspended",
        _ => "poweredOff",
    };
    Value::Enum("VirtualMachinePowerState", state.into())
}

fn description(label: &str, summary: &str) -> Value {
    Value::Data(
        "Description",
        vec![("label", Value::str(label)), ("summary", Value::str(summary))],
    )
}

/// vim25's class of a REST NIC type.
fn nic_class(kind: &str) -> &'static str {
    match kind {
        "VMXNET3" => "VirtualVmxnet3",
        "VMXNET2" => "VirtualVmxnet2",
        "VMXNET" => "VirtualVmxnet",
        "E1000E" => "VirtualE1000e",
        "PCNET32" => "VirtualPCNet32",
        "VMXNET3_VRDMA" => "VirtualVmxnet3Vrdma",
        _ => "VirtualE1000",
    }
}

fn scsi_class(kind: &str) -> &'static str {
    match kind {
        "PVSCSI" => "ParaVirtualSCSIController",
        "LSILOGICSAS" => "VirtualLsiLogicSASController",
        "BUSLOGIC" => "VirtualBusLogicController",
        _ => "VirtualLsiLogicController",
    }
}

/// Controllers, then disks, then NICs, each with the REST view's key.
pub fn devices(vm: &VmRecord, info: &VmInfo) -> Vec<Value> {
    let mut out = Vec::new();
    let key = |k: &str| k.parse::<i64>().unwrap_or_default();
    let disk_keys = |pred: &dyn Fn(&crate::api::vcenter::vm::Disk) -> bool| {
        Value::Array(
            "int",
            info.disks
                .iter()
                .filter(|(_, d)| pred(d))
                .map(|(k, _)| Value::Int(key(k)))
                .collect(),
        )
    };
    // The fields every disk controller has: its key, label, place on the PCI bus (unit
    // numbers from `first_unit`), bus number and the keys of the disks on it.
    let controller = |k, label: &str, first_unit: i64, bus: u32, devices: Value| {
        vec![
            ("key", Value::Int(key(k))),
            ("deviceInfo", description(label, label)),
            ("controllerKey", Value::Int(100)),
            ("unitNumber", Value::Int(first_unit + i64::from(bus))),
            ("busNumber", Value::Int(i64::from(bus))),
            ("device", devices),
        ]
    };
    for (k, a) in &info.scsi_adapters {
        let bus = a.scsi.bus;
        let mut fields = controller(
            k,
            &a.label,
            3,
            bus,
            disk_keys(&|d| d.scsi.is_some_and(|s| s.bus == bus)),
        );
        fields.extend([
            ("hotAddRemove", Value::Bool(true)),
            ("sharedBus", Value::Enum("VirtualSCSISharing", "noSharing".into())),
            ("scsiCtlrUnitNumber", Value::Int(7)),
        ]);
        out.push(Value::Data(scsi_class(a.kind), fields));
    }
    for (k, a) in &info.sata_adapters {
        let bus = a.bus;
        let devices = disk_keys(&|d| d.sata.is_some_and(|s| s.bus == bus));
        out.push(Value::Data(
            "VirtualAHCIController",
            controller(k, &a.label, 24, bus, devices),
        ));
    }
    for (k, a) in &info.nvme_adapters {
        let bus = a.bus;
        let devices = disk_keys(&|d| d.nvme.is_some_and(|s| s.bus == bus));
        out.push(Value::Data(
            "VirtualNVMEController",
            controller(k, &a.label, 30, bus, devices),
        ));
    }
    let has_ide = info.disks.values().any(|d| d.ide.is_some());
    if has_ide {
        for bus in 0..2 {
            out.push(Value::Data(
                "VirtualIDEController",
                vec![
                    ("key", Value::Int(200 + bus)),
                    ("deviceInfo", description(&format!("IDE {bus}"), &format!("IDE {bus}"))),
                    ("busNumber", Value::Int(bus)),
                    (
                        "device",
                        disk_keys(&|d| d.ide.is_some_and(|a| i64::from(!a.primary) == bus)),
                    ),
                ],
            ));
        }
    }
    for ((k, d), record) in info.disks.iter().zip(&vm.disks) {
        let (controller, unit) = if let Some(a) = d.scsi {
            (1000 + a.bus, a.unit)
        } else if let Some(a) = d.sata {
            (15000 + a.bus, a.unit)
        } else if let Some(a) = d.nvme {
            (31000 + a.bus, a.unit)
        } else if let Some(a) = d.ide {
            (if a.primary { 200 } else { 201 }, if a.master { 0 } else { 1 })
        } else {
            (1000, 0)
        };
        let kib = d.capacity / 1024;
        out.push(Value::Data(
            "VirtualDisk",
            vec![
                ("key", Value::Int(key(k))),
                ("deviceInfo", description(&d.label, &format!("{kib} KB"))),
                (
                    "backing",
                    Value::Data(
                        "VirtualDiskFlatVer2BackingInfo",
                        vec![
                            ("fileName", Value::str(&d.backing.vmdk_file)),
                            ("datastore", Value::Ref(MoRef::new("Datastore", &record.datastore))),
                            ("diskMode", Value::str("persistent")),
                            ("thinProvisioned", Value::Bool(true)),
                        ],
                    ),
                ),
                ("controllerKey", Value::Int(i64::from(controller))),
                ("unitNumber", Value::Int(i64::from(unit))),
                ("capacityInKB", Value::Long(kib as i64)),
                ("capacityInBytes", Value::Long(d.capacity as i64)),
            ],
        ));
    }
    for (index, (k, n)) in info.nics.iter().enumerate() {
        let mut fields = vec![
            ("key", Value::Int(key(k))),
            ("deviceInfo", description(&n.label, &n.backing.network_name)),
            (
                "backing",
                Value::Data(
                    "VirtualEthernetCardNetworkBackingInfo",
                    vec![
                        ("deviceName", Value::str(&n.backing.network_name)),
                        ("network", Value::Ref(MoRef::new("Network", &n.backing.network))),
                    ],
                ),
            ),
            (
                "connectable",
                Value::Data(
                    "VirtualDeviceConnectInfo",
                    vec![
                        ("startConnected", Value::Bool(n.start_connected)),
                        ("allowGuestControl", Value::Bool(n.allow_guest_control)),
                        ("connected", Value::Bool(n.state == "CONNECTED")),
                    ],
                ),
            ),
            ("controllerKey", Value::Int(100)),
            ("unitNumber", Value::Int(7 + index as i64)),
            (
                "addressType",
                Value::str(match n.mac_type {
                    "MANUAL" => "manual",
                    "ASSIGNED" => "assigned",
                    _ => "generated",
                }),
            ),
        ];
        if let Some(mac) = &n.mac_address {
            fields.push(("macAddress", Value::str(mac)));
        }
        fields.push(("wakeOnLanEnabled", Value::Bool(n.wake_on_lan_enabled)));
        out.push(Value::Data(nic_class(n.kind), fields));
    }
    out
}

/// Top-level property `prop` of a VM (other than name, parent, overallStatus).
pub fn property(vm: &VmRecord, prop: &str) -> Option<Value> {
    let me = || MoRef::new("VirtualMachine", &vm.id);
    let host = || Value::Ref(MoRef::new("HostSystem", &vm.host));
    let guest = guest_id(&vm.guest_os);
    Some(match prop {
        "config" => {
            let info = VmInfo::from_record(vm);
            let devices = devices(vm, &info);
            Value::Data(
                "VirtualMachineConfigInfo",
                vec![
                    ("changeVersion", Value::str(&vm.created)),
                    (
                        "modified",
                        Value::Time(crate::api::session::rfc3339_millis(time::OffsetDateTime::UNIX_EPOCH)),
                    ),
                    ("name", Value::str(&vm.name)),
                    ("guestFullName", Value::str(&guest)),
                    ("version", Value::Str(format!("vmx-{VIRTUAL_HW_VERSION:02}"))),
                    ("uuid", Value::Str(bios_uuid(vm))),
                    ("instanceUuid", Value::str(&vm.instance_uuid)),
                    ("template", Value::Bool(false)),
                    ("guestId", Value::str(&guest)),
                    ("firmware", Value::str(&info.boot.kind.to_ascii_lowercase())),
                    (
                        "files",
                        Value::Data("VirtualMachineFileInfo", vec![("vmPathName", Value::str(&vm.vmx_path))]),
                    ),
                    (
                        "hardware",
                        Value::Data(
                            "VirtualHardware",
                            vec![
                                ("numCPU", Value::Int(i64::from(vm.num_cpus))),
                                ("numCoresPerSocket", Value::Int(i64::from(info.cpu.cores_per_socket))),
                                ("memoryMB", Value::Int(vm.memory_mib as i64)),
                                ("device", Value::Array("VirtualDevice", devices)),
                            ],
                        ),
                    ),
                ],
            )
        }
        "runtime" => Value::Data(
            "VirtualMachineRuntimeInfo",
            vec![
                ("host", host()),
                (
                    "connectionState",
                    Value::Enum("VirtualMachineConnectionState", "connected".into()),
                ),
                ("powerState", power_state(vm)),
            ],
        ),
        "summary" => Value::Data(
            "VirtualMachineSummary",
            vec![
                ("vm", Value::Ref(me())),
                (
                    "runtime",
                    Value::Data(
                        "VirtualMachineRuntimeInfo",
                        vec![
                            ("host", host()),
                            (
                                "connectionState",
                                Value::Enum("VirtualMachineConnectionState", "connected".into()),
                            ),
                            ("powerState", power_state(vm)),
                        ],
                    ),
                ),
                (
                    "config",
                    Value::Data(
                        "VirtualMachineConfigSummary",
                        vec![
                            ("name", Value::str(&vm.name)),
                            ("template", Value::Bool(false)),
                            ("vmPathName", Value::str(&vm.vmx_path)),
                            ("memorySizeMB", Value::Int(vm.memory_mib as i64)),
                            ("numCpu", Value::Int(i64::from(vm.num_cpus))),
                            ("numEthernetCards", Value::Int(vm.nics.len() as i64)),
                            ("numVirtualDisks", Value::Int(vm.disks.len() as i64)),
                            ("uuid", Value::Str(bios_uuid(vm))),
                            ("instanceUuid", Value::str(&vm.instance_uuid)),
                            ("guestId", Value::str(&guest)),
                            ("guestFullName", Value::str(&guest)),
                        ],
                    ),
                ),
                ("overallStatus", Value::Enum("ManagedEntityStatus", "green".into())),
            ],
        ),
        "datastore" => {
            let mut ids: Vec<&str> = std::iter::once(vm.datastore.as_str())
                .chain(vm.disks.iter().map(|d| d.datastore.as_str()))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            Value::refs(ids.into_iter().map(|id| MoRef::new("Datastore", id)))
        }
        "network" => {
            let mut ids: Vec<&str> = vm.nics.iter().map(|n| n.network.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            Value::refs(ids.into_iter().map(|id| MoRef::new("Network", id)))
        }
        "resourcePool" => Value::Ref(MoRef::new("ResourcePool", &vm.resource_pool)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ids_take_vim_form() {
        for (vmx, vim) in [
            ("debian12-64", "debian12_64Guest"),
            ("ubuntu-64", "ubuntu64Guest"),
            ("otherlinux-64", "otherLinux64Guest"),
            ("windows2019srv-64", "windows2019srv_64Guest"),
            ("ubuntu64Guest", "ubuntu64Guest"),
            ("", "otherGuest"),
        ] {
            assert_eq!(guest_id(vmx), vim, "{vmx}");
        }
    }
}
