//! Placement choices over real QUIC and HTTPS on 127.0.0.1, with the real `edge-agent`
//! binary: an endpoint with a second host, two more datastores (each its own folder), a
//! second VM folder and a child resource pool. `edge-agent plan` lists every problem of a
//! bad placement at once; a VM then lands on the non-default host, folder, pool and
//! datastore with one disk on a third datastore; the disks compare identical, the files
//! sit on their datastores, the inventory and the REST API show the placement, and all of
//! it is intact after the endpoint restarts.

use std::path::{Path, PathBuf};
use std::process::Output;

use e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SESSION: &str = "vmware-api-session-id";

/// The endpoint's extra placement objects, as environment variables (figment's inline
/// syntax for lists of tables).
fn placement_env(root: &Path) -> Vec<(String, String)> {
    let ds = |name: &str, dir: &str| format!("{{name=\"{name}\",dir=\"{}\"}}", root.join(dir).display());
    vec![
        (
            "CLOUD_ENDPOINT_DOMAIN__EXTRA_HOSTS".into(),
            "[{name=\"esx-cloud-02.local\",cpu_cores=8,memory_mib=8192}]".into(),
        ),
        (
            "CLOUD_ENDPOINT_DOMAIN__EXTRA_DATASTORES".into(),
            format!("[{},{}]", ds("cloud-ds2", "ds2"), ds("cloud-ds3", "ds3")),
        ),
        ("CLOUD_ENDPOINT_DOMAIN__FOLDERS".into(), "[\"Imported\"]".into()),
        (
            "CLOUD_ENDPOINT_DOMAIN__RESOURCE_POOLS".into(),
            "[{name=\"migrations\",memory_limit_mib=4096}]".into(),
        ),
    ]
}

async fn start(root: &Path, pki: &Pki) -> Cloud {
    let env = placement_env(root);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Cloud::start(root, pki, &env).await
}

