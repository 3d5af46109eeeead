use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::source::testutil::{pseudo_random, qemu_img, s, write};
use crate::source::{open_disk, DiskFormat};

const HEADER: &str = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n";

/// Reads the whole disk in chunks of `chunk` bytes.
fn read_all(disk: &dyn DiskReader, chunk: usize) -> Vec<u8> {
    let mut out = vec![0; disk.capacity() as usize];
    for (i, piece) in out.chunks_mut(chunk).enumerate() {
        disk.read_at((i * chunk) as u64, piece).unwrap();
    }
    out
}

fn open_err(path: &Path) -> SourceError {
    open_disk(path).expect_err("the disk should be refused")
}

#[test]
fn monolithic_flat_from_qemu_img_reads_back_the_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(3 << 20, 1);
    let raw = write(dir.path(), "src.raw", &data);
    let vmdk = dir.path().join("dst.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&raw),
        s(&vmdk),
    ]);

    let opened = crate::source::disk::open(&vmdk).unwrap();
    assert_eq!(opened.format, DiskFormat::VmdkFlat);
    assert!(opened.warnings.is_empty(), "{:?}", opened.warnings);
    assert_eq!(opened.reader.capacity(), data.len() as u64);
    assert!(read_all(&*opened.reader, 1 << 20) == data);
    assert!(read_all(&*opened.reader, 65_537) == data);
}

#[test]
fn two_gb_max_extent_flat_from_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentFlat",
        s(&empty),
        "5M",
    ]);
    let disk = open_disk(&empty).unwrap();
    assert_eq!(disk.capacity(), 5 << 20);
    assert!(read_all(&*disk, 1 << 20).iter().all(|&b| b == 0));

    let data = pseudo_random(2 << 20, 2);
    let raw = write(dir.path(), "src.raw", &data);
    let vmdk = dir.path().join("split.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentFlat",
        s(&raw),
        s(&vmdk),
    ]);
    let disk = open_disk(&vmdk).unwrap();
    assert!(read_all(&*disk, 100_000) == data);
}

/// Three FLAT extents (one at an offset in its file, one in a file longer than the extent), a
/// ZERO extent and an empty one; returns the descriptor's path and the disk's expected bytes.
fn hand_written_disk(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let a = pseudo_random(64 * 512, 10);
    let b_file = pseudo_random(40 * 512, 11); // the extent starts 8 sectors in
    let c_file = pseudo_random(32 * 512 + 100, 12); // 32-sector extent, file longer
    write(dir, "disk-f001.vmdk", &a);
    write(dir, "disk f002.vmdk", &b_file);
    write(dir, "disk-f003.vmdk", &c_file);
    let descriptor = format!(
        "{HEADER}createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n\
         RW 64 FLAT \"disk-f001.vmdk\" 0\n\
         RW 0 FLAT \"disk-f001.vmdk\" 0\n\
         RDONLY 32 FLAT \"disk f002.vmdk\" 8\n\
         RW 16 ZERO\n\
         RW 32 VMFS \"disk-f003.vmdk\"\n\n\
         ddb.adapterType = \"lsilogic\"\nddb.uuid = \"60 00 C2 9b\"\n"
    );
    let path = write(dir, "disk.vmdk", descriptor);

    let mut expected = a;
    expected.extend_from_slice(&b_file[8 * 512..]);
    expected.extend(std::iter::repeat_n(0, 16 * 512));
    expected.extend_from_slice(&c_file[..32 * 512]);
    (path, expected)
}

