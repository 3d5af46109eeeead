//! Against a real QEMU when one is installed (these tests pass with a note otherwise;
//! the end-to-end power test is the one CI insists on).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::qemu::{DiskAttachment, DiskFormat, Firmware, MachineDisk, MachineNic, NicBackend};

/// A boot sector that prints "qmp test\r\n" on COM1 and halts.
fn boot_disk(path: &Path) {
    let mut code: Vec<u8> = vec![
        0xFA, //             cli
        0x31, 0xC0, //       xor ax, ax
        0x8E, 0xD8, //       mov ds, ax
        0xFC, //             cld
        0xBE, 0x17, 0x7C, // mov si, 0x7c17        ; the text, after the 23 bytes of code
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8         ; COM1
        0xAC, //             next: lodsb
        0x84, 0xC0, //       test al, al
        0x74, 0x03, //       jz halt
        0xEE, //             out dx, al
        0xEB, 0xF8, //       jmp next
        0xF4, //             halt: hlt
        0xEB, 0xFD, //       jmp halt
    ];
    code.extend_from_slice(b"qmp test\r\n\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xAA]);
    code.resize(1 << 20, 0);
    std::fs::write(path, code).unwrap();
}

/// QEMU, which these tests need: without it they fail and say how to install it.
fn binary() -> QemuBinary {
    QemuBinary::from_env().unwrap_or_else(|e| {
        panic!("this test runs qemu-system-x86_64, which is missing ({e}): run tests/setup.sh, or set QEMU_SYSTEM")
    })
}

/// Kills the QEMU of a failing test (QEMU outlives its parent on purpose).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0);
    }
}

fn spec(dir: &Path) -> MachineSpec {
    boot_disk(&dir.join("boot.img"));
    MachineSpec {
        name: "qmp-test".into(),
        memory_mib: 32,
        vcpus: 1,
        disks: vec![MachineDisk {
            path: dir.join("boot.img"),
            format: DiskFormat::Raw,
            device_id: "disk0".into(),
            node_name: "drive0".into(),
            attachment: DiskAttachment::VirtioBlk,
        }],
        nics: vec![MachineNic {
            id: "nic0".into(),
            mac: Some("00:50:56:00:00:01".into()),
            model: "e1000".into(),
            backend: NicBackend::UserRestricted,
        }],
        controllers: vec![],
        firmware: Firmware::Bios,
        kernel: None,
        serial_log: dir.join("console.log"),
        qmp_socket: dir.join("qmp.sock"),
        incoming_defer: false,
        paused: true,
    }
}

#[test]
fn a_missing_binary_names_the_package() {
    let e = QemuBinary::find(None, Some("/nonexistent".into())).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("qemu-system-x86") && text.contains("bookworm-backports"),
        "{text}"
    );
    assert!(matches!(
        QemuBinary::find(Some("/nonexistent/qemu".into()), None),
        Err(QemuError::BadBinary { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_qemu_boots_answers_qmp_and_stops() {
    let binary = binary();
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let qemu = QemuProcess::spawn(&binary, &spec, &dir.path().join("qemu.log"))
        .await
        .unwrap();
    let _guard = KillOnDrop(qemu.pid());
    let qmp = qemu.qmp();
    assert_eq!(
        qmp.greeting()["version"]["qemu"]["major"].as_u64().map(|m| m >= 7),
        Some(true)
    );
    assert_eq!(
        qmp.execute("query-name", Value::Null).await.unwrap(),
        json!({"name": "qmp-test"})
    );
    let status = qmp.execute("query-status", Value::Null).await.unwrap();
    assert_eq!(status["running"], false, "-S: paused until cont");

    let mut events = qmp.events();
    qmp.execute("cont", Value::Null).await.unwrap();
    qmp.wait_for_event(&mut events, "RESUME", Duration::from_secs(10))
        .await
        .unwrap();
    let console = spec.serial_log.clone();
    let mut booted = false;
    for _ in 0..300 {
        if std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("qmp test")
        {
            booted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(booted, "the boot sector's text reached the console log");

    // QEMU's own refusal keeps its class.
    match qmp.execute("no-such-command", Value::Null).await {
        Err(QemuError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("{other:?}"),
    }
    // Two tasks at once on one connection.
    let (a, b) = tokio::join!(
        qmp.execute("query-status", Value::Null),
        qmp.execute("query-name", Value::Null)
    );
    assert_eq!(a.unwrap()["running"], true);
    assert_eq!(b.unwrap()["name"], "qmp-test");

    // Found again by pid and socket, as after an endpoint restart: QEMU's monitor takes
    // one client at a time, so the first connection ends first.
    assert!(is_qemu_serving(qemu.pid(), &spec.qmp_socket));
    assert!(!is_qemu_serving(qemu.pid(), Path::new("/elsewhere.sock")));
    qmp.close().await;
    let again = QemuProcess::attach(qemu.pid(), &spec.qmp_socket).await.unwrap();
    assert_eq!(
        again.qmp().execute("query-name", Value::Null).await.unwrap()["name"],
        "qmp-test"
    );
    assert!(qemu.exit_status().is_none(), "closing QMP does not stop QEMU");

    let mut events = again.qmp().events();
    again.stop(Duration::from_secs(10)).await.unwrap();
    let how = tokio::time::timeout(Duration::from_secs(10), qemu.wait())
        .await
        .unwrap();
    assert!(how.contains("exit"), "{how}");
    assert!(!Path::new(&format!("/proc/{}", qemu.pid())).exists());
    let _ = again
        .qmp()
        .wait_for_event(&mut events, "SHUTDOWN", Duration::from_secs(1))
        .await;
}

#[tokio::test]
async fn qemu_refusing_the_command_line_is_reported_with_its_output() {
    let binary = binary();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(dir.path());
    spec.disks[0].path = dir.path().join("missing.img");
    match QemuProcess::spawn(&binary, &spec, &dir.path().join("qemu.log")).await {
        Err(QemuError::ExitedAtStart { output, .. }) => assert!(output.contains("missing.img"), "{output}"),
        other => panic!("{other:?}"),
    }
}
