//! Reading a VMware VM from its files: the `.vmx` configuration and the disks it names.
//!
//! [`open_vm`] turns a `.vmx` into a [`SourceVm`] (hardware, NICs, disks with their
//! capacities, and notes on what is not migrated). [`open_disk`] gives a [`DiskReader`] over
//! one disk's logical content, read by offset from several threads at once.
//!
//! Everything here opens files read-only: the source VM is never modified. Sizes read from
//! files (a `.vmx`, a VMDK descriptor, extent sizes) are bounded before anything is allocated
//! from them.
//!
//! A damaged source is refused when it is opened (at `inspect` and `plan`, before anything
//! moves), never read as something else: an extent shorter than its descriptor declares,
//! sparse or qcow2 tables that point past the end of their file (a copy cut short), a file
//! whose bytes are not the format its name claims (see `claim`). Raw is taken only for
//! files that claim it (`.img`, `.raw`, `-flat.vmdk`), block devices, and the disks the
//! operator names ([`SourceOptions::raw_disks`], `--raw-disk`). Damage only reading shows
//! (a corrupt compressed grain, a file cut while it is read) fails the read with
//! `InvalidData` or `UnexpectedEof`, which the migration treats as damage, not as a
//! passing I/O error.
//!
//! Supported: raw images, qcow2 v2/v3 (backing chains flattened; see `qcow2`), VMDK text
//! descriptors with FLAT / VMFS / ZERO extents
//! (monolithicFlat, twoGbMaxExtentFlat, vmfs), sparse VMDKs (monolithicSparse,
//! twoGbMaxExtentSparse, streamOptimized; see `vmdk_sparse`) and VMDK snapshot chains
//! (SPARSE, VMFSSPARSE and SESPARSE deltas, flattened; see `vmdk_chain`). Refused with a "not
//! supported yet" error: raw device mappings, VHD, VHDX and VDI.

mod claim;
mod disk;
pub mod firewall;
pub mod fuzzing;
pub mod last_written;
mod manifest;
mod ova;
mod ovf;
mod qcow2;
pub use qcow2::BackupImage;
pub mod slice;
pub mod snapshot_tracking;
mod vm;
mod vmdk;
mod vmdk_chain;
mod vmdk_sparse;
mod vmx;

