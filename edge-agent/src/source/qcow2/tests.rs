//! qcow2 images made by the real qemu-img / qemu-io, read back and compared with what
//! `qemu-img convert -O raw` makes of them. Helpers shared with `damage_tests`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::reader::Qcow2Disk;
use super::*;
use crate::source::testutil::{pseudo_random, qemu_img, s, write};
use crate::source::{open_disk, open_vm};

pub(super) const MIB: usize = 1 << 20;

/// 5 MiB and 7 sectors (not a whole number of clusters): random, compressible and zero
/// regions; [2 MiB, 4 MiB) is zeros, a hole at every cluster size.
pub(super) fn sample() -> Vec<u8> {
    let mut data = vec![0; 5 * MIB + 7 * 512];
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .copied()
        .cycle()
        .take(MIB / 2)
        .collect();
    data[..MIB].copy_from_slice(&pseudo_random(MIB, 1));
    data[MIB..MIB + MIB / 2].copy_from_slice(&text);
    data[MIB + MIB / 2..2 * MIB].copy_from_slice(&pseudo_random(MIB / 2, 2));
    data[4 * MIB..4 * MIB + MIB / 2].copy_from_slice(&text);
    let tail = 5 * MIB..data.len();
    data[tail.clone()].copy_from_slice(&pseudo_random(tail.len(), 3));
    data
}

/// Runs `qemu-io` on a qcow2 image, panicking with its output if it fails.
pub(super) fn qemu_io(image: &Path, command: &str) {
    let output = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", command, s(image)])
        .output()
        .expect("these tests need qemu-io on PATH (apt-get install qemu-utils)");
    assert!(
        output.status.success(),
        "qemu-io -c {command:?} {image:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What `qemu-img convert -O raw` reads from `image`: the reference.
pub(super) fn qemu_reads(image: &Path) -> Vec<u8> {
    let out = image.with_extension("reference.raw");
    qemu_img(&["convert", "-O", "raw", s(image), s(&out)]);
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

/// The whole disk, read in pieces that straddle cluster boundaries.
pub(super) fn read_all(disk: &dyn DiskReader) -> Vec<u8> {
    let mut all = vec![0; disk.capacity() as usize];
    for (i, piece) in all.chunks_mut(1_000_003).enumerate() {
        disk.read_at(i as u64 * 1_000_003, piece).unwrap();
    }
    all
}

pub(super) fn convert(dir: &Path, raw: &Path, name: &str, options: &[&str]) -> PathBuf {
    let image = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(options);
    args.extend_from_slice(&[s(raw), s(&image)]);
    qemu_img(&args);
    image
}

pub(super) fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, offset)
        .unwrap();
}

pub(super) fn be64(path: &Path, offset: u64) -> u64 {
    let mut buf = [0; 8];
    fs::File::open(path).unwrap().read_exact_at(&mut buf, offset).unwrap();
    u64::from_be_bytes(buf)
}

/// Host offset of the first L2 table.
pub(super) fn first_l2(path: &Path) -> u64 {
    be64(path, be64(path, 40)) & 0x00ff_ffff_ffff_fe00
}

pub(super) fn open_concrete(path: &Path) -> Qcow2Disk {
    let _link = ChainLink::enter(path).unwrap();
    open_image(path).unwrap().0
}

#[test]
fn reads_images_made_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample();
    let raw = write(dir.path(), "disk.raw", &data);
    for (name, options) in [
        ("v3.qcow2", &[][..]),
        ("v2.qcow2", &["-o", "compat=0.10"][..]),
        ("deflate.qcow2", &["-c"][..]),
        ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"][..]),
        ("v2-deflate.qcow2", &["-c", "-o", "compat=0.10"][..]),
        ("c4k.qcow2", &["-o", "cluster_size=4096"][..]),
        ("c2m.qcow2", &["-o", "cluster_size=2M"][..]),
        ("c512-deflate.qcow2", &["-c", "-o", "cluster_size=512"][..]),
        (
            "c2m-zstd.qcow2",
            &["-c", "-o", "cluster_size=2M,compression_type=zstd"][..],
        ),
    ] {
        let image = convert(dir.path(), &raw, name, options);
        if options.contains(&"-c") {
            let map = Command::new("qemu-img")
                .args(["map", "--output=json", s(&image)])
                .output()
                .unwrap();
            let map = String::from_utf8_lossy(&map.stdout);
            assert!(map.contains("\"compressed\": true"), "{name} is not compressed: {map}");
        }
        let opened = disk::open(&image).unwrap();
        assert_eq!(opened.format, DiskFormat::Qcow2, "{name}");
        assert!(opened.warnings.is_empty(), "{name}: {:?}", opened.warnings);
        let disk = opened.reader;
        assert_eq!(disk.capacity(), data.len() as u64, "{name}");
        assert!(read_all(disk.as_ref()) == data, "{name} reads wrong");
        assert!(disk.is_hole(2 << 20, 2 << 20), "{name}: the zero region is not a hole");
        assert!(!disk.is_hole(0, 4096), "{name}");
        assert!(!disk.is_hole(MIB as u64 + 1000, 10), "{name}: the text is data");
        assert!(!disk.is_hole(2 << 20, 3 << 20), "{name}: part of the range is data");
        assert!(!disk.is_hole(5 << 20, 3584), "{name}: the tail is data");

        // Reads at the end, and past it.
        let mut buf = vec![0; 3000];
        disk.read_at(data.len() as u64 - 3000, &mut buf).unwrap();
        assert_eq!(buf, data[data.len() - 3000..], "{name}");
        let err = disk.read_at(data.len() as u64 - 10, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name}");
    }
}

