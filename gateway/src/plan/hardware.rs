//! The VM's devices as vSphere names them: disk controllers with their types, the slot
//! (bus, controller number, unit) each disk sits in, and which of them the cloud's hosts
//! can run. A guest's boot disk is found by the driver of its controller, so the copy
//! keeps each controller's type and each disk's slot; what a host cannot run is refused
//! before a byte moves, never swapped for something else.

use serde::{Deserialize, Serialize};

use super::{MigrationPlan, VmSpec};

/// A disk bus, in the order a VM's disks are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bus {
    Scsi,
    Sata,
    Nvme,
    Ide,
}

impl Bus {
    pub const ALL: [Bus; 4] = [Bus::Scsi, Bus::Sata, Bus::Nvme, Bus::Ide];

    /// The key prefix: `scsi`, `sata`, `nvme`, `ide`.
    pub fn prefix(self) -> &'static str {
        match self {
            Bus::Scsi => "scsi",
            Bus::Sata => "sata",
            Bus::Nvme => "nvme",
            Bus::Ide => "ide",
        }
    }

    /// Controllers a VM may have on this bus (vSphere: 4 of each, IDE 2).
    pub fn max_controllers(self) -> u32 {
        match self {
            Bus::Ide => 2,
            _ => 4,
        }
    }

    /// Whether `unit` is a device position on a controller of this bus: IDE 0-1 (master,
    /// slave), SATA 0-29, SCSI 0-15 but 7 (the controller's own id), NVMe 0-14.
    pub fn unit_exists(self, unit: u32) -> bool {
        match self {
            Bus::Ide => unit <= 1,
            Bus::Sata => unit <= 29,
            Bus::Scsi => unit <= 15 && unit != 7,
            Bus::Nvme => unit <= 14,
        }
    }

    /// The units of this bus in words, for messages.
    pub fn units(self) -> &'static str {
        match self {
            Bus::Ide => "0-1",
            Bus::Sata => "0-29",
            Bus::Scsi => "0-15 except 7, the controller's own",
            Bus::Nvme => "0-14",
        }
    }
}

/// A device position: `scsi0:1` is unit 1 of SCSI controller 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub bus: Bus,
    pub controller: u32,
    pub unit: u32,
}

impl Slot {
    /// Parses `scsi0:1`; `None` for anything else.
    pub fn parse(key: &str) -> Option<Slot> {
        let (controller_key, unit) = key.split_once(':')?;
        let (bus, controller) = parse_controller_key(controller_key)?;
        Some(Slot {
            bus,
            controller,
            unit: number(unit)?,
        })
    }

    /// `scsi0:1`.
    pub fn key(self) -> String {
        format!("{}{}:{}", self.bus.prefix(), self.controller, self.unit)
    }

    /// The controller's key: `scsi0`.
    pub fn controller_key(self) -> String {
        format!("{}{}", self.bus.prefix(), self.controller)
    }
}

/// A decimal of at most 3 digits (keys are short; this keeps a hostile key from
/// overflowing).
fn number(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses a controller key such as `scsi0` into its bus and number.
pub fn parse_controller_key(key: &str) -> Option<(Bus, u32)> {
    Bus::ALL
        .into_iter()
        .find_map(|bus| Some((bus, number(key.strip_prefix(bus.prefix())?)?)))
}

/// A disk controller's type, as vSphere names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ControllerType {
    /// VMware Paravirtual SCSI (`pvscsi`).
    Pvscsi,
    /// LSI Logic Parallel (`lsilogic`).
    LsiLogic,
    /// LSI Logic SAS (`lsisas1068`).
    LsiSas1068,
    /// BusLogic Parallel (`buslogic`).
    BusLogic,
    /// A SATA controller: AHCI.
    Ahci,
    /// An NVMe controller.
    Nvme,
    /// The IDE controller.
    Ide,
    /// A SCSI `virtualDev` this version does not know, as the source wrote it.
    Other(String),
}

impl ControllerType {
    /// The type of a SCSI controller by its `.vmx` `virtualDev` (or OVF ResourceSubType).
    pub fn from_scsi_virtual_dev(text: &str) -> ControllerType {
        match text.to_ascii_lowercase().as_str() {
            "pvscsi" | "vmware paravirtual" | "virtualscsi" => ControllerType::Pvscsi,
            "lsilogic" => ControllerType::LsiLogic,
            "lsisas1068" | "lsilogicsas" => ControllerType::LsiSas1068,
            "buslogic" => ControllerType::BusLogic,
            _ => ControllerType::Other(text.to_owned()),
        }
    }

