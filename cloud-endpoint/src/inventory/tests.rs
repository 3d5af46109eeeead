use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::config::{DomainConfig, Role, UserConfig, DEMO_PASSWORD};

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/inventory.sqlite3");
    (dir, path)
}

/// A fresh database of one engine.
enum Db {
    Sqlite(#[allow(dead_code)] tempfile::TempDir, PathBuf),
    Postgres(store::test_pg::TestPg),
}

impl Db {
    /// The inventory on this database, made to match `domain` (as at each start).
    fn open(&self, domain: &DomainConfig) -> Inventory {
        match self {
            Db::Sqlite(_, path) => Inventory::open(path, domain).unwrap(),
            Db::Postgres(pg) => Inventory::open_postgres(&pg.url, domain).unwrap(),
        }
    }
}

/// Runs `test` on SQLite, then on PostgreSQL: the inventory behaves the same on both.
fn for_each_store(test: impl Fn(&Db)) {
    let (dir, path) = temp_db();
    eprintln!("on SQLite");
    test(&Db::Sqlite(dir, path));
    eprintln!("on PostgreSQL");
    test(&Db::Postgres(store::test_pg::TestPg::start()));
}

fn id_number(id: &str) -> i64 {
    id.rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn operator() -> Principal {
    Principal {
        user: "migrator@cloud.local".into(),
        role: Role::MigrationOperator,
    }
}

/// Stands in for the signed receipt the endpoint issues: names what it was given.
fn fake_receipt(r: &ReceiptContext<'_>) -> Result<String, String> {
    Ok(format!(
        "receipt of {} for {} ({} .. {})",
        r.migration_id, r.vm_id, r.planned_at, r.committed_at
    ))
}

fn new_vm(inv: &Inventory, name: &str) -> NewVm {
    let nets = inv.networks().unwrap();
    NewVm {
        name: name.into(),
        guest_os: "ubuntu64Guest".into(),
        num_cpus: 4,
        cores_per_socket: Some(2),
        memory_mib: 8192,
        firmware: Some("efi".into()),
        bios_uuid: Some("42 1a 2b 3c 4d 5e 6f 70-81 92 a3 b4 c5 d6 e7 f8".into()),
        vmx_path: format!("[cloud-ds1] {name}/{name}.vmx"),
        firewall: Default::default(),
        placement: Default::default(),
        disks: vec![
            NewDisk {
                key: "scsi0:0".into(),
                path: format!("[cloud-ds1] {name}/{name}.vmdk"),
                capacity_bytes: 10 << 30,
                datastore: None,
            },
            NewDisk {
                key: "scsi0:1".into(),
                path: format!("[cloud-ds1] {name}/{name}_1.vmdk"),
                capacity_bytes: 1 << 30,
                datastore: None,
            },
            NewDisk {
                key: "sata0:0".into(),
                path: format!("[cloud-ds1] {name}/{name}_2.vmdk"),
                capacity_bytes: 512,
                datastore: None,
            },
        ],
        controllers: vec![
            gateway::plan::ControllerSpec {
                key: "scsi0".into(),
                kind: gateway::plan::ControllerType::Pvscsi,
            },
            gateway::plan::ControllerSpec {
                key: "sata0".into(),
                kind: gateway::plan::ControllerType::Ahci,
            },
        ],
        nics: vec![
            NewNic {
                key: "ethernet1".into(),
                network_id: nets[2].id.clone(),
                mac: Some("00:50:56:aa:bb:cc".into()),
                virtual_dev: Some("vmxnet3".into()),
                address_type: Some("static".into()),
                source_network: "db-pg".into(),
            },
            NewNic {
                key: "ethernet0".into(),
                network_id: nets[1].id.clone(),
                mac: None,
                virtual_dev: None,
                address_type: Some("generated".into()),
                source_network: "web-pg".into(),
            },
        ],
    }
}

#[test]
fn first_open_seeds_the_domain_with_vcenter_ids_from_one_counter() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        if let Db::Sqlite(_, path) = db {
            assert!(path.exists());
        }
        let d = inv.domain().unwrap();
        assert_eq!(d.folders[0].id, "group-d1");
        assert_eq!(d.folders[0].kind, "DATACENTER");
        assert!(d.datacenter.id.starts_with("datacenter-"));
        assert_eq!(d.datacenter.name, "Cloud-DC");
        assert!(d.datacenter.vm_folder.starts_with("group-v"));
        assert!(d.datacenter.host_folder.starts_with("group-h"));
        assert!(d.datacenter.datastore_folder.starts_with("group-s"));
        assert!(d.datacenter.network_folder.starts_with("group-n"));
        let landing = d.folders.iter().find(|f| f.id == d.vm_folder).unwrap();
        assert!(landing.id.starts_with("group-v"));
        assert_eq!(landing.name, "Migrated VMs");
        assert_eq!(landing.parent.as_deref(), Some(d.datacenter.vm_folder.as_str()));
        assert!(d.cluster.id.starts_with("domain-c"));
        assert_eq!(d.cluster.name, "Cloud-Cluster");
        assert!(d.host.id.starts_with("host-"));
        assert_eq!(
            (d.host.name.as_str(), d.host.cpu_cores, d.host.memory_mib),
            ("esx-cloud-01.local", 32, 262_144)
        );
        assert_eq!(d.host.cluster, d.cluster.id);
        let ds = inv.datastore().unwrap();
        assert!(ds.id.starts_with("datastore-"));
        assert_eq!((ds.name.as_str(), ds.capacity_bytes), ("cloud-ds1", None));
        let nets = inv.networks().unwrap();
        assert_eq!(
            nets.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["VM Network", "cloud-web", "cloud-db"]
        );
        assert!(nets.iter().all(|n| n.id.starts_with("network-")));
        assert_eq!(inv.network_by_name("cloud-web").unwrap(), Some(nets[1].clone()));
        assert_eq!(inv.network_by_name("nope").unwrap(), None);

        // One counter: every object has its own number.
        let mut numbers: Vec<i64> = d.folders.iter().map(|f| id_number(&f.id)).collect();
        numbers.extend([&d.datacenter.id, &d.cluster.id, &d.host.id, &ds.id].map(|id| id_number(id)));
        numbers.extend(nets.iter().map(|n| id_number(&n.id)));
        numbers.sort();
        assert_eq!(numbers, (1..=numbers.len() as i64).collect::<Vec<_>>());
    });
}

#[test]
fn authenticate_accepts_only_the_right_password_and_tells_nothing_else() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let p = inv.authenticate("administrator@cloud.local", DEMO_PASSWORD).unwrap();
        assert_eq!(
            (p.user.as_str(), p.role),
            ("administrator@cloud.local", Role::Administrator)
        );
        assert_eq!(
            inv.authenticate("auditor@cloud.local", DEMO_PASSWORD).unwrap().role,
            Role::ReadOnly
        );

        // Case does not tell names apart, as in vCenter; the principal is the configured name.
        let p = inv.authenticate("ADMINISTRATOR@Cloud.Local", DEMO_PASSWORD).unwrap();
        assert_eq!(p.user, "administrator@cloud.local");
        assert!(inv.authenticate("administrator@CLOUD.LOCAL", "guess").is_err());

        let wrong = inv.authenticate("administrator@cloud.local", "guess").unwrap_err();
        let unknown = inv.authenticate("root", DEMO_PASSWORD).unwrap_err();
        assert!(matches!(wrong, InventoryError::BadCredentials));
        assert!(matches!(unknown, InventoryError::BadCredentials));
        assert_eq!(wrong.to_string(), unknown.to_string());
        assert_eq!(wrong.to_string(), "user or password not accepted by the cloud domain");

        // Stored hashes are argon2id PHC strings with distinct salts.
        let hashes: Vec<String> = inv
            .read(|tx| Ok(tx.query_map("SELECT password_hash FROM app_user", &[], |r| r.get(0))?))
            .unwrap();
        assert_eq!(hashes.len(), 3);
        assert!(hashes.iter().all(|h| h.starts_with("$argon2id$")));
        assert_ne!(hashes[0], hashes[1]);
    });
}

