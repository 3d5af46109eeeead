//! An explicit seed (`edge-agent replicate --seed`): a VM the cloud holds seeds a
//! replication's first pass, even when it was lifted with other chunks or registered
//! without a lift; a seed that is unknown, another tenant's or of other disks is refused
//! before anything is staged, saying what to do. Real binaries over QUIC on loopback.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cloud_endpoint::config::Role;
use cloud_endpoint::inventory::{NewDisk, NewVm, Principal};
use e2e::*;

const MIB: u64 = 1 << 20;
/// The replication's chunks: `replicate`'s default, a sixteenth of the template lift's.
const CHUNK_KIB: &str = "64";
const CHUNK: u64 = 64 * 1024;

/// An 8 MiB template disk, every fourth MiB zero (6 MiB of data), and its .vmx.
fn template(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let regions: Vec<Fill> = (0..8)
        .map(|i| if i % 4 == 3 { Fill::Zero } else { Fill::Random })
        .collect();
    let disk = dir.join(format!("{name}.img"));
    write_raw_disk(&disk, MIB as usize, &regions, 97);
    let vmx = write_vmx(dir, name, &[&format!("{name}.img")], &[]);
    (disk, vmx)
}

/// A clone of `tpl_disk` named `name`, with one small write in its second MiB.
fn clone_of(tpl_disk: &Path, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join(format!("{name}.img"));
    std::fs::copy(tpl_disk, &disk).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&[0x5a; 100], MIB + 5).unwrap();
    let vmx = write_vmx(dir, name, &[&format!("{name}.img")], &[]);
    (disk, vmx)
}

/// Registers `name` in the cloud's inventory the way a tool does that brings a disk in
/// by other means (as `soap-bench-seed` does): a migration record of `user`, the VM, and
/// its disk's data copied into the datastore as a flat VMDK extent. No lift, no index.
fn register_by_other_means(cloud: &Cloud, user: &str, name: &str, data: &Path) -> String {
    let inv = &cloud.domain.inventory;
    let capacity = std::fs::metadata(data).unwrap().len();
    let folder = cloud.root.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(data, folder.join(format!("{name}-flat.vmdk"))).unwrap();
    let principal = Principal {
        user: user.into(),
        role: Role::MigrationOperator,
    };
    let vm = NewVm {
        name: name.into(),
        guest_os: "debian12-64".into(),
        num_cpus: 1,
        cores_per_socket: None,
        memory_mib: 512,
        firmware: None,
        bios_uuid: None,
        vmx_path: format!("[cloud-ds1] {name}/{name}.vmx"),
        disks: vec![NewDisk {
            key: "scsi0:0".into(),
            path: format!("[cloud-ds1] {name}/{name}.vmdk"),
            capacity_bytes: capacity,
            datastore: None,
        }],
        controllers: Vec::new(),
        nics: Vec::new(),
        firewall: Default::default(),
        placement: Default::default(),
    };
    let migration = inv
        .begin_migration(&principal, "disk shipped by hand", name, capacity)
        .unwrap();
    inv.register_vm(&migration, &vm, |_| Ok("registered by other means: no receipt".into()))
        .unwrap()
        .vm_id
}

/// What a refused `replicate` printed, which must have failed.
fn refusal(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A template lifted with 1 MiB chunks (`migrate`'s default) seeds a replication of a
/// clone with 64 KiB chunks: the cloud hashes the template at 64 KiB, the first pass
/// sends only the changed chunk, and the switchover registers an identical copy with a
/// receipt that verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_with_1mib_chunks_seeds_a_replication_with_64kib_ones() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (tpl_disk, tpl_vmx) = template(&tmp.path().join("tpl"), "tpl01");
    let lifted = summary(
        run(edge_command(
            &bin,
            &pki,
            &cloud,
            &tpl_vmx,
            &state,
            &["migrate", "--json"],
        ))
        .await,
    );
    let data = 6 * MIB;
    assert_eq!(lifted["sent_bytes"].as_u64().unwrap(), data, "{lifted}");
    let tpl_id = lifted["vm_id"].as_str().unwrap().to_owned();
    std::fs::remove_file(state.join("receipt.json")).unwrap();

    let (disk, vmx) = clone_of(&tpl_disk, &tmp.path().join("src"), "app01");
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);
    // Named by its id; by name works the same (the other tests).
    let first = summary(run(edge(&["replicate", "--seed", &tpl_id])).await);
    assert_eq!(first["replica"], true, "{first}");
    assert_eq!(
        first["sent_bytes"].as_u64().unwrap(),
        CHUNK,
        "only the changed chunk: {first}"
    );
    assert_eq!(first["seeded_bytes"].as_u64().unwrap(), data - CHUNK, "{first}");
    assert_eq!(first["dedup_bytes"].as_u64().unwrap(), data - CHUNK, "{first}");
    let wire = first["wire_bytes"].as_u64().unwrap();
    assert!(wire < data / 10, "{wire} bytes on the wire for a 6 MiB disk: {first}");

    let done = summary(run(edge(&["switchover", "--confirm"])).await);
    assert_eq!(done["sent_bytes"].as_u64().unwrap(), 0, "{done}");
    assert!(images_identical(&disk, &cloud.root.join("app01/app01-flat.vmdk")));
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    // The template itself is untouched by being read.
    assert!(images_identical(&tpl_disk, &cloud.root.join("tpl01/tpl01-flat.vmdk")));
    cloud.stop().await;
}

