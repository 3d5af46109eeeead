//! The vim25 SOAP API at `/sdk` with the real pyvmomi (PyPI, pinned in
//! tests/vapi/requirements.txt, in the virtualenv tests/vapi/venv.sh makes): two lifted VMs,
//! one small enough to boot under QEMU; tests/soap/pyvmomi_check.py connects, walks the
//! inventory through a container view and through traversal specs, reads every VM's disks
//! and NICs against what REST answers, finds VMs by path and uuid and hosts by uuid, reads
//! and waits for the migrations as Tasks, meets each fault, and powers the bootable VM on
//! and off through tasks, which the TaskManager's recentTask lists beside the migrations. Raw SOAP calls check what a client
//! gets for a body that is not a vim25 call, and that SOAP and REST sessions are apart.
//!
//! Needs pyvmomi from PyPI and `qemu-system-x86_64` (tests/setup.sh installs both);
//! without them the test fails and says so.

use std::path::Path;

use e2e::rest::Rest;
use e2e::*;
use edge_agent::migrate::MigrateOptions;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

/// One raw SOAP call: the HTTP status and the body.
async fn soap(rest: &Rest, body: &str, cookie: Option<&str>) -> (StatusCode, String) {
    let mut request = rest
        .request(Method::POST, "/sdk")
        .header("content-type", "text/xml; charset=utf-8")
        .header("soapaction", "urn:vim25/8.0.3.0")
        .body(body.to_owned());
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let r = request.send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

fn envelope(inner: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyvmomi_reads_and_powers_the_cloud_domain() {
    require_qemu();
    let python = e2e::python::venv_python().await;

    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    e2e::guest::boot_sector_disk(&src.join("boot01.img"), "soap boot");
    let boot_vmx = write_vmx(
        &src,
        "boot01",
        &["boot01.img"],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:aa:cc:01",
        }],
    );
    small_enough_to_boot(&boot_vmx);
    use Fill::*;
    write_raw_disk(&src.join("db01.img"), MIB, &[Text, Zero], 1);
    write_raw_disk(&src.join("db01_data.img"), MIB, &[Random], 2);
    let db_vmx = write_vmx(
        &src,
        "db01",
        &["db01.img", "db01_data.img"],
        &[
            Nic {
                network: "VM Network",
                mac: "00:50:56:aa:cc:02",
            },
            Nic {
                network: "Prod-DMZ",
                mac: "00:50:56:aa:cc:03",
            },
        ],
    );
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let opts = MigrateOptions {
        network_map: vec![("Prod-DMZ".into(), "cloud-web".into())],
        ..MigrateOptions::default()
    };
    let boot = migrate(&boot_vmx, &target, &opts).await.expect("boot01 migrates");
    let db = migrate(&db_vmx, &target, &opts).await.expect("db01 migrates");

    // What REST answers: the expectations of the pyvmomi checks.
    let rest = Rest::new(&cloud, &pki);
    let token = rest.token(AUDITOR).await;
    let mut vms = serde_json::Map::new();
    for summary in rest.json("/api/vcenter/vm", &token).await.as_array().unwrap() {
        let id = summary["vm"].as_str().unwrap();
        let vm = rest.json(&format!("/api/vcenter/vm/{id}"), &token).await;
        let record = cloud.domain.inventory.vm(id).unwrap().unwrap();
        let disks: Vec<Value> = vm["disks"]
            .as_object()
            .unwrap()
            .values()
            .zip(&record.disks)
            .map(|(d, r)| json!({"file": d["backing"]["vmdk_file"], "datastore": r.datastore}))
            .collect();
        let nics: Vec<Value> = vm["nics"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| json!({"mac": n["mac_address"], "network": n["backing"]["network"]}))
            .collect();
        vms.insert(
            id.to_owned(),
            json!({"name": vm["name"], "disks": disks, "nics": nics,
                   "instance_uuid": vm["identity"]["instance_uuid"]}),
        );
    }
    assert_eq!(vms.len(), 2);
    // Each migration is a Task under its migration id in both APIs: REST's cis task first.
    let mut migrations = serde_json::Map::new();
    for lift in [&boot, &db] {
        let task = rest
            .json(&format!("/api/cis/tasks/{}", lift.migration_id), &token)
            .await;
        assert_eq!(task["status"], "SUCCEEDED", "{task}");
        assert_eq!(task["target"]["id"], lift.vm_id.as_str(), "{task}");
        migrations.insert(lift.migration_id.clone(), json!(lift.vm_id));
    }
    let hosts: Vec<Value> = rest
        .json("/api/vcenter/host", &token)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].clone())
        .collect();
    assert!(!hosts.is_empty());
    let datastores: Vec<Value> = rest
        .json("/api/vcenter/datastore", &token)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["datastore"].clone())
        .collect();

    // Raw calls: what a client that is not pyvmomi meets.
    let (status, body) = soap(&rest, "not xml", None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body.contains("xsi:type=\"InvalidRequest\"") && body.contains("<faultstring>"),
        "{body}"
    );
    let deep = format!("<M>{}{}</M>", "<a>".repeat(200), "</a>".repeat(200));
    let (_, body) = soap(&rest, &envelope(&deep), None).await;
    assert!(body.contains("deeper than"), "{body}");
    let (status, body) = soap(
        &rest,
        &envelope(r#"<NoSuchMethod xmlns="urn:vim25"><_this type="Folder">group-d1</_this></NoSuchMethod>"#),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("NotAuthenticatedFault"), "no session comes first: {body}");
    let versions = rest
        .request(Method::GET, "/sdk/vimServiceVersions.xml")
        .send()
        .await
        .unwrap();
    assert_eq!(versions.status(), StatusCode::OK);
    assert!(versions.text().await.unwrap().contains("<name>urn:vim25</name>"));
    // A SOAP login gives a cookie that REST does not take, and the REST token is no cookie.
    let login = envelope(&format!(
        r#"<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this><userName>{AUDITOR}</userName><password>{DEMO_PASSWORD}</password></Login>"#
    ));
    let r = rest.request(Method::POST, "/sdk").body(login).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("vmware_soap_session=\""), "{cookie}");
    let soap_token = cookie.split('"').nth(1).unwrap().to_owned();
    let (status, _) = rest.call(Method::GET, "/api/session", &soap_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a SOAP session is not a REST session");
    let fetch = envelope(r#"<Fetch xmlns="urn:vim25"><_this type="Folder">group-d1</_this><prop>name</prop></Fetch>"#);
    let (status, body) = soap(&rest, &fetch, Some(&format!("vmware_soap_session=\"{token}\""))).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        body.contains("NotAuthenticatedFault"),
        "a REST token is no SOAP session: {body}"
    );
    let (status, body) = soap(&rest, &fetch, Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("<returnval xsi:type=\"xsd:string\">"), "{body}");

    let expected = json!({
        "server": rest_addr(&cloud),
        "ca": pki.path("ca.pem"),
        "auditor": AUDITOR,
        "migrator": MIGRATOR,
        "password": DEMO_PASSWORD,
        "vms": vms,
        "boot_vm": boot.vm_id,
        "datastores": datastores,
        "migrations": migrations,
        "hosts": hosts,
    });
    let expected_path = tmp.path().join("expected.json");
    std::fs::write(&expected_path, serde_json::to_vec_pretty(&expected).unwrap()).unwrap();
    e2e::python::run_check(
        &python,
        "soap/pyvmomi_check.py",
        &expected_path,
        "all pyvmomi checks passed",
    )
    .await;

    // pyvmomi's logouts ended its SOAP sessions only: the REST session still answers.
    let (status, _) = rest.call(Method::GET, "/api/session", &token).await;
    assert_eq!(status, StatusCode::OK);
    cloud.stop().await;
}

fn rest_addr(cloud: &Cloud) -> String {
    cloud.api_addr.expect("the API listens").to_string()
}

/// The access log of `/sdk` requests names the vim25 method and the session's user, and
/// never a Login's password, right or wrong (an endpoint process, whose log is read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_soap_methods_without_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let path = |p: &Path| p.display().to_string();
    let vars = [
        ("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLOUD_ENDPOINT_API_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLOUD_ENDPOINT_CERT", path(&pki.path("endpoint.pem"))),
        ("CLOUD_ENDPOINT_KEY", path(&pki.path("endpoint.key"))),
        ("CLOUD_ENDPOINT_EDGE_CA", path(&pki.path("ca.pem"))),
        ("CLOUD_ENDPOINT_DATASTORE_DIR", path(&tmp.path().join("datastore"))),
        ("CLOUD_ENDPOINT_DATABASE", path(&tmp.path().join("inventory.sqlite3"))),
    ];
    let endpoint = e2e::process::EndpointProcess::serve(&bin, tmp.path(), None, &vars);
    let http = e2e::rest::https_client(&pki);
    let url = format!("https://{}/sdk", endpoint.api);
    let post = |body: String, cookie: Option<String>| {
        let mut r = http.post(&url).body(body);
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        r.send()
    };
    let wrong = "Wrong-Secret-4711";
    let login = |password: &str| {
        envelope(&format!(
            r#"<Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this><userName>{AUDITOR}</userName><password>{password}</password></Login>"#
        ))
    };
    let r = post(login(wrong), None).await.unwrap();
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.text().await.unwrap().contains("InvalidLoginFault"));
    let r = post(login(DEMO_PASSWORD), None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let fetch =
        envelope(r#"<Fetch xmlns="urn:vim25"><_this type="Folder">group-d1</_this><prop>childEntity</prop></Fetch>"#);
    let r = post(fetch, Some(cookie)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.text().await.unwrap();
    assert!(body.contains("xsi:type=\"ArrayOfManagedObjectReference\""), "{body}");

    let lines = eventually(10, || {
        let log = endpoint.log();
        log.iter().any(|l| l.contains("call=\"Fetch\"")).then_some(log)
    })
    .await
    .unwrap_or_else(|| panic!("no access line of Fetch:\n{}", endpoint.log().join("\n")));
    let access = |call: &str, status: u16, user: &str| {
        lines.iter().any(|l| {
            l.contains("API request")
                && l.contains("path=\"/sdk\"")
                && l.contains(&format!("call=\"{call}\""))
                && l.contains(&format!("status={status}"))
                && l.contains(&format!("user=\"{user}\""))
        })
    };
    assert!(access("Login", 500, "-"), "{lines:#?}");
    assert!(access("Login", 200, AUDITOR), "{lines:#?}");
    assert!(access("Fetch", 200, AUDITOR), "{lines:#?}");
    for secret in [wrong, DEMO_PASSWORD] {
        assert!(!lines.iter().any(|l| l.contains(secret)), "{secret} logged: {lines:#?}");
    }
}