#[test]
fn begin_migration_reserves_the_name() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        assert!(!inv.vm_name_taken("web01").unwrap());
        let id = inv
            .begin_migration(&operator(), "edge-paris", "web01", 1 << 30)
            .unwrap();
        assert!(id.starts_with("migration-"), "{id}");
        assert!(inv.vm_name_taken("web01").unwrap());
        let err = inv.begin_migration(&operator(), "edge-lyon", "web01", 1).unwrap_err();
        assert!(
            matches!(&err, InventoryError::NameTaken { name } if name == "web01"),
            "{err:?}"
        );
        assert_eq!(inv.used_bytes().unwrap(), 1 << 30);

        let m = inv.migration(&id).unwrap().unwrap();
        assert_eq!(
            (m.state.as_str(), m.user.as_str(), m.edge.as_str()),
            ("RUNNING", "migrator@cloud.local", "edge-paris")
        );
        assert_eq!((m.vm, m.finished, m.error), (None, None, None));

        let auditor = Principal {
            user: "auditor@cloud.local".into(),
            role: Role::ReadOnly,
        };
        let err = inv.begin_migration(&auditor, "edge-paris", "db01", 1).unwrap_err();
        assert!(matches!(err, InventoryError::NotPermitted { .. }), "{err:?}");
    });
}

#[test]
fn concurrent_begins_for_one_name_let_exactly_one_through() {
    for_each_store(|db| {
        let inv = Arc::new(db.open(&DomainConfig::default()));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let inv = Arc::clone(&inv);
                std::thread::spawn(move || inv.begin_migration(&operator(), &format!("edge-{i}"), "same", 1))
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, InventoryError::NameTaken { .. })));
    });
}

#[test]
fn register_vm_stores_devices_in_order_and_completes_the_migration() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let mid = inv
            .begin_migration(&operator(), "edge-paris", "web01", 11 << 30)
            .unwrap();
        let spec = new_vm(&inv, "web01");
        let vm_id = inv.register_vm(&mid, &spec, fake_receipt).unwrap().vm_id;
        assert!(vm_id.starts_with("vm-"));
        let nets = inv.networks().unwrap();
        assert!(id_number(&vm_id) > id_number(&nets.last().unwrap().id));

        let vms = inv.list_vms().unwrap();
        assert_eq!(vms.len(), 1);
        let vm = &vms[0];
        let d = inv.domain().unwrap();
        assert_eq!(
            (vm.id.as_str(), vm.name.as_str(), vm.power_state.as_str()),
            (vm_id.as_str(), "web01", "POWERED_OFF")
        );
        assert_eq!(
            (vm.host.as_str(), vm.folder.as_str()),
            (d.host.id.as_str(), d.vm_folder.as_str())
        );
        assert_eq!(vm.datastore, inv.datastore().unwrap().id);
        assert_eq!((vm.num_cpus, vm.cores_per_socket, vm.memory_mib), (4, Some(2), 8192));
        assert_eq!(vm.firmware.as_deref(), Some("efi"));
        assert_eq!(vm.vmx_path, "[cloud-ds1] web01/web01.vmx");
        assert_eq!(vm.migration.as_deref(), Some(mid.as_str()));
        assert!(time::OffsetDateTime::parse(&vm.created, &time::format_description::well_known::Rfc3339).is_ok());
        let disk_keys: Vec<_> = vm.disks.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(disk_keys, ["scsi0:0", "scsi0:1", "sata0:0"]);
        assert_eq!(
            vm.disks[1],
            DiskRecord {
                key: "scsi0:1".into(),
                path: "[cloud-ds1] web01/web01_1.vmdk".into(),
                capacity_bytes: 1 << 30,
                datastore: inv.datastore().unwrap().id,
            }
        );
        let nic_keys: Vec<_> = vm.nics.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(nic_keys, ["ethernet1", "ethernet0"]);
        assert_eq!(vm.nics[0].network, nets[2].id);
        assert_eq!(vm.nics[0].network_name, "cloud-db");
        assert_eq!(vm.nics[0].mac.as_deref(), Some("00:50:56:aa:bb:cc"));
        assert_eq!(vm.nics[1].source_network, "web-pg");

        let by_name = inv.vm_by_name("web01").unwrap().unwrap();
        assert_eq!(by_name.disks, vm.disks);
        assert_eq!(inv.vm(&vm_id).unwrap().unwrap().name, "web01");
        assert!(inv.vm_by_name("web02").unwrap().is_none());

        let m = inv.migration(&mid).unwrap().unwrap();
        assert_eq!((m.state.as_str(), m.vm.as_deref()), ("SUCCEEDED", Some(vm_id.as_str())));
        assert!(m.finished.is_some());
        // The registered disks count; the finished migration no longer does.
        assert_eq!(inv.used_bytes().unwrap(), (10 << 30) + (1 << 30) + 512);

        // The name stays taken by the VM.
        assert!(inv.vm_name_taken("web01").unwrap());
        assert!(matches!(
            inv.begin_migration(&operator(), "e", "web01", 1),
            Err(InventoryError::NameTaken { .. })
        ));
        // A finished migration cannot register again.
        assert!(matches!(
            inv.register_vm(&mid, &spec, fake_receipt),
            Err(InventoryError::MigrationNotRunning { .. })
        ));
        assert!(matches!(
            inv.fail_migration(&mid, "late"),
            Err(InventoryError::MigrationNotRunning { .. })
        ));
    });
}

#[test]
fn register_vm_is_all_or_nothing() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let mid = inv.begin_migration(&operator(), "edge", "app01", 1).unwrap();
        let mut spec = new_vm(&inv, "app01");
        spec.nics[1].network_id = "network-999".into();
        let err = inv.register_vm(&mid, &spec, fake_receipt).unwrap_err();
        assert!(
            matches!(&err, InventoryError::NotFound { what } if what.contains("network-999")),
            "{err:?}"
        );
        assert!(inv.list_vms().unwrap().is_empty());
        assert_eq!(inv.migration(&mid).unwrap().unwrap().state, "RUNNING");

        let mut spec = new_vm(&inv, "app01");
        spec.disks[1].key = "scsi0:0".into();
        assert!(matches!(
            inv.register_vm(&mid, &spec, fake_receipt),
            Err(InventoryError::Invalid(_))
        ));

        let spec = new_vm(&inv, "other-name");
        assert!(matches!(
            inv.register_vm(&mid, &spec, fake_receipt),
            Err(InventoryError::Invalid(_))
        ));
        assert!(matches!(
            inv.register_vm("migration-77", &spec, fake_receipt),
            Err(InventoryError::NotFound { .. })
        ));
        assert!(inv.list_vms().unwrap().is_empty());
    });
}

