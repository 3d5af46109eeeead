//! From an inventory VM to the QEMU machine that runs it, and the files it keeps in its
//! datastore folder.

use std::path::{Component, Path, PathBuf};

use gateway::plan::{Bus, Slot};
use gateway::qemu::{
    ControllerModel, DiskAttachment, DiskFormat, Firmware, MachineController, MachineDisk, MachineNic, MachineSpec,
    NicBackend, Ovmf,
};

use super::HostError;
use crate::datastore::Datastore;
use crate::inventory::VmRecord;
use crate::Domain;

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
    /// An EFI VM's UEFI variable store (its boot entries): OVMF's template, copied at its
    /// first power on and kept, as ESXi keeps a VM's `.nvram`.
    pub efi_vars: PathBuf,
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
            efi_vars: file("ovmf-vars.fd"),
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

    /// The VM's folder and files, on the datastore its .vmx is on (`[datastore] vm/vm.vmx`),
    /// else the default one.
    pub fn of_vm(domain: &Domain, vm: &VmRecord) -> VmFiles {
        let home = vm
            .vmx_path
            .strip_prefix('[')
            .and_then(|p| p.split_once(']'))
            .and_then(|(name, _)| domain.datastore_named(name))
            .unwrap_or(&domain.datastore);
        VmFiles::of(home, &vm.name)
    }

    /// A VM that came by live migration from a direct kernel boot keeps its kernel,
    /// initrd and command line beside its disks (`<vm>.vmlinuz`, `<vm>.initrd`,
    /// `<vm>.append`): it boots them again when powered on in the cloud.
    pub fn direct_kernel(&self) -> Option<gateway::qemu::DirectKernel> {
        let name = self.folder.file_name()?.to_string_lossy().into_owned();
        let kernel = self.folder.join(format!("{name}.vmlinuz"));
        if !kernel.is_file() {
            return None;
        }
        let initrd = Some(self.folder.join(format!("{name}.initrd"))).filter(|p| p.is_file());
        let append = std::fs::read_to_string(self.folder.join(format!("{name}.append")))
            .ok()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty());
        Some(gateway::qemu::DirectKernel { kernel, initrd, append })
    }

    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }
}

/// The last `bytes` of a console log; nothing if there is none yet.
pub fn tail(path: &Path, bytes: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
        let mut out = Vec::new();
        // The log grows while we read: stop at what was asked for.
        f.take(bytes).read_to_end(&mut out)?;
        Ok(out)
    };
    match read() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        result => result,
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

/// `[datastore] folder/file` to a path under the folder of whichever of the domain's
/// datastores it names.
pub fn resolve_in_domain(domain: &Domain, path: &str) -> Result<PathBuf, HostError> {
    let named = path
        .strip_prefix('[')
        .and_then(|p| p.split_once(']'))
        .and_then(|(name, _)| domain.datastore_named(name))
        .unwrap_or(&domain.datastore);
    resolve_datastore_path(named, path)
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

/// The machine for `vm`: its CPUs, memory, firmware (SeaBIOS, or OVMF for an EFI VM),
/// disk controllers of the types its .vmx names with each disk in its slot (the first
/// disk boots, as the lifted VM did on ESXi), and NICs of its models with their MACs.
///
/// A VM that came by live migration with a direct kernel keeps the virtio-blk disks it
/// ran on at the source (see `gateway::qemu::vm::machine_for_vm`): its kernel booted with
/// those drivers, and the cloud does not change what the guest knows.
pub fn machine_spec(domain: &Domain, vm: &VmRecord, files: &VmFiles) -> Result<MachineSpec, HostError> {
    let kernel = files.direct_kernel();
    let mut disks = Vec::with_capacity(vm.disks.len());
    let mut controllers: Vec<MachineController> = Vec::new();
    for (index, disk) in vm.disks.iter().enumerate() {
        let path = resolve_in_domain(domain, &disk.path)?;
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
        let attachment = if kernel.is_some() {
            DiskAttachment::VirtioBlk
        } else {
            attachment(vm, &disk.key, &mut controllers)?
        };
        disks.push(MachineDisk {
            path,
            format,
            device_id: format!("disk{index}"),
            node_name: format!("drive{index}"),
            attachment,
        });
    }
    let firmware = if vm.firmware.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("efi")) {
        let ovmf = Ovmf::from_env()?;
        ovmf.vars_for(&files.efi_vars)?;
        Firmware::Efi {
            code: ovmf.code,
            vars: files.efi_vars.clone(),
        }
    } else {
        Firmware::Bios
    };
    let nics = vm
        .nics
        .iter()
        .enumerate()
        .map(|(index, nic)| MachineNic {
            id: format!("nic{index}"),
            mac: nic.mac.clone(),
            model: gateway::qemu::vm::nic_model(nic.virtual_dev.as_deref()).to_owned(),
            backend: NicBackend::UserRestricted,
        })
        .collect();
    Ok(MachineSpec {
        name: vm.name.clone(),
        memory_mib: vm.memory_mib,
        vcpus: vm.num_cpus.max(1),
        disks,
        nics,
        controllers,
        firmware,
        kernel,
        serial_log: files.console_log.clone(),
        qmp_socket: files.qmp_socket.clone(),
        incoming_defer: false,
        paused: false,
    })
}

/// Where the disk in slot `key` plugs in: the machine's IDE, or a controller of the type
/// the VM's .vmx names, added to `controllers` at its first disk.
fn attachment(vm: &VmRecord, key: &str, controllers: &mut Vec<MachineController>) -> Result<DiskAttachment, HostError> {
    let unsupported = |reason: String| HostError::Hardware {
        vm: vm.id.clone(),
        reason,
    };
    let slot = Slot::parse(key).ok_or_else(|| unsupported(format!("disk key {key:?} is no controller slot")))?;
    if slot.bus == Bus::Ide {
        return Ok(DiskAttachment::Ide {
            bus: slot.controller,
            unit: slot.unit,
        });
    }
    let id = slot.controller_key();
    let kind = vm
        .controller_type(&id)
        .ok_or_else(|| unsupported(format!("{id} is no controller")))?;
    let model = kind
        .qemu_device()
        .ok()
        .and_then(ControllerModel::from_device)
        .ok_or_else(|| {
            unsupported(format!(
                "{id}: {} controller: QEMU cannot emulate it",
                kind.display_name()
            ))
        })?;
    if !controllers.iter().any(|c| c.id == id) {
        controllers.push(MachineController { id: id.clone(), model });
    }
    Ok(DiskAttachment::Controller {
        controller: id,
        unit: slot.unit,
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
        assert_eq!(gateway::qemu::vm::nic_model(Some("VMXNET3")), "vmxnet3");
        assert_eq!(gateway::qemu::vm::nic_model(None), "e1000");
    }
}