/// `edge-agent <command> --vmx ... <extra>` against `cloud`, as an operator would run it.
fn edge(bin: &Path, pki: &Pki, cloud: &Cloud, vmx: &Path, state: &Path, command: &str, extra: &[&str]) -> Output {
    edge_at(bin, pki, cloud.addr.port(), MIGRATOR, command)
        .arg("--vmx")
        .arg(vmx)
        .args(extra)
        .env("EDGE_AGENT_STATE_DIR", state)
        .output()
        .expect("edge-agent runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn https(pki: &Pki) -> reqwest::Client {
    e2e::rest::https_client(pki)
}

/// GET `path` with a fresh session: the JSON body of a 200.
async fn get(cloud: &Cloud, pki: &Pki, path: &str) -> Value {
    let http = https(pki);
    let base = format!("https://{}", cloud.api_addr.expect("API on"));
    let login = http
        .post(format!("{base}/api/session"))
        .basic_auth(MIGRATOR, Some(DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::CREATED);
    let token: String = login.json().await.unwrap();
    let r = http
        .request(Method::GET, format!("{base}{path}"))
        .header(SESSION, token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The ids of a list's items under `field`.
fn ids(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|i| i[field].as_str().unwrap().to_owned())
        .collect()
}

/// Entries of a datastore folder, `.staging` contents included.
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name == ".staging" {
            for s in std::fs::read_dir(dir.join(".staging")).unwrap() {
                out.push(format!(".staging/{}", s.unwrap().file_name().to_string_lossy()));
            }
        } else {
            out.push(name);
        }
    }
    out.sort();
    out
}

/// app01: a 4 MiB system disk (scsi0:0) and a 2 MiB data disk (scsi0:1), one NIC.
fn source_vm(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    use Fill::*;
    write_raw_disk(&dir.join("os.img"), MIB, &[Text, Random, Zero, Text], 11);
    write_raw_disk(&dir.join("data.img"), MIB, &[Random, Zero], 12);
    write_vmx(
        dir,
        "app01",
        &["os.img", "data.img"],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:00:01:01",
        }],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_lands_on_the_chosen_host_folder_pool_and_datastores() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let root = tmp.path().join("cloud");
    let cloud = start(&root, &pki).await;
    let vmx = source_vm(&tmp.path().join("src"));
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (ds1, ds2, ds3) = (root.join("datastore"), root.join("ds2"), root.join("ds3"));

    // Every problem of a bad placement at once, nothing staged or recorded.
    let bad = edge(
        &bin,
        &pki,
        &cloud,
        &vmx,
        &state,
        "plan",
        &[
            "--folder",
            "Nowhere",
            "--host",
            "esx-missing",
            "--resource-pool",
            "no-pool",
            "--datastore",
            "cloud-ds9",
            "--disk-datastore",
            "scsi0:1=cloud-ds8",
            "--disk-datastore",
            "scsi0:7=cloud-ds2",
        ],
    );
    let out = text(&bad);
    println!("{out}");
    assert!(!bad.status.success(), "{out}");
    assert!(out.contains("refused by the endpoint: 6 problem(s)"), "{out}");
    for needle in [
        "VM folder \"Nowhere\" (--folder) is not in the cloud domain; choose one of:",
        "host \"esx-missing\" (--host)",
        "resource pool \"no-pool\" (--resource-pool)",
        "datastore \"cloud-ds9\" (--datastore)",
        "datastore \"cloud-ds8\" (--disk-datastore scsi0:1)",
        "disk \"scsi0:7\", which the VM does not have",
        "Imported (group-v",
        "esx-cloud-02.local (host-",
        "migrations (resgroup-",
        "cloud-ds3 (datastore-",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    // The smaller host and the limited pool hold the VM's 2 vCPUs and 2048 MiB.
    let fits = edge(
        &bin,
        &pki,
        &cloud,
        &vmx,
        &state,
        "plan",
        &["--resource-pool", "migrations", "--host", "esx-cloud-02.local"],
    );
    assert!(fits.status.success(), "{}", text(&fits));

    let info = cloud.domain.inventory.domain().unwrap();
    let host2 = info
        .hosts
        .iter()
        .find(|h| h.name == "esx-cloud-02.local")
        .unwrap()
        .clone();
    let folder = info.folders.iter().find(|f| f.name == "Imported").unwrap().clone();
    let pool = info
        .resource_pools
        .iter()
        .find(|p| p.name == "migrations")
        .unwrap()
        .clone();
    let store = |name: &str| info.datastores.iter().find(|d| d.name == name).unwrap().clone();
    let (store2, store3) = (store("cloud-ds2"), store("cloud-ds3"));
    assert!(cloud.domain.inventory.list_migrations().unwrap().is_empty());
    for dir in [&ds1, &ds2, &ds3] {
        assert_eq!(
            entries(dir),
            Vec::<String>::new(),
            "nothing staged in {}",
            dir.display()
        );
    }

    // The good placement, by name and by id mixed.
    let placement = [
        "--folder",
        folder.id.as_str(),
        "--host",
        "esx-cloud-02.local",
        "--resource-pool",
        "migrations",
        "--datastore",
        "cloud-ds2",
        "--disk-datastore",
        "scsi0:1=cloud-ds3",
    ];
    let good = edge(&bin, &pki, &cloud, &vmx, &state, "plan", &placement);
    let out = text(&good);
    println!("{out}");
    assert!(good.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "placement: folder Imported ({}), cluster Cloud-Cluster ({}), host esx-cloud-02.local ({}), resource pool migrations ({}), datastore cloud-ds2 ({})",
            folder.id, info.cluster.id, host2.id, pool.id, store2.id
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "disk scsi0:1: 2097152 bytes on datastore cloud-ds3 ({})",
            store3.id
        )),
        "{out}"
    );

    let mut args = placement.to_vec();
    let receipt = state.join("receipt.json");
    args.extend(["--receipt", receipt.to_str().unwrap()]);
    let lift = edge(&bin, &pki, &cloud, &vmx, &state, "migrate", &args);
    let out = text(&lift);
    println!("{out}");
    assert!(lift.status.success(), "{out}");

    let src = tmp.path().join("src");
    let check_landed = |phase: &str| {
        // The home folder with the .vmx and disk 0 on cloud-ds2, disk 1 in a folder of the
        // VM's name on cloud-ds3, nothing on the default datastore, no staging anywhere.
        assert_eq!(entries(&ds1), Vec::<String>::new(), "{phase}");
        assert_eq!(entries(&ds2), ["app01"], "{phase}");
        assert_eq!(entries(&ds3), ["app01"], "{phase}");
        assert_eq!(
            entries(&ds2.join("app01")),
            ["app01-flat.vmdk", "app01.vmdk", "app01.vmx"],
            "{phase}"
        );
        assert_eq!(
            entries(&ds3.join("app01")),
            ["app01_1-flat.vmdk", "app01_1.vmdk"],
            "{phase}"
        );
        assert!(
            images_identical(&src.join("os.img"), &ds2.join("app01/app01.vmdk")),
            "{phase}"
        );
        assert!(
            images_identical(&src.join("data.img"), &ds3.join("app01/app01_1.vmdk")),
            "{phase}"
        );
        // The .vmx names the disk on the other datastore by its absolute path.
        let vmx_out = std::fs::read_to_string(ds2.join("app01/app01.vmx")).unwrap();
        let disk1 = std::path::absolute(ds3.join("app01/app01_1.vmdk")).unwrap();
        assert!(vmx_out.contains("scsi0:0.fileName = \"app01.vmdk\""), "{vmx_out}");
        assert!(
            vmx_out.contains(&format!("scsi0:1.fileName = \"{}\"", disk1.display())),
            "{vmx_out}"
        );
    };
    check_landed("after the lift");

    let check_inventory = |cloud: &Cloud| {
        let vm = cloud.domain.inventory.vm_by_name("app01").unwrap().expect("registered");
        assert_eq!(
            (&vm.host, &vm.folder, &vm.datastore, &vm.resource_pool),
            (&host2.id, &folder.id, &store2.id, &pool.id)
        );
        assert_eq!(vm.vmx_path, "[cloud-ds2] app01/app01.vmx");
        let disks: Vec<(&str, &str)> = vm
            .disks
            .iter()
            .map(|d| (d.path.as_str(), d.datastore.as_str()))
            .collect();
        assert_eq!(
            disks,
            [
                ("[cloud-ds2] app01/app01.vmdk", store2.id.as_str()),
                ("[cloud-ds3] app01/app01_1.vmdk", store3.id.as_str())
            ]
        );
        vm.id
    };
    let vm_id = check_inventory(&cloud);

    let placed = Placed {
        vm_id: vm_id.clone(),
        info: info.clone(),
        host2: host2.clone(),
        folder: folder.clone(),
        pool: pool.clone(),
        store2: store2.clone(),
        store3: store3.clone(),
    };
    check_rest(&cloud, &pki, &placed).await;

    // The name is taken on every datastore: a second lift is refused and stages nothing.
    let again = edge(&bin, &pki, &cloud, &vmx, &state, "plan", &["--datastore", "cloud-ds3"]);
    let out = text(&again);
    assert!(
        !again.status.success() && out.contains("unique across all folders"),
        "{out}"
    );

    // A restart keeps every object once, the VM, its files and its placement.
    cloud.stop().await;
    let cloud = start(&root, &pki).await;
    let after = cloud.domain.inventory.domain().unwrap();
    assert_eq!(
        (after.hosts.len(), after.datastores.len(), after.resource_pools.len()),
        (2, 3, 2)
    );
    assert_eq!(after.folders.iter().filter(|f| f.name == "Imported").count(), 1);
    check_landed("after a restart");
    assert_eq!(check_inventory(&cloud), vm_id);
    check_rest(&cloud, &pki, &placed).await;
    cloud.stop().await;
}

