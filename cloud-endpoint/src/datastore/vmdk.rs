//! vSphere's disk layout: a monolithicFlat descriptor naming one raw, sparse extent. The
//! extent is written like a raw image (see [`super::disk`]); this is the descriptor.

use gateway::plan::ControllerType;

use super::vmx::parse_disk_key;
use super::{DatastoreError, SECTOR};

/// The descriptor of a `capacity`-byte (a multiple of 512) extent named `flat`, for a disk
/// in slot `controller_key` of a `controller`. The geometry follows the bus as VMware and
/// qemu-img compute it: IDE disks get 16 heads, all others 255; 63 sectors per track;
/// cylinders capped at 65535.
///
/// `ddb.adapterType` takes one of the four values the VMDK format defines (ide, buslogic,
/// lsilogic, legacyESX), which every reader (qemu-img, ovftool, VDDK) accepts: `ide` on
/// IDE, `buslogic` on BusLogic, and `lsilogic` on the others (pvscsi, LSI Logic SAS,
/// SATA, NVMe), as ESXi writes for them: the descriptor's adapter type only picks a
/// geometry and a default controller when the disk is attached anew; the .vmx says which
/// controller the disk is on.
pub(super) fn descriptor_text(
    capacity: u64,
    controller_key: &str,
    controller: &ControllerType,
    flat: &str,
) -> Result<String, DatastoreError> {
    // Not is_multiple_of: the workspace's rust-version is 1.85.
    let partial_sector = capacity % SECTOR;
    if partial_sector != 0 {
        return Err(DatastoreError::UnalignedCapacity { capacity });
    }
    let (kind, _, _) = parse_disk_key(controller_key)?;
    let (adapter, heads) = match (kind, controller) {
        ("ide", _) => ("ide", 16),
        (_, ControllerType::BusLogic) => ("buslogic", 255),
        _ => ("lsilogic", 255),
    };
    let sectors = capacity / SECTOR;
    let cylinders = (sectors / (heads * 63)).min(65535);
    let cid: u32 = loop {
        // ffffffff means "no parent" in parentCID; keep the CID clear of it.
        let cid = rand::random::<u32>();
        if cid != u32::MAX {
            break cid;
        }
    };
    let long_id: [u8; 12] = rand::random();
    let uuid: [u8; 16] = rand::random();
    let long_id: String = long_id.iter().map(|b| format!("{b:02x}")).collect();
    let uuid: Vec<String> = uuid.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         encoding=\"UTF-8\"\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\
         \n\
         # Extent description\n\
         RW {sectors} FLAT \"{flat}\" 0\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.adapterType = \"{adapter}\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.longContentID = \"{long_id}{cid:08x}\"\n\
         ddb.uuid = \"{}\"\n\
         ddb.virtualHWVersion = \"14\"\n",
        uuid.join(" ")
    ))
}
