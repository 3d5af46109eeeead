//! Damaged sources, made by qemu-img and then cut or overwritten: each is refused at open,
//! naming the file and what was found, and never read as something else (zeros for a
//! missing half, header bytes as a "raw" disk).

use std::fs;
use std::path::{Path, PathBuf};

use super::testutil::{pseudo_random, qemu_img, s, write};
use super::{open_disk, open_source_disk, open_vm, open_vm_with, DiskFormat, SourceError, SourceOptions};

const MIB: usize = 1 << 20;

/// 4 MiB of data with a hole, as a raw file.
fn raw_source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut data = pseudo_random(4 * MIB, 21);
    data[MIB..2 * MIB].fill(0);
    (write(dir, "source.raw", &data), data)
}

/// `raw` converted by qemu-img into `name` with `args` (`-O vmdk -o subformat=...`).
fn convert(raw: &Path, name: &str, args: &[&str]) -> PathBuf {
    let out = raw.with_file_name(name);
    let mut all = vec!["convert", "-q", "-f", "raw"];
    all.extend_from_slice(args);
    all.extend([s(raw), s(&out)]);
    qemu_img(&all);
    out
}

fn vmdk(raw: &Path, name: &str, subformat: &str) -> PathBuf {
    convert(raw, name, &["-O", "vmdk", "-o", &format!("subformat={subformat}")])
}

fn truncate(path: &Path, len: u64) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn refused(path: &Path) -> String {
    match open_disk(path) {
        Ok(disk) => panic!("{} opened as a {}-byte disk", path.display(), disk.capacity()),
        Err(e) => e.to_string(),
    }
}

/// A `.vmx` in `dir` with one disk, scsi0:0, naming `disk`.
fn vmx(dir: &Path, disk: &Path) -> PathBuf {
    let name = disk.file_name().unwrap().to_str().unwrap();
    write(
        dir,
        "vm.vmx",
        format!(
            ".encoding = \"UTF-8\"\nconfig.version = \"8\"\ndisplayName = \"vm\"\nscsi0.present = \"TRUE\"\n\
             scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"{name}\"\n"
        ),
    )
}

#[test]
fn flat_extents_cut_short_are_refused_naming_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = raw_source(dir.path());
    let whole = 4 * MIB as u64;

    // monolithicFlat: the -flat extent cut in half.
    let mono = vmdk(&raw, "mono.vmdk", "monolithicFlat");
    truncate(&dir.path().join("mono-flat.vmdk"), whole / 2);
    let msg = refused(&mono);
    assert!(
        msg.contains("mono-flat.vmdk is 2097152 bytes") && msg.contains("declares 4194304 bytes"),
        "{msg}"
    );
    assert!(msg.contains("cut short") && msg.contains("copy it again"), "{msg}");

    // twoGbMaxExtentFlat: its (only) -f001 piece, one sector short.
    let two = vmdk(&raw, "two.vmdk", "twoGbMaxExtentFlat");
    truncate(&dir.path().join("two-f001.vmdk"), whole - 512);
    let msg = refused(&two);
    assert!(
        msg.contains("two-f001.vmdk is 4193792 bytes") && msg.contains("declares 4194304 bytes"),
        "{msg}"
    );

    // A VMFS extent at an offset in its file: what the file holds from there counts.
    write(dir.path(), "lun.bin", pseudo_random(8 * 512, 3));
    let lun = write(
        dir.path(),
        "lun.vmdk",
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\
         RW 8 VMFS \"lun.bin\" 2\n",
    );
    let msg = refused(&lun);
    assert!(
        msg.contains("lun.bin is 4096 bytes, 3072 of them from the extent's offset of 1024 bytes")
            && msg.contains("line 6")
            && msg.contains("declares 4096 bytes"),
        "{msg}"
    );

    // A flat base under a snapshot delta (read by the chain reader).
    let base = vmdk(&raw, "base.vmdk", "monolithicFlat");
    let delta = dir.path().join("delta.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", "-b", s(&base), "-F", "vmdk", s(&delta)]);
    open_disk(&delta).unwrap();
    truncate(&dir.path().join("base-flat.vmdk"), whole / 4);
    let msg = refused(&delta);
    assert!(msg.contains("base-flat.vmdk is 1048576 bytes"), "{msg}");
}