#[test]
fn fail_migration_frees_the_name() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let first = inv.begin_migration(&operator(), "edge", "db01", 100).unwrap();
        inv.fail_migration(&first, "edge went away").unwrap();
        assert!(!inv.vm_name_taken("db01").unwrap());
        assert_eq!(inv.used_bytes().unwrap(), 0);
        let m = inv.migration(&first).unwrap().unwrap();
        assert_eq!(
            (m.state.as_str(), m.error.as_deref()),
            ("FAILED", Some("edge went away"))
        );
        assert!(m.finished.is_some());
        // Failing twice keeps the first reason.
        inv.fail_migration(&first, "other").unwrap();
        assert_eq!(
            inv.migration(&first).unwrap().unwrap().error.as_deref(),
            Some("edge went away")
        );
        assert!(matches!(
            inv.fail_migration("migration-404", "x"),
            Err(InventoryError::NotFound { .. })
        ));

        let second = inv.begin_migration(&operator(), "edge", "db01", 100).unwrap();
        assert_ne!(first, second);
        let ids: Vec<_> = inv.list_migrations().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, [first, second]);
    });
}

#[test]
fn fail_running_migrations_fails_only_the_running_ones() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let a = inv.begin_migration(&operator(), "edge", "a", 1).unwrap();
        let b = inv.begin_migration(&operator(), "edge", "b", 1).unwrap();
        let c = inv.begin_migration(&operator(), "edge", "c", 1).unwrap();
        inv.register_vm(&b, &new_vm(&inv, "b"), fake_receipt).unwrap();
        drop(inv);

        let inv = db.open(&DomainConfig::default());
        let failed = inv.fail_running_migrations("cut by an endpoint restart").unwrap();
        assert_eq!(failed, [a.clone(), c.clone()]);
        let states: Vec<_> = inv
            .list_migrations()
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.state, m.error))
            .collect();
        assert_eq!(
            states,
            [
                (a, "FAILED".into(), Some("cut by an endpoint restart".into())),
                (b, "SUCCEEDED".into(), None),
                (c, "FAILED".into(), Some("cut by an endpoint restart".into())),
            ]
        );
        assert!(inv.fail_running_migrations("again").unwrap().is_empty());
    });
}

#[test]
fn reopening_keeps_everything_and_grows_with_the_config() {
    let (_dir, path) = temp_db();
    let inv = Inventory::open(&path, &DomainConfig::default()).unwrap();
    let mid = inv.begin_migration(&operator(), "edge", "web01", 1).unwrap();
    let vm_id = inv
        .register_vm(&mid, &new_vm(&inv, "web01"), fake_receipt)
        .unwrap()
        .vm_id;
    let before = inv.domain().unwrap();
    let nets_before = inv.networks().unwrap();
    drop(inv);

    let mut domain = DomainConfig {
        networks: vec!["cloud-dmz".into(), "VM Network".into()],
        datacenter: "Renamed-DC".into(),
        ..DomainConfig::default()
    };
    domain.datastore.capacity_bytes = Some(1 << 40);
    domain.users.retain(|u| u.name != "auditor@cloud.local");
    domain.users[0].password = Some("a new secret".into());
    domain.users.push(UserConfig {
        name: "ops@cloud.local".into(),
        password: None,
        password_hash: Some(hash_password("ops pw").unwrap()),
        role: Role::ReadOnly,
    });
    domain.users[1].role = Role::Administrator;
    let inv = Inventory::open(&path, &domain).unwrap();

    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::VERSION);

    let after = inv.domain().unwrap();
    assert_eq!(after.datacenter.id, before.datacenter.id);
    assert_eq!(after.datacenter.name, "Cloud-DC", "existing objects keep their names");
    assert_eq!(after.host.id, before.host.id);
    assert_eq!(inv.datastore().unwrap().capacity_bytes, Some(1 << 40));
    let nets = inv.networks().unwrap();
    assert_eq!(&nets[..3], &nets_before[..]);
    assert_eq!(nets.len(), 4);
    assert_eq!(nets[3].name, "cloud-dmz");
    assert!(
        id_number(&nets[3].id) > id_number(&vm_id),
        "the counter continues after a reopen"
    );

    let vm = inv.vm_by_name("web01").unwrap().unwrap();
    assert_eq!((vm.id.as_str(), vm.disks.len(), vm.nics.len()), (vm_id.as_str(), 3, 2));
    assert_eq!(inv.list_migrations().unwrap().len(), 1);

    // Users follow the config: new password, new role, new user, removed user inactive.
    assert!(inv.authenticate("administrator@cloud.local", DEMO_PASSWORD).is_err());
    assert!(inv.authenticate("administrator@cloud.local", "a new secret").is_ok());
    assert_eq!(
        inv.authenticate("migrator@cloud.local", DEMO_PASSWORD).unwrap().role,
        Role::Administrator
    );
    assert_eq!(
        inv.authenticate("ops@cloud.local", "ops pw").unwrap().role,
        Role::ReadOnly
    );
    assert!(matches!(
        inv.authenticate("auditor@cloud.local", DEMO_PASSWORD),
        Err(InventoryError::BadCredentials)
    ));
    let stored: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT password_hash FROM app_user WHERE name = 'ops@cloud.local'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        Some(stored),
        domain.users[2].password_hash,
        "a given hash is stored as is"
    );
    drop(inv);

    // Back to the defaults: the auditor is active again.
    let inv = Inventory::open(&path, &DomainConfig::default()).unwrap();
    assert!(inv.authenticate("auditor@cloud.local", DEMO_PASSWORD).is_ok());
    assert_eq!(inv.networks().unwrap().len(), 4, "networks are never deleted");
}

#[test]
fn database_errors_name_the_file() {
    let (dir, _) = temp_db();
    let path = dir.path().join("garbage.sqlite3");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let err = Inventory::open(&path, &DomainConfig::default()).unwrap_err();
    assert!(matches!(err, InventoryError::Db { .. }), "{err:?}");
    assert!(err.to_string().contains("garbage.sqlite3"), "{err}");

    let path = dir.path().join("future.sqlite3");
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = Inventory::open(&path, &DomainConfig::default()).unwrap_err();
    assert!(matches!(err, InventoryError::SchemaTooNew { found: 99, .. }), "{err:?}");
    assert!(err.to_string().contains("future.sqlite3"), "{err}");
}

fn is_uuid_v4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && s.chars()
            .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        && parts[2].starts_with('4')
        && parts[3].starts_with(['8', '9', 'a', 'b'])
}

#[test]
fn registered_vms_get_distinct_instance_uuids() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let mut seen = Vec::new();
        for name in ["a", "b"] {
            let mid = inv.begin_migration(&operator(), "edge", name, 1).unwrap();
            let id = inv.register_vm(&mid, &new_vm(&inv, name), fake_receipt).unwrap().vm_id;
            let vm = inv.vm(&id).unwrap().unwrap();
            assert!(is_uuid_v4(&vm.instance_uuid), "{}", vm.instance_uuid);
            seen.push(vm.instance_uuid);
        }
        assert_ne!(seen[0], seen[1]);
    });
}

