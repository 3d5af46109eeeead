//! SEsparse deltas read as QEMU reads them: each test writes an SEsparse extent (qemu-img
//! cannot make one), reads the chain with the agent and with `qemu-img convert`, and
//! compares; the damaged cases check the error says what is wrong.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::source::open_disk;
use crate::source::testutil::{flattened_by_qemu, qemu_img, qemu_io, read_all, s, write};

const GRAIN: usize = 4096;
const MIB: u64 = 1 << 20;

/// What a delta says about one 4 KiB grain.
#[derive(Clone)]
enum State {
    /// Allocated, holding these bytes, stored as grain `number` of the grains region.
    Data {
        fill: u8,
        number: u64,
    },
    Zero,
    Unmapped,
    /// A raw table entry, for damaged files.
    Raw(u64),
}

/// Byte image of an SEsparse extent of `capacity` bytes whose grain `index` is `state`.
fn extent(capacity: u64, grains: &[(u64, State)], replay_journal: bool) -> Vec<u8> {
    let capacity_sectors = capacity / SECTOR;
    let tables = capacity_sectors.div_ceil(GRAIN_SECTORS).div_ceil(GTES_PER_GT);
    let gd_sectors = (tables * 8).div_ceil(SECTOR).max(1);
    let mut used: Vec<u64> = grains.iter().map(|(i, _)| i / GTES_PER_GT).collect();
    used.sort_unstable();
    used.dedup();
    let (gd_at, tables_at) = (4, 4 + gd_sectors);
    let grains_at = tables_at + used.len() as u64 * TABLE_SECTORS;
    let top_number = grains
        .iter()
        .filter_map(|(_, st)| match st {
            State::Data { number, .. } => Some(*number),
            _ => None,
        })
        .max()
        .map_or(0, |n| n + 1);
    let mut file = vec![0u8; ((grains_at + top_number * GRAIN_SECTORS) * SECTOR) as usize];
    let mut put = |at: u64, value: u64| file[at as usize..at as usize + 8].copy_from_slice(&value.to_le_bytes());
    let header = [
        CONST_MAGIC,
        VERSION,
        capacity_sectors,
        GRAIN_SECTORS,
        TABLE_SECTORS,
        0,
        0,
        0,
        0,
        0,
        1, // volatile header
        1,
        2, // journal header
        1,
        3, // journal
        0,
        gd_at,
        gd_sectors,
        tables_at,
        used.len() as u64 * TABLE_SECTORS,
        0, // free bitmap
        0,
        0, // back map
        0,
        grains_at,
        top_number * GRAIN_SECTORS,
    ];
    for (i, value) in header.iter().enumerate() {
        put(i as u64 * 8, *value);
    }
    put(SECTOR, VOLATILE_MAGIC);
    put(SECTOR + 24, u64::from(replay_journal));
    for (n, table) in used.iter().enumerate() {
        put(gd_at * SECTOR + table * 8, (TABLE_ALLOCATED << 32) | n as u64);
    }
    let mut data = Vec::new();
    for (index, state) in grains {
        let n = used.binary_search(&(index / GTES_PER_GT)).unwrap() as u64;
        let entry_at = (tables_at + n * TABLE_SECTORS) * SECTOR + (index % GTES_PER_GT) * 8;
        let entry = match *state {
            State::Data { fill, number } => {
                data.push(((grains_at + number * GRAIN_SECTORS) * SECTOR, fill));
                (3 << 60) | ((number & 0xfff) << 48) | (number >> 12)
            }
            State::Zero => 2 << 60,
            State::Unmapped => 1 << 60,
            State::Raw(raw) => raw,
        };
        put(entry_at, entry);
    }
    for (at, fill) in data {
        file[at as usize..at as usize + GRAIN].fill(fill);
    }
    file
}

/// A 32 MiB monolithicFlat base (two SEsparse tables' worth) holding 0x11 everywhere, and
/// an SEsparse delta of it with `grains`; returns the delta's descriptor.
fn chain(dir: &Path, grains: &[(u64, State)], replay_journal: bool) -> PathBuf {
    let base = dir.join("base.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&base),
        "32M",
    ]);
    qemu_io(&base, &["write -P 0x11 0 32M"]);
    let base_text = fs::read_to_string(&base).unwrap();
    let cid = base_text
        .lines()
        .find_map(|l| l.strip_prefix("CID="))
        .unwrap()
        .to_owned();
    write(
        dir,
        "base-000001-sesparse.vmdk",
        extent(32 * MIB, grains, replay_journal),
    );
    write(
        dir,
        "base-000001.vmdk",
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=5a5a5a5a\nparentCID={cid}\n\
             createType=\"seSparse\"\nparentFileNameHint=\"base.vmdk\"\n\n# Extent description\n\
             RW {} SESPARSE \"base-000001-sesparse.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"14\"\n",
            32 * MIB / SECTOR
        ),
    )
}

