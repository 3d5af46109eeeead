//! Changed-block tracking of a VMware source from its snapshot chain: while the VM runs,
//! a pass reads only the frozen part of each disk's chain, and a later pass reads only
//! the grains of the deltas frozen since; a chain rewritten between passes (a snapshot
//! consolidated) makes the pass compare every chunk and say why. The chains are made by
//! `qemu-img`/`qemu-io`, which write VMware's hosted sparse deltas with their CIDs; the
//! copy is checked with `qemu-img compare` and the signed receipt. Real binaries over QUIC
//! on loopback.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::*;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
/// The replication's chunk: one grain of the deltas qemu-img writes.
const CHUNK: u64 = 64 * KIB;

/// The guest writes: `qemu-io` commands on the disk the VM writes now.
fn qemu_io(disk: &Path, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.arg(disk).output().expect("qemu-io on PATH");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "qemu-io {commands:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// VMware takes a snapshot: a new delta over `parent`, which the .vmx names from now on.
fn take_snapshot(dir: &Path, vm: &str, parent: &str, delta: &str) -> PathBuf {
    let path = dir.join(delta);
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-b",
        parent,
        "-F",
        "vmdk",
        path.to_str().unwrap(),
    ]);
    write_vmx(dir, vm, &[delta], &[]);
    path
}

/// A running VM (its lock beside the .vmx) whose disk `<vm>.vmdk` (16 MiB, 12 MiB
/// written) has one snapshot, `<vm>-000001.vmdk`, the guest writing into it.
fn running_vm(dir: &Path, vm: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join(format!("{vm}.vmdk"));
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicSparse",
        base.to_str().unwrap(),
        "16M",
    ]);
    qemu_io(
        &base,
        &["write -P 0x11 0 4M", "write -P 0x12 4M 4M", "write -P 0x13 12M 4M"],
    );
    let first = take_snapshot(dir, vm, &format!("{vm}.vmdk"), &format!("{vm}-000001.vmdk"));
    std::fs::create_dir(dir.join(format!("{vm}.vmx.lck"))).unwrap();
    (dir.join(format!("{vm}.vmx")), first)
}

fn tracking(summary: &serde_json::Value) -> String {
    summary["snapshots"]
        .as_array()
        .map(|notes| {
            notes
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vmware_vm_syncs_only_the_grains_of_its_frozen_snapshot_deltas() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    let (vmx, first) = running_vm(&src, "db02");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--json", "--chunk-kib", "64"]);
        edge_command(&bin, &pki, &cloud, &vmx, &state, &all)
    };

    // The running VM writes into its newest delta, which the first pass does not read:
    // it lifts the frozen base, 12 MiB of data.
    qemu_io(&first, &["write -P 0x21 1M 64k"]);
    let pass = summary(run(edge(&["replicate"])).await);
    assert_eq!(pass["sent_bytes"].as_u64().unwrap(), 12 * MIB, "{pass}");
    assert!(tracking(&pass).contains("no frozen snapshot chain recorded"), "{pass}");

    // A second snapshot freezes the first delta; the guest goes on writing into the new
    // one. The pass reads and sends exactly the frozen delta's grain, nothing else.
    let second = take_snapshot(&src, "db02", "db02-000001.vmdk", "db02-000002.vmdk");
    qemu_io(&second, &["write -P 0x31 5M 64k"]);
    let pass = summary(run(edge(&["replicate"])).await);
    assert_eq!(pass["read_bytes"].as_u64().unwrap(), CHUNK, "{pass}");
    assert_eq!(pass["sent_bytes"].as_u64().unwrap(), CHUNK, "{pass}");
    assert!(
        tracking(&pass).contains("1 snapshot delta(s) frozen since the last pass changed 1 of 256 chunks"),
        "{pass}"
    );

    // No snapshot since: nothing changed below the running delta, nothing is read.
    let pass = summary(run(edge(&["replicate"])).await);
    assert_eq!(pass["read_bytes"].as_u64().unwrap(), 0, "{pass}");
    assert_eq!(pass["sent_bytes"].as_u64().unwrap(), 0, "{pass}");

    // Powered off, the whole chain is frozen: the switchover reads the newest delta's
    // grains (one written, one zeroed), and the copy is the chain as the VM sees it.
    qemu_io(&second, &["write -P 0x32 9M 64k", "write -z 14M 64k"]);
    std::fs::remove_dir(src.join("db02.vmx.lck")).unwrap();
    let done = summary(run(edge(&["switchover", "--confirm"])).await);
    assert_eq!(done["read_bytes"].as_u64().unwrap(), 3 * CHUNK, "{done}");
    assert_eq!(done["sent_bytes"].as_u64().unwrap(), 2 * CHUNK, "{done}");
    assert!(done["vm_id"].as_str().unwrap().starts_with("vm-"), "{done}");
    assert!(images_identical(&second, &cloud.root.join("db02/db02-flat.vmdk")));
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_rewritten_between_passes_is_compared_chunk_by_chunk_and_says_why() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    let (vmx, first) = running_vm(&src, "app02");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--json", "--chunk-kib", "64"]);
        edge_command(&bin, &pki, &cloud, &vmx, &state, &all)
    };
    summary(run(edge(&["replicate"])).await);

    // The snapshot is deleted (its delta consolidated into the base, which gets a new
    // CID), then a new one is taken: the base the last pass read is not frozen as it was.
    qemu_io(&first, &["write -P 0x41 2M 64k"]);
    qemu_img(&["commit", first.to_str().unwrap()]);
    std::fs::remove_file(&first).unwrap();
    take_snapshot(&src, "app02", "app02.vmdk", "app02-000001.vmdk");
    let pass = summary(run(edge(&["replicate"])).await);
    let why = tracking(&pass);
    assert!(
        why.contains("app02.vmdk was written since the last pass") && why.contains("every chunk is read and compared"),
        "{pass}"
    );
    assert!(pass["read_bytes"].as_u64().unwrap() >= 12 * MIB, "{pass}");
    assert_eq!(pass["sent_bytes"].as_u64().unwrap(), CHUNK, "{pass}");

    std::fs::remove_dir(src.join("app02.vmx.lck")).unwrap();
    summary(run(edge(&["switchover"])).await);
    assert!(images_identical(
        &src.join("app02-000001.vmdk"),
        &cloud.root.join("app02/app02-flat.vmdk")
    ));
    cloud.stop().await;
}
