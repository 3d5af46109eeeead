//! UEFI firmware for EFI VMs: Debian's OVMF (package `ovmf`). Its code is shared and read
//! only; each VM gets its own copy of the variable store, as an ESXi VM has its `.nvram`,
//! so the boot entries one guest writes stay its own.

use std::path::{Path, PathBuf};

use super::QemuError;

/// Where Debian installs OVMF.
pub const OVMF_DIR: &str = "/usr/share/OVMF";

/// The code and variable-store templates, matched pairs (a 4 MiB code image needs the
/// 4 MiB store), the newer layout first. Not the `secboot`/`ms` builds: a lifted guest
/// signed for VMware's keys would not pass their checks.
const PAIRS: [(&str, &str); 2] = [("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")];

/// One installed OVMF: its code and the template of its variable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

impl Ovmf {
    /// The OVMF in `OVMF_DIR` (the environment variable; else [`OVMF_DIR`]).
    pub fn from_env() -> Result<Ovmf, QemuError> {
        let dir = std::env::var_os("OVMF_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from(OVMF_DIR), PathBuf::from);
        Ovmf::find(&dir)
    }

    /// The first matched pair of files in `dir`.
    pub fn find(dir: &Path) -> Result<Ovmf, QemuError> {
        PAIRS
            .iter()
            .map(|(code, vars)| Ovmf {
                code: dir.join(code),
                vars_template: dir.join(vars),
            })
            .find(|o| o.code.is_file() && o.vars_template.is_file())
            .ok_or_else(|| QemuError::NoOvmf { dir: dir.to_owned() })
    }

    /// The VM's variable store at `vars`: kept if it exists (it holds the guest's boot
    /// entries), else copied from the template.
    pub fn vars_for(&self, vars: &Path) -> Result<(), QemuError> {
        if vars.is_file() {
            return Ok(());
        }
        std::fs::copy(&self.vars_template, vars)
            .map(|_| ())
            .map_err(|source| QemuError::Io {
                action: "copy OVMF's variable store to",
                path: vars.to_owned(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_matched_pair_and_keeps_a_vms_store() {
        let dir = tempfile::tempdir().unwrap();
        let e = Ovmf::find(dir.path()).unwrap_err();
        assert!(e.to_string().contains("apt-get install ovmf"), "{e}");
        // A code image without its store is no pair.
        std::fs::write(dir.path().join("OVMF_CODE_4M.fd"), b"code4").unwrap();
        std::fs::write(dir.path().join("OVMF_CODE.fd"), b"code2").unwrap();
        std::fs::write(dir.path().join("OVMF_VARS.fd"), b"vars2").unwrap();
        let o = Ovmf::find(dir.path()).unwrap();
        assert_eq!(o.code, dir.path().join("OVMF_CODE.fd"));
        let vars = dir.path().join("vm.ovmf-vars.fd");
        o.vars_for(&vars).unwrap();
        assert_eq!(std::fs::read(&vars).unwrap(), b"vars2");
        std::fs::write(&vars, b"the guest's entries").unwrap();
        o.vars_for(&vars).unwrap();
        assert_eq!(std::fs::read(&vars).unwrap(), b"the guest's entries", "kept");
    }
}
