use gateway::plan::{DiskSpec, FirewallSpec, Placement, VmSpec};

use super::validate::{is_disk_key, is_nic_key};
use super::*;
use crate::config::{DomainConfig, ExtraDatastoreConfig, HostConfig, ResourcePoolConfig, Role};
use crate::datastore::{Datastore, JOURNAL_FILE};
use crate::inventory::Inventory;

#[test]
fn device_keys() {
    for ok in ["scsi0:0", "sata1:29", "nvme3:14", "ide0:1"] {
        assert!(is_disk_key(ok), "{ok}");
    }
    for bad in ["scsi0", "scsi:0", "usb0:0", "scsi0:0.fileName", "../x:0", "scsi0:a"] {
        assert!(!is_disk_key(bad), "{bad}");
    }
    assert!(is_nic_key("ethernet0") && !is_nic_key("ethernet") && !is_nic_key("eth0"));
}

/// A domain of two hosts (the second small), two datastores (the second with a 1 MiB
/// quota), two VM folders and a pool limited to 1 vCPU and 512 MiB.
fn domain(dir: &std::path::Path) -> Domain {
    let config = DomainConfig {
        extra_hosts: vec![HostConfig {
            name: "esx-small".into(),
            cpu_cores: 2,
            memory_mib: 1024,
            api_url: None,
        }],
        extra_datastores: vec![ExtraDatastoreConfig {
            name: "ds-small".into(),
            dir: dir.join("ds2"),
            capacity_bytes: Some(1 << 20),
            disk_format: DiskFormat::VmdkFlat,
        }],
        folders: vec!["Imported".into()],
        resource_pools: vec![ResourcePoolConfig {
            name: "tiny".into(),
            memory_limit_mib: Some(512),
            cpu_limit_cores: Some(1),
        }],
        ..DomainConfig::default()
    };
    let inventory = Inventory::open(&dir.join("inv.sqlite3"), &config).unwrap();
    let datastore = Datastore::open(&dir.join("ds1"), "cloud-ds1", None).unwrap();
    let extra = Datastore::open(&dir.join("ds2"), "ds-small", Some(1 << 20)).unwrap();
    let ca = certs::Ca::generate("Test CA").unwrap();
    let issued = ca
        .issue_endpoint(&["localhost".into()], certs::Validity::days(1))
        .unwrap();
    let receipts = gateway::receipt::ReceiptSigner::new(&[issued.cert_der()], &issued.key_der()).unwrap();
    Domain {
        inventory,
        datastore,
        extra_datastores: vec![extra],
        endpoint_name: "test".into(),
        receipts,
        live: Default::default(),
        hosts: crate::hosts::Hosts::new(65536, 16),
        logins: Default::default(),
        revoked_edges: Default::default(),
        health: Default::default(),
        metrics: Default::default(),
        links: Default::default(),
        ownership: crate::cluster::ownership::Ownership::new("esx-test", std::time::Duration::from_secs(10)),
        indexing: Default::default(),
    }
}

fn operator() -> Principal {
    Principal {
        user: "migrator@cloud.local".into(),
        role: Role::MigrationOperator,
    }
}

fn plan(cpus: u32, memory_mib: u64, placement: Placement) -> MigrationPlan {
    MigrationPlan {
        vm: VmSpec {
            name: "web01".into(),
            guest_os: "otherGuest".into(),
            num_cpus: cpus,
            cores_per_socket: None,
            memory_mib,
            firmware: None,
            bios_uuid: None,
            nics: vec![],
            controllers: vec![],
            disks: vec![
                DiskSpec {
                    key: "scsi0:0".into(),
                    capacity: 4 << 20,
                },
                DiskSpec {
                    key: "scsi0:1".into(),
                    capacity: 512 << 10,
                },
            ],
        },
        network_map: vec![],
        chunk_size: gateway::plan::DEFAULT_CHUNK_SIZE,
        disk_format: None,
        firewall: FirewallSpec::default(),
        placement,
        source_descriptor_sha256: Some([1; 32]),
        seed: None,
    }
}

fn problems(domain: &Domain, plan: &MigrationPlan) -> Vec<String> {
    match validate(domain, &operator(), plan) {
        Ok(_) => Vec::new(),
        Err((code, problems)) => {
            assert_eq!(code, RefusalCode::PlanRejected);
            problems
        }
    }
}

