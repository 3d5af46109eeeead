use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::source::testutil::{flattened_by_qemu, pseudo_random, qemu_img, qemu_io, read_all, s, write};
use crate::source::{open_disk, open_vm};

/// `qemu-img create` a delta of `parent` (named by file name: qemu-img, like VMware, records
/// it relative to the child's folder), with `options` and a size other than the parent's.
fn create_child(parent: &Path, child: &Path, options: &[&str], size: Option<&str>) {
    let parent_name = parent.file_name().unwrap().to_str().unwrap();
    let mut args = vec!["create", "-f", "vmdk", "-b", parent_name, "-F", "vmdk"];
    args.extend_from_slice(options);
    args.push(s(child));
    args.extend(size);
    qemu_img(&args);
}

/// base (monolithicSparse, 8 MiB: 0x11 in the first MiB) ← child (0x22 over 512 KiB..1.5 MiB)
/// ← grandchild (zero grains over the first 64 KiB, 0x33 at 7 MiB).
fn qemu_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        s(&base),
        "8M",
    ]);
    qemu_io(&base, &["write -P 0x11 0 1M"]);
    let child = dir.join("base-000001.vmdk");
    create_child(&base, &child, &[], None);
    qemu_io(&child, &["write -P 0x22 512k 1M"]);
    let grandchild = dir.join("base-000002.vmdk");
    create_child(&child, &grandchild, &["-o", "zeroed_grain=on"], None);
    qemu_io(&grandchild, &["write -z 0 64k", "write -P 0x33 7M 100k"]);
    (base, child, grandchild)
}

#[test]
fn snapshot_chains_read_as_qemu_flattens_them() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, grandchild) = qemu_chain(dir.path());
    for (top, layers) in [(&child, 2), (&grandchild, 3)] {
        let expected = flattened_by_qemu(top);
        let opened = crate::source::disk::open(top).unwrap();
        assert_eq!(opened.format, DiskFormat::VmdkSparse);
        assert_eq!(opened.reader.capacity(), 8 << 20);
        assert!(
            opened
                .warnings
                .iter()
                .any(|w| w.contains(&format!("chain of {layers} disks"))),
            "{:?}",
            opened.warnings
        );
        for chunk in [1 << 20, 65_536, 12_345] {
            assert!(
                read_all(&*opened.reader, chunk) == expected,
                "{top:?} in chunks of {chunk}"
            );
        }
    }
    let expected = flattened_by_qemu(&grandchild);
    assert!(expected[..65_536].iter().all(|&b| b == 0));
    assert!(expected[65_536..524_288].iter().all(|&b| b == 0x11));
    let disk = open_disk(&grandchild).unwrap();
    // Zero grains over the parents' data, and what no layer holds, are holes.
    assert!(disk.is_hole(0, 65_536));
    assert!(disk.is_hole(2 << 20, 5 << 20));
    assert!(!disk.is_hole(0, 2 * 65_536));
    assert!(!disk.is_hole(1 << 20, 65_536));
    assert!(!disk.is_hole(7 << 20, 1 << 20));
    // Reading never changed the chain.
    let before = fs::read(&base).unwrap();
    read_all(&*disk, 1 << 20);
    assert_eq!(fs::read(&base).unwrap(), before);
}

#[test]
fn a_chain_lists_its_disks_with_their_cids_and_a_delta_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, grandchild) = qemu_chain(dir.path());
    let disk = open_disk(&grandchild).unwrap();
    let chain = disk.snapshot_chain();
    let paths: Vec<PathBuf> = chain.iter().map(|l| l.path.clone()).collect();
    let canonical = |p: &Path| fs::canonicalize(p).unwrap();
    assert_eq!(paths, vec![canonical(&grandchild), canonical(&child), canonical(&base)]);
    assert_eq!(
        chain[1].cid.as_deref().map(|c| u32::from_str_radix(c, 16).unwrap()),
        Some(u32::from_str_radix(&embedded_value(&grandchild, "parentCID"), 16).unwrap())
    );
    // The grandchild holds a zero grain at 0 and 100 KiB of data at 7 MiB (two grains).
    let written = disk.written_by_newest().unwrap().unwrap();
    assert_eq!(written, vec![0..65_536, (7 << 20)..(7 << 20) + 2 * 65_536]);
    // The child holds 512 KiB..1.5 MiB; a disk with no parent is no delta.
    let written = open_disk(&child).unwrap().written_by_newest().unwrap().unwrap();
    assert_eq!(written, vec![524_288..(3 << 19)]);
    assert!(open_disk(&base).unwrap().written_by_newest().is_none());
    assert_eq!(open_disk(&base).unwrap().snapshot_chain().len(), 1);
}

