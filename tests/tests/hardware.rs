//! The copy's hardware, device for device, over real QUIC and HTTPS on 127.0.0.1 with the
//! real `edge-agent` binary: a VM with a pvscsi, a SATA, an NVMe and an IDE disk, a
//! vmxnet3 and an e1000e NIC with static MACs and EFI firmware lands with each controller's
//! type and position, each NIC's model and address type, and its firmware in the cloud's
//! .vmx, its VMDK descriptors and the REST API, with disks identical to the source's; a
//! BusLogic source with a vmxnet2 NIC is refused at plan time, both devices named, nothing
//! staged; the lifted EFI VM powers on under OVMF with every controller and NIC model QEMU
//! was given.
//!
//! Needs qemu-img, qemu-system-x86_64 and Debian's OVMF (tests/setup.sh installs them);
//! without them the tests fail and say so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

const MIB: usize = 1 << 20;
const SESSION: &str = "vmware-api-session-id";

/// The source's disks: (slot, file), one of each bus.
const DISKS: [(&str, &str); 4] = [
    ("scsi0:0", "os.img"),
    ("sata0:1", "data.img"),
    ("nvme0:0", "logs.img"),
    ("ide0:1", "swap.img"),
];

/// hw01: EFI, a pvscsi, a SATA, an NVMe and an IDE disk (1 MiB each, different content),
/// a vmxnet3 and an e1000e NIC with static MACs.
fn source_vm(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    use Fill::*;
    let mut vmx = String::from(
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\n\
         displayName = \"hw01\"\nguestOS = \"debian12-64\"\nnumvcpus = \"1\"\nmemsize = \"64\"\n\
         firmware = \"efi\"\n\
         scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\n\
         sata0.present = \"TRUE\"\nnvme0.present = \"TRUE\"\n",
    );
    for (seed, (slot, file)) in DISKS.iter().enumerate() {
        write_raw_disk(&dir.join(file), MIB / 4, &[Text, Random, Zero, Text], 40 + seed as u64);
        vmx.push_str(&format!("{slot}.present = \"TRUE\"\n{slot}.fileName = \"{file}\"\n"));
    }
    for (n, (model, mac)) in [("vmxnet3", "00:50:56:00:02:01"), ("e1000e", "00:50:56:00:02:02")]
        .iter()
        .enumerate()
    {
        vmx.push_str(&format!(
            "ethernet{n}.present = \"TRUE\"\nethernet{n}.virtualDev = \"{model}\"\n\
             ethernet{n}.networkName = \"VM Network\"\nethernet{n}.addressType = \"static\"\n\
             ethernet{n}.address = \"{mac}\"\n"
        ));
    }
    let path = dir.join("hw01.vmx");
    std::fs::write(&path, vmx).unwrap();
    path
}

