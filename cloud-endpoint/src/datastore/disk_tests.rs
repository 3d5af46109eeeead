//! The disk writers as a migration drives them, chunks in random order from several
//! threads, checked by qemu-img against a raw file holding the same bytes.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;
use std::sync::{Arc, Mutex};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::disk::DiskWriter;
use super::qcow2::{Layout, Qcow2Writer};
use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn datastore() -> (tempfile::TempDir, Datastore) {
    let dir = tempfile::tempdir().unwrap();
    let ds = Datastore::open(&dir.path().join("ds"), "cloud-ds1", None).unwrap();
    (dir, ds)
}

/// What a chunk holds. Mixed chunks alternate random and all-zero clusters, so the qcow2
/// writer leaves holes inside a chunk.
#[derive(Debug, Clone, Copy)]
enum Fill {
    Random,
    Mixed,
}

/// Chunks of `chunk` bytes at `offsets` (the last one cut at `capacity`).
fn chunks(capacity: u64, chunk: u64, offsets: &[(u64, Fill)], seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    offsets
        .iter()
        .map(|&(offset, fill)| {
            assert_eq!(offset % chunk, 0, "chunks sit at multiples of the chunk size");
            let mut data = vec![0u8; chunk.min(capacity - offset) as usize];
            rng.fill(&mut data[..]);
            if let Fill::Mixed = fill {
                for (i, cluster) in data.chunks_mut(64 * KIB as usize).enumerate() {
                    if i % 2 == 1 {
                        cluster.fill(0);
                    }
                }
            }
            (offset, data)
        })
        .collect()
}

/// Every chunk of a `capacity`-byte disk, all-zero ones left out as the edge does.
fn dense(capacity: u64, chunk: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let offsets: Vec<(u64, Fill)> = (0..capacity.div_ceil(chunk))
        .filter(|i| i % 5 != 3)
        .map(|i| (i * chunk, if i % 3 == 0 { Fill::Mixed } else { Fill::Random }))
        .collect();
    chunks(capacity, chunk, &offsets, seed)
}

