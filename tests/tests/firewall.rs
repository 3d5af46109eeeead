//! Firewall rules carried with a VM, the migration report, and validating a plan before
//! anything moves, over real QUIC and HTTPS on 127.0.0.1: a VM with an NSX DFW-like rules
//! file is migrated under a new name; the inventory and the API show its rules with the
//! VM's own references rewritten to its new id; the report lists the NIC mapping and what
//! was and was not carried, and survives a restart. `edge-agent plan` and
//! `POST /api/gateway/plans` list every problem of a bad plan at once and pass a good one
//! without recording or staging anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use e2e::*;
use edge_agent::migrate::MigrateOptions;
use gateway::plan::{NotCarriedKind, RuleEndpoint};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const KIB: usize = 1 << 10;
const SESSION: &str = "vmware-api-session-id";

const RULES: &str = r#"{
  "rules": [
    {"id": 1001, "name": "web-in", "action": "ALLOW", "direction": "IN",
     "sources": [{"ip_set": "clients"}, {"group": "lb"}],
     "destinations": [{"vm": "web01"}],
     "services": [{"protocol": "TCP", "ports": ["443", "8000-8080"]}]},
    {"id": "1002", "name": "deny-rest", "action": "DROP", "applied_to": [{"vm": "web01"}], "disabled": true},
    {"id": "1003", "name": "edge-nat", "action": "ALLOW", "applied_to": [{"edge": "edge-1"}]}
  ],
  "groups": [{"name": "lb", "members": [{"address": "10.0.0.0/24"}, {"vm": "web01"}, {"security_tag": "ST-LB"}]}],
  "ip_sets": [{"name": "clients", "addresses": ["192.168.1.0/24", "2001:db8::/32"]}],
  "service_composer_policies": [{"name": "PCI-zone"}],
  "spoofguard": {"mode": "TOFU"},
  "security_tags": ["ST-Web"],
  "netx_rules": [{"name": "redirect-to-ips"}],
  "edge_firewall_rules": [{"name": "dmz-in"}]
}"#;

/// web01: one small disk, a NIC on `network` and one on "VM Network", and `rules` as its
/// `web01.dfw.json`; `cpus` vCPUs.
fn source_vm(dir: &Path, network: &str, cpus: u32, rules: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    use Fill::*;
    write_raw_disk(&dir.join("web01.img"), 128 * KIB, &[Text, Zero, Random, Zero], 3);
    let vmx = write_vmx(
        dir,
        "web01",
        &["web01.img"],
        &[
            Nic {
                network,
                mac: "00:50:56:3f:00:01",
            },
            Nic {
                network: "VM Network",
                mac: "00:0c:29:aa:bb:cc",
            },
        ],
    );
    let text = std::fs::read_to_string(&vmx).unwrap();
    std::fs::write(
        &vmx,
        text.replace("numvcpus = \"2\"", &format!("numvcpus = \"{cpus}\"")),
    )
    .unwrap();
    std::fs::write(dir.join("web01.dfw.json"), rules).unwrap();
    vmx
}

fn https(pki: &Pki) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap()
}