#[test]
fn the_default_placement_is_the_domains() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    let v = validate(&d, &operator(), &plan(2, 1024, Placement::default())).unwrap();
    let info = d.inventory.domain().unwrap();
    assert_eq!(v.placement.host.id, info.host.id);
    assert_eq!(v.placement.datastore.name, "cloud-ds1");
    assert_eq!(v.placement.folder.id, info.vm_folder);
    assert_eq!(v.placement.pool.name, "Resources");
    assert_eq!(
        v.preview.resource_pool_id,
        crate::inventory::root_resource_pool(&info.cluster.id)
    );
    assert!(v.preview.disks.iter().all(|disk| disk.datastore_name == "cloud-ds1"));
}

#[test]
fn choices_by_name_or_id_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    let info = d.inventory.domain().unwrap();
    let small = info.hosts.iter().find(|h| h.name == "esx-small").unwrap();
    let imported = info.folders.iter().find(|f| f.name == "Imported").unwrap();
    let placement = Placement {
        folder: Some(imported.id.clone()),
        cluster: Some(info.cluster.name.clone()),
        host: Some(small.id.clone()),
        resource_pool: Some("tiny".into()),
        datastore: Some("cloud-ds1".into()),
        disk_datastores: vec![("scsi0:1".into(), "ds-small".into())],
    };
    let v = validate(&d, &operator(), &plan(1, 512, placement)).unwrap();
    assert_eq!(v.placement.host.name, "esx-small");
    assert_eq!(v.placement.folder.name, "Imported");
    assert_eq!(v.placement.pool.name, "tiny");
    let on: Vec<&str> = v.preview.disks.iter().map(|d| d.datastore_name.as_str()).collect();
    assert_eq!(on, ["cloud-ds1", "ds-small"]);
    assert_eq!(v.preview.host_name, "esx-small");
    assert_eq!(v.preview.folder_name, "Imported");
}