/// Writes `chunks` in a random order from four threads, a few of them twice (a resent
/// chunk arrives again with the same bytes), and into a raw reference file at `reference`.
fn write_shuffled(write: &(dyn Fn(&[u8], u64) -> io::Result<()> + Sync), chunks: &[(u64, Vec<u8>)], reference: &Path) {
    let raw = File::create(reference).unwrap();
    let capacity_hint = chunks.iter().map(|(o, d)| o + d.len() as u64).max().unwrap_or(0);
    raw.set_len(capacity_hint).unwrap();
    for (offset, data) in chunks {
        raw.write_all_at(data, *offset).unwrap();
    }
    let mut order: Vec<&(u64, Vec<u8>)> = chunks.iter().collect();
    order.extend(chunks.iter().step_by(7));
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(99));
    let queue = Mutex::new(order);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let Some((offset, data)) = queue.lock().unwrap().pop() else {
                    return;
                };
                write(data, *offset).unwrap();
            });
        }
    });
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is on PATH")
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-img check`: exit 0, no corruptions, no leaks.
fn assert_checks_clean(image: &Path) {
    let path = image.to_str().unwrap();
    let out = run(&["check", "-f", "qcow2", "--output=json", path]);
    assert!(out.status.success(), "qemu-img check {path}: {}", output_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(report[key].as_u64().unwrap_or(0), 0, "{key} in {report}");
    }
}

fn virtual_size(image: &Path, format: &str) -> u64 {
    let out = run(&["info", "-f", format, "--output=json", image.to_str().unwrap()]);
    assert!(out.status.success(), "{}", output_text(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

/// `qemu-img compare` in strict mode when the sizes match; otherwise qemu-img checks that
/// the longer one's tail is zeros.
fn assert_same_bytes(image: &Path, format: &str, reference: &Path) {
    let out = run(&[
        "compare",
        "-f",
        format,
        "-F",
        "raw",
        image.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
}

/// Writes `chunks` into a new `format` disk through the staging API, finishes it, and
/// checks it with qemu-img. Returns the disk and the reference file.
fn migrate_disk(
    staging: &Staging,
    index: usize,
    capacity: u64,
    format: DiskFormat,
    chunks: &[(u64, Vec<u8>)],
) -> (Arc<DiskFile>, PathBuf) {
    let disk = staging.create_disk(index, capacity, format).unwrap();
    let reference = staging.dir().join(format!("reference-{index}.raw"));
    write_shuffled(&|data, offset| disk.write_at(data, offset), chunks, &reference);
    File::options()
        .write(true)
        .open(&reference)
        .unwrap()
        .set_len(capacity)
        .unwrap();
    disk.finish().unwrap();
    let qemu_format = match format {
        DiskFormat::Qcow2 => {
            assert_checks_clean(disk.path());
            "qcow2"
        }
        DiskFormat::Raw | DiskFormat::VmdkFlat => "raw",
    };
    assert_eq!(virtual_size(disk.path(), qemu_format), capacity.next_multiple_of(512));
    assert_same_bytes(disk.path(), qemu_format, &reference);
    (disk, reference)
}

#[test]
fn qcow2_of_an_odd_size_is_whole_and_checks_clean() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m1", "web01").unwrap();
    let capacity = 3 * MIB + 1000;
    let chunks = dense(capacity, 256 * KIB, 1);
    let (disk, reference) = migrate_disk(&staging, 0, capacity, DiskFormat::Qcow2, &chunks);
    assert_eq!(disk.file_name(), "web01.qcow2");
    assert_eq!(disk.capacity(), 3 * MIB + 1024, "whole sectors");

    // The comparison is real: one changed byte makes it fail.
    File::options()
        .write(true)
        .open(&reference)
        .unwrap()
        .write_all_at(b"x", 2 * MIB + 7)
        .unwrap();
    let out = run(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        disk.path().to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
}

#[test]
fn qcow2_of_a_sparse_disk_keeps_only_written_clusters() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m2", "web01").unwrap();
    let capacity = 64 * MIB;
    let offsets = [
        (0, Fill::Random),
        (5 * MIB, Fill::Mixed),
        (6 * MIB, Fill::Random),
        (31 * MIB, Fill::Mixed),
        (40 * MIB, Fill::Random),
        (63 * MIB, Fill::Random),
    ];
    let chunks = chunks(capacity, MIB, &offsets, 2);
    let (disk, _) = migrate_disk(&staging, 1, capacity, DiskFormat::Qcow2, &chunks);
    assert_eq!(disk.file_name(), "web01_1.qcow2");
    // 4 random chunks of 16 clusters, 2 mixed chunks of 8 data clusters each.
    let layout = Layout::new(capacity, 16);
    let len = fs::metadata(disk.path()).unwrap().len();
    assert_eq!(len, (layout.data + 4 * 16 + 2 * 8) * 64 * KIB);
}

#[test]
fn qcow2_larger_than_4_gib_spans_many_tables() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m3", "big").unwrap();
    let capacity = 6 * GIB + 12345;
    let layout = Layout::new(capacity.next_multiple_of(512), 16);
    assert_eq!(layout.l2_count, 13, "an L2 table maps 512 MiB");
    assert!(layout.refcount_block_count >= 3, "{layout:?}");
    let chunk = 16 * MIB;
    let offsets = [
        (0, Fill::Random),
        // At the ends of the first two L2 tables (512 MiB, 1 GiB).
        (31 * chunk, Fill::Mixed),
        (63 * chunk, Fill::Random),
        // Past 4 GiB: offsets that need more than 32 bits.
        (4 * GIB, Fill::Random),
        (4 * GIB + 512 * MIB, Fill::Mixed),
        // The short last chunk.
        (capacity / chunk * chunk, Fill::Random),
    ];
    let chunks = chunks(capacity, chunk, &offsets, 3);
    migrate_disk(&staging, 0, capacity, DiskFormat::Qcow2, &chunks);
}

#[test]
fn qcow2_chunks_that_share_clusters_map_them_once() {
    // Chunk sizes need only be multiples of 4 KiB: 100 KiB chunks share clusters.
    let (_dir, ds) = datastore();
    let staging = ds.stage("m4", "web01").unwrap();
    let capacity = 8 * MIB;
    let chunk = 100 * KIB;
    let offsets: Vec<(u64, Fill)> = (0..capacity.div_ceil(chunk))
        .filter(|i| i % 4 != 1)
        .map(|i| (i * chunk, Fill::Random))
        .collect();
    let chunks = chunks(capacity, chunk, &offsets, 4);
    migrate_disk(&staging, 0, capacity, DiskFormat::Qcow2, &chunks);
}

#[test]
fn qcow2_with_small_clusters_fills_many_refcount_blocks_and_table_clusters() {
    // 512-byte clusters: a refcount block counts 256 clusters (128 KiB) and a refcount
    // table cluster points at 64 blocks (8 MiB), so 20 MiB of data needs several of each.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.qcow2");
    let capacity = 32 * MIB;
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let writer = Qcow2Writer::with_cluster_bits(file, capacity, 9).unwrap();
    let layout = *writer.layout();
    assert!(layout.refcount_table_clusters >= 2, "{layout:?}");
    let offsets: Vec<(u64, Fill)> = (0..32)
        .filter(|i| i % 4 != 0)
        .map(|i| (i * MIB, if i % 3 == 0 { Fill::Mixed } else { Fill::Random }))
        .collect();
    let chunks = chunks(capacity, MIB, &offsets, 5);
    let reference = dir.path().join("reference.raw");
    write_shuffled(&|data, offset| writer.write_at(data, offset), &chunks, &reference);
    File::options()
        .write(true)
        .open(&reference)
        .unwrap()
        .set_len(capacity)
        .unwrap();
    writer.finish().unwrap();
    let used = fs::metadata(&path).unwrap().len() / 512;
    assert!(used > 2 * 64 * 256, "three refcount table clusters are in use: {used}");
    assert_checks_clean(&path);
    assert_eq!(virtual_size(&path, "qcow2"), capacity);
    assert_same_bytes(&path, "qcow2", &reference);
}

#[test]
fn qcow2_layout_covers_the_largest_file() {
    for bits in [9, 12, 16, 21] {
        for size in [512, 3 * MIB + 1024, 64 * MIB, 6 * GIB, 64 << 40] {
            let l = Layout::new(size, bits);
            let cluster = 1u64 << bits;
            let largest = l.data + size.div_ceil(cluster);
            assert!(l.refcount_block_count * cluster / 2 >= largest, "{l:?}");
            assert!(
                l.refcount_table_clusters * cluster / 8 >= l.refcount_block_count,
                "{l:?}"
            );
            assert!(l.l1_clusters * cluster / 8 >= l.l2_count, "{l:?}");
            assert!(l.l2_count * cluster / 8 >= l.guest_clusters, "{l:?}");
            assert_eq!(
                l.refcount_table + l.refcount_table_clusters + l.refcount_block_count + l.l1_clusters + l.l2_count,
                l.data
            );
        }
    }
    // 64 TiB: 128 Ki L2 tables (8 GiB, sparse until written), 1 MiB of L1.
    let l = Layout::new(64 << 40, 16);
    assert_eq!((l.l2_count, l.l1_clusters), (128 << 10, 16));
}

#[test]
fn qcow2_refuses_writes_past_the_end_and_is_not_qcow2_until_finished() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m5", "web01").unwrap();
    let disk = staging.create_disk(0, MIB, DiskFormat::Qcow2).unwrap();
    disk.write_at(&[7; 4096], MIB - 4096).unwrap();
    assert!(disk.write_at(&[7; 4096], MIB - 2048).is_err());
    assert!(disk.write_at(&[7; 1], u64::MAX).is_err());
    let out = run(&["info", "--output=json", disk.path().to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_ne!(info["format"], "qcow2", "no header before finish: {info}");
    disk.finish().unwrap();
    assert_checks_clean(disk.path());
}

#[test]
fn raw_disks_are_sparse_and_whole() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m6", "app01").unwrap();
    let capacity = 3 * MIB + 1000;
    let (disk, _) = migrate_disk(&staging, 0, capacity, DiskFormat::Raw, &dense(capacity, 256 * KIB, 6));
    assert_eq!(disk.file_name(), "app01.img");
    assert_eq!(disk.path(), staging.dir().join("app01.img"));

    let capacity = 64 * MIB;
    let offsets = [(0, Fill::Random), (33 * MIB, Fill::Mixed), (63 * MIB, Fill::Random)];
    let (disk, _) = migrate_disk(
        &staging,
        2,
        capacity,
        DiskFormat::Raw,
        &chunks(capacity, MIB, &offsets, 7),
    );
    assert_eq!(disk.file_name(), "app01_2.img");
    let meta = fs::metadata(disk.path()).unwrap();
    assert_eq!(meta.len(), capacity);
    assert!(
        meta.blocks() * 512 <= 4 * MIB,
        "{} bytes allocated",
        meta.blocks() * 512
    );
}

#[test]
fn flat_vmdk_extents_take_the_same_chunks() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m7", "web01").unwrap();
    let capacity = 3 * MIB + 1000;
    let (disk, reference) = migrate_disk(
        &staging,
        0,
        capacity,
        DiskFormat::VmdkFlat,
        &dense(capacity, 256 * KIB, 8),
    );
    staging
        .write_descriptor(0, disk.capacity(), "scsi0:0", &gateway::plan::ControllerType::Pvscsi)
        .unwrap();
    let descriptor = staging.dir().join(disk.file_name());
    assert_eq!(descriptor, staging.dir().join("web01.vmdk"));
    assert_same_bytes(&descriptor, "vmdk", &reference);
}

#[test]
fn file_names_and_the_datastore_default_format() {
    let names: Vec<String> = [DiskFormat::VmdkFlat, DiskFormat::Qcow2, DiskFormat::Raw]
        .into_iter()
        .flat_map(|f| [0, 3].map(|i| Staging::disk_file_name("web 01", i, f)))
        .collect();
    assert_eq!(
        names,
        [
            "web 01.vmdk",
            "web 01_3.vmdk",
            "web 01.qcow2",
            "web 01_3.qcow2",
            "web 01.img",
            "web 01_3.img"
        ]
    );
    let (_dir, ds) = datastore();
    assert_eq!(ds.disk_format(), DiskFormat::VmdkFlat);
    assert_eq!(ds.with_disk_format(DiskFormat::Qcow2).disk_format(), DiskFormat::Qcow2);
}

#[test]
fn every_format_reads_back_what_the_file_holds_at_any_offset() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m9", "web01").unwrap();
    let capacity = 5 * MIB + 3000;
    let chunks = dense(capacity, 256 * KIB, 9);
    for (index, format) in [DiskFormat::Qcow2, DiskFormat::Raw, DiskFormat::VmdkFlat]
        .into_iter()
        .enumerate()
    {
        let (disk, reference) = migrate_disk(&staging, index, capacity, format, &chunks);
        let want = std::fs::read(&reference).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(index as u64);
        // Whole chunks, ranges across clusters and tables, and the ragged end.
        let mut ranges = vec![(0, 256 * KIB), (3 * MIB - 100, 200 * KIB), (capacity - 4000, 4000)];
        for _ in 0..20 {
            let at = rng.random_range(0..capacity - 1);
            ranges.push((at, rng.random_range(1..=(capacity - at).min(MIB))));
        }
        for (at, len) in ranges {
            let mut got = vec![0xee; len as usize];
            disk.read_at(&mut got, at).unwrap();
            assert!(
                got == want[at as usize..(at + len) as usize],
                "{format:?} at {at}+{len}"
            );
        }
        let mut past = [0u8; 2];
        assert!(disk.read_at(&mut past, disk.capacity() - 1).is_err());
        // What the file holds, not what was written: a changed byte reads back changed.
        let data_file = File::options().write(true).open(disk.path()).unwrap();
        let mut first = [0u8; 1];
        disk.read_at(&mut first, 0).unwrap();
        let host = if format == DiskFormat::Qcow2 {
            // The first data cluster holds guest offset 0 only if it was written first;
            // find it through the read path instead of guessing the layout.
            let mut probe = vec![0u8; 64 * KIB as usize];
            disk.read_at(&mut probe, 0).unwrap();
            let bytes = std::fs::read(disk.path()).unwrap();
            bytes
                .windows(probe.len())
                .step_by(512)
                .position(|w| w == probe.as_slice())
                .unwrap() as u64
                * 512
        } else {
            0
        };
        data_file.write_all_at(&[first[0] ^ 0xff], host).unwrap();
        let mut again = [0u8; 1];
        disk.read_at(&mut again, 0).unwrap();
        assert_eq!(again[0], first[0] ^ 0xff, "{format:?}");
    }
}

#[test]
fn the_read_back_skips_unallocated_zero_chunks_and_still_catches_changes() {
    let (_dir, ds) = datastore();
    let staging = ds.stage("m10", "web01").unwrap();
    let chunk = 256 * KIB;
    let capacity = 5 * MIB + 3000;
    let sent = dense(capacity, chunk, 10);
    for (index, format) in [DiskFormat::Qcow2, DiskFormat::Raw].into_iter().enumerate() {
        // Read back as before a commit: written, not yet finished.
        let disk = staging.create_disk(index, capacity, format).unwrap();
        for (offset, data) in &sent {
            disk.write_at(data, *offset).unwrap();
        }
        // What the edge announced: every chunk's hash, zero chunks included.
        let count = capacity.div_ceil(chunk);
        let expected: Vec<(u16, u64, [u8; 32])> = (0..count)
            .map(|i| {
                let len = (capacity - i * chunk).min(chunk) as usize;
                let hash = match sent.iter().find(|(offset, _)| *offset == i * chunk) {
                    Some((_, data)) => gateway::chunk::chunk_hash(data),
                    None => gateway::chunk::chunk_hash(&vec![0u8; len]),
                };
                (0, i, hash)
            })
            .collect();
        let zero_chunks = count - sent.len() as u64;
        assert!(zero_chunks >= 3, "the sample leaves zero chunks out");
        let disks = [disk.clone()];
        let found = read_back(&disks, &[capacity], chunk as u32, &expected, 2).unwrap();
        assert!(
            found.damaged.is_empty() && found.rewritten_zero.is_empty(),
            "{format:?}: {found:?}"
        );
        assert_eq!(
            found.unallocated, zero_chunks,
            "{format:?}: zero chunks are holes, not read"
        );
        assert_eq!(
            found.bytes_read,
            sent.iter().map(|(_, d)| d.len() as u64).sum::<u64>(),
            "{format:?}"
        );

        // A hand on the datastore: bytes in a zero chunk, one byte of a data chunk.
        let zero_index = (0..count).find(|i| !sent.iter().any(|(o, _)| *o == i * chunk)).unwrap();
        disk.write_at(&vec![0xab; chunk as usize], zero_index * chunk).unwrap();
        let (data_offset, data) = &sent[1];
        disk.write_at(&[!data[100]], data_offset + 100).unwrap();
        // Read ahead of a switchover, while a pass writes: both found, nothing written.
        let (intact, early) = read_back_early(&disks, &[capacity], chunk as u32, &expected, 2, &|| false).unwrap();
        assert_eq!(intact.len() as u64, count - 2, "{format:?}");
        assert!(!intact.contains(&(0, zero_index)) && !intact.contains(&(0, data_offset / chunk)));
        assert!(early.rewritten_zero.is_empty(), "{format:?}");
        let mut left = vec![0u8; chunk as usize];
        disk.read_at(&mut left, zero_index * chunk).unwrap();
        assert_eq!(
            left,
            vec![0xab; chunk as usize],
            "{format:?}: the early read writes nothing"
        );
        let stopped = read_back_early(&disks, &[capacity], chunk as u32, &expected, 2, &|| true);
        assert_eq!(
            stopped.map(|_| ()).unwrap_err().kind(),
            std::io::ErrorKind::Interrupted,
            "a stopped read vouches for nothing"
        );
        let found = read_back(&disks, &[capacity], chunk as u32, &expected, 2).unwrap();
        assert_eq!(found.rewritten_zero, vec![(0, zero_index)], "{format:?}");
        assert_eq!(found.damaged, vec![(0, data_offset / chunk)], "{format:?}");
        assert_eq!(
            found.unallocated,
            zero_chunks - 1,
            "{format:?}: the written zero chunk is read"
        );
        let mut back = vec![0xffu8; chunk as usize];
        disk.read_at(&mut back, zero_index * chunk).unwrap();
        assert!(
            gateway::chunk::is_zero(&back),
            "{format:?}: the zero chunk is zeros again"
        );
    }
}

#[test]
fn a_zero_chunk_sharing_the_last_written_qcow2_cluster_reads_back_as_zeros() {
    // Chunks of 100 KiB on 64 KiB clusters: the data chunk allocates cluster 1, the zero
    // chunk after it owns the rest, and nothing is written there before the commit.
    let (_dir, ds) = datastore();
    let staging = ds.stage("m11", "web01").unwrap();
    let chunk = 100 * KIB;
    let capacity = 2 * chunk;
    let disk = staging.create_disk(0, capacity, DiskFormat::Qcow2).unwrap();
    let data = vec![0x5a; chunk as usize];
    disk.write_at(&data, 0).unwrap();
    let expected = [
        (0, 0, gateway::chunk::chunk_hash(&data)),
        (0, 1, gateway::chunk::chunk_hash(&vec![0u8; chunk as usize])),
    ];
    let found = read_back(std::slice::from_ref(&disk), &[capacity], chunk as u32, &expected, 1).unwrap();
    assert!(found.damaged.is_empty() && found.rewritten_zero.is_empty(), "{found:?}");
    let mut tail = vec![0xffu8; chunk as usize];
    disk.read_at(&mut tail, chunk).unwrap();
    assert!(gateway::chunk::is_zero(&tail));
}
