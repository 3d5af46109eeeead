//! The vSphere REST API at /api over real HTTPS on 127.0.0.1: an in-process cloud
//! endpoint, reqwest with rustls (ring) trusting the test CA, logins with the demo users,
//! and VMs that arrived by real migrations.

use std::sync::Arc;

use e2e::*;
use edge_agent::migrate::MigrateOptions;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};

const SESSION: &str = "vmware-api-session-id";
const MIB: usize = 1 << 20;

/// An HTTPS client that trusts only the test CA; `alpn` picks HTTP/2 or HTTP/1.1.
fn client(pki: &Pki, alpn: &[&[u8]]) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Client::builder().tls_backend_preconfigured(tls).build().unwrap()
}

struct Api {
    http: Client,
    base: String,
}

impl Api {
    fn new(cloud: &Cloud, pki: &Pki) -> Api {
        Api {
            http: client(pki, &[b"h2", b"http/1.1"]),
            base: format!("https://{}", cloud.api_addr.expect("API on")),
        }
    }

    async fn login(&self, user: &str, password: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/session", self.base))
            .basic_auth(user, Some(password))
            .send()
            .await
            .unwrap()
    }

    async fn token(&self, user: &str) -> String {
        let r = self.login(user, DEMO_PASSWORD).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        r.json::<String>().await.unwrap()
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.header(SESSION, token);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"))
        };
        (status, body)
    }

    async fn get(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }
}

/// Asserts a vSphere error body of `error_type` with `status`.
fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, error_type: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error_type"], error_type, "{body}");
    let messages = body["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "{body}");
    assert_eq!(
        messages[0]["id"],
        format!("com.vmware.vapi.std.errors.{}", error_type.to_ascii_lowercase()),
        "{body}"
    );
    assert!(!messages[0]["default_message"].as_str().unwrap().is_empty());
    assert_eq!(messages[0]["args"], json!([]));
}

