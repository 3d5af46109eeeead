//! The OVF descriptor (DMTF DSP0243 1.x and 2.x, as VMware's ovftool writes it): from its XML
//! to the VM's hardware, NICs and disks, and [`open_ovf`] for a descriptor with its files
//! beside it. Reading an OVA (the same files in one tar archive) is in `ova.rs`; checking the
//! files against the manifest in `manifest.rs`.
//!
//! Elements and attributes are matched by local name within the namespaces DSP0243 gives
//! them, whatever prefixes the file uses. Anything the descriptor says that would change the
//! migrated VM and that we cannot honour (compressed or chunked files, delta disks, several
//! VMs, property-sized disks) is refused rather than guessed.

use std::path::{Component, Path, PathBuf};

use super::claim::Role;
use super::disk::{self, Opened};
use super::manifest::{self, Manifest};
use super::{ArchiveMember, SourceDisk, SourceError, SourceNic, SourceOptions, SourceVm};

/// ovftool writes descriptors of a few tens of KiB; this bounds the read and the parse (and,
/// with it, the number of XML nodes; roxmltree also bounds nesting depth).
pub(crate) const DESCRIPTOR_SIZE_LIMIT: u64 = 8 * 1024 * 1024;

/// Where an OVF package's problems are reported: the `.ovf`, or the `.ova` and the
/// descriptor's member name in it.
#[derive(Debug, Clone)]
pub(crate) struct Package {
    /// Absolute path of the `.ovf` or the `.ova`.
    pub path: PathBuf,
    /// For an OVA, the descriptor's member name.
    pub member: Option<String>,
    /// The disks are opened only to name the VM ([`SourceOptions::configuration_only`]):
    /// their digests, sizes and capacities are not checked.
    pub disks_unchecked: bool,
}

impl Package {
    /// "the OVA" or "the OVF package", for advice in messages.
    pub fn kind(&self) -> &'static str {
        package_kind(&self.path)
    }

    /// A problem at `line` of the descriptor (or of the package, without a line).
    pub fn error(&self, line: Option<usize>, message: impl Into<String>) -> SourceError {
        SourceError::BadOvf {
            path: self.path.clone(),
            member: self.member.clone(),
            line,
            message: message.into(),
        }
    }

    fn unsupported(&self, what: impl Into<String>, advice: &str) -> SourceError {
        SourceError::Unsupported {
            path: self.path.clone(),
            what: what.into(),
            advice: advice.to_owned(),
        }
    }
}

/// "the OVA" for a `.ova`, else "the OVF package".
pub(crate) fn package_kind(path: &Path) -> &'static str {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("ova")) {
        "the OVA"
    } else {
        "the OVF package"
    }
}

/// The part of a [`SourceError::BadOvf`] message between the path and the message.
pub(crate) fn location(member: &Option<String>, line: &Option<usize>) -> String {
    match (member, line) {
        (Some(member), Some(line)) => format!(": {member} line {line}"),
        (Some(member), None) => format!(": {member}"),
        (None, Some(line)) => format!(" line {line}"),
        (None, None) => String::new(),
    }
}

/// A `References/File`: one file of the package.
#[derive(Debug, Clone)]
pub(crate) struct FileRef {
    /// `ovf:id`, e.g. "file1".
    pub id: String,
    /// `ovf:href`: the file's name in the package, relative to the descriptor.
    pub href: String,
    /// `ovf:size` in bytes, if given.
    pub size: Option<u64>,
}

/// A disk the descriptor attaches to the VM.
#[derive(Debug, Clone)]
pub(crate) struct DescribedDisk {
    /// The device, e.g. "scsi0:0".
    pub key: String,
    /// `ovf:diskId`.
    pub disk_id: String,
    pub file: FileRef,
    /// `ovf:capacity` times its allocation units, in bytes.
    pub capacity: u64,
    /// Line of the `Disk` element, for messages.
    pub line: usize,
}

/// What a descriptor says about its VM.
#[derive(Debug)]
pub(crate) struct Descriptor {
    /// `VirtualSystem/Name`, else the VirtualSystem's `ovf:id`.
    pub name: Option<String>,
    pub guest_os: String,
    pub num_cpus: u32,
    pub cores_per_socket: Option<u32>,
    pub memory_mib: u64,
    pub firmware: Option<String>,
    pub bios_uuid: Option<String>,
    pub nics: Vec<SourceNic>,
    /// Attached disks, ordered like [`SourceVm::disks`].
    pub disks: Vec<DescribedDisk>,
    /// Every controller's type, by key (`scsi0`).
    pub controller_types: std::collections::HashMap<String, gateway::plan::ControllerType>,
    pub notes: Vec<String>,
    /// SHA-256 of the descriptor's bytes as read (see [`SourceVm::descriptor_sha256`]).
    pub sha256: [u8; 32],
}

