//! Pre-flight and placement as an operator meets them, with the real `edge-agent` binary
//! and the HTTPS API: a plan with an unknown folder, too much memory and a disk too big
//! for its datastore gets all three problems at once (not just the folder), and a disk
//! placed on a datastore set up for qcow2 lands as a qcow2 image beside the VM's VMDK on
//! its own datastore: `qemu-img check` clean, `qemu-img compare` identical, and the .vmx,
//! the inventory and the report naming each disk's real file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;
const SESSION: &str = "vmware-api-session-id";

/// `edge-agent <command> --vmx ... <extra>` as the migration operator.
fn edge(bin: &Path, pki: &Pki, cloud: &Cloud, vmx: &Path, state: &Path, command: &str, extra: &[&str]) -> Output {
    edge_at(bin, pki, cloud.addr.port(), MIGRATOR, command)
        .arg("--vmx")
        .arg(vmx)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
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

/// A request with a fresh session of the migration operator: status and JSON body.
async fn api(cloud: &Cloud, pki: &Pki, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
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

/// `<dir>/<name>.vmx` with `memsize` MiB of memory and one disk per `(file, MiB)`.
fn source_vm(dir: &Path, name: &str, memsize: u64, disks: &[(&str, usize)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for (i, (file, mib)) in disks.iter().enumerate() {
        // Text, random data and a hole: a bit of every kind of chunk.
        let layout: Vec<Fill> = (0..*mib)
            .map(|r| match r % 4 {
                0 => Fill::Text,
                1 | 2 => Fill::Random,
                _ => Fill::Zero,
            })
            .collect();
        write_raw_disk(&dir.join(file), MIB, &layout, 90 + i as u64);
    }
    let files: Vec<&str> = disks.iter().map(|(f, _)| *f).collect();
    let vmx = write_vmx(dir, name, &files, &[]);
    let text = std::fs::read_to_string(&vmx).unwrap();
    std::fs::write(
        &vmx,
        text.replace("memsize = \"2048\"", &format!("memsize = \"{memsize}\"")),
    )
    .unwrap();
    vmx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_folder_does_not_hide_the_memory_and_space_problems() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    // The default host has 256 GiB; the datastore takes 4 MiB of migrated disks.
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_DOMAIN__DATASTORE__CAPACITY_BYTES", "4194304")],
    )
    .await;
    let state = tmp.path().join("state");
    // 512 GiB of memory and an 8 MiB disk.
    let vmx = source_vm(&tmp.path().join("src"), "big01", 512 << 10, &[("big01.img", 8)]);

    let out = edge(&bin, &pki, &cloud, &vmx, &state, "plan", &["--folder", "Nowhere"]);
    let said = text(&out);
    println!("{said}");
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("refused by the endpoint: 3 problem(s)"), "{said}");
    for needle in [
        "VM folder \"Nowhere\" (--folder) is not in the cloud domain; choose one of: vm (group-v3), Migrated VMs (group-v",
        "the VM has 524288 MiB of memory but host esx-cloud-01.local",
        "has 262144 MiB",
        "need 8388608 bytes but it has 4194304 bytes free",
    ] {
        assert!(said.contains(needle), "no {needle:?} in:\n{said}");
    }

    // The API checks the same plan the same way.
    let plan = json!({
        "vm": {
            "name": "big01", "guest_os": "debian12_64Guest", "num_cpus": 2, "memory_mib": 524288,
            "nics": [], "disks": [{"key": "scsi0:0", "capacity": 8 * MIB}]
        },
        "placement": {"folder": "Nowhere"}
    });
    let (status, body) = api(&cloud, &pki, Method::POST, "/api/gateway/plans", Some(plan)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let messages: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["default_message"].as_str().unwrap())
        .collect();
    println!("{messages:#?}");
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(messages[0].contains("VM folder \"Nowhere\""), "{messages:#?}");
    assert!(
        messages.iter().any(|m| m.contains("524288 MiB of memory")),
        "{messages:#?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("need 8388608 bytes")),
        "{messages:#?}"
    );

    // Nothing recorded or staged by either.
    assert!(cloud.domain.inventory.list_migrations().unwrap().is_empty());
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new());
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_on_a_qcow2_datastore_lands_as_qcow2() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let root = tmp.path().join("cloud");
    let (ds1, ds2) = (root.join("datastore"), root.join("kvm-ds"));
    let extra = format!("[{{name=\"kvm-ds\",dir=\"{}\",disk_format=\"qcow2\"}}]", ds2.display());
    let cloud = Cloud::start(&root, &pki, &[("CLOUD_ENDPOINT_DOMAIN__EXTRA_DATASTORES", &extra)]).await;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let src = tmp.path().join("src");
    let vmx = source_vm(&src, "mix01", 2048, &[("os.img", 6), ("data.img", 5)]);
    let placed = ["--disk-datastore", "scsi0:1=kvm-ds"];

    // The plan says so before anything moves.
    let out = edge(&bin, &pki, &cloud, &vmx, &state, "plan", &placed);
    let said = text(&out);
    println!("{said}");
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("disk scsi0:0: 6291456 bytes on datastore cloud-ds1 (datastore-"),
        "{said}"
    );
    assert!(said.contains(") as vmdk"), "{said}");
    assert!(
        said.contains("disk scsi0:1: 5242880 bytes on datastore kvm-ds (datastore-"),
        "{said}"
    );
    assert!(said.contains(") as qcow2"), "{said}");

    let receipt = state.join("receipt.json");
    let mut args = placed.to_vec();
    args.extend(["--json", "--receipt", receipt.to_str().unwrap()]);
    let out = edge(&bin, &pki, &cloud, &vmx, &state, "migrate", &args);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let summary: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();

    // The VM's disk as a VMDK beside its .vmx, the other as qcow2 on its datastore.
    let home = ds1.join("mix01");
    let qcow2 = ds2.join("mix01/mix01_1.qcow2");
    let mut files: Vec<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["mix01-flat.vmdk", "mix01.vmdk", "mix01.vmx"]);
    let info = qemu_img(&["info", "--output=json", qcow2.to_str().unwrap()]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    let check = qemu_img(&["check", qcow2.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(images_identical(&src.join("os.img"), &home.join("mix01.vmdk")));
    assert!(images_identical(&src.join("data.img"), &qcow2));

    // The .vmx, the inventory and the report name each disk's real file.
    let vmx_text = std::fs::read_to_string(home.join("mix01.vmx")).unwrap();
    let absolute = std::path::absolute(&qcow2).unwrap();
    assert!(vmx_text.contains("scsi0:0.fileName = \"mix01.vmdk\""), "{vmx_text}");
    assert!(
        vmx_text.contains(&format!("scsi0:1.fileName = \"{}\"", absolute.display())),
        "{vmx_text}"
    );
    let vm = cloud.domain.inventory.vm_by_name("mix01").unwrap().expect("registered");
    let paths: Vec<&str> = vm.disks.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(paths, ["[cloud-ds1] mix01/mix01.vmdk", "[kvm-ds] mix01/mix01_1.qcow2"]);
    let report = &summary["report"];
    assert_eq!(report["disk_format"], "vmdk");
    assert_eq!(report["disks"][1]["format"], "qcow2", "{report}");
    assert_eq!(report["disks"][1]["path"], "[kvm-ds] mix01/mix01_1.qcow2");
    let migration = &cloud.domain.inventory.list_migrations().unwrap()[0];
    let (status, stored) = api(
        &cloud,
        &pki,
        Method::GET,
        &format!("/api/gateway/migrations/{}/report", migration.id),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    assert_eq!(stored["disks"][1]["format"], "qcow2");
    assert_eq!(stored["disks"][0]["format"], "vmdk");

    // The receipt verifies against the source, disk by disk.
    let verified = Command::new(bin.join("edge-agent"))
        .arg("verify-receipt")
        .arg("--receipt")
        .arg(&receipt)
        .arg(&vmx)
        .arg("--ca-bundle")
        .arg(pki.path("ca.pem"))
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", text(&verified));
    cloud.stop().await;
}
