//! Damaged, hostile and refused qcow2 images: made by qemu-img, then patched by hand.
//! Each gives an error naming the file and what to do; none panics or allocates hugely.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::tests::{be64, convert, first_l2, patch, read_all, sample};
use super::*;
use crate::source::open_disk;
use crate::source::testutil::{qemu_img, s, write};

#[test]
fn refuses_broken_backing_chains() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let create_unsafe = |name: &str, backing: &str| {
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            "qcow2",
            s(&path(name)),
            "1M",
        ]);
    };

    create_unsafe("orphan.qcow2", "missing.qcow2");
    let err = open_disk(&path("orphan.qcow2")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::BadImage { .. }), "{msg}");
    assert!(msg.contains("missing.qcow2") && msg.contains("does not exist"), "{msg}");

    // An image that is its own backing file, and two that back each other.
    create_unsafe("self.qcow2", "self.qcow2");
    create_unsafe("a.qcow2", "b.qcow2");
    create_unsafe("b.qcow2", "a.qcow2");
    for name in ["self.qcow2", "a.qcow2"] {
        let msg = open_disk(&path(name)).unwrap_err().to_string();
        assert!(
            msg.contains("backing chain loops") && msg.contains("qemu-img rebase"),
            "{msg}"
        );
        assert_eq!(msg.matches("backing file `").count(), 1, "{msg}");
    }

    // A chain deeper than the limit.
    qemu_img(&["create", "-f", "qcow2", s(&path("deep0.qcow2")), "1M"]);
    for i in 1..=MAX_CHAIN_DEPTH {
        create_unsafe(&format!("deep{i}.qcow2"), &format!("deep{}.qcow2", i - 1));
    }
    let deepest = path(&format!("deep{}.qcow2", MAX_CHAIN_DEPTH - 1));
    open_disk(&deepest).unwrap();
    let msg = open_disk(&path(&format!("deep{MAX_CHAIN_DEPTH}.qcow2")))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("more than 64 images deep"), "{msg}");
    assert!(msg.len() < 1000, "one line, not one per level: {msg}");

    // A backing file given as a network address.
    create_unsafe("remote.qcow2", "xxxxxxxxxxxxxxx");
    let image = path("remote.qcow2");
    let at = be64(&image, 8);
    patch(&image, at, b"nbd://h/x.qcow2");
    let msg = open_disk(&image).unwrap_err().to_string();
    assert!(msg.contains("protocol") && msg.contains("nbd://h/x.qcow2"), "{msg}");

    // A backing file recorded as qcow2 that is not, and one that is damaged.
    fs::write(path("fake.qcow2"), vec![1; 4096]).unwrap();
    create_unsafe("over-fake.qcow2", "fake.qcow2");
    let msg = open_disk(&path("over-fake.qcow2")).unwrap_err().to_string();
    assert!(msg.contains("is recorded as qcow2 but is not"), "{msg}");
    qemu_img(&["create", "-f", "qcow2", s(&path("damaged.qcow2")), "1M"]);
    patch(&path("damaged.qcow2"), 20, &30u32.to_be_bytes());
    create_unsafe("over-damaged.qcow2", "damaged.qcow2");
    let err = open_disk(&path("over-damaged.qcow2")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::Backing { .. }), "{msg}");
    assert!(
        msg.contains("over-damaged.qcow2: backing file `damaged.qcow2`"),
        "{msg}"
    );
    assert!(msg.contains("cluster_bits is 30"), "{msg}");
}

#[test]
fn refuses_encrypted_images() {
    let dir = tempfile::tempdir().unwrap();
    let luks = dir.path().join("enc.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&luks),
        "1M",
    ]);
    let aes = dir.path().join("aes.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&aes), "1M"]);
    patch(&aes, 32, &1u32.to_be_bytes());
    for (image, kind) in [(&luks, "LUKS"), (&aes, "AES")] {
        let err = open_disk(image).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SourceError::Unsupported { .. }), "{msg}");
        assert!(msg.contains("encrypted qcow2 image") && msg.contains(kind), "{msg}");
        assert!(msg.contains("qemu-img convert --object secret"), "{msg}");
    }
}