    /// The name the inventory keeps: a SCSI type's `virtualDev`, else `ahci`, `nvme`, `ide`.
    pub fn name(&self) -> &str {
        match self {
            ControllerType::Ahci => "ahci",
            ControllerType::Nvme => "nvme",
            ControllerType::Ide => "ide",
            other => other.virtual_dev().unwrap_or_default(),
        }
    }

    /// The type named `name` ([`ControllerType::name`]).
    pub fn from_name(name: &str) -> ControllerType {
        match name {
            "ahci" => ControllerType::Ahci,
            "nvme" => ControllerType::Nvme,
            "ide" => ControllerType::Ide,
            scsi => ControllerType::from_scsi_virtual_dev(scsi),
        }
    }

    /// The bus its disks are on.
    pub fn bus(&self) -> Bus {
        match self {
            ControllerType::Ahci => Bus::Sata,
            ControllerType::Nvme => Bus::Nvme,
            ControllerType::Ide => Bus::Ide,
            _ => Bus::Scsi,
        }
    }

    /// The type a controller of `bus` has when the source names none. SCSI: LSI Logic,
    /// what vSphere gives the guests that reach this (the .vmx of an old BusLogic VM says
    /// `buslogic`); the others have one type each.
    pub fn default_for(bus: Bus) -> ControllerType {
        match bus {
            Bus::Scsi => ControllerType::LsiLogic,
            Bus::Sata => ControllerType::Ahci,
            Bus::Nvme => ControllerType::Nvme,
            Bus::Ide => ControllerType::Ide,
        }
    }

    /// The `.vmx` `virtualDev` of a SCSI controller; `None` for the other buses, whose
    /// .vmx names no type.
    pub fn virtual_dev(&self) -> Option<&str> {
        match self {
            ControllerType::Pvscsi => Some("pvscsi"),
            ControllerType::LsiLogic => Some("lsilogic"),
            ControllerType::LsiSas1068 => Some("lsisas1068"),
            ControllerType::BusLogic => Some("buslogic"),
            ControllerType::Other(name) => Some(name),
            ControllerType::Ahci | ControllerType::Nvme | ControllerType::Ide => None,
        }
    }

    /// vSphere's name of it, for messages and the REST API's SCSI adapter `type`.
    pub fn display_name(&self) -> &str {
        match self {
            ControllerType::Pvscsi => "VMware Paravirtual SCSI (pvscsi)",
            ControllerType::LsiLogic => "LSI Logic Parallel (lsilogic)",
            ControllerType::LsiSas1068 => "LSI Logic SAS (lsisas1068)",
            ControllerType::BusLogic => "BusLogic",
            ControllerType::Ahci => "SATA (AHCI)",
            ControllerType::Nvme => "NVMe",
            ControllerType::Ide => "IDE",
            ControllerType::Other(name) => name,
        }
    }

    /// The QEMU device that emulates it, or why there is none. LSI Logic Parallel (the
    /// LSI53C1030) has no QEMU model; `lsi53c895a` is the same family's Parallel SCSI
    /// chip, which the guests' `sym53c8xx`/`lsi_scsi` drivers run, the nearest QEMU has.
    pub fn qemu_device(&self) -> Result<&'static str, &'static str> {
        match self {
            ControllerType::Pvscsi => Ok("pvscsi"),
            ControllerType::LsiLogic => Ok("lsi53c895a"),
            ControllerType::LsiSas1068 => Ok("mptsas1068"),
            ControllerType::Ahci => Ok("ich9-ahci"),
            ControllerType::Nvme => Ok("nvme"),
            ControllerType::Ide => Ok("ide"),
            ControllerType::BusLogic => Err("QEMU cannot emulate it"),
            ControllerType::Other(_) => Err("it is no controller type the cloud's hosts know"),
        }
    }
}

/// One disk controller of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerSpec {
    /// `scsi0`, `sata0`, `nvme0`, `ide0`.
    pub key: String,
    pub kind: ControllerType,
}

/// NIC models (`ethernetN.virtualDev`) the cloud's hosts run, with QEMU's device for each.
/// `vlance` is the AMD PCnet32 QEMU calls `pcnet`; `vmxnet` and `vmxnet2` have no QEMU
/// model at all.
pub fn nic_qemu_model(virtual_dev: Option<&str>) -> Result<&'static str, &'static str> {
    match virtual_dev.map(str::to_ascii_lowercase).as_deref() {
        // ESXi's default for a NIC whose .vmx names no model.
        None | Some("e1000") => Ok("e1000"),
        Some("e1000e") => Ok("e1000e"),
        Some("vmxnet3") => Ok("vmxnet3"),
        // ovftool calls vlance PCNet32.
        Some("vlance" | "pcnet32") => Ok("pcnet"),
        Some("vmxnet" | "vmxnet2") => Err("QEMU has no model for it"),
        Some(_) => Err("it is no NIC model the cloud's hosts know"),
    }
}