#[test]
fn sparse_extents_cut_short_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = raw_source(dir.path());

    let mono = vmdk(&raw, "sparse.vmdk", "monolithicSparse");
    let full = len(&mono);
    truncate(&mono, full / 2);
    let msg = refused(&mono);
    assert!(
        msg.contains("sparse.vmdk")
            && msg.contains(&format!(
                "the file is {} bytes, but its grain tables point to data up to byte",
                full / 2
            ))
            && msg.contains("cut short"),
        "{msg}"
    );

    // A twoGbMaxExtentSparse piece cut short...
    let two = vmdk(&raw, "two.vmdk", "twoGbMaxExtentSparse");
    let piece = dir.path().join("two-s001.vmdk");
    let piece_len = len(&piece);
    truncate(&piece, piece_len - 65_536);
    let msg = refused(&two);
    assert!(msg.contains("two-s001.vmdk") && msg.contains("cut short"), "{msg}");

    // ...and one whose header holds less than the descriptor declares.
    let two = vmdk(&raw, "small.vmdk", "twoGbMaxExtentSparse");
    let descriptor = fs::read_to_string(&two).unwrap();
    let declared = 8192 + 2048;
    fs::write(
        &two,
        descriptor.replace("RW 8192 SPARSE", &format!("RW {declared} SPARSE")),
    )
    .unwrap();
    let msg = refused(&two);
    assert!(
        msg.contains("small-s001.vmdk holds 4194304 bytes (the capacity its header gives)")
            && msg.contains(&format!("declares {} bytes", declared * 512)),
        "{msg}"
    );

    // streamOptimized cut short (qemu-img writes the grain directory's place in the header
    // too, so the tables show it; a file that defers it to the footer has lost that).
    let stream = vmdk(&raw, "stream.vmdk", "streamOptimized");
    truncate(&stream, len(&stream) / 2);
    let msg = refused(&stream);
    assert!(msg.contains("stream.vmdk") && msg.contains("cut short"), "{msg}");

    // qcow2 cut short.
    let qcow2 = convert(&raw, "cut.qcow2", &["-O", "qcow2"]);
    let full = len(&qcow2);
    truncate(&qcow2, full / 2);
    let msg = refused(&qcow2);
    assert!(
        msg.contains("cut.qcow2")
            && msg.contains(&format!(
                "the file is {} bytes, but its tables point to data up to byte",
                full / 2
            ))
            && msg.contains("cut short"),
        "{msg}"
    );
}

#[test]
fn damaged_magic_is_refused_not_read_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = raw_source(dir.path());

    let qcow2 = convert(&raw, "web01.qcow2", &["-O", "qcow2"]);
    overwrite(&qcow2, 3, &[0]);
    let msg = refused(&qcow2);
    assert!(
        msg.contains("web01.qcow2: its name says a qcow2 image but its content is not")
            && msg.contains("its first bytes are 51 46 49 00")
            && msg.contains("one byte off qcow2's `QFI\\xfb` magic")
            && msg.contains("--raw-disk"),
        "{msg}"
    );

    let sparse = vmdk(&raw, "sparse.vmdk", "monolithicSparse");
    overwrite(&sparse, 0, b"KDMW");
    let msg = refused(&sparse);
    assert!(
        msg.contains("its name says a VMDK") && msg.contains("one byte off sparse VMDK's `KDMV` magic"),
        "{msg}"
    );

    let stream = vmdk(&raw, "stream.vmdk", "streamOptimized");
    overwrite(&stream, 0, &[0; 512]);
    let msg = refused(&stream);
    assert!(
        msg.contains("its name says a VMDK") && msg.contains("all zeros"),
        "{msg}"
    );

    // A .vmdk that is neither a descriptor nor a sparse VMDK.
    let neither = write(dir.path(), "neither.vmdk", pseudo_random(MIB, 4));
    assert!(refused(&neither).contains("its name says a VMDK"));

    // A name that claims nothing: refused, with the flag suggested; the same bytes as .img read.
    let data = pseudo_random(MIB, 5);
    let unnamed = write(dir.path(), "disk.dat", &data);
    let msg = refused(&unnamed);
    assert!(
        msg.contains("no known disk format") && msg.contains("(or name it .img or .raw)"),
        "{msg}"
    );
    assert_eq!(
        open_disk(&write(dir.path(), "disk.img", &data)).unwrap().capacity(),
        MIB as u64
    );
    assert_eq!(
        open_disk(&write(dir.path(), "disk-flat.vmdk", &data))
            .unwrap()
            .capacity(),
        MIB as u64
    );
}

