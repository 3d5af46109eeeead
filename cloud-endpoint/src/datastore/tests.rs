use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::Command;

use super::*;

fn datastore(capacity: Option<u64>) -> (tempfile::TempDir, Datastore) {
    let dir = tempfile::tempdir().unwrap();
    let ds = Datastore::open(&dir.path().join("ds"), "cloud-ds1", capacity).unwrap();
    (dir, ds)
}

#[test]
fn open_creates_root_and_staging_and_checks_the_name() {
    let (_dir, ds) = datastore(None);
    assert!(ds.root().join(".staging").is_dir());
    assert_eq!(ds.name(), "cloud-ds1");
    for bad in ["", "ds[1]", "a\nb"] {
        let err = Datastore::open(ds.root(), bad, None).unwrap_err();
        assert!(
            matches!(err, DatastoreError::BadDatastoreName { .. }),
            "{bad:?}: {err:?}"
        );
    }
}

#[test]
fn vm_name_rules() {
    for good in [
        "web01",
        "Web 01 (prod)",
        "ümlaut-ß",
        "a.b",
        "x]y",
        &"n".repeat(80),
        "a|b",
    ] {
        Datastore::check_vm_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
    for (bad, rule) in [
        ("", "empty"),
        (&"n".repeat(81) as &str, "80"),
        ("a/b", "'/'"),
        ("a\\b", "'\\'"),
        ("a\0b", "NUL"),
        ("a\tb", "control"),
        ("a\u{7f}", "control"),
        ("a\"b", "'\"'"),
        (".", "\".\""),
        ("..", "\"..\""),
        (".hidden", "starts with '.'"),
    ] {
        let err = Datastore::check_vm_name(bad).unwrap_err();
        assert!(err.to_string().contains(rule), "{bad:?}: {err}");
    }
    // 80 characters, not bytes.
    Datastore::check_vm_name(&"é".repeat(80)).unwrap();
}

#[test]
fn free_bytes_is_capped_by_the_configured_capacity() {
    let (_dir, ds) = datastore(None);
    let fs_free = ds.free_bytes(0, 0).unwrap();
    assert!(fs_free > 0);
    assert_eq!(
        ds.free_bytes(u64::MAX, 0).unwrap(),
        fs_free,
        "without a capacity, `used` does not matter"
    );

    let capped = Datastore::open(ds.root(), "cloud-ds1", Some(10_000)).unwrap();
    assert_eq!(capped.free_bytes(0, 0).unwrap(), 10_000.min(fs_free));
    assert_eq!(capped.free_bytes(4_000, 0).unwrap(), 6_000.min(fs_free));
    assert_eq!(capped.free_bytes(20_000, 0).unwrap(), 0);

    let huge = Datastore::open(ds.root(), "cloud-ds1", Some(u64::MAX)).unwrap();
    assert_eq!(
        huge.free_bytes(0, 0).unwrap(),
        fs_free,
        "the filesystem's free space still limits"
    );
}

#[test]
fn reservations_and_boot_files_count_against_the_free_space() {
    let (_dir, ds) = datastore(None);
    // Without a capacity, what running migrations reserved and have not written yet is
    // not free, though the filesystem still has it (their disks are sparse).
    let fs_free = ds.free_bytes(0, 0).unwrap();
    let reserved = fs_free / 2;
    let left = ds.free_bytes(reserved, reserved).unwrap();
    assert!(
        left < fs_free - reserved / 2,
        "{left} bytes free with {reserved} of {fs_free} reserved"
    );
    // What the staging area holds already is in the filesystem's count, not again: a
    // staged disk counts what it holds, not its size.
    assert_eq!(ds.staged_bytes(), 0);
    let staged = ds.stage("migration-1", "web01").unwrap();
    std::fs::write(staged.dir().join("written"), vec![1u8; 1 << 20]).unwrap();
    std::fs::File::create(staged.dir().join("sparse"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let held = ds.staged_bytes();
    assert!((1 << 20..2 << 20).contains(&held), "{held} bytes staged");

    // With a capacity: boot files promised count until they are let go.
    let capped = Datastore::open(ds.root(), "cloud-ds1", Some(10_000)).unwrap();
    assert_eq!(capped.free_bytes(4_000, 0).unwrap(), 6_000);
    let boot = capped.reserve_scratch(1_000, 4_000, 0, "boot files").unwrap();
    assert_eq!(capped.free_bytes(4_000, 0).unwrap(), 5_000);
    let err = capped.reserve_scratch(5_001, 4_000, 0, "boot files").unwrap_err();
    assert_eq!(
        err.to_string(),
        "datastore cloud-ds1 has 5000 bytes free, and boot files need 5001 bytes; free space in it, or wait for the migrations under way to end"
    );
    // Clones of the datastore (the domain's and a request's) see the same promises.
    assert_eq!(capped.clone().free_bytes(4_000, 0).unwrap(), 5_000);
    drop(boot);
    assert_eq!(capped.free_bytes(4_000, 0).unwrap(), 6_000);
}

#[test]
fn disk_file_names_follow_vsphere() {
    assert_eq!(
        Staging::disk_file_names("web01", 0),
        ("web01.vmdk".into(), "web01-flat.vmdk".into())
    );
    assert_eq!(
        Staging::disk_file_names("web01", 2),
        ("web01_2.vmdk".into(), "web01_2-flat.vmdk".into())
    );
    assert_eq!(
        datastore_path("cloud-ds1", "web01", "web01.vmdk"),
        "[cloud-ds1] web01/web01.vmdk"
    );
}

#[test]
fn stage_makes_a_fresh_folder_and_sparse_disks() {
    let (_dir, ds) = datastore(None);
    let staging = ds.stage("migration-1", "web01").unwrap();
    assert_eq!(staging.dir(), ds.root().join(".staging/migration-1"));
    assert!(matches!(
        ds.stage("migration-1", "web01"),
        Err(DatastoreError::StagingExists { .. })
    ));
    assert!(matches!(
        ds.stage("../x", "web01"),
        Err(DatastoreError::BadMigrationId { .. })
    ));
    assert!(matches!(
        ds.stage("migration-2", "a/b"),
        Err(DatastoreError::BadVmName { .. })
    ));

    let capacity = 64 << 30;
    let disk = staging.create_disk(1, capacity, DiskFormat::VmdkFlat).unwrap();
    assert_eq!(disk.file_name(), "web01_1.vmdk");
    assert_eq!(disk.path(), staging.dir().join("web01_1-flat.vmdk"));
    disk.write_at(b"boot", 1 << 30).unwrap();
    disk.finish().unwrap();
    let file = File::open(disk.path()).unwrap();
    let meta = fs::metadata(staging.dir().join("web01_1-flat.vmdk")).unwrap();
    assert_eq!(meta.len(), capacity);
    // 512-byte blocks actually allocated: a few KiB, not 64 GiB.
    assert!(meta.blocks() < 1024, "{} blocks allocated", meta.blocks());
    let mut hole = [0xffu8; 4096];
    file.read_exact_at(&mut hole, 12345).unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert!(
        staging.create_disk(1, 1, DiskFormat::VmdkFlat).is_err(),
        "an existing disk is not truncated"
    );
    assert!(
        disk.write_at(b"tail", capacity - 2).is_err(),
        "no write past the capacity"
    );
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is on PATH")
}

#[test]
fn descriptors_are_read_by_qemu_img() {
    let (_dir, ds) = datastore(None);
    let staging = ds.stage("migration-3", "db 01").unwrap();
    let capacity: u64 = 20 << 20;
    let raw_path = staging.dir().join("expected.raw");
    let raw = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&raw_path)
        .unwrap();
    raw.set_len(capacity).unwrap();
    for (index, key) in [(0, "scsi0:0"), (1, "ide0:1")] {
        let disk = staging.create_disk(index, capacity, DiskFormat::VmdkFlat).unwrap();
        for (offset, data) in [
            (0u64, &b"MBR!"[..]),
            (7 << 20, &[0xAB; 5000][..]),
            (capacity - 512, &[1u8; 512][..]),
        ] {
            disk.write_at(data, offset).unwrap();
            raw.write_all_at(data, offset).unwrap();
        }
        staging.write_descriptor(index, capacity, key, &kind(key)).unwrap();
    }
    raw.sync_all().unwrap();

    let first = staging.dir().join("db 01.vmdk");
    let text = fs::read_to_string(&first).unwrap();
    assert!(text.contains("createType=\"monolithicFlat\""), "{text}");
    assert!(
        text.contains(&format!("RW {} FLAT \"db 01-flat.vmdk\" 0", capacity / 512)),
        "{text}"
    );
    assert!(text.contains("ddb.adapterType = \"lsilogic\""), "{text}");
    assert!(text.contains("ddb.geometry.heads = \"255\""), "{text}");
    assert!(text.contains("ddb.geometry.cylinders = \"2\""), "{text}"); // 40960 / (255 * 63)
    assert!(text.contains("ddb.virtualHWVersion = \"14\""), "{text}");
    let second = staging.dir().join("db 01_1.vmdk");
    let text = fs::read_to_string(&second).unwrap();
    assert!(text.contains("ddb.adapterType = \"ide\""), "{text}");
    assert!(text.contains("ddb.geometry.heads = \"16\""), "{text}");
    assert!(text.contains("ddb.geometry.cylinders = \"40\""), "{text}"); // 40960 / (16 * 63)

    for descriptor in [&first, &second] {
        let out = qemu_img(&["info", "--output=json", descriptor.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["format"], "vmdk", "{info}");
        assert_eq!(info["virtual-size"], capacity, "{info}");
        assert_eq!(
            info["format-specific"]["data"]["create-type"], "monolithicFlat",
            "{info}"
        );

        let out = qemu_img(&[
            "compare",
            "-f",
            "vmdk",
            "-F",
            "raw",
            descriptor.to_str().unwrap(),
            raw_path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The comparison is real: one changed byte makes it fail.
    raw.write_all_at(b"x", 3 << 20).unwrap();
    let out = qemu_img(&[
        "compare",
        "-f",
        "vmdk",
        "-F",
        "raw",
        first.to_str().unwrap(),
        raw_path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn descriptor_rejects_partial_sectors_and_bad_keys() {
    let (_dir, ds) = datastore(None);
    let staging = ds.stage("migration-4", "web01").unwrap();
    assert!(matches!(
        staging.write_descriptor(0, 1000, "scsi0:0", &kind("scsi0:0")),
        Err(DatastoreError::UnalignedCapacity { .. })
    ));
    for key in ["floppy0:0", "scsi0", "scsi:0", "scsix:0", "scsi0:", "scsi0:+1"] {
        let err = staging.write_descriptor(0, 512, key, &kind("scsi0:0")).unwrap_err();
        assert!(matches!(err, DatastoreError::BadDeviceKey { .. }), "{key}: {err:?}");
    }
    let sectors = (70_000u64 * 255 * 63 + 5) * 512;
    staging
        .write_descriptor(0, sectors, "nvme0:0", &kind("nvme0:0"))
        .unwrap();
    let text = fs::read_to_string(staging.dir().join("web01.vmdk")).unwrap();
    assert!(text.contains("ddb.geometry.cylinders = \"65535\""), "{text}");
}

fn spec() -> VmxSpec {
    VmxSpec {
        name: "web \"01\" | prod".into(),
        guest_os: "ubuntu-64".into(),
        num_cpus: 4,
        cores_per_socket: Some(2),
        memory_mib: 4096,
        firmware: Some("efi".into()),
        bios_uuid: Some("42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8".into()),
        disks: vec![
            VmxDisk {
                key: "scsi0:0".into(),
                file_name: "web01.vmdk".into(),
            },
            VmxDisk {
                key: "scsi0:1".into(),
                file_name: "web01_1.vmdk".into(),
            },
            VmxDisk {
                key: "sata0:0".into(),
                file_name: "web01_2.vmdk".into(),
            },
            VmxDisk {
                key: "ide0:0".into(),
                file_name: "web01_3.vmdk".into(),
            },
            VmxDisk {
                key: "nvme1:0".into(),
                file_name: "web01_4.vmdk".into(),
            },
            VmxDisk {
                key: "scsi1:0".into(),
                file_name: "web01_5.vmdk".into(),
            },
        ],
        controllers: vec![
            gateway::plan::ControllerSpec {
                key: "scsi0".into(),
                kind: gateway::plan::ControllerType::Pvscsi,
            },
            gateway::plan::ControllerSpec {
                key: "sata0".into(),
                kind: gateway::plan::ControllerType::Ahci,
            },
        ],
        nics: vec![
            VmxNic {
                key: "ethernet0".into(),
                network_name: "cloud-web".into(),
                virtual_dev: Some("vmxnet3".into()),
                mac: Some("00:50:56:01:02:03".into()),
                address_type: Some("static".into()),
            },
            VmxNic {
                key: "ethernet1".into(),
                network_name: "cloud|db".into(),
                virtual_dev: None,
                mac: None,
                address_type: None,
            },
            VmxNic {
                key: "ethernet2".into(),
                network_name: "cloud-web".into(),
                virtual_dev: Some("e1000e".into()),
                mac: Some("00:50:56:9a:00:07".into()),
                address_type: Some("vpx".into()),
            },
        ],
    }
}

#[test]
fn vmx_has_every_setting_quoted_and_escaped() {
    let (_dir, ds) = datastore(None);
    let staging = ds.stage("migration-5", "web01").unwrap();
    staging.write_vmx(&spec()).unwrap();
    let text = fs::read_to_string(staging.dir().join("web01.vmx")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], ".encoding = \"UTF-8\"");
    for expected in [
        "config.version = \"8\"",
        "virtualHW.version = \"14\"",
        "displayName = \"web |2201|22 |7C prod\"",
        "guestOS = \"ubuntu-64\"",
        "numvcpus = \"4\"",
        "cpuid.coresPerSocket = \"2\"",
        "memsize = \"4096\"",
        "firmware = \"efi\"",
        "uuid.bios = \"42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8\"",
        "scsi0.present = \"TRUE\"",
        "scsi0.virtualDev = \"pvscsi\"",
        // A controller the plan does not list gets its bus's default.
        "scsi1.virtualDev = \"lsilogic\"",
        "scsi1:0.fileName = \"web01_5.vmdk\"",
        "firmware = \"efi\"",
        "scsi0:1.present = \"TRUE\"",
        "scsi0:1.fileName = \"web01_1.vmdk\"",
        "scsi0:1.deviceType = \"scsi-hardDisk\"",
        "sata0.present = \"TRUE\"",
        "sata0:0.deviceType = \"disk\"",
        "ide0:0.deviceType = \"ata-hardDisk\"",
        "nvme1.present = \"TRUE\"",
        "nvme1:0.fileName = \"web01_4.vmdk\"",
        "ethernet0.present = \"TRUE\"",
        "ethernet0.networkName = \"cloud-web\"",
        "ethernet0.virtualDev = \"vmxnet3\"",
        "ethernet0.addressType = \"static\"",
        "ethernet0.address = \"00:50:56:01:02:03\"",
        "ethernet1.networkName = \"cloud|7Cdb\"",
        "ethernet1.addressType = \"generated\"",
        // A vCenter-assigned MAC stays one, under the key vSphere reads it from.
        "ethernet2.virtualDev = \"e1000e\"",
        "ethernet2.addressType = \"vpx\"",
        "ethernet2.generatedAddress = \"00:50:56:9a:00:07\"",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
    }
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("scsi0.present")).count(),
        1,
        "{text}"
    );
    assert!(!text.contains("ide0.present"), "{text}");
    assert!(!text.contains("ethernet1.virtualDev"), "{text}");
    assert!(!text.contains("ethernet1.address ="), "{text}");
    let controller = lines.iter().position(|l| l.starts_with("scsi0.present")).unwrap();
    let first_disk = lines.iter().position(|l| l.starts_with("scsi0:0.")).unwrap();
    assert!(controller < first_disk);
    // Every line is `key = "value"` with no stray quote inside the value.
    for line in &lines {
        let (_, value) = line.split_once(" = ").unwrap();
        assert!(
            value.starts_with('"') && value.ends_with('"') && !value[1..value.len() - 1].contains('"'),
            "{line}"
        );
    }

    let mut minimal = spec();
    minimal.cores_per_socket = None;
    minimal.firmware = None;
    minimal.bios_uuid = None;
    minimal.name = "tab\there".into();
    let text = vmx_text(&minimal).unwrap();
    assert!(!text.contains("cpuid.coresPerSocket") && !text.contains("firmware") && !text.contains("uuid.bios"));
    assert!(text.contains("displayName = \"tab|09here\""), "{text}");

    let mut bad = spec();
    bad.nics[0].key = "eth0".into();
    assert!(matches!(
        staging.write_vmx(&bad),
        Err(DatastoreError::BadDeviceKey { .. })
    ));
}

#[test]
fn commit_moves_the_folder_into_place() {
    let (_dir, ds) = datastore(None);
    let staging = ds.stage("migration-6", "web01").unwrap();
    staging
        .create_disk(0, 1 << 20, DiskFormat::VmdkFlat)
        .unwrap()
        .write_at(b"data", 0)
        .unwrap();
    staging
        .write_descriptor(0, 1 << 20, "scsi0:0", &kind("scsi0:0"))
        .unwrap();
    staging.write_vmx(&spec()).unwrap();
    let staged = staging.dir().to_owned();
    assert!(!ds.vm_dir_exists("web01"));
    let folder = staging.commit().unwrap();
    assert_eq!(folder, ds.root().join("web01"));
    assert!(!staged.exists());
    assert!(ds.vm_dir_exists("web01"));
    assert!(!ds.vm_dir_exists(".."), "invalid names are never reported as existing");
    let mut names: Vec<String> = fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["web01-flat.vmdk", "web01.vmdk", "web01.vmx"]);
    assert_eq!(&fs::read(folder.join("web01-flat.vmdk")).unwrap()[..4], b"data");
}

#[test]
fn commit_onto_an_existing_folder_fails_and_keeps_the_staging() {
    let (_dir, ds) = datastore(None);
    // Even an empty folder is not replaced (plain rename(2) would replace it).
    fs::create_dir(ds.root().join("web01")).unwrap();
    let staging = ds.stage("migration-7", "web01").unwrap();
    staging.create_disk(0, 4096, DiskFormat::VmdkFlat).unwrap();
    let staged = staging.dir().to_owned();
    let err = staging.commit().unwrap_err();
    match &err {
        DatastoreError::VmFolderExists { path, staging } => {
            assert_eq!(path, &ds.root().join("web01"));
            assert_eq!(staging, &staged);
        }
        other => panic!("{other:?}"),
    }
    assert!(staged.join("web01-flat.vmdk").is_file());
    assert_eq!(fs::read_dir(ds.root().join("web01")).unwrap().count(), 0);
}

#[test]
fn discard_and_clean_staging_remove_leftovers() {
    let (_dir, ds) = datastore(None);
    let staging = ds.stage("migration-8", "a").unwrap();
    staging.create_disk(0, 4096, DiskFormat::VmdkFlat).unwrap();
    let dir = staging.dir().to_owned();
    staging.discard().unwrap();
    assert!(!dir.exists());

    // Dropping a Staging keeps its files; clean_staging removes them at the next start.
    let kept = ds.stage("migration-9", "b").unwrap();
    kept.create_disk(0, 4096, DiskFormat::VmdkFlat).unwrap();
    let kept_dir = kept.dir().to_owned();
    drop(kept);
    assert!(kept_dir.is_dir());
    let other = ds.stage("migration-10", "c").unwrap().dir().to_owned();
    fs::write(ds.root().join(".staging/stray-file"), b"x").unwrap();
    let removed = ds.clean_staging().unwrap();
    assert_eq!(removed, [other, kept_dir, ds.root().join(".staging/stray-file")]);
    assert_eq!(fs::read_dir(ds.root().join(".staging")).unwrap().count(), 0);
    assert!(ds.clean_staging().unwrap().is_empty());
}

/// The type a disk key's controller has by default.
fn kind(key: &str) -> gateway::plan::ControllerType {
    let bus = gateway::plan::Slot::parse(key).map_or(gateway::plan::Bus::Scsi, |s| s.bus);
    gateway::plan::ControllerType::default_for(bus)
}