#[cfg(test)]
mod damaged_tests;
#[cfg(test)]
mod testutil;

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Everything that can go wrong while reading a source VM.
///
/// Each message names the file, says what is wrong and what to do about it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A file could not be opened, inspected or read.
    #[error(
        "{}: cannot {action}: {source}; check that the path is right and that the agent may read it",
        path.display()
    )]
    Io {
        path: PathBuf,
        /// What was being done, e.g. "open the .vmx file".
        action: &'static str,
        #[source]
        source: io::Error,
    },

    /// A file is bigger than anything of its kind can reasonably be.
    #[error(
        "{}: {size} bytes is too large for a {what} (limit {limit} bytes); check that the path names a {what}",
        path.display()
    )]
    TooLarge {
        path: PathBuf,
        /// What the file should be, e.g. ".vmx file".
        what: &'static str,
        size: u64,
        limit: u64,
    },

    /// The file given as a `.vmx` is not a VMware configuration file at all.
    #[error("{}: not a VMware .vmx file ({reason}); pass the VM's .vmx configuration file", path.display())]
    NotVmx { path: PathBuf, reason: String },

    /// A `.vmx` line that is not `key = "value"`.
    #[error("{} line {line}: {message}", path.display())]
    VmxSyntax {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A `.vmx` value of the wrong form, e.g. `numvcpus = "two"`.
    #[error("{} line {line}: {key} = \"{value}\" {problem}", path.display())]
    VmxValue {
        path: PathBuf,
        line: usize,
        key: String,
        value: String,
        /// What is wrong and what is expected.
        problem: String,
    },

    /// A present NIC without a `networkName`, so there is nothing to map it to.
    #[error(
        "{}: {nic} has no networkName{detail}; add `{nic}.networkName = \"...\"` naming its network, \
         or mark it `{nic}.present = \"FALSE\"` to leave it out",
        path.display()
    )]
    NicWithoutNetwork {
        path: PathBuf,
        nic: String,
        /// What the NIC is connected to instead, if the `.vmx` says, e.g. " (connectionType nat)".
        detail: String,
    },

    /// A present disk whose file does not exist.
    #[error(
        "{}: disk {key} points to {file_name}, which does not exist ({}): restore the file or mark the disk `present = \"FALSE\"`",
        vmx.display(),
        resolved.display()
    )]
    DiskMissing {
        vmx: PathBuf,
        key: String,
        /// The `fileName` as written in the `.vmx`.
        file_name: String,
        resolved: PathBuf,
    },

    /// A device explicitly present but without a `fileName`.
    #[error(
        "{}: disk {key} has present = \"TRUE\" but no fileName; add `{key}.fileName` or mark the disk `present = \"FALSE\"`",
        vmx.display()
    )]
    DiskWithoutFile { vmx: PathBuf, key: String },

    /// A disk of the VM could not be opened; `source` says why.
    #[error("{}: disk {key}: {source}", vmx.display())]
    Disk {
        vmx: PathBuf,
        key: String,
        #[source]
        source: Box<SourceError>,
    },

    /// A disk image of zero bytes.
    #[error(
        "{}: empty disk image (0 bytes); check that the copy of the VM is complete, or remove the disk from the .vmx",
        path.display()
    )]
    EmptyImage { path: PathBuf },

    /// A disk format (or VMDK variant) that this version cannot read.
    #[error("{}: {what} is not supported yet; {advice}", path.display())]
    Unsupported {
        path: PathBuf,
        /// The format, e.g. "VMDK with SPARSE extents (monolithicSparse)".
        what: String,
        /// How to get a supported format.
        advice: String,
    },

    /// A VMDK descriptor that cannot be parsed or describes an impossible disk.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    BadDescriptor {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },

    /// A disk image whose structure is damaged or impossible, e.g. qcow2 tables past the end
    /// of the file.
    #[error("{}: {message}", path.display())]
    BadImage { path: PathBuf, message: String },

    /// The backing file of an image (a qcow2 backing chain) could not be opened.
    #[error("{}: backing file `{backing}`: {source}", path.display())]
    Backing {
        path: PathBuf,
        /// The backing file name as the image records it.
        backing: String,
        #[source]
        source: Box<SourceError>,
    },

    /// An OVF descriptor, manifest or OVA archive that cannot be parsed, describes an
    /// impossible VM, or does not match the package's files.
    #[error("{}{}: {message}", path.display(), ovf::location(member, line))]
    BadOvf {
        /// The `.ovf` (or `.mf`), or the `.ova` holding it.
        path: PathBuf,
        /// For an OVA, the member at fault, e.g. `web01.ovf`.
        member: Option<String>,
        line: Option<usize>,
        message: String,
    },

    /// A file of an OVF package whose digest is not the one its manifest (`.mf`) lists.
    #[error(
        "{}: {file} does not match the manifest: its {algorithm} digest is {actual}, the manifest \
         says {expected}; {} was altered or truncated; download it again",
        path.display(),
        ovf::package_kind(path)
    )]
    ManifestMismatch {
        /// The `.ovf` or `.ova`.
        path: PathBuf,
        /// The file's name in the package.
        file: String,
        /// "SHA256", "SHA1" or "SHA512".
        algorithm: &'static str,
        expected: String,
        actual: String,
    },

    /// A firewall rules file that cannot be used.
    #[error(
        "{}{}: {message}; see the rules file format in the README (\"Firewall rules\")",
        path.display(),
        rule.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
    )]
    Firewall {
        path: PathBuf,
        /// The rule (or group, IP set, section entry) at fault, e.g. `rule #2 "ssh"`.
        rule: Option<String>,
        message: String,
    },

    /// A disk file whose bytes are not the format its name claims, or that shows no format
    /// and does not claim to be raw (see `claim`).
    #[error("{}: {problem}; {advice}", path.display())]
    NotItsFormat {
        path: PathBuf,
        /// What the name claims and what the bytes are.
        problem: String,
        /// Restore the file, or take it as raw with `--raw-disk`.
        advice: String,
    },

    /// An extent file that holds less of the disk than its descriptor declares: a copy cut
    /// short. Read on, its missing part would arrive in the cloud as zeros.
    #[error(
        "{}: extent {} {holds}, but line {line} of the descriptor declares {declared} bytes: \
         the extent is cut short (an incomplete copy?); copy it again from the source datastore",
        descriptor.display(),
        extent.display()
    )]
    ExtentShort {
        descriptor: PathBuf,
        line: usize,
        extent: PathBuf,
        /// What the file holds, e.g. "is 1048576 bytes".
        holds: String,
        declared: u64,
    },

    /// The operator named a disk (`--raw-disk KEY`) that the VM does not have.
    #[error(
        "{}: --raw-disk {key}: the VM has no disk {key} (its disks: {disks}); name a disk as \
         `edge-agent inspect` shows it",
        path.display()
    )]
    NoSuchDisk { path: PathBuf, key: String, disks: String },

    /// A VMDK extent file named by a descriptor does not exist.
    #[error(
        "{}: extent {file_name} does not exist ({}); copy all of the disk's extent files next to the descriptor",
        descriptor.display(),
        resolved.display()
    )]
    ExtentMissing {
        descriptor: PathBuf,
        /// The file name as written in the descriptor.
        file_name: String,
        resolved: PathBuf,
    },
}