#[test]
fn an_sesparse_delta_reads_as_qemu_reads_it_and_says_what_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let grains = [
        (0, State::Data { fill: 0x22, number: 1 }),
        (1, State::Zero),
        (2, State::Unmapped),
        (100, State::Data { fill: 0x33, number: 0 }),
        // In the second table, and numbered past 4095 so both halves of the split number count.
        (
            GTES_PER_GT + 7,
            State::Data {
                fill: 0x44,
                number: 5000,
            },
        ),
    ];
    let top = chain(dir.path(), &grains, false);
    let ours = read_all(&*open_disk(&top).unwrap(), MIB as usize);
    let qemus = flattened_by_qemu(&top);
    assert_eq!(ours.len(), qemus.len());
    assert!(
        ours == qemus,
        "the agent and qemu-img read the SEsparse chain differently"
    );
    let grain = |i: u64| &ours[(i * 4096) as usize..(i * 4096 + 4096) as usize];
    assert!(grain(0).iter().all(|&b| b == 0x22));
    assert!(grain(1).iter().all(|&b| b == 0) && grain(2).iter().all(|&b| b == 0));
    assert!(
        grain(3).iter().all(|&b| b == 0x11),
        "an unallocated grain reads the parent"
    );
    assert!(grain(100).iter().all(|&b| b == 0x33));
    assert!(grain(GTES_PER_GT + 7).iter().all(|&b| b == 0x44));

    // What the frozen delta changed: exactly its grains (data and zeros), for the snapshot
    // tracking of a running VM's sync.
    let written = open_disk(&top).unwrap().written_by_newest().unwrap().unwrap();
    let second = (GTES_PER_GT + 7) * 4096;
    assert_eq!(
        written,
        vec![0..3 * 4096, 100 * 4096..101 * 4096, second..second + 4096]
    );
    // Zero and unmapped grains are holes; data grains and the parent's bytes are not.
    let disk = open_disk(&top).unwrap();
    assert!(!disk.is_hole(0, 4096) && !disk.is_hole(3 * 4096, 4096));
}

#[test]
fn damaged_sesparse_extents_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let open_err = |path: &Path| open_disk(path).map(|_| ()).unwrap_err().to_string();

    // A journal that was never replayed: the tables cannot be trusted.
    let top = chain(d, &[(0, State::Data { fill: 1, number: 0 })], true);
    let msg = open_err(&top);
    assert!(
        msg.contains("journal was not replayed") && msg.contains("power the VM on and off"),
        "{msg}"
    );

    // A directory entry naming a table the file does not hold.
    let mut bytes = extent(32 * MIB, &[(0, State::Zero)], false);
    bytes[4 * 512..4 * 512 + 8].copy_from_slice(&((TABLE_ALLOCATED << 32) | 9).to_le_bytes());
    fs::write(d.join("base-000001-sesparse.vmdk"), &bytes).unwrap();
    let msg = open_err(&top);
    assert!(
        msg.contains("grain directory entry 0") && msg.contains("names no table"),
        "{msg}"
    );

    // A grain entry in no known state, and one pointing past the end of the file: the read fails.
    for (raw, expected) in [
        (5u64 << 60, "no SEsparse grain state"),
        ((3 << 60) | 7_000_000, "past the end"),
    ] {
        fs::write(
            d.join("base-000001-sesparse.vmdk"),
            extent(32 * MIB, &[(5, State::Raw(raw))], false),
        )
        .unwrap();
        let disk = open_disk(&top).unwrap();
        let mut buf = vec![0; 4096];
        let msg = disk.read_at(5 * 4096, &mut buf).unwrap_err().to_string();
        assert!(
            msg.contains(expected) && msg.contains("base-000001-sesparse.vmdk"),
            "{msg}"
        );
    }

    // Not SEsparse 2.1.
    let mut bytes = extent(32 * MIB, &[], false);
    bytes[8..16].copy_from_slice(&0x0000_0003_0000_0001u64.to_le_bytes());
    fs::write(d.join("base-000001-sesparse.vmdk"), &bytes).unwrap();
    let msg = open_err(&top);
    assert!(
        msg.contains("SEsparse version 0x300000001") && msg.contains("consolidate"),
        "{msg}"
    );

    // Truncated below its headers.
    fs::write(d.join("base-000001-sesparse.vmdk"), &bytes[..600]).unwrap();
    let msg = open_err(&top);
    assert!(msg.contains("too short for an SEsparse extent"), "{msg}");
}
