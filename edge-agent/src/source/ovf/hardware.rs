//! The VirtualHardwareSection: CPUs, memory, firmware, NICs, and which disk sits in which
//! controller slot.

use std::collections::{BTreeMap, HashMap, HashSet};

use roxmltree::Node;

use super::descriptor::{bytes_of, resource, DiskDef, Parser, DEFAULT_MEMORY_MIB, ITEM_NS, VMW_NS};
use super::{DescribedDisk, FileRef};
use crate::source::vm::{is_mac, Bus, Slot};
use crate::source::{SourceError, SourceNic};
use gateway::plan::ControllerType;

/// What the VirtualHardwareSection says.
#[derive(Debug)]
pub(super) struct Hardware {
    pub num_cpus: u32,
    pub cores_per_socket: Option<u32>,
    pub memory_mib: u64,
    pub firmware: Option<String>,
    pub bios_uuid: Option<String>,
    pub nics: Vec<SourceNic>,
    /// Attached disks, ordered like [`crate::source::SourceVm::disks`], keys set.
    pub disks: Vec<DescribedDisk>,
    /// Every controller's type, by key (`scsi0`).
    pub controller_types: HashMap<String, ControllerType>,
}

impl<'a, 'input> Parser<'a, 'input> {
    pub(super) fn hardware(
        &mut self,
        section: Node<'a, 'input>,
        networks: &HashSet<String>,
        files: &BTreeMap<String, FileRef>,
        disk_defs: &BTreeMap<String, DiskDef>,
    ) -> Result<Hardware, SourceError> {
        let items = self.items(section)?;
        let (num_cpus, cores_per_socket) = self.cpus(&items)?;
        let memory_mib = self.memory(&items)?;
        let (firmware, bios_uuid) = self.config(section)?;
        let nics = self.nics(&items, networks)?;
        let (disks, controller_types) = self.disks(&items, files, disk_defs)?;
        Ok(Hardware {
            controller_types,
            num_cpus,
            cores_per_socket,
            memory_mib,
            firmware,
            bios_uuid,
            nics,
            disks,
        })
    }

    /// The section's items that apply: those of the configuration in effect, and not the
    /// minimum or maximum of a range.
    fn items(&self, hardware: Node<'a, 'input>) -> Result<Vec<Item<'a, 'input>>, SourceError> {
        let mut items = Vec::new();
        for node in hardware.children().filter(|c| {
            c.is_element()
                && c.tag_name().namespace() == Some(self.ovf)
                && matches!(c.tag_name().name(), "Item" | "StorageItem" | "EthernetPortItem")
        }) {
            if let Some(configs) = self.attr(node, "configuration") {
                let applies = self
                    .configuration
                    .as_deref()
                    .is_some_and(|c| configs.split_whitespace().any(|x| x == c));
                if !applies {
                    continue;
                }
            }
            if self.attr(node, "bound").is_some_and(|b| b != "normal") {
                continue;
            }
            let mut item = Item { node, kind: 0 };
            let kind = item.prop("ResourceType").unwrap_or_default();
            item.kind = kind
                .parse()
                .map_err(|_| self.error(node, format!("item has ResourceType {kind:?}, expected a number")))?;
            items.push(item);
        }
        Ok(items)
    }