#[test]
fn reads_from_many_threads_with_a_small_l2_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample();
    let raw = write(dir.path(), "disk.raw", &data);
    // 512-byte clusters: an L2 table maps only 32 KiB, so the disk has 161 of them.
    let image = convert(dir.path(), &raw, "small.qcow2", &["-o", "cluster_size=512"]);
    let disk = open_concrete(&image);
    disk.set_l2_cache_tables(4);
    std::thread::scope(|scope| {
        for seed in 0..8u64 {
            let (disk, data) = (&disk, &data);
            scope.spawn(move || {
                let picks = pseudo_random(64 * 8, seed + 100);
                for pick in picks.chunks_exact(8) {
                    let pick = u64::from_le_bytes(pick.try_into().unwrap());
                    let offset = pick % data.len() as u64;
                    let len = ((pick >> 40) % 200_000).min(data.len() as u64 - offset) as usize;
                    let mut buf = vec![0; len];
                    disk.read_at(offset, &mut buf).unwrap();
                    assert!(buf == data[offset as usize..offset as usize + len], "at {offset}+{len}");
                }
            });
        }
    });
    assert!(disk.l2_cached() <= 4, "{} tables cached", disk.l2_cached());
}

#[test]
fn reads_only_what_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&image), "100G"]);
    qemu_io(&image, "write -P 0x5a 50G 1M");
    let disk = open_concrete(&image);
    assert_eq!(disk.capacity(), 100 << 30);
    let chunk = 64u64 << 20;
    let mut buf = vec![0; chunk as usize];
    let mut data_chunks = 0;
    for offset in (0..disk.capacity()).step_by(chunk as usize) {
        if disk.is_hole(offset, chunk) {
            continue;
        }
        data_chunks += 1;
        disk.read_at(offset, &mut buf).unwrap();
        let data = (50u64 << 30) - offset..(50u64 << 30) + MIB as u64 - offset;
        for (i, byte) in buf.iter().enumerate() {
            assert_eq!(
                *byte,
                if data.contains(&(i as u64)) { 0x5a } else { 0 },
                "at {}",
                offset + i as u64
            );
        }
    }
    assert_eq!(data_chunks, 1);
    // 1 MiB of data, 1.6 KiB of L1 and one 64 KiB L2 table.
    let read = disk.bytes_read();
    assert!(read < MIB as u64 + 100 * 1024, "read {read} bytes");
}