#[test]
fn upgrading_a_version_1_file_gives_each_vm_its_own_instance_uuid() {
    let (_dir, path) = temp_db();
    let inv = Inventory::open(&path, &DomainConfig::default()).unwrap();
    for name in ["a", "b", "c"] {
        let mid = inv.begin_migration(&operator(), "edge", name, 1).unwrap();
        inv.register_vm(&mid, &new_vm(&inv, name), fake_receipt).unwrap();
    }
    drop(inv);
    // Back to what a version-1 build wrote: no column, no receipts, version 1.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP TABLE firewall_rule; DROP TABLE firewall_group; DROP TABLE migration_report;
         DROP TABLE receipt; ALTER TABLE vm DROP COLUMN instance_uuid;
         ALTER TABLE migration DROP COLUMN edge_cert; ALTER TABLE migration DROP COLUMN plan;
         ALTER TABLE migration DROP COLUMN disk_format; ALTER TABLE migration DROP COLUMN interrupted;
         DROP TABLE migration_space; DROP TABLE resource_pool;
         ALTER TABLE vm DROP COLUMN resource_pool; ALTER TABLE vm_disk DROP COLUMN datastore;
         ALTER TABLE migration DROP COLUMN commit_moves;
         ALTER TABLE migration DROP COLUMN replica_syncs; ALTER TABLE migration DROP COLUMN replica_synced;
         ALTER TABLE migration DROP COLUMN replica_delta_bytes;
         DROP TABLE vm_controller; ALTER TABLE vm_nic DROP COLUMN address_type;
         ALTER TABLE migration DROP COLUMN switchover_at; ALTER TABLE migration DROP COLUMN switchover_state;
         ALTER TABLE migration DROP COLUMN downtime_ms; ALTER TABLE migration DROP COLUMN downtime_from;
         ALTER TABLE migration DROP COLUMN replica_pass_ms; ALTER TABLE migration DROP COLUMN replica_read_back_ms;
         DROP TABLE superseded_receipt;
         DROP TABLE chunk_index; DROP TABLE chunk_source; ALTER TABLE migration DROP COLUMN dedup_bytes;
         ALTER TABLE migration DROP COLUMN switchover_window;
         DROP TABLE migration_lease;
         ALTER TABLE host DROP COLUMN api_url; ALTER TABLE host DROP COLUMN api_thumbprint;
         ALTER TABLE host DROP COLUMN api_token;
         ALTER TABLE migration DROP COLUMN switchover_ended_by;
         PRAGMA user_version = 1;",
    )
    .unwrap();
    drop(conn);

    let inv = Inventory::open(&path, &DomainConfig::default()).unwrap();
    // Step 6 put every disk on its VM's datastore, and every VM in its cluster's root pool.
    let root = crate::inventory::root_resource_pool(&inv.domain().unwrap().cluster.id);
    for vm in inv.list_vms().unwrap() {
        let vm = inv.vm(&vm.id).unwrap().unwrap();
        assert!(vm.disks.iter().all(|d| d.datastore == vm.datastore), "{:?}", vm.disks);
        assert_eq!(vm.resource_pool, root);
    }
    let uuids: Vec<String> = inv.list_vms().unwrap().into_iter().map(|v| v.instance_uuid).collect();
    assert_eq!(uuids.len(), 3);
    for u in &uuids {
        assert!(is_uuid_v4(u), "{u}");
    }
    assert!(
        uuids[0] != uuids[1] && uuids[1] != uuids[2] && uuids[0] != uuids[2],
        "{uuids:?}"
    );
    // Migrations from before receipts existed say so, and have none to give.
    for m in inv.list_migrations().unwrap() {
        assert!(!m.has_receipt, "{}", m.id);
        assert_eq!(inv.receipt(&m.id).unwrap(), None);
    }
}

#[test]
fn the_copys_controllers_and_nic_address_types_are_kept() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let mid = inv.begin_migration(&operator(), "edge", "hw01", 1).unwrap();
        let vm_id = inv
            .register_vm(&mid, &new_vm(&inv, "hw01"), fake_receipt)
            .unwrap()
            .vm_id;
        let vm = inv.vm(&vm_id).unwrap().unwrap();
        assert_eq!(vm.controller_type("scsi0"), Some(gateway::plan::ControllerType::Pvscsi));
        assert_eq!(vm.controller_type("sata0"), Some(gateway::plan::ControllerType::Ahci));
        let types: Vec<Option<&str>> = vm.nics.iter().map(|n| n.address_type.as_deref()).collect();
        assert_eq!(types, [Some("static"), Some("generated")]);
    });
}

#[test]
fn upgrading_a_version_8_file_keeps_what_its_vmx_files_say() {
    let (_dir, path) = temp_db();
    let inv = Inventory::open(&path, &DomainConfig::default()).unwrap();
    let mid = inv.begin_migration(&operator(), "edge", "old01", 1).unwrap();
    let vm_id = inv
        .register_vm(&mid, &new_vm(&inv, "old01"), fake_receipt)
        .unwrap()
        .vm_id;
    drop(inv);
    // Back to what a version-8 build wrote: no controllers, no address types.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DROP TABLE vm_controller; ALTER TABLE vm_nic DROP COLUMN address_type;
         ALTER TABLE migration DROP COLUMN switchover_at; ALTER TABLE migration DROP COLUMN switchover_state;
         ALTER TABLE migration DROP COLUMN downtime_ms; ALTER TABLE migration DROP COLUMN downtime_from;
         ALTER TABLE migration DROP COLUMN replica_pass_ms; ALTER TABLE migration DROP COLUMN replica_read_back_ms;
         DROP TABLE superseded_receipt;
         DROP TABLE chunk_index; DROP TABLE chunk_source; ALTER TABLE migration DROP COLUMN dedup_bytes;
         ALTER TABLE migration DROP COLUMN switchover_window;
         DROP TABLE migration_lease;
         ALTER TABLE host DROP COLUMN api_url; ALTER TABLE host DROP COLUMN api_thumbprint;
         ALTER TABLE host DROP COLUMN api_token;
         ALTER TABLE migration DROP COLUMN switchover_ended_by;
         PRAGMA user_version = 8;",
    )
    .unwrap();
    drop(conn);

    let inv = Inventory::open(&path, &DomainConfig::default()).unwrap();
    let vm = inv.vm(&vm_id).unwrap().unwrap();
    // A version-8 build wrote every SCSI controller `lsilogic`, and a MAC as static.
    assert!(vm.controllers.is_empty(), "{:?}", vm.controllers);
    assert_eq!(
        vm.controller_type("scsi0"),
        Some(gateway::plan::ControllerType::LsiLogic)
    );
    let nics: Vec<(Option<&str>, Option<&str>)> = vm
        .nics
        .iter()
        .map(|n| (n.mac.as_deref(), n.address_type.as_deref()))
        .collect();
    assert_eq!(
        nics,
        [(Some("00:50:56:aa:bb:cc"), Some("static")), (None, Some("generated"))]
    );
}

#[test]
fn the_receipt_is_stored_with_the_vm_or_nothing_is() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let mid = inv.begin_migration(&operator(), "edge", "web01", 1).unwrap();
        assert_eq!(inv.receipt(&mid).unwrap(), None);
        assert!(!inv.migration(&mid).unwrap().unwrap().has_receipt);

        let err = inv
            .register_vm(&mid, &new_vm(&inv, "web01"), |_| Err("the signing key is gone".into()))
            .unwrap_err();
        assert!(
            matches!(&err, InventoryError::Receipt { .. }) && err.to_string().contains("the signing key is gone"),
            "{err}"
        );
        assert!(inv.list_vms().unwrap().is_empty(), "no VM without its receipt");
        assert_eq!(inv.migration(&mid).unwrap().unwrap().state, "RUNNING");

        let registered = inv.register_vm(&mid, &new_vm(&inv, "web01"), fake_receipt).unwrap();
        let record = inv.migration(&mid).unwrap().unwrap();
        assert!(record.has_receipt);
        assert_eq!(record.vm.as_deref(), Some(registered.vm_id.as_str()));
        // The receipt learned the VM id, the start and the very commit time recorded.
        let finished = record.finished.clone().unwrap();
        assert_eq!(
            registered.receipt,
            format!(
                "receipt of {mid} for {} ({} .. {finished})",
                registered.vm_id, record.started
            )
        );
        assert_eq!(inv.receipt(&mid).unwrap(), Some(registered.receipt.clone()));
        assert!(matches!(
            inv.receipt("migration-99"),
            Err(InventoryError::NotFound { .. })
        ));
        drop(inv);
        let inv = db.open(&DomainConfig::default());
        assert_eq!(inv.receipt(&mid).unwrap(), Some(registered.receipt));
    });
}

