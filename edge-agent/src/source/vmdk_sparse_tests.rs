use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use flate2::write::ZlibEncoder;
use flate2::Compression;

use super::*;
use crate::source::testutil::{pseudo_random, qemu_img, qemu_io, s, write};
use crate::source::{open_disk, DiskFormat, DiskReader};

/// Reads the whole disk in chunks of `chunk` bytes.
pub(super) fn read_all(disk: &dyn DiskReader, chunk: usize) -> Vec<u8> {
    let mut out = vec![0; disk.capacity() as usize];
    for (i, piece) in out.chunks_mut(chunk).enumerate() {
        disk.read_at((i * chunk) as u64, piece).unwrap();
    }
    out
}

/// A disk image with random data, compressible data and zeros, in regions that do not line
/// up with 64 KiB grains; `len` need not be a whole number of grains.
fn mixed_image(len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    let random = pseudo_random(700_000, 9);
    data[4096..4096 + random.len()].copy_from_slice(&random);
    // Compressible: a short repeating pattern.
    for (i, b) in data[1_200_000..1_900_000].iter_mut().enumerate() {
        *b = b"migrate "[i % 8];
    }
    // A few bytes in the last sector.
    let end = len - 3;
    data[end..].copy_from_slice(&[1, 2, 3]);
    data
}

/// Byte ranges of `mixed_image(len)` that hold whole grains of zeros.
fn zero_ranges(len: u64) -> Vec<(u64, u64)> {
    let grain = 65_536;
    // 4096 + 700_000 ends in grain 10; the pattern runs from grain 18 to grain 28.
    vec![(11 * grain, 18 * grain), (29 * grain, (len / grain - 1) * grain)]
}

fn convert(dir: &Path, data: &[u8], subformat: &str) -> PathBuf {
    let raw = write(dir, &format!("{subformat}.raw"), data);
    let vmdk = dir.join(format!("{subformat}.vmdk"));
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &format!("subformat={subformat}"),
        s(&raw),
        s(&vmdk),
    ]);
    vmdk
}