#[test]
fn reads_zero_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = pseudo_random(4 * MIB, 9);
    let raw = write(dir.path(), "disk.raw", &data);
    let image = convert(dir.path(), &raw, "zeroed.qcow2", &[]);
    qemu_io(&image, "write -z 0 1M");
    qemu_io(&image, "write -z -u 2M 128k");
    data[..MIB].fill(0);
    data[2 * MIB..2 * MIB + 128 * 1024].fill(0);
    assert!(qemu_reads(&image) == data);
    let disk = open_disk(&image).unwrap();
    assert!(read_all(disk.as_ref()) == data);
    assert!(disk.is_hole(0, MIB as u64));
    assert!(disk.is_hole(2 << 20, 128 << 10));
    assert!(!disk.is_hole(MIB as u64 - 512, 1024));
}

#[test]
fn flattens_backing_chains() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample();
    let raw = write(dir.path(), "base.raw", &data);
    let base = convert(dir.path(), &raw, "base.qcow2", &[]);
    let create = |name: &str, backing: &Path, format: &str, size: Option<&str>| {
        let image = dir.path().join(name);
        let mut args = vec!["create", "-f", "qcow2", "-b", s(backing), "-F", format, s(&image)];
        args.extend(size);
        qemu_img(&args);
        image
    };

    // One level.
    let top = create("top.qcow2", &base, "qcow2", None);
    qemu_io(&top, "write -P 0x22 512k 64k");
    let expected = qemu_reads(&top);
    let opened = disk::open(&top).unwrap();
    assert_eq!(opened.format, DiskFormat::Qcow2);
    assert!(opened.warnings.is_empty(), "{:?}", opened.warnings);
    assert!(read_all(opened.reader.as_ref()) == expected);
    assert!(opened.reader.is_hole(2 << 20, 2 << 20), "a hole in the whole chain");
    assert!(!opened.reader.is_hole(0, 4096), "data in the base");
    assert!(!opened.reader.is_hole(512 << 10, 64 << 10), "data in the top");

    // Two levels, with data and zeros written over the base's data and holes.
    let mid = create("mid.qcow2", &base, "qcow2", None);
    qemu_io(&mid, "write -P 0x33 1M 128k");
    let top2 = create("top2.qcow2", &mid, "qcow2", None);
    qemu_io(&top2, "write -P 0x44 3M 4k");
    qemu_io(&top2, "write -z 0 64k");
    let expected = qemu_reads(&top2);
    let disk = open_disk(&top2).unwrap();
    assert!(read_all(disk.as_ref()) == expected);
    assert!(disk.is_hole(0, 64 << 10), "zeroed over the base's data");
    assert!(!disk.is_hole(3 << 20, 64 << 10));
    assert!(disk.is_hole(2 << 20, 1 << 20));

    // A top larger than its base: past the base's end reads zeros.
    let large = create("large.qcow2", &base, "qcow2", Some("8M"));
    qemu_io(&large, "write -P 0x55 7M 4k");
    let expected = qemu_reads(&large);
    let disk = open_disk(&large).unwrap();
    assert_eq!(disk.capacity(), 8 << 20);
    assert!(read_all(disk.as_ref()) == expected);
    assert!(disk.is_hole(6 << 20, 1 << 20));

    // A raw backing file, and a flat VMDK one.
    let over_raw = create("over-raw.qcow2", &raw, "raw", None);
    qemu_io(&over_raw, "write -P 0x66 100k 8k");
    let expected = qemu_reads(&over_raw);
    assert!(read_all(open_disk(&over_raw).unwrap().as_ref()) == expected);
    let vmdk = dir.path().join("base.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&raw),
        s(&vmdk),
    ]);
    let over_vmdk = create("over-vmdk.qcow2", &vmdk, "vmdk", None);
    qemu_io(&over_vmdk, "write -P 0x77 4M 64k");
    let expected = qemu_reads(&over_vmdk);
    assert!(read_all(open_disk(&over_vmdk).unwrap().as_ref()) == expected);
}

