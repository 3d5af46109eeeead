//! A test boot in the cloud: a lifted VM whose disk holds a hand-assembled boot sector is
//! powered on through the REST API, runs under QEMU (TCG), prints on its serial console,
//! and is stopped again; its power state follows the process, also across an endpoint
//! restart and a QEMU killed from outside.
//!
//! Needs `qemu-system-x86_64` (tests/setup.sh installs it); without it the test fails and
//! says so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::*;
use edge_agent::migrate::MigrateOptions;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use e2e::rest::Rest;
const MESSAGE: &str = "booted in the cloud";

/// A lifted-VM source: the boot disk, a .vmx for a small BIOS VM with one NIC.
fn source_vm(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    e2e::guest::boot_sector_disk(&dir.join(format!("{name}.img")), MESSAGE);
    let vmx = write_vmx(
        dir,
        name,
        &[&format!("{name}.img")],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:aa:bb:07",
        }],
    );
    small_enough_to_boot(&vmx);
    vmx
}

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

    async fn power(&self, vm: &str, action: &str, token: &str) -> (StatusCode, String) {
        self.call(
            Method::POST,
            &format!("/api/vcenter/vm/{vm}/power?action={action}"),
            token,
        )
        .await
    }

    /// A vAPI JSON-RPC call (the Python SDK's protocol) on `com.vmware.vcenter.vm.power`.
    async fn vapi_power(&self, operation: &str, vm: &str, token: &str) -> Value {
        let body = serde_json::json!({
            "jsonrpc": "2.0", "method": "invoke", "id": "1",
            "params": {
                "serviceId": "com.vmware.vcenter.vm.power", "operationId": operation,
                "input": {"STRUCTURE": {"operation-input": {"vm": vm}}},
                "ctx": {"appCtx": {}, "securityCtx": {
                    "schemeId": "com.vmware.vapi.std.security.session_id", "sessionId": token}}
            }
        });
        let r = self.request(Method::POST, "/api").json(&body).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json::<Value>().await.unwrap()["result"].clone()
    }

    async fn state(&self, vm: &str, token: &str) -> String {
        let info = self.json(&format!("/api/vcenter/vm/{vm}/power"), token).await;
        info["state"].as_str().unwrap().to_owned()
    }

    /// Polls the console until it shows `text` (a TCG boot takes a second or two).
    async fn wait_console(&self, vm: &str, token: &str, text: &str) -> String {
        let mut last = String::new();
        for _ in 0..600 {
            let (status, body) = self
                .call(Method::GET, &format!("/api/gateway/vms/{vm}/console"), token)
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body.contains(text) {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the console of {vm} never showed {text:?}; it has {last:?}");
    }
}

fn assert_error(status: StatusCode, body: &str, want: StatusCode, error_type: &str) {
    assert_eq!(status, want, "{body}");
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error_type"], error_type, "{body}");
    assert!(!body["messages"][0]["default_message"].as_str().unwrap().is_empty());
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes: it runs nothing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Kills what a failing test would leave running (QEMU outlives an endpoint on purpose).
struct KillLeftovers(PathBuf);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        let Ok(folders) = std::fs::read_dir(&self.0) else {
            return;
        };
        for folder in folders.flatten() {
            let name = folder.file_name().to_string_lossy().into_owned();
            if let Ok(pid) = std::fs::read_to_string(folder.path().join(format!("{name}.pid"))) {
                let _ = std::process::Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifted_vm_boots_in_the_cloud_and_stops() {
    require_qemu();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud_dir = tmp.path().join("cloud");
    // Room for one 64 MiB VM, not two.
    let env = [("CLOUD_ENDPOINT_DOMAIN__HOST__MEMORY_MIB", "100")];
    let cloud = Cloud::start(&cloud_dir, &pki, &env).await;
    let _leftovers = KillLeftovers(cloud.root.clone());
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let mut vms = Vec::new();
    for name in ["boot01", "boot02"] {
        let vmx = source_vm(&tmp.path().join("src").join(name), name);
        let summary = migrate(&vmx, &target, &MigrateOptions::default())
            .await
            .expect("cold lift");
        vms.push(summary.vm_id);
    }
    let (vm, other) = (vms[0].clone(), vms[1].clone());

    let api = Api::new(&cloud, &pki);
    let op = api.token(MIGRATOR).await;
    let auditor = api.token(AUDITOR).await;
    assert_eq!(api.state(&vm, &op).await, "POWERED_OFF");
    assert_eq!(api.state(&vm, &auditor).await, "POWERED_OFF", "ReadOnly sees the state");

    // Who may, and what exists.
    let (s, b) = api.power(&vm, "start", &auditor).await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "UNAUTHORIZED");
    let (s, b) = api
        .call(Method::GET, &format!("/api/gateway/vms/{vm}/console"), &auditor)
        .await;
    assert_error(s, &b, StatusCode::FORBIDDEN, "UNAUTHORIZED");
    let (s, b) = api.power("vm-9999", "start", &op).await;
    assert_error(s, &b, StatusCode::NOT_FOUND, "NOT_FOUND");
    let (s, b) = api.power(&vm, "hibernate", &op).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");
    let (s, b) = api.power(&vm, "stop", &op).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "ALREADY_IN_DESIRED_STATE");
    let (s, b) = api.power(&vm, "reset", &op).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "NOT_ALLOWED_IN_CURRENT_STATE");

    // Power on: QEMU boots the lifted disk through SeaBIOS.
    let (s, b) = api.power(&vm, "start", &op).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let console = api.wait_console(&vm, &op, MESSAGE).await;
    assert!(console.len() <= 64 << 10);
    assert_eq!(api.state(&vm, &op).await, "POWERED_ON");
    let on = api.json("/api/vcenter/vm?power_states=POWERED_ON", &op).await;
    let on: Vec<&str> = on
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vm"].as_str().unwrap())
        .collect();
    assert_eq!(on, [vm.as_str()]);
    assert_eq!(
        api.json(&format!("/api/vcenter/vm/{vm}"), &op).await["power_state"],
        "POWERED_ON"
    );
    let (s, b) = api
        .call(Method::GET, &format!("/api/gateway/vms/{vm}/console?bytes=4"), &op)
        .await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "ud\r\n"), "the last bytes only");
    let (s, b) = api
        .call(
            Method::GET,
            &format!("/api/gateway/vms/{vm}/console?bytes=2000000"),
            &op,
        )
        .await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "INVALID_ARGUMENT");

    let (s, b) = api.power(&vm, "start", &op).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "ALREADY_IN_DESIRED_STATE");
    // The same through vAPI, with the REST session (sessions are shared).
    let info = api.vapi_power("get", &vm, &op).await;
    assert_eq!(
        info["output"]["STRUCTURE"]["com.vmware.vcenter.vm.power.info"]["state"], "POWERED_ON",
        "{info}"
    );
    let refused = api.vapi_power("start", &vm, &op).await;
    assert!(
        refused["error"]["ERROR"]
            .get("com.vmware.vapi.std.errors.already_in_desired_state")
            .is_some(),
        "{refused}"
    );
    let (s, b) = api.power(&other, "start", &op).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "UNABLE_TO_ALLOCATE_RESOURCE");
    assert!(b.contains("memory"), "{b}");

    let pid = cloud.domain.hosts.pid(&vm).await.expect("a QEMU runs the VM");
    assert!(alive(pid));
    let folder = cloud.root.join("boot01");
    assert_eq!(
        std::fs::read_to_string(folder.join("boot01.pid")).unwrap().trim(),
        pid.to_string()
    );

    // Reset: the guest boots again and prints its text a second time.
    let (s, b) = api.power(&vm, "reset", &op).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let twice = format!("{MESSAGE}\r\n{MESSAGE}");
    api.wait_console(&vm, &op, &twice).await;

    // Power off: QEMU is gone when the call returns.
    let (s, b) = api.power(&vm, "stop", &op).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    assert_eq!(api.state(&vm, &op).await, "POWERED_OFF");
    assert!(!alive(pid), "QEMU {pid} still runs");
    assert!(!folder.join("boot01.pid").exists() && !folder.join("boot01.qmp").exists());
    let (s, b) = api.power(&vm, "stop", &op).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "ALREADY_IN_DESIRED_STATE");
    let off = api.json("/api/vcenter/vm?power_states=POWERED_ON", &op).await;
    assert_eq!(off, serde_json::json!([]));
    // The console of the last boot stays readable.
    assert!(api.wait_console(&vm, &op, MESSAGE).await.contains(MESSAGE));

    // The memory is free again for the other VM.
    let (s, b) = api.power(&other, "start", &op).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    api.wait_console(&other, &op, MESSAGE).await;

    // The endpoint restarts; the VM keeps running and is found again.
    let other_pid = cloud.domain.hosts.pid(&other).await.unwrap();
    cloud.stop().await;
    assert!(alive(other_pid), "VMs outlive an endpoint restart");
    let cloud = Cloud::start(&cloud_dir, &pki, &env).await;
    let api = Api::new(&cloud, &pki);
    // The API answers once the running VMs are found again (the endpoint does that first).
    let op = api.token(MIGRATOR).await;
    assert_eq!(api.state(&other, &op).await, "POWERED_ON");
    assert_eq!(cloud.domain.hosts.pid(&other).await, Some(other_pid));

    // QEMU killed behind the endpoint's back: the VM shows POWERED_OFF.
    let killed = std::process::Command::new("kill")
        .args(["-9", &other_pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut state = String::new();
    for _ in 0..100 {
        state = api.state(&other, &op).await;
        if state == "POWERED_OFF" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "POWERED_OFF");
    assert_eq!(cloud.domain.hosts.pid(&other).await, None);
    cloud.stop().await;
}