#[test]
fn deltas_over_flat_and_split_sparse_parents() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(6 << 20, 3);
    let raw = write(dir.path(), "src.raw", &data);
    for subformat in ["monolithicFlat", "twoGbMaxExtentSparse", "streamOptimized"] {
        let base = dir.path().join(format!("{subformat}.vmdk"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            s(&raw),
            s(&base),
        ]);
        let child = dir.path().join(format!("{subformat}-child.vmdk"));
        // The child is bigger than its parent.
        create_child(&base, &child, &[], Some("8M"));
        qemu_io(&child, &["write -P 0x44 1M 64k", "write -P 0x55 5M 3M"]);
        let opened = crate::source::disk::open(&child).unwrap();
        // The child grew past its parent: what lies beyond the parent reads as zeros.
        let expected = flattened_by_qemu(&child);
        assert_eq!(opened.reader.capacity(), expected.len() as u64, "{subformat}");
        assert!(read_all(&*opened.reader, 1 << 20) == expected, "{subformat}");
        assert_eq!(opened.format, DiskFormat::VmdkSparse);
    }
}

/// Replaces `from` with `to` (same length) in the file, e.g. in an embedded descriptor.
fn edit_in_place(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = fs::read(path).unwrap();
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from} not in {path:?}"));
    bytes[at..at + from.len()].copy_from_slice(to.as_bytes());
    fs::write(path, bytes).unwrap();
}

fn embedded_value(path: &Path, key: &str) -> String {
    let bytes = fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&bytes[512..512 * 21]);
    let line = text.lines().find(|l| l.starts_with(&format!("{key}="))).unwrap();
    line[key.len() + 1..].trim_matches('"').to_owned()
}

#[test]
fn a_broken_chain_is_refused_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, _) = qemu_chain(dir.path());
    let parent_cid = embedded_value(&child, "parentCID");
    assert_eq!(parent_cid, embedded_value(&base, "CID"));
    // The parent was written to after the snapshot: its CID changed.
    let changed = if parent_cid.starts_with('0') { "1" } else { "0" };
    let new_cid = format!("{changed}{}", &parent_cid[1..]);
    edit_in_place(&base, &format!("CID={parent_cid}"), &format!("CID={new_cid}"));
    let err = open_disk(&child).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::BadDescriptor { .. }), "{msg}");
    assert!(msg.contains("chain is broken"), "{msg}");
    assert!(msg.contains("base-000001.vmdk") && msg.contains("base.vmdk"), "{msg}");
    assert!(msg.contains(&parent_cid) && msg.contains(&new_cid), "{msg}");

    // A missing parent.
    fs::remove_file(&base).unwrap();
    let msg = open_disk(&child).unwrap_err().to_string();
    assert!(msg.contains("parent base.vmdk does not exist"), "{msg}");
    assert!(msg.contains("base-000001.vmdk"), "{msg}");
}

const DELTA: &str = "# Disk DescriptorFile\nversion=1\n";

/// A text descriptor: content ID `cid`, parent `parent` (hint and CID) if any, one extent.
fn delta(dir: &Path, name: &str, cid: &str, parent: Option<(&str, &str)>, extent: &str) -> PathBuf {
    let parent = match parent {
        Some((hint, cid)) => format!("parentCID={cid}\nparentFileNameHint=\"{hint}\"\n"),
        None => "parentCID=ffffffff\n".to_owned(),
    };
    write(dir, name, format!("{DELTA}CID={cid}\n{parent}{extent}\n"))
}