/// A request with a fresh session of `user`: status and JSON body.
async fn api(
    cloud: &Cloud,
    pki: &Pki,
    user: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let http = https(pki);
    let base = format!("https://{}", cloud.api_addr.expect("API on"));
    let login = http
        .post(format!("{base}/api/session"))
        .basic_auth(user, Some(DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::CREATED);
    let token: String = login.json().await.unwrap();
    let mut req = http.request(method, format!("{base}{path}")).header(SESSION, token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_carried_rewritten_reported_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud_dir = tmp.path().join("cloud");
    let cloud = Cloud::start(&cloud_dir, &pki, &[]).await;
    let vmx = source_vm(&tmp.path().join("src"), "Prod-DMZ", 2, RULES);
    let opts = MigrateOptions {
        // A new name: the rules still say "web01", the source name.
        name: Some("web01-cloud".into()),
        network_map: vec![("Prod-DMZ".into(), "cloud-web".into())],
        chunk_size: 64 * KIB as u32,
        ..MigrateOptions::default()
    };
    let summary = migrate(&vmx, &cloud.target(&pki, MIGRATOR, DEMO_PASSWORD), &opts)
        .await
        .expect("migration succeeds");
    let vm_id = summary.vm_id.clone();
    let report = summary.report.clone().expect("the endpoint sends its report");

    // What moved, and how each NIC was mapped.
    assert_eq!(report.migration_id.as_deref(), Some(summary.migration_id.as_str()));
    assert_eq!(report.vm_id.as_deref(), Some(vm_id.as_str()));
    assert_eq!(report.vm_name, "web01-cloud");
    assert_eq!((report.disks.len(), report.logical_bytes), (1, summary.logical_bytes));
    assert_eq!(report.zero_bytes, Some(summary.zero_bytes));
    assert!(summary.zero_bytes > 0);
    let web = cloud.domain.inventory.network_by_name("cloud-web").unwrap().unwrap();
    let vmnet = cloud.domain.inventory.network_by_name("VM Network").unwrap().unwrap();
    let nics: Vec<(&str, &str, &str, Option<&str>)> = report
        .nics
        .iter()
        .map(|n| {
            (
                n.source_network.as_str(),
                n.network_id.as_str(),
                n.network_name.as_str(),
                n.mac.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        nics,
        [
            ("Prod-DMZ", web.id.as_str(), "cloud-web", Some("00:50:56:3f:00:01")),
            ("VM Network", vmnet.id.as_str(), "VM Network", Some("00:0c:29:aa:bb:cc")),
        ]
    );

    // Rules carried (an Edge-only rule is not), and each thing with no equivalent listed.
    let carried: Vec<&str> = report.rules_carried.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(carried, ["1001", "1002"]);
    assert!(report.rules_carried[1].disabled);
    let kinds: Vec<NotCarriedKind> = report.not_carried.iter().map(|n| n.kind).collect();
    for kind in [
        NotCarriedKind::ServiceComposerPolicy,
        NotCarriedKind::SpoofGuard,
        NotCarriedKind::SecurityTag,
        NotCarriedKind::NetX,
        NotCarriedKind::EdgeFirewall,
    ] {
        assert!(kinds.contains(&kind), "{kind:?} listed: {kinds:?}");
    }
    assert_eq!(report.not_carried.len(), 7, "{:#?}", report.not_carried);
    assert!(report.not_carried.iter().any(|n| n.name.contains("edge-nat")));
    assert!(report.not_carried.iter().any(|n| n.name.contains("ST-LB")));
    assert!(report.not_carried.iter().all(|n| !n.reason.is_empty()));
    let text = summary.to_text();
    println!("{text}");
    assert!(text.contains("firewall rules carried: 2 (1001, 1002)"), "{text}");
    assert!(text.contains("not carried: 7"), "{text}");
    assert!(text.contains("\"Prod-DMZ\" -> cloud-web"), "{text}");
    let json = summary.to_json();
    assert_eq!(json["report"]["rules_carried"][0]["id"], "1001", "{json}");

    // The inventory: the VM's own references are its new id, everything else as written.
    let fw = cloud
        .domain
        .inventory
        .vm_firewall(&vm_id)
        .unwrap()
        .expect("the VM exists");
    let own = RuleEndpoint::VmId(vm_id.clone());
    assert_eq!(fw.rules.len(), 2);
    assert_eq!(fw.rules[0].destinations, vec![own.clone()]);
    assert_eq!(fw.rules[1].applied_to, vec![own.clone()]);
    assert_eq!(
        fw.groups[0].members,
        vec![RuleEndpoint::Address("10.0.0.0/24".into()), own.clone()]
    );
    assert_eq!(fw.ip_sets[0].addresses, ["192.168.1.0/24", "2001:db8::/32"]);
    assert_eq!(fw.not_carried.len(), 7);

    // The API shows the same.
    let (status, body) = api(
        &cloud,
        &pki,
        AUDITOR,
        Method::GET,
        &format!("/api/gateway/vms/{vm_id}/firewall"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rules"][0]["destinations"], json!([{"vm_id": vm_id}]), "{body}");
    assert_eq!(
        body["rules"][0]["services"][0],
        json!({"protocol": "TCP", "ports": ["443", "8000-8080"]})
    );
    assert_eq!(body["rules"][0]["action"], "ALLOW");
    assert_eq!(body["rules"][0]["direction"], "IN");
    assert!(
        !body.to_string().contains("\"vm\":\"web01\""),
        "no source-name reference left: {body}"
    );
    let (status, body) = api(
        &cloud,
        &pki,
        AUDITOR,
        Method::GET,
        "/api/gateway/vms/vm-999/firewall",
        None,
    )
    .await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOT_FOUND"))
    );

    let path = format!("/api/gateway/migrations/{}/report", summary.migration_id);
    let (status, served) = api(&cloud, &pki, AUDITOR, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{served}");
    assert_eq!(served, serde_json::to_value(&report).unwrap());
    assert_eq!(served["nics"][0]["network_name"], "cloud-web");
    assert_eq!(served["not_carried"][0]["kind"], "SERVICE_COMPOSER_POLICY");

    // After a restart the report and the rules are still there.
    cloud.stop().await;
    let cloud = Cloud::start(&cloud_dir, &pki, &[]).await;
    let (status, again) = api(&cloud, &pki, AUDITOR, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again, served);
    assert_eq!(
        cloud.domain.inventory.vm_firewall(&vm_id).unwrap().unwrap().rules,
        fw.rules
    );
    cloud.stop().await;
}

/// A plan as `POST /api/gateway/plans` takes it.
fn api_plan(network: &str, cpus: u32, cidr: &str) -> Value {
    json!({
        "vm": {
            "name": "api01", "guest_os": "debian12_64Guest", "num_cpus": cpus, "memory_mib": 2048,
            "nics": [{"key": "ethernet0", "network": network, "mac": "00:50:56:00:00:09"}],
            "disks": [{"key": "scsi0:0", "capacity": 1048576}]
        },
        "network_map": {"Prod-DMZ": "cloud-web"},
        "disk_format": "qcow2",
        "firewall": {
            "rules": [{"id": "1", "name": "in", "action": "ALLOW", "sources": [{"address": cidr}],
                       "destinations": [{"vm": "api01"}]}],
            "not_carried": [{"kind": "SPOOF_GUARD", "name": "TOFU"}]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_is_checked_without_staging_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);

    // Three problems at once: an unmapped network, more vCPUs than the host has, a bad CIDR.
    let bad_rules = RULES.replace("10.0.0.0/24", "10.0.0.300/24");
    let vmx = source_vm(&tmp.path().join("bad"), "Prod-Legacy", 64, &bad_rules);
    let vm = edge_agent::source::open_vm(&vmx).unwrap();
    let check = edge_agent::plan::check(&vm, &target, &MigrateOptions::default())
        .await
        .expect("the endpoint answers");
    println!("{}", check.to_text());
    assert!(!check.ok());
    let has = |needle: &str| check.problems.iter().any(|p| p.contains(needle));
    assert!(has("Prod-Legacy"), "{:#?}", check.problems);
    assert!(has("64 vCPUs") && has("32 CPU cores"), "{:#?}", check.problems);
    assert!(
        has("\"10.0.0.300/24\"") && has("web01.dfw.json"),
        "{:#?}",
        check.problems
    );
    assert!(
        check.to_text().contains("refused by the endpoint: 3 problem(s)"),
        "{}",
        check.to_text()
    );

    // A good plan: what would be created, and nothing recorded or staged.
    let vmx = source_vm(&tmp.path().join("good"), "Prod-DMZ", 2, RULES);
    let vm = edge_agent::source::open_vm(&vmx).unwrap();
    let opts = MigrateOptions {
        network_map: vec![("Prod-DMZ".into(), "cloud-web".into())],
        ..MigrateOptions::default()
    };
    let check = edge_agent::plan::check(&vm, &target, &opts)
        .await
        .expect("the endpoint answers");
    let text = check.to_text();
    println!("{text}");
    assert!(check.ok(), "{text}");
    assert!(text.starts_with("plan OK: web01 would be created in folder"), "{text}");
    assert!(
        text.contains("firewall rules carried: 2 (1001, 1002)") && text.contains("not carried: 7"),
        "{text}"
    );
    let preview = check.valid.as_ref().unwrap();
    assert_eq!(
        (preview.migration_id.as_deref(), preview.vm_id.as_deref()),
        (None, None)
    );
    assert_eq!(preview.nics[0].network_name, "cloud-web");
    assert_eq!(preview.disk_format, "vmdk");
    assert!(
        cloud.domain.inventory.list_migrations().unwrap().is_empty(),
        "no migration record"
    );
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new(), "no staging folder");

    // The API: the same checks, every problem as one message of a 400.
    let (status, body) = api(
        &cloud,
        &pki,
        MIGRATOR,
        Method::POST,
        "/api/gateway/plans",
        Some(api_plan("Prod-Legacy", 64, "10.0.0.300/24")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error_type"], "INVALID_ARGUMENT");
    let messages: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["default_message"].as_str().unwrap())
        .collect();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(messages.iter().any(|m| m.contains("Prod-Legacy")));
    assert!(messages.iter().any(|m| m.contains("64 vCPUs")));
    assert!(messages.iter().any(|m| m.contains("10.0.0.300/24")));
    let (status, body) = api(
        &cloud,
        &pki,
        MIGRATOR,
        Method::POST,
        "/api/gateway/plans",
        Some(api_plan("Prod-DMZ", 2, "10.0.0.0/24")),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["vm_name"], "api01");
    assert_eq!(body["disk_format"], "qcow2");
    assert_eq!(body["nics"][0]["network_name"], "cloud-web");
    assert_eq!(
        body["rules_carried"],
        json!([{"id": "1", "name": "in", "disabled": false}])
    );
    assert_eq!(body["not_carried"][0]["kind"], "SPOOF_GUARD");
    assert!(!body["not_carried"][0]["reason"].as_str().unwrap().is_empty());
    // A read-only role may not migrate: 403, its problem first.
    let (status, body) = api(
        &cloud,
        &pki,
        AUDITOR,
        Method::POST,
        "/api/gateway/plans",
        Some(api_plan("Prod-DMZ", 2, "10.0.0.0/24")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["messages"][0]["default_message"]
            .as_str()
            .unwrap()
            .contains("ReadOnly"),
        "{body}"
    );
    let (status, body) = api(
        &cloud,
        &pki,
        MIGRATOR,
        Method::POST,
        "/api/gateway/plans",
        Some(json!({"vm": 1})),
    )
    .await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_ARGUMENT"))
    );
    assert!(
        cloud.domain.inventory.list_migrations().unwrap().is_empty(),
        "no migration record"
    );
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new(), "no staging folder");
    cloud.stop().await;
}
