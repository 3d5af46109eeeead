//! Each VM's QEMU runs confined: always under a seccomp sandbox, and when the endpoint
//! runs as root, as an unprivileged user of its own (`qemu_user`, default `gateway-qemu`)
//! that owns the VM's folder while it runs. The database, the keys and the other VMs'
//! folders stay the endpoint's (0600/0700): a QEMU that a hostile disk image or migration
//! stream took over cannot read them.

use std::path::Path;

use gateway::qemu::{Confinement, RunAs};

use super::HostError;

pub use crate::config::DEFAULT_QEMU_USER;

/// The confinement of QEMU processes started by this endpoint: the sandbox, and `user`
/// if the endpoint runs as root (it must exist and not be root).
pub fn confinement(user: &str) -> Result<Confinement, HostError> {
    if !nix::unistd::geteuid().is_root() {
        // Not root: QEMU runs as the endpoint's own user, which cannot change users.
        return Ok(Confinement {
            sandbox: true,
            run_as: None,
        });
    }
    let found = nix::unistd::User::from_name(user).map_err(|e| HostError::QemuUser {
        user: user.to_owned(),
        problem: format!("cannot be looked up ({e})"),
    })?;
    let Some(found) = found else {
        return Err(HostError::QemuUser {
            user: user.to_owned(),
            problem: "does not exist".to_owned(),
        });
    };
    if found.uid.is_root() {
        return Err(HostError::QemuUser {
            user: user.to_owned(),
            problem: "is root".to_owned(),
        });
    }
    Ok(Confinement {
        sandbox: true,
        run_as: Some(RunAs {
            uid: found.uid.as_raw(),
            gid: found.gid.as_raw(),
        }),
    })
}

/// Gives `folder` (a VM's, in its datastore) and the files in it to `user`, so that a
/// QEMU running as that user opens its disks and writes its console log, and makes the
/// datastore folder above it traversable (0711: others may pass through to a folder
/// they own, not list it).
pub fn hand_over(folder: &Path, user: RunAs) -> Result<(), HostError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e: std::io::Error| HostError::Io { path, source: e }
    };
    if let Some(datastore) = folder.parent() {
        std::fs::set_permissions(datastore, std::fs::Permissions::from_mode(0o711)).map_err(io(datastore))?;
        // QEMU's user must pass through every folder above the datastore too.
        for above in datastore.ancestors().skip(1) {
            let mode = std::fs::metadata(above).map_err(io(above))?.permissions().mode();
            if mode & 0o001 == 0 {
                return Err(HostError::Unreachable {
                    folder: folder.to_owned(),
                    above: above.to_owned(),
                    mode: format!("{:o}", mode & 0o7777),
                });
            }
        }
    }
    // lchown: a symlink in the folder is given, not what it points to.
    let chown = |path: &Path| std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid)).map_err(io(path));
    chown(folder)?;
    for entry in std::fs::read_dir(folder).map_err(io(folder))? {
        let entry = entry.map_err(io(folder))?;
        chown(&entry.path())?;
    }
    Ok(())
}

/// Gives `folder` itself to `user`, and nothing above or in it: a private folder outside
/// the datastores (0700, such as the one of a live migration's sockets, in which QEMU
/// creates them).
pub fn give(folder: &Path, user: RunAs) -> Result<(), HostError> {
    std::os::unix::fs::lchown(folder, Some(user.uid), Some(user.gid)).map_err(|source| HostError::Io {
        path: folder.to_owned(),
        source,
    })
}