fn ids(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|item| item[field].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_log_in_show_and_log_out() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let api = Api::new(&cloud, &pki);

    let token = api.token(MIGRATOR).await;
    assert!(
        token.len() >= 32 && token.chars().all(|c| c.is_ascii_hexdigit()),
        "{token}"
    );
    let other = api.token(MIGRATOR).await;
    assert_ne!(token, other, "every login gets its own session");

    let info = api.get("/api/session", &token).await;
    assert_eq!(info["user"], MIGRATOR);
    let created = info["created_time"].as_str().unwrap();
    let accessed = info["last_accessed_time"].as_str().unwrap();
    for t in [created, accessed] {
        assert!(t.ends_with('Z') && t.len() == "2024-05-01T10:00:00.123Z".len(), "{t}");
    }
    assert!(accessed >= created);

    // Over HTTP/1.1 too, with the same session.
    let h1 = Api {
        http: client(&pki, &[b"http/1.1"]),
        base: api.base.clone(),
    };
    assert_eq!(h1.get("/api/session", &token).await["user"], MIGRATOR);

    // Nothing but the login answers without a session.
    for (method, path) in [
        (Method::GET, "/api/session"),
        (Method::DELETE, "/api/session"),
        (Method::GET, "/api/vcenter/vm"),
        (Method::GET, "/api/vcenter/vm/vm-1"),
        (Method::GET, "/api/gateway/migrations"),
        (Method::GET, "/api/no/such/thing"),
    ] {
        let (status, body) = api.call(method.clone(), path, None).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
        let (status, body) = api.call(method, path, Some("0123456789abcdef0123456789abcdef")).await;
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    }

    // Logging out ends only that session.
    let (status, body) = api.call(Method::DELETE, "/api/session", Some(&token)).await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, body) = api.call(Method::GET, "/api/vcenter/datacenter", Some(&token)).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    let (status, body) = api.call(Method::DELETE, "/api/session", Some(&token)).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    assert_eq!(api.get("/api/session", &other).await["user"], MIGRATOR);

    // Bad credentials, unknown users and missing ones look the same.
    for (user, password) in [
        (MIGRATOR, "wrong"),
        ("nobody@cloud.local", DEMO_PASSWORD),
        (MIGRATOR, ""),
    ] {
        let r = api.login(user, password).await;
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_error(status, &body, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
        assert!(!body.to_string().contains("argon2"), "{body}");
    }
    let r = api.http.post(format!("{}/api/session", api.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A ReadOnly user may read.
    let auditor = api.token(AUDITOR).await;
    assert_eq!(api.get("/api/session", &auditor).await["user"], AUDITOR);
    assert_eq!(ids(&api.get("/api/vcenter/host", &auditor).await, "host").len(), 1);
    cloud.stop().await;
}

/// `/healthz` and `/readyz` answer without a session; `/readyz` says which check fails
/// (here a datastore folder that is gone) and is ready again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_without_a_session_and_say_what_is_not_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let root = tmp.path().join("cloud");
    let cloud = Cloud::start(&root, &pki, &[]).await;
    let api = Api::new(&cloud, &pki);
    let (status, body) = api.call(Method::GET, "/healthz", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "alive"})));
    let (status, body) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ready"})));

    let ds = cloud.domain.datastore.root().to_owned();
    let aside = tmp.path().join("datastore-aside");
    std::fs::rename(&ds, &aside).unwrap();
    let (status, body) = api.call(Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not ready");
    assert_eq!(body["not_ready"][0]["check"], "datastore", "{body}");
    // The liveness probe does not depend on the datastore: a restart would not help.
    assert_eq!(api.call(Method::GET, "/healthz", None).await.0, StatusCode::OK);
    std::fs::rename(&aside, &ds).unwrap();
    assert_eq!(api.call(Method::GET, "/readyz", None).await.0, StatusCode::OK);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_gets_show_the_cloud_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_DOMAIN__DATASTORE__CAPACITY_BYTES", "1099511627776")],
    )
    .await;
    let api = Api::new(&cloud, &pki);
    let t = api.token(AUDITOR).await;
    let d = cloud.domain.inventory.domain().unwrap();

    let dcs = api.get("/api/vcenter/datacenter", &t).await;
    assert_eq!(dcs, json!([{"datacenter": d.datacenter.id, "name": "Cloud-DC"}]));
    let dc = api
        .get(&format!("/api/vcenter/datacenter/{}", d.datacenter.id), &t)
        .await;
    assert_eq!(
        dc,
        json!({"name": "Cloud-DC", "datastore_folder": d.datacenter.datastore_folder,
               "host_folder": d.datacenter.host_folder, "network_folder": d.datacenter.network_folder,
               "vm_folder": d.datacenter.vm_folder})
    );
    assert!(d.datacenter.id.starts_with("datacenter-"));

    let clusters = api.get("/api/vcenter/cluster", &t).await;
    assert_eq!(
        clusters,
        json!([{"cluster": d.cluster.id, "name": "Cloud-Cluster", "ha_enabled": false, "drs_enabled": false}])
    );
    assert!(d.cluster.id.starts_with("domain-c"));
    assert_eq!(
        api.get(&format!("/api/vcenter/cluster/{}", d.cluster.id), &t).await["name"],
        "Cloud-Cluster"
    );

    let hosts = api.get("/api/vcenter/host", &t).await;
    assert_eq!(
        hosts,
        json!([{"host": d.host.id, "name": "esx-cloud-01.local", "connection_state": "CONNECTED", "power_state": "POWERED_ON"}])
    );
    let path = format!("/api/vcenter/host?clusters={}&names=esx-cloud-01.local", d.cluster.id);
    assert_eq!(ids(&api.get(&path, &t).await, "host"), [d.host.id.as_str()]);
    assert!(ids(&api.get("/api/vcenter/host?clusters=domain-c999", &t).await, "host").is_empty());

    let stores = api.get("/api/vcenter/datastore", &t).await;
    let ds = &stores[0];
    assert_eq!(stores.as_array().unwrap().len(), 1);
    assert_eq!(
        (&ds["datastore"], &ds["name"], &ds["type"]),
        (&json!(d.datastore.id), &json!("cloud-ds1"), &json!("VMFS"))
    );
    assert_eq!(ds["capacity"], 1u64 << 40);
    let free = ds["free_space"].as_u64().unwrap();
    assert!(free > 0 && free <= 1 << 40, "{free}");
    let info = api.get(&format!("/api/vcenter/datastore/{}", d.datastore.id), &t).await;
    assert_eq!(info["name"], "cloud-ds1");
    assert_eq!(info["accessible"], true);
    assert_eq!(info["thin_provisioning_supported"], true);
    assert_eq!(info["multiple_host_access"], false);
    assert!(info["free_space"].as_u64().unwrap() > 0);
    assert!(
        ids(
            &api.get("/api/vcenter/datastore?names=cloud-ds1&types=VMFS", &t).await,
            "datastore"
        )
        .len()
            == 1
    );
    assert!(ids(&api.get("/api/vcenter/datastore?types=NFS", &t).await, "datastore").is_empty());

    let nets = api.get("/api/vcenter/network", &t).await;
    let names: Vec<&str> = nets
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["VM Network", "cloud-web", "cloud-db"]);
    for n in nets.as_array().unwrap() {
        assert_eq!(n["type"], "STANDARD_PORTGROUP");
        assert!(n["network"].as_str().unwrap().starts_with("network-"));
    }
    let web = nets[1]["network"].as_str().unwrap();
    assert_eq!(
        api.get(&format!("/api/vcenter/network/{web}"), &t).await,
        json!({"name": "cloud-web", "type": "STANDARD_PORTGROUP"})
    );
    let path = "/api/vcenter/network?names=cloud-web&names=cloud-db";
    assert_eq!(ids(&api.get(path, &t).await, "network").len(), 2);

    let folders = api.get("/api/vcenter/folder", &t).await;
    assert_eq!(folders.as_array().unwrap().len(), d.folders.len());
    let vm_folders = api.get("/api/vcenter/folder?type=VIRTUAL_MACHINE", &t).await;
    assert_eq!(
        ids(&vm_folders, "folder"),
        [d.datacenter.vm_folder.clone(), d.vm_folder.clone()]
    );
    for f in vm_folders.as_array().unwrap() {
        assert_eq!(f["type"], "VIRTUAL_MACHINE");
        assert!(f["folder"].as_str().unwrap().starts_with("group-v"));
    }
    for (kind, id) in [
        ("DATACENTER", "group-d1"),
        ("HOST", d.datacenter.host_folder.as_str()),
        ("DATASTORE", d.datacenter.datastore_folder.as_str()),
        ("NETWORK", d.datacenter.network_folder.as_str()),
    ] {
        let list = api.get(&format!("/api/vcenter/folder?filter.type={kind}"), &t).await;
        assert_eq!(ids(&list, "folder"), [id], "{kind}");
    }
    assert_eq!(
        api.get(&format!("/api/vcenter/folder/{}", d.vm_folder), &t).await,
        json!({"name": "Migrated VMs", "type": "VIRTUAL_MACHINE"})
    );

    assert_eq!(api.get("/api/vcenter/vm", &t).await, json!([]));
    assert_eq!(api.get("/api/gateway/migrations", &t).await, json!([]));

    // 404: unknown ids of every kind, unknown paths.
    for path in [
        "/api/vcenter/vm/vm-999",
        "/api/vcenter/datacenter/datacenter-999",
        "/api/vcenter/cluster/domain-c999",
        "/api/vcenter/host/host-999",
        "/api/vcenter/datastore/datastore-999",
        "/api/vcenter/network/network-999",
        "/api/vcenter/folder/group-v999",
        "/api/gateway/migrations/migration-999",
        "/api/vcenter/no-such-service",
        "/api/nothing",
        "/",
    ] {
        let (status, body) = api.call(Method::GET, path, Some(&t)).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    // 400: bad filter values, unknown or misspelt filters.
    for path in [
        "/api/vcenter/vm?power_states=ON",
        "/api/vcenter/vm?name=web01",
        "/api/vcenter/folder?type=VM",
        "/api/vcenter/folder?type=HOST&type=NETWORK",
        "/api/vcenter/datastore?types=EXT4",
        "/api/vcenter/host?connection_states=UP",
    ] {
        let (status, body) = api.call(Method::GET, path, Some(&t)).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    }
    let (status, body) = api.call(Method::PUT, "/api/vcenter/vm", Some(&t)).await;
    assert_error(status, &body, StatusCode::METHOD_NOT_ALLOWED, "OPERATION_NOT_FOUND");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_vms_are_listed_filtered_and_shown_with_their_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    use Fill::*;
    write_raw_disk(&src.join("web01.img"), MIB, &[Text, Zero, Random, Zero], 1);
    write_raw_disk(&src.join("web01_data.img"), MIB, &[Zero, Text], 2);
    let web_vmx = write_vmx(
        &src,
        "web01",
        &["web01.img", "web01_data.img"],
        &[
            Nic {
                network: "VM Network",
                mac: "00:50:56:aa:bb:01",
            },
            Nic {
                network: "Prod-DMZ",
                mac: "00:50:56:aa:bb:02",
            },
        ],
    );
    write_raw_disk(&src.join("db01.img"), MIB, &[Text], 3);
    let db_vmx = write_vmx(
        &src,
        "db01",
        &["db01.img"],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:aa:bb:03",
        }],
    );
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let opts = MigrateOptions {
        network_map: vec![("Prod-DMZ".into(), "cloud-web".into())],
        ..MigrateOptions::default()
    };
    let web = migrate(&web_vmx, &target, &opts).await.expect("web01 migrates");
    let db = migrate(&db_vmx, &target, &opts).await.expect("db01 migrates");

    let api = Api::new(&cloud, &pki);
    let t = api.token(AUDITOR).await;
    let d = cloud.domain.inventory.domain().unwrap();
    let nets = cloud.domain.inventory.networks().unwrap();
    let net = |name: &str| nets.iter().find(|n| n.name == name).unwrap().id.clone();

    let all = api.get("/api/vcenter/vm", &t).await;
    assert_eq!(
        all,
        json!([
            {"vm": web.vm_id, "name": "web01", "power_state": "POWERED_OFF", "cpu_count": 2, "memory_size_MiB": 2048},
            {"vm": db.vm_id, "name": "db01", "power_state": "POWERED_OFF", "cpu_count": 2, "memory_size_MiB": 2048},
        ])
    );

    let both = vec![web.vm_id.clone(), db.vm_id.clone()];
    let only_web = vec![web.vm_id.clone()];
    let none: Vec<String> = Vec::new();
    for (query, want) in [
        ("names=web01".to_owned(), &only_web),
        ("names=web01&names=db01".to_owned(), &both),
        ("filter.names=web01".to_owned(), &only_web),
        ("names=nope".to_owned(), &none),
        (format!("vms={}", web.vm_id), &only_web),
        ("power_states=POWERED_OFF".to_owned(), &both),
        ("power_states=POWERED_ON&power_states=SUSPENDED".to_owned(), &none),
        (format!("hosts={}", d.host.id), &both),
        ("hosts=host-999".to_owned(), &none),
        (format!("folders={}", d.vm_folder), &both),
        (format!("folders={}", d.datacenter.vm_folder), &none),
        (format!("clusters={}", d.cluster.id), &both),
        (format!("datacenters={}", d.datacenter.id), &both),
        ("datacenters=datacenter-999".to_owned(), &none),
        (
            format!("names=db01&hosts={}&power_states=POWERED_OFF", d.host.id),
            &vec![db.vm_id.clone()],
        ),
        ("resource_pools=resgroup-1".to_owned(), &none),
    ] {
        let list = api.get(&format!("/api/vcenter/vm?{query}"), &t).await;
        assert_eq!(&ids(&list, "vm"), want, "?{query}");
    }

    let vm = api.get(&format!("/api/vcenter/vm/{}", web.vm_id), &t).await;
    assert_eq!(vm["name"], "web01");
    assert_eq!(vm["guest_OS"], "DEBIAN_12_64");
    assert_eq!(vm["power_state"], "POWERED_OFF");
    assert_eq!(vm["identity"]["name"], "web01");
    assert_eq!(vm["identity"]["bios_uuid"], "564d1234-5678-9abc-def0-123456789abc");
    let instance = vm["identity"]["instance_uuid"].as_str().unwrap();
    assert_eq!(instance.len(), 36, "{instance}");
    assert_eq!(
        vm["hardware"],
        json!({"version": "VMX_14", "upgrade_policy": "NEVER", "upgrade_status": "NONE"})
    );
    assert_eq!(vm["boot"]["type"], "EFI");
    assert_eq!(vm["cpu"]["count"], 2);
    assert_eq!(vm["cpu"]["cores_per_socket"], 1);
    assert_eq!(vm["memory"]["size_MiB"], 2048);
    assert_eq!(
        vm["disks"],
        json!({
            "2000": {"label": "Hard disk 1", "type": "SCSI", "capacity": 4 * MIB,
                     "backing": {"type": "VMDK_FILE", "vmdk_file": "[cloud-ds1] web01/web01.vmdk"},
                     "scsi": {"bus": 0, "unit": 0}},
            "2001": {"label": "Hard disk 2", "type": "SCSI", "capacity": 2 * MIB,
                     "backing": {"type": "VMDK_FILE", "vmdk_file": "[cloud-ds1] web01/web01_1.vmdk"},
                     "scsi": {"bus": 0, "unit": 1}},
        })
    );
    assert_eq!(vm["scsi_adapters"]["1000"]["scsi"], json!({"bus": 0, "unit": 7}));
    let nic = |label: &str, mac: &str, network: &str| {
        json!({"label": label, "type": "VMXNET3", "mac_type": "MANUAL", "mac_address": mac,
               "state": "NOT_CONNECTED", "start_connected": true, "allow_guest_control": true,
               "wake_on_lan_enabled": false,
               "backing": {"type": "STANDARD_PORTGROUP", "network": net(network), "network_name": network}})
    };
    assert_eq!(
        vm["nics"]["4000"],
        nic("Network adapter 1", "00:50:56:aa:bb:01", "VM Network")
    );
    assert_eq!(
        vm["nics"]["4001"],
        nic("Network adapter 2", "00:50:56:aa:bb:02", "cloud-web")
    );
    assert_eq!(vm["nics"].as_object().unwrap().len(), 2);
    for empty in [
        "cdroms",
        "floppies",
        "parallel_ports",
        "serial_ports",
        "sata_adapters",
        "nvme_adapters",
    ] {
        assert_eq!(vm[empty], json!({}), "{empty}");
    }
    assert_eq!(vm["boot_devices"], json!([]));

    // The gateway's own record of the migrations.
    let migrations = api.get("/api/gateway/migrations", &t).await;
    assert_eq!(ids(&migrations, "vm"), [web.vm_id.clone(), db.vm_id.clone()]);
    let first = &migrations[0];
    assert_eq!(
        (&first["state"], &first["vm_name"], &first["user"]),
        (&json!("SUCCEEDED"), &json!("web01"), &json!(MIGRATOR))
    );
    let id = first["id"].as_str().unwrap();
    assert_eq!(&api.get(&format!("/api/gateway/migrations/{id}"), &t).await, first);

    // The datastore's free space counts the migrated disks.
    let ds = api.get("/api/vcenter/datastore", &t).await;
    assert!(ds[0]["free_space"].as_u64().unwrap() < ds[0]["capacity"].as_u64().unwrap());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[("CLOUD_ENDPOINT_API_LISTEN", "off")]).await;
    assert_eq!(cloud.api_addr, None);
    cloud.stop().await;
}
