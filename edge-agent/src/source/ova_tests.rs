//! OVA and OVF packages built by the real tools: disks by `qemu-img`, manifests by
//! `sha256sum` / `sha1sum`, archives by `tar`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::source::ovf::tests::ovftool_descriptor;
use crate::source::testutil::{pseudo_random, qemu_img, s, write};
use crate::source::{open_source_disk, open_vm, DiskFormat, SourceDisk};

const DISK1: &str = "web01-disk1.vmdk";
const DISK2: &str = "web01-disk2.vmdk";
const MIB: usize = 1 << 20;

/// Disk 1 (4 MiB): a random MiB, a compressible MiB, two MiB of zeros. Disk 2 (2 MiB):
/// zeros, random, zeros, compressible.
fn disk_contents() -> (Vec<u8>, Vec<u8>) {
    let compressible: Vec<u8> = b"web01 /var/log/syslog: all quiet on the western front\n"
        .iter()
        .copied()
        .cycle()
        .take(MIB)
        .collect();
    let mut disk1 = pseudo_random(MIB, 11);
    disk1.extend_from_slice(&compressible);
    disk1.resize(4 * MIB, 0);
    let mut disk2 = vec![0; MIB / 2];
    disk2.extend_from_slice(&pseudo_random(MIB / 2, 12));
    disk2.resize(MIB + 3 * MIB / 4, 0);
    disk2.extend_from_slice(&compressible[..MIB / 4]);
    (disk1, disk2)
}

/// The files of an exported package, written into a folder.
struct Package {
    dir: PathBuf,
    disk1: Vec<u8>,
    disk2: Vec<u8>,
    /// The disk files' names.
    names: [String; 2],
}

/// How the package's disks are stored.
#[derive(Clone, Copy, PartialEq)]
enum Disks {
    StreamOptimized,
    Raw,
}

/// Writes disks, the descriptor `web01.ovf` and, with `digest` ("SHA256" or "SHA1"), the
/// manifest `web01.mf`, as ovftool would export them.
fn export(dir: &Path, disks: Disks, digest: Option<&str>) -> Package {
    export_named(dir, disks, digest, [DISK1, DISK2])
}

fn export_named(dir: &Path, disks: Disks, digest: Option<&str>, names: [&str; 2]) -> Package {
    let (disk1, disk2) = disk_contents();
    for (name, data) in names.iter().zip([&disk1, &disk2]) {
        if disks == Disks::Raw {
            write(dir, name, data);
            continue;
        }
        let raw = write(dir, &format!("{name}.raw"), data);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&raw),
            s(&dir.join(name)),
        ]);
        fs::remove_file(raw).unwrap();
    }
    let size = |name: &str| fs::metadata(dir.join(name)).unwrap().len();
    write(
        dir,
        "web01.ovf",
        ovftool_descriptor((names[0], size(names[0])), (names[1], size(names[1]))),
    );
    if let Some(digest) = digest {
        let files = ["web01.ovf", names[0], names[1]];
        write(dir, "web01.mf", manifest(dir, digest, &files));
    }
    Package {
        dir: dir.to_owned(),
        disk1,
        disk2,
        names: names.map(str::to_owned),
    }
}

/// Manifest lines as ovftool writes them, from `sha256sum` or `sha1sum`.
fn manifest(dir: &Path, digest: &str, files: &[&str]) -> String {
    let tool = format!("{}sum", digest.to_ascii_lowercase());
    let output = Command::new(&tool).args(files).current_dir(dir).output().unwrap();
    assert!(output.status.success(), "{tool} failed");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (hex, file) = line.split_once("  ").unwrap();
            format!("{digest}({file})= {hex}\n")
        })
        .collect()
}

/// `tar -cf <ova> <members>` in the package's folder.
fn tar(package: &Package, ova: &str, members: &[&str]) -> PathBuf {
    tar_with(package, ova, &[], members)
}

fn tar_with(package: &Package, ova: &str, options: &[&str], members: &[&str]) -> PathBuf {
    let status = Command::new("tar")
        .args(options)
        .arg("-cf")
        .arg(ova)
        .args(members)
        .current_dir(&package.dir)
        .status()
        .expect("these tests need tar");
    assert!(status.success());
    package.dir.join(ova)
}

