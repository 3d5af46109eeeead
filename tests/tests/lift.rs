//! A whole lift over real QUIC on 127.0.0.1: edge-agent's driver against a
//! cloud endpoint served in-process, real certificates, a real SQLite file,
//! disks checked with `qemu-img compare`.

use std::os::unix::fs::MetadataExt;

use e2e::*;
use edge_agent::migrate::MigrateOptions;
use edge_agent::MigrateError;
use gateway::wire::RefusalCode;

const MIB: usize = 1 << 20;

fn rt_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_vm_arrives_identical_and_registered() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // 64 MiB: random, compressible and all-zero regions of 4 MiB.
    use Fill::*;
    let layout = [
        Random, Text, Zero, Text, Zero, Zero, Random, Text, Text, Zero, Zero, Zero, Text, Random, Zero, Text,
    ];
    write_raw_disk(&src.join("web01.img"), 4 * MIB, &layout, 1);
    let vmx = write_vmx(
        &src,
        "web01",
        &["web01.img"],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:aa:bb:01",
        }],
    );
    let vmx_before = std::fs::read(&vmx).unwrap();
    let disk_mtime = std::fs::metadata(src.join("web01.img")).unwrap().mtime();

    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let summary = migrate(&vmx, &target, &MigrateOptions::default())
        .await
        .expect("migration succeeds");

    assert_eq!(summary.logical_bytes, 64 * MIB as u64);
    assert_eq!(summary.zero_bytes, 7 * 4 * MIB as u64, "all-zero chunks are found");
    assert!(
        summary.wire_bytes < (3 * 4 * MIB + 3 * MIB) as u64,
        "random data goes raw, text compresses, zeros never travel: {} wire bytes",
        summary.wire_bytes
    );
    assert!(summary.vm_id.starts_with("vm-"), "{}", summary.vm_id);

    let dest = cloud.root.join("web01");
    assert!(images_identical(&src.join("web01.img"), &dest.join("web01.vmdk")));
    qemu_img(&["check", dest.join("web01.vmdk").to_str().unwrap()]);
    // Zero regions stay holes in the destination's flat extent.
    let flat = std::fs::metadata(dest.join("web01-flat.vmdk")).unwrap();
    assert_eq!(flat.len(), 64 * MIB as u64);
    assert!(
        flat.blocks() * 512 <= 40 * MIB as u64,
        "zeros are holes: {} bytes allocated",
        flat.blocks() * 512
    );
    let vmx_out = std::fs::read_to_string(dest.join("web01.vmx")).unwrap();
    assert!(vmx_out.contains("scsi0:0.fileName = \"web01.vmdk\""), "{vmx_out}");
    assert!(
        vmx_out.contains("ethernet0.address = \"00:50:56:aa:bb:01\""),
        "{vmx_out}"
    );

    let vm = cloud.domain.inventory.vm_by_name("web01").unwrap().expect("registered");
    assert_eq!(vm.id, summary.vm_id);
    assert_eq!(vm.power_state, "POWERED_OFF");
    assert_eq!((vm.num_cpus, vm.memory_mib), (2, 2048));
    assert_eq!(vm.guest_os, "debian12-64");
    assert_eq!(vm.disks.len(), 1);
    assert_eq!(vm.nics[0].network_name, "VM Network");
    assert_eq!(cloud.datastore_entries(), vec!["web01".to_owned()], "no staging left");

    // The source was only read.
    assert_eq!(std::fs::read(&vmx).unwrap(), vmx_before);
    assert_eq!(std::fs::metadata(src.join("web01.img")).unwrap().mtime(), disk_mtime);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_and_two_nics_keep_their_order_and_mapping() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    use Fill::*;
    write_raw_disk(&src.join("os.img"), MIB, &[Text, Random, Zero, Text], 2);
    // The second disk is a monolithicFlat VMDK, as ESXi stores disks.
    write_raw_disk(&src.join("data.raw"), MIB, &[Zero, Random, Text], 3);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        src.join("data.raw").to_str().unwrap(),
        src.join("db01_1.vmdk").to_str().unwrap(),
    ]);
    let vmx = write_vmx(
        &src,
        "db01",
        &["os.img", "db01_1.vmdk"],
        &[
            Nic {
                network: "Prod-App",
                mac: "00:50:56:00:00:0a",
            },
            Nic {
                network: "Prod-DB",
                mac: "00:50:56:00:00:0b",
            },
        ],
    );
    let opts = MigrateOptions {
        network_map: vec![
            ("Prod-App".into(), "cloud-web".into()),
            ("Prod-DB".into(), "cloud-db".into()),
        ],
        ..MigrateOptions::default()
    };
    let summary = migrate(&vmx, &cloud.target(&pki, MIGRATOR, DEMO_PASSWORD), &opts)
        .await
        .expect("migrates");
    assert_eq!(summary.disks, 2);

    let dest = cloud.root.join("db01");
    assert!(images_identical(&src.join("os.img"), &dest.join("db01.vmdk")));
    assert!(images_identical(&src.join("db01_1.vmdk"), &dest.join("db01_1.vmdk")));
    let vm = cloud.domain.inventory.vm_by_name("db01").unwrap().unwrap();
    let disks: Vec<_> = vm.disks.iter().map(|d| (d.key.as_str(), d.capacity_bytes)).collect();
    assert_eq!(disks, vec![("scsi0:0", 4 * MIB as u64), ("scsi0:1", 3 * MIB as u64)]);
    assert!(vm.disks[1].path.ends_with("db01/db01_1.vmdk"), "{}", vm.disks[1].path);
    let nics: Vec<_> = vm
        .nics
        .iter()
        .map(|n| (n.key.as_str(), n.network_name.as_str(), n.mac.as_deref().unwrap()))
        .collect();
    assert_eq!(
        nics,
        vec![
            ("ethernet0", "cloud-web", "00:50:56:00:00:0a"),
            ("ethernet1", "cloud-db", "00:50:56:00:00:0b")
        ]
    );
    let vmx_out = std::fs::read_to_string(dest.join("db01.vmx")).unwrap();
    assert!(vmx_out.contains("ethernet1.networkName = \"cloud-db\""), "{vmx_out}");
    assert!(vmx_out.contains("scsi0:1.fileName = \"db01_1.vmdk\""), "{vmx_out}");
    cloud.stop().await;
}

