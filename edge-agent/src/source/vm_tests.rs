use std::path::Path;

use super::*;
use crate::source::testutil::{pseudo_random, qemu_img, s, write};
use crate::source::{open_vm, DiskFormat};

/// A `.vmx` with the usual header lines plus `body`.
fn vmx_text(body: &str) -> String {
    format!(".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\n{body}")
}

fn raw_disk(dir: &Path, name: &str, len: usize) {
    write(dir, name, pseudo_random(len, len as u64));
}

#[test]
fn reads_a_vm_with_two_disks_a_cdrom_and_an_absent_disk() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&dir.path().join("web01.vmdk")),
        "10M",
    ]);
    raw_disk(dir.path(), "web01_1.img", 3 << 20);
    let body = "\
displayName = \"web |22one|22 |7C prod\"
guestOS = \"ubuntu-64\"
numvcpus = \"4\"
cpuid.coresPerSocket = \"2\"
memsize = \"4096\"
firmware = \"EFI\"
uuid.bios = \"42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8\"
scsi0.present = \"TRUE\"
scsi0.virtualDev = \"pvscsi\"
scsi0:1.present = \"TRUE\"
scsi0:1.fileName = \"web01_1.img\"
scsi0:0.present = \"TRUE\"
scsi0:0.fileName = \"web01.vmdk\"
scsi0:0.deviceType = \"scsi-hardDisk\"
scsi0:2.present = \"FALSE\"
scsi0:2.fileName = \"gone.vmdk\"
ide1:0.present = \"TRUE\"
ide1:0.deviceType = \"cdrom-image\"
ide1:0.fileName = \"/isos/ubuntu.iso\"
ethernet0.present = \"TRUE\"
ethernet0.virtualDev = \"vmxnet3\"
ethernet0.networkName = \"VM Network\"
ethernet0.addressType = \"generated\"
ethernet0.generatedAddress = \"00:0c:29:aa:bb:cc\"
";
    let vmx = write(dir.path(), "web01.vmx", vmx_text(body));

    let vm = open_vm(&vmx).unwrap();
    assert_eq!(vm.vmx_path, vmx);
    assert_eq!(vm.name, "web \"one\" | prod");
    assert_eq!(vm.guest_os, "ubuntu-64");
    assert_eq!((vm.num_cpus, vm.cores_per_socket), (4, Some(2)));
    assert_eq!(vm.memory_mib, 4096);
    assert_eq!(vm.firmware.as_deref(), Some("efi"));
    assert_eq!(
        vm.bios_uuid.as_deref(),
        Some("42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8")
    );

    let disks: Vec<_> = vm
        .disks
        .iter()
        .map(|d| (d.key.as_str(), d.path.clone(), d.capacity, d.format))
        .collect();
    assert_eq!(
        disks,
        [
            ("scsi0:0", dir.path().join("web01.vmdk"), 10 << 20, DiskFormat::VmdkFlat),
            ("scsi0:1", dir.path().join("web01_1.img"), 3 << 20, DiskFormat::Raw),
        ]
    );
    assert_eq!(
        vm.notes,
        [
            "scsi0:2 has present = FALSE, not migrated",
            "ide1:0 is a CD-ROM (cdrom-image), not migrated",
        ]
    );
    assert_eq!(vm.nics.len(), 1);
}

#[test]
fn disks_are_ordered_by_bus_then_controller_then_unit() {
    let dir = tempfile::tempdir().unwrap();
    let slots = [
        "ide0:0", "nvme0:0", "sata0:1", "sata0:0", "scsi1:0", "scsi0:10", "scsi0:2",
    ];
    let mut body = String::new();
    for (i, slot) in slots.iter().enumerate() {
        raw_disk(dir.path(), &format!("d{i}.img"), 4096);
        body.push_str(&format!("{slot}.fileName = \"d{i}.img\"\n"));
    }
    let vmx = write(dir.path(), "order.vmx", vmx_text(&body));
    let vm = open_vm(&vmx).unwrap();
    let keys: Vec<_> = vm.disks.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(
        keys,
        ["scsi0:2", "scsi0:10", "scsi1:0", "sata0:0", "sata0:1", "nvme0:0", "ide0:0"]
    );
}