#[test]
fn qemu_img_sparse_subformats_read_back_the_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // A whole number of grains, and a size that ends 5 sectors into a grain.
    for len in [4 << 20, (3 << 20) + 5 * 512] {
        let data = mixed_image(len);
        for (subformat, format) in [
            ("monolithicSparse", DiskFormat::VmdkSparse),
            ("twoGbMaxExtentSparse", DiskFormat::VmdkSparse),
            ("streamOptimized", DiskFormat::VmdkStreamOptimized),
        ] {
            let vmdk = convert(dir.path(), &data, subformat);
            let opened = crate::source::disk::open(&vmdk).unwrap();
            assert_eq!(opened.format, format, "{subformat}");
            assert!(opened.warnings.is_empty(), "{subformat}: {:?}", opened.warnings);
            let disk = opened.reader;
            assert_eq!(disk.capacity(), len as u64, "{subformat}");
            for chunk in [1 << 20, 65_537, 4096] {
                assert!(
                    read_all(&*disk, chunk) == data,
                    "{subformat} {len} in chunks of {chunk}"
                );
            }
            for (start, end) in zero_ranges(len as u64) {
                assert!(disk.is_hole(start, end - start), "{subformat} {len}: {start}..{end}");
            }
            assert!(!disk.is_hole(0, 65_536), "{subformat}");
            assert!(!disk.is_hole(1_200_000, 1000), "{subformat}");
            assert!(!disk.is_hole(len as u64 - 512, 512), "{subformat}");
            // A range straddling data and zeros is not a hole.
            assert!(!disk.is_hole(10 * 65_536, 2 * 65_536), "{subformat}");
            let err = disk.read_at(len as u64 - 1, &mut [0; 2]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }
}

#[test]
fn several_threads_read_one_stream_optimized_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = mixed_image(4 << 20);
    let vmdk = convert(dir.path(), &data, "streamOptimized");
    let disk: Arc<dyn DiskReader> = Arc::from(open_disk(&vmdk).unwrap());
    let data = Arc::new(data);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (disk, data) = (Arc::clone(&disk), Arc::clone(&data));
            std::thread::spawn(move || {
                for round in 0..40 {
                    let start = (t * 7919 + round * 100_003) % (data.len() - 70_000);
                    let mut buf = vec![0; 70_000];
                    disk.read_at(start as u64, &mut buf).unwrap();
                    assert!(buf == data[start..start + 70_000]);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn a_huge_sparse_disk_costs_what_its_data_does() {
    let dir = tempfile::tempdir().unwrap();
    let vmdk = dir.path().join("big.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        s(&vmdk),
        "100G",
    ]);
    let offset = 40u64 << 30;
    qemu_io(&vmdk, &["write -P 0x5a 40G 1M"]);
    let disk = open_disk(&vmdk).unwrap();
    assert_eq!(disk.capacity(), 100 << 30);
    let chunk = 1u64 << 20;
    let mut data_chunks = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..disk.capacity() / chunk {
        if !disk.is_hole(i * chunk, chunk) {
            data_chunks.push(i * chunk);
        }
    }
    // Every grain table is looked at once, in batches; no grain is read.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(data_chunks, [offset], "chunks with data");
    let mut buf = vec![0; chunk as usize];
    disk.read_at(data_chunks[0], &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

/// A streamOptimized file laid out as VMware writes it: header with GD_AT_END, embedded
/// descriptor, compressed grains with markers, then GT, GD, footer and end-of-stream markers.
/// `grains` are (grain number, bytes to compress), so tests can write grains that are too
/// short or too long.
pub(super) fn vmware_stream(capacity_sectors: u64, grains: &[(u64, Vec<u8>)]) -> Vec<u8> {
    const GRAIN_SECTORS: u64 = 128;
    let header = |gd_offset: u64| {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&(1u32 | 2 | 1 << 16 | 1 << 17).to_le_bytes());
        h[12..20].copy_from_slice(&capacity_sectors.to_le_bytes());
        h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&1u64.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
        h[64..72].copy_from_slice(&2u64.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        h
    };
    let marker = |sectors: u64, kind: u32| {
        let mut m = vec![0u8; 512];
        m[..8].copy_from_slice(&sectors.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        m
    };
    let pad = |out: &mut Vec<u8>| out.resize(out.len().div_ceil(512) * 512, 0);
    let mut out = header(u64::MAX);
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\nRW {capacity_sectors} SPARSE \"x.vmdk\"\n"
    );
    out.extend_from_slice(descriptor.as_bytes());
    pad(&mut out);
    let tables = capacity_sectors.div_ceil(GRAIN_SECTORS).div_ceil(512) as usize;
    let mut gts = vec![0u32; tables * 512];
    for (grain, bytes) in grains {
        gts[*grain as usize] = (out.len() / 512) as u32;
        let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        let compressed = encoder.finish().unwrap();
        out.extend_from_slice(&(grain * GRAIN_SECTORS).to_le_bytes());
        out.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        out.extend_from_slice(&compressed);
        pad(&mut out);
    }
    let mut gd = Vec::new();
    for table in gts.chunks(512) {
        out.extend_from_slice(&marker(4, 1));
        gd.push((out.len() / 512) as u32);
        for entry in table {
            out.extend_from_slice(&entry.to_le_bytes());
        }
    }
    out.extend_from_slice(&marker((gd.len() as u64 * 4).div_ceil(512), 2));
    let gd_sector = (out.len() / 512) as u64;
    for entry in &gd {
        out.extend_from_slice(&entry.to_le_bytes());
    }
    pad(&mut out);
    out.extend_from_slice(&marker(1, 3));
    out.extend_from_slice(&header(gd_sector));
    out.extend_from_slice(&[0; 512]);
    out
}

/// Grains to write: (grain number, bytes to compress).
type Grains = Vec<(u64, Vec<u8>)>;

/// Splits `data` into 64 KiB grains, leaving out the ones that are all zeros.
fn grains_of(data: &[u8]) -> Grains {
    data.chunks(65_536)
        .enumerate()
        .filter(|(_, grain)| grain.iter().any(|&b| b != 0))
        .map(|(i, grain)| (i as u64, grain.to_vec()))
        .collect()
}

#[test]
fn stream_optimized_with_its_grain_directory_in_the_footer() {
    let dir = tempfile::tempdir().unwrap();
    let len = (3 << 20) + 5 * 512;
    let data = mixed_image(len);
    let stream = vmware_stream(len as u64 / 512, &grains_of(&data));
    let path = write(dir.path(), "vmware.vmdk", &stream);
    let opened = crate::source::disk::open(&path).unwrap();
    assert_eq!(opened.format, DiskFormat::VmdkStreamOptimized);
    assert_eq!(opened.reader.capacity(), len as u64);
    assert!(read_all(&*opened.reader, 1 << 20) == data);
    assert!(opened.reader.is_hole(11 * 65_536, 7 * 65_536));

    // Zero padding after the end-of-stream marker (as in a tar member) is tolerated.
    let mut padded = stream.clone();
    padded.extend_from_slice(&[0; 4096]);
    let path = write(dir.path(), "padded.vmdk", &padded);
    assert!(read_all(&*open_disk(&path).unwrap(), 1 << 20) == data);

    // Cut before the footer: refused, naming the problem.
    let path = write(dir.path(), "cut.vmdk", &stream[..stream.len() - 1536]);
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(msg.contains("cut.vmdk") && msg.contains("no footer"), "{msg}");
}

#[test]
fn a_sparse_vmdk_inside_a_bigger_file_reads_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let data = mixed_image(2 << 20);
    for subformat in ["streamOptimized", "monolithicSparse"] {
        let vmdk = fs::read(convert(dir.path(), &data, subformat)).unwrap();
        let mut archive = pseudo_random(3 * 512, 1);
        archive.extend_from_slice(&vmdk);
        archive.extend_from_slice(&pseudo_random(10_000, 2));
        let path = write(dir.path(), "disk.ova", &archive);
        let slice = FileSlice::whole(&path)
            .unwrap()
            .sub(3 * 512, vmdk.len() as u64)
            .unwrap();
        let opened = open_sparse_slice(slice).unwrap();
        assert_eq!(opened.reader.capacity(), data.len() as u64);
        assert!(read_all(&*opened.reader, 1 << 20) == data, "{subformat}");
        let expected = if subformat == "streamOptimized" {
            DiskFormat::VmdkStreamOptimized
        } else {
            DiskFormat::VmdkSparse
        };
        assert_eq!(opened.format, expected);
    }
    // A slice that is not a sparse VMDK is refused.
    let path = write(dir.path(), "junk.bin", pseudo_random(4096, 3));
    let err = open_sparse_slice(FileSlice::whole(&path).unwrap()).unwrap_err();
    assert!(err.to_string().contains("no KDMV magic"), "{err}");
}

/// A small monolithicSparse made by qemu-img: 3 MiB, data in the first MiB.
fn small_sparse(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = vec![0; 3 << 20];
    data[..1 << 20].copy_from_slice(&pseudo_random(1 << 20, 5));
    (convert(dir, &data, "monolithicSparse"), data)
}

fn patched(dir: &Path, name: &str, bytes: &[u8], at: usize, patch: &[u8]) -> PathBuf {
    let mut bytes = bytes.to_vec();
    bytes[at..at + patch.len()].copy_from_slice(patch);
    write(dir, name, bytes)
}

#[test]
fn corrupt_headers_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = small_sparse(dir.path());
    let bytes = fs::read(&good).unwrap();
    let gd_sector = u64_at(&bytes, 56) as usize;
    let huge_capacity = 1u64 << 50;
    for (name, at, patch, expect) in [
        (
            "version.vmdk",
            4,
            4u32.to_le_bytes().to_vec(),
            "sparse VMDK version 4 is not supported yet",
        ),
        (
            "grain7.vmdk",
            20,
            7u64.to_le_bytes().to_vec(),
            "grain size 7 sectors is not a power of two",
        ),
        ("grain0.vmdk", 20, 0u64.to_le_bytes().to_vec(), "grain size 0 sectors"),
        (
            "grain4k.vmdk",
            20,
            4096u64.to_le_bytes().to_vec(),
            "grain size 4096 sectors",
        ),
        ("gtes.vmdk", 44, 1024u32.to_le_bytes().to_vec(), "numGTEsPerGT is 1024"),
        (
            "overflow.vmdk",
            12,
            u64::MAX.to_le_bytes().to_vec(),
            "not a possible disk size",
        ),
        ("zero.vmdk", 12, 0u64.to_le_bytes().to_vec(), "capacity 0 sectors"),
        (
            "tables.vmdk",
            12,
            huge_capacity.to_le_bytes().to_vec(),
            "grain tables, more than",
        ),
        (
            "bigcap.vmdk",
            12,
            (1u64 << 36).to_le_bytes().to_vec(),
            "does not lie within the file",
        ),
        (
            "gd.vmdk",
            56,
            1_000_000u64.to_le_bytes().to_vec(),
            "does not lie within the file",
        ),
        (
            "gde.vmdk",
            gd_sector * 512,
            4000u32.to_le_bytes().to_vec(),
            "grain directory entry 0 points to sector 4000",
        ),
        (
            "desc.vmdk",
            28,
            100_000u64.to_le_bytes().to_vec(),
            "embedded descriptor",
        ),
        (
            "descsize.vmdk",
            36,
            u64::MAX.to_le_bytes().to_vec(),
            "embedded descriptor",
        ),
        ("algo.vmdk", 77, 2u16.to_le_bytes().to_vec(), "compression algorithm 2"),
    ] {
        let path = patched(dir.path(), name, &bytes, at, &patch);
        let msg = open_disk(&path).expect_err(name).to_string();
        assert!(msg.contains(name) && msg.contains(expect), "{name}: {msg}");
    }
    // Truncated: in the header, and before the grain directory.
    for (name, len, expect) in [
        ("short.vmdk", 300, "too short"),
        ("cut.vmdk", 4096, "does not lie within the file"),
    ] {
        let path = write(dir.path(), name, &bytes[..len]);
        let msg = open_disk(&path).expect_err(name).to_string();
        assert!(msg.contains(name) && msg.contains(expect), "{name}: {msg}");
    }
}

/// A grain table entry past the end of the file is what a copy cut short leaves: refused at
/// open, naming the file, its size and how far the tables reach.
#[test]
fn grain_tables_pointing_past_the_end_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (good, _) = small_sparse(dir.path());
    let bytes = fs::read(&good).unwrap();
    let len = bytes.len();
    let gt_sector = u32_at(&bytes, u64_at(&bytes, 56) as usize * 512) as usize;
    // Grain 3's entry points far past the end; grain 0 is intact.
    let path = patched(
        dir.path(),
        "gte.vmdk",
        &bytes,
        gt_sector * 512 + 12,
        &4_000_000u32.to_le_bytes(),
    );
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(
        msg.contains("gte.vmdk")
            && msg.contains(&format!(
                "the file is {len} bytes, but its grain tables point to data up to byte 2048065536"
            ))
            && msg.contains("grain table 0 entry 3: sector 4000000")
            && msg.contains("cut short"),
        "{msg}"
    );

    // A grain that starts inside the file but runs past its end.
    let last = (len / 512 - 1) as u32;
    let path = patched(
        dir.path(),
        "tail.vmdk",
        &bytes,
        gt_sector * 512 + 12,
        &last.to_le_bytes(),
    );
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(
        msg.contains("tail.vmdk") && msg.contains(&format!("up to byte {}", u64::from(last) * 512 + 65_536)),
        "{msg}"
    );
}

#[test]
fn bad_compressed_grains_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let good = pseudo_random(65_536, 8);
    let cases: [(&str, Grains, &str); 2] = [
        // 32 MiB of zeros compress to ~32 KiB: a bomb for a 64 KiB grain.
        (
            "bomb.vmdk",
            vec![(0, vec![0; 32 << 20])],
            "inflates to more than a grain",
        ),
        (
            "exact-plus-one.vmdk",
            vec![(0, vec![7; 65_537])],
            "inflates to more than a grain",
        ),
    ];
    for (name, grains, expect) in cases {
        let path = write(dir.path(), name, vmware_stream(1024, &grains));
        let disk = open_disk(&path).unwrap();
        let err = disk.read_at(0, &mut [0; 512]).unwrap_err();
        assert!(
            err.to_string().contains(name) && err.to_string().contains(expect),
            "{name}: {err}"
        );
    }
    // A short stream fills the rest of the grain with zeros (the last grain of a disk).
    let path = write(dir.path(), "short.vmdk", vmware_stream(1024, &[(1, vec![9; 1000])]));
    let mut buf = vec![1; 65_536];
    open_disk(&path).unwrap().read_at(65_536, &mut buf).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 9) && buf[1000..].iter().all(|&b| b == 0));

    let stream = vmware_stream(1024, &[(0, good.clone())]);
    let marker_at = 1024;
    let data_len = u32_at(&stream, marker_at + 8) as usize;
    for (name, at, patch, expect) in [
        (
            "lba.vmdk",
            marker_at,
            128u64.to_le_bytes().to_vec(),
            "is for sector 128",
        ),
        (
            "size.vmdk",
            marker_at + 8,
            u32::MAX.to_le_bytes().to_vec(),
            "claims 4294967295 bytes",
        ),
        (
            "meta.vmdk",
            marker_at + 8,
            0u32.to_le_bytes().to_vec(),
            "metadata marker",
        ),
        ("damaged.vmdk", marker_at + 12, vec![0xff; 64], "damaged"),
        (
            "trunc.vmdk",
            marker_at + 8,
            (data_len as u32 / 2).to_le_bytes().to_vec(),
            "ends before its stream",
        ),
    ] {
        let path = patched(dir.path(), name, &stream, at, &patch);
        let err = open_disk(&path).unwrap().read_at(0, &mut [0; 512]).unwrap_err();
        assert!(
            err.to_string().contains(name) && err.to_string().contains(expect),
            "{name}: {err}"
        );
    }
    // A grain whose data runs past the end of the file (qemu-img keeps the grain directory
    // at the start, so the file still opens).
    let qemu = fs::read(convert(dir.path(), &good, "streamOptimized")).unwrap();
    let path = write(dir.path(), "past.vmdk", &qemu[..128 * 512 + 1000]);
    let err = open_disk(&path).unwrap().read_at(0, &mut [0; 512]).unwrap_err();
    assert!(
        err.to_string().contains("past.vmdk") && err.to_string().contains("past the end"),
        "{err}"
    );
}