/// The usual OVA: descriptor first, then the manifest, then the disks.
fn standard_ova(package: &Package) -> PathBuf {
    tar(
        package,
        "web01.ova",
        &["web01.ovf", "web01.mf", &package.names[0], &package.names[1]],
    )
}

fn read_all(disk: &SourceDisk) -> Vec<u8> {
    let reader = open_source_disk(disk).unwrap();
    assert_eq!(reader.capacity(), disk.capacity);
    let mut out = vec![0; disk.capacity as usize];
    // In uneven pieces, so reads cross grain boundaries.
    for (n, chunk) in out.chunks_mut(300_000).enumerate() {
        reader.read_at(n as u64 * 300_000, chunk).unwrap();
    }
    out
}

fn member_of<'a>(ova: &Path, name: &str, members: &'a mut Vec<ArchiveMember>) -> &'a ArchiveMember {
    let (file, len) = disk::open_read_only(ova, "test").unwrap();
    let archive = FileSlice {
        path: ova.to_owned(),
        file: std::sync::Arc::new(file),
        start: 0,
        len,
    };
    *members = index(&archive).unwrap();
    members.iter().find(|m| m.name == name).unwrap()
}

#[test]
fn reads_an_ova_exported_like_ovftool() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, Some("SHA256"));
    let ova = standard_ova(&package);
    let before = fs::read(&ova).unwrap();

    let vm = open_vm(&ova).unwrap();
    assert_eq!(vm.vmx_path, ova);
    assert_eq!(vm.name, "web01");
    assert_eq!(vm.guest_os, "debian12_64Guest");
    assert_eq!((vm.num_cpus, vm.cores_per_socket, vm.memory_mib), (2, Some(2), 2048));
    assert_eq!(vm.firmware.as_deref(), Some("efi"));
    let disks: Vec<_> = vm
        .disks
        .iter()
        .map(|d| {
            (
                d.key.as_str(),
                d.capacity,
                d.format,
                d.archive_member.as_ref().map(|m| m.name.as_str()),
            )
        })
        .collect();
    assert_eq!(
        disks,
        [
            ("scsi0:0", 4 << 20, DiskFormat::VmdkStreamOptimized, Some(DISK1)),
            ("scsi0:1", 2 << 20, DiskFormat::VmdkStreamOptimized, Some(DISK2)),
        ]
    );
    assert!(vm.disks.iter().all(|d| d.path == ova));
    let nics: Vec<_> = vm
        .nics
        .iter()
        .map(|n| {
            (
                n.key.as_str(),
                n.network.as_str(),
                n.virtual_dev.as_deref(),
                n.mac.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        nics,
        [
            ("ethernet0", "VM Network", Some("vmxnet3"), Some("00:50:56:AA:BB:01")),
            ("ethernet1", "Prod-DMZ", Some("vmxnet3"), Some("00:50:56:aa:bb:02")),
        ]
    );
    assert_eq!(vm.notes, ["ide1:0 is a CD/DVD drive, not migrated"], "{:?}", vm.notes);

    assert!(read_all(&vm.disks[0]) == package.disk1, "disk 1 differs");
    assert!(read_all(&vm.disks[1]) == package.disk2, "disk 2 differs");
    // Read in place: the archive is untouched and nothing was unpacked beside it.
    assert_eq!(fs::read(&ova).unwrap(), before);
}

#[test]
fn reads_the_same_package_unpacked_as_an_ovf() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, Some("SHA256"));
    let ova = standard_ova(&package);
    let unpacked = dir.path().join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&ova)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(status.success());

    let ovf = unpacked.join("web01.ovf");
    let vm = open_vm(&ovf).unwrap();
    assert_eq!(vm.vmx_path, ovf);
    assert_eq!(vm.name, "web01");
    let keys: Vec<_> = vm.disks.iter().map(|d| (d.key.as_str(), d.capacity)).collect();
    assert_eq!(keys, [("scsi0:0", 4 << 20), ("scsi0:1", 2 << 20)]);
    assert_eq!(vm.disks[0].path, unpacked.join(DISK1));
    assert!(vm.disks.iter().all(|d| d.archive_member.is_none()));
    assert!(read_all(&vm.disks[0]) == package.disk1, "disk 1 differs");
    assert!(read_all(&vm.disks[1]) == package.disk2, "disk 2 differs");

    // An altered disk beside the .ovf is caught by the manifest.
    let disk2 = unpacked.join(DISK2);
    let mut bytes = fs::read(&disk2).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&disk2, bytes).unwrap();
    let err = open_vm(&ovf).unwrap_err();
    assert!(
        matches!(&err, SourceError::ManifestMismatch { file, .. } if file == DISK2),
        "{err}"
    );
    assert!(
        err.to_string().contains("the OVF package was altered or truncated"),
        "{err}"
    );

    // Without a manifest the same package opens, with a note that nothing was verified.
    fs::remove_file(unpacked.join("web01.mf")).unwrap();
    fs::write(&disk2, fs::read(package.dir.join(DISK2)).unwrap()).unwrap();
    let vm = open_vm(&ovf).unwrap();
    assert!(vm.notes.iter().any(|n| n.contains("no manifest")), "{:?}", vm.notes);

    // A missing disk file is named.
    fs::remove_file(&disk2).unwrap();
    let msg = open_vm(&ovf).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("disk scsi0:1 is file2 ({DISK2}), which does not exist")),
        "{msg}"
    );
}

