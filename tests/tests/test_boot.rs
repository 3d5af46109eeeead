//! A test boot of a replica while the replication goes on: a disposable copy of the
//! replica runs in the cloud (its console read through the API) and shows the source as
//! the last pass left it, a pass runs meanwhile without touching the copy, discarding the
//! copy leaves nothing behind, and the switchover discards a copy that still runs. The
//! guest is a hand-made boot sector that prints a message kept on the disk, so what it
//! prints tells which pass the copy holds.
//!
//! Needs `qemu-system-x86_64` (tests/setup.sh installs it); without it the test fails and
//! says so.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use e2e::guest::{boot_sector_disk, BOOT_MESSAGE_OFFSET};
use e2e::rest::Rest;
use e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The source's message at the first pass, and after it (same length: one write).
const PASS_ONE: &str = "the source as of pass one";
const PASS_TWO: &str = "the source as of pass two";

fn source_vm(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join(format!("{name}.img"));
    boot_sector_disk(&disk, PASS_ONE);
    let vmx = write_vmx(
        dir,
        name,
        &[&format!("{name}.img")],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:aa:bb:31",
        }],
    );
    small_enough_to_boot(&vmx);
    (vmx, disk)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The test boot's QEMU, by the pid file in its folder.
fn test_boot_pid(cloud: &Cloud, vm: &str) -> u32 {
    let file = cloud.root.join(format!(".testboot/{vm}/pid"));
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Polls the test boot's console until it shows `text`.
async fn console_shows(api: &Rest, id: &str, token: &str, text: &str) -> String {
    let path = format!("/api/gateway/migrations/{id}/test-boot/console");
    let mut last = String::new();
    for _ in 0..600 {
        let (status, body) = api.call(Method::GET, &path, token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body.contains(text) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the test boot's console never showed {text:?}; it has {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_boots_as_a_disposable_copy_while_the_syncs_go_on() {
    require_qemu();
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (vmx, disk) = source_vm(&tmp.path().join("src"), "tb01");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--json", "--chunk-kib", "64"]);
        edge_command(&bin, &pki, &cloud, &vmx, &state, &all)
    };
    let api = Rest::new(&cloud, &pki);
    let op = api.token(MIGRATOR).await;
    let auditor = api.token(AUDITOR).await;

    // The first pass; then the source changes.
    summary(run(edge(&["replicate"])).await);
    let id = cloud.domain.inventory.list_migrations().unwrap()[0].id.clone();
    let boot = format!("/api/gateway/migrations/{id}/test-boot");
    let write_message = |text: &str| {
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(text.as_bytes(), BOOT_MESSAGE_OFFSET).unwrap();
    };
    write_message(PASS_TWO);

    // Nothing runs yet; a ReadOnly user may not start one.
    let (status, body) = api.call(Method::GET, &boot, &op).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = api.call(Method::POST, &boot, &auditor).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // The copy boots and shows the source as the first pass read it.
    let (status, body) = api.call(Method::POST, &boot, &op).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["replica_syncs"], 1, "{info}");
    assert_eq!(info["vm_name"], "tb01", "{info}");
    let pid = test_boot_pid(&cloud, "tb01");
    assert!(alive(pid));
    console_shows(&api, &id, &op, PASS_ONE).await;
    // One at a time; the auditor sees it but not its console (a console shows secrets).
    let (status, body) = api.call(Method::POST, &boot, &op).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("runs already"), "{body}");
    assert_eq!(api.json(&boot, &auditor).await["state"], "running");
    let (status, body) = api.call(Method::GET, &format!("{boot}/console"), &auditor).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A pass runs while the copy does, and the copy is not touched by it.
    let second = summary(run(edge(&["replicate"])).await);
    assert!(second["sent_bytes"].as_u64().unwrap() > 0, "{second}");
    let record = &cloud.domain.inventory.list_migrations().unwrap()[0];
    assert_eq!(record.replica.as_ref().unwrap().syncs, 2);
    let shown = api.json(&boot, &op).await;
    assert_eq!(shown["replica_syncs"], 1, "{shown}");
    let console = console_shows(&api, &id, &op, PASS_ONE).await;
    assert!(!console.contains(PASS_TWO), "{console}");
    assert!(alive(pid), "the pass did not stop the copy");

    // Discarded: its QEMU and its folder are gone, and nothing is left to show.
    let (status, body) = api.call(Method::DELETE, &boot, &op).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(!alive(pid), "the copy's QEMU stopped");
    assert!(!cloud.root.join(".testboot/tb01").exists());
    let (status, _) = api.call(Method::GET, &boot, &op).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A new copy holds the second pass; the switchover discards it as it registers the VM.
    let (status, body) = api.call(Method::POST, &boot, &op).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    console_shows(&api, &id, &op, PASS_TWO).await;
    let pid = test_boot_pid(&cloud, "tb01");
    let done = summary(run(edge(&["switchover", "--confirm"])).await);
    assert!(done["vm_id"].as_str().unwrap().starts_with("vm-"), "{done}");
    assert!(images_identical(&disk, &cloud.root.join("tb01/tb01-flat.vmdk")));
    let gone = eventually(30, || (!alive(pid)).then_some(())).await;
    assert!(gone.is_some(), "the switchover stopped the test boot");
    let cleared = eventually(30, || (!cloud.root.join(".testboot/tb01").exists()).then_some(())).await;
    assert!(cleared.is_some(), "the switchover removed the copy");
    cloud.stop().await;
}