#[test]
fn the_redundant_grain_directory_serves_when_the_primary_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (good, data) = small_sparse(dir.path());
    let bytes = fs::read(&good).unwrap();
    // gdOffset 0 with the redundant-GD flag: the copy at rgdOffset is read.
    let path = patched(dir.path(), "rgd.vmdk", &bytes, 56, &0u64.to_le_bytes());
    assert!(read_all(&*open_disk(&path).unwrap(), 1 << 20) == data);
    // Without the flag there is no grain directory.
    let path = patched(
        dir.path(),
        "nogd.vmdk",
        &fs::read(&path).unwrap(),
        8,
        &1u32.to_le_bytes(),
    );
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(
        msg.contains("nogd.vmdk") && msg.contains("does not lie within the file"),
        "{msg}"
    );
}

#[test]
fn cowd_and_bare_extents() {
    let dir = tempfile::tempdir().unwrap();
    // An extent file of a twoGbMaxExtentSparse disk, opened on its own, reads as a disk.
    let data = mixed_image(2 << 20);
    convert(dir.path(), &data, "twoGbMaxExtentSparse");
    let extent = dir.path().join("twoGbMaxExtentSparse-s001.vmdk");
    let disk = open_disk(&extent).unwrap();
    assert!(read_all(&*disk, 1 << 20) == data);

    let mut cowd = b"COWD".to_vec();
    cowd.resize(4096, 0);
    let path = write(dir.path(), "redo.vmdk", &cowd);
    let msg = open_disk(&path).unwrap_err().to_string();
    assert!(msg.contains("COWD") && msg.contains("not supported yet"), "{msg}");
    let msg = open_sparse_slice(FileSlice::whole(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("COWD") && msg.contains("not supported yet"), "{msg}");
}
