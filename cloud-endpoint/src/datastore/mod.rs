//! The files of the cloud datastore, laid out as on a vSphere datastore:
//!
//! ```text
//! <root>/web01/web01.vmx
//! <root>/web01/web01.vmdk          descriptor of disk 0 (monolithicFlat)
//! <root>/web01/web01-flat.vmdk     its extent: raw, sparse
//! <root>/web01/web01_1.vmdk        disk 1, and so on
//! <root>/db01/db01.qcow2           or, per migration or datastore: qcow2 v3 images
//! <root>/app01/app01.img           or sparse raw images
//! <root>/.staging/migration-7/     a migration in flight
//! ```
//!
//! A migration writes into its own staging folder; [`Staging::commit`] syncs it and renames
//! it into place in one step, so a VM folder is either whole or absent. The commit is
//! recorded in the inventory before the first rename, so a restart after a crash moves a
//! folder of an unregistered VM back to staging (see `server/placement/commit.rs`). Nothing is deleted
//! implicitly: dropping a [`Staging`] leaves its folder (call [`Staging::discard`]), and
//! [`Datastore::clean_staging`] removes what a restart left behind.
//!
//! ```text
//! mod.rs     Datastore, Staging: folders, names, commit
//! disk.rs    DiskFile: a disk being written, whatever its format; raw and flat extents
//! qcow2.rs   the qcow2 v3 writer
//! readback.rs  staged chunks read back and checked before a commit
//! vmdk.rs    monolithicFlat descriptors
//! vmx.rs     the .vmx
//! ```

mod disk;
mod journal;
mod qcow2;
mod readback;
mod vmdk;
mod vmx;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use disk::DiskFile;
pub use gateway::plan::DiskFormat;
pub use journal::{Journal, Replay, JOURNAL_FILE};
pub use readback::{read_back, read_back_early, ReadBack};
use vmx::vmx_text;
pub(crate) use vmx::{parse_disk_key, VIRTUAL_HW_VERSION};
pub use vmx::{VmxDisk, VmxNic, VmxSpec};

const STAGING: &str = ".staging";
const SECTOR: u64 = 512;

/// Sets `dir`'s `mode` (0700 or 0711); a failure (a folder the endpoint does not own) is
/// logged, not fatal: the files below keep their own modes.
fn private_dir(dir: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(mode)) {
        tracing::warn!(
            folder = %dir.display(),
            error = %e,
            mode = format!("{mode:o}"),
            "cannot make the datastore folder private; other local users may read the VMs' disks: \
             give the folder to the endpoint's user"
        );
    }
}

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

    #[error("a {format} disk of {capacity} bytes cannot be created: {rule}")]
    BadCapacity {
        capacity: u64,
        format: &'static str,
        rule: &'static str,
    },

    #[error("datastore {datastore} has {free} bytes free, and {what} need {needed} bytes; free space in it, or wait for the migrations under way to end")]
    NoRoom {
        datastore: String,
        what: &'static str,
        needed: u64,
        free: u64,
    },
}

