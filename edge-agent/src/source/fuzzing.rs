//! Entry points of the fuzz targets for the source parsers (`fuzz/`): each
//! writes arbitrary bytes where a VM's file would be and opens it as the agent
//! does. None may panic, hang or allocate beyond the reader's own limits. The
//! regression tests replay saved inputs through the same functions.

use std::path::PathBuf;

use super::{open_disk, open_vm};

/// A scratch folder per process (in /dev/shm when it exists: fuzzing writes a
/// file per input).
fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("gateway-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Removes this process's scratch folder (the regression tests call it at the end;
/// a fuzzer process just leaves its few small files behind).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch());
}

/// Reads at most this much of any opened disk: enough to cross grain tables,
/// L2 tables and extents, bounded so a huge declared capacity stays cheap.
const READ_BUDGET: u64 = 4 << 20;

fn exercise(disk: &dyn super::DiskReader) {
    let cap = disk.capacity();
    let mut buf = vec![0u8; 64 << 10];
    // The start, the end, and a few places between.
    let mut offsets = vec![0, cap.saturating_sub(buf.len() as u64), cap / 2, cap / 3, cap / 7 * 5];
    offsets.sort_unstable();
    offsets.dedup();
    let mut read = 0u64;
    for offset in offsets {
        let len = (cap - offset.min(cap)).min(buf.len() as u64) as usize;
        if len == 0 || read >= READ_BUDGET {
            continue;
        }
        let _ = disk.is_hole(offset, len as u64);
        let _ = disk.read_at(offset, &mut buf[..len]);
        read += len as u64;
    }
}

/// A .vmx next to a small raw disk it may name (`disk.img`).
pub fn vmx(data: &[u8]) {
    let dir = scratch();
    std::fs::write(dir.join("disk.img"), [0u8; 4096]).expect("scratch disk");
    let vmx = dir.join("vm.vmx");
    std::fs::write(&vmx, data).expect("scratch file");
    if let Ok(vm) = open_vm(&vmx) {
        for d in &vm.disks {
            if let Ok(reader) = super::open_source_disk(d) {
                exercise(reader.as_ref());
            }
        }
    }
}

/// A disk image under a name with the given extension (`vmdk`, `qcow2`, `img`).
pub fn disk_image(data: &[u8], extension: &str) {
    let path = scratch().join(format!("disk.{extension}"));
    std::fs::write(&path, data).expect("scratch file");
    if let Ok(disk) = open_disk(&path) {
        exercise(disk.as_ref());
    }
}

/// An OVF descriptor (`.ovf`) or an OVA archive (`.ova`), disks included.
pub fn package(data: &[u8], extension: &str) {
    let path = scratch().join(format!("vm.{extension}"));
    std::fs::write(&path, data).expect("scratch file");
    if let Ok(vm) = open_vm(&path) {
        for d in &vm.disks {
            if let Ok(reader) = super::open_source_disk(d) {
                exercise(reader.as_ref());
            }
        }
    }
}