/// A small one-disk VM for the refusal tests.
fn small_vm(dir: &std::path::Path, name: &str, network: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write_raw_disk(&dir.join(format!("{name}.img")), MIB, &[Fill::Text, Fill::Random], 4);
    write_vmx(
        dir,
        name,
        &[&format!("{name}.img")],
        &[Nic {
            network,
            mac: "00:50:56:01:02:03",
        }],
    )
}

fn refusal(r: Result<edge_agent::report::Summary, MigrateError>) -> (RefusalCode, Vec<String>) {
    match r {
        Err(MigrateError::Refused { code, problems }) => (code, problems),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_read_only_users_are_refused_before_any_data() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = small_vm(&tmp.path().join("src"), "app01", "VM Network");

    let (code, problems) = refusal(migrate(&vmx, &cloud.target(&pki, MIGRATOR, "wrong"), &Default::default()).await);
    assert_eq!(code, RefusalCode::BadCredentials);
    assert!(problems[0].contains("not accepted"), "{problems:?}");
    let err = migrate(
        &vmx,
        &cloud.target(&pki, "nobody@cloud.local", DEMO_PASSWORD),
        &Default::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("did not accept the credential"), "{err}");

    let (code, problems) =
        refusal(migrate(&vmx, &cloud.target(&pki, AUDITOR, DEMO_PASSWORD), &Default::default()).await);
    assert_eq!(code, RefusalCode::NotPermitted);
    assert!(problems[0].contains("ReadOnly"), "{problems:?}");

    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new(), "nothing written");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_with_several_problems_lists_them_all() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    // A datastore of 1 MiB: the 2 MiB disk cannot fit.
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_DOMAIN__DATASTORE__CAPACITY_BYTES", "1048576")],
    )
    .await;
    let vmx = small_vm(&tmp.path().join("src"), "app02", "Corp-LAN");
    let opts = MigrateOptions {
        network_map: vec![("Other".into(), "no-such-net".into())],
        ..Default::default()
    };
    let (code, problems) = refusal(migrate(&vmx, &cloud.target(&pki, MIGRATOR, DEMO_PASSWORD), &opts).await);
    assert_eq!(code, RefusalCode::PlanRejected);
    let all = problems.join("\n");
    assert_eq!(problems.len(), 3, "{all}");
    assert!(all.contains("Corp-LAN") && all.contains("--map-network"), "{all}");
    assert!(all.contains("no-such-net"), "{all}");
    assert!(all.contains("free"), "{all}");
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_already_taken_is_refused_and_the_first_vm_stays() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = small_vm(&tmp.path().join("src"), "app03", "VM Network");
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let first = migrate(&vmx, &target, &Default::default()).await.unwrap();
    let (code, problems) = refusal(migrate(&vmx, &target, &Default::default()).await);
    assert_eq!(code, RefusalCode::PlanRejected);
    assert!(
        problems[0].contains("already exists") && problems[0].contains("--name"),
        "{problems:?}"
    );
    // Under another name it goes through.
    let opts = MigrateOptions {
        name: Some("app03-copy".into()),
        ..Default::default()
    };
    migrate(&vmx, &target, &opts).await.unwrap();
    let names: Vec<_> = cloud
        .domain
        .inventory
        .list_vms()
        .unwrap()
        .into_iter()
        .map(|v| (v.id, v.name))
        .collect();
    assert_eq!(names[0], (first.vm_id, "app03".into()));
    assert_eq!(names[1].1, "app03-copy");
    assert_eq!(
        cloud.datastore_entries(),
        vec!["app03".to_owned(), "app03-copy".to_owned()]
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_escape_the_datastore_are_refused() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = small_vm(&tmp.path().join("src"), "app04", "VM Network");
    for name in ["../../etc", ".hidden", "a/b"] {
        let opts = MigrateOptions {
            name: Some(name.into()),
            ..Default::default()
        };
        let (code, problems) = refusal(migrate(&vmx, &cloud.target(&pki, MIGRATOR, DEMO_PASSWORD), &opts).await);
        assert_eq!(code, RefusalCode::PlanRejected, "{name}");
        assert!(problems[0].contains("cannot name a datastore folder"), "{problems:?}");
    }
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new());
    cloud.stop().await;
}