/// A VM as described by its `.vmx`, with every disk it will migrate opened and measured.
#[derive(Debug, Clone)]
pub struct SourceVm {
    /// Absolute path of the `.vmx` (or the `.ovf` / `.ova`).
    pub vmx_path: PathBuf,
    /// SHA-256 of the `.vmx` (or of the OVF descriptor, also inside an `.ova`) as read:
    /// the plan carries it and the receipt signs it, so a receipt names this VM's
    /// configuration and not only its disks' bytes.
    pub descriptor_sha256: [u8; 32],
    /// `displayName`; if absent, the `.vmx` file stem.
    pub name: String,
    /// `guestOS`, default "otherGuest".
    pub guest_os: String,
    /// `numvcpus`, default 1.
    pub num_cpus: u32,
    /// `cpuid.coresPerSocket`.
    pub cores_per_socket: Option<u32>,
    /// `memsize`; if absent, 256 (VMware's own default) and a note says so.
    pub memory_mib: u64,
    /// `firmware`, lower-cased: "bios" or "efi".
    pub firmware: Option<String>,
    /// `uuid.bios` as written.
    pub bios_uuid: Option<String>,
    /// Present NICs, ordered by N of ethernetN.
    pub nics: Vec<SourceNic>,
    /// Present disks, ordered: scsi, sata, nvme, ide; then bus number, then unit number.
    pub disks: Vec<SourceDisk>,
    /// The controllers the disks sit on, with their types, in key order: `scsiN.virtualDev`
    /// (or the OVF controller's ResourceSubType); SATA, NVMe and IDE have one type each.
    pub controllers: Vec<gateway::plan::ControllerSpec>,
    /// What was skipped or assumed, and why, e.g. "ide1:0 is a CD-ROM (cdrom-image), not migrated".
    pub notes: Vec<String>,
    /// Distributed-firewall rules from `<stem>.dfw.json` next to the VM file (see
    /// [`firewall`]); empty without one.
    pub firewall: gateway::plan::FirewallSpec,
}