#[test]
fn loops_and_chains_too_deep_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // a → b → a.
    delta(d, "a.vmdk", "0000000a", Some(("b.vmdk", "0000000b")), "RW 16 ZERO");
    delta(d, "b.vmdk", "0000000b", Some(("a.vmdk", "0000000a")), "RW 16 ZERO");
    let msg = open_disk(&d.join("a.vmdk")).unwrap_err().to_string();
    assert!(
        msg.contains("loops") && msg.contains("a.vmdk → b.vmdk → a.vmdk"),
        "{msg}"
    );
    // A delta that names itself.
    let path = delta(
        d,
        "self.vmdk",
        "00000001",
        Some(("./self.vmdk", "00000001")),
        "RW 16 ZERO",
    );
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(msg.contains("loops"), "{msg}");

    // A chain of MAX_CHAIN_DEPTH disks opens; one more is refused.
    delta(d, "d0.vmdk", "00000000", None, "RW 16 ZERO");
    for i in 1..=MAX_CHAIN_DEPTH {
        let parent = format!("d{}.vmdk", i - 1);
        let parent_cid = format!("{:08x}", i - 1);
        delta(
            d,
            &format!("d{i}.vmdk"),
            &format!("{i:08x}"),
            Some((&parent, &parent_cid)),
            "RW 16 ZERO",
        );
    }
    let deepest = format!("d{}.vmdk", MAX_CHAIN_DEPTH - 1);
    let disk = open_disk(&d.join(deepest)).unwrap();
    assert_eq!(disk.capacity(), 16 * 512);
    let msg = open_disk(&d.join(format!("d{MAX_CHAIN_DEPTH}.vmdk")))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("more than 255 disks deep"), "{msg}");
}

#[test]
fn parent_hints_and_cids_of_hand_written_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = pseudo_random(8 * 512, 6);
    write(d, "base-flat.vmdk", &base);
    delta(d, "base.vmdk", "fedcba98", None, "RW 8 FLAT \"base-flat.vmdk\" 0");
    // A delta of FLAT and ZERO extents over the base: the hint is an absolute path from the
    // original host, so the parent is found by its name next to the delta.
    write(d, "top-flat.vmdk", pseudo_random(4 * 512, 7));
    delta(
        d,
        "top.vmdk",
        "00000002",
        Some(("/vmfs/volumes/datastore1/web01/base.vmdk", "FEDCBA98")),
        "RW 4 FLAT \"top-flat.vmdk\" 0\nRW 6 ZERO",
    );
    let opened = crate::source::disk::open(&d.join("top.vmdk")).unwrap();
    assert_eq!(opened.format, DiskFormat::VmdkSparse);
    assert!(
        opened.warnings.iter().any(|w| w.contains("from the same folder")),
        "{:?}",
        opened.warnings
    );
    let mut expected = pseudo_random(4 * 512, 7);
    expected.resize(10 * 512, 0);
    assert!(read_all(&*opened.reader, 1000) == expected);
    assert!(opened.reader.is_hole(4 * 512, 6 * 512));

    // parentCID without a hint, and a parent without a CID.
    let path = write(
        d,
        "orphan.vmdk",
        format!("{DELTA}CID=1\nparentCID=12345678\nRW 8 ZERO\n"),
    );
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(msg.contains("no parentFileNameHint"), "{msg}");
    write(d, "nocid.vmdk", "# Disk DescriptorFile\nRW 8 ZERO\n");
    let path = delta(
        d,
        "child.vmdk",
        "00000003",
        Some(("nocid.vmdk", "00000004")),
        "RW 8 ZERO",
    );
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(msg.contains("has no CID"), "{msg}");
    // A parent that is not a VMDK at all.
    write(d, "notes.txt", pseudo_random(4096, 1));
    let path = delta(d, "bad.vmdk", "00000005", Some(("notes.txt", "00000006")), "RW 8 ZERO");
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(msg.contains("notes.txt") && msg.contains("not a VMDK"), "{msg}");
    // An SESPARSE extent that is no SEsparse file.
    write(d, "se-delta.vmdk", pseudo_random(4096, 3));
    let path = write(
        d,
        "se.vmdk",
        format!(
            "{DELTA}CID=1\nparentCID=fedcba98\nparentFileNameHint=\"base.vmdk\"\nRW 8 SESPARSE \"se-delta.vmdk\"\n"
        ),
    );
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(
        msg.contains("se-delta.vmdk") && msg.contains("nor an SEsparse file"),
        "{msg}"
    );
}

