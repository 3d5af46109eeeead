//! The property collector's semantics in memory: a small domain, filter specs as pyvmomi
//! sends them, and what each selects.

use std::collections::HashMap;

use super::collector::{self, FilterSpec, ObjectSpec, PropertySpec, Selection, TraversalSpec};
use super::model::{Extra, Snapshot, View};
use super::tasks::{TaskRecord, TaskTable};
use super::value::{MoRef, Value};
use super::xml::parse_call;
use crate::inventory::{
    ClusterInfo, DatacenterInfo, DatastoreInfo, DiskRecord, DomainInfo, FolderInfo, HostInfo, MigrationRecord,
    NetworkInfo, NicRecord, PoolInfo, VmRecord,
};

fn folder(id: &str, name: &str, kind: &str, parent: Option<&str>) -> FolderInfo {
    FolderInfo {
        id: id.into(),
        name: name.into(),
        kind: kind.into(),
        parent: parent.map(Into::into),
    }
}

fn vm(id: &str, name: &str, folder: &str) -> VmRecord {
    VmRecord {
        id: id.into(),
        name: name.into(),
        guest_os: "debian12-64".into(),
        num_cpus: 2,
        cores_per_socket: None,
        memory_mib: 2048,
        firmware: None,
        bios_uuid: Some("56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc".into()),
        power_state: "POWERED_OFF".into(),
        host: "host-9".into(),
        datastore: "datastore-10".into(),
        folder: folder.into(),
        resource_pool: "resgroup-8".into(),
        vmx_path: format!("[cloud-ds1] {name}/{name}.vmx"),
        disks: vec![DiskRecord {
            key: "scsi0:0".into(),
            path: format!("[cloud-ds1] {name}/{name}.vmdk"),
            capacity_bytes: 1 << 30,
            datastore: "datastore-10".into(),
        }],
        controllers: Vec::new(),
        nics: vec![NicRecord {
            key: "ethernet0".into(),
            network: "network-11".into(),
            network_name: "VM Network".into(),
            mac: Some("00:50:56:00:00:01".into()),
            virtual_dev: Some("vmxnet3".into()),
            address_type: None,
            source_network: "VM Network".into(),
        }],
        migration: None,
        created: "2024-01-01T00:00:00Z".into(),
        instance_uuid: format!("5003a1b2-0000-4000-8000-{:0>12}", &id[3..]),
    }
}

/// Root folder, datacenter-2 with its four folders, a subfolder `prod` in the VM folder,
/// one cluster, host, root pool, datastore, network, and `n` VMs (every other in `prod`).
fn snapshot(n: usize, views: HashMap<String, View>) -> Snapshot {
    snapshot_with(
        n,
        Extra {
            views,
            ..Extra::default()
        },
    )
}

/// [`snapshot`] with what a session adds: views, tasks, the session itself.
fn snapshot_with(n: usize, extra: Extra) -> Snapshot {
    let dc = DatacenterInfo {
        id: "datacenter-2".into(),
        name: "cloud-dc".into(),
        vm_folder: "group-v3".into(),
        host_folder: "group-h4".into(),
        datastore_folder: "group-s5".into(),
        network_folder: "group-n6".into(),
    };
    let cluster = ClusterInfo {
        id: "domain-c7".into(),
        name: "cloud-cluster".into(),
    };
    let host = HostInfo {
        id: "host-9".into(),
        name: "esx1".into(),
        cluster: "domain-c7".into(),
        cpu_cores: 8,
        memory_mib: 16384,
    };
    let ds = DatastoreInfo {
        id: "datastore-10".into(),
        name: "cloud-ds1".into(),
        capacity_bytes: None,
    };
    let d = DomainInfo {
        datacenter: dc,
        folders: vec![
            folder("group-d1", "Datacenters", "DATACENTER", None),
            folder("group-v3", "vm", "VIRTUAL_MACHINE", Some("datacenter-2")),
            folder("group-h4", "host", "HOST", Some("datacenter-2")),
            folder("group-s5", "datastore", "DATASTORE", Some("datacenter-2")),
            folder("group-n6", "network", "NETWORK", Some("datacenter-2")),
            folder("group-v20", "prod", "VIRTUAL_MACHINE", Some("group-v3")),
        ],
        cluster: cluster.clone(),
        host: host.clone(),
        datastore: ds.clone(),
        vm_folder: "group-v3".into(),
        clusters: vec![cluster],
        hosts: vec![host],
        datastores: vec![ds],
        resource_pools: vec![PoolInfo {
            id: "resgroup-8".into(),
            name: "Resources".into(),
            cluster: "domain-c7".into(),
            parent: None,
            memory_limit_mib: None,
            cpu_limit_cores: None,
        }],
    };
    let vms = (0..n)
        .map(|i| {
            let f = if i % 2 == 0 { "group-v3" } else { "group-v20" };
            vm(&format!("vm-{}", 100 + i), &format!("vm{i:03}"), f)
        })
        .collect();
    let networks = vec![NetworkInfo {
        id: "network-11".into(),
        name: "VM Network".into(),
    }];
    let space = HashMap::from([("datastore-10".to_owned(), (1u64 << 30, 10u64 << 30))]);
    Snapshot::new(d, vms, networks, space, extra)
}