#[test]
fn refuses_a_manifest_digest_mismatch_before_reading_any_disk() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, Some("SHA256"));
    let manifest_text = fs::read_to_string(dir.path().join("web01.mf")).unwrap();
    let real = manifest_text
        .lines()
        .find(|l| l.contains(DISK2))
        .and_then(|l| l.split("= ").nth(1))
        .unwrap()
        .to_owned();
    let wrong = "0".repeat(64);
    fs::write(dir.path().join("web01.mf"), manifest_text.replace(&real, &wrong)).unwrap();
    let ova = standard_ova(&package);

    let err = open_vm(&ova).unwrap_err();
    match &err {
        SourceError::ManifestMismatch {
            file,
            algorithm,
            expected,
            actual,
            ..
        } => {
            assert_eq!((file.as_str(), *algorithm), (DISK2, "SHA256"));
            assert_eq!((expected, actual), (&wrong, &real));
        }
        other => panic!("expected a manifest mismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&wrong) && msg.contains(&real), "{msg}");
    assert!(
        msg.contains("the OVA was altered or truncated; download it again"),
        "{msg}"
    );

    // A byte flipped inside a disk member of a good OVA.
    fs::write(dir.path().join("web01.mf"), &manifest_text).unwrap();
    let ova = standard_ova(&package);
    let mut members = Vec::new();
    let member = member_of(&ova, DISK1, &mut members).clone();
    let mut bytes = fs::read(&ova).unwrap();
    bytes[(member.offset + member.len / 2) as usize] ^= 1;
    fs::write(&ova, bytes).unwrap();
    let err = open_vm(&ova).unwrap_err();
    assert!(
        matches!(&err, SourceError::ManifestMismatch { file, .. } if file == DISK1),
        "{err}"
    );

    // The descriptor itself is checked too.
    fs::write(dir.path().join("web01.mf"), &manifest_text).unwrap();
    let ovf = fs::read_to_string(dir.path().join("web01.ovf")).unwrap();
    fs::write(dir.path().join("web01.ovf"), ovf.replace("2048", "4096")).unwrap();
    let err = open_vm(&standard_ova(&package)).unwrap_err();
    assert!(
        matches!(&err, SourceError::ManifestMismatch { file, .. } if file == "web01.ovf"),
        "{err}"
    );
}

#[test]
fn accepts_an_sha1_manifest_and_notes_unlisted_files() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, Some("SHA1"));
    let vm = open_vm(&standard_ova(&package)).unwrap();
    assert_eq!(vm.disks.len(), 2);
    assert!(vm.notes.iter().all(|n| !n.contains("manifest")), "{:?}", vm.notes);

    // A manifest that covers only the descriptor and disk 1.
    let partial = manifest(dir.path(), "SHA512", &["web01.ovf", DISK1]);
    fs::write(dir.path().join("web01.mf"), partial).unwrap();
    let vm = open_vm(&standard_ova(&package)).unwrap();
    assert!(
        vm.notes.contains(&format!(
            "{DISK2} is not listed in the manifest web01.mf, so it is not verified"
        )),
        "{:?}",
        vm.notes
    );
}