#[test]
fn skipped_devices_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    raw_disk(dir.path(), "a.img", 4096);
    let body = "\
memsize = \"1024\"
scsi0.virtualDev = \"lsilogic\"
scsi0:0.fileName = \"a.img\"
scsi1.present = \"FALSE\"
scsi1:0.fileName = \"missing-but-ignored.vmdk\"
sata0:0.deviceType = \"cdrom-raw\"
sata0:0.fileName = \"auto detect\"
sata0:1.fileName = \"tools.ISO\"
scsi0:3.deviceType = \"scsi-passthru\"
scsi0:3.fileName = \"/dev/sg1\"
scsi0:4.redo = \"\"
";
    let vmx = write(dir.path(), "skips.vmx", vmx_text(body));
    let vm = open_vm(&vmx).unwrap();
    assert_eq!(vm.disks.len(), 1);
    assert_eq!(
        vm.notes,
        [
            "scsi0:3 is a SCSI passthrough device (scsi-passthru), not migrated",
            "scsi0:4 has no fileName, not migrated",
            "scsi1:0 is on controller scsi1, which has present = FALSE; not migrated",
            "sata0:0 is a CD-ROM (cdrom-raw), not migrated",
            "sata0:1 is a CD-ROM image (tools.ISO), not migrated",
        ]
    );
}

#[test]
fn a_missing_disk_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    raw_disk(dir.path(), "web01.img", 4096);
    let body = "scsi0:0.fileName = \"web01.img\"\nscsi0:1.present = \"TRUE\"\nscsi0:1.fileName = \"web01_1.vmdk\"\n";
    let vmx = write(dir.path(), "web01.vmx", vmx_text(body));
    let err = open_vm(&vmx).unwrap_err();
    assert!(matches!(err, SourceError::DiskMissing { .. }), "{err}");
    let folder = dir.path().display();
    assert_eq!(
        err.to_string(),
        format!(
            "{folder}/web01.vmx: disk scsi0:1 points to web01_1.vmdk, which does not exist \
             ({folder}/web01_1.vmdk): restore the file or mark the disk `present = \"FALSE\"`"
        )
    );
}

#[test]
fn an_unreadable_disk_is_reported_with_its_device() {
    let dir = tempfile::tempdir().unwrap();
    // An encrypted qcow2 image: a format the agent reads, in a variant it refuses.
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&dir.path().join("disk.qcow2")),
        "1M",
    ]);
    let vmx = write(dir.path(), "q.vmx", vmx_text("sata0:0.fileName = \"disk.qcow2\"\n"));
    let err = open_vm(&vmx).unwrap_err();
    let msg = err.to_string();
    match &err {
        SourceError::Disk { key, source, .. } => {
            assert_eq!(key, "sata0:0");
            assert!(matches!(**source, SourceError::Unsupported { .. }), "{msg}");
        }
        _ => panic!("expected SourceError::Disk, got {msg}"),
    }
    assert!(msg.contains("q.vmx: disk sata0:0: ") && msg.contains("qcow2"), "{msg}");

    let vmx = write(dir.path(), "p.vmx", vmx_text("scsi0:0.present = \"TRUE\"\n"));
    let err = open_vm(&vmx).unwrap_err();
    assert!(matches!(err, SourceError::DiskWithoutFile { .. }), "{err}");
}

