//! The vAPI JSON-RPC API at `POST /api` with the real vSphere Automation SDK for Python
//! (PyPI `vmware-vcenter`, pinned in tests/vapi/requirements.txt), in a virtualenv that
//! tests/vapi/venv.sh makes under target/vapi-venv and later runs reuse. The endpoint
//! runs in-process with two migrated VMs; tests/vapi/sdk_check.py checks what an SDK user
//! would, against what the REST API answers for the same domain.
//!
//! The SDK comes from PyPI (tests/setup.sh makes the virtualenv): without network (or
//! python3-venv) the test fails and says so.

use e2e::*;
use edge_agent::migrate::MigrateOptions;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const SESSION: &str = "vmware-api-session-id";
const MIB: usize = 1 << 20;

fn client(pki: &Pki) -> Client {
    e2e::rest::https_client(pki)
}

async fn rest_get(http: &Client, base: &str, path: &str, token: &str) -> (StatusCode, Value) {
    let r = http
        .get(format!("{base}{path}"))
        .header(SESSION, token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn rest_ok(http: &Client, base: &str, path: &str, token: &str) -> Value {
    let (status, body) = rest_get(http, base, path, token).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    body
}

/// One raw vAPI call; the HTTP status and the JSON-RPC response.
async fn vapi(http: &Client, base: &str, body: Value) -> (StatusCode, Value) {
    let r = http.post(format!("{base}/api")).json(&body).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap())
}

/// The python of the SDK's virtualenv, made (or found) by tests/vapi/venv.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_reads_the_cloud_domain() {
    let python = e2e::python::venv_python().await;

    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    use Fill::*;
    write_raw_disk(&src.join("web01.img"), MIB, &[Text, Zero, Random], 1);
    let web_vmx = write_vmx(
        &src,
        "web01",
        &["web01.img"],
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
    write_raw_disk(&src.join("db01.img"), MIB, &[Text], 2);
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
    migrate(&db_vmx, &target, &opts).await.expect("db01 migrates");

    // What REST answers: the expectations of the SDK's checks.
    let http = client(&pki);
    let addr = cloud.api_addr.expect("API on");
    let base = format!("https://{addr}");
    let login = http
        .post(format!("{base}/api/session"))
        .basic_auth(AUDITOR, Some(DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::CREATED);
    let token: String = login.json().await.unwrap();
    let mut lists = serde_json::Map::new();
    for kind in ["vm", "host", "datastore", "network", "datacenter", "cluster", "folder"] {
        lists.insert(
            kind.into(),
            rest_ok(&http, &base, &format!("/api/vcenter/{kind}"), &token).await,
        );
    }
    let d = cloud.domain.inventory.domain().unwrap();
    let vm_folders: Vec<Value> = rest_ok(&http, &base, "/api/vcenter/folder?type=VIRTUAL_MACHINE", &token)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["folder"].clone())
        .collect();
    let vm_get = rest_ok(&http, &base, &format!("/api/vcenter/vm/{}", web.vm_id), &token).await;
    let cluster_get = rest_ok(&http, &base, &format!("/api/vcenter/cluster/{}", d.cluster.id), &token).await;
    let datacenter_get = rest_ok(
        &http,
        &base,
        &format!("/api/vcenter/datacenter/{}", d.datacenter.id),
        &token,
    )
    .await;

    // The migration as a task over REST.
    let task = rest_ok(&http, &base, &format!("/api/cis/tasks/{}", web.migration_id), &token).await;
    assert_eq!(task["status"], "SUCCEEDED", "{task}");
    assert_eq!(task["target"], json!({"type": "VirtualMachine", "id": web.vm_id}));
    assert_eq!(
        (&task["service"], &task["operation"], &task["user"]),
        (&json!("com.vmware.vcenter.VM"), &json!("relocate"), &json!(MIGRATOR))
    );
    assert_eq!(task["progress"]["completed"], task["progress"]["total"]);
    assert!(task["progress"]["total"].as_u64().unwrap() >= 3 * MIB as u64, "{task}");
    assert_eq!(task["cancelable"], false);
    assert!(task.get("error").is_none());
    for t in [&task["start_time"], &task["end_time"]] {
        let t = t.as_str().unwrap();
        assert!(t.ends_with('Z') && t.len() == "2024-05-01T10:00:00.123Z".len(), "{t}");
    }
    let (status, body) = rest_get(&http, &base, "/api/cis/tasks/migration-999", &token).await;
    assert_eq!(
        (status, &body["error_type"]),
        (StatusCode::NOT_FOUND, &json!("NOT_FOUND"))
    );
    let (status, _) = rest_get(&http, &base, &format!("/api/cis/tasks/{}", web.migration_id), "nope").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Raw vAPI: nothing but session create answers without a session; errors travel in
    // a 200 as the SDK expects; calls that are not vAPI get JSON-RPC errors.
    let list = |ctx: Value| {
        json!({"jsonrpc": "2.0", "method": "invoke", "id": "7", "params": {
            "serviceId": "com.vmware.vcenter.VM", "operationId": "list",
            "input": {"STRUCTURE": {"operation-input": {"filter": {"OPTIONAL": null}}}},
            "ctx": ctx}})
    };
    let (status, r) = vapi(&http, &base, list(json!({"appCtx": {}}))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["id"], "7");
    assert_eq!(
        r["result"]["error"]["ERROR"]["com.vmware.vapi.std.errors.unauthenticated"]["error_type"],
        json!({"OPTIONAL": "UNAUTHENTICATED"}),
        "{r}"
    );
    let session_ctx = json!({"appCtx": {}, "securityCtx": {
        "schemeId": "com.vmware.vapi.std.security.session_id", "sessionId": token}});
    let (_, r) = vapi(&http, &base, list(session_ctx)).await;
    let vms = r["result"]["output"].as_array().expect("a list");
    assert_eq!(vms.len(), 2, "{r}");
    assert_eq!(
        vms[0]["STRUCTURE"]["com.vmware.vcenter.VM.summary"]["cpu_count"]["OPTIONAL"], lists["vm"][0]["cpu_count"],
        "{r}"
    );
    let r = http.post(format!("{base}/api")).body("not json").send().await.unwrap();
    let r: Value = r.json().await.unwrap();
    assert_eq!((&r["error"]["code"], &r["id"]), (&json!(-32700), &Value::Null), "{r}");
    let r = http
        .post(format!("{base}/api"))
        .header("vapi-service", "com.vmware.vcenter.host")
        .json(&list(json!({})))
        .send()
        .await
        .unwrap();
    let r: Value = r.json().await.unwrap();
    assert_eq!(r["error"]["code"], -31001, "{r}");
    let (status, _) = rest_get(&http, &base, "/api", &"0".repeat(32)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "GET /api needs a session too");

    // The SDK.
    let expected = json!({
        "server": addr.to_string(),
        "ca": pki.path("ca.pem"),
        "user": AUDITOR,
        "password": DEMO_PASSWORD,
        "migrator": MIGRATOR,
        "rest_token": token,
        "lists": lists,
        "cluster": d.cluster.id,
        "vm_folders": vm_folders,
        "vm_get": vm_get,
        "cluster_get": cluster_get,
        "datacenter_get": datacenter_get,
        "task": web.migration_id,
    });
    let expected_path = tmp.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec_pretty(&expected).unwrap()).unwrap();
    e2e::python::run_check(&python, "vapi/sdk_check.py", &expected_path, "all SDK checks passed").await;

    // The SDK's logout ended its session only; the REST session still answers.
    rest_ok(&http, &base, "/api/session", &token).await;
    cloud.stop().await;
}
