//! What the edge agent asks the cloud to build: the VM's identity, hardware,
//! NICs and disks, plus the placement choices. Sent once, on the control stream,
//! before any disk data moves, so the cloud can refuse early and completely.

use serde::{Deserialize, Serialize};

use crate::wire::WireError;

/// Smallest chunk the protocol accepts: smaller chunks cost more per-chunk
/// overhead (hash, frame, ack) than they save in zero detection.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk: bounds the memory one in-flight chunk can take on either side.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Default chunk: fine enough to find the holes of a real file system, coarse
/// enough that compression keeps its ratio (zstd loses <1 % against whole-file).
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Disks per VM: vSphere allows 4 SCSI x 15 + 4 SATA x 30 + 4 NVMe x 15 + 4 IDE.
pub const MAX_DISKS: usize = 256;
/// NICs per VM (vSphere allows 10; leave headroom for other hypervisors).
pub const MAX_NICS: usize = 64;
/// Largest disk the protocol accepts: 64 TiB, vSphere's VMDK limit.
pub const MAX_DISK_BYTES: u64 = 64 << 40;
/// Most chunks one plan may have, all disks together. Each side keeps 33 bytes
/// of state per chunk (hash and flag), so this caps that at ~140 MB per
/// migration: 4 TiB at 1 MiB chunks, 64 TiB at 16 MiB; bigger VMs use bigger
/// chunks (see [`MigrationPlan::fit_chunk_size`]). A receiver allocates it only
/// after the plan passed authentication and the datastore's free-space check.
pub const MAX_CHUNKS: u64 = 1 << 22;

/// The whole request to migrate one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPlan {
    pub vm: VmSpec,
    /// Source network name to cloud network name; source networks not listed
    /// go to the cloud network of the same name.
    pub network_map: Vec<(String, String)>,
    pub chunk_size: u32,
    /// Format of the disks in the cloud datastore; `None` = the datastore's default.
    pub disk_format: Option<DiskFormat>,
    /// The VM's distributed-firewall rules and what of them has no equivalent in
    /// the cloud domain. Empty when the VM came without a rules file.
    pub firewall: FirewallSpec,
    /// Where in the cloud domain the VM goes; every choice left out takes the
    /// domain's default.
    pub placement: Placement,
    /// SHA-256 of the source's .vmx (or OVF descriptor) as the edge read it: the cloud
    /// signs it into the receipt, which then binds this VM, not only its disks' bytes.
    /// `None` for a plan made without a source file (the API's plan check). Last in the
    /// struct: the fields before it kept their encoding (protocol version 6).
    pub source_descriptor_sha256: Option<[u8; 32]>,
    /// A VM the cloud holds (its name or `vm-N` id) that seeds a replication's first
    /// pass (`edge-agent replicate --seed`, protocol version 9): the cloud hashes its
    /// disks at this plan's chunk size if it has not yet, so the chunks they share are
    /// copied inside the cloud instead of sent. Only a VM this user or edge lifted may
    /// seed. Not part of what a resume or a later pass must repeat: it shapes the first
    /// pass's copies, not the VM.
    pub seed: Option<String>,
}

/// Where the cloud puts a migrated VM, vSphere's relocate spec: each object named by
/// its name or its id (`group-v5`, `domain-c7`, `host-12`, `resgroup-8`,
/// `datastore-9`). `None` takes the domain's default; the cloud checks every
/// choice before a byte moves and lists every problem at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VM folder the VM is registered in.
    pub folder: Option<String>,
    pub cluster: Option<String>,
    /// Must be a host of the cluster (the chosen one, or the default).
    pub host: Option<String>,
    /// Must be a resource pool of the cluster; the cluster's root pool by default.
    pub resource_pool: Option<String>,
    /// The VM's datastore: its folder with the .vmx, and every disk not listed below.
    pub datastore: Option<String>,
    /// Disk key (`scsi0:1`) to datastore, for disks that go elsewhere than the VM's.
    pub disk_datastores: Vec<(String, String)>,
}

/// Longest name or id a placement choice may have (vSphere's names are at most 80).
pub const MAX_PLACEMENT_NAME: usize = 256;

impl Placement {
    /// Whether every choice is the domain's default.
    pub fn is_default(&self) -> bool {
        *self == Placement::default()
    }

