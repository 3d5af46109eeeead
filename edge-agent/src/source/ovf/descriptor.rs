//! The descriptor's envelope: References, DiskSection, NetworkSection, the VirtualSystem's
//! name and guest OS, and which VirtualHardwareSection applies. The hardware itself is read
//! in `hardware.rs`.

use std::collections::{BTreeMap, HashSet};

use roxmltree::{Document, Node, ParsingOptions};

use super::{check_href, Descriptor, FileRef, Package};
use crate::source::SourceError;

/// An ovftool descriptor has a few hundred elements; this bounds the memory a hostile one can
/// make the parser use (the size limit alone allows millions of tiny elements).
const NODES_LIMIT: u32 = 200_000;

/// VMware's default when the descriptor has no memory item.
pub(super) const DEFAULT_MEMORY_MIB: u64 = 256;

const OVF_NS: [&str; 2] = [
    "http://schemas.dmtf.org/ovf/envelope/1",
    "http://schemas.dmtf.org/ovf/envelope/2",
];
/// Where an item's properties live: `rasd:` for `Item`, and in OVF 2 `sasd:` for
/// `StorageItem` and `epasd:` for `EthernetPortItem`.
pub(super) const ITEM_NS: [&str; 3] = [
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData",
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData",
];
const VSSD_NS: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
pub(super) const VMW_NS: &str = "http://www.vmware.com/schema/ovf";

/// CIM `ResourceType` values (DSP1041) that matter here.
pub(super) mod resource {
    pub const CPU: u32 = 3;
    pub const MEMORY: u32 = 4;
    pub const IDE: u32 = 5;
    pub const SCSI: u32 = 6;
    pub const ETHERNET: u32 = 10;
    pub const FLOPPY: u32 = 14;
    pub const CD: u32 = 15;
    pub const DVD: u32 = 16;
    pub const DISK: u32 = 17;
    /// "Other storage device": SATA (AHCI) and NVMe controllers.
    pub const OTHER_STORAGE: u32 = 20;
    pub const SERIAL: u32 = 21;
    pub const PARALLEL: u32 = 22;
}

/// Parses a descriptor's bytes; `package` is only for messages.
pub(super) fn parse(package: &Package, bytes: &[u8]) -> Result<Descriptor, SourceError> {
    let sha256 = gateway::chunk::sha256(bytes);
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        package.error(
            Some(line),
            "the descriptor is not UTF-8 text; an OVF descriptor is XML in UTF-8",
        )
    })?;
    let options = ParsingOptions {
        nodes_limit: NODES_LIMIT,
        ..ParsingOptions::default()
    };
    let doc = Document::parse_with_options(text, options).map_err(|e| {
        package.error(
            Some(e.pos().row as usize),
            format!("the descriptor is not well-formed XML: {e}"),
        )
    })?;
    let mut descriptor = Parser::new(package, &doc)?.descriptor()?;
    descriptor.sha256 = sha256;
    Ok(descriptor)
}

/// A `DiskSection/Disk`.
#[derive(Debug)]
pub(super) struct DiskDef {
    /// `ovf:fileRef`: the File holding the disk; `None` for an empty disk to create.
    pub file_ref: Option<String>,
    /// `ovf:capacity` times its units, in bytes.
    pub capacity: u64,
    pub line: usize,
}

/// Walks a parsed descriptor.
pub(super) struct Parser<'a, 'input> {
    pub(super) package: &'a Package,
    pub(super) doc: &'a Document<'input>,
    pub(super) envelope: Node<'a, 'input>,
    /// The envelope's namespace: OVF 1 or OVF 2.
    pub(super) ovf: &'a str,
    /// The DeploymentOptionSection configuration in effect, if the descriptor has several.
    pub(super) configuration: Option<String>,
    pub(super) notes: Vec<String>,
}

