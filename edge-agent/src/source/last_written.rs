//! When a VMware source stopped, as its files say. A running VM writes its files until it
//! stops: the disks of its snapshot chain (the newest delta, and any extent of it), its
//! `.nvram`, `vmware.log`, and VMware rewrites the `.vmx` at power-off. The newest
//! modification time among them is an estimate of the stop, on the datastore's clock:
//! the switchover's downtime counts from it when the operator stopped the source before
//! (docs/replication.md, "Power-on and downtime").

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{open_source_disk, SourceVm};

/// The files of `vm` whose last write says when it stopped: the `.vmx`, every disk of
/// every disk's snapshot chain with its extent files, the `.nvram` and `vmware.log`.
/// Only those that exist. Empty for a source that is not a `.vmx` (an OVF or OVA is a
/// package, written once, not a running VM).
pub fn stop_witnesses(vm: &SourceVm) -> Vec<PathBuf> {
    if vm.vmx_path.extension().and_then(|e| e.to_str()) != Some("vmx") {
        return Vec::new();
    }
    let mut files = vec![vm.vmx_path.clone()];
    let dir = vm.vmx_path.parent().unwrap_or(Path::new("."));
    files.push(vm.vmx_path.with_extension("nvram"));
    files.push(dir.join("vmware.log"));
    for disk in vm.disks.iter().filter(|d| d.archive_member.is_none()) {
        files.push(disk.path.clone());
        let chain = open_source_disk(disk).map(|d| d.snapshot_chain()).unwrap_or_default();
        for link in chain {
            files.extend(extents_of(&link.path));
            files.push(link.path);
        }
    }
    files.sort();
    files.dedup();
    files.retain(|f| f.is_file());
    files
}

/// The extent files VMware names after a disk's descriptor `dir/NAME.vmdk`:
/// `NAME-flat.vmdk` (a flat base), `NAME-delta.vmdk` and `NAME-sesparse.vmdk` (a
/// snapshot delta), `NAME-sNNN.vmdk` and `NAME-fNNN.vmdk` (a split disk's 2 GB parts).
fn extents_of(descriptor: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(stem)) = (descriptor.parent(), descriptor.file_stem().and_then(|s| s.to_str())) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{stem}-");
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            let Some(part) = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".vmdk")) else {
                return false;
            };
            matches!(part, "flat" | "delta" | "sesparse")
                || (part.len() == 4
                    && (part.starts_with('s') || part.starts_with('f'))
                    && part[1..].bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// The newest modification time among `files`, and which file it is.
pub fn newest(files: &[PathBuf]) -> Option<(SystemTime, PathBuf)> {
    files
        .iter()
        .filter_map(|f| Some((std::fs::metadata(f).ok()?.modified().ok()?, f.clone())))
        .max_by_key(|(t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extents_of_a_descriptor_are_vmware_s_names_for_it_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "db01.vmdk",
            "db01-flat.vmdk",
            "db01-s001.vmdk",
            "db01-f002.vmdk",
            "db01-000001.vmdk",
            "db01-000001-delta.vmdk",
            "db01-sXYZ.vmdk",
            "db011-flat.vmdk",
            "db01-flat.vmdk.bak",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let mut found: Vec<String> = extents_of(&dir.path().join("db01.vmdk"))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        found.sort();
        assert_eq!(found, ["db01-f002.vmdk", "db01-flat.vmdk", "db01-s001.vmdk"]);
        let delta: Vec<PathBuf> = extents_of(&dir.path().join("db01-000001.vmdk"));
        assert_eq!(delta, [dir.path().join("db01-000001-delta.vmdk")]);
    }
}