#[test]
fn a_twogb_sparse_descriptor_with_many_extents() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 70 extents (more than are kept open), each a small sparse file.
    let extent = d.join("piece.vmdk");
    let data = pseudo_random(64 * 1024, 2);
    let raw = write(d, "piece.raw", &data);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        s(&raw),
        s(&extent),
    ]);
    let mut descriptor = format!("{DELTA}CID=1\nparentCID=ffffffff\n");
    for i in 0..70 {
        fs::copy(&extent, d.join(format!("p{i:02}.vmdk"))).unwrap();
        descriptor.push_str(&format!("RW 128 SPARSE \"p{i:02}.vmdk\"\n"));
    }
    let path = write(d, "many.vmdk", descriptor);
    let disk = open_disk(&path).unwrap();
    assert_eq!(disk.capacity(), 70 * 65_536);
    let all = read_all(&*disk, 100_000);
    for piece in all.chunks(65_536) {
        assert!(piece == data);
    }
    // A missing extent is named.
    fs::remove_file(d.join("p33.vmdk")).unwrap();
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(msg.contains("extent p33.vmdk does not exist"), "{msg}");
}

#[test]
fn a_vmx_naming_sparse_disks_opens() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, grandchild) = qemu_chain(dir.path());
    let raw = write(dir.path(), "data.raw", pseudo_random(3 << 20, 1));
    let stream = dir.path().join("data.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&raw),
        s(&stream),
    ]);
    let vmx = write(
        dir.path(),
        "web01.vmx",
        format!(
            "config.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"web01\"\nmemsize = \"1024\"\n\
             scsi0.present = \"TRUE\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"{}\"\n\
             scsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"data.vmdk\"\n",
            grandchild.file_name().unwrap().to_str().unwrap()
        ),
    );
    let vm = open_vm(&vmx).unwrap();
    assert_eq!(vm.disks.len(), 2);
    assert_eq!(vm.disks[0].capacity, 8 << 20);
    assert_eq!(vm.disks[0].format, DiskFormat::VmdkSparse);
    assert_eq!(vm.disks[1].capacity, 3 << 20);
    assert_eq!(vm.disks[1].format, DiskFormat::VmdkStreamOptimized);
    assert!(
        vm.notes
            .iter()
            .any(|n| n.starts_with("scsi0:0: a snapshot chain of 3 disks")),
        "{:?}",
        vm.notes
    );
}