#[test]
fn reads_across_hand_written_extents() {
    let dir = tempfile::tempdir().unwrap();
    let (path, expected) = hand_written_disk(dir.path());
    let opened = crate::source::disk::open(&path).unwrap();
    assert_eq!(opened.format, DiskFormat::VmdkFlat);
    assert!(opened.warnings.is_empty(), "{:?}", opened.warnings);
    let disk = opened.reader;
    assert_eq!(disk.capacity(), expected.len() as u64);
    for chunk in [1, 511, 512, 4096, 7777, expected.len()] {
        assert!(read_all(&*disk, chunk) == expected, "chunk size {chunk}");
    }
    // Every read that starts and ends anywhere, including on extent boundaries.
    let len = expected.len();
    for start in (0..len).step_by(1531) {
        for size in [1, 512, 8191, 40_000] {
            let end = (start + size).min(len);
            let mut buf = vec![0xAA; end - start];
            disk.read_at(start as u64, &mut buf).unwrap();
            assert!(buf == expected[start..end], "read {start}..{end}");
        }
    }
    let mut buf = [0u8; 2];
    let err = disk.read_at(len as u64 - 1, &mut buf).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn several_threads_read_one_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (path, expected) = hand_written_disk(dir.path());
    let disk: Arc<dyn DiskReader> = Arc::from(open_disk(&path).unwrap());
    let expected = Arc::new(expected);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (disk, expected) = (Arc::clone(&disk), Arc::clone(&expected));
            std::thread::spawn(move || {
                for round in 0..50 {
                    let start = (t * 7919 + round * 3001) % (expected.len() - 5000);
                    let mut buf = vec![0; 5000];
                    disk.read_at(start as u64, &mut buf).unwrap();
                    assert!(buf == expected[start..start + 5000]);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn many_extents_are_opened_per_read() {
    let dir = tempfile::tempdir().unwrap();
    let count = KEEP_OPEN_EXTENTS * 2;
    let mut descriptor = format!("{HEADER}createType=\"twoGbMaxExtentFlat\"\n");
    let mut expected = Vec::new();
    for i in 0..count {
        let data = pseudo_random(1024, i as u64);
        write(dir.path(), &format!("m-f{i:03}.vmdk"), &data);
        descriptor.push_str(&format!("RW 2 FLAT \"m-f{i:03}.vmdk\" 0\n"));
        expected.extend_from_slice(&data);
    }
    let path = write(dir.path(), "m.vmdk", descriptor);
    let disk = open_disk(&path).unwrap();
    assert!(read_all(&*disk, 1000) == expected);
}

#[test]
fn zero_extents_read_as_zeros_and_an_empty_disk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "z.vmdk", format!("{HEADER}RW 2048 ZERO\nRW 8 ZERO\n"));
    let disk = open_disk(&path).unwrap();
    assert_eq!(disk.capacity(), 2056 * 512);
    assert!(read_all(&*disk, 4096).iter().all(|&b| b == 0));

    let path = write(dir.path(), "e.vmdk", format!("{HEADER}RW 0 ZERO\n"));
    assert!(matches!(open_err(&path), SourceError::EmptyImage { .. }));
}

#[test]
fn sparse_descriptors_and_snapshots_go_to_the_sparse_reader() {
    // The details are tested in vmdk_sparse_tests.rs and vmdk_chain_tests.rs.
    let dir = tempfile::tempdir().unwrap();
    for (subformat, format) in [
        ("monolithicSparse", DiskFormat::VmdkSparse),
        ("streamOptimized", DiskFormat::VmdkStreamOptimized),
        ("twoGbMaxExtentSparse", DiskFormat::VmdkSparse),
    ] {
        let path = dir.path().join(format!("{subformat}.vmdk"));
        qemu_img(&[
            "create",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={subformat}"),
            s(&path),
            "8M",
        ]);
        let opened = crate::source::disk::open(&path).unwrap();
        assert_eq!(
            (opened.format, opened.reader.capacity()),
            (format, 8 << 20),
            "{subformat}"
        );
        assert!(opened.reader.is_hole(0, 8 << 20), "{subformat}");
    }
    // A snapshot child made by qemu-img is itself a hosted sparse file.
    let child = dir.path().join("child.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-b",
        "monolithicSparse.vmdk",
        "-F",
        "vmdk",
        s(&child),
    ]);
    let opened = crate::source::disk::open(&child).unwrap();
    assert_eq!(opened.format, DiskFormat::VmdkSparse);
}

#[test]
fn sparse_extent_types_snapshots_and_rdms_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "x-delta.vmdk", pseudo_random(4096, 1));
    for (body, expect) in [
        (
            "createType=\"monolithicSparse\"\nRW 8 FLAT \"x-delta.vmdk\" 0\n",
            "SPARSE extents (monolithicSparse)",
        ),
        (
            "createType=\"vmfsRawDeviceMap\"\nRW 8 VMFSRDM \"x-delta.vmdk\"\n",
            "raw device mapping",
        ),
        (
            "createType=\"vmfs\"\nRW 8 VMFSRAW \"x-delta.vmdk\"\n",
            "raw device mapping",
        ),
    ] {
        let path = write(dir.path(), "x.vmdk", format!("{HEADER}{body}"));
        let err = open_err(&path);
        assert!(matches!(err, SourceError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains(expect), "{err}");
    }
    let snapshot = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=87654321\n\
                    createType=\"vmfs\"\nparentFileNameHint=\"web01.vmdk\"\n\
                    RW 8 VMFS \"x-delta.vmdk\"\n";
    let path = write(dir.path(), "x.vmdk", snapshot);
    let msg = open_err(&path).to_string();
    assert!(msg.contains("snapshot") && msg.contains("web01.vmdk"), "{msg}");
}

