//! From `.vmx` entries to a [`SourceVm`]: hardware, NICs, and the disks to migrate.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::claim::Role;
use super::vmx::{quote, VmxFile};
use super::{disk, SourceDisk, SourceError, SourceNic, SourceOptions, SourceVm};
pub(super) use gateway::plan::Bus;
use gateway::plan::ControllerType;

/// VMware's default when `memsize` is absent.
const DEFAULT_MEMORY_MIB: u64 = 256;

/// Device types that are not disks and are left out, with a note.
const CDROM_TYPES: [&str; 3] = ["cdrom-image", "cdrom-raw", "atapi-cdrom"];

pub(crate) fn open_vm(vmx_path: &Path, options: &SourceOptions) -> Result<SourceVm, SourceError> {
    let vmx_path = std::path::absolute(vmx_path).map_err(|source| SourceError::Io {
        path: vmx_path.to_owned(),
        action: "resolve the .vmx path",
        source,
    })?;
    let vmx = VmxFile::read(&vmx_path)?;
    let mut notes = Vec::new();

    let name = vmx.value("displayName").map(str::to_owned).unwrap_or_else(|| {
        vmx_path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let guest_os = vmx.value("guestOS").unwrap_or("otherGuest").to_owned();
    let num_cpus = vmx.number("numvcpus", 1u32)?.unwrap_or(1);
    let cores_per_socket = vmx.number("cpuid.coresPerSocket", 1u32)?;
    let memory_mib = match vmx.number("memsize", 1u64)? {
        Some(mib) => mib,
        None => {
            notes.push(format!(
                "memsize is absent; assuming {DEFAULT_MEMORY_MIB} MiB, VMware's default"
            ));
            DEFAULT_MEMORY_MIB
        }
    };
    let firmware = match vmx.get("firmware").filter(|e| !e.value.is_empty()) {
        None => None,
        Some(entry) => {
            let firmware = entry.value.to_ascii_lowercase();
            if firmware != "bios" && firmware != "efi" {
                return Err(vmx.bad_value(entry, "is not a known firmware; use \"bios\" or \"efi\""));
            }
            Some(firmware)
        }
    };
    let bios_uuid = vmx.value("uuid.bios").map(str::to_owned);
    let nics = read_nics(&vmx, &mut notes)?;
    let disks = read_disks(&vmx, options, &mut notes)?;
    let controllers = super::controllers_of(&disks, |key| controller_type(&vmx, key, &mut notes));

    Ok(SourceVm {
        descriptor_sha256: vmx.sha256,
        vmx_path,
        name,
        guest_os,
        num_cpus,
        cores_per_socket,
        memory_mib,
        firmware,
        bios_uuid,
        nics,
        disks,
        controllers,
        notes,
        firewall: Default::default(),
    })
}

fn read_nics(vmx: &VmxFile, notes: &mut Vec<String>) -> Result<Vec<SourceNic>, SourceError> {
    let numbers: BTreeSet<u32> = vmx
        .entries()
        .filter_map(|(key, _)| {
            let (device, _) = key.strip_prefix("ethernet")?.split_once('.')?;
            device.parse().ok()
        })
        .collect();
    let mut nics = Vec::new();
    for n in numbers {
        let key = format!("ethernet{n}");
        let attr = |name: &str| format!("{key}.{name}");
        if vmx.bool(&attr("present"))? == Some(false) {
            notes.push(format!("{key} has present = FALSE, not migrated"));
            continue;
        }
        let Some(network) = vmx.value(&attr("networkName")) else {
            let detail = [
                ("connectionType", "connectionType"),
                ("dvs.portgroupId", "distributed port group"),
            ]
            .iter()
            .find_map(|(suffix, what)| vmx.value(&attr(suffix)).map(|v| format!(" ({what} {})", quote(v))))
            .unwrap_or_default();
            return Err(SourceError::NicWithoutNetwork {
                path: vmx.path.clone(),
                nic: key,
                detail,
            });
        };
        let address_type = vmx.value(&attr("addressType")).map(str::to_owned);
        let is_static = address_type
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("static"));
        let mac_key = attr(if is_static { "address" } else { "generatedAddress" });
        let mac = match vmx.get(&mac_key).filter(|e| !e.value.is_empty()) {
            Some(entry) if !is_mac(&entry.value) => {
                return Err(vmx.bad_value(
                    entry,
                    "is not a MAC address; expected six hex pairs such as 00:50:56:01:02:03",
                ));
            }
            Some(entry) => Some(entry.value.clone()),
            None => {
                notes.push(format!(
                    "{key} has no {}; the target will assign a MAC address",
                    if is_static {
                        "address although addressType is static"
                    } else {
                        "generatedAddress"
                    }
                ));
                None
            }
        };
        let virtual_dev = vmx.value(&attr("virtualDev")).map(str::to_owned);
        nics.push(SourceNic {
            key,
            network: network.to_owned(),
            virtual_dev,
            address_type,
            mac,
        });
    }
    Ok(nics)
}

/// The type of controller `key` (`scsi0`): a SCSI controller's `virtualDev`, else the
/// bus's one type. A SCSI controller naming none is taken as LSI Logic, and a note says so:
/// VMware then picks by guest OS, BusLogic for some old guests.
fn controller_type(vmx: &VmxFile, key: &str, notes: &mut Vec<String>) -> ControllerType {
    let Some((bus, _)) = gateway::plan::parse_controller_key(key) else {
        return ControllerType::Other(key.to_owned());
    };
    if bus != Bus::Scsi {
        return ControllerType::default_for(bus);
    }
    match vmx.value(&format!("{key}.virtualDev")) {
        Some(dev) => ControllerType::from_scsi_virtual_dev(dev),
        None => {
            notes.push(format!(
                "{key} has no virtualDev; taken as lsilogic (VMware picks by guest OS, BusLogic for some old guests): set {key}.virtualDev in the source VM if its guest needs another"
            ));
            ControllerType::LsiLogic
        }
    }
}

pub(super) fn is_mac(text: &str) -> bool {
    let pairs: Vec<&str> = text.split(':').collect();
    pairs.len() == 6
        && pairs
            .iter()
            .all(|pair| pair.len() == 2 && pair.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A device slot such as scsi0:1, ordered by bus, then controller, then unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Slot {
    pub bus: Bus,
    pub controller: u32,
    pub unit: u32,
}

impl Slot {
    pub(super) fn key(self) -> String {
        format!("{}{}:{}", self.bus.prefix(), self.controller, self.unit)
    }

    fn controller_key(self) -> String {
        format!("{}{}", self.bus.prefix(), self.controller)
    }
}

/// The slot of a key such as `scsi0:1.filename` (lower-cased); `Ok(None)` for keys of other
/// things, including controllers (`scsi0.virtualdev`); `Err` for a device key that does not
/// parse, which could otherwise hide a disk.
fn parse_slot(key: &str) -> Result<Option<Slot>, ()> {
    for bus in Bus::ALL {
        let Some(rest) = key.strip_prefix(bus.prefix()) else {
            continue;
        };
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let device = rest.split_once('.').map_or(rest, |(device, _)| device);
        let Some((controller, unit)) = device.split_once(':') else {
            return Ok(None);
        };
        return match (controller.parse(), unit.parse()) {
            (Ok(controller), Ok(unit)) => Ok(Some(Slot { bus, controller, unit })),
            _ => Err(()),
        };
    }
    Ok(None)
}

fn read_disks(vmx: &VmxFile, options: &SourceOptions, notes: &mut Vec<String>) -> Result<Vec<SourceDisk>, SourceError> {
    let mut slots = BTreeSet::new();
    for (key, entry) in vmx.entries() {
        match parse_slot(key) {
            Ok(Some(slot)) => {
                slots.insert(slot);
            }
            Ok(None) => {}
            Err(()) => {
                return Err(SourceError::VmxSyntax {
                    path: vmx.path.clone(),
                    line: entry.line,
                    message: format!(
                        "`{}` is not a valid device key; expected e.g. scsi0:1.fileName",
                        quote(&entry.key)
                    ),
                });
            }
        }
    }
    let folder = vmx.path.parent().unwrap_or(Path::new("/"));
    let mut disks = Vec::new();
    for slot in slots {
        let key = slot.key();
        let attr = |name: &str| format!("{key}.{name}");
        let present = vmx.bool(&attr("present"))?;
        if present == Some(false) {
            notes.push(format!("{key} has present = FALSE, not migrated"));
            continue;
        }
        let controller = slot.controller_key();
        if vmx.bool(&format!("{controller}.present"))? == Some(false) {
            notes.push(format!(
                "{key} is on controller {controller}, which has present = FALSE; not migrated"
            ));
            continue;
        }
        let device_type = vmx.value(&attr("deviceType")).map(str::to_ascii_lowercase);
        let file_name = vmx.value(&attr("fileName"));
        if let Some(cdrom) = device_type.as_deref().filter(|t| CDROM_TYPES.contains(t)) {
            notes.push(format!("{key} is a CD-ROM ({cdrom}), not migrated"));
            continue;
        }
        if let Some(iso) = file_name.filter(|f| f.to_ascii_lowercase().ends_with(".iso")) {
            notes.push(format!("{key} is a CD-ROM image ({}), not migrated", quote(iso)));
            continue;
        }
        if device_type.as_deref() == Some("scsi-passthru") {
            notes.push(format!(
                "{key} is a SCSI passthrough device (scsi-passthru), not migrated"
            ));
            continue;
        }
        let Some(file_name) = file_name else {
            if present == Some(true) {
                return Err(SourceError::DiskWithoutFile {
                    vmx: vmx.path.clone(),
                    key,
                });
            }
            notes.push(format!("{key} has no fileName, not migrated"));
            continue;
        };
        disks.push(open_disk(vmx, folder, key, file_name, options, notes)?);
    }
    Ok(disks)
}

fn open_disk(
    vmx: &VmxFile,
    folder: &Path,
    key: String,
    file_name: &str,
    options: &SourceOptions,
    notes: &mut Vec<String>,
) -> Result<SourceDisk, SourceError> {
    // An absolute fileName stays as is (Path::join keeps it).
    let path: PathBuf = folder.join(file_name);
    match path.try_exists() {
        Ok(true) => {}
        Ok(false) => {
            return Err(SourceError::DiskMissing {
                vmx: vmx.path.clone(),
                key,
                file_name: file_name.to_owned(),
                resolved: path,
            });
        }
        Err(source) => {
            return Err(wrap(
                vmx,
                key,
                SourceError::Io {
                    path,
                    action: "look for the disk file",
                    source,
                },
            ));
        }
    }
    let open_as = if options.takes_as_raw(&key) {
        disk::OpenAs::Raw
    } else {
        disk::OpenAs::Detect(Role::Disk(Some(&key)))
    };
    let opened = match disk::open_as(&path, open_as) {
        Ok(opened) => opened,
        Err(e) => return Err(wrap(vmx, key, e)),
    };
    notes.extend(opened.warnings.into_iter().map(|w| format!("{key}: {w}")));
    Ok(SourceDisk {
        key,
        capacity: opened.reader.capacity(),
        format: opened.format,
        path,
        archive_member: None,
        // Set by `open_vm_with`, which knows the operator's options.
        taken_as_raw: false,
    })
}

fn wrap(vmx: &VmxFile, key: String, source: SourceError) -> SourceError {
    SourceError::Disk {
        vmx: vmx.path.clone(),
        key,
        source: Box::new(source),
    }
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