#[test]
fn firewall_rules_and_the_report_are_stored_with_the_vm_and_rewritten_to_its_id() {
    use gateway::plan::{FirewallGroup, FirewallRule, FirewallSpec, RuleAction, RuleDirection, RuleEndpoint};
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let first = inv.begin_migration(&operator(), "edge", "db01", 1).unwrap();
        let db01 = inv
            .register_vm(&first, &new_vm(&inv, "db01"), fake_receipt)
            .unwrap()
            .vm_id;
        assert!(inv.vm_firewall(&db01).unwrap().unwrap().rules.is_empty());
        assert_eq!(
            inv.migration_report(&first).unwrap(),
            None,
            "registered without a report"
        );

        let mid = inv.begin_migration(&operator(), "edge", "web01-cloud", 1).unwrap();
        let mut vm = new_vm(&inv, "web01-cloud");
        let rule = FirewallRule {
            id: "7".into(),
            name: "to-db".into(),
            action: RuleAction::Allow,
            direction: RuleDirection::Out,
            sources: vec![RuleEndpoint::Vm("web01".into())],
            destinations: vec![
                RuleEndpoint::Vm("db01".into()),
                RuleEndpoint::Address("10.0.0.1".into()),
            ],
            services: vec![],
            applied_to: vec![RuleEndpoint::Vm("web01-cloud".into())],
            disabled: false,
        };
        vm.firewall = FirewallSpec {
            origin: "web01.dfw.json".into(),
            source_vm: "web01".into(),
            rules: vec![rule],
            groups: vec![FirewallGroup {
                name: "me".into(),
                members: vec![RuleEndpoint::Vm("web01".into())],
            }],
            ..FirewallSpec::default()
        };
        let registered = inv
            .register_vm_with_report(&mid, &vm, fake_receipt, |ctx| {
                Some(format!("{{\"vm_id\":\"{}\",\"not_carried\":[]}}", ctx.vm_id))
            })
            .unwrap();
        let id = registered.vm_id;
        let fw = inv.vm_firewall(&id).unwrap().unwrap();
        let own = RuleEndpoint::VmId(id.clone());
        assert_eq!(fw.rules[0].sources, vec![own.clone()], "the source name is the new id");
        assert_eq!(fw.rules[0].applied_to, vec![own.clone()], "so is the cloud name");
        assert_eq!(
            fw.rules[0].destinations,
            vec![RuleEndpoint::VmId(db01), RuleEndpoint::Address("10.0.0.1".into())],
            "other VMs of the domain by their ids"
        );
        assert_eq!(fw.groups[0].members, vec![own]);
        assert_eq!(
            inv.migration_report(&mid).unwrap().unwrap(),
            format!("{{\"vm_id\":\"{id}\",\"not_carried\":[]}}")
        );
        assert!(inv.vm_firewall("vm-9999").unwrap().is_none());
        assert!(matches!(
            inv.migration_report("migration-99"),
            Err(InventoryError::NotFound { .. })
        ));
    });
}

#[test]
fn placement_objects_added_to_the_config_join_an_existing_inventory() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let before = inv.domain().unwrap();
        assert_eq!((before.hosts.len(), before.datastores.len()), (1, 1));
        assert_eq!(before.resource_pools.len(), 1, "only the cluster's root pool");
        drop(inv);
        let grown = DomainConfig {
            extra_hosts: vec![crate::config::HostConfig {
                name: "esx-02".into(),
                cpu_cores: 8,
                memory_mib: 8192,
                api_url: None,
            }],
            extra_datastores: vec![crate::config::ExtraDatastoreConfig {
                name: "ds2".into(),
                dir: "ds2".into(),
                capacity_bytes: Some(1 << 30),
                disk_format: gateway::plan::DiskFormat::Qcow2,
            }],
            folders: vec!["Imported".into()],
            resource_pools: vec![crate::config::ResourcePoolConfig {
                name: "batch".into(),
                memory_limit_mib: Some(4096),
                cpu_limit_cores: None,
            }],
            ..DomainConfig::default()
        };
        for _ in 0..2 {
            // The second start finds them all and adds nothing twice.
            let inv = db.open(&grown);
            let d = inv.domain().unwrap();
            let hosts: Vec<_> = d.hosts.iter().map(|h| (h.name.as_str(), h.cluster.as_str())).collect();
            assert_eq!(
                hosts,
                [
                    (before.host.name.as_str(), before.cluster.id.as_str()),
                    ("esx-02", before.cluster.id.as_str())
                ]
            );
            let stores: Vec<_> = d
                .datastores
                .iter()
                .map(|s| (s.name.as_str(), s.capacity_bytes))
                .collect();
            assert_eq!(stores, [("cloud-ds1", None), ("ds2", Some(1 << 30))]);
            let imported: Vec<_> = d.folders.iter().filter(|f| f.name == "Imported").collect();
            assert_eq!(imported.len(), 1);
            assert_eq!(imported[0].parent.as_deref(), Some(d.datacenter.vm_folder.as_str()));
            let pools: Vec<_> = d
                .resource_pools
                .iter()
                .map(|p| (p.name.as_str(), p.parent.is_some()))
                .collect();
            assert_eq!(pools, [("Resources", false), ("batch", true)]);
            // The default placement stays the first objects.
            assert_eq!(
                (d.host.id.as_str(), d.datastore.id.as_str()),
                (before.host.id.as_str(), before.datastore.id.as_str())
            );
        }
    });
}

