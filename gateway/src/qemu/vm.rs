//! A migrated VM's machine: the one mapping from a plan's [`VmSpec`] to a [`MachineSpec`]
//! that the on-prem source (`edge-agent qemu-command`), a live migration's destination and
//! a cloud host's power-on all use, so the three always agree on devices, ids and node
//! names: disk `i` is device `disk<i>` on node `drive<i>`, NIC `i` is `nic<i>`.

use std::path::PathBuf;

use super::{DirectKernel, DiskAttachment, DiskFormat, Firmware, MachineDisk, MachineNic, MachineSpec, NicBackend};
use crate::plan::VmSpec;

/// QEMU's model for a .vmx NIC type (`ethernetN.virtualDev`), so the guest finds the NIC
/// its drivers know. A model the hosts cannot run was refused when the plan was checked
/// ([`crate::plan::nic_qemu_model`]); a VM registered before that check gets e1000, ESXi's
/// default.
pub fn nic_model(virtual_dev: Option<&str>) -> &'static str {
    crate::plan::nic_qemu_model(virtual_dev).unwrap_or("e1000")
}

/// Where a VM's machine keeps its files, and how it boots.
#[derive(Debug, Clone)]
pub struct MachineFiles {
    /// The image of each of the plan's disks, in plan order.
    pub disks: Vec<(PathBuf, DiskFormat)>,
    pub kernel: Option<DirectKernel>,
    pub serial_log: PathBuf,
    pub qmp_socket: PathBuf,
}

/// The machine for `vm`: its CPUs, memory, disks in plan order (the first one boots,
/// through SeaBIOS, unless a kernel is given) and NICs with their MACs.
///
/// This is the machine of a live migration, whose source runs on-prem under QEMU with
/// virtio-blk disks (the guest's drivers are the ones it booted with there), so disks stay
/// virtio-blk whatever controllers the .vmx names; a cloud host powering a lifted VM on
/// follows its controllers instead (cloud-endpoint's `hosts::machine_spec`).
pub fn machine_for_vm(vm: &VmSpec, files: MachineFiles) -> MachineSpec {
    MachineSpec {
        name: vm.name.clone(),
        memory_mib: vm.memory_mib,
        vcpus: vm.num_cpus.max(1),
        disks: files
            .disks
            .into_iter()
            .enumerate()
            .map(|(index, (path, format))| MachineDisk {
                path,
                format,
                device_id: format!("disk{index}"),
                node_name: format!("drive{index}"),
                attachment: DiskAttachment::VirtioBlk,
            })
            .collect(),
        nics: vm
            .nics
            .iter()
            .enumerate()
            .map(|(index, nic)| MachineNic {
                id: format!("nic{index}"),
                mac: nic.mac.clone(),
                model: nic_model(nic.virtual_dev.as_deref()).to_owned(),
                backend: NicBackend::UserRestricted,
            })
            .collect(),
        controllers: Vec::new(),
        firmware: Firmware::Bios,
        kernel: files.kernel,
        serial_log: files.serial_log,
        qmp_socket: files.qmp_socket,
        incoming_defer: false,
        paused: false,
    }
}

/// The block node of plan disk `index`.
pub fn disk_node(index: usize) -> String {
    format!("drive{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_models_follow_the_vmx() {
        assert_eq!(nic_model(Some("VMXNET3")), "vmxnet3");
        assert_eq!(nic_model(Some("vlance")), "pcnet");
        assert_eq!(nic_model(None), "e1000");
        assert_eq!(nic_model(Some("e1000e")), "e1000e");
    }
}