#[test]
fn nics_take_static_or_generated_macs() {
    let dir = tempfile::tempdir().unwrap();
    let body = "\
memsize = \"512\"
ethernet10.present = \"TRUE\"
ethernet10.networkName = \"Backup\"
ethernet10.addressType = \"vpx\"
ethernet10.generatedAddress = \"00:50:56:8a:00:10\"
ethernet0.present = \"TRUE\"
ethernet0.virtualDev = \"e1000e\"
ethernet0.networkName = \"Prod |7C DMZ\"
ethernet0.addressType = \"static\"
ethernet0.address = \"00:50:56:01:02:03\"
ethernet0.generatedAddress = \"00:0c:29:ff:ff:ff\"
ethernet1.networkName = \"VM Network\"
ethernet1.addressType = \"generated\"
ethernet1.address = \"00:50:56:99:99:99\"
ethernet1.generatedAddress = \"00:0C:29:AB:CD:EF\"
ethernet2.present = \"FALSE\"
ethernet3.present = \"TRUE\"
ethernet3.networkName = \"Lab\"
";
    let vmx = write(dir.path(), "nics.vmx", vmx_text(body));
    let vm = open_vm(&vmx).unwrap();
    let nics: Vec<_> = vm
        .nics
        .iter()
        .map(|n| {
            (
                n.key.as_str(),
                n.network.as_str(),
                n.virtual_dev.as_deref(),
                n.address_type.as_deref(),
                n.mac.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        nics,
        [
            (
                "ethernet0",
                "Prod | DMZ",
                Some("e1000e"),
                Some("static"),
                Some("00:50:56:01:02:03")
            ),
            (
                "ethernet1",
                "VM Network",
                None,
                Some("generated"),
                Some("00:0C:29:AB:CD:EF")
            ),
            ("ethernet3", "Lab", None, None, None),
            ("ethernet10", "Backup", None, Some("vpx"), Some("00:50:56:8a:00:10")),
        ]
    );
    assert_eq!(
        vm.notes,
        [
            "ethernet2 has present = FALSE, not migrated",
            "ethernet3 has no generatedAddress; the target will assign a MAC address",
        ]
    );
    assert!(vm.disks.is_empty());
}

#[test]
fn bad_nics_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let body = "ethernet0.connectionType = \"nat\"\nethernet0.generatedAddress = \"00:0c:29:aa:bb:cc\"\n";
    let vmx = write(dir.path(), "a.vmx", vmx_text(body));
    let msg = open_vm(&vmx).unwrap_err().to_string();
    assert!(
        msg.contains("ethernet0 has no networkName (connectionType nat)") && msg.contains("ethernet0.networkName"),
        "{msg}"
    );

    let body = "ethernet0.networkName = \"VM Network\"\nethernet0.generatedAddress = \"00:0c:29:aa:bb\"\n";
    let vmx = write(dir.path(), "b.vmx", vmx_text(body));
    let err = open_vm(&vmx).unwrap_err();
    assert!(matches!(err, SourceError::VmxValue { line: 5, .. }), "{err}");
    assert!(err.to_string().contains("not a MAC address"), "{err}");
}

#[test]
fn defaults_apply_when_keys_are_absent() {
    let dir = tempfile::tempdir().unwrap();
    let vmx = write(dir.path(), "lonely.vmx", "config.version = \"8\"\n");
    let vm = open_vm(&vmx).unwrap();
    assert_eq!(vm.name, "lonely");
    assert_eq!(vm.guest_os, "otherGuest");
    assert_eq!((vm.num_cpus, vm.cores_per_socket), (1, None));
    assert_eq!(vm.memory_mib, 256);
    assert_eq!((vm.firmware, vm.bios_uuid), (None, None));
    assert!(vm.nics.is_empty() && vm.disks.is_empty());
    assert_eq!(vm.notes, ["memsize is absent; assuming 256 MiB, VMware's default"]);
}

#[test]
fn bad_values_and_keys_are_refused_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    for (body, line, expect) in [
        ("numvcpus = \"two\"\n", 4, "numvcpus = \"two\" is not a valid number"),
        ("numvcpus = \"0\"\n", 4, "at least 1"),
        ("memsize = \"-5\"\n", 4, "memsize"),
        ("firmware = \"uefi\"\n", 4, "use \"bios\" or \"efi\""),
        ("scsi0:0.present = \"sure\"\n", 4, "not a boolean"),
    ] {
        let vmx = write(dir.path(), "bad.vmx", vmx_text(body));
        let err = open_vm(&vmx).unwrap_err();
        assert!(
            matches!(err, SourceError::VmxValue { line: l, .. } if l == line),
            "{err}"
        );
        assert!(err.to_string().contains(expect), "{err}");
    }
    let vmx = write(
        dir.path(),
        "key.vmx",
        vmx_text("displayName = \"x\"\nscsi0:x.fileName = \"a.vmdk\"\n"),
    );
    let err = open_vm(&vmx).unwrap_err();
    assert!(matches!(err, SourceError::VmxSyntax { line: 5, .. }), "{err}");
    assert!(err.to_string().contains("not a valid device key"), "{err}");
}