/// Opens a `.ovf` whose files lie beside it, verifying them against `<name>.mf` if present.
pub(crate) fn open_ovf(path: &Path, options: &SourceOptions) -> Result<SourceVm, SourceError> {
    let path = std::path::absolute(path).map_err(|source| SourceError::Io {
        path: path.to_owned(),
        action: "resolve the .ovf path",
        source,
    })?;
    let package = Package {
        path: path.clone(),
        member: None,
        disks_unchecked: options.configuration_only,
    };
    let folder = path.parent().unwrap_or(Path::new("/")).to_owned();
    let descriptor_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = read_small_file(&path, DESCRIPTOR_SIZE_LIMIT, "OVF descriptor")?;
    let mut notes = Vec::new();

    let manifest_path = path.with_extension("mf");
    let manifest = match manifest_path.try_exists() {
        Ok(true) => {
            let text = read_small_file(&manifest_path, manifest::SIZE_LIMIT, "manifest (.mf)")?;
            let manifest = Manifest::parse(&manifest_path, None, &text)?;
            // The digest of the bytes about to be parsed, not of the file read again later.
            manifest.check_bytes(&package, &descriptor_name, &bytes)?;
            Some(manifest)
        }
        Ok(false) => {
            notes.push(no_manifest_note());
            None
        }
        Err(source) => {
            return Err(SourceError::Io {
                path: manifest_path,
                action: "look for the manifest",
                source,
            })
        }
    };

    let descriptor = parse(&package, &bytes)?;

    if let Some(manifest) = manifest.as_ref().filter(|_| !package.disks_unchecked) {
        let mut jobs = Vec::new();
        for entry in manifest.entries.iter().filter(|e| e.file != descriptor_name) {
            let file = resolve(&folder, &entry.file)
                .map_err(|message| manifest.error(entry.line, format!("{message}; the manifest cannot name it")))?;
            if !file.try_exists().unwrap_or(false) {
                return Err(package.error(
                    None,
                    format!(
                        "the manifest {} lists {}, which does not exist ({}): {} is incomplete; copy all of its files",
                        manifest.name,
                        entry.file,
                        file.display(),
                        package.kind()
                    ),
                ));
            }
            jobs.push((entry, super::slice::FileSlice::whole(&file)?));
        }
        manifest::verify(&package, manifest, &jobs)?;
        let files = std::iter::once(descriptor_name.as_str()).chain(descriptor_files(&descriptor));
        notes.extend(unlisted_notes(manifest, files));
    }

    let mut disks = Vec::new();
    for described in &descriptor.disks {
        let file = resolve(&folder, &described.file.href)
            .map_err(|message| package.error(Some(described.line), format!("disk {}: {message}", described.key)))?;
        if !file.try_exists().unwrap_or(false) {
            return Err(package.error(
                Some(described.line),
                format!(
                    "disk {} is {} ({}), which does not exist ({}): copy every file of the OVF package next to the .ovf",
                    described.key,
                    described.file.id,
                    described.file.href,
                    file.display()
                ),
            ));
        }
        let opened =
            disk::open_as(&file, open_as(options, &described.key)).map_err(|e| wrap(&package, &described.key, e))?;
        let len = std::fs::metadata(&file).map(|m| m.len()).ok();
        disks.push(attach(&package, described, file, None, len, opened, &mut notes)?);
    }
    Ok(finish(path, descriptor, notes, disks))
}

/// The note for a package without a manifest.
pub(crate) fn no_manifest_note() -> String {
    "the package has no manifest (.mf): its files are not verified against digests".to_owned()
}

/// The hrefs of a descriptor's disks, which are what a manifest must cover.
pub(crate) fn descriptor_files(descriptor: &Descriptor) -> impl Iterator<Item = &str> {
    descriptor.disks.iter().map(|d| d.file.href.as_str())
}

/// Notes for files (the descriptor, the disks) the manifest does not list: they are used
/// unverified.
pub(crate) fn unlisted_notes<'a>(manifest: &Manifest, files: impl Iterator<Item = &'a str>) -> Vec<String> {
    files
        .filter(|file| manifest.entry(file).is_none())
        .map(|file| {
            format!(
                "{file} is not listed in the manifest {}, so it is not verified",
                manifest.name
            )
        })
        .collect()
}

/// How the disk `key` is read: as raw if the operator asked for it.
pub(crate) fn open_as<'a>(options: &SourceOptions, key: &'a str) -> disk::OpenAs<'a> {
    if options.takes_as_raw(key) {
        disk::OpenAs::Raw
    } else {
        disk::OpenAs::Detect(Role::Disk(Some(key)))
    }
}

/// A disk's error, with the disk it happened to.
pub(crate) fn wrap(package: &Package, key: &str, source: SourceError) -> SourceError {
    SourceError::Disk {
        vmx: package.path.clone(),
        key: key.to_owned(),
        source: Box::new(source),
    }
}

