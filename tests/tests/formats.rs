//! Destination disk formats: qcow2 and raw chosen by the migration, qcow2 as a
//! datastore's default, and a migration overriding that default. Every disk is
//! checked with `qemu-img` against its source.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use e2e::*;
use edge_agent::migrate::MigrateOptions;
use gateway::plan::DiskFormat;

const MIB: usize = 1 << 20;

/// A two-disk VM: a 12 MiB disk with holes and a small one whose size is not a whole
/// number of sectors (3,300,000 bytes), so chunks and clusters do not line up.
fn two_disk_vm(dir: &Path, name: &str) -> (PathBuf, [PathBuf; 2]) {
    std::fs::create_dir_all(dir).unwrap();
    use Fill::*;
    let os = dir.join(format!("{name}.img"));
    let data = dir.join(format!("{name}-data.img"));
    write_raw_disk(&os, 2 * MIB, &[Random, Text, Zero, Zero, Text, Random], 11);
    write_raw_disk(
        &data,
        300_000,
        &[Text, Zero, Random, Text, Zero, Zero, Random, Text, Text, Zero, Text],
        12,
    );
    let vmx = write_vmx(
        dir,
        name,
        &[&format!("{name}.img"), &format!("{name}-data.img")],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:aa:bb:07",
        }],
    );
    (vmx, [os, data])
}

/// Checks what a migration of [`two_disk_vm`] left: the disk files (`extension` with
/// qemu-img's `format`), the .vmx naming them, the inventory's datastore paths.
fn assert_landed(cloud: &Cloud, name: &str, sources: &[PathBuf; 2], extension: &str, format: &str) {
    let dest = cloud.root.join(name);
    let files = [format!("{name}.{extension}"), format!("{name}_1.{extension}")];
    let mut expected: Vec<String> = files.to_vec();
    expected.push(format!("{name}.vmx"));
    if format == "vmdk" {
        expected.extend([format!("{name}-flat.vmdk"), format!("{name}_1-flat.vmdk")]);
    }
    expected.sort();
    let mut found: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    found.sort();
    assert_eq!(found, expected);

    let vmx = std::fs::read_to_string(dest.join(format!("{name}.vmx"))).unwrap();
    let vm = cloud.domain.inventory.vm_by_name(name).unwrap().expect("registered");
    for (i, (file, source)) in files.iter().zip(sources).enumerate() {
        let image = dest.join(file);
        let image = image.to_str().unwrap();
        assert!(images_identical(source, Path::new(image)), "{file}");
        let info = qemu_img(&["info", "--output=json", image]);
        assert!(info.contains(&format!("\"format\": \"{format}\"")), "{info}");
        let size = std::fs::metadata(source).unwrap().len();
        let whole_sectors = size.div_ceil(512) * 512;
        assert!(info.contains(&format!("\"virtual-size\": {whole_sectors},")), "{info}");
        if format != "raw" {
            // No errors, no leaks: qemu-img check exits non-zero on either.
            qemu_img(&["check", image]);
        }
        assert!(vmx.contains(&format!("scsi0:{i}.fileName = \"{file}\"")), "{vmx}");
        assert_eq!(vm.disks[i].path, format!("[cloud-ds1] {name}/{file}"));
        assert_eq!(vm.disks[i].capacity_bytes, size);
    }
    assert_eq!(
        cloud
            .datastore_entries()
            .iter()
            .filter(|e| e.starts_with(".staging"))
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_can_ask_for_qcow2_or_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);

    let (vmx, sources) = two_disk_vm(&tmp.path().join("src-q"), "kvm01");
    let opts = MigrateOptions {
        disk_format: Some(DiskFormat::Qcow2),
        ..MigrateOptions::default()
    };
    let summary = migrate(&vmx, &target, &opts).await.expect("qcow2 migration");
    assert_eq!(summary.disks, 2);
    assert_landed(&cloud, "kvm01", &sources, "qcow2", "qcow2");

    let (vmx, sources) = two_disk_vm(&tmp.path().join("src-r"), "raw01");
    let opts = MigrateOptions {
        disk_format: Some(DiskFormat::Raw),
        ..MigrateOptions::default()
    };
    migrate(&vmx, &target, &opts).await.expect("raw migration");
    assert_landed(&cloud, "raw01", &sources, "img", "raw");
    // Zero regions stay holes in a raw image.
    let image = std::fs::metadata(cloud.root.join("raw01/raw01.img")).unwrap();
    assert_eq!(image.len(), 12 * MIB as u64);
    assert!(
        image.blocks() * 512 <= 9 * MIB as u64,
        "zeros are holes: {} bytes allocated",
        image.blocks() * 512
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datastore_can_default_to_qcow2_and_a_migration_can_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_DOMAIN__DATASTORE__DISK_FORMAT", "qcow2")],
    )
    .await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);

    // Chunks of 100 KiB: neighbouring chunks share 64 KiB qcow2 clusters.
    let (vmx, sources) = two_disk_vm(&tmp.path().join("src-d"), "db01");
    let opts = MigrateOptions {
        chunk_size: 100 * 1024,
        ..MigrateOptions::default()
    };
    migrate(&vmx, &target, &opts)
        .await
        .expect("migration to the default format");
    assert_landed(&cloud, "db01", &sources, "qcow2", "qcow2");

    let (vmx, sources) = two_disk_vm(&tmp.path().join("src-v"), "web01");
    let opts = MigrateOptions {
        disk_format: Some(DiskFormat::VmdkFlat),
        ..MigrateOptions::default()
    };
    migrate(&vmx, &target, &opts).await.expect("vmdk migration");
    assert_landed(&cloud, "web01", &sources, "vmdk", "vmdk");
    cloud.stop().await;
}
