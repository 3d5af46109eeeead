//! How a QEMU process is confined: a seccomp filter (`-sandbox`) and, when the caller
//! runs as root, an unprivileged user of its own. QEMU parses what a peer controls (a
//! migration stream, disk images' metadata): a QEMU bug must not reach the inventory, the
//! keys or the other VMs.
//!
//! The user is set when the process is started (setuid/setgid before exec), not with
//! `-run-with user=`: QEMU drops privileges only after its seccomp filter is in place, and
//! `elevateprivileges=deny` then kills it on its own setuid ("Bad system call", QEMU 10).

/// The `-sandbox` options: seccomp on; no obsolete system calls, no set*id, no new
/// processes (QEMU needs none to run a VM), no scheduler or priority changes.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A user and group QEMU runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// What confines one QEMU process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confinement {
    /// Add `-sandbox` with [`SANDBOX`].
    pub sandbox: bool,
    /// Start QEMU as this user (only possible for a root caller).
    pub run_as: Option<RunAs>,
}

impl Confinement {
    /// The arguments to add to QEMU's command line.
    pub fn argv(&self) -> Vec<String> {
        if self.sandbox {
            vec!["-sandbox".to_owned(), SANDBOX.to_owned()]
        } else {
            Vec::new()
        }
    }
}
