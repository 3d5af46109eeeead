//! Replication of a VM that keeps running: a first pass into a replica the cloud keeps
//! (nothing registered), delta passes that send only the chunks the source changed,
//! a switchover refused while the source runs, then a last pass, the read-back, the
//! registration and the receipt. A replica damaged in the cloud between passes is
//! found by the read-back the switchover runs while its last pass streams, and repaired
//! before the VM is registered. Real binaries over QUIC on loopback.

use std::os::unix::fs::FileExt;
use std::path::Path;

use e2e::*;

const MIB: usize = 1 << 20;
/// Small chunks, so a change of a few KiB costs one small chunk on the wire.
const CHUNK_KIB: &str = "256";
const CHUNK: u64 = 256 * 1024;

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The source VM writes: `len` bytes of new data at each offset.
fn guest_writes(disk: &Path, offsets: &[u64], len: usize, seed: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    for (i, &offset) in offsets.iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(31) ^ seed ^ i as u8).collect();
        f.write_all_at(&data, offset).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_is_replicated_then_switched_over_sending_only_what_changed() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // 16 MiB: random data with every fourth MiB zero.
    let regions: Vec<Fill> = (0..16)
        .map(|i| if i % 4 == 3 { Fill::Zero } else { Fill::Random })
        .collect();
    let disk = src.join("db01.img");
    write_raw_disk(&disk, MIB, &regions, 91);
    let vmx = write_vmx(&src, "db01", &["db01.img"], &[]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);

    // First pass: everything that is not zero, into a replica; no VM registered.
    let first = summary(run(edge(&["replicate"])).await);
    assert_eq!(first["replica"], true, "{first}");
    assert_eq!(first["sent_bytes"].as_u64().unwrap(), 12 * MIB as u64, "{first}");
    let id = first["migration_id"].as_str().unwrap().to_owned();
    let record = cloud.domain.inventory.migration(&id).unwrap().unwrap();
    assert_eq!(record.state, "RUNNING", "{record:?}");
    let replica = record.replica.clone().expect("the pass is recorded");
    assert_eq!((replica.syncs, replica.last_delta_bytes), (1, 12 * MIB as u64));
    assert!(
        cloud.domain.inventory.list_vms().unwrap().is_empty(),
        "nothing registered"
    );
    // What the API shows of it: a replica in sync, its pass just ended.
    let shown = cloud_endpoint::api::gateway::get_migration(&cloud.domain, &id).unwrap();
    let json = serde_json::to_value(&shown).unwrap();
    assert_eq!(json["replica"]["state"], "in sync", "{json}");
    assert!(json["replica"]["lag_seconds"].as_i64().unwrap() < 60, "{json}");
    // The name stays reserved for the replica.
    let other = tempfile::tempdir().unwrap();
    let clash = write_vmx(other.path(), "db01", &["db01.img"], &[]);
    std::fs::copy(&disk, other.path().join("db01.img")).unwrap();
    std::fs::create_dir_all(other.path().join("state")).unwrap();
    let refused = run(edge_command(
        &bin,
        &pki,
        &cloud,
        &clash,
        &other.path().join("state"),
        &["migrate"],
    ))
    .await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("db01") && said.contains("exists"), "{said}");

    // The guest writes into three chunks, one of them in a zero region, and zeroes a
    // fourth whole chunk: the second pass sends three chunks and declares one zero.
    guest_writes(&disk, &[100, 5 * MIB as u64 + 7, 3 * MIB as u64 + 4096], 3000, 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&vec![0; CHUNK as usize], 9 * MIB as u64)
        .unwrap();
    let second = summary(run(edge(&["replicate"])).await);
    assert_eq!(second["sent_bytes"].as_u64().unwrap(), 3 * CHUNK, "{second}");
    assert!(
        second["wire_bytes"].as_u64().unwrap() < first["wire_bytes"].as_u64().unwrap() / 10,
        "{second}"
    );
    let replica = cloud.domain.inventory.migration(&id).unwrap().unwrap().replica.unwrap();
    assert_eq!((replica.syncs, replica.last_delta_bytes), (2, 3 * CHUNK));

    // Nothing changed: nothing is sent.
    let third = summary(run(edge(&["replicate"])).await);
    assert_eq!(third["sent_bytes"].as_u64().unwrap(), 0, "{third}");

    // A cold lift of the replicated VM is refused and names the way out.
    let cold = run(edge(&["migrate"])).await;
    assert!(!cold.status.success());
    let said = String::from_utf8_lossy(&cold.stdout).into_owned() + &String::from_utf8_lossy(&cold.stderr);
    assert!(said.contains("switchover"), "{said}");

    // While the source runs (VMware's lock beside the .vmx), no switchover.
    let lock = src.join("db01.vmx.lck");
    std::fs::create_dir(&lock).unwrap();
    let running = run(edge(&["switchover"])).await;
    assert!(!running.status.success());
    let said = String::from_utf8_lossy(&running.stderr);
    assert!(said.contains("still runs") && said.contains("db01.vmx.lck"), "{said}");
    std::fs::remove_dir(&lock).unwrap();

    // The last writes before the power-off, then the switchover: one chunk sent, the
    // VM registered, identical to the source, with a receipt that verifies.
    guest_writes(&disk, &[14 * MIB as u64 + 10], 100, 2);
    let done = summary(run(edge(&["switchover", "--confirm"])).await);
    assert_eq!(done["sent_bytes"].as_u64().unwrap(), CHUNK, "{done}");
    assert!(done.get("replica").is_none(), "{done}");
    assert!(done["vm_id"].as_str().unwrap().starts_with("vm-"), "{done}");
    assert!(images_identical(&disk, &cloud.root.join("db01/db01-flat.vmdk")));
    let record = cloud.domain.inventory.migration(&id).unwrap().unwrap();
    assert_eq!(record.state, "SUCCEEDED");
    let json = serde_json::to_value(cloud_endpoint::api::gateway::get_migration(&cloud.domain, &id).unwrap()).unwrap();
    assert_eq!(
        (json["replica"]["state"].as_str(), json["replica"]["syncs"].as_u64()),
        (Some("done"), Some(3)),
        "{json}"
    );
    assert!(record.has_receipt);
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    assert!(!cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/")));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_damaged_in_the_cloud_is_repaired_by_the_switchover() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let regions: Vec<Fill> = (0..8).map(|i| if i == 5 { Fill::Zero } else { Fill::Random }).collect();
    let disk = src.join("app01.img");
    write_raw_disk(&disk, MIB, &regions, 92);
    let vmx = write_vmx(&src, "app01", &["app01.img"], &[]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);
    summary(run(edge(&["replicate"])).await);
    // Between passes, the replica's file changes in the cloud: data, and a hole.
    let staged = files_under(&cloud.root.join(".staging"))
        .into_iter()
        .filter(|f| f.to_string_lossy().ends_with("app01-flat.vmdk"))
        .collect::<Vec<_>>();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let flat = &staged[0];
    let f = std::fs::OpenOptions::new().write(true).open(flat).unwrap();
    f.write_all_at(b"bit rot", 2 * MIB as u64 + 77).unwrap();
    f.write_all_at(b"not zero", 5 * MIB as u64 + 300).unwrap();
    drop(f);
    let read_back = |when: &str| cloud.domain.metrics.read_back_chunks.with_label_values(&[when]).get();
    let chunks = 8 * MIB as u64 / CHUNK;
    let at_end = read_back("at_end");
    let done = summary(run(edge(&["switchover"])).await);
    assert!(done["repaired_chunks"].as_u64().unwrap() >= 1, "{done}");
    assert!(images_identical(&disk, &cloud.root.join("app01/app01-flat.vmdk")));
    // The whole replica was read while the pass streamed; at the switchover (and at the
    // commit after the repair) only the two chunks found different then.
    assert_eq!(read_back("during_pass"), chunks);
    assert_eq!(read_back("at_end") - at_end, 4, "{done}");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_passes_go_on_across_an_endpoint_restart() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let root = tmp.path().join("cloud");
    let cloud = Cloud::start(&root, &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let disk = src.join("log01.img");
    write_raw_disk(&disk, MIB, &[Fill::Random, Fill::Zero, Fill::Random, Fill::Random], 93);
    let vmx = write_vmx(&src, "log01", &["log01.img"], &[]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut schedule = edge_command(
        &bin,
        &pki,
        &cloud,
        &vmx,
        &state,
        &[
            "replicate",
            "--every",
            "1s",
            "--chunk-kib",
            CHUNK_KIB,
            "--retry-for",
            "60",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(tmp.path().join("schedule.log")).unwrap())
    .spawn()
    .unwrap();
    let log = || std::fs::read_to_string(tmp.path().join("schedule.log")).unwrap_or_default();
    let syncs = |cloud: &Cloud| {
        let all = cloud.domain.inventory.list_migrations().unwrap();
        all.first().and_then(|m| m.replica.as_ref()).map_or(0, |r| r.syncs)
    };
    assert!(
        eventually(60, || (syncs(&cloud) >= 2).then_some(())).await.is_some(),
        "two passes; the edge said:\n{}",
        log()
    );
    // The endpoint goes away and comes back at the same address: the passes go on.
    let listen = cloud.addr.to_string();
    cloud.stop().await;
    let cloud = Cloud::start(&root, &pki, &[("CLOUD_ENDPOINT_LISTEN", &listen)]).await;
    let before = syncs(&cloud);
    guest_writes(&disk, &[2 * MIB as u64 + 5], 64, 3);
    // A bound, not a timing: a pass that found the endpoint gone waits out its handshake
    // deadline (10 s) and a backoff before it resumes, longer on a loaded machine.
    assert!(
        eventually(120, || (syncs(&cloud) >= before + 2).then_some(()))
            .await
            .is_some(),
        "the schedule went on after the restart; the edge said:\n{}",
        log()
    );
    schedule.kill().unwrap();
    schedule.wait().unwrap();
    // The replica holds the source as of a pass after the write.
    let m = &cloud.domain.inventory.list_migrations().unwrap()[0];
    assert_eq!(m.state, "RUNNING");
    let done = summary(
        run(edge_command(
            &bin,
            &pki,
            &cloud,
            &vmx,
            &state,
            &["switchover", "--json", "--chunk-kib", CHUNK_KIB],
        ))
        .await,
    );
    assert_eq!(
        done["sent_bytes"].as_u64().unwrap(),
        0,
        "every change was already in the replica: {done}"
    );
    assert!(images_identical(&disk, &cloud.root.join("log01/log01-flat.vmdk")));
    cloud.stop().await;
}

/// A copy already in the cloud seeds a replication: after the template is lifted, the
/// first pass of a replication of a clone (one small change) sends only the changed
/// chunk; the rest is copied inside the cloud and verified. The switchover then registers
/// a copy identical to the source, with a receipt that verifies, and the API's migration
/// record counts the copied bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_lift_seeds_a_replications_first_pass() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let regions: Vec<Fill> = (0..8)
        .map(|i| if i % 4 == 3 { Fill::Zero } else { Fill::Random })
        .collect();
    let data = 6 * MIB as u64;
    let tpl = tmp.path().join("tpl");
    std::fs::create_dir_all(&tpl).unwrap();
    write_raw_disk(&tpl.join("tpl.img"), MIB, &regions, 93);
    let tpl_vmx = write_vmx(&tpl, "tpl", &["tpl.img"], &[]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // Chunks match by hash and size: the template is lifted with the replication's chunk size.
    let lift = ["migrate", "--json", "--chunk-kib", CHUNK_KIB];
    let lifted = summary(run(edge_command(&bin, &pki, &cloud, &tpl_vmx, &state, &lift)).await);
    assert_eq!(lifted["sent_bytes"].as_u64().unwrap(), data, "{lifted}");
    std::fs::remove_file(state.join("receipt.json")).unwrap();

    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let disk = src.join("app02.img");
    std::fs::copy(tpl.join("tpl.img"), &disk).unwrap();
    guest_writes(&disk, &[MIB as u64 + 5], 100, 3);
    let vmx = write_vmx(&src, "app02", &["app02.img"], &[]);
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);
    let first = summary(run(edge(&["replicate"])).await);
    assert_eq!(first["replica"], true, "{first}");
    assert_eq!(
        first["sent_bytes"].as_u64().unwrap(),
        CHUNK,
        "only the changed chunk: {first}"
    );
    assert_eq!(first["dedup_bytes"].as_u64().unwrap(), data - CHUNK, "{first}");
    let id = first["migration_id"].as_str().unwrap().to_owned();

    let done = summary(run(edge(&["switchover", "--confirm"])).await);
    assert_eq!(done["sent_bytes"].as_u64().unwrap(), 0, "{done}");
    assert!(images_identical(&disk, &cloud.root.join("app02/app02-flat.vmdk")));
    let json = serde_json::to_value(cloud_endpoint::api::gateway::get_migration(&cloud.domain, &id).unwrap()).unwrap();
    assert_eq!(json["dedup_bytes"].as_u64(), Some(data - CHUNK), "{json}");
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    cloud.stop().await;
}