#[tokio::test]
async fn bad_source_vms_fail_before_connecting() {
    let tmp = rt_dir();
    let src = tmp.path();
    // A disk file that does not exist.
    let vmx = write_vmx(src, "ghost", &["ghost.img"], &[]);
    let err = edge_agent::source::open_vm(&vmx).unwrap_err().to_string();
    assert!(err.contains("ghost.img") && err.contains("does not exist"), "{err}");
    // Not a .vmx at all.
    let junk = src.join("junk.vmx");
    std::fs::write(&junk, [0u8, 159, 146, 150, 1, 2, 3]).unwrap();
    let err = edge_agent::source::open_vm(&junk).unwrap_err().to_string();
    assert!(err.contains("junk.vmx"), "{err}");
    // A malformed line.
    let bad = src.join("bad.vmx");
    std::fs::write(&bad, "displayName = \"x\"\nnumvcpus 2\n").unwrap();
    let err = edge_agent::source::open_vm(&bad).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_vanishes_mid_transfer_is_kept_for_it_and_an_abort_removes_it() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Enough random data that the transfer is still running when it is cut.
    write_raw_disk(&src.join("big.img"), 16 * MIB, &[Fill::Random; 16], 5);
    let vmx = write_vmx(&src, "big01", &["big.img"], &[]);
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let lift = tokio::spawn(async move { migrate(&vmx, &target, &MigrateOptions::default()).await });
    // Wait until the cloud has staged the VM, then cut the edge off.
    let staged = async {
        while !cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/")) {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), staged)
        .await
        .expect("staging appears");
    lift.abort();
    let _ = lift.await;
    // Nothing half-migrated is registered. (An edge killed for real leaves the migration
    // waiting for a resume: tests/tests/resume.rs. A task dropped in-process may end its
    // streams cleanly first, which the endpoint may read as the edge ending the migration.)
    assert!(
        cloud.domain.inventory.list_vms().unwrap().is_empty(),
        "no half-migrated VM registered"
    );
    let migrations = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(migrations.len(), 1);
    if migrations[0].state == "RUNNING" {
        assert!(cloud.domain.inventory.vm_name_taken("big01").unwrap());
        // An operator gives up on it: the files go, the name is free.
        let operator = cloud_endpoint::inventory::Principal {
            user: MIGRATOR.into(),
            role: cloud_endpoint::config::Role::MigrationOperator,
        };
        // Another operator may not abort it: only its user or an Administrator.
        let stranger = cloud_endpoint::inventory::Principal {
            user: "someone-else@cloud.local".into(),
            role: cloud_endpoint::config::Role::MigrationOperator,
        };
        let refused = cloud_endpoint::api::gateway::abort_migration(&cloud.domain, &stranger, &migrations[0].id)
            .expect_err("another operator's abort is refused");
        assert!(refused.to_string().contains("only their own"), "{refused}");
        let domain = cloud.domain.clone();
        let id = migrations[0].id.clone();
        let aborted =
            tokio::task::spawn_blocking(move || cloud_endpoint::api::gateway::abort_migration(&domain, &operator, &id))
                .await
                .unwrap();
        if let Err(e) = aborted {
            assert!(e.to_string().contains("FAILED"), "{e}");
        }
    }
    let cleaned = async {
        while !cloud.datastore_entries().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), cleaned)
        .await
        .expect("staging removed");
    let migrations = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(migrations[0].state, "FAILED", "{migrations:?}");
    assert!(!cloud.domain.inventory.vm_name_taken("big01").unwrap());
    cloud.stop().await;
}