#[test]
fn every_problem_is_listed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    let placement = Placement {
        folder: Some("Nowhere".into()),
        cluster: Some("domain-c999".into()),
        host: Some("esx-missing".into()),
        resource_pool: Some("resgroup-999".into()),
        datastore: Some("ds-missing".into()),
        disk_datastores: vec![
            ("scsi0:1".into(), "ds-gone".into()),
            ("scsi0:7".into(), "cloud-ds1".into()),
        ],
    };
    let found = problems(&d, &plan(1, 256, placement));
    let expect = [
        "VM folder \"Nowhere\" (--folder)",
        "cluster \"domain-c999\" (--cluster)",
        "host \"esx-missing\" (--host)",
        "resource pool \"resgroup-999\" (--resource-pool)",
        "datastore \"ds-missing\" (--datastore)",
        "datastore \"ds-gone\" (--disk-datastore scsi0:1)",
        "disk \"scsi0:7\", which the VM does not have",
    ];
    for e in expect {
        assert!(
            found.iter().any(|p| p.contains(e)),
            "no problem with {e:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    // Each names the choices there are.
    assert!(found[0].contains("Imported (group-v"), "{}", found[0]);
    assert!(found[2].contains("esx-small (host-"), "{}", found[2]);
    assert!(found[3].contains("tiny (resgroup-"), "{}", found[3]);
    assert!(found[4].contains("ds-small (datastore-"), "{}", found[4]);
}

#[test]
fn host_pool_and_datastore_limits_are_checked_together() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    // 4 vCPUs and 2048 MiB on the small host in the tiny pool; both disks (4.5 MiB) on
    // the 1 MiB datastore.
    let placement = Placement {
        host: Some("esx-small".into()),
        resource_pool: Some("tiny".into()),
        datastore: Some("ds-small".into()),
        ..Placement::default()
    };
    let found = problems(&d, &plan(4, 2048, placement));
    let expect = [
        "4 vCPUs but host esx-small",
        "2048 MiB of memory but host esx-small",
        "4 vCPUs but resource pool tiny",
        "2048 MiB of memory but resource pool tiny",
        "on datastore ds-small",
    ];
    for e in expect {
        assert!(
            found.iter().any(|p| p.contains(e)),
            "no problem with {e:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    assert!(found[4].contains("(scsi0:0, scsi0:1)"), "{}", found[4]);

    // Only the disk put there counts against the small datastore: 512 KiB fits.
    let placement = Placement {
        disk_datastores: vec![("scsi0:1".into(), "ds-small".into())],
        ..Placement::default()
    };
    assert_eq!(problems(&d, &plan(1, 256, placement)), Vec::<String>::new());
}

#[test]
fn a_host_or_pool_outside_the_cluster_and_a_taken_name_are_problems() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    // A second cluster is not configurable; put one straight into the inventory.
    rusqlite::Connection::open(dir.path().join("inv.sqlite3"))
        .unwrap()
        .execute_batch(
            "INSERT INTO cluster (id, num, name, folder) SELECT 'domain-c900', 900, 'Other', folder FROM cluster LIMIT 1;
             INSERT INTO host (id, num, name, cluster, cpu_cores, memory_mib) VALUES ('host-901', 901, 'esx-other', 'domain-c900', 8, 8192);",
        )
        .unwrap();
    std::fs::create_dir(dir.path().join("ds2/web01")).unwrap();
    let placement = Placement {
        cluster: Some("Other".into()),
        host: Some("esx-small".into()),
        resource_pool: Some("tiny".into()),
        disk_datastores: vec![("scsi0:1".into(), "ds-small".into())],
        ..Placement::default()
    };
    let found = problems(&d, &plan(1, 256, placement));
    let expect = [
        "host esx-small (host-",
        "resource pool tiny (resgroup-",
        "a VM named \"web01\" already exists",
    ];
    for e in expect {
        assert!(
            found.iter().any(|p| p.contains(e)),
            "no problem with {e:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expect.len(), "{found:#?}");
    assert!(found[0].contains("is not in cluster Other (domain-c900)") && found[0].contains("esx-other (host-901)"));
    assert!(
        found[1].contains("choose one of its pools: Resources (resgroup-900)"),
        "{}",
        found[1]
    );
    assert!(found[2].contains("unique across all folders"), "{}", found[2]);
}

/// Staging folders of migration `id` on the two datastores, with their files.
fn staged_files(dir: &std::path::Path, id: &str) -> [Vec<String>; 2] {
    ["ds1", "ds2"].map(|ds| {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(ds).join(".staging").join(id))
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    })
}

#[test]
fn a_disk_on_another_datastore_is_staged_there_and_discarded_with_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    let placement = Placement {
        disk_datastores: vec![("scsi0:1".into(), "ds-small".into())],
        ..Placement::default()
    };
    let p = plan(1, 256, placement);
    let staged = validate_and_stage(&d, &operator(), "edge", "cert", &p).unwrap();
    let id = staged.migration_id.clone();
    assert_eq!(
        staged_files(dir.path(), &id),
        [
            vec![JOURNAL_FILE.to_owned(), "web01-flat.vmdk".to_owned()],
            vec!["web01_1-flat.vmdk".to_owned()]
        ]
    );
    // The space is held on each datastore: the small one has 512 KiB left.
    let small = d.inventory.domain().unwrap().datastores[1].id.clone();
    assert_eq!(d.inventory.used_bytes_on(&small).unwrap(), 512 << 10);
    // A failed migration leaves nothing on either datastore.
    discard(&d, staged, "test");
    assert_eq!(staged_files(dir.path(), &id), [Vec::<String>::new(), Vec::new()]);
    assert_eq!(d.inventory.used_bytes_on(&small).unwrap(), 0);

    // One kept for a resume (no connection holds it) is found on both by its id.
    let staged = validate_and_stage(&d, &operator(), "edge", "cert", &p).unwrap();
    let id = staged.migration_id.clone();
    drop(staged);
    assert!(staged_files(dir.path(), &id).iter().all(|f| !f.is_empty()));
    // A resume reopens both staging folders and the disks in them.
    let (resumed, durable) = resume(&d, &operator(), "cert", &id, &p).unwrap();
    assert!(durable.iter().all(|d| d.known() == 0), "nothing was journaled");
    assert_eq!(resumed.disks.len(), 2);
    assert_eq!(resumed.other_staging.len(), 1);
    assert_eq!(resumed.other_staging[0].0, "ds-small");
    drop(resumed);
    discard_files(&d, &id, "expired");
    assert_eq!(staged_files(dir.path(), &id), [Vec::<String>::new(), Vec::new()]);
    let m = d.inventory.list_migrations().unwrap();
    assert!(m.iter().all(|m| m.state == "FAILED"), "{m:?}");
}

#[test]
fn an_unknown_choice_does_not_hide_the_hardware_and_space_problems() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    // An unknown folder, 512 GiB of memory (the default host has 256 GiB) and both disks
    // on the 1 MiB datastore, as the unknown per-disk datastore leaves them on the VM's.
    let placement = Placement {
        folder: Some("Nowhere".into()),
        datastore: Some("ds-small".into()),
        disk_datastores: vec![("scsi0:1".into(), "ds-gone".into())],
        ..Placement::default()
    };
    let found = problems(&d, &plan(1, 512 << 10, placement));
    let expect = [
        "VM folder \"Nowhere\" (--folder)",
        "datastore \"ds-gone\" (--disk-datastore scsi0:1)",
        "524288 MiB of memory but host",
        "on datastore ds-small",
    ];
    for e in expect {
        assert!(
            found.iter().any(|p| p.contains(e)),
            "no problem with {e:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expect.len(), "{found:#?}");
}

#[test]
fn a_disk_takes_the_format_of_its_datastore() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = domain(dir.path());
    d.extra_datastores[0] = d.extra_datastores[0].clone().with_disk_format(DiskFormat::Qcow2);
    let placement = Placement {
        disk_datastores: vec![("scsi0:1".into(), "ds-small".into())],
        ..Placement::default()
    };
    let p = plan(1, 256, placement);
    let v = validate(&d, &operator(), &p).unwrap();
    assert_eq!(v.disk_formats, [DiskFormat::VmdkFlat, DiskFormat::Qcow2]);
    assert_eq!(v.preview.disk_format, "vmdk", "the VM's datastore's");
    let formats: Vec<&str> = v.preview.disks.iter().map(|d| d.format.as_str()).collect();
    assert_eq!(formats, ["vmdk", "qcow2"]);
    let staged = validate_and_stage(&d, &operator(), "edge", "cert", &p).unwrap();
    let id = staged.migration_id.clone();
    assert_eq!(
        staged_files(dir.path(), &id),
        [
            vec![JOURNAL_FILE.to_owned(), "web01-flat.vmdk".to_owned()],
            vec!["web01_1.qcow2".to_owned()]
        ]
    );
    drop(staged);
    // A resume reopens each disk in its own format.
    let (resumed, _) = resume(&d, &operator(), "cert", &id, &p).unwrap();
    assert_eq!(resumed.disk_formats, [DiskFormat::VmdkFlat, DiskFormat::Qcow2]);
    assert_eq!(resumed.disks[1].file_name(), "web01_1.qcow2");
    drop(resumed);
    discard_files(&d, &id, "test");

    // A format the plan names is every disk's.
    let mut explicit = p.clone();
    explicit.disk_format = Some(DiskFormat::Raw);
    let v = validate(&d, &operator(), &explicit).unwrap();
    assert_eq!(v.disk_formats, [DiskFormat::Raw, DiskFormat::Raw]);
}

#[test]
fn the_resume_record_keeps_each_disks_format() {
    use DiskFormat::*;
    assert_eq!(formats_text(&[Qcow2, Qcow2]), "qcow2");
    assert_eq!(formats_text(&[VmdkFlat, Qcow2]), "vmdk,qcow2");
    // One name, as endpoints before per-disk formats wrote it, is every disk's.
    assert_eq!(parse_formats("vmdk", 3), Some(vec![VmdkFlat; 3]));
    assert_eq!(parse_formats("vmdk,qcow2", 2), Some(vec![VmdkFlat, Qcow2]));
    assert_eq!(parse_formats("vmdk,qcow2", 3), None);
    assert_eq!(parse_formats("vmdk,floppy", 2), None);
    assert_eq!(parse_formats("", 0), Some(vec![]));
}

#[test]
fn only_the_owner_or_an_administrator_on_its_edge_may_act_on_a_migration() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    let p = plan(1, 256, Placement::default());
    let staged = validate_and_stage(&d, &operator(), "edge", "cert-a", &p).unwrap();
    let id = staged.migration_id.clone();
    drop(staged);
    let who = |user: &str, role| Principal {
        user: user.into(),
        role,
    };
    let refused = |principal: &Principal, cert: &str, action| {
        let (code, problems) = authorize(&d, principal, cert, &id, action).unwrap_err();
        assert_eq!(code, RefusalCode::NotPermitted, "{problems:?}");
        problems.join("; ")
    };
    let auditor = who("auditor@cloud.local", Role::ReadOnly);
    let other = who("other@cloud.local", Role::MigrationOperator);
    // Each refusal names the action refused and says nothing changed.
    for (principal, cert, action, says) in [
        (
            &auditor,
            "cert-a",
            Action::Abort,
            "has role ReadOnly, which may not abort migration",
        ),
        (&auditor, "cert-a", Action::Resume, "which may not resume migration"),
        (
            &other,
            "cert-a",
            Action::Abort,
            "may abort only their own migrations: ask migrator@cloud.local",
        ),
        (&other, "cert-a", Action::Resume, "may resume only their own migrations"),
        (
            &operator(),
            "cert-b",
            Action::Resume,
            "another edge agent (certificate cert-a); only that agent can resume",
        ),
    ] {
        let text = refused(principal, cert, action);
        assert!(text.contains(says) && text.contains("nothing was changed"), "{text}");
    }
    // The owner and an Administrator may; a resume also needs the same plan.
    assert!(authorize(&d, &operator(), "cert-a", &id, Action::Abort).is_ok());
    let admin = who("administrator@cloud.local", Role::Administrator);
    assert!(check_resume(&d, &admin, "cert-a", &id, &p).is_ok());
    let mut changed = p.clone();
    changed.vm.num_cpus = 2;
    let (code, _) = check_resume(&d, &operator(), "cert-a", &id, &changed).unwrap_err();
    assert_eq!(code, RefusalCode::PlanRejected);
    // Nothing of it touched the migration.
    assert_eq!(d.inventory.resume_info(&id).unwrap().unwrap().state, "RUNNING");
    assert!(staged_files(dir.path(), &id)[0].contains(&JOURNAL_FILE.to_owned()));

    // An abort discards it; acting on it afterwards is told there is nothing left.
    abort(&d, &id, "test").unwrap();
    assert_eq!(staged_files(dir.path(), &id), [Vec::<String>::new(), Vec::new()]);
    let (code, problems) = authorize(&d, &operator(), "cert-a", &id, Action::Abort).unwrap_err();
    assert_eq!(code, RefusalCode::UnknownMigration);
    assert!(problems[0].contains("nothing to abort"), "{problems:?}");
}

#[test]
fn two_plans_checked_together_cannot_both_take_the_space_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = domain(dir.path());
    // A 768 KiB disk on ds-small (1 MiB): each plan fits alone, not both.
    let on_small = |name: &str| {
        let placement = Placement {
            disk_datastores: vec![("scsi0:1".into(), "ds-small".into())],
            ..Placement::default()
        };
        let mut p = plan(1, 256, placement);
        p.vm.name = name.into();
        p.vm.disks[1].capacity = 768 << 10;
        p
    };
    let (a, b) = (on_small("web01"), on_small("web02"));
    // Both are checked before either reserves, as two edges' plans arriving together are.
    let checked_a = validate(&d, &operator(), &a).unwrap();
    let checked_b = validate(&d, &operator(), &b).unwrap();
    reserve(&d, &operator(), "edge-a", &a, &checked_a.placement).unwrap();
    let (code, problems) = reserve(&d, &operator(), "edge-b", &b, &checked_b.placement).unwrap_err();
    assert_eq!(code, RefusalCode::PlanRejected);
    let small = d.inventory.domain().unwrap().datastores[1].id.clone();
    assert_eq!(
        problems,
        [format!(
            "datastore {small} has 262144 bytes free for new disks now, and the disks placed on it need 786432 bytes (migrations that started since the plan was checked took space); free space, wait for them to end, or choose another datastore"
        )]
    );
    // The refused plan holds nothing: not its name, not space.
    assert!(!d.inventory.vm_name_taken("web02").unwrap());
    assert_eq!(d.inventory.used_bytes_on(&small).unwrap(), 768 << 10);
}