#[test]
fn a_rolled_back_switchover_is_a_replica_again_and_its_receipt_is_superseded() {
    use crate::inventory::switchover::{AWAITING_CONFIRM, ROLLED_BACK};
    const FROM_SWITCHOVER_START: &str = "switchover started";
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let mid = inv.begin_migration(&operator(), "edge", "rb01", 1).unwrap();
        let pass = crate::inventory::PassTimes {
            pass_ms: 1500,
            read_back_ms: 500,
        };
        // The edge schedules; an API change is what the next pass learns.
        let held = inv
            .record_replica_sync(&mid, 10, pass, Some(Some("2026-12-07T02:00:00Z")))
            .unwrap();
        assert_eq!(held.as_deref(), Some("2026-12-07T02:00:00Z"));
        inv.set_switchover_at(&mid, Some("2026-12-07T03:00:00Z")).unwrap();
        assert_eq!(
            inv.record_replica_sync(&mid, 0, pass, None).unwrap().as_deref(),
            Some("2026-12-07T03:00:00Z")
        );
        // Switched over, reversible.
        let first = inv.register_vm(&mid, &new_vm(&inv, "rb01"), fake_receipt).unwrap();
        inv.record_switchover(&mid, true, Some(2345), FROM_SWITCHOVER_START)
            .unwrap();
        let r = inv.migration(&mid).unwrap().unwrap().replica.unwrap();
        assert_eq!(r.switchover_state.as_deref(), Some(AWAITING_CONFIRM));
        assert_eq!((r.downtime_ms, r.switchover_at.as_deref()), (Some(2345), None));
        assert!(
            inv.set_switchover_at(&mid, None).is_err(),
            "switched over: nothing to schedule"
        );
        assert_eq!(inv.power_on_blocked(&first.vm_id).unwrap(), None);

        // The rollback starts: the host may not power the VM on from now on.
        assert_eq!(inv.begin_rollback(&mid, "tester with edge-agent").unwrap(), first.vm_id);
        assert_eq!(
            inv.power_on_blocked(&first.vm_id).unwrap().as_deref(),
            Some(mid.as_str())
        );
        assert!(
            inv.confirm_switchover(&mid, "tester through the API").is_err(),
            "a rollback under way is not confirmed"
        );
        let ended_by = |inv: &Inventory| {
            inv.migration(&mid)
                .unwrap()
                .unwrap()
                .replica
                .unwrap()
                .switchover_ended_by
        };
        assert_eq!(
            ended_by(&inv).as_deref(),
            Some("tester with edge-agent"),
            "a request meanwhile is told who is rolling it back"
        );
        // A VM that could not be powered off: the switchover stands, ended by no one.
        inv.cancel_rollback(&mid).unwrap();
        assert_eq!(inv.power_on_blocked(&first.vm_id).unwrap(), None);
        assert_eq!(ended_by(&inv), None);
        inv.begin_rollback(&mid, "tester with edge-agent").unwrap();
        let moves = [CommitMove {
            staging: "/ds/.staging/m".into(),
            target: "/ds/rb01".into(),
        }];
        assert_eq!(
            inv.finish_rollback(&mid, &moves, "tester with edge-agent").unwrap(),
            first.vm_id
        );
        let m = inv.migration(&mid).unwrap().unwrap();
        assert_eq!(
            (m.state.as_str(), m.vm.as_deref(), m.has_receipt),
            ("RUNNING", None, false)
        );
        let r = m.replica.unwrap();
        assert_eq!(
            (r.switchover_state.as_deref(), r.superseded_receipts),
            (Some(ROLLED_BACK), 1)
        );
        assert_eq!(r.switchover_ended_by.as_deref(), Some("tester with edge-agent"));
        assert!(inv.vm(&first.vm_id).unwrap().is_none(), "unregistered");
        assert!(inv.vm_name_taken("rb01").unwrap(), "the replica keeps the name");
        assert_eq!(inv.receipt(&mid).unwrap(), None);
        assert_eq!(
            inv.superseded_receipts(&mid).unwrap(),
            std::slice::from_ref(&first.receipt)
        );
        assert_eq!(
            inv.pending_commits().unwrap()[0].moves,
            moves,
            "a restart finishes the moves"
        );
        inv.clear_commit_moves(&mid).unwrap();

        // The next pass ends the rolled-back state; a new switchover gets a new receipt.
        inv.record_replica_sync(&mid, 64, pass, None).unwrap();
        assert_eq!(
            inv.migration(&mid).unwrap().unwrap().replica.unwrap().switchover_state,
            None
        );
        let second = inv.register_vm(&mid, &new_vm(&inv, "rb01"), fake_receipt).unwrap();
        assert_ne!(second.vm_id, first.vm_id);
        assert_eq!(inv.receipt(&mid).unwrap(), Some(second.receipt));
        inv.record_switchover(&mid, true, None, FROM_SWITCHOVER_START).unwrap();
        assert_eq!(ended_by(&inv), None, "a new switchover was ended by no one yet");
        assert_eq!(
            inv.confirm_switchover(&mid, "tester through the API").unwrap(),
            second.vm_id
        );
        assert_eq!(ended_by(&inv).as_deref(), Some("tester through the API"));
        assert!(
            inv.begin_rollback(&mid, "tester with edge-agent").is_err(),
            "confirmed: final"
        );
    });
}

#[test]
fn both_engines_have_the_same_tables_and_columns_at_the_same_version() {
    assert_eq!(
        schema::PG_STEPS.last().map(|(version, _)| *version),
        Some(schema::VERSION),
        "a schema step was added for SQLite only: write it for PostgreSQL too (schema::PG_STEPS)"
    );
    let columns = |db: &Db| -> Vec<(String, String)> {
        let inv = db.open(&DomainConfig::default());
        let sql = match inv.dialect() {
            store::Dialect::Sqlite => {
                "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'"
            }
            store::Dialect::Postgres => {
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name <> 'schema_version'"
            }
        };
        let mut columns: Vec<(String, String)> = inv
            .read(|tx| Ok(tx.query_map(sql, &[], |row| Ok((row.get(0)?, row.get(1)?)))?))
            .unwrap();
        columns.sort();
        columns
    };
    let (dir, path) = temp_db();
    let sqlite = columns(&Db::Sqlite(dir, path));
    let postgres = columns(&Db::Postgres(store::test_pg::TestPg::start()));
    assert!(sqlite.len() > 100, "{sqlite:?}");
    assert_eq!(sqlite, postgres);
}

mod leases {
    use super::*;
    use crate::cluster::lease::{Claim, Lost};
    use std::time::Duration;

    const PERIOD: Duration = Duration::from_secs(10);

    fn at(ms: i64) -> LeaseClock {
        LeaseClock::At(ms)
    }

    #[test]
    fn a_lease_expires_renews_and_is_taken_over_by_the_next_endpoint() {
        for_each_store(|db| {
            let inv = db.open(&DomainConfig::default());
            let mid = inv.begin_migration(&operator(), "edge", "web01", 1).unwrap();
            let Claim::Granted(a) = inv.claim_migration(&mid, "esx-a", PERIOD, at(0)).unwrap() else {
                panic!("the first claim is granted")
            };
            assert_eq!((a.epoch, a.expires_ms), (1, 10_000));
            // Held: another endpoint waits, however often it asks.
            assert!(matches!(
                inv.claim_migration(&mid, "esx-b", PERIOD, at(9_999)).unwrap(),
                Claim::HeldBy(lease) if lease.owner == "esx-a"
            ));
            // Renewed in time, it lasts.
            let renewed = inv.renew_lease(&mid, "esx-a", 1, PERIOD, at(5_000)).unwrap().unwrap();
            assert_eq!(renewed.expires_ms, 15_000);
            assert!(matches!(
                inv.claim_migration(&mid, "esx-b", PERIOD, at(14_999)).unwrap(),
                Claim::HeldBy(_)
            ));
            assert_eq!(inv.orphaned_migrations(at(14_999)).unwrap(), Vec::<String>::new());
            // Its owner died: at expiry the migration is an orphan, and the next
            // endpoint takes it with a new epoch.
            assert_eq!(inv.orphaned_migrations(at(15_000)).unwrap(), vec![mid.clone()]);
            let Claim::Granted(b) = inv.claim_migration(&mid, "esx-b", PERIOD, at(15_000)).unwrap() else {
                panic!("an expired lease is taken over")
            };
            assert_eq!((b.owner.as_str(), b.epoch), ("esx-b", 2));
            // The slow owner comes back: told who has it, and cannot release it.
            assert_eq!(
                inv.renew_lease(&mid, "esx-a", 1, PERIOD, at(15_001)).unwrap(),
                Err(Lost::TakenBy {
                    migration: mid.clone(),
                    owner: "esx-b".into(),
                    epoch: 2
                })
            );
            assert!(!inv.release_lease(&mid, "esx-a", 1).unwrap());
            // The restarted esx-a holds nothing; esx-b holds its one lease.
            assert!(inv.leases_held_by("esx-a", at(15_001)).unwrap().is_empty());
            assert_eq!(inv.leases_held_by("esx-b", at(15_001)).unwrap(), vec![b.clone()]);
            // The migration ends: the lease expires but keeps its epoch.
            assert!(inv.release_lease(&mid, "esx-b", 2).unwrap());
            let Claim::Granted(c) = inv.claim_migration(&mid, "esx-a", PERIOD, at(15_002)).unwrap() else {
                panic!("a released lease is free")
            };
            assert_eq!(c.epoch, 3);
        });
    }

