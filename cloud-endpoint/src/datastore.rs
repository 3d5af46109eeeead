//! The files of the cloud datastore, laid out as on a vSphere datastore:
//!
//! ```text
//! <root>/web01/web01.vmx
//! <root>/web01/web01.vmdk          descriptor of disk 0 (monolithicFlat)
//! <root>/web01/web01-flat.vmdk     its extent: raw, sparse
//! <root>/web01/web01_1.vmdk        disk 1, and so on
//! <root>/.staging/migration-7/     a migration in flight
//! ```
//!
//! A migration writes into its own staging folder; [`Staging::commit`] syncs it and renames
//! it into place in one step, so a VM folder is either whole or absent. Nothing is deleted
//! implicitly: dropping a [`Staging`] leaves its folder (call [`Staging::discard`]), and
//! [`Datastore::clean_staging`] removes what a restart left behind.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

const STAGING: &str = ".staging";
const SECTOR: u64 = 512;

/// Everything that can go wrong with datastore files. I/O errors name the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatastoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "create folder".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("VM name {name:?} cannot name a datastore folder: {rule}")]
    BadVmName { name: String, rule: &'static str },

    #[error("datastore name {name:?} is not usable: {rule}")]
    BadDatastoreName { name: String, rule: &'static str },

    #[error("migration id {id:?} cannot name a staging folder: {rule}")]
    BadMigrationId { id: String, rule: &'static str },

    #[error("the datastore already has a folder {}; the migrated files stay in {} until discarded", path.display(), staging.display())]
    VmFolderExists { path: PathBuf, staging: PathBuf },

    #[error("staging folder {} already exists; a migration id was reused, or a previous run left it (restart to clean .staging)", path.display())]
    StagingExists { path: PathBuf },

    #[error("disk capacity {capacity} bytes is not a multiple of 512; round it up to whole sectors")]
    UnalignedCapacity { capacity: u64 },

    #[error("device key {key:?} is not a VMX {expected} key")]
    BadDeviceKey { key: String, expected: &'static str },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DatastoreError + 'a {
    move |source| DatastoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The cloud datastore's folder.
#[derive(Debug, Clone)]
pub struct Datastore {
    root: PathBuf,
    name: String,
    capacity: Option<u64>,
}

impl Datastore {
    /// Opens the datastore at `root`, creating `root` and `root/.staging` if needed.
    /// `capacity` is a quota for [`Datastore::free_bytes`]; `None` = the filesystem's size.
    pub fn open(root: &Path, name: &str, capacity: Option<u64>) -> Result<Datastore, DatastoreError> {
        let rule = if name.is_empty() {
            Some("it is empty")
        } else if name.contains(['[', ']']) {
            Some("datastore paths put it in brackets, so it cannot contain '[' or ']'")
        } else if name.chars().any(char::is_control) {
            Some("it contains a control character")
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(DatastoreError::BadDatastoreName {
                name: name.to_owned(),
                rule,
            });
        }
        let staging = root.join(STAGING);
        fs::create_dir_all(&staging).map_err(io_err("create folder", &staging))?;
        Ok(Datastore {
            root: root.to_owned(),
            name: name.to_owned(),
            capacity,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes free for new disks: the filesystem's free space for unprivileged users and,
    /// with a configured capacity, `capacity - used`; the smaller of the two.
    pub fn free_bytes(&self, used: u64) -> Result<u64, DatastoreError> {
        let stat = nix::sys::statvfs::statvfs(&self.root).map_err(|errno| DatastoreError::Io {
            action: "read the free space of",
            path: self.root.clone(),
            source: io::Error::from(errno),
        })?;
        // The field types differ between platforms (u32 or u64).
        #[allow(clippy::unnecessary_cast)]
        let fs_free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
        Ok(match self.capacity {
            Some(capacity) => fs_free.min(capacity.saturating_sub(used)),
            None => fs_free,
        })
    }

    /// Checks that `name` can be a VM folder: 1 to 80 characters, no '/', '\\', '"' (it
    /// would end a quoted name in a VMDK descriptor), NUL or other control characters,
    /// not starting with '.' (hidden; also rules out "." and "..").
    pub fn check_vm_name(name: &str) -> Result<(), DatastoreError> {
        let rule = match name.chars().count() {
            0 => Some("it is empty"),
            81.. => Some("it is longer than 80 characters"),
            _ if name.contains('/') => Some("it contains '/'"),
            _ if name.contains('\\') => Some("it contains '\\'"),
            _ if name.contains('\0') => Some("it contains a NUL character"),
            _ if name.chars().any(char::is_control) => Some("it contains a control character"),
            _ if name.contains('"') => Some("it contains '\"', which VMDK descriptors cannot quote"),
            _ if name == "." || name == ".." => Some("it is \".\" or \"..\""),
            _ if name.starts_with('.') => Some("it starts with '.'"),
            _ => None,
        };
        match rule {
            Some(rule) => Err(DatastoreError::BadVmName {
                name: name.to_owned(),
                rule,
            }),
            None => Ok(()),
        }
    }

    /// Whether the datastore has a folder (or file) for `vm_name`. False for a name that
    /// [`Datastore::check_vm_name`] rejects.
    pub fn vm_dir_exists(&self, vm_name: &str) -> bool {
        Datastore::check_vm_name(vm_name).is_ok() && fs::symlink_metadata(self.root.join(vm_name)).is_ok()
    }

    /// Creates a fresh `root/.staging/<migration_id>/` for the files of `vm_name`.
    pub fn stage(&self, migration_id: &str, vm_name: &str) -> Result<Staging, DatastoreError> {
        Datastore::check_vm_name(vm_name)?;
        if let Err(DatastoreError::BadVmName { rule, .. }) = Datastore::check_vm_name(migration_id) {
            return Err(DatastoreError::BadMigrationId {
                id: migration_id.to_owned(),
                rule,
            });
        }
        let staging = self.root.join(STAGING);
        fs::create_dir_all(&staging).map_err(io_err("create folder", &staging))?;
        let dir = staging.join(migration_id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(DatastoreError::StagingExists { path: dir })
            }
            Err(e) => return Err(io_err("create folder", &dir)(e)),
        }
        Ok(Staging {
            dir,
            root: self.root.clone(),
            vm_name: vm_name.to_owned(),
        })
    }

    /// Removes everything under `.staging` (migrations cut by a restart); returns what was
    /// removed.
    pub fn clean_staging(&self) -> Result<Vec<PathBuf>, DatastoreError> {
        let staging = self.root.join(STAGING);
        fs::create_dir_all(&staging).map_err(io_err("create folder", &staging))?;
        let mut removed = Vec::new();
        for entry in fs::read_dir(&staging).map_err(io_err("list", &staging))? {
            let entry = entry.map_err(io_err("list", &staging))?;
            let path = entry.path();
            let is_dir = entry.file_type().map_err(io_err("inspect", &path))?.is_dir();
            if is_dir {
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            } else {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
            }
            removed.push(path);
        }
        removed.sort();
        Ok(removed)
    }
}

/// `[datastore] folder/file`, the form vSphere names datastore files by.
pub fn datastore_path(datastore: &str, vm_name: &str, file: &str) -> String {
    format!("[{datastore}] {vm_name}/{file}")
}

/// The staging folder of one migration. Dropping it leaves the folder on disk: call
/// [`Staging::commit`] or [`Staging::discard`].
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    root: PathBuf,
    vm_name: String,
}

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
    pub nics: Vec<VmxNic>,
}

#[derive(Debug, Clone)]
pub struct VmxDisk {
    /// Controller slot: `scsi0:1`, `sata0:0`, `nvme0:0` or `ide0:0`.
    pub key: String,
    /// The descriptor's file name in the VM folder, e.g. `web01_1.vmdk`.
    pub file_name: String,
}

#[derive(Debug, Clone)]
pub struct VmxNic {
    /// `ethernet0`, ...
    pub key: String,
    /// The cloud network's name.
    pub network_name: String,
    pub virtual_dev: Option<String>,
    /// A MAC address kept from the source (static); `None` lets the host generate one.
    pub mac: Option<String>,
}

impl Staging {
    /// vSphere's names: disk 0 is `<vm>.vmdk` + `<vm>-flat.vmdk`, disk i is `<vm>_<i>.vmdk`
    /// + `<vm>_<i>-flat.vmdk`. Returns (descriptor, flat extent).
    pub fn disk_file_names(vm_name: &str, index: usize) -> (String, String) {
        let base = match index {
            0 => vm_name.to_owned(),
            i => format!("{vm_name}_{i}"),
        };
        (format!("{base}.vmdk"), format!("{base}-flat.vmdk"))
    }

    /// The staging folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM the staged files are for.
    pub fn vm_name(&self) -> &str {
        &self.vm_name
    }

    /// Creates disk `index`'s flat extent, `capacity` bytes long and sparse (holes read as
    /// zeros, so only written blocks take space), and returns it open for reading and
    /// positional writes.
    pub fn create_disk(&self, index: usize, capacity: u64) -> Result<File, DatastoreError> {
        let (_, flat) = Staging::disk_file_names(&self.vm_name, index);
        let path = self.dir.join(flat);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create disk file", &path))?;
        file.set_len(capacity).map_err(io_err("size disk file", &path))?;
        Ok(file)
    }

    /// Writes disk `index`'s monolithicFlat descriptor for a `capacity`-byte extent
    /// (a multiple of 512). The adapter type and geometry follow the controller of
    /// `controller_key` as VMware and qemu-img compute them: IDE disks get 16 heads,
    /// all others 255; 63 sectors per track; cylinders capped at 65535.
    pub fn write_descriptor(&self, index: usize, capacity: u64, controller_key: &str) -> Result<(), DatastoreError> {
        // Not is_multiple_of: the workspace's rust-version is 1.85.
        let partial_sector = capacity % SECTOR;
        if partial_sector != 0 {
            return Err(DatastoreError::UnalignedCapacity { capacity });
        }
        let (kind, _, _) = parse_disk_key(controller_key)?;
        let (adapter, heads) = match kind {
            "ide" => ("ide", 16),
            _ => ("lsilogic", 255),
        };
        let sectors = capacity / SECTOR;
        let cylinders = (sectors / (heads * 63)).min(65535);
        let (descriptor, flat) = Staging::disk_file_names(&self.vm_name, index);
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
        let text = format!(
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
        );
        let path = self.dir.join(descriptor);
        fs::write(&path, text).map_err(io_err("write", &path))
    }

    /// Writes `<vm>.vmx` for `vmx`. Values are quoted and escaped the VMware way
    /// (`"` as `|22`, `|` as `|7C`, control characters likewise).
    pub fn write_vmx(&self, vmx: &VmxSpec) -> Result<(), DatastoreError> {
        let text = vmx_text(vmx)?;
        let path = self.dir.join(format!("{}.vmx", self.vm_name));
        fs::write(&path, text).map_err(io_err("write", &path))
    }

    /// Makes the staged files durable and moves them into place: fsyncs every file and
    /// the folder, renames the folder to `root/<vm>/` without replacing anything, and
    /// fsyncs the parents. If `root/<vm>` exists, fails with
    /// [`DatastoreError::VmFolderExists`] and leaves the staging folder as it was.
    pub fn commit(self) -> Result<PathBuf, DatastoreError> {
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let path = entry.map_err(io_err("list", &self.dir))?.path();
            if path.is_file() {
                sync_path(&path)?;
            }
        }
        sync_path(&self.dir)?;
        let target = self.root.join(&self.vm_name);
        rename_noreplace(&self.dir, &target).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => DatastoreError::VmFolderExists {
                path: target.clone(),
                staging: self.dir.clone(),
            },
            _ => io_err("move the staged VM folder to", &target)(e),
        })?;
        sync_path(&self.root)?;
        if let Some(staging) = self.dir.parent() {
            sync_path(staging)?;
        }
        Ok(target)
    }

    /// Removes the staging folder and everything in it (a failed or aborted migration).
    pub fn discard(self) -> Result<(), DatastoreError> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &self.dir)(e)),
        }
    }
}