    fn single<'i>(
        &self,
        items: &'i [Item<'a, 'input>],
        kind: u32,
        what: &str,
    ) -> Result<Option<&'i Item<'a, 'input>>, SourceError> {
        let mut found = items.iter().filter(|i| i.kind == kind);
        let first = found.next();
        if let Some(second) = found.next() {
            return Err(self.error(second.node, format!("a second {what} item; a VM has one")));
        }
        Ok(first)
    }

    fn cpus(&mut self, items: &[Item<'a, 'input>]) -> Result<(u32, Option<u32>), SourceError> {
        let Some(item) = self.single(items, resource::CPU, "CPU")? else {
            self.notes
                .push("the descriptor has no CPU item; 1 vCPU assumed".to_owned());
            return Ok((1, None));
        };
        let count = self.number::<u32>(item, "VirtualQuantity", "the number of vCPUs")?;
        let cores = match item
            .node
            .children()
            .find(|c| c.tag_name().namespace() == Some(VMW_NS) && c.tag_name().name() == "CoresPerSocket")
        {
            None => None,
            Some(node) => {
                let text = node.text().unwrap_or_default().trim();
                match text.parse::<u32>() {
                    Ok(cores) if cores >= 1 => Some(cores),
                    _ => return Err(self.error(node, format!("CoresPerSocket {text:?} is not a positive number"))),
                }
            }
        };
        Ok((count, cores))
    }

    fn memory(&mut self, items: &[Item<'a, 'input>]) -> Result<u64, SourceError> {
        let Some(item) = self.single(items, resource::MEMORY, "memory")? else {
            self.notes.push(format!(
                "the descriptor has no memory item; assuming {DEFAULT_MEMORY_MIB} MiB, VMware's default"
            ));
            return Ok(DEFAULT_MEMORY_MIB);
        };
        let quantity = item.prop("VirtualQuantity").unwrap_or_default();
        let units = match item.prop("AllocationUnits") {
            Some(units) => units,
            None => {
                self.notes
                    .push("the memory item has no AllocationUnits; megabytes (byte * 2^20) assumed".to_owned());
                "byte * 2^20"
            }
        };
        let bytes = bytes_of(quantity, units)
            .map_err(|problem| self.error(item.node, format!("memory {quantity:?} × {units:?}: {problem}")))?;
        const MIB: u64 = 1 << 20;
        let mib = bytes.div_ceil(MIB);
        if mib == 0 {
            return Err(self.error(item.node, "the VM has 0 bytes of memory"));
        }
        if bytes % MIB != 0 {
            self.notes
                .push(format!("memory of {bytes} bytes rounded up to {mib} MiB"));
        }
        Ok(mib)
    }

    /// `firmware` and `uuid.bios` from the section's `vmw:Config` and `vmw:ExtraConfig`.
    fn config(&self, hardware: Node<'a, 'input>) -> Result<(Option<String>, Option<String>), SourceError> {
        let mut firmware = None;
        let mut bios_uuid = None;
        for node in hardware.children().filter(|c| {
            c.tag_name().namespace() == Some(VMW_NS) && matches!(c.tag_name().name(), "Config" | "ExtraConfig")
        }) {
            let (Some(key), Some(value)) = (node.attribute((VMW_NS, "key")), node.attribute((VMW_NS, "value"))) else {
                continue;
            };
            if key.eq_ignore_ascii_case("firmware") {
                let value = value.to_ascii_lowercase();
                if value != "bios" && value != "efi" {
                    return Err(self.error(node, format!("firmware {value:?} is not \"bios\" or \"efi\"")));
                }
                firmware = Some(value);
            } else if key.eq_ignore_ascii_case("uuid.bios") && !value.is_empty() {
                bios_uuid = Some(value.to_owned());
            }
        }
        Ok((firmware, bios_uuid))
    }

    fn number<T: std::str::FromStr + PartialOrd + From<u8>>(
        &self,
        item: &Item<'a, 'input>,
        prop: &str,
        what: &str,
    ) -> Result<T, SourceError> {
        let text = item.prop(prop).unwrap_or_default();
        match text.parse::<T>() {
            Ok(n) if n >= T::from(1) => Ok(n),
            _ => Err(self.error(item.node, format!("{prop} {text:?} is not {what} (a positive number)"))),
        }
    }

    fn nics(&mut self, items: &[Item<'a, 'input>], networks: &HashSet<String>) -> Result<Vec<SourceNic>, SourceError> {
        let mut ordered: Vec<(Option<u64>, usize, &Item)> = items
            .iter()
            .filter(|i| i.kind == resource::ETHERNET)
            .enumerate()
            .map(|(n, item)| (item.prop("AddressOnParent").and_then(|a| a.parse().ok()), n, item))
            .collect();
        // By AddressOnParent (ovftool writes the PCI order there), then document order;
        // NICs without it come last.
        ordered.sort_by_key(|&(address, n, _)| (address.is_none(), address, n));
        let mut nics = Vec::new();
        for (n, (_, _, item)) in ordered.into_iter().enumerate() {
            let key = format!("ethernet{n}");
            let Some(network) = item.prop("Connection").filter(|c| !c.is_empty()) else {
                return Err(self.error(
                    item.node,
                    format!(
                        "{key} ({}) has no rasd:Connection, so there is no network to map it to; \
                         name its network there, or remove the NIC from the descriptor",
                        item.name()
                    ),
                ));
            };
            if !networks.contains(network) {
                self.notes.push(format!(
                    "{key}'s network {network:?} is not listed in the descriptor's NetworkSection"
                ));
            }
            let mac = match item.prop("Address").filter(|a| !a.is_empty()) {
                None => {
                    self.notes.push(format!(
                        "{key} has no MAC address in the descriptor; the target will assign one"
                    ));
                    None
                }
                Some(address) => {
                    let mac = address.replace('-', ":");
                    if !is_mac(&mac) {
                        return Err(self.error(
                            item.node,
                            format!("{key}: Address {address:?} is not a MAC address; expected six hex pairs such as 00:50:56:01:02:03"),
                        ));
                    }
                    Some(mac)
                }
            };
            nics.push(SourceNic {
                key,
                network: network.to_owned(),
                virtual_dev: item
                    .prop("ResourceSubType")
                    .filter(|s| !s.is_empty())
                    .map(str::to_ascii_lowercase),
                address_type: None,
                mac,
            });
        }
        Ok(nics)
    }

    /// Controllers by InstanceID, with their bus, number and type: IDE is ResourceType 5;
    /// SCSI is 6, its type the ResourceSubType (`lsilogic`, `buslogic`, `lsilogicsas`,
    /// `VirtualSCSI`: ovftool's names); SATA and NVMe are 20 (other storage), told apart by
    /// the ResourceSubType (`vmware.sata.ahci`, `vmware.nvme.controller`).
    fn controllers(
        &mut self,
        items: &[Item<'a, 'input>],
    ) -> Result<HashMap<String, (Bus, u32, ControllerType)>, SourceError> {
        let mut found = Vec::new();
        for item in items {
            let subtype = item.prop("ResourceSubType").unwrap_or_default();
            let kind = match item.kind {
                resource::IDE => ControllerType::Ide,
                resource::SCSI if subtype.is_empty() => {
                    let kind = ControllerType::default_for(Bus::Scsi);
                    self.notes.push(format!(
                        "SCSI controller {} has no ResourceSubType; taken as {}",
                        item.name(),
                        kind.display_name()
                    ));
                    kind
                }
                resource::SCSI => ControllerType::from_scsi_virtual_dev(subtype),
                resource::OTHER_STORAGE => {
                    if subtype.to_ascii_lowercase().contains("nvme") {
                        ControllerType::Nvme
                    } else {
                        ControllerType::Ahci
                    }
                }
                _ => continue,
            };
            let bus = kind.bus();
            let id = item.prop("InstanceID").unwrap_or_default();
            let number = match item.prop("Address").filter(|a| !a.is_empty()) {
                None => None,
                Some(address) => Some(address.parse::<u32>().map_err(|_| {
                    self.error(item.node, format!("controller Address {address:?} is not a bus number"))
                })?),
            };
            found.push((id, bus, number, item.node, kind));
        }
        let mut by_id = HashMap::new();
        let mut taken: BTreeMap<(Bus, u32), &str> = BTreeMap::new();
        // Numbered controllers first, so unnumbered ones take the free numbers.
        found.sort_by_key(|c| c.2.is_none());
        for (id, bus, number, node, kind) in found {
            let number = match number {
                Some(number) => number,
                None => {
                    let number = (0..).find(|n| !taken.contains_key(&(bus, *n))).unwrap_or_default();
                    self.notes.push(format!(
                        "controller {id:?} has no Address; numbered {}{number}",
                        bus.prefix()
                    ));
                    number
                }
            };
            if let Some(other) = taken.insert((bus, number), id) {
                return Err(self.error(
                    node,
                    format!(
                        "two controllers are {}{number} (InstanceID {other:?} and {id:?})",
                        bus.prefix()
                    ),
                ));
            }
            if id.is_empty() || by_id.insert(id.to_owned(), (bus, number, kind)).is_some() {
                return Err(self.error(node, format!("controller InstanceID {id:?} is missing or not unique")));
            }
        }
        Ok(by_id)
    }

    fn disks(
        &mut self,
        items: &[Item<'a, 'input>],
        files: &BTreeMap<String, FileRef>,
        disk_defs: &BTreeMap<String, DiskDef>,
    ) -> Result<(Vec<DescribedDisk>, HashMap<String, ControllerType>), SourceError> {
        let controllers = self.controllers(items)?;
        let controller_types = controllers
            .values()
            .map(|(bus, n, kind)| (format!("{}{n}", bus.prefix()), kind.clone()))
            .collect();
        let controllers: HashMap<&String, (Bus, u32)> =
            controllers.iter().map(|(id, (bus, n, _))| (id, (*bus, *n))).collect();
        let mut slots: BTreeMap<Slot, String> = BTreeMap::new();
        let mut disks = Vec::new();
        let mut used_disks = HashSet::new();
        let mut unnumbered = Vec::new();
        for item in items {
            let what = match item.kind {
                resource::DISK => "disk",
                resource::CD | resource::DVD => "CD/DVD drive",
                resource::FLOPPY => "floppy drive",
                resource::SERIAL | resource::PARALLEL => {
                    let port = if item.kind == resource::SERIAL {
                        "serial"
                    } else {
                        "parallel"
                    };
                    self.notes
                        .push(format!("a {port} port ({}) is not migrated", item.name()));
                    continue;
                }
                _ => continue,
            };
            let id = item.prop("InstanceID").unwrap_or_default();
            let parent = item.prop("Parent").filter(|p| !p.is_empty());
            let controller = match parent {
                None => None,
                Some(parent) => Some(*controllers.get(&parent.to_owned()).ok_or_else(|| {
                    self.error(
                        item.node,
                        format!(
                            "{what} item {id:?} has Parent {parent:?}, which is no IDE, SCSI, SATA or NVMe controller"
                        ),
                    )
                })?),
            };
            let unit = match item.prop("AddressOnParent").filter(|a| !a.is_empty()) {
                None => None,
                Some(unit) => Some(
                    unit.parse::<u32>()
                        .map_err(|_| self.error(item.node, format!("AddressOnParent {unit:?} is not a unit number")))?,
                ),
            };
            let slot = controller
                .zip(unit)
                .map(|((bus, controller), unit)| Slot { bus, controller, unit });
            if let Some(slot) = slot {
                if let Some(other) = slots.insert(slot, id.to_owned()) {
                    return Err(self.error(
                        item.node,
                        format!(
                            "{} is used by two devices (InstanceID {other:?} and {id:?})",
                            slot.key()
                        ),
                    ));
                }
            }
            if item.kind != resource::DISK {
                let place = slot.map_or_else(|| item.name(), |s| s.key());
                self.notes.push(format!("{place} is a {what}, not migrated"));
                continue;
            }
            let Some(controller) = controller else {
                return Err(self.error(item.node, format!("disk item {id:?} has no Parent controller")));
            };
            let host = item.prop("HostResource").unwrap_or_default();
            if host.is_empty() {
                self.notes.push(format!(
                    "disk item {} has no HostResource (an empty drive), not migrated",
                    item.name()
                ));
                continue;
            }
            let disk_id = disk_id_of(host).map_err(|problem| self.error(item.node, problem))?;
            let Some(def) = disk_defs.get(disk_id) else {
                return Err(self.error(
                    item.node,
                    format!("HostResource {host:?} names disk {disk_id:?}, which is not in the DiskSection"),
                ));
            };
            if !used_disks.insert(disk_id) {
                return Err(self.error(item.node, format!("disk {disk_id:?} is attached twice")));
            }
            let Some(file) = def.file_ref.as_ref().and_then(|f| files.get(f)) else {
                return Err(self.package.unsupported(
                    format!("disk {disk_id}, which has no ovf:fileRef (an empty disk to create at deployment)"),
                    "add the disk after the migration instead",
                ));
            };
            let described = DescribedDisk {
                key: String::new(),
                disk_id: disk_id.to_owned(),
                file: file.clone(),
                capacity: def.capacity,
                line: def.line,
            };
            match slot {
                Some(slot) => disks.push((slot, described)),
                None => unnumbered.push((controller, id.to_owned(), described)),
            }
        }
        // Disks without AddressOnParent take the lowest free unit, as VMware's import does
        // (on SCSI, unit 7 is the controller's own).
        for ((bus, controller), id, described) in unnumbered {
            let slot = (0..)
                .map(|unit| Slot { bus, controller, unit })
                .find(|s| !slots.contains_key(s) && (bus != Bus::Scsi || s.unit != 7))
                .unwrap_or(Slot {
                    bus,
                    controller,
                    unit: 0,
                });
            slots.insert(slot, id);
            self.notes.push(format!(
                "disk {} has no AddressOnParent; attached as {}",
                described.disk_id,
                slot.key()
            ));
            disks.push((slot, described));
        }
        for id in disk_defs.keys() {
            if !used_disks.contains(id.as_str()) {
                self.notes.push(format!(
                    "disk {id} of the DiskSection is attached to no controller, not migrated"
                ));
            }
        }
        disks.sort_by_key(|(slot, _)| *slot);
        let used_files: HashSet<&str> = disks.iter().map(|(_, d)| d.file.id.as_str()).collect();
        for file in files.values().filter(|f| !used_files.contains(f.id.as_str())) {
            self.notes.push(format!(
                "file {} ({}) is not a disk of the VM, not migrated",
                file.id, file.href
            ));
        }
        let mut seen_files = HashSet::new();
        let mut out = Vec::new();
        for (slot, mut described) in disks {
            if !seen_files.insert(described.file.id.clone()) {
                return Err(self.package.error(
                    Some(described.line),
                    format!("file {} is the content of two disks", described.file.id),
                ));
            }
            described.key = slot.key();
            out.push(described);
        }
        Ok((out, controller_types))
    }
}