impl<'a, 'input> Parser<'a, 'input> {
    fn new(package: &'a Package, doc: &'a Document<'input>) -> Result<Self, SourceError> {
        let envelope = doc.root_element();
        let ns = envelope.tag_name().namespace().unwrap_or_default();
        let Some(ovf) = OVF_NS.iter().copied().find(|&n| n == ns) else {
            return Err(package.error(
                Some(1),
                format!(
                    "not an OVF descriptor: the root element is <{}> in namespace {:?}, expected <Envelope> in {}",
                    envelope.tag_name().name(),
                    ns,
                    OVF_NS.join(" or ")
                ),
            ));
        };
        if envelope.tag_name().name() != "Envelope" {
            return Err(package.error(
                Some(1),
                format!(
                    "not an OVF descriptor: the root element is <{}>, expected <Envelope>",
                    envelope.tag_name().name()
                ),
            ));
        }
        let mut parser = Parser {
            package,
            doc,
            envelope,
            ovf,
            configuration: None,
            notes: Vec::new(),
        };
        parser.configuration = parser.default_configuration();
        Ok(parser)
    }

    pub(super) fn line(&self, node: Node) -> usize {
        self.doc.text_pos_at(node.range().start).row as usize
    }

    pub(super) fn error(&self, node: Node, message: impl Into<String>) -> SourceError {
        self.package.error(Some(self.line(node)), message)
    }