    #[test]
    fn endpoints_claiming_at_once_get_one_owner() {
        for_each_store(|db| {
            let inv = Arc::new(db.open(&DomainConfig::default()));
            let mid = inv.begin_migration(&operator(), "edge", "web01", 1).unwrap();
            let claims: Vec<_> = (0..6)
                .map(|i| {
                    let (inv, mid) = (Arc::clone(&inv), mid.clone());
                    std::thread::spawn(move || inv.claim_migration(&mid, &format!("esx-{i}"), PERIOD, at(0)).unwrap())
                })
                .collect();
            let claims: Vec<Claim> = claims.into_iter().map(|t| t.join().unwrap()).collect();
            let granted: Vec<_> = claims.iter().filter(|c| matches!(c, Claim::Granted(_))).collect();
            assert_eq!(granted.len(), 1, "{claims:?}");
            let Claim::Granted(owner) = granted[0] else {
                unreachable!()
            };
            assert!(claims
                .iter()
                .all(|c| matches!(c, Claim::Granted(l) | Claim::HeldBy(l) if l == owner)));
        });
    }

    #[test]
    fn the_database_clock_times_leases_in_service() {
        for_each_store(|db| {
            let inv = db.open(&DomainConfig::default());
            let mid = inv.begin_migration(&operator(), "edge", "web01", 1).unwrap();
            let before = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let Claim::Granted(lease) = inv
                .claim_migration(&mid, "esx-a", PERIOD, LeaseClock::Database)
                .unwrap()
            else {
                panic!("granted")
            };
            let from_now = lease.expires_ms - before;
            assert!((9_000..=11_000).contains(&from_now), "{from_now}");
            assert!(matches!(
                inv.claim_migration("migration-999", "esx-a", PERIOD, LeaseClock::Database),
                Err(InventoryError::NotFound { .. })
            ));
        });
    }

    fn leased(inv: &Inventory, name: &str, owner: &str, clock: LeaseClock, plan: bool) -> String {
        let mid = inv.begin_migration(&operator(), "edge", name, 1).unwrap();
        assert!(matches!(
            inv.claim_migration(&mid, owner, PERIOD, clock).unwrap(),
            Claim::Granted(_)
        ));
        if plan {
            inv.set_resume_info(&mid, "edge-cert", b"plan", "qcow2").unwrap();
        }
        mid
    }

    #[test]
    fn a_restarted_endpoint_interrupts_only_its_own_and_orphaned_migrations() {
        for_each_store(|db| {
            let inv = db.open(&DomainConfig::default());
            let now = LeaseClock::Database;
            let own = leased(&inv, "own", "esx-a", now, true);
            let own_unplanned = leased(&inv, "own-unplanned", "esx-a", now, false);
            let elsewhere = leased(&inv, "elsewhere", "esx-b", now, true);
            // esx-c died long ago: its lease expired.
            let orphan = leased(&inv, "orphan", "esx-c", at(0), true);
            let (failed, waiting) = inv.interrupt_running_migrations("restart", "esx-a").unwrap();
            assert_eq!(failed, vec![own_unplanned.clone()]);
            assert_eq!(waiting, vec![own.clone(), orphan.clone()]);
            // What esx-b serves now is left alone: not interrupted, its lease intact.
            let served = inv.resume_info(&elsewhere).unwrap().unwrap();
            assert_eq!((served.state.as_str(), served.interrupted), ("RUNNING", None));
            assert_eq!(inv.leases_held_by("esx-b", now).unwrap().len(), 1);
            assert!(inv.served_elsewhere(&elsewhere, "esx-a", now).unwrap().is_some());
            // The restarted esx-a holds no lease: its edges may resume anywhere.
            assert!(inv.leases_held_by("esx-a", now).unwrap().is_empty());
            assert!(inv.served_elsewhere(&own, "esx-b", now).unwrap().is_none());
            assert!(inv.resume_info(&own).unwrap().unwrap().interrupted.is_some());
        });
    }

    #[test]
    fn the_migrations_of_a_dead_endpoint_wait_for_their_edges() {
        for_each_store(|db| {
            let inv = db.open(&DomainConfig::default());
            let now = LeaseClock::Database;
            let resumable = leased(&inv, "resumable", "esx-a", at(0), true);
            let unplanned = leased(&inv, "unplanned", "esx-a", at(0), false);
            let live = leased(&inv, "live", "esx-b", now, true);
            let (unresumable, waiting) = inv.interrupt_orphans(now).unwrap();
            assert_eq!(unresumable, vec![unplanned.clone()]);
            assert_eq!(waiting, vec![resumable.clone()]);
            assert!(inv.resume_info(&resumable).unwrap().unwrap().interrupted.is_some());
            assert!(inv.resume_info(&live).unwrap().unwrap().interrupted.is_none());
            // Once waiting, the sweep leaves it be; the unplanned one is the caller's to end.
            inv.fail_migration(&unplanned, "ended by the sweep").unwrap();
            assert_eq!(inv.interrupt_orphans(now).unwrap(), (vec![], vec![]));
        });
    }

    #[test]
    fn a_new_migration_is_leased_to_its_endpoint_from_its_first_transaction() {
        for_each_store(|db| {
            let inv = db.open(&DomainConfig::default());
            let now = LeaseClock::Database;
            let mid = inv
                .begin_migration_on(
                    &operator(),
                    "edge",
                    "web01",
                    1,
                    &[],
                    &|_, _| Ok(u64::MAX),
                    Some(("esx-a", PERIOD)),
                )
                .unwrap();
            let held = inv.leases_held_by("esx-a", now).unwrap();
            assert_eq!((held.len(), held[0].epoch), (1, 1));
            assert_eq!(inv.interrupt_orphans(now).unwrap(), (vec![], vec![]));
            assert!(matches!(
                inv.claim_migration(&mid, "esx-b", PERIOD, now).unwrap(),
                Claim::HeldBy(_)
            ));
            // One renewal round answers each lease: this one is esx-a's, the other not.
            let other = leased(&inv, "other", "esx-b", now, true);
            let answers = inv
                .renew_leases(&[(mid.clone(), 1), (other.clone(), 1)], "esx-a", PERIOD, now)
                .unwrap();
            assert!(matches!(&answers[0], Ok(lease) if lease.owner == "esx-a"));
            assert!(matches!(&answers[1], Err(Lost::TakenBy { owner, .. }) if owner == "esx-b"));
        });
    }
}

#[test]
fn endpoints_sharing_postgresql_join_as_hosts_and_race_for_a_name_with_one_winner() {
    let pg = store::test_pg::TestPg::start();
    let endpoint = |host: &str| {
        let mut domain = DomainConfig::default();
        domain.host.name = host.into();
        Arc::new(Inventory::open_postgres(&pg.url, &domain).unwrap())
    };
    let (a, b, c) = (endpoint("esx-a"), endpoint("esx-b"), endpoint("esx-c"));
    // Each sees the same domain, with every endpoint a host of the one cluster.
    let hosts: Vec<String> = a.domain().unwrap().hosts.into_iter().map(|h| h.name).collect();
    assert_eq!(hosts, ["esx-a", "esx-b", "esx-c"]);
    assert_eq!(c.domain().unwrap().hosts.len(), 3);
    // A second start of esx-b adds nothing.
    drop(endpoint("esx-b"));
    assert_eq!(b.domain().unwrap().hosts.len(), 3);
    // Two endpoints start migrations of the same VM name at once: one wins.
    let racers: Vec<_> = [Arc::clone(&a), Arc::clone(&b), Arc::clone(&c)]
        .into_iter()
        .enumerate()
        .map(|(i, inv)| std::thread::spawn(move || inv.begin_migration(&operator(), &format!("edge-{i}"), "web01", 1)))
        .collect();
    let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| matches!(e, InventoryError::NameTaken { .. })));
    // The winner's VM, registered through one endpoint, is listed by the others.
    let mid = results.into_iter().find_map(Result::ok).unwrap();
    let vm = b.register_vm(&mid, &new_vm(&b, "web01"), fake_receipt).unwrap().vm_id;
    assert_eq!(a.list_vms().unwrap()[0].id, vm);
    assert_eq!(c.vm(&vm).unwrap().unwrap().name, "web01");
}