fn ts(name: &str, kind: &str, path: &str, select: &[&str]) -> Selection {
    Selection::Traversal(TraversalSpec {
        name: Some(name.into()),
        kind: kind.into(),
        path: path.into(),
        skip: false,
        select_set: select.iter().map(|s| Selection::Named((*s).into())).collect(),
    })
}

fn spec(root: MoRef, skip: bool, select_set: Vec<Selection>, kind: &str, paths: &[&str]) -> FilterSpec {
    FilterSpec {
        prop_set: vec![PropertySpec {
            kind: kind.into(),
            all: false,
            path_set: paths.iter().map(|p| (*p).to_owned()).collect(),
        }],
        object_set: vec![ObjectSpec {
            obj: root,
            skip,
            select_set,
        }],
    }
}

fn ids(objs: &[MoRef]) -> Vec<&str> {
    objs.iter().map(|o| o.value.as_str()).collect()
}

/// The classic walk: folders into their children, the datacenter into its folders.
fn walk() -> Vec<Selection> {
    vec![
        ts("folder", "Folder", "childEntity", &["folder", "dcVm", "dcHost"]),
        ts("dcVm", "Datacenter", "vmFolder", &["folder"]),
        ts("dcHost", "Datacenter", "hostFolder", &["folder"]),
    ]
}

#[test]
fn traversal_reaches_the_tree_and_skip_leaves_objects_out() {
    let snap = snapshot(4, HashMap::new());
    let root = snap.root_folder();
    let all = collector::select(&snap, &spec(root.clone(), false, walk(), "ManagedEntity", &["name"])).unwrap();
    let got = ids(&all);
    assert_eq!(got[0], "group-d1");
    for want in [
        "datacenter-2",
        "group-v3",
        "group-v20",
        "group-h4",
        "domain-c7",
        "vm-100",
        "vm-101",
        "vm-103",
    ] {
        assert!(got.contains(&want), "{want} in {got:?}");
    }
    // Not walked into: the datastore and network folders, the cluster's hosts.
    for not in ["group-s5", "datastore-10", "host-9"] {
        assert!(!got.contains(&not), "{not} in {got:?}");
    }
    // Each object once, even though two paths could lead to it.
    let mut dedup = got.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), got.len());

    let skipped = collector::select(&snap, &spec(root, true, walk(), "ManagedEntity", &["name"])).unwrap();
    assert!(!ids(&skipped).contains(&"group-d1"));
    assert_eq!(skipped.len(), all.len() - 1);

    // A skipping traversal spec leaves out what it reaches but walks on from it.
    let mut steps = walk();
    if let Selection::Traversal(t) = &mut steps[1] {
        t.skip = true;
    }
    let got = collector::select(
        &snap,
        &spec(snap.root_folder(), false, steps, "ManagedEntity", &["name"]),
    )
    .unwrap();
    assert!(
        !ids(&got).contains(&"group-v3") && ids(&got).contains(&"vm-100"),
        "{:?}",
        ids(&got)
    );
}

#[test]
fn a_looping_spec_ends_and_an_unknown_name_is_a_fault() {
    let snap = snapshot(2, HashMap::new());
    // parent and childEntity into each other: every (object, spec) pair is visited once.
    let select = vec![
        ts("up", "ManagedEntity", "parent", &["up", "down"]),
        ts("down", "Folder", "childEntity", &["up", "down"]),
    ];
    let vm = MoRef::new("VirtualMachine", "vm-100");
    let got = collector::select(&snap, &spec(vm, false, select, "ManagedEntity", &["name"])).unwrap();
    assert!(
        ids(&got).contains(&"group-d1") && ids(&got).contains(&"vm-101"),
        "{:?}",
        ids(&got)
    );

    let bad = vec![ts("x", "Folder", "childEntity", &["nowhere"])];
    let fault = collector::select(&snap, &spec(snap.root_folder(), false, bad, "Folder", &["name"])).unwrap_err();
    assert_eq!(fault.kind, "InvalidArgument");
    let fault = collector::select(
        &snap,
        &spec(
            MoRef::new("VirtualMachine", "vm-999"),
            false,
            vec![],
            "VirtualMachine",
            &["name"],
        ),
    )
    .unwrap_err();
    assert_eq!(fault.kind, "ManagedObjectNotFound");
}