#[test]
fn the_operator_can_take_a_disk_as_raw_by_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = pseudo_random(MIB, 6);
    let disk = write(dir.path(), "export.bin", &data);
    let vmx = vmx(dir.path(), &disk);

    let msg = open_vm(&vmx).unwrap_err().to_string();
    assert!(
        msg.contains("disk scsi0:0") && msg.contains("`--raw-disk scsi0:0`"),
        "{msg}"
    );

    let options = SourceOptions {
        raw_disks: vec!["scsi0:0".into()],
        ..Default::default()
    };
    let vm = open_vm_with(&vmx, &options).unwrap();
    let source = &vm.disks[0];
    assert!(source.taken_as_raw);
    assert_eq!((source.format, source.capacity), (DiskFormat::Raw, MIB as u64));
    assert!(
        vm.notes.iter().any(|n| n.contains("--raw-disk scsi0:0")),
        "{:?}",
        vm.notes
    );
    let reader = open_source_disk(source).unwrap();
    let mut read = vec![0; MIB];
    reader.read_at(0, &mut read).unwrap();
    assert!(read == data);

    // Even a file whose bytes say qcow2 is read as it is, when the operator says so.
    let (raw, _) = raw_source(dir.path());
    let qcow2 = convert(&raw, "export.qcow2", &["-O", "qcow2"]);
    let vmx = super::testutil::write(
        dir.path(),
        "vm.vmx",
        fs::read_to_string(&vmx).unwrap().replace("export.bin", "export.qcow2"),
    );
    let vm = open_vm_with(&vmx, &options).unwrap();
    assert_eq!(vm.disks[0].capacity, len(&qcow2));

    let typo = SourceOptions {
        raw_disks: vec!["scsi0:9".into()],
        ..Default::default()
    };
    let msg = open_vm_with(&vmx, &typo).unwrap_err().to_string();
    assert!(
        matches!(open_vm_with(&vmx, &typo), Err(SourceError::NoSuchDisk { .. }))
            && msg.contains("--raw-disk scsi0:9: the VM has no disk scsi0:9 (its disks: scsi0:0)"),
        "{msg}"
    );
}

#[test]
fn a_format_under_another_name_is_read_as_its_bytes_say_and_noted() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, data) = raw_source(dir.path());
    let sparse = vmdk(&raw, "sparse.vmdk", "monolithicSparse");
    let misnamed = dir.path().join("misnamed.qcow2");
    fs::rename(&sparse, &misnamed).unwrap();
    let opened = super::disk::open(&misnamed).unwrap();
    assert_eq!(opened.format, DiskFormat::VmdkSparse);
    assert!(
        opened
            .warnings
            .iter()
            .any(|w| w.contains("named like another format but holds a sparse VMDK")),
        "{:?}",
        opened.warnings
    );
    let mut read = vec![0; data.len()];
    opened.reader.read_at(0, &mut read).unwrap();
    assert!(read == data);
}

/// `edge-agent abort` opens the VM only to name it: a source damaged since the migration
/// started can still be aborted.
#[test]
fn a_damaged_vm_can_still_be_named_for_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = raw_source(dir.path());
    let disk = vmdk(&raw, "web01.vmdk", "monolithicSparse");
    let vmx = vmx(dir.path(), &disk);
    truncate(&disk, len(&disk) / 2);
    assert!(open_vm(&vmx).unwrap_err().to_string().contains("cut short"));
    let options = SourceOptions {
        configuration_only: true,
        ..Default::default()
    };
    let vm = open_vm_with(&vmx, &options).unwrap();
    assert_eq!((vm.name.as_str(), vm.disks.len()), ("vm", 1));
    assert!(!vm.disks[0].taken_as_raw, "no --raw-disk was given");
}