    /// An `ovf:` attribute (or, leniently, the same name without a namespace).
    pub(super) fn attr(&self, node: Node<'a, 'input>, name: &str) -> Option<&'a str> {
        node.attribute((self.ovf, name)).or_else(|| node.attribute(name))
    }

    pub(super) fn required_attr(&self, node: Node<'a, 'input>, name: &str) -> Result<&'a str, SourceError> {
        self.attr(node, name).ok_or_else(|| {
            self.error(
                node,
                format!("<{}> has no ovf:{name} attribute", node.tag_name().name()),
            )
        })
    }

    /// Child elements of `node` in the OVF namespace named `name`.
    pub(super) fn children(
        &self,
        node: Node<'a, 'input>,
        name: &'static str,
    ) -> impl Iterator<Item = Node<'a, 'input>> + 'a {
        let ovf = self.ovf;
        node.children()
            .filter(move |c| c.is_element() && c.tag_name().name() == name && c.tag_name().namespace() == Some(ovf))
    }

    pub(super) fn child(&self, node: Node<'a, 'input>, name: &'static str) -> Option<Node<'a, 'input>> {
        self.children(node, name).next()
    }

    fn default_configuration(&mut self) -> Option<String> {
        let section = self.child(self.envelope, "DeploymentOptionSection")?;
        let configs: Vec<(&str, bool)> = self
            .children(section, "Configuration")
            .filter_map(|c| Some((self.attr(c, "id")?, self.attr(c, "default") == Some("true"))))
            .collect();
        let chosen = configs.iter().find(|(_, default)| *default).or(configs.first())?.0;
        if configs.len() > 1 {
            let all: Vec<&str> = configs.iter().map(|(id, _)| *id).collect();
            self.notes.push(format!(
                "the descriptor offers configurations {}; the hardware of the default, {chosen}, is migrated",
                all.join(", ")
            ));
        }
        Some(chosen.to_owned())
    }

    fn descriptor(mut self) -> Result<Descriptor, SourceError> {
        let files = self.files()?;
        let disk_defs = self.disk_section(&files)?;
        let networks = self.networks();
        if self.child(self.envelope, "VirtualSystemCollection").is_some() {
            return Err(self.package.unsupported(
                "an OVF package with several VMs (VirtualSystemCollection)",
                "export each VM as its own OVF or OVA",
            ));
        }
        let system = self
            .child(self.envelope, "VirtualSystem")
            .ok_or_else(|| self.error(self.envelope, "the descriptor has no VirtualSystem: it describes no VM"))?;
        let name = self
            .child(system, "Name")
            .and_then(|n| n.text())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .or_else(|| self.attr(system, "id"))
            .map(str::to_owned);
        let guest_os = self.guest_os(system);
        let section = self.hardware_section(system)?;
        let hardware = self.hardware(section, &networks, &files, &disk_defs)?;
        Ok(Descriptor {
            name,
            guest_os,
            num_cpus: hardware.num_cpus,
            cores_per_socket: hardware.cores_per_socket,
            memory_mib: hardware.memory_mib,
            firmware: hardware.firmware,
            bios_uuid: hardware.bios_uuid,
            nics: hardware.nics,
            disks: hardware.disks,
            controller_types: hardware.controller_types,
            notes: self.notes,
            // Of the bytes as read, set by `parse`, which has them.
            sha256: [0; 32],
        })
    }

    /// `References/File`, by `ovf:id`.
    fn files(&self) -> Result<BTreeMap<String, FileRef>, SourceError> {
        let mut files = BTreeMap::new();
        let Some(references) = self.child(self.envelope, "References") else {
            return Ok(files);
        };
        for node in self.children(references, "File") {
            let id = self.required_attr(node, "id")?.to_owned();
            let href = self.required_attr(node, "href")?.to_owned();
            check_href(&href).map_err(|message| self.error(node, format!("file {id}: {message}")))?;
            if let Some(compression) = self
                .attr(node, "compression")
                .filter(|c| !c.is_empty() && *c != "identity")
            {
                return Err(self.package.unsupported(
                    format!("file {href} compressed with {compression:?} (ovf:compression)"),
                    "export the VM again without compression (ovftool without --compress)",
                ));
            }
            if self.attr(node, "chunkSize").is_some() {
                return Err(self.package.unsupported(
                    format!("file {href} split into chunks (ovf:chunkSize)"),
                    "export the VM again without --chunkSize",
                ));
            }
            let size =
                match self.attr(node, "size") {
                    None => None,
                    Some(size) => Some(size.trim().parse::<u64>().map_err(|_| {
                        self.error(node, format!("file {id}: ovf:size {size:?} is not a number of bytes"))
                    })?),
                };
            if files
                .insert(
                    id.clone(),
                    FileRef {
                        id: id.clone(),
                        href,
                        size,
                    },
                )
                .is_some()
            {
                return Err(self.error(node, format!("two files have ovf:id {id:?}")));
            }
        }
        Ok(files)
    }

    /// `DiskSection/Disk`, by `ovf:diskId`.
    fn disk_section(&self, files: &BTreeMap<String, FileRef>) -> Result<BTreeMap<String, DiskDef>, SourceError> {
        let section = self.child(self.envelope, "DiskSection").ok_or_else(|| {
            self.error(
                self.envelope,
                "the descriptor has no DiskSection: it describes no disks, so there is nothing to migrate",
            )
        })?;
        let mut disks = BTreeMap::new();
        for node in self.children(section, "Disk") {
            let id = self.required_attr(node, "diskId")?.to_owned();
            if self.attr(node, "parentRef").is_some() {
                return Err(self.package.unsupported(
                    format!("disk {id}, a delta of another disk (ovf:parentRef)"),
                    "export the VM again with its snapshots consolidated",
                ));
            }
            let file_ref = self.attr(node, "fileRef").map(str::to_owned);
            if let Some(file_ref) = &file_ref {
                if !files.contains_key(file_ref) {
                    return Err(self.error(
                        node,
                        format!("disk {id} has ovf:fileRef {file_ref:?}, which names no File in References"),
                    ));
                }
            }
            let capacity = self.required_attr(node, "capacity")?;
            let units = self.attr(node, "capacityAllocationUnits").unwrap_or("byte");
            let capacity = bytes_of(capacity, units).map_err(|problem| {
                self.error(node, format!("disk {id}: capacity {capacity:?} × {units:?}: {problem}"))
            })?;
            if capacity == 0 {
                return Err(self.error(node, format!("disk {id} has a capacity of 0 bytes")));
            }
            let def = DiskDef {
                file_ref,
                capacity,
                line: self.line(node),
            };
            if disks.insert(id.clone(), def).is_some() {
                return Err(self.error(node, format!("two disks have ovf:diskId {id:?}")));
            }
        }
        Ok(disks)
    }

    fn networks(&self) -> HashSet<String> {
        let Some(section) = self.child(self.envelope, "NetworkSection") else {
            return HashSet::new();
        };
        self.children(section, "Network")
            .filter_map(|n| self.attr(n, "name"))
            .map(str::to_owned)
            .collect()
    }

    fn guest_os(&mut self, system: Node<'a, 'input>) -> String {
        let Some(section) = self.child(system, "OperatingSystemSection") else {
            self.notes
                .push("the descriptor has no OperatingSystemSection; guest OS set to otherGuest".to_owned());
            return "otherGuest".to_owned();
        };
        if let Some(os_type) = section.attribute((VMW_NS, "osType")).filter(|t| !t.is_empty()) {
            return os_type.to_owned();
        }
        let id = self.attr(section, "id").unwrap_or_default();
        if let Some(guest) = id.trim().parse().ok().and_then(guest_of_cim_os) {
            return guest.to_owned();
        }
        let description = self
            .child(section, "Description")
            .and_then(|d| d.text())
            .map(|d| format!(" ({})", d.trim()))
            .unwrap_or_default();
        self.notes.push(format!(
            "guest OS CIM id {id:?}{description} has no VMware equivalent here; guest OS set to otherGuest"
        ));
        "otherGuest".to_owned()
    }

    /// The VirtualHardwareSection to migrate: VMware's (`vmx-NN`) if there are several.
    fn hardware_section(&mut self, system: Node<'a, 'input>) -> Result<Node<'a, 'input>, SourceError> {
        let sections: Vec<_> = self.children(system, "VirtualHardwareSection").collect();
        let system_type = |section: Node| {
            section
                .children()
                .find(|c| c.tag_name().name() == "System")
                .and_then(|s| {
                    s.children().find(|c| {
                        c.tag_name().namespace() == Some(VSSD_NS) && c.tag_name().name() == "VirtualSystemType"
                    })
                })
                .and_then(|t| t.text())
                .map(|t| t.trim().to_owned())
                .unwrap_or_default()
        };
        let chosen = match sections.as_slice() {
            [] => return Err(self.error(system, "the VirtualSystem has no VirtualHardwareSection")),
            [only] => *only,
            [first, ..] => {
                let chosen = sections
                    .iter()
                    .copied()
                    .find(|s| system_type(*s).split_whitespace().any(|t| t.starts_with("vmx-")))
                    .unwrap_or(*first);
                self.notes.push(format!(
                    "the descriptor has {} VirtualHardwareSections; the one for {:?} is migrated",
                    sections.len(),
                    system_type(chosen)
                ));
                chosen
            }
        };
        Ok(chosen)
    }
}