#[test]
fn path_sets_answer_nested_properties_and_refuse_unknown_ones() {
    let snap = snapshot(1, HashMap::new());
    let vm = MoRef::new("VirtualMachine", "vm-100");
    let s = spec(
        vm.clone(),
        false,
        vec![],
        "VirtualMachine",
        &[
            "name",
            "runtime.powerState",
            "config.hardware.device",
            "summary.config.numCpu",
            "config.cpuAllocation.limit",
        ],
    );
    let plan = collector::plan(&snap, &s).unwrap();
    let content = collector::contents(&snap, &plan[0].0, &plan[0].1).unwrap();
    let prop = |n: &str| content.props.iter().find(|(p, _)| p == n).map(|(_, v)| v.clone());
    assert_eq!(prop("name"), Some(Value::str("vm000")));
    assert_eq!(
        prop("runtime.powerState"),
        Some(Value::Enum("VirtualMachinePowerState", "poweredOff".into()))
    );
    assert_eq!(prop("summary.config.numCpu"), Some(Value::Int(2)));
    // A field vim25 has but this endpoint does not set is left out, not a fault.
    assert_eq!(prop("config.cpuAllocation.limit"), None);
    let Some(Value::Array("VirtualDevice", devices)) = prop("config.hardware.device") else {
        panic!("devices: {:?}", prop("config.hardware.device"));
    };
    let types: Vec<&str> = devices
        .iter()
        .map(|d| match d {
            Value::Data(t, _) => *t,
            _ => "?",
        })
        .collect();
    assert_eq!(types, ["VirtualLsiLogicController", "VirtualDisk", "VirtualVmxnet3"]);
    let disk = &devices[1];
    assert_eq!(disk.field("controllerKey"), devices[0].field("key"));
    assert_eq!(
        disk.field("backing").and_then(|b| b.field("fileName")),
        Some(&Value::str("[cloud-ds1] vm000/vm000.vmdk"))
    );
    assert_eq!(devices[2].field("macAddress"), Some(&Value::str("00:50:56:00:00:01")));

    // A path vim25 does not have is refused whole, at any step, with the path as its name.
    for path in [
        "noSuchProperty",
        "config.hardwre.device",
        "summary.confg.name",
        "config.hardware.device.key",
        "name.length",
        "runtime.powerState.x",
    ] {
        let bad = spec(vm.clone(), false, vec![], "VirtualMachine", &["name", path]);
        let fault = collector::plan(&snap, &bad).unwrap_err();
        assert_eq!(fault.kind, "InvalidProperty", "{path}");
        assert_eq!(fault.fields, [("name", Value::str(path))], "{path}");
        assert!(fault.message.contains(path), "{}", fault.message);
    }
    let fault = snap
        .get(&MoRef::new("HostSystem", "host-9"), "hardware.systemInfo.uuidd")
        .unwrap_err();
    assert!(
        fault
            .message
            .contains("HostSystem.hardware.systemInfo is a HostSystemInfo, which has no field \"uuidd\""),
        "{}",
        fault.message
    );
    // A PropertySpec of another type leaves the object out.
    let other = spec(
        MoRef::new("VirtualMachine", "vm-100"),
        false,
        vec![],
        "HostSystem",
        &["name"],
    );
    assert!(collector::plan(&snap, &other).unwrap().is_empty());
}

#[test]
fn a_container_view_pages_through_every_vm() {
    let views = HashMap::from([(
        "view-1".to_owned(),
        View {
            container: MoRef::new("Folder", "group-d1"),
            types: vec!["VirtualMachine".into()],
            recursive: true,
        },
    )]);
    let snap = snapshot(25, views);
    assert_eq!(snap.view_contents("view-1").len(), 25, "subfolders included");
    let s = spec(
        MoRef::new("ContainerView", "view-1"),
        true,
        vec![Selection::Traversal(TraversalSpec {
            name: None,
            kind: "ContainerView".into(),
            path: "view".into(),
            skip: false,
            select_set: vec![],
        })],
        "VirtualMachine",
        &["name"],
    );
    let plan = collector::plan(&snap, &s).unwrap();
    assert_eq!(plan.len(), 25);
    let pages: Vec<usize> = plan.chunks(10).map(<[_]>::len).collect();
    assert_eq!(pages, [10, 10, 5]);

    // Not recursive: only the VM folder's own VMs (the even ones) and no subfolder's.
    let views = HashMap::from([(
        "view-2".to_owned(),
        View {
            container: MoRef::new("Folder", "group-v3"),
            types: vec![],
            recursive: false,
        },
    )]);
    let snap = snapshot(6, views);
    assert_eq!(
        ids(&snap.view_contents("view-2")),
        ["group-v20", "vm-100", "vm-102", "vm-104"]
    );
}