/// A virtual NIC (`ethernetN`).
#[derive(Debug, Clone)]
pub struct SourceNic {
    /// "ethernet0".
    pub key: String,
    /// `networkName`: the port group the NIC is connected to.
    pub network: String,
    /// `virtualDev`, e.g. "vmxnet3", "e1000e".
    pub virtual_dev: Option<String>,
    /// `addressType`: "static", "generated" or "vpx".
    pub address_type: Option<String>,
    /// `address` if addressType is static, else `generatedAddress`; as written.
    pub mac: Option<String>,
}

/// A virtual disk that will be migrated.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// The device, e.g. "scsi0:0".
    pub key: String,
    /// Absolute path: `fileName` resolved against the `.vmx`'s folder.
    pub path: PathBuf,
    /// Logical size in bytes.
    pub capacity: u64,
    pub format: DiskFormat,
    /// Set when the disk is a member of an archive (an OVA) rather than a file of its own:
    /// `path` is then the archive and the disk is read in place.
    pub archive_member: Option<ArchiveMember>,
    /// The operator asked for this disk to be read as a raw image (`--raw-disk`), whatever
    /// its name or first bytes say.
    pub taken_as_raw: bool,
}

/// How the operator wants source disks read, beyond what their files show.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Disks, by key (`scsi0:0`), read as raw images whatever their name or first bytes say
    /// (`--raw-disk`). Without it, a file whose bytes show no known format is read as raw
    /// only if its name says raw (`.img`, `.raw`, `-flat.vmdk`) or it is a block device.
    pub raw_disks: Vec<String>,
    /// Open only what names the VM: every disk is taken as a raw file without reading its
    /// format, and an OVF package's disks are not checked against its manifest or
    /// descriptor. For `edge-agent abort`, which needs the VM's name, not its disks, and
    /// must work on a source that was damaged since the migration started.
    pub configuration_only: bool,
}

impl SourceOptions {
    fn takes_as_raw(&self, key: &str) -> bool {
        self.configuration_only || self.raw_disks.iter().any(|k| k == key)
    }
}

/// Where a disk lies inside an archive file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveMember {
    /// The member's name in the archive, e.g. `web01-disk1.vmdk`.
    pub name: String,
    /// Byte offset of the member's data in the archive, and its length.
    pub offset: u64,
    pub len: u64,
}

/// How a disk's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A plain image: the file's bytes are the disk's bytes.
    Raw,
    /// A VMDK text descriptor with FLAT / VMFS (and ZERO) extents: monolithicFlat,
    /// twoGbMaxExtentFlat, vmfs.
    VmdkFlat,
    /// A hosted sparse VMDK ("KDMV": monolithicSparse, twoGbMaxExtentSparse) or a chain of
    /// snapshot deltas, read as one flattened disk.
    VmdkSparse,
    /// A streamOptimized VMDK (compressed grains; the OVA format).
    VmdkStreamOptimized,
    /// qcow2 v2/v3, with its backing chain flattened.
    Qcow2,
}

/// Parses the `.vmx` (or the OVF descriptor of a `.ovf` or `.ova`, after checking the
/// package's manifest), opens every disk to learn its capacity, validates everything.
/// Opens files read-only; never modifies anything.
/// Reads the firewall rules file next to the VM file, if there is one.
pub fn open_vm(vmx: &Path) -> Result<SourceVm, SourceError> {
    open_vm_with(vmx, &SourceOptions::default())
}

