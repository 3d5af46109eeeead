//! What the SDK's bindings (`com/vmware/vcenter_client.py`, `cis_client.py`,
//! `cis/task_client.py` of `vmware-vcenter` 9.1) declare for each result: canonical
//! structure names and which fields are optional. Fields the SDK knows and the cloud
//! domain has no value for are optional ones, and left out.

use super::value::Shape::{self, Error, List, Map, Never, Opt, Plain, Struct};

// --- lists ----------------------------------------------------------------------------

pub const VM_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.VM.summary",
    &[
        ("vm", Plain),
        ("name", Plain),
        ("power_state", Plain),
        ("cpu_count", Opt(&Plain)),
        ("memory_size_MiB", Opt(&Plain)),
    ],
);

pub const HOST_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.host.summary",
    &[
        ("host", Plain),
        ("name", Plain),
        ("connection_state", Plain),
        ("power_state", Opt(&Plain)),
        ("host_uuid", Opt(&Plain)),
    ],
);

pub const DATASTORE_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.datastore.summary",
    &[
        ("datastore", Plain),
        ("name", Plain),
        ("type", Plain),
        ("free_space", Opt(&Plain)),
        ("capacity", Opt(&Plain)),
    ],
);

pub const NETWORK_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.network.summary",
    &[("network", Plain), ("name", Plain), ("type", Plain)],
);

pub const DATACENTER_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.datacenter.summary",
    &[("datacenter", Plain), ("name", Plain)],
);

pub const CLUSTER_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.cluster.summary",
    &[
        ("cluster", Plain),
        ("name", Plain),
        ("ha_enabled", Plain),
        ("drs_enabled", Plain),
    ],
);

pub const FOLDER_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.folder.summary",
    &[("folder", Plain), ("name", Plain), ("type", Plain)],
);

pub const RESOURCE_POOL_SUMMARY: Shape = Struct(
    "com.vmware.vcenter.resource_pool.summary",
    &[("resource_pool", Plain), ("name", Plain)],
);

// --- gets -----------------------------------------------------------------------------

pub const DATACENTER_INFO: Shape = Struct(
    "com.vmware.vcenter.datacenter.info",
    &[
        ("name", Plain),
        ("datastore_folder", Plain),
        ("host_folder", Plain),
        ("network_folder", Plain),
        ("vm_folder", Plain),
    ],
);

pub const CLUSTER_INFO: Shape = Struct(
    "com.vmware.vcenter.cluster.info",
    &[("name", Plain), ("resource_pool", Plain)],
);

pub const RESOURCE_POOL_INFO: Shape = Struct(
    "com.vmware.vcenter.resource_pool.info",
    &[
        ("name", Plain),
        ("resource_pools", List(&Plain)),
        ("cpu_allocation", Opt(&Never)),
        ("memory_allocation", Opt(&Never)),
    ],
);

pub const DATASTORE_INFO: Shape = Struct(
    "com.vmware.vcenter.datastore.info",
    &[
        ("name", Plain),
        ("type", Plain),
        ("accessible", Plain),
        ("free_space", Opt(&Plain)),
        ("multiple_host_access", Plain),
        ("thin_provisioning_supported", Plain),
    ],
);

const IDE_ADDRESS: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.ide_address_info",
    &[("primary", Plain), ("master", Plain)],
);
const SCSI_ADDRESS: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.scsi_address_info",
    &[("bus", Plain), ("unit", Plain)],
);
const SATA_ADDRESS: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.sata_address_info",
    &[("bus", Plain), ("unit", Plain)],
);
const NVME_ADDRESS: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.nvme_address_info",
    &[("bus", Plain), ("unit", Plain)],
);

pub const DISK_INFO: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.disk.info",
    &[
        ("label", Plain),
        ("type", Plain),
        ("ide", Opt(&IDE_ADDRESS)),
        ("scsi", Opt(&SCSI_ADDRESS)),
        ("sata", Opt(&SATA_ADDRESS)),
        ("nvme", Opt(&NVME_ADDRESS)),
        (
            "backing",
            Struct(
                "com.vmware.vcenter.vm.hardware.disk.backing_info",
                &[("type", Plain), ("vmdk_file", Opt(&Plain))],
            ),
        ),
        ("capacity", Opt(&Plain)),
    ],
);

pub const NIC_INFO: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.ethernet.info",
    &[
        ("label", Plain),
        ("type", Plain),
        ("upt_compatibility_enabled", Opt(&Plain)),
        ("upt_v2_compatibility_enabled", Opt(&Plain)),
        ("mac_type", Plain),
        ("mac_address", Opt(&Plain)),
        ("pci_slot_number", Opt(&Plain)),
        ("wake_on_lan_enabled", Plain),
        (
            "backing",
            Struct(
                "com.vmware.vcenter.vm.hardware.ethernet.backing_info",
                &[
                    ("type", Plain),
                    ("network", Opt(&Plain)),
                    ("network_name", Opt(&Plain)),
                    ("host_device", Opt(&Plain)),
                    ("distributed_switch_uuid", Opt(&Plain)),
                    ("distributed_port", Opt(&Plain)),
                    ("connection_cookie", Opt(&Plain)),
                    ("opaque_network_type", Opt(&Plain)),
                    ("opaque_network_id", Opt(&Plain)),
                ],
            ),
        ),
        ("state", Plain),
        ("start_connected", Plain),
        ("allow_guest_control", Plain),
    ],
);

const SCSI_ADAPTER: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.adapter.scsi.info",
    &[
        ("label", Plain),
        ("type", Plain),
        ("scsi", SCSI_ADDRESS),
        ("pci_slot_number", Opt(&Plain)),
        ("sharing", Plain),
    ],
);