/// An ESX sparse extent (COWD) as ESX writes it: a 2048-byte header, the grain directory at
/// sector 4, tables of 4096 entries, then grains. `grains` are (grain number, bytes).
fn esx_delta(capacity_sectors: u32, grain_sectors: u32, grains: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let tables = (capacity_sectors.div_ceil(grain_sectors)).div_ceil(4096);
    let gd_sectors = (tables * 4).div_ceil(512);
    let mut out = vec![0u8; 2048];
    out[..4].copy_from_slice(b"COWD");
    for (at, value) in [
        (4, 1),
        (8, 3),
        (12, capacity_sectors),
        (16, grain_sectors),
        (20, 4),
        (24, tables),
    ] {
        out[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    let gd_at = out.len();
    out.resize(out.len() + gd_sectors as usize * 512, 0);
    let first_table = (out.len() / 512) as u32;
    for t in 0..tables {
        let at = gd_at + t as usize * 4;
        out[at..at + 4].copy_from_slice(&(first_table + t * 32).to_le_bytes());
    }
    let tables_at = out.len();
    out.resize(out.len() + tables as usize * 16_384, 0);
    for (grain, bytes) in grains {
        let sector = (out.len() / 512) as u32;
        let at = tables_at + *grain as usize * 4;
        out[at..at + 4].copy_from_slice(&sector.to_le_bytes());
        let mut bytes = bytes.clone();
        bytes.resize(grain_sectors as usize * 512, 0);
        out.extend_from_slice(&bytes);
    }
    out
}

#[test]
fn an_esx_vmfs_sparse_delta_over_a_flat_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Base: 1 MiB, data in the first 256 KiB, a hole after.
    let base_flat = d.join("web01-flat.vmdk");
    let file = fs::File::create(&base_flat).unwrap();
    file.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &pseudo_random(256 << 10, 1), 0).unwrap();
    drop(file);
    write(
        d,
        "web01.vmdk",
        "# Disk DescriptorFile\nversion=1\nCID=2a3b4c5d\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\
         RW 2048 VMFS \"web01-flat.vmdk\"\n",
    );
    // The delta: 512-byte grains, as ESX makes them.
    let grains: Vec<(u32, Vec<u8>)> = [10u32, 11, 500, 1500, 2047]
        .iter()
        .map(|&g| (g, pseudo_random(512, u64::from(g))))
        .collect();
    write(d, "web01-000001-delta.vmdk", esx_delta(2048, 1, &grains));
    let delta = write(
        d,
        "web01-000001.vmdk",
        "# Disk DescriptorFile\nversion=1\nCID=99999999\nparentCID=2a3b4c5d\ncreateType=\"vmfsSparse\"\n\
         parentFileNameHint=\"web01.vmdk\"\nRW 2048 VMFSSPARSE \"web01-000001-delta.vmdk\"\n",
    );
    let mut expected = fs::read(&base_flat).unwrap();
    for (grain, bytes) in &grains {
        let at = *grain as usize * 512;
        expected[at..at + 512].copy_from_slice(bytes);
    }
    let opened = crate::source::disk::open(&delta).unwrap();
    assert_eq!(opened.format, DiskFormat::VmdkSparse);
    assert!(read_all(&*opened.reader, 65_536) == expected);
    assert!(read_all(&*opened.reader, 1000) == expected);
    let disk = opened.reader;
    assert!(!disk.is_hole(0, 512));
    assert!(
        disk.is_hole(512 << 10, 200 << 10),
        "neither the delta nor the base holds data there"
    );
    assert!(!disk.is_hole(512 << 10, 512 << 10), "grain 1500 is in the delta");

    // A COWD file opened on its own points to its descriptor.
    let msg = open_disk(&d.join("web01-000001-delta.vmdk")).unwrap_err().to_string();
    assert!(msg.contains("COWD") && msg.contains("descriptor instead"), "{msg}");

    // Corrupt ESX headers.
    let good = esx_delta(2048, 1, &grains);
    for (name, at, value, expect) in [
        ("v2-delta.vmdk", 4, 2u32, "COWD) version 2 is not supported yet"),
        ("grain-delta.vmdk", 16, 3, "grain size 3 sectors"),
        ("gd-delta.vmdk", 24, 0, "the grain directory has 0 entries"),
        ("gdpast-delta.vmdk", 20, 1_000_000, "does not lie within the file"),
    ] {
        let mut bytes = good.clone();
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        write(d, name, bytes);
        let descriptor = write(
            d,
            "bad.vmdk",
            format!(
                "# Disk DescriptorFile\nCID=1\nparentCID=2a3b4c5d\nparentFileNameHint=\"web01.vmdk\"\n\
                 RW 2048 VMFSSPARSE \"{name}\"\n"
            ),
        );
        let msg = open_disk(&descriptor).unwrap_err().to_string();
        assert!(msg.contains(name) && msg.contains(expect), "{name}: {msg}");
    }
    // A VMFSSPARSE extent that is not a sparse file at all.
    write(d, "junk-delta.vmdk", pseudo_random(4096, 2));
    let descriptor = write(
        d,
        "junk.vmdk",
        "# Disk DescriptorFile\nCID=1\nparentCID=ffffffff\nRW 8 VMFSSPARSE \"junk-delta.vmdk\"\n",
    );
    let msg = open_disk(&descriptor).unwrap_err().to_string();
    assert!(
        msg.contains("junk.vmdk line 4") && msg.contains("neither a hosted"),
        "{msg}"
    );
}