/// The objects a lift was placed on, for the REST checks.
struct Placed {
    vm_id: String,
    info: cloud_endpoint::inventory::DomainInfo,
    host2: cloud_endpoint::inventory::HostInfo,
    folder: cloud_endpoint::inventory::FolderInfo,
    pool: cloud_endpoint::inventory::PoolInfo,
    store2: cloud_endpoint::inventory::DatastoreInfo,
    store3: cloud_endpoint::inventory::DatastoreInfo,
}

/// The REST API shows the placement: VM list filters, host, datastore, folder and
/// resource-pool lists, the disks' backings and the migration report.
async fn check_rest(cloud: &Cloud, pki: &Pki, p: &Placed) {
    let Placed {
        vm_id,
        info,
        host2,
        folder,
        pool,
        store2,
        store3,
    } = p;
    for filter in [
        format!("hosts={}", host2.id),
        format!("folders={}", folder.id),
        format!("resource_pools={}", pool.id),
        format!("clusters={}", info.cluster.id),
    ] {
        let list = get(cloud, pki, &format!("/api/vcenter/vm?{filter}")).await;
        assert_eq!(ids(&list, "vm"), [vm_id.as_str()], "{filter}");
    }
    for filter in [
        format!("hosts={}", info.host.id),
        format!("folders={}", info.vm_folder),
        format!("resource_pools={}", pool.parent.as_deref().unwrap()),
    ] {
        let list = get(cloud, pki, &format!("/api/vcenter/vm?{filter}")).await;
        assert_eq!(ids(&list, "vm"), Vec::<String>::new(), "{filter}");
    }
    let hosts = get(cloud, pki, &format!("/api/vcenter/host?clusters={}", info.cluster.id)).await;
    assert_eq!(ids(&hosts, "host"), [info.host.id.clone(), host2.id.clone()]);
    let stores = get(cloud, pki, "/api/vcenter/datastore").await;
    assert_eq!(
        ids(&stores, "datastore"),
        [info.datastore.id.clone(), store2.id.clone(), store3.id.clone()]
    );
    let one = get(cloud, pki, &format!("/api/vcenter/datastore?names={}", store3.name)).await;
    assert_eq!(ids(&one, "datastore"), [store3.id.as_str()]);
    let folders = get(cloud, pki, "/api/vcenter/folder?type=VIRTUAL_MACHINE&names=Imported").await;
    assert_eq!(ids(&folders, "folder"), [folder.id.as_str()]);
    let pools = get(cloud, pki, "/api/vcenter/resource-pool").await;
    assert_eq!(
        ids(&pools, "resource_pool"),
        [pool.parent.clone().unwrap(), pool.id.clone()]
    );
    let root = get(
        cloud,
        pki,
        &format!("/api/vcenter/resource-pool/{}", pool.parent.as_deref().unwrap()),
    )
    .await;
    assert_eq!(root["name"], "Resources");
    assert_eq!(root["resource_pools"], serde_json::json!([pool.id]));
    let vm = get(cloud, pki, &format!("/api/vcenter/vm/{vm_id}")).await;
    let backings: Vec<&str> = vm["disks"]
        .as_object()
        .unwrap()
        .values()
        .map(|d| d["backing"]["vmdk_file"].as_str().unwrap())
        .collect();
    assert_eq!(
        backings,
        ["[cloud-ds2] app01/app01.vmdk", "[cloud-ds3] app01/app01_1.vmdk"]
    );
    let migrations = cloud.domain.inventory.list_migrations().unwrap();
    let report = get(
        cloud,
        pki,
        &format!("/api/gateway/migrations/{}/report", migrations[0].id),
    )
    .await;
    assert_eq!(
        (
            &report["host_name"],
            &report["folder_name"],
            &report["resource_pool_name"],
            &report["datastore_name"]
        ),
        (
            &Value::from("esx-cloud-02.local"),
            &Value::from("Imported"),
            &Value::from("migrations"),
            &Value::from("cloud-ds2")
        )
    );
    assert_eq!(report["disks"][1]["datastore_name"], "cloud-ds3");
    assert_eq!(report["disks"][1]["path"], "[cloud-ds3] app01/app01_1.vmdk");
}