#[test]
fn search_index_finds_by_path_uuid_and_child() {
    let snap = snapshot(3, HashMap::new());
    assert_eq!(
        snap.find_by_inventory_path("cloud-dc/vm/prod/vm001").map(|r| r.value),
        Some("vm-101".to_owned())
    );
    assert_eq!(snap.find_by_inventory_path("cloud-dc/vm/nope"), None);
    assert_eq!(
        ids(&snap.find_all_by_uuid("5003A1B2-0000-4000-8000-000000000102", true, true)),
        ["vm-102"]
    );
    assert_eq!(
        ids(&snap.find_all_by_uuid("564d1234-5678-9abc-def0-123456789abc", true, false)),
        ["vm-100", "vm-101", "vm-102"],
        "every VM with that BIOS uuid (the test's VMs are clones)"
    );
    // A host by its hardware uuid, which its properties show.
    let host = MoRef::new("HostSystem", "host-9");
    let Some(Value::Str(uuid)) = snap.get(&host, "hardware.systemInfo.uuid").unwrap() else {
        panic!("a host has a uuid");
    };
    assert_eq!(
        snap.get(&host, "summary.hardware.uuid").unwrap(),
        Some(Value::Str(uuid.clone()))
    );
    assert_eq!(
        ids(&snap.find_all_by_uuid(&uuid.to_uppercase(), false, false)),
        ["host-9"]
    );
    assert!(
        snap.find_all_by_uuid(&uuid, true, false).is_empty(),
        "no VM has a host's uuid"
    );
    assert!(snap
        .find_all_by_uuid("564d1234-5678-9abc-def0-123456789abc", false, false)
        .is_empty());
    assert_eq!(
        snap.find_child(&MoRef::new("Datacenter", "datacenter-2"), "host")
            .map(|r| r.value),
        Some("group-h4".to_owned())
    );
}

#[test]
fn a_filter_spec_is_read_as_pyvmomi_sends_it() {
    let body = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vim25="urn:vim25"><soapenv:Body><RetrievePropertiesEx xmlns="urn:vim25"><_this type="PropertyCollector">propertyCollector</_this><specSet><propSet><type>VirtualMachine</type><all>false</all><pathSet>name</pathSet><pathSet>runtime.powerState</pathSet></propSet><objectSet><obj type="Folder">group-d1</obj><skip>true</skip><selectSet xsi:type="vim25:TraversalSpec"><name>folder</name><type>Folder</type><path>childEntity</path><skip>false</skip><selectSet><name>folder</name></selectSet></selectSet></objectSet></specSet><options><maxObjects>5</maxObjects></options></RetrievePropertiesEx></soapenv:Body></soapenv:Envelope>"#;
    let call = parse_call(body.as_bytes()).unwrap();
    let spec = collector::parse_filter_spec(call.body.child("specSet").unwrap()).unwrap();
    assert_eq!(spec.prop_set[0].path_set, ["name", "runtime.powerState"]);
    assert!(spec.object_set[0].skip);
    let Selection::Traversal(t) = &spec.object_set[0].select_set[0] else {
        panic!("a traversal spec");
    };
    assert_eq!((t.kind.as_str(), t.path.as_str()), ("Folder", "childEntity"));
    assert_eq!(t.select_set, [Selection::Named("folder".into())]);

    let missing = r#"<Envelope><Body><RetrieveProperties><specSet><propSet><type>NoSuchType</type></propSet><objectSet><obj type="Folder">group-d1</obj></objectSet></specSet></RetrieveProperties></Body></Envelope>"#;
    let call = parse_call(missing.as_bytes()).unwrap();
    let fault = collector::parse_filter_spec(call.body.child("specSet").unwrap()).unwrap_err();
    assert_eq!(fault.kind, "InvalidArgument");
    assert!(fault
        .to_xml()
        .contains("<InvalidArgumentFault xmlns=\"urn:vim25\" xsi:type=\"InvalidArgument\">"));
}