/// `quantity` × `units` in bytes. Units are DSP0004 programmatic units ("byte",
/// "byte * 2^30", "byte * 10^9") or the older names ("KiloBytes", "MegaBytes", "GigaBytes",
/// binary as VirtualBox and VMware read them).
pub(super) fn bytes_of(quantity: &str, units: &str) -> Result<u64, String> {
    let quantity = quantity.trim();
    if quantity.starts_with("${") {
        return Err("a property reference; a size given by a deployment property is not supported".to_owned());
    }
    let quantity: u64 = quantity.parse().map_err(|_| "not a whole number".to_owned())?;
    let multiplier = unit_multiplier(units)?;
    quantity
        .checked_mul(multiplier)
        .ok_or_else(|| "an absurd size (more than 2^64 bytes)".to_owned())
}

fn unit_multiplier(units: &str) -> Result<u64, String> {
    let compact: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let unknown = || format!("unknown allocation units {units:?}; expected e.g. \"byte * 2^30\"");
    match compact.as_str() {
        "" | "byte" | "bytes" => return Ok(1),
        "kilobytes" | "kb" => return Ok(1 << 10),
        "megabytes" | "mb" => return Ok(1 << 20),
        "gigabytes" | "gb" => return Ok(1 << 30),
        "terabytes" | "tb" => return Ok(1 << 40),
        _ => {}
    }
    let power = compact
        .strip_prefix("byte*")
        .or_else(|| compact.strip_prefix("bytes*"))
        .ok_or_else(unknown)?;
    let (base, exponent) = power.split_once('^').ok_or_else(unknown)?;
    let exponent: u32 = exponent.parse().map_err(|_| unknown())?;
    let value = match base {
        "2" => 1u64.checked_shl(exponent).filter(|_| exponent < 64),
        "10" => 10u64.checked_pow(exponent),
        _ => return Err(unknown()),
    };
    value.ok_or_else(|| format!("allocation units {units:?} are absurdly large"))
}

/// VMware guest ids for a few CIM `OperatingSystem` types (DSP0243's `ovf:id`), used when the
/// descriptor has no `vmw:osType`.
fn guest_of_cim_os(id: u32) -> Option<&'static str> {
    Some(match id {
        1 => "otherGuest",
        36 => "otherLinuxGuest",
        93 => "ubuntuGuest",
        94 => "ubuntu64Guest",
        101 => "otherLinux64Guest",
        102 => "otherGuest64",
        105 => "windows7Guest",
        106 => "centosGuest",
        107 => "centos64Guest",
        108 => "oracleLinuxGuest",
        109 => "oracleLinux64Guest",
        _ => return None,
    })
}
