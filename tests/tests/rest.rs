//! What older vSphere clients and scripts call, over real HTTPS on 127.0.0.1 against an
//! in-process endpoint with VMs lifted by real migrations:
//! - the older REST API at `/rest` as Ansible's `vmware_rest` modules and `requests`
//!   scripts use it (login, lists with `filter.*`, VM gets, power), in its `{"value": ...}`
//!   envelope and its error shape;
//! - every hardware resource of a VM under `/api` (and `/rest`), the guest identity, the
//!   appliance version;
//! - user names in any case, through REST, vAPI and the edge's QUIC login.

use std::path::{Path, PathBuf};

use e2e::*;
use edge_agent::migrate::MigrateOptions;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use e2e::rest::{Rest, SESSION};
const MIB: usize = 1 << 20;
const ADMIN: &str = "administrator@cloud.local";

struct Api(Rest);

impl std::ops::Deref for Api {
    type Target = Rest;
    fn deref(&self) -> &Rest {
        &self.0
    }
}

impl Api {
    fn new(cloud: &Cloud, pki: &Pki) -> Api {
        Api(Rest::new(cloud, pki))
    }

    /// `request` sent; the status, the headers and the body as JSON (`null` when empty).
    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let r = request.send().await.unwrap();
        let (status, headers) = (r.status(), r.headers().clone());
        let text = r.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        (status, headers, body)
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.request(method, path);
        if let Some(token) = token {
            request = request.header(SESSION, token);
        }
        let (status, _, body) = self.send(request).await;
        (status, body)
    }

    async fn get(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, Some(token)).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    /// `GET /rest/...`: the value inside the older envelope, which holds nothing else.
    async fn rest_value(&self, path: &str, token: &str) -> Value {
        let body = self.get(path, token).await;
        let envelope = body.as_object().unwrap_or_else(|| panic!("{path}: {body}"));
        assert_eq!(envelope.len(), 1, "{path}: {body}");
        envelope["value"].clone()
    }

    /// An Ansible-style login: Basic credentials to the older API's session service.
    async fn rest_login(&self, user: &str, password: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let request = self
            .request(Method::POST, "/rest/com/vmware/cis/session")
            .basic_auth(user, Some(password));
        self.send(request).await
    }

    async fn api_login(&self, user: &str) -> (StatusCode, Value) {
        let request = self
            .request(Method::POST, "/api/session")
            .basic_auth(user, Some(DEMO_PASSWORD));
        let (status, _, body) = self.send(request).await;
        (status, body)
    }
}

/// Asserts the older API's error shape: `{"type": "com.vmware.vapi.std.errors.<kind>",
/// "value": {"messages": [{"id", "default_message", "args"}]}}`.
fn assert_older_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{body}");
    let id = format!("com.vmware.vapi.std.errors.{kind}");
    assert_eq!(body["type"], id, "{body}");
    let messages = body["value"]["messages"].as_array().unwrap_or_else(|| panic!("{body}"));
    assert_eq!(messages.len(), 1, "{body}");
    assert_eq!(messages[0]["id"], id, "{body}");
    assert!(!messages[0]["default_message"].as_str().unwrap().is_empty(), "{body}");
    assert_eq!(messages[0]["args"], json!([]));
}

/// Asserts `/api`'s error shape.
fn assert_error(status: StatusCode, body: &Value, want: StatusCode, error_type: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error_type"], error_type, "{body}");
    assert_eq!(
        body["messages"][0]["id"],
        format!("com.vmware.vapi.std.errors.{}", error_type.to_ascii_lowercase()),
        "{body}"
    );
}