/// Held while space is promised, so that two promises cannot both count the same free
/// bytes: a migration's reservation in the inventory, and live migrations' boot files
/// ([`Datastore::reserve_scratch`]). One lock for every datastore of the process: each
/// decision takes a few milliseconds and they are rare.
pub fn space_decision() -> std::sync::MutexGuard<'static, ()> {
    static SPACE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SPACE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Space a datastore promised to files that are not disks (a live migration's kernel
/// and initrd while they arrive), counted by [`Datastore::free_bytes`] until dropped.
#[derive(Debug)]
pub struct ScratchSpace {
    promised: Arc<Mutex<u64>>,
    bytes: u64,
}

impl Drop for ScratchSpace {
    fn drop(&mut self) {
        let mut promised = self.promised.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *promised = promised.saturating_sub(self.bytes);
    }
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
    disk_format: DiskFormat,
    /// Bytes promised by [`ScratchSpace`]s, shared by the clones of this datastore.
    scratch: Arc<Mutex<u64>>,
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
        // The VMs' disks are theirs alone, whatever the umask made of these folders (or
        // an older version left): others may pass through the datastore folder (0711) to
        // a VM folder they own (a confined QEMU's user, see hosts/confine.rs), not list
        // it; staging is the endpoint's only (0700).
        private_dir(root, 0o711);
        private_dir(&staging, 0o700);
        Ok(Datastore {
            root: root.to_owned(),
            name: name.to_owned(),
            capacity,
            disk_format: DiskFormat::VmdkFlat,
            scratch: Arc::default(),
        })
    }

    /// Sets the format migrated disks take unless their plan asks for another one.
    pub fn with_disk_format(mut self, format: DiskFormat) -> Datastore {
        self.disk_format = format;
        self
    }

    /// The format of migrated disks whose plan names none; monolithicFlat VMDK unless
    /// [`Datastore::with_disk_format`] chose another.
    pub fn disk_format(&self) -> DiskFormat {
        self.disk_format
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The datastore's size as vSphere shows it: the configured capacity, or else the
    /// filesystem's size.
    pub fn capacity_bytes(&self) -> Result<u64, DatastoreError> {
        if let Some(capacity) = self.capacity {
            return Ok(capacity);
        }
        let stat = nix::sys::statvfs::statvfs(&self.root).map_err(|errno| DatastoreError::Io {
            action: "read the size of",
            path: self.root.clone(),
            source: io::Error::from(errno),
        })?;
        #[allow(clippy::unnecessary_cast)]
        Ok((stat.blocks() as u64).saturating_mul(stat.fragment_size() as u64))
    }

    /// Bytes free for new disks. `used` is what the inventory counts on this datastore
    /// (registered disks, and what running migrations reserved), `reserved` the part of
    /// it that running migrations reserved. With a configured capacity, `capacity - used`;
    /// in any case no more than the filesystem's free space for unprivileged users less
    /// what is promised and not written yet: reservations and scratch files (boot files)
    /// beyond what the staging area holds already. Sparse staged disks fill as data
    /// arrives, so the filesystem alone would let two migrations count the same bytes.
    pub fn free_bytes(&self, used: u64, reserved: u64) -> Result<u64, DatastoreError> {
        let stat = nix::sys::statvfs::statvfs(&self.root).map_err(|errno| DatastoreError::Io {
            action: "read the free space of",
            path: self.root.clone(),
            source: io::Error::from(errno),
        })?;
        // The field types differ between platforms (u32 or u64).
        #[allow(clippy::unnecessary_cast)]
        let fs_free = (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64);
        let scratch = self.scratch_promised();
        let promised = reserved.saturating_add(scratch);
        let outstanding = if promised == 0 {
            0
        } else {
            promised.saturating_sub(self.staged_bytes())
        };
        let fs_free = fs_free.saturating_sub(outstanding);
        Ok(match self.capacity {
            Some(capacity) => fs_free.min(capacity.saturating_sub(used).saturating_sub(scratch)),
            None => fs_free,
        })
    }

    fn scratch_promised(&self) -> u64 {
        *self.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Promises `bytes` to files that are not disks (see [`ScratchSpace`]) if they fit
    /// ([`Datastore::free_bytes`] with the inventory's `used` and `reserved`). Call it
    /// holding [`space_decision`], with the inventory's figures read under it.
    pub fn reserve_scratch(
        &self,
        bytes: u64,
        used: u64,
        reserved: u64,
        what: &'static str,
    ) -> Result<ScratchSpace, DatastoreError> {
        let free = self.free_bytes(used, reserved)?;
        if bytes > free {
            return Err(DatastoreError::NoRoom {
                datastore: self.name.clone(),
                what,
                needed: bytes,
                free,
            });
        }
        *self.scratch.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += bytes;
        Ok(ScratchSpace {
            promised: self.scratch.clone(),
            bytes,
        })
    }

    /// Bytes the files in the staging area take on disk (sparse disks count what they
    /// hold). Unreadable entries count as nothing: the count then errs towards less
    /// free space.
    fn staged_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        let mut total = 0u64;
        let Ok(folders) = fs::read_dir(self.root.join(STAGING)) else {
            return 0;
        };
        for folder in folders.flatten() {
            let Ok(files) = fs::read_dir(folder.path()) else {
                continue;
            };
            for file in files.flatten() {
                if let Ok(meta) = file.metadata() {
                    if meta.is_file() {
                        total = total.saturating_add(meta.blocks().saturating_mul(512));
                    }
                }
            }
        }
        total
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
        // 0700 whatever the umask: this folder becomes the VM's folder at the commit.
        let created = {
            use std::os::unix::fs::DirBuilderExt as _;
            fs::DirBuilder::new().mode(0o700).create(&dir)
        };
        match created {
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

    /// Reopens the staging folder of a migration that is being resumed.
    pub fn reopen_staging(&self, migration_id: &str, vm_name: &str) -> Result<Staging, DatastoreError> {
        Datastore::check_vm_name(vm_name)?;
        if let Err(DatastoreError::BadVmName { rule, .. }) = Datastore::check_vm_name(migration_id) {
            return Err(DatastoreError::BadMigrationId {
                id: migration_id.to_owned(),
                rule,
            });
        }
        let dir = self.root.join(STAGING).join(migration_id);
        if !dir.is_dir() {
            return Err(io_err("reopen staging folder", &dir)(io::Error::from(
                io::ErrorKind::NotFound,
            )));
        }
        Ok(Staging {
            dir,
            root: self.root.clone(),
            vm_name: vm_name.to_owned(),
        })
    }

    /// Everything under `.staging` now (one folder per migration that staged here).
    pub fn staging_folders(&self) -> Result<Vec<PathBuf>, DatastoreError> {
        let staging = self.root.join(STAGING);
        fs::create_dir_all(&staging).map_err(io_err("create folder", &staging))?;
        let mut listed = Vec::new();
        for entry in fs::read_dir(&staging).map_err(io_err("list", &staging))? {
            listed.push(entry.map_err(io_err("list", &staging))?.path());
        }
        listed.sort();
        Ok(listed)
    }

    /// Removes the `listed` staging entries whose name `keep` refuses; returns what was
    /// removed. An entry already gone (its migration's endpoint removed it meanwhile, on
    /// a shared datastore) is not an error.
    pub fn remove_staging_folders(
        &self,
        listed: Vec<PathBuf>,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<PathBuf>, DatastoreError> {
        let mut removed = Vec::new();
        for path in listed {
            if path.file_name().and_then(|n| n.to_str()).is_some_and(&keep) {
                continue;
            }
            let gone = match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => fs::remove_dir_all(&path),
                Ok(_) => fs::remove_file(&path),
                Err(e) => Err(e),
            };
            match gone {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
        Ok(removed)
    }

    /// Removes everything under `.staging` except the folders named in `keep`; returns
    /// what was removed.
    pub fn clean_staging_except(&self, keep: &[String]) -> Result<Vec<PathBuf>, DatastoreError> {
        let listed = self.staging_folders()?;
        self.remove_staging_folders(listed, |name| keep.iter().any(|k| k == name))
    }

    /// Removes everything under `.staging` (migrations cut by a restart); returns what was
    /// removed.
    pub fn clean_staging(&self) -> Result<Vec<PathBuf>, DatastoreError> {
        self.clean_staging_except(&[])
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

impl Staging {
    /// vSphere's names: disk 0 is `<vm>.vmdk` + `<vm>-flat.vmdk`, disk i is `<vm>_<i>.vmdk`
    /// + `<vm>_<i>-flat.vmdk`. Returns (descriptor, flat extent).
    pub fn disk_file_names(vm_name: &str, index: usize) -> (String, String) {
        let base = disk_base_name(vm_name, index);
        (format!("{base}.vmdk"), format!("{base}-flat.vmdk"))
    }

    /// The file the .vmx and the inventory name for disk `index` in `format`: the
    /// descriptor of a VMDK (`<vm>_<i>.vmdk`), the image itself for qcow2
    /// (`<vm>_<i>.qcow2`) and raw (`<vm>_<i>.img`); disk 0 has no `_0`.
    pub fn disk_file_name(vm_name: &str, index: usize, format: DiskFormat) -> String {
        let base = disk_base_name(vm_name, index);
        match format {
            DiskFormat::VmdkFlat => format!("{base}.vmdk"),
            DiskFormat::Qcow2 => format!("{base}.qcow2"),
            DiskFormat::Raw => format!("{base}.img"),
        }
    }

    /// The staging folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM the staged files are for.
    pub fn vm_name(&self) -> &str {
        &self.vm_name
    }

    /// Creates disk `index` in `format`, `capacity` bytes rounded up to whole sectors (the
    /// rest reads as zeros), and returns it ready for concurrent positional writes. The
    /// data file is sparse: only written blocks take space (see [`DiskFile`]). An existing
    /// file is never truncated.
    pub fn create_disk(
        &self,
        index: usize,
        capacity: u64,
        format: DiskFormat,
    ) -> Result<Arc<DiskFile>, DatastoreError> {
        let (data, file_name) = self.disk_paths(index, format);
        DiskFile::create(&data, file_name, capacity, format).map(Arc::new)
    }

    /// The file holding disk `index`'s data (a VMDK's flat extent, else the image) and
    /// the name the .vmx gives the disk.
    fn disk_paths(&self, index: usize, format: DiskFormat) -> (PathBuf, String) {
        let file_name = Staging::disk_file_name(&self.vm_name, index, format);
        let data_name = match format {
            DiskFormat::VmdkFlat => Staging::disk_file_names(&self.vm_name, index).1,
            DiskFormat::Qcow2 | DiskFormat::Raw => file_name.clone(),
        };
        (self.dir.join(data_name), file_name)
    }

    /// The file holding disk `index`'s data as staged in `format` (a VMDK's flat extent:
    /// raw data).
    pub fn disk_data_path(&self, index: usize, format: DiskFormat) -> PathBuf {
        self.disk_paths(index, format).0
    }

    /// Reopens disk `index` of a resumed migration, as [`Staging::create_disk`] made it.
    pub fn reopen_disk(
        &self,
        index: usize,
        capacity: u64,
        format: DiskFormat,
    ) -> Result<Arc<DiskFile>, DatastoreError> {
        let (data, file_name) = self.disk_paths(index, format);
        DiskFile::reopen(&data, file_name, capacity, format).map(Arc::new)
    }

    /// The migration's journal of durable chunks (see [`Journal`]).
    pub fn journal(&self) -> Result<Journal, DatastoreError> {
        Journal::open(&self.dir)
    }

    /// Writes disk `index`'s monolithicFlat descriptor for a `capacity`-byte extent
    /// (a multiple of 512). The adapter type and geometry follow the controller of
    /// `controller_key` as VMware and qemu-img compute them: IDE disks get 16 heads,
    /// all others 255; 63 sectors per track; cylinders capped at 65535.
    pub fn write_descriptor(
        &self,
        index: usize,
        capacity: u64,
        controller_key: &str,
        controller: &gateway::plan::ControllerType,
    ) -> Result<(), DatastoreError> {
        let (descriptor, flat) = Staging::disk_file_names(&self.vm_name, index);
        let text = vmdk::descriptor_text(capacity, controller_key, controller, &flat)?;
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

    /// The VM folder this staging folder becomes at the commit: `root/<vm>/`.
    pub fn target(&self) -> PathBuf {
        self.root.join(&self.vm_name)
    }

    /// Marks the folder as `migration_id`'s before it moves into place, so a restart
    /// that finds a commit cut short moves back only folders of that migration.
    pub fn mark(&self, migration_id: &str) -> Result<(), DatastoreError> {
        let path = self.dir.join(MIGRATION_MARK);
        fs::write(&path, migration_id).map_err(io_err("write", &path))
    }

    /// Makes the staged files durable and moves them into place: fsyncs every file and
    /// the folder, renames the folder to `root/<vm>/` without replacing anything, and
    /// fsyncs the parents. If `root/<vm>` exists, fails with
    /// [`DatastoreError::VmFolderExists`] and leaves the staging folder as it was.
    /// The journal and the mark move with the folder: until the VM is registered, a
    /// restart can move it back and resume from the journal; then
    /// [`remove_commit_leftovers`] removes them.
    pub fn commit(self) -> Result<PathBuf, DatastoreError> {
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let path = entry.map_err(io_err("list", &self.dir))?.path();
            if path.is_file() {
                sync_path(&path)?;
            }
        }
        sync_path(&self.dir)?;
        let target = self.target();
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

/// The file that names the migration a staged folder belongs to (see [`Staging::mark`]).
pub const MIGRATION_MARK: &str = ".migration";

/// Which migration marked `folder` (see [`Staging::mark`]), if any.
pub fn marked_by(folder: &Path) -> Option<String> {
    fs::read_to_string(folder.join(MIGRATION_MARK)).ok()
}

/// Marks a VM folder as `migration_id`'s (as [`Staging::mark`] marks a staging folder),
/// so that a restart that finds it moving back into staging knows whose it is.
pub fn mark_folder(folder: &Path, migration_id: &str) -> Result<(), DatastoreError> {
    let path = folder.join(MIGRATION_MARK);
    fs::write(&path, migration_id).map_err(io_err("write", &path))?;
    sync_path(folder)
}

/// Removes what only a commit in progress needs from a VM folder now registered: the
/// journal and the mark. Missing files are fine (a restart may finish this twice).
pub fn remove_commit_leftovers(folder: &Path) -> Result<(), DatastoreError> {
    for name in [JOURNAL_FILE, MIGRATION_MARK] {
        let path = folder.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
    }
    sync_path(folder)
}

/// Moves a VM folder back to the staging folder it came from (a commit a restart
/// undoes), creating `.staging` if needed. Never replaces anything.
pub fn move_back(target: &Path, staging: &Path) -> Result<(), DatastoreError> {
    if let Some(parent) = staging.parent() {
        fs::create_dir_all(parent).map_err(io_err("create folder", parent))?;
    }
    rename_noreplace(target, staging).map_err(io_err("move the VM folder back to", staging))?;
    if let Some(parent) = staging.parent() {
        sync_path(parent)?;
    }
    if let Some(parent) = target.parent() {
        sync_path(parent)?;
    }
    Ok(())
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

/// `<vm>` for disk 0, `<vm>_<i>` for disk i: vSphere's naming, kept for every format.
fn disk_base_name(vm_name: &str, index: usize) -> String {
    match index {
        0 => vm_name.to_owned(),
        i => format!("{vm_name}_{i}"),
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod disk_tests;