/// Deduplication: a clone of a template the cloud holds (one byte changed) sends one chunk
/// of data, the rest is copied inside the cloud; the copy is identical and its receipt
/// verifies. Another user on another edge identity gets nothing from the template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_of_a_lifted_template_sends_only_what_differs_and_no_other_tenant_reuses_it() {
    let tmp = rt_dir();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    use Fill::*;
    // 32 MiB, 28 MiB of it data: random regions do not compress, so what is not sent shows.
    let layout = [Random, Text, Random, Zero, Random, Random, Text, Random];
    let data_bytes = 7 * 4 * MIB as u64;
    let vm_at = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    };
    let template = vm_at("tpl");
    write_raw_disk(&template.join("tpl.img"), 4 * MIB, &layout, 7);
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let first = migrate(
        &write_vmx(&template, "tpl", &["tpl.img"], &[]),
        &target,
        &MigrateOptions::default(),
    )
    .await
    .expect("the template lifts");
    assert_eq!((first.dedup_bytes, first.sent_bytes), (0, data_bytes));

    // A clone: the template's disk with one byte changed.
    let clone_of = |name: &str| {
        let dir = vm_at(name);
        let disk = dir.join(format!("{name}.img"));
        let mut bytes = std::fs::read(template.join("tpl.img")).unwrap();
        bytes[5 * MIB + 3] ^= 0x5a;
        std::fs::write(&disk, bytes).unwrap();
        (write_vmx(&dir, name, &[&format!("{name}.img")], &[]), disk)
    };
    let (vmx, disk) = clone_of("clone01");
    let receipt = tmp.path().join("clone01.receipt.json");
    let opts = MigrateOptions {
        receipt_path: Some(receipt.clone()),
        ..MigrateOptions::default()
    };
    let second = migrate(&vmx, &target, &opts).await.expect("the clone lifts");
    assert_eq!(second.sent_bytes, MIB as u64, "only the changed chunk is sent as data");
    assert_eq!(second.dedup_bytes, data_bytes - MIB as u64);
    assert!(
        second.wire_bytes * 10 < first.wire_bytes,
        "the clone's wire bytes ({}) are a small fraction of the template's ({})",
        second.wire_bytes,
        first.wire_bytes
    );
    assert!(images_identical(
        &disk,
        &cloud.root.join("clone01").join("clone01.vmdk")
    ));
    let verified = edge_agent::receipt::verify(&receipt, &vmx, &pki.trust_ca()).expect("the receipt reads");
    assert!(verified.ok(), "{verified}");
    let record = cloud
        .domain
        .inventory
        .migration(&second.migration_id)
        .unwrap()
        .expect("recorded");
    assert_eq!(
        record.dedup_bytes, second.dedup_bytes,
        "the migration record says what was copied"
    );

    // Another user on another edge: the same clone sends everything.
    let mut other = cloud.target(&pki, "administrator@cloud.local", DEMO_PASSWORD);
    other.identity = pki.other_edge("edge-02");
    let (vmx, disk) = clone_of("clone02");
    let third = migrate(&vmx, &other, &MigrateOptions::default())
        .await
        .expect("the other tenant's clone lifts");
    assert_eq!(
        (third.dedup_bytes, third.sent_bytes),
        (0, data_bytes),
        "no chunk crosses to another user and edge"
    );
    assert!(images_identical(
        &disk,
        &cloud.root.join("clone02").join("clone02.vmdk")
    ));
    cloud.stop().await;
}