/// [`open_vm`], reading the disks `options` names as raw images.
pub fn open_vm_with(vmx: &Path, options: &SourceOptions) -> Result<SourceVm, SourceError> {
    let extension = vmx.extension().map(|e| e.to_ascii_lowercase());
    let mut vm = match extension.as_ref().and_then(|e| e.to_str()) {
        Some("ovf") => ovf::open_ovf(vmx, options),
        Some("ova") => ova::open_ova(vmx, options),
        _ => vm::open_vm(vmx, options),
    }?;
    // A key that names no disk is a typo that would otherwise go unnoticed until the
    // disk it meant is refused.
    if let Some(key) = options
        .raw_disks
        .iter()
        .find(|key| !vm.disks.iter().any(|d| &d.key == *key))
    {
        let disks: Vec<&str> = vm.disks.iter().map(|d| d.key.as_str()).collect();
        return Err(SourceError::NoSuchDisk {
            path: vm.vmx_path.clone(),
            key: key.clone(),
            disks: if disks.is_empty() {
                "none".to_owned()
            } else {
                disks.join(", ")
            },
        });
    }
    for disk in &mut vm.disks {
        if options.raw_disks.contains(&disk.key) {
            disk.taken_as_raw = true;
            vm.notes.push(format!(
                "{} is read as a raw image, as --raw-disk {} asks, whatever its name or first bytes say",
                disk.key, disk.key
            ));
        }
    }
    vm.firewall = firewall::find(&vm.vmx_path, &vm.name)?;
    Ok(vm)
}

/// The controllers `disks` sit on, in key order, each with the type `kind_of` gives it.
pub(crate) fn controllers_of(
    disks: &[SourceDisk],
    mut kind_of: impl FnMut(&str) -> gateway::plan::ControllerType,
) -> Vec<gateway::plan::ControllerSpec> {
    let keys: std::collections::BTreeSet<(gateway::plan::Bus, u32)> = disks
        .iter()
        .filter_map(|d| gateway::plan::Slot::parse(&d.key))
        .map(|s| (s.bus, s.controller))
        .collect();
    keys.into_iter()
        .map(|(bus, n)| {
            let key = format!("{}{n}", bus.prefix());
            gateway::plan::ControllerSpec {
                kind: kind_of(&key),
                key,
            }
        })
        .collect()
}

/// A disk's logical content, read by offset.
///
/// Implementations use positional reads, so several threads can read one disk at once.
pub trait DiskReader: Send + Sync + std::fmt::Debug {
    /// Logical size in bytes.
    fn capacity(&self) -> u64;

    /// Fills `buf` with the bytes at `[offset, offset + buf.len())`; that range must lie within
    /// capacity. Bytes past the end of a backing file that is shorter than its extent read as
    /// zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// True if `[offset, offset + len)` is known to read as zeros without reading it: a
    /// hole of a sparse file or a ZERO extent. `false` means "data, or unknown": read it.
    /// Lets the agent skip the unallocated part of a disk at the cost of a seek.
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// The length of the run of holes (see [`Self::is_hole`]) that starts at `offset`, up to
    /// `max` bytes: 0 when `offset` holds data or nothing is known. Found `step` bytes at a
    /// time (a chunk) unless the reader knows better: a sparse file tells a whole run with
    /// one `lseek(SEEK_DATA)`, where asking chunk by chunk cost a seek (and a blocking
    /// task of the agent) per chunk of a mostly empty disk.
    fn hole_run(&self, offset: u64, max: u64, step: u64) -> u64 {
        let mut run = 0;
        while run < max {
            let len = step.max(1).min(max - run);
            if !self.is_hole(offset + run, len) {
                break;
            }
            run += len;
        }
        run
    }

    /// The VMDK snapshot chain this disk reads through, newest first: each delta and, last,
    /// its base. Empty for a disk that is not a VMDK delta or sparse VMDK.
    fn snapshot_chain(&self) -> Vec<ChainLink> {
        Vec::new()
    }

    /// The byte ranges the newest disk of the chain holds itself (a snapshot delta's
    /// allocated and zero grains), sorted: exactly what the VM wrote while that delta was
    /// its newest. `None` for a disk that is not a snapshot delta.
    fn written_by_newest(&self) -> Option<io::Result<Vec<Range<u64>>>> {
        None
    }
}

/// One disk of a VMDK snapshot chain, as it was when the chain was opened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainLink {
    /// Canonical path of the disk's descriptor (or hosted sparse file).
    pub path: PathBuf,
    /// Its content ID: VMware gives a disk a new one when it is first written after
    /// being opened, so an unchanged CID means an unchanged disk.
    pub cid: Option<String>,
}

