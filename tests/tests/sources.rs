//! Every source format a legacy estate holds, made by real tools at test time,
//! migrated end to end over QUIC and compared with `qemu-img compare`.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::*;
use edge_agent::migrate::MigrateOptions;

const MIB: usize = 1 << 20;

/// A raw image with random, compressible and zero regions, and a size that
/// is not a multiple of the chunk size.
fn raw_image(dir: &Path) -> PathBuf {
    use Fill::*;
    let path = dir.join("source.raw");
    write_raw_disk(&path, MIB, &[Random, Text, Zero, Zero, Text, Random, Zero, Text], 11);
    // 8 MiB + 64 KiB: the last chunk is short.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(8 * MIB as u64 + 65536).unwrap();
    path
}

fn convert(raw: &Path, out: &Path, args: &[&str]) {
    let mut all = vec!["convert", "-q", "-f", "raw"];
    all.extend_from_slice(args);
    all.push(raw.to_str().unwrap());
    all.push(out.to_str().unwrap());
    qemu_img(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vmdk_and_qcow2_flavour_arrives_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let raw = raw_image(&src);

    let mut cases: Vec<(&str, PathBuf)> = Vec::new();
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let out = src.join(format!("{sub}.vmdk"));
        convert(&raw, &out, &["-O", "vmdk", "-o", &format!("subformat={sub}")]);
        cases.push((sub, out));
    }
    for (name, opts) in [
        ("qcow2", ""),
        ("qcow2-deflate", "-c"),
        ("qcow2-zstd", "zstd"),
        ("qcow2-v2", "compat=0.10"),
    ] {
        let out = src.join(format!("{name}.qcow2"));
        match opts {
            "" => convert(&raw, &out, &["-O", "qcow2"]),
            "-c" => convert(&raw, &out, &["-O", "qcow2", "-c"]),
            "zstd" => convert(&raw, &out, &["-O", "qcow2", "-c", "-o", "compression_type=zstd"]),
            o => convert(&raw, &out, &["-O", "qcow2", "-o", o]),
        }
        cases.push((name, out));
    }
    // A backing chain: base + an overlay that rewrites part of it.
    let base = src.join("base.qcow2");
    convert(&raw, &base, &["-O", "qcow2"]);
    let top = src.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let io = Command::new("qemu-io")
        .args(["-c", "write -P 0x5a 1M 1536k", "-c", "write -z 5M 1M"])
        .arg(&top)
        .output()
        .expect("qemu-io on PATH");
    assert!(io.status.success(), "{}", String::from_utf8_lossy(&io.stderr));
    cases.push(("qcow2-chain", top));
    // A VMDK snapshot chain: a sparse base and a delta.
    let vbase = src.join("vbase.vmdk");
    convert(&raw, &vbase, &["-O", "vmdk", "-o", "subformat=monolithicSparse"]);
    let delta = src.join("vdelta.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        vbase.to_str().unwrap(),
        "-F",
        "vmdk",
        delta.to_str().unwrap(),
    ]);
    let io = Command::new("qemu-io")
        .args(["-f", "vmdk", "-c", "write -P 0x33 2M 512k"])
        .arg(&delta)
        .output()
        .unwrap();
    assert!(io.status.success(), "{}", String::from_utf8_lossy(&io.stderr));
    cases.push(("vmdk-chain", delta));

    for (i, (name, disk)) in cases.iter().enumerate() {
        let vm_name = format!("fmt{i:02}");
        let vmx = write_vmx(&src, &vm_name, &[disk.file_name().unwrap().to_str().unwrap()], &[]);
        let before = sha256_of(disk);
        let summary = migrate(&vmx, &target, &MigrateOptions::default())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            summary.zero_bytes >= 2 * MIB as u64,
            "{name}: unallocated ranges are skipped"
        );
        let dest = cloud.root.join(&vm_name).join(format!("{vm_name}.vmdk"));
        assert!(images_identical(disk, &dest), "{name} differs after migration");
        assert_eq!(sha256_of(disk), before, "{name}: the source was modified");
    }
    cloud.stop().await;
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// An OVF like ovftool writes: one streamOptimized disk on scsi0:0, two NICs.
fn ovf(disk_file: &str, disk_size: u64, capacity: u64) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:href="{disk_file}" ovf:id="file1" ovf:size="{disk_size}"/></References>
  <DiskSection><Info>disks</Info>
    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection><Info>networks</Info><Network ovf:name="VM Network"/><Network ovf:name="Legacy-App"/></NetworkSection>
  <VirtualSystem ovf:id="appliance01">
    <Info>A virtual machine</Info>
    <Name>appliance01</Name>
    <OperatingSystemSection ovf:id="101" vmw:osType="centos7_64Guest"><Info>os</Info></OperatingSystemSection>
    <VirtualHardwareSection><Info>hardware</Info>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:ElementName>4 virtual CPU(s)</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ElementName>4096MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>4096</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>SCSI controller 0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:ElementName>Hard disk 1</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>7</rasd:AddressOnParent><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>VM Network</rasd:Connection><rasd:ElementName>Network adapter 1</rasd:ElementName><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType><rasd:Address>00:50:56:ab:cd:01</rasd:Address></Item>
      <Item><rasd:AddressOnParent>8</rasd:AddressOnParent><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>Legacy-App</rasd:Connection><rasd:ElementName>Network adapter 2</rasd:ElementName><rasd:InstanceID>6</rasd:InstanceID><rasd:ResourceSubType>E1000</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ova_is_verified_and_migrated_without_unpacking() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let raw = raw_image(&src);
    let disk = src.join("appliance01-disk1.vmdk");
    convert(&raw, &disk, &["-O", "vmdk", "-o", "subformat=streamOptimized"]);
    let size = std::fs::metadata(&disk).unwrap().len();
    let capacity = std::fs::metadata(&raw).unwrap().len();
    std::fs::write(
        src.join("appliance01.ovf"),
        ovf("appliance01-disk1.vmdk", size, capacity),
    )
    .unwrap();
    let mf: String = ["appliance01.ovf", "appliance01-disk1.vmdk"]
        .iter()
        .map(|f| format!("SHA256({f})= {}\n", sha256_of(&src.join(f))))
        .collect();
    std::fs::write(src.join("appliance01.mf"), &mf).unwrap();
    let tar = Command::new("tar")
        .current_dir(&src)
        .args([
            "-cf",
            "appliance01.ova",
            "appliance01.ovf",
            "appliance01.mf",
            "appliance01-disk1.vmdk",
        ])
        .status()
        .unwrap();
    assert!(tar.success());
    let ova = src.join("appliance01.ova");

    let opts = MigrateOptions {
        network_map: vec![("Legacy-App".into(), "cloud-db".into())],
        ..MigrateOptions::default()
    };
    let summary = migrate(&ova, &target, &opts).await.expect("the OVA migrates");
    assert_eq!(summary.vm, "appliance01");
    let dest = cloud.root.join("appliance01/appliance01.vmdk");
    assert!(images_identical(&raw, &dest));
    let vm = cloud.domain.inventory.vm_by_name("appliance01").unwrap().unwrap();
    assert_eq!(
        (vm.num_cpus, vm.memory_mib, vm.guest_os.as_str()),
        (4, 4096, "centos7_64Guest")
    );
    let nics: Vec<_> = vm.nics.iter().map(|n| n.network_name.as_str()).collect();
    assert_eq!(nics, ["VM Network", "cloud-db"]);
    assert_eq!(vm.nics[0].mac.as_deref(), Some("00:50:56:ab:cd:01"));

    // The same OVA with one byte of the disk altered: refused before anything moves.
    let bad = src.join("altered.ova");
    let mut bytes = std::fs::read(&ova).unwrap();
    // A byte inside the disk member (not the tar's zero padding at the end).
    let disk_at = bytes
        .windows(4)
        .position(|w| w == b"KDMV")
        .expect("the disk is in the archive");
    bytes[disk_at + 70_000] ^= 0xff;
    std::fs::write(&bad, bytes).unwrap();
    let err = migrate(
        &bad,
        &target,
        &MigrateOptions {
            name: Some("altered".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not match the manifest"), "{err}");
    assert!(
        cloud.domain.inventory.list_migrations().unwrap().len() == 1,
        "never reached the cloud"
    );
    cloud.stop().await;
}