/// A VM registered without a lift (no index of it at all) seeds a replication: the
/// cloud indexes it on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_registered_by_other_means_seeds_a_replication() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (tpl_disk, _) = template(&tmp.path().join("tpl"), "gold");
    register_by_other_means(&cloud, MIGRATOR, "gold01", &tpl_disk);

    let (disk, vmx) = clone_of(&tpl_disk, &tmp.path().join("src"), "app02");
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);
    let first = summary(run(edge(&["replicate", "--seed", "gold01"])).await);
    assert_eq!(first["sent_bytes"].as_u64().unwrap(), CHUNK, "{first}");
    assert_eq!(first["seeded_bytes"].as_u64().unwrap(), 6 * MIB - CHUNK, "{first}");
    let done = summary(run(edge(&["switchover", "--confirm"])).await);
    assert_eq!(done["sent_bytes"].as_u64().unwrap(), 0, "{done}");
    assert!(images_identical(&disk, &cloud.root.join("app02/app02-flat.vmdk")));
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    cloud.stop().await;
}

/// Seeds that cannot seed: unknown, another tenant's, or of other disks. Each is refused
/// before anything is staged, saying what to do, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_that_cannot_seed_are_refused_saying_what_to_do() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (tpl_disk, _) = template(&tmp.path().join("tpl"), "gold");
    // Another tenant's VM: another user, registered from no edge of ours.
    register_by_other_means(&cloud, "someone-else@cloud.local", "theirs01", &tpl_disk);
    // One of ours, but of another size.
    let small = tmp.path().join("small.img");
    write_raw_disk(&small, MIB as usize, &[Fill::Random, Fill::Random], 5);
    register_by_other_means(&cloud, MIGRATOR, "small01", &small);

    let (_, vmx) = clone_of(&tpl_disk, &tmp.path().join("src"), "app03");
    let replicate = |seed: &str| {
        edge_command(
            &bin,
            &pki,
            &cloud,
            &vmx,
            &state,
            &["replicate", "--chunk-kib", CHUNK_KIB, "--seed", seed],
        )
    };
    let before = cloud.datastore_entries();
    let said = refusal(&run(replicate("nosuchvm")).await);
    assert!(
        said.contains("\"nosuchvm\" is not a VM of this cloud") && said.contains("leave --seed out"),
        "{said}"
    );
    let said = refusal(&run(replicate("theirs01")).await);
    assert!(
        said.contains("registered by another user") && said.contains("never reads another tenant's disks"),
        "{said}"
    );
    let said = refusal(&run(replicate("small01")).await);
    assert!(
        said.contains("2097152 B") && said.contains("8388608 B") && said.contains("each of the same size"),
        "{said}"
    );
    // Contradictory options are refused before connecting.
    let mut both = replicate("small01");
    both.arg("--no-dedup");
    let said = refusal(&run(both).await);
    assert!(said.contains("--seed and --no-dedup"), "{said}");
    // Nothing staged, nothing running, nothing registered but the two seeds.
    assert_eq!(cloud.datastore_entries(), before);
    let running: Vec<_> = cloud
        .domain
        .inventory
        .list_migrations()
        .unwrap()
        .into_iter()
        .filter(|m| m.vm_name == "app03" && m.state == "RUNNING")
        .collect();
    assert!(running.is_empty(), "{running:?}");
    assert_eq!(cloud.domain.inventory.list_vms().unwrap().len(), 2);
    cloud.stop().await;
}