#[test]
fn a_disk_image_is_not_taken_for_a_vmx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web01.vmdk");
    qemu_img(&["create", "-f", "vmdk", s(&path), "1M"]);
    let err = open_vm(&path).unwrap_err();
    assert!(matches!(err, SourceError::NotVmx { .. }), "{err}");
    assert!(err.to_string().contains("pass the VM's .vmx"), "{err}");
}

/// A NIC as the test compares it: key, model, address type, MAC.
type NicView<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>);

#[test]
fn controllers_nics_and_firmware_are_read_as_the_vmx_says() {
    let dir = tempfile::tempdir().unwrap();
    let mut body = String::from(
        "firmware = \"efi\"
scsi0.present = \"TRUE\"
scsi0.virtualDev = \"pvscsi\"
scsi1.present = \"TRUE\"
scsi1.virtualDev = \"BusLogic\"
scsi2.present = \"TRUE\"
sata0.present = \"TRUE\"
nvme0.present = \"TRUE\"
ethernet0.present = \"TRUE\"
ethernet0.virtualDev = \"vmxnet3\"
ethernet0.networkName = \"VM Network\"
ethernet0.addressType = \"static\"
ethernet0.address = \"00:50:56:00:00:0a\"
ethernet1.virtualDev = \"e1000e\"
ethernet1.networkName = \"DB\"
ethernet1.addressType = \"vpx\"
ethernet1.generatedAddress = \"00:50:56:9a:00:0b\"
",
    );
    for (i, slot) in ["scsi0:0", "scsi1:3", "scsi2:0", "sata0:2", "nvme0:1", "ide0:1"]
        .iter()
        .enumerate()
    {
        raw_disk(dir.path(), &format!("d{i}.img"), 4096);
        body.push_str(&format!("{slot}.present = \"TRUE\"\n{slot}.fileName = \"d{i}.img\"\n"));
    }
    let vmx = write(dir.path(), "hw.vmx", vmx_text(&body));
    let vm = open_vm(&vmx).unwrap();
    assert_eq!(vm.firmware.as_deref(), Some("efi"));
    let controllers: Vec<(&str, ControllerType)> = vm
        .controllers
        .iter()
        .map(|c| (c.key.as_str(), c.kind.clone()))
        .collect();
    assert_eq!(
        controllers,
        [
            ("scsi0", ControllerType::Pvscsi),
            ("scsi1", ControllerType::BusLogic),
            ("scsi2", ControllerType::LsiLogic),
            ("sata0", ControllerType::Ahci),
            ("nvme0", ControllerType::Nvme),
            ("ide0", ControllerType::Ide),
        ]
    );
    // A SCSI controller that names no type is not guessed at silently.
    assert!(
        vm.notes
            .iter()
            .any(|n| n.starts_with("scsi2 has no virtualDev; taken as lsilogic")),
        "{:?}",
        vm.notes
    );
    let nics: Vec<NicView> = vm
        .nics
        .iter()
        .map(|n| {
            (
                n.key.as_str(),
                n.virtual_dev.as_deref(),
                n.address_type.as_deref(),
                n.mac.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        nics,
        [
            ("ethernet0", Some("vmxnet3"), Some("static"), Some("00:50:56:00:00:0a")),
            ("ethernet1", Some("e1000e"), Some("vpx"), Some("00:50:56:9a:00:0b")),
        ]
    );
}

#[test]
fn a_controller_holding_only_a_cdrom_is_not_listed() {
    let dir = tempfile::tempdir().unwrap();
    raw_disk(dir.path(), "a.img", 4096);
    let body = "scsi0.virtualDev = \"lsisas1068\"
scsi0:0.fileName = \"a.img\"
sata0.present = \"TRUE\"
sata0:0.deviceType = \"cdrom-image\"
sata0:0.fileName = \"x.iso\"
";
    let vmx = write(dir.path(), "cd.vmx", vmx_text(body));
    let vm = open_vm(&vmx).unwrap();
    let keys: Vec<(&str, &ControllerType)> = vm.controllers.iter().map(|c| (c.key.as_str(), &c.kind)).collect();
    assert_eq!(keys, [("scsi0", &ControllerType::LsiSas1068)]);
}