/// Whether `file` holds no data in `[offset, offset + len)`, asked of the file system
/// with `SEEK_DATA`. Any error (a file system or device without hole support) says no.
pub(crate) fn file_range_is_hole(file: &std::fs::File, offset: u64, len: u64) -> bool {
    file_hole_run(file, offset, len) >= len
}

/// How many bytes from `offset` on (up to `max`) `file` holds no data, asked of the file
/// system with one `SEEK_DATA`. Any error (a file system or device without hole support)
/// says none.
pub(crate) fn file_hole_run(file: &std::fs::File, offset: u64, max: u64) -> u64 {
    use nix::unistd::{lseek, Whence};
    let Ok(start) = i64::try_from(offset) else {
        return 0;
    };
    match lseek(file, start, Whence::SeekData) {
        Ok(data) => u64::try_from(data).map_or(0, |d| d.saturating_sub(offset).min(max)),
        // ENXIO: no data at or after `offset`.
        Err(nix::errno::Errno::ENXIO) => max,
        Err(_) => 0,
    }
}

/// Opens a disk file: a raw image, a qcow2 image (with its backing chain), or a VMDK text
/// descriptor (a small text file starting with "# Disk DescriptorFile") whose extents are
/// FLAT, VMFS or ZERO.
///
/// Also hosted sparse and streamOptimized VMDKs ("KDMV"), and VMDK snapshot deltas
/// (parentFileNameHint), read with their parents as one flattened disk.
///
/// Refuses with [`SourceError::Unsupported`]: raw device mappings, VHD, VHDX and VDI images;
/// encrypted qcow2 images; SEsparse deltas with an unreplayed journal.
pub fn open_disk(path: &Path) -> Result<Box<dyn DiskReader>, SourceError> {
    disk::open(path).map(|opened| opened.reader)
}

/// Opens a disk of a [`SourceVm`] for reading: its own file, or its member of an archive;
/// as a raw image if the operator asked for that when the VM was opened.
pub fn open_source_disk(disk: &SourceDisk) -> Result<Box<dyn DiskReader>, SourceError> {
    let open_as = if disk.taken_as_raw {
        disk::OpenAs::Raw
    } else {
        disk::OpenAs::Detect(claim::Role::Disk(Some(&disk.key)))
    };
    match &disk.archive_member {
        None => disk::open_as(&disk.path, open_as),
        Some(member) => disk::open_member(&disk.path, member, open_as),
    }
    .map(|opened| opened.reader)
}

/// Checks that `[offset, offset + len)` lies within `capacity`, as [`DiskReader::read_at`] requires.
fn check_range(capacity: u64, offset: u64, len: usize) -> io::Result<()> {
    let fits = u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .is_some_and(|end| end <= capacity);
    if fits {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("read of {len} bytes at offset {offset} goes past the disk's capacity of {capacity} bytes"),
        ))
    }
}

/// The lock a running VMware VM holds on its files, if one is there: Workstation and
/// Fusion keep a `<name>.vmx.lck` folder beside the .vmx while the VM runs, ESXi a
/// `.lck-<id>` file beside the .vmx and each disk. A switchover refuses to finish while
/// one exists: the source would go on writing after its last pass.
pub fn running_lock(vm: &SourceVm) -> Option<PathBuf> {
    let mut files = vec![vm.vmx_path.clone()];
    files.extend(
        vm.disks
            .iter()
            .filter(|d| d.archive_member.is_none())
            .map(|d| d.path.clone()),
    );
    for file in files {
        let mut workstation = file.clone().into_os_string();
        workstation.push(".lck");
        let workstation = PathBuf::from(workstation);
        if workstation.exists() {
            return Some(workstation);
        }
        // ESXi names its locks after the files' inodes, not their names: any lock in
        // the folder of a file of this VM counts.
        let locks = file.parent().and_then(|dir| std::fs::read_dir(dir).ok());
        for entry in locks.into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".lck-") {
                return Some(entry.path());
            }
        }
    }
    None
}