    /// The datastore chosen for disk `key`, if one was.
    pub fn disk_datastore(&self, key: &str) -> Option<&str> {
        self.disk_datastores
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, ds)| ds.as_str())
    }

    fn check_limits(&self) -> Result<(), WireError> {
        if self.disk_datastores.len() > MAX_DISKS {
            return Err(WireError::BadPlan(format!(
                "{} per-disk datastores is more than the {MAX_DISKS} disks a VM may have",
                self.disk_datastores.len()
            )));
        }
        let names = [
            &self.folder,
            &self.cluster,
            &self.host,
            &self.resource_pool,
            &self.datastore,
        ]
        .into_iter()
        .flatten()
        .chain(self.disk_datastores.iter().flat_map(|(k, ds)| [k, ds]));
        for name in names {
            if name.len() > MAX_PLACEMENT_NAME {
                return Err(WireError::BadPlan(format!(
                    "a placement choice of {} bytes is longer than the {MAX_PLACEMENT_NAME} allowed",
                    name.len()
                )));
            }
        }
        Ok(())
    }
}

/// How the cloud stores a migrated disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    /// vSphere's layout: a monolithicFlat descriptor plus a sparse `-flat.vmdk` extent.
    VmdkFlat,
    /// qcow2 v3, for KVM-based clouds.
    Qcow2,
    /// A sparse raw image.
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::VmdkFlat => "vmdk",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "vmdk" | "vmdkflat" | "vmdk-flat" => Ok(DiskFormat::VmdkFlat),
            "qcow2" => Ok(DiskFormat::Qcow2),
            "raw" => Ok(DiskFormat::Raw),
            _ => Err(format!("disk format `{s}` is not one of vmdk, qcow2, raw")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub guest_os: String,
    pub num_cpus: u32,
    pub cores_per_socket: Option<u32>,
    pub memory_mib: u64,
    pub firmware: Option<String>,
    pub bios_uuid: Option<String>,
    pub nics: Vec<NicSpec>,
    pub disks: Vec<DiskSpec>,
    /// The disk controllers the disks sit on, each with its type, so the copy gets the
    /// controller its boot disk's driver knows (added in protocol version 5). A disk whose
    /// controller is not listed is on that bus's default type (see [`ControllerType::default_for`]).
    /// Optional in the JSON of `POST /api/gateway/plans`, as before version 5.
    #[serde(default)]
    pub controllers: Vec<ControllerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Device key as in the .vmx, e.g. `ethernet0`.
    pub key: String,
    /// The source side's network (port group) name.
    pub network: String,
    pub virtual_dev: Option<String>,
    /// Kept as a static MAC in the cloud unless absent.
    pub mac: Option<String>,
    /// `ethernetN.addressType` as the source wrote it: `static`, `generated` or `vpx`
    /// (added in protocol version 5); `None` when the source did not say.
    pub address_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Device key as in the .vmx, e.g. `scsi0:1`: the disk's position, its controller's
    /// bus and number and its unit on it (see [`DiskSpec::slot`]).
    pub key: String,
    pub capacity: u64,
}

// Controllers and device slots: their own file (plan/hardware.rs).
mod hardware;
pub use hardware::*;

impl DiskSpec {
    /// The disk's slot, parsed from its key; `None` for a key that is no slot.
    pub fn slot(&self) -> Option<Slot> {
        Slot::parse(&self.key)
    }

    /// Number of chunks the disk is cut into.
    pub fn chunk_count(&self, chunk_size: u32) -> u64 {
        self.capacity.div_ceil(u64::from(chunk_size))
    }

    /// Plaintext length of the chunk at `offset` (the last one may be short).
    pub fn chunk_len(&self, chunk_size: u32, offset: u64) -> u32 {
        (self.capacity - offset).min(u64::from(chunk_size)) as u32
    }
}