/// A NIC's `addressType` as vSphere writes it.
pub fn is_address_type(text: &str) -> bool {
    ["static", "generated", "vpx"]
        .iter()
        .any(|t| t.eq_ignore_ascii_case(text))
}

/// The type of the controller `key` (`scsi0`) among `controllers`: as listed, else its
/// bus's default; `None` if `key` is no controller key.
pub fn controller_type_in(controllers: &[ControllerSpec], key: &str) -> Option<ControllerType> {
    if let Some(c) = controllers.iter().find(|c| c.key == key) {
        return Some(c.kind.clone());
    }
    parse_controller_key(key).map(|(bus, _)| ControllerType::default_for(bus))
}

impl VmSpec {
    /// The type of the controller `key` (`scsi0`): as the plan lists it, else its bus's
    /// default.
    pub fn controller_type(&self, key: &str) -> Option<ControllerType> {
        controller_type_in(&self.controllers, key)
    }
}

impl MigrationPlan {
    /// What of the VM's hardware the cloud's hosts cannot run, each problem naming its
    /// device and what to change at the source: controllers QEMU cannot emulate, disks in
    /// slots their controller does not have, NIC models without a QEMU model, unknown
    /// firmware and address types. Nothing is changed to make it fit.
    pub fn hardware_problems(&self) -> Vec<String> {
        let vm = &self.vm;
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in &vm.controllers {
            match parse_controller_key(&c.key) {
                None => problems.push(format!(
                    "controller key {:?} is not a controller like scsi0, sata0, nvme0 or ide0",
                    c.key
                )),
                Some((bus, _)) if bus != c.kind.bus() => problems.push(format!(
                    "{}: a {} controller cannot be on the {} bus",
                    c.key,
                    c.kind.display_name(),
                    bus.prefix()
                )),
                Some(_) if !seen.insert(c.key.as_str()) => {
                    problems.push(format!("controller {} is listed twice", c.key))
                }
                Some(_) => {}
            }
        }
        let mut refused_controllers = std::collections::BTreeSet::new();
        for d in &vm.disks {
            let Some(slot) = Slot::parse(&d.key) else {
                // Named by the device-key check of the caller.
                continue;
            };
            let controller = slot.controller_key();
            if slot.controller >= slot.bus.max_controllers() {
                problems.push(format!(
                    "disk {}: a VM has {} {} controllers at most ({}0-{}{}); move the disk to one of them in the source VM before lifting",
                    d.key,
                    slot.bus.max_controllers(),
                    slot.bus.prefix(),
                    slot.bus.prefix(),
                    slot.bus.prefix(),
                    slot.bus.max_controllers() - 1
                ));
            }
            if !slot.bus.unit_exists(slot.unit) {
                problems.push(format!(
                    "disk {}: unit {} does not exist on a {} controller (units {}); move the disk to a free unit in the source VM before lifting",
                    d.key,
                    slot.unit,
                    slot.bus.prefix(),
                    slot.bus.units()
                ));
            }
            let Some(kind) = vm.controller_type(&controller) else {
                continue;
            };
            if let Err(why) = kind.qemu_device() {
                if refused_controllers.insert(controller.clone()) {
                    problems.push(format!(
                        "{controller}: {} controller: {why}; change the controller to lsilogic or pvscsi in the source VM before lifting (its disks' guest needs the driver for the new one)",
                        kind.display_name()
                    ));
                }
            }
        }
        for n in &vm.nics {
            if let Err(why) = nic_qemu_model(n.virtual_dev.as_deref()) {
                problems.push(format!(
                    "{}: NIC model {}: {why}; change it to vmxnet3, e1000e or e1000 in the source VM before lifting",
                    n.key,
                    n.virtual_dev.as_deref().unwrap_or_default()
                ));
            }
            if let Some(t) = n.address_type.as_deref().filter(|t| !is_address_type(t)) {
                problems.push(format!(
                    "{}: addressType {t:?} is not static, generated or vpx; fix it in the source VM",
                    n.key
                ));
            }
        }
        if let Some(f) = vm
            .firmware
            .as_deref()
            .filter(|f| !f.eq_ignore_ascii_case("bios") && !f.eq_ignore_ascii_case("efi"))
        {
            problems.push(format!("firmware {f:?} is not bios or efi; fix it in the source VM"));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{DiskSpec, NicSpec};

    fn plan(disks: &[&str], controllers: &[(&str, ControllerType)], nics: &[Option<&str>]) -> MigrationPlan {
        MigrationPlan {
            vm: VmSpec {
                name: "x".into(),
                guest_os: "otherGuest".into(),
                num_cpus: 1,
                cores_per_socket: None,
                memory_mib: 1,
                firmware: Some("efi".into()),
                bios_uuid: None,
                nics: nics
                    .iter()
                    .enumerate()
                    .map(|(i, dev)| NicSpec {
                        key: format!("ethernet{i}"),
                        network: "VM Network".into(),
                        virtual_dev: dev.map(str::to_owned),
                        mac: None,
                        address_type: Some("generated".into()),
                    })
                    .collect(),
                disks: disks
                    .iter()
                    .map(|k| DiskSpec {
                        key: (*k).into(),
                        capacity: 1 << 20,
                    })
                    .collect(),
                controllers: controllers
                    .iter()
                    .map(|(k, kind)| ControllerSpec {
                        key: (*k).into(),
                        kind: kind.clone(),
                    })
                    .collect(),
            },
            network_map: vec![],
            chunk_size: crate::plan::DEFAULT_CHUNK_SIZE,
            disk_format: None,
            firewall: Default::default(),
            placement: Default::default(),
            source_descriptor_sha256: None,
            seed: None,
        }
    }

    #[test]
    fn slots_parse_and_units_follow_the_bus() {
        let s = Slot::parse("nvme1:14").unwrap();
        assert_eq!((s.bus, s.controller, s.unit), (Bus::Nvme, 1, 14));
        assert_eq!(s.controller_key(), "nvme1");
        assert_eq!(s.key(), "nvme1:14");
        for bad in ["scsi0", "scsi:1", "usb0:1", "scsi0:1x", "scsi9999:0", ""] {
            assert_eq!(Slot::parse(bad), None, "{bad}");
        }
        assert!(!Bus::Scsi.unit_exists(7) && Bus::Scsi.unit_exists(15) && !Bus::Scsi.unit_exists(16));
        assert!(Bus::Ide.unit_exists(1) && !Bus::Ide.unit_exists(2));
        assert!(Bus::Sata.unit_exists(29) && !Bus::Sata.unit_exists(30));
        assert!(Bus::Nvme.unit_exists(14) && !Bus::Nvme.unit_exists(15));
    }

    #[test]
    fn what_the_hosts_can_run_passes() {
        let p = plan(
            &["scsi0:0", "scsi1:15", "sata0:29", "nvme0:14", "ide1:1"],
            &[
                ("scsi0", ControllerType::Pvscsi),
                ("scsi1", ControllerType::LsiSas1068),
                ("sata0", ControllerType::Ahci),
                ("nvme0", ControllerType::Nvme),
            ],
            &[Some("vmxnet3"), Some("e1000e"), None, Some("vlance")],
        );
        assert_eq!(p.hardware_problems(), Vec::<String>::new());
        assert_eq!(p.vm.controller_type("ide1"), Some(ControllerType::Ide));
        assert_eq!(p.vm.controller_type("scsi2"), Some(ControllerType::LsiLogic));
    }

    #[test]
    fn what_the_hosts_cannot_run_is_named() {
        let p = plan(
            &[
                "scsi0:0", "scsi0:1", "scsi1:7", "ide0:2", "sata0:30", "nvme0:15", "ide2:0",
            ],
            &[
                ("scsi0", ControllerType::BusLogic),
                ("scsi1", ControllerType::Other("megaraid".into())),
            ],
            &[Some("vmxnet2"), Some("token-ring")],
        );
        let problems = p.hardware_problems();
        let all = problems.join("\n");
        assert!(
            all.contains(
                "scsi0: BusLogic controller: QEMU cannot emulate it; change the controller to lsilogic or pvscsi"
            ),
            "{all}"
        );
        assert_eq!(all.matches("scsi0: BusLogic").count(), 1, "once per controller: {all}");
        assert!(all.contains("scsi1: megaraid controller"), "{all}");
        assert!(all.contains("disk scsi1:7: unit 7 does not exist"), "{all}");
        assert!(all.contains("disk ide0:2: unit 2 does not exist"), "{all}");
        assert!(all.contains("disk sata0:30: unit 30"), "{all}");
        assert!(all.contains("disk nvme0:15: unit 15"), "{all}");
        assert!(all.contains("disk ide2:0: a VM has 2 ide controllers at most"), "{all}");
        assert!(
            all.contains("ethernet0: NIC model vmxnet2: QEMU has no model for it"),
            "{all}"
        );
        assert!(all.contains("ethernet1: NIC model token-ring"), "{all}");
        assert_eq!(problems.len(), 9, "{all}");
    }

    #[test]
    fn a_controller_on_the_wrong_bus_is_refused() {
        let p = plan(&["sata0:0"], &[("sata0", ControllerType::Pvscsi)], &[]);
        let all = p.hardware_problems().join("\n");
        assert!(
            all.contains("sata0: a VMware Paravirtual SCSI (pvscsi) controller cannot be on the sata bus"),
            "{all}"
        );
    }
}