#[test]
fn a_seed_is_indexed_apart_from_its_lift_at_the_chunk_size_asked_for() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let mid = inv.begin_migration(&operator(), "edge", "tpl01", 1).unwrap();
        let vm = inv
            .register_vm(&mid, &new_vm(&inv, "tpl01"), fake_receipt)
            .unwrap()
            .vm_id;
        // Who registered it: the seed's tenancy check reads this.
        let owner = inv.vm_owner(&vm).unwrap().unwrap();
        assert_eq!(
            (owner.migration.as_str(), owner.user.as_str()),
            (mid.as_str(), "migrator@cloud.local")
        );
        assert_eq!(inv.vm_owner("vm-999").unwrap(), None);
        let disks = inv.vm(&vm).unwrap().unwrap().disks.len() as u16;
        let indexed = |disk: u16, len: u32| IndexedDisk {
            migration: &mid,
            vm: Some(&vm),
            disk,
            data_path: PathBuf::from("/nonexistent"),
            format: "raw",
            capacity: 1 << 30,
            user: "migrator@cloud.local",
            edge_cert: "",
            hash: "blake3",
            chunks: vec![(0, len, [1; 32])],
        };
        // Lifted with 1 MiB chunks: indexed at 1 MiB, not at 64 KiB.
        for d in 0..disks {
            inv.index_disk(&indexed(d, 1 << 20)).unwrap();
        }
        assert!(inv.vm_indexed_at(&vm, disks, 1 << 20, "blake3").unwrap());
        assert!(!inv.vm_indexed_at(&vm, disks, 64 << 10, "blake3").unwrap());
        assert!(!inv.vm_indexed_at(&vm, disks, 1 << 20, "sha256").unwrap());
        // Hashed on demand at 64 KiB: both sizes are there, the lift's index untouched.
        for d in 0..disks {
            inv.index_disk(&indexed(seed_disk_number(d), 64 << 10)).unwrap();
        }
        assert!(inv.vm_indexed_at(&vm, disks, 64 << 10, "blake3").unwrap());
        assert!(inv.vm_indexed_at(&vm, disks, 1 << 20, "blake3").unwrap());
    });
}

#[test]
fn a_switchover_window_is_held_for_a_running_replication_only() {
    let (_dir, path) = temp_db();
    let inv = Inventory::open(&path, &DomainConfig::default()).unwrap();
    let mid = inv.begin_migration(&operator(), "edge", "win01", 1).unwrap();
    assert!(
        inv.set_switchover_window(&mid, Some("02:00-04:00")).is_err(),
        "no pass yet: not a replication"
    );
    let pass = crate::inventory::PassTimes {
        pass_ms: 1,
        read_back_ms: 1,
    };
    inv.record_replica_sync(&mid, 10, pass, None).unwrap();
    inv.set_switchover_window(&mid, Some("02:00-04:00")).unwrap();
    assert_eq!(inv.switchover_window(&mid).unwrap().as_deref(), Some("02:00-04:00"));
    inv.set_switchover_window(&mid, None).unwrap();
    assert_eq!(inv.switchover_window(&mid).unwrap(), None);
    inv.register_vm(&mid, &new_vm(&inv, "win01"), fake_receipt).unwrap();
    assert!(
        inv.set_switchover_window(&mid, Some("02:00-04:00")).is_err(),
        "switched over"
    );
}

#[test]
fn space_reserved_twice_on_a_datastore_adds_up() {
    for_each_store(|db| {
        let inv = db.open(&DomainConfig::default());
        let ds = inv.datastore().unwrap().id;
        let space = [(ds.clone(), 100), (ds.clone(), 50)];
        inv.begin_migration_on(&operator(), "edge", "web01", 1, &space, &|_, _| Ok(1 << 40), None)
            .unwrap();
        assert_eq!(inv.space_on(&ds).unwrap().reserved, 150);
    });
}

#[test]
fn endpoints_starting_together_on_an_empty_postgresql_database_all_start() {
    let pg = store::test_pg::TestPg::start();
    let starts: Vec<_> = ["esx-a", "esx-b", "esx-c"]
        .into_iter()
        .map(|host| {
            let url = pg.url.clone();
            std::thread::spawn(move || {
                let mut domain = DomainConfig::default();
                domain.host.name = host.into();
                Inventory::open_postgres(&url, &domain).map(|inv| inv.domain().unwrap().hosts.len())
            })
        })
        .collect();
    for start in starts {
        let hosts = start.join().unwrap().unwrap();
        assert!((1..=3).contains(&hosts));
    }
    let mut domain = DomainConfig::default();
    domain.host.name = "esx-a".into();
    let inv = Inventory::open_postgres(&pg.url, &domain).unwrap();
    let mut hosts: Vec<String> = inv.domain().unwrap().hosts.into_iter().map(|h| h.name).collect();
    hosts.sort();
    assert_eq!(hosts, ["esx-a", "esx-b", "esx-c"]);
}

#[test]
fn each_host_records_where_its_endpoint_answers_and_a_vm_names_its_host() {
    for_each_store(|db| {
        let domain = DomainConfig {
            extra_hosts: vec![crate::config::HostConfig {
                name: "esx-b".into(),
                cpu_cores: 8,
                memory_mib: 8192,
                api_url: None,
            }],
            ..Default::default()
        };
        let inv = db.open(&domain);
        let esx_b = inv
            .domain()
            .unwrap()
            .hosts
            .into_iter()
            .find(|h| h.name == "esx-b")
            .unwrap();
        let mid = inv.begin_migration(&operator(), "edge", "web01", 1).unwrap();
        let mut vm = new_vm(&inv, "web01");
        vm.placement.host = Some(esx_b.id.clone());
        let vm = inv.register_vm(&mid, &vm, fake_receipt).unwrap().vm_id;
        // No endpoint of esx-b has started: nothing recorded.
        let unrecorded = VmHost {
            id: esx_b.id.clone(),
            name: "esx-b".into(),
            api: None,
        };
        assert_eq!(inv.vm_host(&vm).unwrap(), Some(unrecorded));
        assert_eq!(inv.vm_host("vm-999").unwrap(), None);
        // Its endpoint starts, then starts again with a new token and no address.
        let first = HostApi {
            url: Some("https://esx-b.cloud.internal:8443".into()),
            thumbprint: certs::Thumbprint::from([0xab; 32]).to_string(),
            token: "first".into(),
        };
        assert!(inv.record_host_api("esx-b", &first).unwrap());
        assert_eq!(inv.vm_host(&vm).unwrap().unwrap().api, Some(first.clone()));
        let again = HostApi {
            url: None,
            token: "again".into(),
            ..first
        };
        assert!(inv.record_host_api("esx-b", &again).unwrap());
        assert_eq!(inv.vm_host(&vm).unwrap().unwrap().api, Some(again));
        assert_eq!(inv.host_api_url("esx-b").unwrap(), None);
        // A single endpoint whose stored host has another name: nothing to record.
        assert!(!inv.record_host_api("esx-renamed", &first_of("x")).unwrap());
        // The next start keeps what was recorded (the schema step runs once).
        drop(inv);
        assert_eq!(
            db.open(&domain).vm_host(&vm).unwrap().unwrap().api.unwrap().token,
            "again"
        );
    });
}

fn first_of(token: &str) -> HostApi {
    HostApi {
        url: None,
        thumbprint: String::new(),
        token: token.into(),
    }
}