impl MigrationPlan {
    /// Structural checks every peer must apply before trusting a plan: these
    /// bound what the receiver will allocate. Domain checks (is the name free,
    /// is there space) belong to the cloud endpoint.
    pub fn check_limits(&self) -> Result<(), WireError> {
        let bad = |what: String| Err(WireError::BadPlan(what));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) || !self.chunk_size.is_multiple_of(4096) {
            return bad(format!(
                "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} or not a multiple of 4096",
                self.chunk_size
            ));
        }
        if self.vm.disks.is_empty() {
            return bad("the VM has no disk to migrate".into());
        }
        if self.vm.disks.len() > MAX_DISKS {
            return bad(format!(
                "{} disks is more than the {MAX_DISKS} a VM may have",
                self.vm.disks.len()
            ));
        }
        if self.vm.nics.len() > MAX_NICS {
            return bad(format!(
                "{} NICs is more than the {MAX_NICS} a VM may have",
                self.vm.nics.len()
            ));
        }
        if self.vm.controllers.len() > MAX_DISKS {
            return bad(format!(
                "{} controllers is more than the {MAX_DISKS} disks a VM may have",
                self.vm.controllers.len()
            ));
        }
        for disk in &self.vm.disks {
            if disk.capacity == 0 || disk.capacity > MAX_DISK_BYTES {
                return bad(format!(
                    "disk {} declares {} bytes; a disk must hold 1 byte to 64 TiB",
                    disk.key, disk.capacity
                ));
            }
        }
        self.firewall.check_limits()?;
        self.placement.check_limits()?;
        if let Some(seed) = &self.seed {
            if seed.is_empty() || seed.len() > MAX_PLACEMENT_NAME {
                return bad(format!(
                    "a seed name of {} bytes is outside the 1..={MAX_PLACEMENT_NAME} allowed",
                    seed.len()
                ));
            }
        }
        let chunks = self.chunk_count();
        if chunks > MAX_CHUNKS {
            return bad(format!(
                "{chunks} chunks of {} bytes is more than the {MAX_CHUNKS} one migration may have; use a larger chunk size",
                self.chunk_size
            ));
        }
        Ok(())
    }

    /// Chunks of all disks together.
    pub fn chunk_count(&self) -> u64 {
        self.vm.disks.iter().map(|d| d.chunk_count(self.chunk_size)).sum()
    }

    /// Doubles the chunk size until the plan fits [`MAX_CHUNKS`] (or the size
    /// reaches [`MAX_CHUNK_SIZE`]): a 10 TiB VM goes in 8 MiB chunks.
    pub fn fit_chunk_size(&mut self) {
        while self.chunk_count() > MAX_CHUNKS && self.chunk_size < MAX_CHUNK_SIZE {
            self.chunk_size = (self.chunk_size * 2).min(MAX_CHUNK_SIZE);
        }
    }

    /// Total logical bytes of all disks.
    pub fn logical_bytes(&self) -> u64 {
        self.vm.disks.iter().map(|d| d.capacity).sum()
    }

    /// The cloud network a source network maps to.
    pub fn mapped_network<'a>(&'a self, source: &'a str) -> &'a str {
        self.network_map
            .iter()
            .find(|(from, _)| from == source)
            .map(|(_, to)| to.as_str())
            .unwrap_or(source)
    }
}

// The firewall rules and the migration report: their own file (plan/firewall.rs).
mod firewall;
pub use firewall::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(disks: &[u64], chunk_size: u32) -> MigrationPlan {
        MigrationPlan {
            vm: VmSpec {
                name: "x".into(),
                guest_os: "otherGuest".into(),
                num_cpus: 1,
                cores_per_socket: None,
                memory_mib: 1,
                firmware: None,
                bios_uuid: None,
                nics: vec![],
                controllers: vec![],
                disks: disks
                    .iter()
                    .enumerate()
                    .map(|(i, &capacity)| DiskSpec {
                        key: format!("scsi0:{i}"),
                        capacity,
                    })
                    .collect(),
            },
            network_map: vec![],
            chunk_size,
            disk_format: None,
            firewall: FirewallSpec::default(),
            placement: Placement::default(),
            source_descriptor_sha256: None,
            seed: None,
        }
    }

    #[test]
    fn chunk_counts_are_bounded_and_big_vms_get_bigger_chunks() {
        let mut p = plan(&[10 << 40], DEFAULT_CHUNK_SIZE);
        assert!(p.check_limits().is_err(), "10 TiB in 1 MiB chunks is too many");
        p.fit_chunk_size();
        assert_eq!(p.chunk_size, 4 << 20);
        p.check_limits().unwrap();
        // The worst case a peer can declare stays refused.
        let mut worst = plan(&[MAX_DISK_BYTES; 4], MIN_CHUNK_SIZE);
        assert!(worst.check_limits().is_err());
        worst.fit_chunk_size();
        assert!(worst.check_limits().is_err(), "4 x 64 TiB cannot fit even at 16 MiB");
        assert!(plan(&[0], DEFAULT_CHUNK_SIZE).check_limits().is_err());
        assert!(plan(&[1], 65536 + 1).check_limits().is_err());
    }
}