#[test]
fn handles_feature_bits() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path(), "disk.raw", sample());
    let good = convert(dir.path(), &raw, "good.qcow2", &[]);
    let variant = |name: &str, offset: u64, bytes: &[u8]| {
        let image = dir.path().join(name);
        fs::copy(&good, &image).unwrap();
        patch(&image, offset, bytes);
        image
    };

    // Dirty: readable, with a note.
    let opened = disk::open(&variant("dirty.qcow2", 79, &[1])).unwrap();
    assert!(read_all(opened.reader.as_ref()) == sample());
    assert!(
        opened.warnings.iter().any(|w| w.contains("marked dirty")),
        "{:?}",
        opened.warnings
    );

    let refused = |image: &Path, fragment: &str| {
        let err = open_disk(image).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(fragment), "{msg}");
        assert!(msg.contains(image.file_name().unwrap().to_str().unwrap()), "{msg}");
        err
    };
    let err = refused(&variant("corrupt.qcow2", 79, &[2]), "qemu-img check -r all");
    assert!(matches!(err, SourceError::BadImage { .. }));
    let err = refused(&variant("unknown.qcow2", 79, &[0x20]), "bit 5");
    assert!(matches!(err, SourceError::Unsupported { .. }));
    // qemu-img's feature table names the bits it knows; bit 2's name shows.
    let err = refused(&variant("unknown-high.qcow2", 72, &[0x80]), "bit 63");
    assert!(matches!(err, SourceError::Unsupported { .. }));
    let short = variant("short-header.qcow2", 100, &104u32.to_be_bytes());
    disk::open(&short).unwrap();
    patch(&short, 79, &[8]);
    refused(&short, "has no compression_type field");

    let data_file = dir.path().join("external.qcow2");
    let data_raw = dir.path().join("external.raw");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&data_raw)),
        s(&data_file),
        "1M",
    ]);
    refused(&data_file, "external data file");
    let extended = dir.path().join("extended.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "extended_l2=on", s(&extended), "1M"]);
    refused(&extended, "extended L2 entries");

    let zstd = convert(dir.path(), &raw, "zstd.qcow2", &["-c", "-o", "compression_type=zstd"]);
    assert_eq!(fs::read(&zstd).unwrap()[104], 1);
    patch(&zstd, 104, &[7]);
    refused(&zstd, "compression type 7");
    let odd = variant("zstd-without-bit.qcow2", 104, &[1]);
    refused(&odd, "compression type feature bit is not set");

    let qcow1 = dir.path().join("old.qcow");
    qemu_img(&["create", "-f", "qcow", s(&qcow1), "1M"]);
    refused(&qcow1, "version 1");
    refused(&variant("v4.qcow2", 4, &4u32.to_be_bytes()), "qcow2 version 4");
}

#[test]
fn refuses_damaged_headers() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path(), "disk.raw", sample());
    let good = convert(dir.path(), &raw, "good.qcow2", &[]);
    let l1_offset = be64(&good, 40);
    let mut n = 0;
    let mut case = |edit: &dyn Fn(&Path), fragment: &str| {
        n += 1;
        let image = dir.path().join(format!("bad{n}.qcow2"));
        fs::copy(&good, &image).unwrap();
        edit(&image);
        let err = open_disk(&image).expect_err(fragment);
        let msg = err.to_string();
        assert!(msg.contains(fragment), "case {n}: {msg}");
        assert!(msg.contains(&format!("bad{n}.qcow2")), "case {n}: {msg}");
    };
    let truncate = |len: u64| move |p: &Path| fs::File::options().write(true).open(p).unwrap().set_len(len).unwrap();
    let set = |offset: u64, bytes: Vec<u8>| move |p: &Path| patch(p, offset, &bytes);
    let u32be = |v: u32| v.to_be_bytes().to_vec();
    let u64be = |v: u64| v.to_be_bytes().to_vec();

    case(&truncate(50), "too short for a qcow2 header");
    case(&truncate(100), "too short for a qcow2 v3 header");
    case(&truncate(l1_offset + 4), "the L1 table (8 bytes at offset");
    case(&set(20, u32be(8)), "cluster_bits is 8");
    case(&set(20, u32be(22)), "cluster_bits is 22");
    case(&set(20, u32be(u32::MAX)), "cluster_bits is 4294967295");
    case(&set(24, u64be((1 << 63) + 1)), "more than 2^63");
    case(&set(24, u64be(1 << 62)), "more than qcow2's limit");
    case(&set(24, u64be(1 << 40)), "the L1 table has 1 entries");
    case(&set(24, u64be(0)), "empty disk image");
    case(&set(36, u32be(0)), "the L1 table has 0 entries");
    case(
        &set(40, u64be(l1_offset + 8)),
        "not a non-zero multiple of the cluster size",
    );
    case(&set(40, u64be(0)), "not a non-zero multiple of the cluster size");
    case(&set(40, u64be(1 << 50)), "lies past the end of the file");
    case(&set(100, u32be(50)), "header_length is 50");
    case(&set(100, u32be(1 << 20)), "header_length is 1048576");
    case(&set(8, u64be(1 << 40)), "outside the first cluster");
    case(
        &|p: &Path| {
            patch(p, 8, &4096u64.to_be_bytes());
            patch(p, 16, &5000u32.to_be_bytes());
        },
        "at most 1023",
    );
    let header_length = u64::from(be64(&good, 96) as u32);
    case(&set(header_length + 4, u32be(0x00ff_ffff)), "runs past the header area");
    case(&set(header_length, u64be(0xE279_2ACA_0000_0003)), "not a format name");
}

/// A read of the whole disk fails with an error naming the image and `fragment`; nothing panics.
fn read_fails(image: &Path, fragment: &str) {
    let disk = open_disk(image).unwrap();
    let mut buf = vec![0; disk.capacity() as usize];
    let err = disk.read_at(0, &mut buf).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(fragment), "{msg}");
    assert!(msg.contains(image.file_name().unwrap().to_str().unwrap()), "{msg}");
}

