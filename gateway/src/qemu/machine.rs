//! A VM's virtual hardware as QEMU runs it, and the command line for it.
//!
//! The command line is a pure function of the [`MachineSpec`], built in one fixed order
//! with explicit ids and node names for every device. That is what live migration
//! needs: QEMU migrates device state by device id and block node name, so the
//! destination must be started with exactly the source's devices. Both sides build their
//! argv from the same spec, and only [`MachineSpec::incoming_defer`] and
//! [`MachineSpec::paused`] differ between them. Anything that could vary by machine
//! (user config files, default devices, the accelerator) is pinned here too.

use std::collections::HashSet;
use std::path::PathBuf;

use serde_json::json;

use super::QemuError;

/// The machine type every VM gets: i440fx with SeaBIOS, what lifted legacy guests (from
/// ESXi's BIOS VMs) boot on. Fixed rather than chosen per VM, so two endpoints never
/// disagree about it. Unversioned: source and destination run the same QEMU here.
pub const MACHINE_TYPE: &str = "pc";

/// A disk image format QEMU opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
    /// A VMDK descriptor (monolithicFlat or sparse); QEMU follows it to its extents.
    Vmdk,
}

impl DiskFormat {
    /// The block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
        }
    }
}

/// One disk: an image file opened as a block node, attached to a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// The device id (`-device ...,id=`), e.g. `disk0`.
    pub device_id: String,
    /// The format node's name (`-blockdev ...,node-name=`), e.g. `drive0`; the file node
    /// under it is `<node_name>-file`.
    pub node_name: String,
    pub attachment: DiskAttachment,
}

/// Where a disk is plugged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAttachment {
    /// A virtio-blk PCI device of its own: what a live migration's guest runs on (its
    /// source QEMU was started so) and what needs no controller.
    VirtioBlk,
    /// Unit `unit` of the [`MachineController`] with id `controller`.
    Controller { controller: String, unit: u32 },
    /// The machine's built-in IDE (PIIX): bus 0 or 1, unit 0 (master) or 1 (slave).
    Ide { bus: u32, unit: u32 },
}

/// A disk controller and the QEMU device that emulates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineController {
    /// The device id, e.g. `scsi0`, `sata0`, `nvme0`.
    pub id: String,
    pub model: ControllerModel,
}

/// The controller devices the hosts run, by their place in QEMU: SCSI host adapters take
/// `scsi-hd` disks by SCSI id, AHCI takes `ide-hd` per port, NVMe `nvme-ns` namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerModel {
    /// `pvscsi`, `lsi53c895a` or `mptsas1068`.
    Scsi(&'static str),
    /// `ich9-ahci`.
    Ahci,
    /// `nvme`.
    Nvme,
}

impl ControllerModel {
    /// The QEMU device.
    pub fn device(self) -> &'static str {
        match self {
            ControllerModel::Scsi(device) => device,
            ControllerModel::Ahci => "ich9-ahci",
            ControllerModel::Nvme => "nvme",
        }
    }

    /// The model of a plan's controller device (`gateway::plan::ControllerType::qemu_device`).
    pub fn from_device(device: &str) -> Option<ControllerModel> {
        match device {
            "pvscsi" => Some(ControllerModel::Scsi("pvscsi")),
            "lsi53c895a" => Some(ControllerModel::Scsi("lsi53c895a")),
            "mptsas1068" => Some(ControllerModel::Scsi("mptsas1068")),
            "ich9-ahci" => Some(ControllerModel::Ahci),
            "nvme" => Some(ControllerModel::Nvme),
            _ => None,
        }
    }
}

/// How the VM starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Firmware {
    /// SeaBIOS, the machine's default.
    #[default]
    Bios,
    /// UEFI: OVMF's code read-only, and the VM's own copy of its variable store, which
    /// keeps the boot entries the guest writes.
    Efi { code: PathBuf, vars: PathBuf },
}

/// What a NIC is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicBackend {
    /// QEMU's user-mode network with `restrict=on`: the guest sees a NIC and a DHCP
    /// server, and reaches nothing outside. The cloud domain has no real network to
    /// attach VMs to yet; this keeps guests that wait for a link happy, and isolated.
    UserRestricted,
    /// A NIC with no backend: present to the guest, never connected.
    None,
}