const SATA_ADAPTER: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.adapter.sata.info",
    &[
        ("label", Plain),
        ("type", Plain),
        ("bus", Plain),
        ("pci_slot_number", Opt(&Plain)),
    ],
);

const NVME_ADAPTER: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.adapter.nvme.info",
    &[("label", Plain), ("bus", Plain), ("pci_slot_number", Opt(&Plain))],
);

pub const HARDWARE_INFO: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.info",
    &[
        ("version", Plain),
        ("upgrade_policy", Plain),
        ("upgrade_version", Opt(&Plain)),
        ("upgrade_status", Plain),
        ("upgrade_error", Opt(&Error)),
    ],
);

pub const BOOT_INFO: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.boot.info",
    &[
        ("type", Plain),
        ("efi_legacy_boot", Opt(&Plain)),
        ("network_protocol", Opt(&Plain)),
        ("delay", Plain),
        ("retry", Plain),
        ("retry_delay", Plain),
        ("enter_setup_mode", Plain),
    ],
);

pub const CPU_INFO: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.cpu.info",
    &[
        ("count", Plain),
        ("cores_per_socket", Plain),
        ("hot_add_enabled", Plain),
        ("hot_remove_enabled", Plain),
    ],
);

pub const MEMORY_INFO: Shape = Struct(
    "com.vmware.vcenter.vm.hardware.memory.info",
    &[
        ("size_MiB", Plain),
        ("hot_add_enabled", Plain),
        ("hot_add_increment_size_MiB", Opt(&Plain)),
        ("hot_add_limit_MiB", Opt(&Plain)),
    ],
);

/// `com.vmware.vcenter.vm.hardware.disk` list.
pub const DISK_SUMMARY: Shape = Struct("com.vmware.vcenter.vm.hardware.disk.summary", &[("disk", Plain)]);

pub const DISK_SUMMARY_LIST: Shape = List(&DISK_SUMMARY);

/// `com.vmware.vcenter.vm.hardware.ethernet` list.
pub const NIC_SUMMARY: Shape = Struct("com.vmware.vcenter.vm.hardware.ethernet.summary", &[("nic", Plain)]);

pub const NIC_SUMMARY_LIST: Shape = List(&NIC_SUMMARY);

/// `com.vmware.appliance.system.version` get.
pub const APPLIANCE_VERSION: Shape = Struct(
    "com.vmware.appliance.system.version.version_struct",
    &[
        ("version", Plain),
        ("product", Plain),
        ("build", Plain),
        ("type", Plain),
        ("summary", Plain),
        ("releasedate", Plain),
        ("install_time", Plain),
        ("name", Opt(&Plain)),
    ],
);

pub const VM_INFO: Shape = Struct(
    "com.vmware.vcenter.VM.info",
    &[
        ("guest_OS", Plain),
        ("name", Plain),
        (
            "identity",
            Opt(&Struct(
                "com.vmware.vcenter.vm.identity.info",
                &[("name", Plain), ("bios_uuid", Plain), ("instance_uuid", Plain)],
            )),
        ),
        ("power_state", Plain),
        ("instant_clone_frozen", Opt(&Plain)),
        ("hardware", HARDWARE_INFO),
        ("boot", BOOT_INFO),
        (
            "boot_devices",
            List(&Struct(
                "com.vmware.vcenter.vm.hardware.boot.device.entry",
                &[("type", Plain), ("nic", Opt(&Plain)), ("disks", Opt(&List(&Plain)))],
            )),
        ),
        ("cpu", CPU_INFO),
        ("memory", MEMORY_INFO),
        ("disks", Map(&DISK_INFO)),
        ("nics", Map(&NIC_INFO)),
        ("cdroms", Map(&Never)),
        ("floppies", Map(&Never)),
        ("parallel_ports", Map(&Never)),
        ("serial_ports", Map(&Never)),
        ("sata_adapters", Map(&SATA_ADAPTER)),
        ("scsi_adapters", Map(&SCSI_ADAPTER)),
        ("nvme_adapters", Opt(&Map(&NVME_ADAPTER))),
    ],
);

/// `com.vmware.vcenter.vm.power` get.
pub const POWER_INFO: Shape = Struct(
    "com.vmware.vcenter.vm.power.info",
    &[("state", Plain), ("clean_power_off", Opt(&Plain))],
);

// --- com.vmware.cis -------------------------------------------------------------------

pub const SESSION_INFO: Shape = Struct(
    "com.vmware.cis.session.info",
    &[("user", Plain), ("created_time", Plain), ("last_accessed_time", Plain)],
);

const MESSAGE: Shape = Struct(
    "com.vmware.vapi.std.localizable_message",
    &[
        ("id", Plain),
        ("default_message", Plain),
        ("args", List(&Plain)),
        ("params", Opt(&Never)),
        ("localized", Opt(&Plain)),
    ],
);

pub const TASK_INFO: Shape = Struct(
    "com.vmware.cis.task.info",
    &[
        (
            "progress",
            Opt(&Struct(
                "com.vmware.cis.task.progress",
                &[("total", Plain), ("completed", Plain), ("message", MESSAGE)],
            )),
        ),
        ("result", Opt(&Never)),
        ("description", MESSAGE),
        ("service", Plain),
        ("operation", Plain),
        ("parent", Opt(&Plain)),
        (
            "target",
            Opt(&Struct(
                "com.vmware.vapi.std.dynamic_ID",
                &[("type", Plain), ("id", Plain)],
            )),
        ),
        ("status", Plain),
        ("cancelable", Plain),
        ("error", Opt(&Error)),
        ("start_time", Opt(&Plain)),
        ("end_time", Opt(&Plain)),
        ("user", Opt(&Plain)),
    ],
);