/// Opening fails with an error naming the image, both sizes and `fragment`: the tables point
/// past the end of the file, found before anything is read.
fn open_fails(image: &Path, fragment: &str) {
    let err = open_disk(image).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SourceError::BadImage { .. }), "{msg}");
    let len = fs::metadata(image).unwrap().len();
    assert!(
        msg.contains(&format!(
            "the file is {len} bytes, but its tables point to data up to byte"
        )),
        "{msg}"
    );
    assert!(msg.contains("cut short") && msg.contains(fragment), "{msg}");
    assert!(msg.contains(image.file_name().unwrap().to_str().unwrap()), "{msg}");
}

/// Tables that point outside the file are refused at open (a copy cut short is the usual
/// cause); damage that only reading shows fails the read.
#[test]
fn reports_damaged_tables() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path(), "disk.raw", sample());
    let good = convert(dir.path(), &raw, "good.qcow2", &[]);
    let good_len = fs::metadata(&good).unwrap().len();
    let l1_offset = be64(&good, 40);
    let l2 = first_l2(&good);
    let data0 = be64(&good, l2) & 0x00ff_ffff_ffff_fe00;
    let copy = |name: &str, offset: u64, value: u64| {
        let image = dir.path().join(name);
        fs::copy(&good, &image).unwrap();
        patch(&image, offset, &value.to_be_bytes());
        image
    };
    const COPIED: u64 = 1 << 63;

    let image = copy("l2-past-end.qcow2", l1_offset, COPIED | (1 << 40));
    open_fails(&image, "L1 entry 0: an L2 table at offset 1099511627776");
    read_fails(
        &copy("l2-unaligned.qcow2", l1_offset, COPIED | (l2 + 512)),
        "not cluster-aligned",
    );
    read_fails(
        &copy("data-unaligned.qcow2", l2, COPIED | (data0 + 512)),
        "not cluster-aligned",
    );
    open_fails(
        &copy("data-past-end.qcow2", l2, COPIED | (1 << 40)),
        "the cluster at guest offset 0: data at offset 1099511627776",
    );
    open_fails(
        &copy("compressed-past-end.qcow2", l2, (1 << 62) | (good_len + 4096)),
        "the compressed cluster at guest offset 0",
    );
    // Compressed data that is not deflate at all: the header cluster.
    read_fails(
        &copy("compressed-garbage.qcow2", l2, (1 << 62) | 8),
        "does not decompress",
    );

    // Clusters cut off by a truncated copy.
    let image = dir.path().join("truncated.qcow2");
    fs::copy(&good, &image).unwrap();
    fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(good_len / 2)
        .unwrap();
    open_fails(&image, "data at offset");
}

/// Appends `compressed` to a copy of `good` and points the first cluster's L2 entry at it.
fn with_compressed_cluster(good: &Path, image: &Path, compressed: &[u8]) {
    fs::copy(good, image).unwrap();
    let offset = fs::metadata(image).unwrap().len() + 100;
    patch(image, offset, compressed);
    let cluster_bits = be64(image, 16) as u32; // the low half: cluster_bits
    let x = 62 - (cluster_bits - 8);
    let end = offset + compressed.len() as u64;
    let extra_sectors = (end - 1) / 512 - offset / 512;
    patch(
        image,
        first_l2(image),
        &((1u64 << 62) | (extra_sectors << x) | offset).to_be_bytes(),
    );
}

#[test]
fn refuses_clusters_that_decompress_to_more_than_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path(), "disk.raw", sample());
    let four_clusters = vec![0x41; 4 << 16];

    let deflate = convert(dir.path(), &raw, "deflate.qcow2", &["-c"]);
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&four_clusters).unwrap();
    let bomb = dir.path().join("deflate-bomb.qcow2");
    with_compressed_cluster(&deflate, &bomb, &encoder.finish().unwrap());
    read_fails(&bomb, "expands to more than one cluster");
    // The same cluster, exactly one cluster long, reads.
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&four_clusters[..1 << 16]).unwrap();
    let fine = dir.path().join("deflate-fine.qcow2");
    with_compressed_cluster(&deflate, &fine, &encoder.finish().unwrap());
    let disk = open_disk(&fine).unwrap();
    let mut buf = vec![0; 1 << 16];
    disk.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x41));
    // Too short: one cluster less a byte.
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&four_clusters[..(1 << 16) - 1]).unwrap();
    let short = dir.path().join("deflate-short.qcow2");
    with_compressed_cluster(&deflate, &short, &encoder.finish().unwrap());
    read_fails(&short, "ends early");

    let zstd = convert(dir.path(), &raw, "zstd.qcow2", &["-c", "-o", "compression_type=zstd"]);
    let bomb = dir.path().join("zstd-bomb.qcow2");
    with_compressed_cluster(&zstd, &bomb, &zstd::bulk::compress(&four_clusters, 3).unwrap());
    read_fails(&bomb, "expands to more than one cluster");
    let fine = dir.path().join("zstd-fine.qcow2");
    with_compressed_cluster(
        &zstd,
        &fine,
        &zstd::bulk::compress(&four_clusters[..1 << 16], 3).unwrap(),
    );
    let disk = open_disk(&fine).unwrap();
    disk.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x41));
}