#[test]
fn resolves_backing_names_against_the_images_folder() {
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made");
    fs::create_dir(&made).unwrap();
    let data = sample();
    write(&made, "base.raw", &data);
    let qemu_img_in = |args: &[&str]| {
        let status = Command::new("qemu-img").args(args).current_dir(&made).output().unwrap();
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    };
    qemu_img_in(&["convert", "-O", "qcow2", "base.raw", "base.qcow2"]);
    qemu_img_in(&["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    qemu_io(&made.join("top.qcow2"), "write -P 0x22 0 4k");
    let expected = qemu_reads(&made.join("top.qcow2"));
    // Moved elsewhere, and opened from another working directory: still found.
    let moved = dir.path().join("moved");
    fs::rename(&made, &moved).unwrap();
    let disk = open_disk(&moved.join("top.qcow2")).unwrap();
    assert!(read_all(disk.as_ref()) == expected);

    // Without a recorded format, the backing file's format is probed, with a note.
    let top = moved.join("top.qcow2");
    let at = u64::from(be64(&top, 96) as u32); // header_length: the first extension
    assert_eq!(be64(&top, at) >> 32, 0xE279_2ACA);
    patch(&top, at, &0x0BAD_0BADu32.to_be_bytes());
    let opened = disk::open(&top).unwrap();
    assert!(read_all(opened.reader.as_ref()) == expected);
    assert!(
        opened.warnings.len() == 1 && opened.warnings[0].contains("does not record its backing file's format"),
        "{:?}",
        opened.warnings
    );
}

#[test]
fn reads_the_active_state_of_an_image_with_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path(), "disk.raw", sample());
    let image = convert(dir.path(), &raw, "snap.qcow2", &[]);
    qemu_img(&["snapshot", "-c", "s1", s(&image)]);
    qemu_io(&image, "write -P 0x77 0 64k");
    let expected = qemu_reads(&image);
    assert!(expected[..65536].iter().all(|&b| b == 0x77));
    let opened = disk::open(&image).unwrap();
    assert!(read_all(opened.reader.as_ref()) == expected);
    assert!(
        opened.warnings.len() == 1 && opened.warnings[0].contains("1 internal snapshot(s)"),
        "{:?}",
        opened.warnings
    );
}

#[test]
fn a_vmx_names_a_qcow2_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = sample();
    let raw = write(dir.path(), "disk.raw", &data);
    convert(dir.path(), &raw, "web01.qcow2", &[]);
    let vmx = write(
        dir.path(),
        "web01.vmx",
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\n\
         displayName = \"web01\"\nmemsize = \"1024\"\nscsi0.present = \"TRUE\"\nscsi0.virtualDev = \"lsilogic\"\nscsi0:0.present = \"TRUE\"\n\
         scsi0:0.fileName = \"web01.qcow2\"\n",
    );
    let vm = open_vm(&vmx).unwrap();
    assert_eq!(vm.disks.len(), 1);
    assert_eq!(vm.disks[0].format, DiskFormat::Qcow2);
    assert_eq!(vm.disks[0].capacity, data.len() as u64);
    assert!(vm.notes.is_empty(), "{:?}", vm.notes);
}

/// What a backup job leaves in its target: data clusters, zero clusters (`write -z`
/// without unmap, as a backup writes a range that now reads as zeros) and unallocated
/// ones. Only the first two count as written, a zero cluster included.
#[test]
fn a_backup_image_says_which_ranges_were_written_zero_clusters_included() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("backup.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "4M"]);
    qemu_io(&image, "write -P 0x5a 1M 64k");
    qemu_io(&image, "write -z 3M 64k");
    let backup = BackupImage::open(&image).unwrap();
    let chunk = 64 * 1024;
    let written: Vec<u64> = (0..64).filter(|i| backup.written(i * chunk, chunk).unwrap()).collect();
    assert_eq!(written, vec![16, 48]);
    // A range that only touches a written cluster counts; reads are the image's.
    assert!(backup.written(1024 * 1024 - 512, 1024).unwrap());
    let mut buf = vec![1; 4096];
    backup.read_at(3 * MIB as u64, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    backup.read_at(MIB as u64, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}