#[test]
fn garbage_and_truncated_descriptors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = dir.path().join("q.vmdk");
    qemu_img(&["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", s(&qemu), "1M"]);
    let text = fs::read_to_string(&qemu).unwrap();
    let extent_at = text.find("RW ").unwrap();

    for (name, content, line, expect) in [
        ("cut-before.vmdk", text[..extent_at].to_owned(), None, "no extent lines"),
        (
            "cut-inside.vmdk",
            text[..extent_at + 14].to_owned(),
            Some(8),
            "no closing",
        ),
        (
            "garbage.vmdk",
            format!("{HEADER}?? !!garbage!!\n"),
            Some(5),
            "expected an extent line",
        ),
        (
            "binary.vmdk",
            format!("{HEADER}RW 8 FLAT \"a\u{7}b\"\n"),
            None,
            "binary data",
        ),
        (
            "unknown.vmdk",
            format!("{HEADER}RW 8 WEIRD \"q-flat.vmdk\"\n"),
            Some(5),
            "unknown extent type",
        ),
        (
            "noaccess.vmdk",
            format!("{HEADER}NOACCESS 8 FLAT \"q-flat.vmdk\" 0\n"),
            Some(5),
            "NOACCESS",
        ),
        ("noname.vmdk", format!("{HEADER}RW 8 FLAT\n"), Some(5), "no file name"),
        (
            "extra.vmdk",
            format!("{HEADER}RW 8 FLAT \"q-flat.vmdk\" 0 junk\n"),
            Some(5),
            "`junk`",
        ),
        (
            "nan.vmdk",
            format!("{HEADER}RW eight FLAT \"q-flat.vmdk\" 0\n"),
            Some(5),
            "not a whole number",
        ),
    ] {
        let path = write(dir.path(), name, content);
        let err = open_err(&path);
        let msg = err.to_string();
        match &err {
            SourceError::BadDescriptor { line: l, .. } => assert_eq!(*l, line, "{name}: {msg}"),
            _ => panic!("{name}: expected BadDescriptor, got {msg}"),
        }
        assert!(msg.contains(expect), "{name}: {msg}");
    }

    // A text .vmdk without the header is not taken for a raw disk.
    let path = write(dir.path(), "notes.vmdk", "this is not a disk\n");
    assert!(matches!(open_err(&path), SourceError::BadDescriptor { line: None, .. }));
}