/// Checks an opened disk file against the descriptor and makes it a [`SourceDisk`].
/// `len` is the size of the file (or member) holding it, checked against `ovf:size`.
pub(crate) fn attach(
    package: &Package,
    described: &DescribedDisk,
    path: PathBuf,
    archive_member: Option<ArchiveMember>,
    len: Option<u64>,
    opened: Opened,
    notes: &mut Vec<String>,
) -> Result<SourceDisk, SourceError> {
    if package.disks_unchecked {
        return Ok(SourceDisk {
            key: described.key.clone(),
            path,
            capacity: described.capacity,
            format: opened.format,
            archive_member,
            taken_as_raw: false,
        });
    }
    if let (Some(expected), Some(len)) = (described.file.size, len) {
        if expected != len {
            return Err(package.error(
                Some(described.line),
                format!(
                    "disk {}: {} is {len} bytes but the descriptor says {expected} (ovf:size): {} was altered or truncated; download it again",
                    described.key,
                    described.file.href,
                    package.kind()
                ),
            ));
        }
    }
    let actual = opened.reader.capacity();
    if actual != described.capacity {
        return Err(package.error(
            Some(described.line),
            format!(
                "disk {} ({}) holds {actual} bytes but the descriptor gives disk {} a capacity of {} bytes: \
                 the descriptor and the disk file disagree; export the VM again",
                described.key, described.file.href, described.disk_id, described.capacity
            ),
        ));
    }
    notes.extend(opened.warnings.into_iter().map(|w| format!("{}: {w}", described.key)));
    Ok(SourceDisk {
        key: described.key.clone(),
        path,
        capacity: described.capacity,
        format: opened.format,
        archive_member,
        // Set by `open_vm_with`, which knows the operator's options.
        taken_as_raw: false,
    })
}

/// The [`SourceVm`] of a descriptor whose disks are opened.
pub(crate) fn finish(
    path: PathBuf,
    descriptor: Descriptor,
    mut notes: Vec<String>,
    disks: Vec<SourceDisk>,
) -> SourceVm {
    let name = descriptor.name.unwrap_or_else(|| {
        path.file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mut all_notes = descriptor.notes;
    all_notes.append(&mut notes);
    SourceVm {
        vmx_path: path,
        descriptor_sha256: descriptor.sha256,
        name,
        guest_os: descriptor.guest_os,
        num_cpus: descriptor.num_cpus,
        cores_per_socket: descriptor.cores_per_socket,
        memory_mib: descriptor.memory_mib,
        firmware: descriptor.firmware,
        bios_uuid: descriptor.bios_uuid,
        nics: descriptor.nics,
        controllers: super::controllers_of(&disks, |key| {
            descriptor.controller_types.get(key).cloned().unwrap_or_else(|| {
                gateway::plan::ControllerType::default_for(
                    gateway::plan::parse_controller_key(key).map_or(gateway::plan::Bus::Scsi, |(bus, _)| bus),
                )
            })
        }),
        disks,
        notes: all_notes,
        firewall: Default::default(),
    }
}

/// A package file named by `href`, within `folder`. Refuses what could read outside the
/// package: absolute paths, `..`, and URLs (which would also need downloading).
fn resolve(folder: &Path, href: &str) -> Result<PathBuf, String> {
    check_href(href)?;
    let literal = folder.join(href);
    if literal.exists() || !href.contains('%') {
        return Ok(literal);
    }
    // An href is a URI reference: "my%20disk.vmdk" names "my disk.vmdk".
    let decoded = percent_decode(href).ok_or_else(|| format!("{href} is not a valid URI reference"))?;
    check_href(&decoded)?;
    Ok(folder.join(decoded))
}

/// Whether an href names a file inside the package.
pub(crate) fn check_href(href: &str) -> Result<(), String> {
    if href.contains("://") || href.starts_with("file:") {
        return Err(format!(
            "{href} is a URL; download the package's files and name them relative to the descriptor"
        ));
    }
    let path = Path::new(href);
    if href.is_empty()
        || path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "{href:?} is not a file name inside the package (absolute, empty, or with ..)"
        ));
    }
    Ok(())
}

/// `%XX` escapes decoded; `None` if one is malformed or the result is not UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Reads a whole small file, refusing it before reading if it is over `limit`.
pub(crate) fn read_small_file(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>, SourceError> {
    use std::io::Read;
    let (file, len) = disk::open_read_only(path, "open the file")?;
    let too_large = |size| SourceError::TooLarge {
        path: path.to_owned(),
        what,
        size,
        limit,
    };
    if len > limit {
        return Err(too_large(len));
    }
    let mut bytes = Vec::new();
    // Rewind: open_read_only measured the file by seeking to its end.
    let mut file = std::io::BufReader::new(file);
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
        .and_then(|_| file.take(limit + 1).read_to_end(&mut bytes))
        .map_err(|source| SourceError::Io {
            path: path.to_owned(),
            action: "read the file",
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Parses a descriptor's bytes; `package` is only for messages.
pub(crate) fn parse(package: &Package, bytes: &[u8]) -> Result<Descriptor, SourceError> {
    descriptor::parse(package, bytes)
}

mod descriptor;
mod hardware;

#[cfg(test)]
#[path = "ovf_tests.rs"]
pub(crate) mod tests;