/// An item of the VirtualHardwareSection and its `ResourceType`.
#[derive(Debug, Clone, Copy)]
struct Item<'a, 'input> {
    node: Node<'a, 'input>,
    kind: u32,
}

impl<'a, 'input> Item<'a, 'input> {
    /// A property (`rasd:`, `sasd:` or `epasd:` child), trimmed; `Some("")` if empty.
    fn prop(&self, name: &str) -> Option<&'a str> {
        self.node
            .children()
            .find(|c| {
                c.is_element()
                    && c.tag_name().name() == name
                    && c.tag_name().namespace().is_some_and(|ns| ITEM_NS.contains(&ns))
            })
            .map(|c| c.text().unwrap_or_default().trim())
    }

    /// How messages name the item: its ElementName, else its InstanceID.
    fn name(&self) -> String {
        match (self.prop("ElementName"), self.prop("InstanceID")) {
            (Some(name), _) if !name.is_empty() => format!("{name:?}"),
            (_, Some(id)) => format!("InstanceID {id:?}"),
            _ => "an item".to_owned(),
        }
    }
}

/// The disk id of a disk item's `HostResource`: "ovf:/disk/vmdisk1" (OVF 1 and 2),
/// "ovf://disk/vmdisk1" (pre-1.0 writers) or "/disk/vmdisk1".
fn disk_id_of(host: &str) -> Result<&str, String> {
    let rest = host.strip_prefix("ovf:").unwrap_or(host).trim_start_matches('/');
    if let Some(id) = rest.strip_prefix("disk/").filter(|id| !id.is_empty()) {
        return Ok(id);
    }
    if rest.starts_with("file/") {
        return Err(format!(
            "HostResource {host:?} backs the disk with a file directly; only disks of the DiskSection (ovf:/disk/...) are supported"
        ));
    }
    Err(format!("HostResource {host:?} is not of the form ovf:/disk/<diskId>"))
}