#[test]
fn absurd_sizes_are_refused_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "f.vmdk", pseudo_random(4096, 5));
    let huge = u64::MAX;
    let half = 1u64 << 54; // 2^63 bytes: two of them overflow
    for (name, body, line, expect) in [
        ("size.vmdk", format!("RW {huge} FLAT \"f.vmdk\" 0\n"), 5, "too large"),
        ("sum.vmdk", format!("RW {half} ZERO\nRW {half} ZERO\n"), 6, "16 EiB"),
        ("offset.vmdk", format!("RW 8 FLAT \"f.vmdk\" {huge}\n"), 5, "offset"),
        (
            "digits.vmdk",
            "RW 99999999999999999999999 FLAT \"f.vmdk\" 0\n".to_owned(),
            5,
            "whole number",
        ),
    ] {
        let path = write(dir.path(), name, format!("{HEADER}{body}"));
        let err = open_err(&path);
        assert!(
            matches!(err, SourceError::BadDescriptor { line: Some(l), .. } if l == line),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(expect), "{name}: {err}");
    }

    // A huge but representable disk opens (no allocation follows its size)...
    let path = write(dir.path(), "big.vmdk", format!("{HEADER}RW {half} ZERO\n"));
    assert_eq!(open_disk(&path).unwrap().capacity(), 1 << 63);
    // ...and an extent far past its file's end is a file cut short.
    let path = write(dir.path(), "far.vmdk", format!("{HEADER}RW 8 FLAT \"f.vmdk\" {half}\n"));
    let msg = open_err(&path).to_string();
    assert!(
        msg.contains("f.vmdk is 4096 bytes, 0 of them from the extent's offset"),
        "{msg}"
    );

    let too_many = format!("{HEADER}{}", "RW 1 ZERO\n".repeat(MAX_EXTENTS + 1));
    let path = write(dir.path(), "many.vmdk", too_many);
    let msg = open_err(&path).to_string();
    assert!(msg.contains("more than 10000 extents"), "{msg}");
    let most = format!("{HEADER}{}", "RW 1 ZERO\n".repeat(MAX_EXTENTS));
    let path = write(dir.path(), "most.vmdk", most);
    assert_eq!(open_disk(&path).unwrap().capacity(), MAX_EXTENTS as u64 * 512);

    let padded = format!("{HEADER}{}", "#\n".repeat(DESCRIPTOR_SIZE_LIMIT as usize));
    let path = write(dir.path(), "padded.vmdk", padded);
    assert!(matches!(open_err(&path), SourceError::TooLarge { .. }));
}

#[test]
fn a_missing_extent_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.vmdk");
    qemu_img(&["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", s(&path), "1M"]);
    fs::remove_file(dir.path().join("a-flat.vmdk")).unwrap();
    let err = open_err(&path);
    let msg = err.to_string();
    assert!(matches!(err, SourceError::ExtentMissing { .. }), "{msg}");
    assert!(msg.contains("extent a-flat.vmdk does not exist"), "{msg}");
}

#[test]
fn holes_of_sparse_extents_are_known_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // 4 MiB: data in the second MiB only, the rest a hole.
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 1 << 20], 1 << 20).unwrap();
    drop(f);
    let disk = crate::source::open_disk(&raw).unwrap();
    assert!(disk.is_hole(0, 1 << 20));
    assert!(!disk.is_hole(1 << 20, 1 << 20));
    assert!(!disk.is_hole(0, 2 << 20));
    assert!(disk.is_hole(2 << 20, 2 << 20));
    let vmdk = dir.path().join("flat.vmdk");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat"])
        .arg(&raw)
        .arg(&vmdk)
        .status()
        .unwrap();
    assert!(status.success());
    let disk = crate::source::open_disk(&vmdk).unwrap();
    // qemu-img allocates the first block of what it writes; the tail stays sparse.
    assert!(disk.is_hole(2 << 20, 2 << 20), "qemu-img keeps zeros sparse");
    assert!(!disk.is_hole(1 << 20, 1 << 20));
}

#[test]
fn a_stray_nul_left_by_a_cid_rewrite_is_not_damage() {
    let text = b"# Disk DescriptorFile\nversion=1\nCID=ecf04d\0\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"q-flat.vmdk\" 0\n\0\0\0\0";
    let d = Descriptor::parse(std::path::Path::new("/x/q.vmdk"), text).unwrap();
    assert_eq!(d.extents.len(), 1);
}