/// One NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineNic {
    /// The device id, e.g. `nic0`; its backend is `<id>-net`.
    pub id: String,
    /// `aa:bb:cc:dd:ee:ff`; `None` lets QEMU pick one (then it may differ between runs).
    pub mac: Option<String>,
    /// The QEMU device model: `e1000`, `e1000e`, `vmxnet3`, `virtio-net-pci`.
    pub model: String,
    pub backend: NicBackend,
}

/// Boot a kernel directly instead of from the first disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
}

/// Everything QEMU needs to run one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    /// The VM's name (`-name guest=`), shown by QMP's `query-name`.
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// In order; the first one is the boot disk unless `kernel` is set.
    pub disks: Vec<MachineDisk>,
    pub nics: Vec<MachineNic>,
    /// The disk controllers the disks name, in order.
    pub controllers: Vec<MachineController>,
    pub firmware: Firmware,
    pub kernel: Option<DirectKernel>,
    /// The guest's COM1 is written to this file (truncated when QEMU starts).
    pub serial_log: PathBuf,
    /// QEMU listens for QMP on this unix socket.
    pub qmp_socket: PathBuf,
    /// Start as a live-migration destination (`-incoming defer`): QEMU waits for
    /// `migrate-incoming` over QMP instead of booting.
    pub incoming_defer: bool,
    /// Start with the CPUs stopped (`-S`); `cont` over QMP starts them.
    pub paused: bool,
}

/// QEMU's rule for ids and node names: a letter, then letters, digits, `-`, `.`, `_`.
fn well_formed_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn well_formed_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// QEMU's option lists (`key=value,key=value`) take a literal comma as `,,`.
fn opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_value(path: &std::path::Path) -> String {
    opt_value(&path.to_string_lossy())
}

impl MachineSpec {
    /// Checks what QEMU would refuse, or what would make the command line ambiguous:
    /// sizes, ids, MACs, duplicate names.
    pub fn validate(&self) -> Result<(), QemuError> {
        let bad = |why: String| Err(QemuError::BadSpec(why));
        if self.name.is_empty() || self.name.chars().any(char::is_control) {
            return bad(format!(
                "the VM name {:?} is empty or has control characters",
                self.name
            ));
        }
        if self.memory_mib == 0 {
            return bad("memory is 0 MiB; give the VM some memory".into());
        }
        if self.vcpus == 0 {
            return bad("0 vCPUs; give the VM at least one".into());
        }
        let mut ids = HashSet::new();
        let mut check_id = |id: &str, what: &str| -> Result<(), QemuError> {
            if !well_formed_id(id) {
                return Err(QemuError::BadSpec(format!(
                    "{what} {id:?} is not a QEMU id (a letter, then letters, digits, '-', '.', '_')"
                )));
            }
            if !ids.insert(id.to_owned()) {
                return Err(QemuError::BadSpec(format!("{what} {id:?} is used twice")));
            }
            Ok(())
        };
        for controller in &self.controllers {
            check_id(&controller.id, "controller id")?;
        }
        let mut slots = HashSet::new();
        for disk in &self.disks {
            check_id(&disk.device_id, "disk device id")?;
            check_id(&disk.node_name, "block node name")?;
            check_id(&format!("{}-file", disk.node_name), "block node name")?;
            match &disk.attachment {
                DiskAttachment::VirtioBlk => {}
                DiskAttachment::Controller { controller, unit } => {
                    if !self.controllers.iter().any(|c| &c.id == controller) {
                        return bad(format!(
                            "disk {} is on controller {controller:?}, which the machine does not have",
                            disk.device_id
                        ));
                    }
                    if !slots.insert((controller.clone(), *unit)) {
                        return bad(format!("two disks are unit {unit} of controller {controller}"));
                    }
                }
                DiskAttachment::Ide { bus, unit } => {
                    if *bus > 1 || *unit > 1 {
                        return bad(format!(
                            "disk {} is IDE {bus}:{unit}; the machine's IDE has buses 0-1 with units 0-1",
                            disk.device_id
                        ));
                    }
                    if !slots.insert((format!("ide.{bus}"), *unit)) {
                        return bad(format!("two disks are IDE {bus}:{unit}"));
                    }
                }
            }
        }
        for nic in &self.nics {
            check_id(&nic.id, "NIC id")?;
            check_id(&format!("{}-net", nic.id), "NIC backend id")?;
            if nic.mac.as_deref().is_some_and(|m| !well_formed_mac(m)) {
                return bad(format!("NIC {} has MAC {:?}, not aa:bb:cc:dd:ee:ff", nic.id, nic.mac));
            }
            if !well_formed_id(&nic.model) {
                return bad(format!("NIC {} has device model {:?}", nic.id, nic.model));
            }
        }
        if self.disks.is_empty() && self.kernel.is_none() && !self.incoming_defer {
            return bad("no disk and no kernel: there is nothing to boot".into());
        }
        Ok(())
    }