fn sync_path(path: &Path) -> Result<(), DatastoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", path))
}

/// Renames `from` to `to`, failing with AlreadyExists instead of replacing `to` (a plain
/// rename(2) would silently replace an empty folder).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use nix::errno::Errno;
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        // Filesystems without RENAME_NOREPLACE: check, then rename (a small race).
        Err(Errno::EINVAL | Errno::ENOSYS) => rename_checked(from, to),
        Err(errno) => Err(io::Error::from(errno)),
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    rename_checked(from, to)
}

fn rename_checked(from: &Path, to: &Path) -> io::Result<()> {
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    fs::rename(from, to)
}

/// Splits `scsi0:1` into ("scsi", 0, 1).
fn parse_disk_key(key: &str) -> Result<(&'static str, u32, u32), DatastoreError> {
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

fn vmx_text(vmx: &VmxSpec) -> Result<String, DatastoreError> {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut set = |key: &str, value: &str| lines.push((key.to_owned(), value.to_owned()));
    set(".encoding", "UTF-8");
    set("config.version", "8");
    set("virtualHW.version", "14");
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
        // IDE controllers are always there; the others are declared once, before their disks.
        if kind != "ide" && !controllers.contains(&controller) {
            set(&format!("{controller}.present"), "TRUE");
            if kind == "scsi" {
                set(&format!("{controller}.virtualDev"), "lsilogic");
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
        match &nic.mac {
            Some(mac) => {
                set(&format!("{key}.addressType"), "static");
                set(&format!("{key}.address"), mac);
            }
            None => set(&format!("{key}.addressType"), "generated"),
        }
    }
    Ok(lines.iter().map(|(k, v)| format!("{k} = {}\n", vmx_quote(v))).collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::process::Command;

    use super::*;

    fn datastore(capacity: Option<u64>) -> (tempfile::TempDir, Datastore) {
        let dir = tempfile::tempdir().unwrap();
        let ds = Datastore::open(&dir.path().join("ds"), "cloud-ds1", capacity).unwrap();
        (dir, ds)
    }

    #[test]
    fn open_creates_root_and_staging_and_checks_the_name() {
        let (_dir, ds) = datastore(None);
        assert!(ds.root().join(".staging").is_dir());
        assert_eq!(ds.name(), "cloud-ds1");
        for bad in ["", "ds[1]", "a\nb"] {
            let err = Datastore::open(ds.root(), bad, None).unwrap_err();
            assert!(
                matches!(err, DatastoreError::BadDatastoreName { .. }),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn vm_name_rules() {
        for good in [
            "web01",
            "Web 01 (prod)",
            "ümlaut-ß",
            "a.b",
            "x]y",
            &"n".repeat(80),
            "a|b",
        ] {
            Datastore::check_vm_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for (bad, rule) in [
            ("", "empty"),
            (&"n".repeat(81) as &str, "80"),
            ("a/b", "'/'"),
            ("a\\b", "'\\'"),
            ("a\0b", "NUL"),
            ("a\tb", "control"),
            ("a\u{7f}", "control"),
            ("a\"b", "'\"'"),
            (".", "\".\""),
            ("..", "\"..\""),
            (".hidden", "starts with '.'"),
        ] {
            let err = Datastore::check_vm_name(bad).unwrap_err();
            assert!(err.to_string().contains(rule), "{bad:?}: {err}");
        }
        // 80 characters, not bytes.
        Datastore::check_vm_name(&"é".repeat(80)).unwrap();
    }

    #[test]
    fn free_bytes_is_capped_by_the_configured_capacity() {
        let (_dir, ds) = datastore(None);
        let fs_free = ds.free_bytes(0).unwrap();
        assert!(fs_free > 0);
        assert_eq!(
            ds.free_bytes(u64::MAX).unwrap(),
            fs_free,
            "without a capacity, `used` does not matter"
        );

        let capped = Datastore::open(ds.root(), "cloud-ds1", Some(10_000)).unwrap();
        assert_eq!(capped.free_bytes(0).unwrap(), 10_000.min(fs_free));
        assert_eq!(capped.free_bytes(4_000).unwrap(), 6_000.min(fs_free));
        assert_eq!(capped.free_bytes(20_000).unwrap(), 0);

        let huge = Datastore::open(ds.root(), "cloud-ds1", Some(u64::MAX)).unwrap();
        assert_eq!(
            huge.free_bytes(0).unwrap(),
            fs_free,
            "the filesystem's free space still limits"
        );
    }

    #[test]
    fn disk_file_names_follow_vsphere() {
        assert_eq!(
            Staging::disk_file_names("web01", 0),
            ("web01.vmdk".into(), "web01-flat.vmdk".into())
        );
        assert_eq!(
            Staging::disk_file_names("web01", 2),
            ("web01_2.vmdk".into(), "web01_2-flat.vmdk".into())
        );
        assert_eq!(
            datastore_path("cloud-ds1", "web01", "web01.vmdk"),
            "[cloud-ds1] web01/web01.vmdk"
        );
    }

    #[test]
    fn stage_makes_a_fresh_folder_and_sparse_disks() {
        let (_dir, ds) = datastore(None);
        let staging = ds.stage("migration-1", "web01").unwrap();
        assert_eq!(staging.dir(), ds.root().join(".staging/migration-1"));
        assert!(matches!(
            ds.stage("migration-1", "web01"),
            Err(DatastoreError::StagingExists { .. })
        ));
        assert!(matches!(
            ds.stage("../x", "web01"),
            Err(DatastoreError::BadMigrationId { .. })
        ));
        assert!(matches!(
            ds.stage("migration-2", "a/b"),
            Err(DatastoreError::BadVmName { .. })
        ));

        let capacity = 64 << 30;
        let file = staging.create_disk(1, capacity).unwrap();
        file.write_all_at(b"boot", 1 << 30).unwrap();
        let meta = fs::metadata(staging.dir().join("web01_1-flat.vmdk")).unwrap();
        assert_eq!(meta.len(), capacity);
        // 512-byte blocks actually allocated: a few KiB, not 64 GiB.
        assert!(meta.blocks() < 1024, "{} blocks allocated", meta.blocks());
        let mut hole = [0xffu8; 4096];
        file.read_exact_at(&mut hole, 12345).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        assert!(staging.create_disk(1, 1).is_err(), "an existing disk is not truncated");
    }

    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is on PATH")
    }

    #[test]
    fn descriptors_are_read_by_qemu_img() {
        let (_dir, ds) = datastore(None);
        let staging = ds.stage("migration-3", "db 01").unwrap();
        let capacity: u64 = 20 << 20;
        let raw_path = staging.dir().join("expected.raw");
        let raw = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&raw_path)
            .unwrap();
        raw.set_len(capacity).unwrap();
        for (index, key) in [(0, "scsi0:0"), (1, "ide0:1")] {
            let disk = staging.create_disk(index, capacity).unwrap();
            for (offset, data) in [
                (0u64, &b"MBR!"[..]),
                (7 << 20, &[0xAB; 5000][..]),
                (capacity - 512, &[1u8; 512][..]),
            ] {
                disk.write_all_at(data, offset).unwrap();
                raw.write_all_at(data, offset).unwrap();
            }
            staging.write_descriptor(index, capacity, key).unwrap();
        }
        raw.sync_all().unwrap();

        let first = staging.dir().join("db 01.vmdk");
        let text = fs::read_to_string(&first).unwrap();
        assert!(text.contains("createType=\"monolithicFlat\""), "{text}");
        assert!(
            text.contains(&format!("RW {} FLAT \"db 01-flat.vmdk\" 0", capacity / 512)),
            "{text}"
        );
        assert!(text.contains("ddb.adapterType = \"lsilogic\""), "{text}");
        assert!(text.contains("ddb.geometry.heads = \"255\""), "{text}");
        assert!(text.contains("ddb.geometry.cylinders = \"2\""), "{text}"); // 40960 / (255 * 63)
        assert!(text.contains("ddb.virtualHWVersion = \"14\""), "{text}");
        let second = staging.dir().join("db 01_1.vmdk");
        let text = fs::read_to_string(&second).unwrap();
        assert!(text.contains("ddb.adapterType = \"ide\""), "{text}");
        assert!(text.contains("ddb.geometry.heads = \"16\""), "{text}");
        assert!(text.contains("ddb.geometry.cylinders = \"40\""), "{text}"); // 40960 / (16 * 63)

        for descriptor in [&first, &second] {
            let out = qemu_img(&["info", "--output=json", descriptor.to_str().unwrap()]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(info["format"], "vmdk", "{info}");
            assert_eq!(info["virtual-size"], capacity, "{info}");
            assert_eq!(
                info["format-specific"]["data"]["create-type"], "monolithicFlat",
                "{info}"
            );

            let out = qemu_img(&[
                "compare",
                "-f",
                "vmdk",
                "-F",
                "raw",
                descriptor.to_str().unwrap(),
                raw_path.to_str().unwrap(),
            ]);
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // The comparison is real: one changed byte makes it fail.
        raw.write_all_at(b"x", 3 << 20).unwrap();
        let out = qemu_img(&[
            "compare",
            "-f",
            "vmdk",
            "-F",
            "raw",
            first.to_str().unwrap(),
            raw_path.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    }

    #[test]
    fn descriptor_rejects_partial_sectors_and_bad_keys() {
        let (_dir, ds) = datastore(None);
        let staging = ds.stage("migration-4", "web01").unwrap();
        assert!(matches!(
            staging.write_descriptor(0, 1000, "scsi0:0"),
            Err(DatastoreError::UnalignedCapacity { .. })
        ));
        for key in ["floppy0:0", "scsi0", "scsi:0", "scsix:0", "scsi0:", "scsi0:+1"] {
            let err = staging.write_descriptor(0, 512, key).unwrap_err();
            assert!(matches!(err, DatastoreError::BadDeviceKey { .. }), "{key}: {err:?}");
        }
        let sectors = (70_000u64 * 255 * 63 + 5) * 512;
        staging.write_descriptor(0, sectors, "nvme0:0").unwrap();
        let text = fs::read_to_string(staging.dir().join("web01.vmdk")).unwrap();
        assert!(text.contains("ddb.geometry.cylinders = \"65535\""), "{text}");
    }

    fn spec() -> VmxSpec {
        VmxSpec {
            name: "web \"01\" | prod".into(),
            guest_os: "ubuntu-64".into(),
            num_cpus: 4,
            cores_per_socket: Some(2),
            memory_mib: 4096,
            firmware: Some("efi".into()),
            bios_uuid: Some("42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8".into()),
            disks: vec![
                VmxDisk {
                    key: "scsi0:0".into(),
                    file_name: "web01.vmdk".into(),
                },
                VmxDisk {
                    key: "scsi0:1".into(),
                    file_name: "web01_1.vmdk".into(),
                },
                VmxDisk {
                    key: "sata0:0".into(),
                    file_name: "web01_2.vmdk".into(),
                },
                VmxDisk {
                    key: "ide0:0".into(),
                    file_name: "web01_3.vmdk".into(),
                },
                VmxDisk {
                    key: "nvme1:0".into(),
                    file_name: "web01_4.vmdk".into(),
                },
            ],
            nics: vec![
                VmxNic {
                    key: "ethernet0".into(),
                    network_name: "cloud-web".into(),
                    virtual_dev: Some("vmxnet3".into()),
                    mac: Some("00:50:56:01:02:03".into()),
                },
                VmxNic {
                    key: "ethernet1".into(),
                    network_name: "cloud|db".into(),
                    virtual_dev: None,
                    mac: None,
                },
            ],
        }
    }

    #[test]
    fn vmx_has_every_setting_quoted_and_escaped() {
        let (_dir, ds) = datastore(None);
        let staging = ds.stage("migration-5", "web01").unwrap();
        staging.write_vmx(&spec()).unwrap();
        let text = fs::read_to_string(staging.dir().join("web01.vmx")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], ".encoding = \"UTF-8\"");
        for expected in [
            "config.version = \"8\"",
            "virtualHW.version = \"14\"",
            "displayName = \"web |2201|22 |7C prod\"",
            "guestOS = \"ubuntu-64\"",
            "numvcpus = \"4\"",
            "cpuid.coresPerSocket = \"2\"",
            "memsize = \"4096\"",
            "firmware = \"efi\"",
            "uuid.bios = \"42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8\"",
            "scsi0.present = \"TRUE\"",
            "scsi0.virtualDev = \"lsilogic\"",
            "scsi0:1.present = \"TRUE\"",
            "scsi0:1.fileName = \"web01_1.vmdk\"",
            "scsi0:1.deviceType = \"scsi-hardDisk\"",
            "sata0.present = \"TRUE\"",
            "sata0:0.deviceType = \"disk\"",
            "ide0:0.deviceType = \"ata-hardDisk\"",
            "nvme1.present = \"TRUE\"",
            "nvme1:0.fileName = \"web01_4.vmdk\"",
            "ethernet0.present = \"TRUE\"",
            "ethernet0.networkName = \"cloud-web\"",
            "ethernet0.virtualDev = \"vmxnet3\"",
            "ethernet0.addressType = \"static\"",
            "ethernet0.address = \"00:50:56:01:02:03\"",
            "ethernet1.networkName = \"cloud|7Cdb\"",
            "ethernet1.addressType = \"generated\"",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("scsi0.present")).count(),
            1,
            "{text}"
        );
        assert!(!text.contains("ide0.present"), "{text}");
        assert!(!text.contains("ethernet1.virtualDev"), "{text}");
        assert!(!text.contains("ethernet1.address ="), "{text}");
        let controller = lines.iter().position(|l| l.starts_with("scsi0.present")).unwrap();
        let first_disk = lines.iter().position(|l| l.starts_with("scsi0:0.")).unwrap();
        assert!(controller < first_disk);
        // Every line is `key = "value"` with no stray quote inside the value.
        for line in &lines {
            let (_, value) = line.split_once(" = ").unwrap();
            assert!(
                value.starts_with('"') && value.ends_with('"') && !value[1..value.len() - 1].contains('"'),
                "{line}"
            );
        }

        let mut minimal = spec();
        minimal.cores_per_socket = None;
        minimal.firmware = None;
        minimal.bios_uuid = None;
        minimal.name = "tab\there".into();
        let text = vmx_text(&minimal).unwrap();
        assert!(!text.contains("cpuid.coresPerSocket") && !text.contains("firmware") && !text.contains("uuid.bios"));
        assert!(text.contains("displayName = \"tab|09here\""), "{text}");

        let mut bad = spec();
        bad.nics[0].key = "eth0".into();
        assert!(matches!(
            staging.write_vmx(&bad),
            Err(DatastoreError::BadDeviceKey { .. })
        ));
    }

    #[test]
    fn commit_moves_the_folder_into_place() {
        let (_dir, ds) = datastore(None);
        let staging = ds.stage("migration-6", "web01").unwrap();
        staging
            .create_disk(0, 1 << 20)
            .unwrap()
            .write_all_at(b"data", 0)
            .unwrap();
        staging.write_descriptor(0, 1 << 20, "scsi0:0").unwrap();
        staging.write_vmx(&spec()).unwrap();
        let staged = staging.dir().to_owned();
        assert!(!ds.vm_dir_exists("web01"));
        let folder = staging.commit().unwrap();
        assert_eq!(folder, ds.root().join("web01"));
        assert!(!staged.exists());
        assert!(ds.vm_dir_exists("web01"));
        assert!(!ds.vm_dir_exists(".."), "invalid names are never reported as existing");
        let mut names: Vec<String> = fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["web01-flat.vmdk", "web01.vmdk", "web01.vmx"]);
        assert_eq!(&fs::read(folder.join("web01-flat.vmdk")).unwrap()[..4], b"data");
    }

    #[test]
    fn commit_onto_an_existing_folder_fails_and_keeps_the_staging() {
        let (_dir, ds) = datastore(None);
        // Even an empty folder is not replaced (plain rename(2) would replace it).
        fs::create_dir(ds.root().join("web01")).unwrap();
        let staging = ds.stage("migration-7", "web01").unwrap();
        staging.create_disk(0, 4096).unwrap();
        let staged = staging.dir().to_owned();
        let err = staging.commit().unwrap_err();
        match &err {
            DatastoreError::VmFolderExists { path, staging } => {
                assert_eq!(path, &ds.root().join("web01"));
                assert_eq!(staging, &staged);
            }
            other => panic!("{other:?}"),
        }
        assert!(staged.join("web01-flat.vmdk").is_file());
        assert_eq!(fs::read_dir(ds.root().join("web01")).unwrap().count(), 0);
    }

    #[test]
    fn discard_and_clean_staging_remove_leftovers() {
        let (_dir, ds) = datastore(None);
        let staging = ds.stage("migration-8", "a").unwrap();
        staging.create_disk(0, 4096).unwrap();
        let dir = staging.dir().to_owned();
        staging.discard().unwrap();
        assert!(!dir.exists());

        // Dropping a Staging keeps its files; clean_staging removes them at the next start.
        let kept = ds.stage("migration-9", "b").unwrap();
        kept.create_disk(0, 4096).unwrap();
        let kept_dir = kept.dir().to_owned();
        drop(kept);
        assert!(kept_dir.is_dir());
        let other = ds.stage("migration-10", "c").unwrap().dir().to_owned();
        fs::write(ds.root().join(".staging/stray-file"), b"x").unwrap();
        let removed = ds.clean_staging().unwrap();
        assert_eq!(removed, [other, kept_dir, ds.root().join(".staging/stray-file")]);
        assert_eq!(fs::read_dir(ds.root().join(".staging")).unwrap().count(), 0);
        assert!(ds.clean_staging().unwrap().is_empty());
    }
}
