//! The .vmx of a migrated VM: the cloud domain's record of its hardware, written the way
//! vSphere writes it, whatever format its disks are in.

use std::fmt::Write as _;

use gateway::plan::{ControllerSpec, ControllerType};

use super::DatastoreError;

/// What a .vmx file describes.
#[derive(Debug, Clone)]
pub struct VmxSpec {
    pub name: String,
    pub guest_os: String,
    pub num_cpus: u32,
    pub cores_per_socket: Option<u32>,
    pub memory_mib: u64,
    pub firmware: Option<String>,
    pub bios_uuid: Option<String>,
    pub disks: Vec<VmxDisk>,
    /// The disks' controllers with their types; a controller not listed gets its bus's
    /// default type.
    pub controllers: Vec<ControllerSpec>,
    pub nics: Vec<VmxNic>,
}

#[derive(Debug, Clone)]
pub struct VmxDisk {
    /// Controller slot: `scsi0:1`, `sata0:0`, `nvme0:0` or `ide0:0`.
    pub key: String,
    /// The disk's file in the VM folder: a VMDK descriptor (`web01_1.vmdk`), a qcow2
    /// image (`web01_1.qcow2`) or a raw image (`web01_1.img`).
    pub file_name: String,
}

#[derive(Debug, Clone)]
pub struct VmxNic {
    /// `ethernet0`, ...
    pub key: String,
    /// The cloud network's name.
    pub network_name: String,
    pub virtual_dev: Option<String>,
    /// The MAC address kept from the source; `None` lets the host generate one.
    pub mac: Option<String>,
    /// The source's `addressType` (`static`, `generated`, `vpx`); `None` writes a MAC as
    /// `static` (an OVF names no address type), and no MAC as `generated`.
    pub address_type: Option<String>,
}

/// Splits `scsi0:1` into ("scsi", 0, 1).
pub(crate) fn parse_disk_key(key: &str) -> Result<(&'static str, u32, u32), DatastoreError> {
    let bad = || DatastoreError::BadDeviceKey {
        key: key.to_owned(),
        expected: "disk (scsiN:M, sataN:M, nvmeN:M, ideN:M)",
    };
    let kind = ["scsi", "sata", "nvme", "ide"]
        .into_iter()
        .find(|k| key.starts_with(k))
        .ok_or_else(bad)?;
    let (bus, unit) = key[kind.len()..].split_once(':').ok_or_else(bad)?;
    let number = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|_| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
    };
    Ok((kind, number(bus).ok_or_else(bad)?, number(unit).ok_or_else(bad)?))
}

fn check_nic_key(key: &str) -> Result<(), DatastoreError> {
    match key.strip_prefix("ethernet") {
        Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(DatastoreError::BadDeviceKey {
            key: key.to_owned(),
            expected: "NIC (ethernetN)",
        }),
    }
}

/// A VMX value, quoted, with `"`, `|` and control characters written as `|XX`.
fn vmx_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '|' => {
                let _ = write!(out, "|{:02X}", c as u32);
            }
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "|{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The virtual hardware version of every .vmx the datastore writes.
pub(crate) const VIRTUAL_HW_VERSION: u32 = 14;

pub(super) fn vmx_text(vmx: &VmxSpec) -> Result<String, DatastoreError> {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| lines.push((key.to_owned(), value.to_owned()));
    set(".encoding", "UTF-8");
    set("config.version", "8");
    set("virtualHW.version", &VIRTUAL_HW_VERSION.to_string());
    set("displayName", &vmx.name);
    set("guestOS", &vmx.guest_os);
    set("numvcpus", &vmx.num_cpus.to_string());
    if let Some(cores) = vmx.cores_per_socket {
        set("cpuid.coresPerSocket", &cores.to_string());
    }
    set("memsize", &vmx.memory_mib.to_string());
    if let Some(firmware) = &vmx.firmware {
        set("firmware", firmware);
    }
    if let Some(uuid) = &vmx.bios_uuid {
        set("uuid.bios", uuid);
    }
    let mut controllers: Vec<String> = Vec::new();
    for disk in &vmx.disks {
        let (kind, bus, _) = parse_disk_key(&disk.key)?;
        let controller = format!("{kind}{bus}");
        // IDE controllers are always there; the others are declared once, before their
        // disks, SCSI ones with their type, as the source had it.
        if kind != "ide" && !controllers.contains(&controller) {
            set(&format!("{controller}.present"), "TRUE");
            let declared = vmx.controllers.iter().find(|c| c.key == controller).map(|c| &c.kind);
            let default = match kind {
                "scsi" => ControllerType::LsiLogic,
                _ => ControllerType::Ahci,
            };
            if let Some(dev) = declared.unwrap_or(&default).virtual_dev().filter(|_| kind == "scsi") {
                set(&format!("{controller}.virtualDev"), dev);
            }
            controllers.push(controller);
        }
        let device_type = match kind {
            "scsi" => "scsi-hardDisk",
            "ide" => "ata-hardDisk",
            _ => "disk",
        };
        set(&format!("{}.present", disk.key), "TRUE");
        set(&format!("{}.fileName", disk.key), &disk.file_name);
        set(&format!("{}.deviceType", disk.key), device_type);
    }
    for nic in &vmx.nics {
        check_nic_key(&nic.key)?;
        let key = &nic.key;
        set(&format!("{key}.present"), "TRUE");
        set(&format!("{key}.networkName"), &nic.network_name);
        if let Some(dev) = &nic.virtual_dev {
            set(&format!("{key}.virtualDev"), dev);
        }
        // The MAC under the key its address type reads it from: `address` when static,
        // `generatedAddress` when generated by the host or assigned by vCenter (vpx).
        let address_type = match (&nic.address_type, &nic.mac) {
            (Some(t), _) => t.as_str(),
            (None, Some(_)) => "static",
            (None, None) => "generated",
        };
        set(&format!("{key}.addressType"), address_type);
        if let Some(mac) = &nic.mac {
            let mac_key = if address_type.eq_ignore_ascii_case("static") {
                "address"
            } else {
                "generatedAddress"
            };
            set(&format!("{key}.{mac_key}"), mac);
        }
    }
    Ok(lines.iter().map(|(k, v)| format!("{k} = {}\n", vmx_quote(v))).collect())
}