    /// The QEMU arguments (without the binary), the same for the same spec every time.
    pub fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
        // No default devices, no config files of the machine, no window: only what the
        // spec names exists, and the two sides of a migration get the same.
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        // /dev/kvm may exist but not run guests (nested hosts); TCG always works.
        push(&["-accel", "tcg", "-machine", MACHINE_TYPE]);
        push(&["-name", &format!("guest={}", opt_value(&self.name))]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-smp", &self.vcpus.to_string()]);
        if let Firmware::Efi { code, vars } = &self.firmware {
            push(&[
                "-drive",
                &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", path_value(code)),
                "-drive",
                &format!("if=pflash,format=raw,unit=1,file={}", path_value(vars)),
            ]);
        }
        for controller in &self.controllers {
            let mut device = format!("{},id={}", controller.model.device(), controller.id);
            if controller.model == ControllerModel::Nvme {
                // An NVMe controller needs a serial; the id keeps it stable across runs.
                device.push_str(&format!(",serial={}", controller.id));
            }
            push(&["-device", &device]);
        }
        for (index, disk) in self.disks.iter().enumerate() {
            // JSON form: the file name needs no escaping, and the node names are explicit.
            let blockdev = json!({
                "driver": disk.format.driver(),
                "node-name": disk.node_name,
                "file": {
                    "driver": "file",
                    "node-name": format!("{}-file", disk.node_name),
                    "filename": disk.path.to_string_lossy(),
                },
            });
            push(&["-blockdev", &blockdev.to_string()]);
            let (node, id) = (&disk.node_name, &disk.device_id);
            let mut device = match &disk.attachment {
                DiskAttachment::VirtioBlk => format!("virtio-blk-pci,drive={node},id={id}"),
                DiskAttachment::Controller { controller, unit } => {
                    match self.controllers.iter().find(|c| &c.id == controller).map(|c| c.model) {
                        Some(ControllerModel::Ahci) => {
                            format!("ide-hd,drive={node},id={id},bus={controller}.{unit}")
                        }
                        // vSphere's NVMe units count from 0, namespace ids from 1.
                        Some(ControllerModel::Nvme) => {
                            format!("nvme-ns,drive={node},id={id},bus={controller},nsid={}", unit + 1)
                        }
                        _ => format!("scsi-hd,drive={node},id={id},bus={controller}.0,scsi-id={unit},lun=0"),
                    }
                }
                DiskAttachment::Ide { bus, unit } => format!("ide-hd,drive={node},id={id},bus=ide.{bus},unit={unit}"),
            };
            if index == 0 && self.kernel.is_none() {
                device.push_str(",bootindex=0");
            }
            push(&["-device", &device]);
        }
        for nic in &self.nics {
            let mut device = format!("{},id={}", nic.model, nic.id);
            match nic.backend {
                NicBackend::UserRestricted => {
                    push(&["-netdev", &format!("user,id={}-net,restrict=on", nic.id)]);
                    device.push_str(&format!(",netdev={}-net", nic.id));
                }
                NicBackend::None => {}
            }
            if let Some(mac) = &nic.mac {
                device.push_str(&format!(",mac={}", mac.to_ascii_lowercase()));
            }
            push(&["-device", &device]);
        }
        push(&[
            "-chardev",
            &format!("file,id=serial0,path={}", path_value(&self.serial_log)),
            "-device",
            "isa-serial,chardev=serial0,id=serial0-dev",
        ]);
        // A chardev plus -mon rather than `-qmp unix:<path>,...`: the option-list form
        // takes any path once its commas are doubled, the legacy form does not.
        push(&[
            "-chardev",
            &format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                path_value(&self.qmp_socket)
            ),
            "-mon",
            "chardev=qmp0,mode=control",
        ]);
        if let Some(k) = &self.kernel {
            push(&["-kernel", &k.kernel.to_string_lossy()]);
            if let Some(initrd) = &k.initrd {
                push(&["-initrd", &initrd.to_string_lossy()]);
            }
            if let Some(append) = &k.append {
                push(&["-append", append]);
            }
        }
        if self.paused {
            push(&["-S"]);
        }
        if self.incoming_defer {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> MachineSpec {
        MachineSpec {
            name: "web01".into(),
            memory_mib: 64,
            vcpus: 2,
            disks: vec![
                MachineDisk {
                    path: "/ds/web01/web01.vmdk".into(),
                    format: DiskFormat::Vmdk,
                    device_id: "disk0".into(),
                    node_name: "drive0".into(),
                    attachment: DiskAttachment::VirtioBlk,
                },
                MachineDisk {
                    path: "/ds/web01/web,01_1.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    device_id: "disk1".into(),
                    node_name: "drive1".into(),
                    attachment: DiskAttachment::VirtioBlk,
                },
            ],
            nics: vec![MachineNic {
                id: "nic0".into(),
                mac: Some("00:50:56:AB:00:01".into()),
                model: "vmxnet3".into(),
                backend: NicBackend::UserRestricted,
            }],
            controllers: vec![],
            firmware: Firmware::Bios,
            kernel: None,
            serial_log: "/ds/web01/web01.console.log".into(),
            qmp_socket: "/ds/web01/web01,qmp".into(),
            incoming_defer: false,
            paused: false,
        }
    }

    #[test]
    fn argv_is_deterministic_and_explicit() {
        let s = spec();
        s.validate().unwrap();
        let argv = s.argv();
        assert_eq!(argv, s.clone().argv(), "same spec, same command line");
        let joined = argv.join(" ");
        assert!(
            joined.starts_with("-nodefaults -no-user-config -display none -accel tcg -machine pc "),
            "{joined}"
        );
        assert!(joined.contains(
            r#"-blockdev {"driver":"vmdk","file":{"driver":"file","filename":"/ds/web01/web01.vmdk","node-name":"drive0-file"},"node-name":"drive0"}"#
        ), "{joined}");
        assert!(
            joined.contains("-device virtio-blk-pci,drive=drive0,id=disk0,bootindex=0 "),
            "{joined}"
        );
        assert!(
            joined.contains(r#""filename":"/ds/web01/web,01_1.qcow2""#),
            "JSON needs no comma escaping"
        );
        assert!(
            joined.contains("-device virtio-blk-pci,drive=drive1,id=disk1 "),
            "{joined}"
        );
        assert!(joined.contains(
            "-netdev user,id=nic0-net,restrict=on -device vmxnet3,id=nic0,netdev=nic0-net,mac=00:50:56:ab:00:01"
        ));
        assert!(
            joined.contains("socket,id=qmp0,path=/ds/web01/web01,,qmp,server=on,wait=off"),
            "{joined}"
        );
        assert!(!argv.iter().any(|a| a == "-S" || a == "-incoming"));

        // A migration destination: the same devices, plus the two flags at the end.
        let dest = MachineSpec {
            incoming_defer: true,
            paused: true,
            ..s.clone()
        };
        let dest_argv = dest.argv();
        assert_eq!(&dest_argv[..argv.len()], &argv[..]);
        assert_eq!(&dest_argv[argv.len()..], ["-S", "-incoming", "defer"]);
    }

    #[test]
    fn disks_sit_on_their_controllers_and_efi_boots_ovmf() {
        let disk = |i: usize, attachment: DiskAttachment| MachineDisk {
            path: format!("/ds/hw01/d{i}.img").into(),
            format: DiskFormat::Raw,
            device_id: format!("disk{i}"),
            node_name: format!("drive{i}"),
            attachment,
        };
        let on = |controller: &str, unit| DiskAttachment::Controller {
            controller: controller.into(),
            unit,
        };
        let s = MachineSpec {
            disks: vec![
                disk(0, on("scsi0", 3)),
                disk(1, on("sata0", 1)),
                disk(2, on("nvme0", 0)),
                disk(3, DiskAttachment::Ide { bus: 1, unit: 0 }),
            ],
            controllers: vec![
                MachineController {
                    id: "scsi0".into(),
                    model: ControllerModel::Scsi("mptsas1068"),
                },
                MachineController {
                    id: "sata0".into(),
                    model: ControllerModel::Ahci,
                },
                MachineController {
                    id: "nvme0".into(),
                    model: ControllerModel::Nvme,
                },
            ],
            firmware: Firmware::Efi {
                code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                vars: "/ds/hw01/hw01.ovmf-vars.fd".into(),
            },
            ..spec()
        };
        s.validate().unwrap();
        let joined = s.argv().join(" ");
        for expected in [
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd -drive if=pflash,format=raw,unit=1,file=/ds/hw01/hw01.ovmf-vars.fd",
            "-device mptsas1068,id=scsi0 -device ich9-ahci,id=sata0 -device nvme,id=nvme0,serial=nvme0",
            "-device scsi-hd,drive=drive0,id=disk0,bus=scsi0.0,scsi-id=3,lun=0,bootindex=0 ",
            "-device ide-hd,drive=drive1,id=disk1,bus=sata0.1 ",
            "-device nvme-ns,drive=drive2,id=disk2,bus=nvme0,nsid=1 ",
            "-device ide-hd,drive=drive3,id=disk3,bus=ide.1,unit=0 ",
        ] {
            assert!(joined.contains(expected), "missing {expected:?} in {joined}");
        }

        let mut bad = s.clone();
        bad.disks[1].attachment = on("scsi0", 3);
        assert!(matches!(bad.validate(), Err(QemuError::BadSpec(m)) if m.contains("two disks are unit 3")));
        let mut bad = s.clone();
        bad.disks[0].attachment = on("scsi9", 0);
        assert!(matches!(bad.validate(), Err(QemuError::BadSpec(m)) if m.contains("does not have")));
        let mut bad = s;
        bad.disks[3].attachment = DiskAttachment::Ide { bus: 2, unit: 0 };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn direct_kernel_boot_has_no_boot_disk() {
        let s = MachineSpec {
            kernel: Some(DirectKernel {
                kernel: "/k/vmlinuz".into(),
                initrd: Some("/k/initrd".into()),
                append: Some("console=ttyS0".into()),
            }),
            ..spec()
        };
        let joined = s.argv().join(" ");
        assert!(!joined.contains("bootindex"), "{joined}");
        assert!(joined.contains("-kernel /k/vmlinuz -initrd /k/initrd -append console=ttyS0"));
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let mut s = spec();
        s.disks[1].node_name = "drive0".into();
        assert!(matches!(s.validate(), Err(QemuError::BadSpec(m)) if m.contains("used twice")));
        let mut s = spec();
        s.nics[0].id = "0nic".into();
        assert!(matches!(s.validate(), Err(QemuError::BadSpec(m)) if m.contains("not a QEMU id")));
        let mut s = spec();
        s.nics[0].mac = Some("00:50:56:zz:00:01".into());
        assert!(s.validate().is_err());
        let mut s = spec();
        s.nics[0].model = "e1000,romfile=/etc/passwd".into();
        assert!(s.validate().is_err(), "no option injection through the model");
        let s = MachineSpec {
            memory_mib: 0,
            ..spec()
        };
        assert!(s.validate().is_err());
        let s = MachineSpec {
            disks: vec![],
            ..spec()
        };
        assert!(s.validate().is_err());
    }
}