/// A migration's task and a power task, as the snapshot of a call holds them.
fn tasks() -> Vec<TaskRecord> {
    let table = TaskTable::default();
    let id = table.start(
        "VirtualMachine.powerOn",
        MoRef::new("VirtualMachine", "vm-100"),
        "vm000".into(),
        "migrator@cloud.local",
    );
    table.finish(&id, Ok(()));
    let mut all = table.all();
    let migration = MigrationRecord {
        id: "migration-1".into(),
        vm_name: "vm000".into(),
        user: "migrator@cloud.local".into(),
        edge: "edge-01".into(),
        state: "SUCCEEDED".into(),
        error: None,
        vm: Some("vm-100".into()),
        started: "2024-05-01T10:00:00Z".into(),
        finished: Some("2024-05-01T10:01:00Z".into()),
        logical_bytes: 1 << 30,
        has_receipt: true,
        dedup_bytes: 0,
        replica: None,
    };
    let dc = MoRef::new("Datacenter", "datacenter-2");
    all.push(TaskRecord::from_migration(&migration, None, (&dc, "cloud-dc")));
    all
}

#[test]
fn the_task_manager_lists_migrations_and_power_tasks() {
    let snap = snapshot_with(
        1,
        Extra {
            tasks: tasks(),
            ..Extra::default()
        },
    );
    let manager = MoRef::new("TaskManager", "TaskManager");
    assert_eq!(snap.kind_of("TaskManager"), Some("TaskManager"));
    let recent = snap.get(&manager, "recentTask").unwrap().unwrap();
    // Oldest first: the migration of 2024, then the power-on of now.
    assert_eq!(ids(&recent.morefs()), ["migration-1", "task-1"]);
    let task = MoRef::new("Task", "migration-1");
    assert_eq!(snap.kind_of("migration-1"), Some("Task"));
    assert_eq!(
        snap.get(&task, "info.state").unwrap(),
        Some(Value::Enum("TaskInfoState", "success".into()))
    );
    assert_eq!(
        snap.get(&task, "info.entity").unwrap(),
        Some(Value::Ref(MoRef::new("VirtualMachine", "vm-100")))
    );
    assert_eq!(snap.get(&task, "info.error").unwrap(), None, "unset, not refused");
    assert_eq!(snap.get(&task, "info.stat").unwrap_err().kind, "InvalidProperty");
    let Some(content) = snap
        .get(&MoRef::new("ServiceInstance", "ServiceInstance"), "content.taskManager")
        .unwrap()
    else {
        panic!("the service content names the task manager");
    };
    assert_eq!(content, Value::Ref(manager.clone()));
    assert_eq!(snap.get(&manager, "maxCollector").unwrap(), Some(Value::Int(0)));
}

/// Every field the endpoint writes into a data object of a type a path can reach is a
/// field vim25 has: a misspelled field here would be a value no client can read.
#[test]
fn every_field_answered_is_a_vim25_field() {
    fn check(v: &Value, at: &str) {
        match v {
            Value::Data(ty, fields) => {
                let known = super::schema::DATA_TYPES.iter().find(|(name, _)| name == ty);
                for (field, value) in fields {
                    if let Some((_, vim)) = known {
                        assert!(vim.iter().any(|(f, _)| f == field), "{at}: {ty} has no field {field}");
                    }
                    check(value, &format!("{at}.{field}"));
                }
            }
            Value::Array(_, items) => items.iter().for_each(|i| check(i, at)),
            _ => {}
        }
    }
    let snap = snapshot_with(
        1,
        Extra {
            tasks: tasks(),
            session: None,
            instance_uuid: "52c3c1b4-2d4c-4a53-9f21-0e6f7f6c2b10".into(),
            views: HashMap::from([(
                "view-1".to_owned(),
                View {
                    container: MoRef::new("Folder", "group-d1"),
                    types: vec![],
                    recursive: true,
                },
            )]),
        },
    );
    let mut objects = snap.view_contents("view-1");
    objects.extend([
        MoRef::new("Task", "migration-1"),
        MoRef::new("Task", "task-1"),
        MoRef::new("TaskManager", "TaskManager"),
        MoRef::new("ServiceInstance", "ServiceInstance"),
    ]);
    for obj in objects {
        for prop in super::model::properties(&obj.kind) {
            if let Some(v) = snap.get(&obj, prop).unwrap() {
                check(&v, &format!("{}:{}.{prop}", obj.kind, obj.value));
            }
        }
    }
}