/// `edge-agent <command> --vmx ...` against `cloud`, as an operator would run it.
fn edge(bin: &Path, pki: &Pki, cloud: &Cloud, vmx: &Path, state: &Path, command: &str) -> Output {
    edge_at(bin, pki, cloud.addr.port(), MIGRATOR, command)
        .arg("--vmx")
        .arg(vmx)
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

/// The REST API with one session.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn login(cloud: &Cloud, pki: &Pki) -> Api {
        let http = e2e::rest::https_client(pki);
        let base = format!("https://{}", cloud.api_addr.expect("API on"));
        let login = http
            .post(format!("{base}/api/session"))
            .basic_auth(MIGRATOR, Some(DEMO_PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(login.status(), StatusCode::CREATED);
        let token: String = login.json().await.unwrap();
        Api { http, base, token }
    }

    async fn call(&self, method: Method, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(SESSION, &self.token)
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(Method::GET, path).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// Lifts hw01 with the real edge-agent; the cloud, its VM folder and the source folder.
async fn lift_hw01(tmp: &Path, pki: &Pki) -> (Cloud, PathBuf, PathBuf) {
    let bin = wan::ensure_binaries();
    let cloud = Cloud::start(&tmp.join("cloud"), pki, &[]).await;
    let src = tmp.join("src");
    let vmx = source_vm(&src);
    let state = tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let lift = edge(&bin, pki, &cloud, &vmx, &state, "migrate");
    let out = text(&lift);
    println!("{out}");
    assert!(lift.status.success(), "{out}");
    let dest = cloud.root.join("hw01");
    (cloud, dest, src)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_controller_nic_model_and_the_firmware_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let (cloud, dest, src) = lift_hw01(tmp.path(), &pki).await;

    // The cloud's .vmx: each controller's type and position, each disk in its slot, each
    // NIC's model, address type and MAC, the firmware.
    let vmx = std::fs::read_to_string(dest.join("hw01.vmx")).unwrap();
    let lines: Vec<&str> = vmx.lines().collect();
    for expected in [
        "firmware = \"efi\"",
        "scsi0.present = \"TRUE\"",
        "scsi0.virtualDev = \"pvscsi\"",
        "scsi0:0.fileName = \"hw01.vmdk\"",
        "scsi0:0.deviceType = \"scsi-hardDisk\"",
        "sata0.present = \"TRUE\"",
        "sata0:1.fileName = \"hw01_1.vmdk\"",
        "nvme0.present = \"TRUE\"",
        "nvme0:0.fileName = \"hw01_2.vmdk\"",
        "ide0:1.fileName = \"hw01_3.vmdk\"",
        "ide0:1.deviceType = \"ata-hardDisk\"",
        "ethernet0.virtualDev = \"vmxnet3\"",
        "ethernet0.addressType = \"static\"",
        "ethernet0.address = \"00:50:56:00:02:01\"",
        "ethernet1.virtualDev = \"e1000e\"",
        "ethernet1.addressType = \"static\"",
        "ethernet1.address = \"00:50:56:00:02:02\"",
    ] {
        assert!(lines.contains(&expected), "missing {expected:?} in\n{vmx}");
    }
    assert!(!vmx.contains("lsilogic"), "no controller changed: {vmx}");
    assert!(
        !vmx.contains("sata0.virtualDev") && !vmx.contains("nvme0.virtualDev"),
        "{vmx}"
    );

    // Each VMDK descriptor's adapter type follows its disk's bus; the disks are the source's.
    for (i, (slot, file)) in DISKS.iter().enumerate() {
        let name = if i == 0 {
            "hw01.vmdk".to_owned()
        } else {
            format!("hw01_{i}.vmdk")
        };
        let descriptor = std::fs::read_to_string(dest.join(&name)).unwrap();
        let adapter = if slot.starts_with("ide") { "ide" } else { "lsilogic" };
        assert!(
            descriptor.contains(&format!("ddb.adapterType = \"{adapter}\"")),
            "{slot}: {descriptor}"
        );
        assert!(images_identical(&src.join(file), &dest.join(&name)), "{slot}");
    }

    // The REST API reports what the .vmx says.
    let api = Api::login(&cloud, &pki).await;
    let vm = cloud.domain.inventory.vm_by_name("hw01").unwrap().expect("registered");
    let info = api.get(&format!("/api/vcenter/vm/{}", vm.id)).await;
    println!("{info:#}");
    assert_eq!(info["boot"]["type"], "EFI");
    let disks = &info["disks"];
    assert_eq!(disks["2000"]["type"], "SCSI");
    assert_eq!(disks["2000"]["scsi"], serde_json::json!({"bus": 0, "unit": 0}));
    assert_eq!(disks["2001"]["type"], "SATA");
    assert_eq!(disks["2001"]["sata"], serde_json::json!({"bus": 0, "unit": 1}));
    assert_eq!(disks["2002"]["type"], "NVME");
    assert_eq!(disks["2002"]["nvme"], serde_json::json!({"bus": 0, "unit": 0}));
    assert_eq!(disks["2003"]["type"], "IDE");
    assert_eq!(
        disks["2003"]["ide"],
        serde_json::json!({"primary": true, "master": false})
    );
    assert_eq!(info["scsi_adapters"]["1000"]["type"], "PVSCSI");
    assert_eq!(info["sata_adapters"]["15000"]["type"], "AHCI");
    assert_eq!(info["nvme_adapters"]["31000"]["bus"], 0);
    let nics = &info["nics"];
    assert_eq!(nics["4000"]["type"], "VMXNET3");
    assert_eq!(nics["4000"]["mac_type"], "MANUAL");
    assert_eq!(nics["4000"]["mac_address"], "00:50:56:00:02:01");
    assert_eq!(nics["4001"]["type"], "E1000E");
    assert_eq!(nics["4001"]["mac_type"], "MANUAL");

    // vAPI (the Python SDK's protocol) reports the same.
    let r = api
        .http
        .post(format!("{}/api", api.base))
        .json(&serde_json::json!({
            "jsonrpc": "2.0", "method": "invoke", "id": "1",
            "params": {
                "serviceId": "com.vmware.vcenter.VM", "operationId": "get",
                "input": {"STRUCTURE": {"operation-input": {"vm": vm.id}}},
                "ctx": {"appCtx": {}, "securityCtx": {
                    "schemeId": "com.vmware.vapi.std.security.session_id", "sessionId": api.token}}
            }
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.text().await.unwrap();
    for needle in ["\"PVSCSI\"", "\"AHCI\"", "\"VMXNET3\"", "\"E1000E\"", "\"EFI\""] {
        assert!(body.contains(needle), "vAPI get lacks {needle}: {body}");
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buslogic_source_is_refused_at_plan_time_with_the_devices_named() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("old.img"), MIB / 4, &[Fill::Text; 4], 50);
    let vmx = write_vmx(
        &src,
        "old01",
        &["old.img"],
        &[Nic {
            network: "VM Network",
            mac: "00:50:56:00:03:01",
        }],
    );
    let text_in = std::fs::read_to_string(&vmx)
        .unwrap()
        .replace("scsi0.virtualDev = \"pvscsi\"", "scsi0.virtualDev = \"buslogic\"")
        .replace(
            "ethernet0.virtualDev = \"vmxnet3\"",
            "ethernet0.virtualDev = \"vmxnet2\"",
        );
    std::fs::write(&vmx, text_in).unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();

    for command in ["plan", "migrate"] {
        let out = edge(&bin, &pki, &cloud, &vmx, &state, command);
        let all = text(&out);
        println!("{command}: {all}");
        assert!(!out.status.success(), "{command}: {all}");
        let headline = if command == "plan" {
            "plan of old01 refused by the endpoint: 2 problem(s)"
        } else {
            "the cloud endpoint refused the migration plan; nothing was registered in the cloud"
        };
        assert!(all.contains(headline), "{command}: {all}");
        assert!(
            all.contains(
                "scsi0: BusLogic controller: QEMU cannot emulate it; change the controller to lsilogic or pvscsi in the source VM before lifting"
            ),
            "{command}: {all}"
        );
        assert!(
            all.contains("ethernet0: NIC model vmxnet2: QEMU has no model for it"),
            "{command}: {all}"
        );
    }
    // Nothing staged, nothing registered.
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new());
    assert!(cloud.domain.inventory.vm_by_name("old01").unwrap().is_none());
    cloud.stop().await;
}

/// Kills what a failing test would leave running (QEMU outlives an endpoint on purpose).
struct KillLeftovers(PathBuf);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.0.join("hw01.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_efi_vm_powers_on_under_ovmf_with_its_controllers_and_nics() {
    require_qemu();
    let ovmf = gateway::qemu::Ovmf::from_env()
        .unwrap_or_else(|e| panic!("this test boots an EFI VM and needs OVMF: {e}; run tests/setup.sh"));
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let (cloud, dest, _src) = lift_hw01(tmp.path(), &pki).await;
    let _leftovers = KillLeftovers(dest.clone());
    let api = Api::login(&cloud, &pki).await;
    let vm = cloud.domain.inventory.vm_by_name("hw01").unwrap().unwrap().id;

    let (status, body) = api
        .call(Method::POST, &format!("/api/vcenter/vm/{vm}/power?action=start"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");

    // QEMU runs OVMF's code read-only and the VM's own copy of its variable store, with a
    // device of each controller and NIC model the .vmx names.
    let pid: u32 = std::fs::read_to_string(dest.join("hw01.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    let vars = dest.join("hw01.ovmf-vars.fd");
    for needle in [
        format!("if=pflash,format=raw,unit=0,readonly=on,file={}", ovmf.code.display()),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        "pvscsi,id=scsi0".into(),
        "scsi-hd,drive=drive0,id=disk0,bus=scsi0.0,scsi-id=0,lun=0,bootindex=0".into(),
        "ich9-ahci,id=sata0".into(),
        "ide-hd,drive=drive1,id=disk1,bus=sata0.1".into(),
        "nvme,id=nvme0,serial=nvme0".into(),
        "nvme-ns,drive=drive2,id=disk2,bus=nvme0,nsid=1".into(),
        "ide-hd,drive=drive3,id=disk3,bus=ide.0,unit=1".into(),
        "vmxnet3,id=nic0".into(),
        "mac=00:50:56:00:02:01".into(),
        "e1000e,id=nic1".into(),
    ] {
        assert!(argv.contains(&needle), "QEMU's command line lacks {needle:?}: {argv}");
    }
    assert!(vars.is_file(), "the VM's variable store is in its folder");

    // OVMF starts: its boot manager writes to the serial console.
    let mut console = String::new();
    for _ in 0..900 {
        let (status, body) = api.call(Method::GET, &format!("/api/gateway/vms/{vm}/console")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        console = body;
        if console.contains("BdsDxe") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        console.contains("BdsDxe"),
        "OVMF never wrote to the console: {console:?}"
    );

    let (status, body) = api
        .call(Method::POST, &format!("/api/vcenter/vm/{vm}/power?action=stop"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    cloud.stop().await;
}