#[test]
fn refuses_a_truncated_ova() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, Some("SHA256"));
    let ova = standard_ova(&package);
    let mut members = Vec::new();
    let member = member_of(&ova, DISK2, &mut members).clone();
    let bytes = fs::read(&ova).unwrap();

    // Cut in the middle of the last disk: its header says more than the file holds.
    fs::write(&ova, &bytes[..(member.offset + member.len / 2) as usize]).unwrap();
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(
        msg.contains(DISK2) && msg.contains("the OVA is truncated; download it again"),
        "{msg}"
    );

    // Cut in the middle of a header.
    fs::write(&ova, &bytes[..(member.offset - 100) as usize]).unwrap();
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(msg.contains("ends in the middle of a header"), "{msg}");

    // Cut exactly before the last disk's header: the archive looks complete but lacks a file.
    fs::write(&ova, &bytes[..(member.offset - 512) as usize]).unwrap();
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("lists {DISK2}, which is not in the archive")),
        "{msg}"
    );

    // Not a tar archive at all.
    fs::write(&ova, pseudo_random(4096, 5)).unwrap();
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(msg.contains("checksum"), "{msg}");
}

#[test]
fn refuses_an_ova_without_a_disk_file_or_with_malformed_xml() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, None);
    let ova = tar(&package, "web01.ova", &["web01.ovf", DISK1]);
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(
        msg.contains("web01.ovf line") && msg.contains(&format!("is file2 ({DISK2}), which is not in the archive")),
        "{msg}"
    );

    let text = fs::read_to_string(dir.path().join("web01.ovf")).unwrap();
    let broken = text.replace("</References>", "</Reference>");
    let line = text[..text.find("</References>").unwrap()].matches('\n').count() + 1;
    fs::write(dir.path().join("web01.ovf"), broken).unwrap();
    let ova = tar(&package, "web01.ova", &["web01.ovf", DISK1, DISK2]);
    let err = open_vm(&ova).unwrap_err();
    assert!(
        matches!(err, SourceError::BadOvf { line: Some(l), .. } if l == line),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("web01.ova: web01.ovf line {line}: ")),
        "{err}"
    );

    let ova = tar(&package, "nothing.ova", &[DISK1]);
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(msg.contains("no .ovf descriptor"), "{msg}");

    // A member appended under an existing name (tar -r) would shadow the original on unpacking.
    fs::write(dir.path().join("web01.ovf"), &text).unwrap();
    let ova = tar(&package, "twice.ova", &["web01.ovf", DISK1, DISK2]);
    let status = Command::new("tar")
        .arg("-rf")
        .arg(&ova)
        .arg(DISK2)
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("{DISK2}: the archive holds two members of this name")),
        "{msg}"
    );
}

#[test]
fn reads_raw_members_and_long_names() {
    let dir = tempfile::tempdir().unwrap();
    let long1 = format!("{}-disk1.img", "a-rather-long-vm-name".repeat(6));
    let long2 = format!("{}-disk2.img", "a-rather-long-vm-name".repeat(6));
    assert!(long1.len() > 100);
    let package = export_named(dir.path(), Disks::Raw, Some("SHA256"), [&long1, &long2]);
    // GNU long-name records and pax path records (plain ustar cannot hold these names).
    for format in ["gnu", "posix"] {
        let members = ["web01.ovf", "web01.mf", long1.as_str(), long2.as_str()];
        let ova = tar_with(
            &package,
            &format!("{format}.ova"),
            &[&format!("--format={format}")],
            &members,
        );
        let vm = open_vm(&ova).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(vm.disks[0].format, DiskFormat::Raw);
        assert_eq!(vm.disks[1].archive_member.as_ref().unwrap().name, long2);
        assert!(read_all(&vm.disks[0]) == package.disk1, "{format}: disk 1 differs");
        assert!(read_all(&vm.disks[1]) == package.disk2, "{format}: disk 2 differs");
    }
}

