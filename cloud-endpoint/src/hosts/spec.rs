//! From an inventory VM to the QEMU machine that runs it, and the files it keeps in its
//! datastore folder.

use std::path::{Component, Path, PathBuf};

use gateway::qemu::{DiskFormat, MachineDisk, MachineNic, MachineSpec, NicBackend};

use super::HostError;
use crate::datastore::Datastore;
use crate::inventory::VmRecord;

/// The files of a powered-on VM beside its disks, in its datastore folder: where an
/// endpoint that restarts finds its running VMs again.
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub folder: PathBuf,
    /// QEMU's QMP socket.
    pub qmp_socket: PathBuf,
    /// QEMU's pid, written once it runs, removed when it has stopped.
    pub pid_file: PathBuf,
    /// The guest's serial console (COM1), from its last power on.
    pub console_log: PathBuf,
    /// QEMU's own stdout and stderr (its warnings and errors).
    pub qemu_log: PathBuf,
}

impl VmFiles {
    pub fn of(datastore: &Datastore, vm_name: &str) -> VmFiles {
        let folder = datastore.root().join(vm_name);
        let file = |suffix: &str| folder.join(format!("{vm_name}.{suffix}"));
        VmFiles {
            qmp_socket: file("qmp"),
            pid_file: file("pid"),
            console_log: file("console.log"),
            qemu_log: file("qemu.log"),
            folder,
        }
    }

    /// Removes what only a running QEMU needs; the console log stays to be read.
    pub fn clean_runtime(&self) {
        for path in [&self.qmp_socket, &self.pid_file] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove a VM runtime file"),
            }
        }
    }

    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }
}

/// `[datastore] folder/file` to a path under the datastore's root. Only this datastore,
/// and only paths that stay under its root.
pub fn resolve_datastore_path(datastore: &Datastore, path: &str) -> Result<PathBuf, HostError> {
    let bad = |reason: &str| HostError::Disk {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = path
        .strip_prefix('[')
        .and_then(|p| p.split_once("] "))
        .ok_or_else(|| bad("not of the form `[datastore] folder/file`"))?;
    if rest.0 != datastore.name() {
        return Err(bad("it is on another datastore than this host's"));
    }
    let relative = Path::new(rest.1);
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("it leaves the datastore folder"));
    }
    Ok(datastore.root().join(relative))
}

/// The image format by the name the datastore gave the file: `.vmdk` descriptors
/// (monolithicFlat), `.qcow2`, `.img` raw.
fn disk_format(path: &Path) -> Option<DiskFormat> {
    match path.extension()?.to_str()? {
        "vmdk" => Some(DiskFormat::Vmdk),
        "qcow2" => Some(DiskFormat::Qcow2),
        "img" | "raw" => Some(DiskFormat::Raw),
        _ => None,
    }
}

/// QEMU's model for the VM's .vmx NIC type, so the guest finds the NIC its drivers know.
fn nic_model(virtual_dev: Option<&str>) -> &'static str {
    match virtual_dev.map(str::to_ascii_lowercase).as_deref() {
        Some("vmxnet3") => "vmxnet3",
        Some("e1000e") => "e1000e",
        Some("vlance") => "pcnet",
        // ESXi's default for the guests that get here.
        _ => "e1000",
    }
}

/// The machine for `vm`: its CPUs, memory, disks in slot order (the first one boots,
/// through SeaBIOS, as a lifted BIOS VM did on ESXi) and NICs with their MACs.
pub fn machine_spec(datastore: &Datastore, vm: &VmRecord, files: &VmFiles) -> Result<MachineSpec, HostError> {
    let mut disks = Vec::with_capacity(vm.disks.len());
    for (index, disk) in vm.disks.iter().enumerate() {
        let path = resolve_datastore_path(datastore, &disk.path)?;
        let format = disk_format(&path).ok_or_else(|| HostError::Disk {
            path: disk.path.clone(),
            reason: "its format is not known by its name (.vmdk, .qcow2, .img)".into(),
        })?;
        if !path.is_file() {
            return Err(HostError::Disk {
                path: disk.path.clone(),
                reason: "the file is missing from the datastore".into(),
            });
        }
        disks.push(MachineDisk {
            path,
            format,
            device_id: format!("disk{index}"),
            node_name: format!("drive{index}"),
        });
    }
    let nics = vm
        .nics
        .iter()
        .enumerate()
        .map(|(index, nic)| MachineNic {
            id: format!("nic{index}"),
            mac: nic.mac.clone(),
            model: nic_model(nic.virtual_dev.as_deref()).to_owned(),
            backend: NicBackend::UserRestricted,
        })
        .collect();
    Ok(MachineSpec {
        name: vm.name.clone(),
        memory_mib: vm.memory_mib,
        vcpus: vm.num_cpus.max(1),
        disks,
        nics,
        kernel: None,
        serial_log: files.console_log.clone(),
        qmp_socket: files.qmp_socket.clone(),
        incoming_defer: false,
        paused: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths_resolve_inside_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(dir.path(), "cloud-ds1", None).unwrap();
        assert_eq!(
            resolve_datastore_path(&ds, "[cloud-ds1] web01/web01.vmdk").unwrap(),
            dir.path().join("web01/web01.vmdk")
        );
        for bad in [
            "[other] web01/web01.vmdk",
            "[cloud-ds1] ../etc/passwd",
            "[cloud-ds1] /etc/passwd",
            "web01/web01.vmdk",
        ] {
            assert!(resolve_datastore_path(&ds, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_and_nic_models_follow_the_vm() {
        assert_eq!(disk_format(Path::new("a/b.vmdk")), Some(DiskFormat::Vmdk));
        assert_eq!(disk_format(Path::new("a/b.qcow2")), Some(DiskFormat::Qcow2));
        assert_eq!(disk_format(Path::new("a/b.img")), Some(DiskFormat::Raw));
        assert_eq!(disk_format(Path::new("a/b.iso")), None);
        assert_eq!(nic_model(Some("VMXNET3")), "vmxnet3");
        assert_eq!(nic_model(None), "e1000");
    }
}
