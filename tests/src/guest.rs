//! The test guest of the QEMU tests (tests/live/guest.sh: a Debian cloud kernel and a
//! busybox initramfs) and a source VM that runs it: it prints `counter N` on its serial
//! console and records N on its disk (live migration, replication of a QEMU source).

use std::path::{Path, PathBuf};
use std::process::Command;

use edge_agent::live;
use gateway::qemu::{DirectKernel, QemuBinary};

use crate::{eventually, qemu_img};

/// The guest's kernel, initrd and command line, built once into target/live-guest.
pub fn guest(extra_append: &str) -> DirectKernel {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let cache = repo.join("target/live-guest");
    let out = Command::new(repo.join("tests/live/guest.sh"))
        .arg(&cache)
        .output()
        .expect("run tests/live/guest.sh");
    assert!(
        out.status.success(),
        "guest.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = std::fs::read_to_string(cache.join("guest.env")).unwrap();
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} in guest.env"))
            .trim_matches('"')
            .to_owned()
    };
    DirectKernel {
        kernel: var("KERNEL").into(),
        initrd: Some(var("INITRD").into()),
        append: Some(format!("{} {extra_append}", var("APPEND")).trim().to_owned()),
    }
}

/// A 256 MiB, 1 vCPU VM with an empty 64 MiB qcow2 disk and one NIC.
pub fn vm(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        dir.join(format!("{name}.qcow2")).to_str().unwrap(),
        "64M",
    ]);
    let vmx = format!(
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"14\"\n\
         displayName = \"{name}\"\nguestOS = \"debian12-64\"\nnumvcpus = \"1\"\nmemsize = \"256\"\n\
         scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\n\
         scsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"{name}.qcow2\"\n\
         ethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"e1000\"\nethernet0.networkName = \"VM Network\"\n\
         ethernet0.addressType = \"static\"\nethernet0.address = \"00:50:56:12:34:56\"\n"
    );
    let path = dir.join(format!("{name}.vmx"));
    std::fs::write(&path, vmx).unwrap();
    path
}

/// The counters the guest printed on a console log so far.
pub fn counters(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("counter ")?.trim().parse().ok())
        .collect()
}

pub async fn wait_counter(log: &Path, at_least: u64, secs: u64) -> u64 {
    eventually(secs, || counters(log).last().copied().filter(|&n| n >= at_least))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the guest did not count to {at_least} within {secs} s: {:?}",
                counters(log)
            )
        })
}

/// A child process killed when dropped: a failed test leaves no guest running.
#[derive(Debug)]
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
pub struct Source {
    /// QEMU itself, not a QemuProcess: QEMU's monitor serves one QMP client at a time,
    /// and the edge agent is the one.
    pub process: Killed,
    pub serial: PathBuf,
    pub qmp: PathBuf,
    pub vm: edge_agent::source::SourceVm,
    pub kernel: DirectKernel,
}

pub async fn start_source(binary: &QemuBinary, dir: &Path, name: &str, append: &str) -> Source {
    let vmx = vm(dir, name);
    let vm = edge_agent::source::open_vm(&vmx).unwrap();
    let kernel = guest(append);
    let serial = dir.join("source.console.log");
    let qmp = dir.join("source.qmp");
    let spec = live::source_machine(&vm, Some(kernel.clone()), &serial, &qmp).unwrap();
    spec.validate().unwrap();
    let log = std::fs::File::create(dir.join("source.qemu.log")).unwrap();
    let process = Command::new(binary.path())
        .args(spec.argv())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(Killed)
        .expect("the source VM starts");
    // Booting under TCG takes 5-12 s.
    wait_counter(&serial, 3, 90).await;
    Source {
        process,
        serial,
        qmp,
        vm,
        kernel,
    }
}

/// Where [`boot_sector_disk`] keeps its message: what a test changes to tell one
/// state of the disk from another by what the guest prints.
pub const BOOT_MESSAGE_OFFSET: u64 = 0x17;

/// A 1 MiB raw disk whose MBR prints `message` (and CR LF) on COM1 and halts. SeaBIOS loads the
/// sector at 0000:7C00 and jumps to it in real mode; the UART needs no setup for QEMU to
/// pass the bytes to its chardev.
pub fn boot_sector_disk(path: &Path, message: &str) {
    let mut sector: Vec<u8> = vec![
        0xFA, //             0x7c00 cli
        0x31, 0xC0, //       0x7c01 xor ax, ax
        0x8E, 0xD8, //       0x7c03 mov ds, ax           ; the text is at DS:SI = 0:7c17
        0xFC, //             0x7c05 cld                  ; lodsb counts up
        0xBE, 0x17, 0x7C, // 0x7c06 mov si, 0x7c17       ; the text follows these 23 bytes
        0xBA, 0xF8, 0x03, // 0x7c09 mov dx, 0x3f8        ; COM1's data port
        0xAC, //             0x7c0c next: lodsb          ; al = [si++]
        0x84, 0xC0, //       0x7c0d test al, al
        0x74, 0x03, //       0x7c0f jz halt              ; NUL ends the text
        0xEE, //             0x7c11 out dx, al
        0xEB, 0xF8, //       0x7c12 jmp next
        0xF4, //             0x7c14 halt: hlt            ; interrupts are off: stays here
        0xEB, 0xFD, //       0x7c15 jmp halt             ; (an NMI would wake it)
    ];
    assert_eq!(sector.len(), 0x17);
    assert!(message.len() < 480, "the message fits in the boot sector");
    sector.extend_from_slice(message.as_bytes());
    sector.extend_from_slice(b"\r\n\0");
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xAA]); // the BIOS boots only a sector ending so
    sector.resize(1 << 20, 0);
    std::fs::write(path, sector).expect("write the boot disk");
}