#[test]
fn refuses_a_disk_whose_capacity_or_size_disagrees_with_the_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, None);
    let text = fs::read_to_string(dir.path().join("web01.ovf")).unwrap();
    fs::write(
        dir.path().join("web01.ovf"),
        text.replace(r#"ovf:capacity="4""#, r#"ovf:capacity="8""#),
    )
    .unwrap();
    let msg = open_vm(&tar(&package, "a.ova", &["web01.ovf", DISK1, DISK2]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("disk scsi0:0 (web01-disk1.vmdk) holds 4194304 bytes but the descriptor gives disk vmdisk1 a capacity of 8388608 bytes"),
        "{msg}"
    );

    let size = fs::metadata(dir.path().join(DISK2)).unwrap().len();
    fs::write(
        dir.path().join("web01.ovf"),
        text.replace(&format!(r#"ovf:size="{size}""#), r#"ovf:size="12345""#),
    )
    .unwrap();
    let msg = open_vm(&tar(&package, "b.ova", &["web01.ovf", DISK1, DISK2]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!("{DISK2} is {size} bytes but the descriptor says 12345")),
        "{msg}"
    );
}

#[test]
fn parses_tar_numbers() {
    assert_eq!(octal(b"00000001750\0"), Some(1000));
    assert_eq!(octal(b"  1750 \0"), Some(1000));
    assert_eq!(octal(b"\0\0\0"), Some(0));
    assert_eq!(octal(b"0009"), None);
    assert_eq!(octal(b"77777777777777777777777"), None);

    let mut block = [0u8; BLOCK as usize];
    // A 16 GiB member, base-256 as GNU tar writes sizes of 8 GiB and more.
    block[124] = 0x80;
    block[131..136].copy_from_slice(&[0x04, 0x00, 0x00, 0x00, 0x00]);
    assert_eq!(Header(&block).size(), Ok(16 << 30));
    block[124..136].fill(0xff);
    assert!(Header(&block).size().is_err());
    block[124] = 0x80;
    assert!(Header(&block).size().is_err(), "overflow");

    let pax = Pax::parse(b"28 path=some/long/name.vmdk\n17 size=12345678\n").unwrap();
    assert_eq!(pax.path.as_deref(), Some("some/long/name.vmdk"));
    assert_eq!(pax.size, Some(12_345_678));
    assert!(Pax::parse(b"99 path=x\n").is_err());
    assert!(Pax::parse(b"3 x\n").is_err());
    assert!(Pax::parse(b"22 GNU.sparse.major=1\n").unwrap().sparse);
}

/// A member named `.vmdk` whose bytes are no VMDK (a damaged KDMV magic, or a raw disk under
/// a VMDK name) is refused, not read as raw; the operator may take it as raw by its key.
#[test]
fn a_vmdk_member_that_is_not_a_vmdk_is_refused_unless_taken_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, None);
    let disk2 = dir.path().join(DISK2);
    let mut bytes = fs::read(&disk2).unwrap();
    bytes[3] = b'W';
    fs::write(&disk2, bytes).unwrap();
    let ova = tar(&package, "damaged.ova", &["web01.ovf", DISK1, DISK2]);
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("damaged.ova/{DISK2}: its name says a VMDK"))
            && msg.contains("one byte off sparse VMDK's `KDMV` magic")
            && msg.contains("`--raw-disk scsi0:1`"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::Raw, None);
    let ova = tar(&package, "raw.ova", &["web01.ovf", DISK1, DISK2]);
    let msg = open_vm(&ova).unwrap_err().to_string();
    assert!(
        msg.contains("disk scsi0:0") && msg.contains("its name says a VMDK"),
        "{msg}"
    );
    let options = crate::source::SourceOptions {
        raw_disks: vec!["scsi0:0".into(), "scsi0:1".into()],
        ..Default::default()
    };
    let vm = crate::source::open_vm_with(&ova, &options).unwrap();
    assert!(vm.disks.iter().all(|d| d.taken_as_raw && d.format == DiskFormat::Raw));
    assert!(read_all(&vm.disks[0]) == package.disk1);
    assert!(read_all(&vm.disks[1]) == package.disk2);
}

/// `edge-agent abort` opens an OVA only to name the VM: a disk cut short since (its digest,
/// size and capacity all wrong) does not stop it.
#[test]
fn a_damaged_ova_can_still_be_named_for_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let package = export(dir.path(), Disks::StreamOptimized, Some("SHA256"));
    let disk2 = dir.path().join(DISK2);
    let len = fs::metadata(&disk2).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&disk2)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let ova = standard_ova(&package);
    assert!(open_vm(&ova).is_err());
    let options = crate::source::SourceOptions {
        configuration_only: true,
        ..Default::default()
    };
    let vm = crate::source::open_vm_with(&ova, &options).unwrap();
    assert_eq!((vm.name.as_str(), vm.disks.len()), ("web01", 2));
}