/// A small VM's source (1 vCPU, 64 MiB, BIOS, so that the test host can power it on):
/// two disks (4 MiB and 2 MiB) and two NICs, the second mapped to `cloud-web`.
fn source_vm(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    use Fill::*;
    write_raw_disk(&dir.join(format!("{name}.img")), MIB, &[Text, Zero, Random, Zero], 1);
    write_raw_disk(&dir.join(format!("{name}_data.img")), MIB, &[Zero, Text], 2);
    let vmx = write_vmx(
        dir,
        name,
        &[&format!("{name}.img"), &format!("{name}_data.img")],
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
    small_enough_to_boot(&vmx);
    vmx
}

fn lift_options() -> MigrateOptions {
    MigrateOptions {
        network_map: vec![("Prod-DMZ".into(), "cloud-web".into())],
        ..MigrateOptions::default()
    }
}

/// A cloud (its folder in the returned temporary one) with web01 lifted into it by the
/// migrator: the cloud, web01's VM id and a client of its API.
async fn web01_lifted() -> (tempfile::TempDir, Cloud, String, Api) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = source_vm(&tmp.path().join("src"), "web01");
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let web = migrate(&vmx, &target, &lift_options()).await.expect("web01 migrates");
    let api = Api::new(&cloud, &pki);
    (tmp, cloud, web.vm_id, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ansible_style_client_logs_in_lists_powers_and_reads_through_rest() {
    require_qemu();
    let (_tmp, cloud, web, api) = web01_lifted().await;
    let vm = web.as_str();

    // Login: 200 and the session as {"value": ...}, also set as a cookie.
    let (status, headers, body) = api.rest_login(MIGRATOR, DEMO_PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["value"].as_str().unwrap_or_else(|| panic!("{body}")).to_owned();
    assert_eq!(token.len(), 32, "{token}");
    let cookie = headers[reqwest::header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.starts_with(&format!("{SESSION}={token};")), "{cookie}");
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/rest"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = api.rest_value("/rest/com/vmware/cis/session", &token).await;
    assert_eq!(session["user"], MIGRATOR);
    // The older read of the session, and the same session under /api.
    let (status, _, body) = api
        .send(
            api.request(Method::POST, "/rest/com/vmware/cis/session?~action=get")
                .header(SESSION, &token),
        )
        .await;
    assert_eq!((status, &body["value"]["user"]), (StatusCode::OK, &json!(MIGRATOR)));
    assert_eq!(api.get("/api/session", &token).await["user"], MIGRATOR);

    // The VM list finds the lifted VM with its power state, by the older filter names.
    let listed = json!([{"vm": vm, "name": "web01", "power_state": "POWERED_OFF",
                         "cpu_count": 1, "memory_size_MiB": 64}]);
    assert_eq!(api.rest_value("/rest/vcenter/vm", &token).await, listed);
    assert_eq!(
        api.rest_value("/rest/vcenter/vm?filter.names=web01", &token).await,
        listed
    );
    assert_eq!(
        api.rest_value(
            "/rest/vcenter/vm?filter.names.1=web01&filter.power_states.1=POWERED_OFF",
            &token
        )
        .await,
        listed
    );
    assert_eq!(
        api.rest_value("/rest/vcenter/vm?filter.power_states=POWERED_ON", &token)
            .await,
        json!([])
    );
    assert_eq!(
        api.rest_value("/rest/vcenter/vm?filter.names=db01", &token).await,
        json!([])
    );

    // Power: start, seen in the list and the power state; stop. 200 and no body.
    let (status, body) = api
        .call(
            Method::POST,
            &format!("/rest/vcenter/vm/{vm}/power/start"),
            Some(&token),
        )
        .await;
    assert_eq!((status, &body), (StatusCode::OK, &Value::Null), "{body}");
    let on = api
        .rest_value("/rest/vcenter/vm?filter.power_states=POWERED_ON", &token)
        .await;
    assert_eq!(on[0]["vm"], vm, "{on}");
    assert_eq!(
        api.rest_value(&format!("/rest/vcenter/vm/{vm}/power"), &token).await["state"],
        "POWERED_ON"
    );
    // Starting it again: vSphere's error kind, in the older shape.
    let (status, body) = api
        .call(
            Method::POST,
            &format!("/rest/vcenter/vm/{vm}/power/start"),
            Some(&token),
        )
        .await;
    assert_older_error(status, &body, StatusCode::BAD_REQUEST, "already_in_desired_state");
    let (status, body) = api
        .call(Method::POST, &format!("/rest/vcenter/vm/{vm}/power/stop"), Some(&token))
        .await;
    assert_eq!((status, &body), (StatusCode::OK, &Value::Null), "{body}");
    assert_eq!(
        api.rest_value(&format!("/rest/vcenter/vm/{vm}/power"), &token).await["state"],
        "POWERED_OFF"
    );

    // The VM's info: /api's, with maps as the older API's key/value lists.
    let info = api.rest_value(&format!("/rest/vcenter/vm/{vm}"), &token).await;
    let current = api.get(&format!("/api/vcenter/vm/{vm}"), &token).await;
    assert_eq!(info["name"], "web01");
    assert_eq!(info["cpu"], current["cpu"]);
    let disks = info["disks"].as_array().unwrap_or_else(|| panic!("{info}"));
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["key"], "2000");
    assert_eq!(disks[0]["value"], current["disks"]["2000"]);
    assert_eq!(
        disks[1]["value"]["backing"]["vmdk_file"],
        "[cloud-ds1] web01/web01_1.vmdk"
    );
    let nics = info["nics"].as_array().unwrap();
    assert_eq!(nics[1]["key"], "4001");
    assert_eq!(nics[1]["value"]["mac_address"], "00:50:56:aa:bb:02");
    assert_eq!(info["cdroms"], json!([]));

    // Every inventory list answers what /api does, in the envelope.
    for (rest, api_path) in [
        ("/rest/vcenter/datacenter", "/api/vcenter/datacenter"),
        ("/rest/vcenter/cluster", "/api/vcenter/cluster"),
        ("/rest/vcenter/host", "/api/vcenter/host"),
        ("/rest/vcenter/datastore", "/api/vcenter/datastore"),
        ("/rest/vcenter/network", "/api/vcenter/network"),
        ("/rest/vcenter/folder", "/api/vcenter/folder"),
        (
            "/rest/vcenter/folder?filter.type=VIRTUAL_MACHINE",
            "/api/vcenter/folder?type=VIRTUAL_MACHINE",
        ),
        ("/rest/vcenter/resource-pool", "/api/vcenter/resource-pool"),
        (
            "/rest/vcenter/network?filter.names=cloud-web",
            "/api/vcenter/network?names=cloud-web",
        ),
    ] {
        let older = api.rest_value(rest, &token).await;
        assert!(!older.as_array().unwrap().is_empty(), "{rest}: {older}");
        if !rest.contains("datastore") {
            // (A datastore's free space may move between two calls.)
            assert_eq!(older, api.get(api_path, &token).await, "{rest}");
        }
    }
    let d = cloud.domain.inventory.domain().unwrap();
    let dc = api
        .rest_value(&format!("/rest/vcenter/datacenter/{}", d.datacenter.id), &token)
        .await;
    assert_eq!(dc["vm_folder"], d.datacenter.vm_folder);
    assert_eq!(
        api.rest_value(&format!("/rest/vcenter/vm/{vm}/hardware/disk"), &token)
            .await,
        json!([{"disk": "2000"}, {"disk": "2001"}])
    );
    let version = api.rest_value("/rest/appliance/system/version", &token).await;
    assert!(version["version"].as_str().unwrap().starts_with("8.0"), "{version}");

    // A script that keeps the cookie and sends no header.
    let (status, _, body) = api
        .send(
            api.request(Method::GET, "/rest/vcenter/vm")
                .header(reqwest::header::COOKIE, format!("{SESSION}={token}")),
        )
        .await;
    assert_eq!(
        (status, &body["value"][0]["vm"]),
        (StatusCode::OK, &json!(vm)),
        "{body}"
    );

    // Errors in the older shape: unknown VM, unknown path, bad filter, wrong method.
    for path in [
        "/rest/vcenter/vm/vm-999".to_owned(),
        "/rest/vcenter/vm/vm-999/hardware/disk".to_owned(),
        format!("/rest/vcenter/vm/{vm}/hardware/disk/2099"),
        "/rest/vcenter/no-such-service".to_owned(),
        "/rest/gateway/migrations".to_owned(),
        "/rest".to_owned(),
    ] {
        let (status, body) = api.call(Method::GET, &path, Some(&token)).await;
        assert_older_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
    let (status, body) = api
        .call(Method::GET, "/rest/vcenter/vm?filter.power_states=ON", Some(&token))
        .await;
    assert_older_error(status, &body, StatusCode::BAD_REQUEST, "invalid_argument");
    let (status, body) = api
        .call(
            Method::POST,
            &format!("/rest/vcenter/vm/{vm}/power/suspend"),
            Some(&token),
        )
        .await;
    assert_older_error(status, &body, StatusCode::BAD_REQUEST, "invalid_argument");

    // A ReadOnly user reads but may not power on: UNAUTHORIZED in the older shape.
    let (_, _, body) = api.rest_login(AUDITOR, DEMO_PASSWORD).await;
    let auditor = body["value"].as_str().unwrap().to_owned();
    let (status, body) = api
        .call(
            Method::POST,
            &format!("/rest/vcenter/vm/{vm}/power/start"),
            Some(&auditor),
        )
        .await;
    assert_older_error(status, &body, StatusCode::FORBIDDEN, "unauthorized");

    // No session, a bad one, bad credentials: UNAUTHENTICATED in the older shape, even
    // for paths that do not exist.
    for path in [
        "/rest/vcenter/vm",
        "/rest/com/vmware/cis/session",
        "/rest/no/such/thing",
    ] {
        let (status, body) = api.call(Method::GET, path, None).await;
        assert_older_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
        let (status, body) = api
            .call(Method::GET, path, Some("0123456789abcdef0123456789abcdef"))
            .await;
        assert_older_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
    }
    let (status, _, body) = api.rest_login(MIGRATOR, "wrong").await;
    assert_older_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");

    // Logout: 200, the cookie cleared, the session gone under both APIs.
    let (status, headers, body) = api
        .send(
            api.request(Method::DELETE, "/rest/com/vmware/cis/session")
                .header(SESSION, &token),
        )
        .await;
    assert_eq!((status, &body), (StatusCode::OK, &Value::Null));
    assert!(headers[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let (status, body) = api.call(Method::GET, "/rest/vcenter/vm", Some(&token)).await;
    assert_older_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");
    let (status, body) = api.call(Method::GET, "/api/vcenter/vm", Some(&token)).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hardware_resource_of_a_lifted_vm_shows_its_devices() {
    let (_tmp, cloud, web, api) = web01_lifted().await;
    let vm = web.as_str();
    let (_, token) = api.api_login(AUDITOR).await;
    let t = token.as_str().unwrap();
    let nets = cloud.domain.inventory.networks().unwrap();
    let net = |name: &str| nets.iter().find(|n| n.name == name).unwrap().id.clone();
    let base = format!("/api/vcenter/vm/{vm}");
    let whole = api.get(&base, t).await;

    assert_eq!(
        api.get(&format!("{base}/hardware"), t).await,
        json!({"version": "VMX_14", "upgrade_policy": "NEVER", "upgrade_status": "NONE"})
    );
    assert_eq!(
        api.get(&format!("{base}/hardware/cpu"), t).await,
        json!({"count": 1, "cores_per_socket": 1, "hot_add_enabled": false, "hot_remove_enabled": false})
    );
    assert_eq!(
        api.get(&format!("{base}/hardware/memory"), t).await,
        json!({"size_MiB": 64, "hot_add_enabled": false})
    );
    let boot = api.get(&format!("{base}/hardware/boot"), t).await;
    assert_eq!(boot["type"], "BIOS");
    assert_eq!(boot, whole["boot"]);

    // Disks: their real capacity, and a backing file that is on the named datastore.
    assert_eq!(
        api.get(&format!("{base}/hardware/disk"), t).await,
        json!([{"disk": "2000"}, {"disk": "2001"}])
    );
    let datastores = api.get("/api/vcenter/datastore", t).await;
    for (key, file, capacity, unit) in [
        ("2000", "web01/web01.vmdk", 4 * MIB, 0),
        ("2001", "web01/web01_1.vmdk", 2 * MIB, 1),
    ] {
        let disk = api.get(&format!("{base}/hardware/disk/{key}"), t).await;
        assert_eq!(
            disk,
            json!({"label": format!("Hard disk {}", unit + 1), "type": "SCSI", "capacity": capacity,
                   "backing": {"type": "VMDK_FILE", "vmdk_file": format!("[cloud-ds1] {file}")},
                   "scsi": {"bus": 0, "unit": unit}})
        );
        assert_eq!(disk, whole["disks"][key]);
        assert_eq!(datastores[0]["name"], "cloud-ds1");
        let on_disk = cloud.root.join(file);
        let info: Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", on_disk.to_str().unwrap()])).unwrap();
        assert_eq!(info["virtual-size"], capacity, "{}: {info}", on_disk.display());
    }

    // NICs: MAC and the cloud network each is on.
    assert_eq!(
        api.get(&format!("{base}/hardware/ethernet"), t).await,
        json!([{"nic": "4000"}, {"nic": "4001"}])
    );
    for (key, mac, network) in [
        ("4000", "00:50:56:aa:bb:01", "VM Network"),
        ("4001", "00:50:56:aa:bb:02", "cloud-web"),
    ] {
        let nic = api.get(&format!("{base}/hardware/ethernet/{key}"), t).await;
        assert_eq!(nic["mac_address"], mac);
        assert_eq!(nic["mac_type"], "MANUAL");
        assert_eq!(nic["type"], "VMXNET3");
        assert_eq!(nic["state"], "NOT_CONNECTED");
        assert_eq!(
            nic["backing"],
            json!({"type": "STANDARD_PORTGROUP", "network": net(network), "network_name": network})
        );
        assert_eq!(nic, whole["nics"][key]);
        let listed = api.get(&format!("/api/vcenter/network/{}", net(network)), t).await;
        assert_eq!(listed["name"], network);
    }

    // The same resources under /rest, in the envelope.
    for sub in [
        "hardware",
        "hardware/cpu",
        "hardware/memory",
        "hardware/disk/2001",
        "hardware/ethernet/4000",
    ] {
        let older = api.get(&format!("/rest/vcenter/vm/{vm}/{sub}"), t).await;
        assert_eq!(
            older,
            json!({"value": api.get(&format!("{base}/{sub}"), t).await}),
            "{sub}"
        );
    }

    // The guest's identity needs VMware Tools, which the cloud host does not run: vSphere's
    // answer for a VM without Tools running.
    let (status, body) = api.call(Method::GET, &format!("{base}/guest/identity"), Some(t)).await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE");
    assert!(body["messages"][0]["default_message"]
        .as_str()
        .unwrap()
        .contains("VMware Tools is not running"));
    let (status, body) = api
        .call(Method::GET, &format!("/rest/vcenter/vm/{vm}/guest/identity"), Some(t))
        .await;
    assert_older_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable");

    // Unknown VMs and devices: vSphere's 404.
    for path in [
        "/api/vcenter/vm/vm-999/hardware".to_owned(),
        "/api/vcenter/vm/vm-999/hardware/disk".to_owned(),
        "/api/vcenter/vm/vm-999/hardware/ethernet/4000".to_owned(),
        "/api/vcenter/vm/vm-999/hardware/cpu".to_owned(),
        "/api/vcenter/vm/vm-999/guest/identity".to_owned(),
        format!("{base}/hardware/disk/2002"),
        format!("{base}/hardware/ethernet/4002"),
        format!("{base}/hardware/disk/4000"),
    ] {
        let (status, body) = api.call(Method::GET, &path, Some(t)).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "NOT_FOUND");
    }
    // Nothing without a session.
    let (status, body) = api.call(Method::GET, &format!("{base}/hardware/disk"), None).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");

    let version = api.get("/api/appliance/system/version", t).await;
    assert!(version["version"].as_str().unwrap().starts_with("8.0."), "{version}");
    assert_eq!(
        version["type"],
        "vCenter Server with an embedded Platform Services Controller"
    );
    for field in ["product", "build", "summary", "releasedate", "install_time"] {
        assert!(version[field].is_string(), "{field}: {version}");
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_names_log_in_whatever_their_case() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let api = Api::new(&cloud, &pki);

    // REST at /api: the session is the configured user's.
    let (status, token) = api.api_login("administrator@CLOUD.LOCAL").await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    assert_eq!(api.get("/api/session", token.as_str().unwrap()).await["user"], ADMIN);
    let (status, token) = api.api_login("Administrator@Cloud.Local").await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    assert_eq!(api.get("/api/session", token.as_str().unwrap()).await["user"], ADMIN);

    // The older REST API.
    let (status, _, body) = api.rest_login("MIGRATOR@CLOUD.LOCAL", DEMO_PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let session = api
        .rest_value("/rest/com/vmware/cis/session", body["value"].as_str().unwrap())
        .await;
    assert_eq!(session["user"], MIGRATOR);

    // vAPI JSON-RPC (the Automation SDKs).
    let login = json!({
        "jsonrpc": "2.0", "method": "invoke", "id": "1",
        "params": {"serviceId": "com.vmware.cis.session", "operationId": "create",
                   "input": {"STRUCTURE": {"operation-input": {}}},
                   "ctx": {"appCtx": {}, "securityCtx": {
                       "schemeId": "com.vmware.vapi.std.security.user_pass",
                       "userName": "auditor@Cloud.LOCAL", "password": DEMO_PASSWORD}}}
    });
    let (status, _, body) = api.send(api.request(Method::POST, "/api").json(&login)).await;
    assert_eq!(status, StatusCode::OK);
    let token = body["result"]["output"]["SECRET"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(api.get("/api/session", token).await["user"], AUDITOR);

    // A wrong password is wrong in any case.
    let (status, _, body) = api.rest_login("MIGRATOR@CLOUD.LOCAL", "wrong").await;
    assert_older_error(status, &body, StatusCode::UNAUTHORIZED, "unauthenticated");

    // The edge's QUIC login: the migration is recorded as the configured user's.
    let vmx = source_vm(&tmp.path().join("src"), "web01");
    let target = cloud.target(&pki, "Migrator@CLOUD.local", DEMO_PASSWORD);
    let web = migrate(&vmx, &target, &lift_options()).await.expect("web01 migrates");
    let (_, admin) = api.api_login(ADMIN).await;
    let migrations = api.get("/api/gateway/migrations", admin.as_str().unwrap()).await;
    assert_eq!(migrations[0]["vm"], web.vm_id.as_str());
    assert_eq!(migrations[0]["user"], MIGRATOR, "{migrations}");
    cloud.stop().await;
}
