//! The switchover lifecycle of a replication, with the real binaries over QUIC and the
//! HTTPS API on loopback: a switchover that powers the VM on in the cloud and reports its
//! downtime (from the source files' last write), is rolled back (the cloud VM powered off and unregistered, its disks the
//! replica again, what it wrote sent again by the next pass), then switched over again and
//! confirmed; and a scheduled switchover that follows the time the API sets, refuses while
//! the source runs and keeps syncing, and switches over once it is stopped.
//!
//! Needs `qemu-system-x86_64` (tests/setup.sh installs it); without it the tests fail and
//! say so.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub(crate) const MIB: usize = 1 << 20;
pub(crate) const CHUNK_KIB: &str = "256";
const CHUNK: u64 = 256 * 1024;
use e2e::rest::{Rest, SESSION};

/// A small source VM the host can run (64 MiB, one vCPU, BIOS): `regions` MiB of disk.
pub(crate) fn source_vm(dir: &Path, name: &str, regions: &[Fill], seed: u64) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join(format!("{name}.img"));
    write_raw_disk(&disk, MIB, regions, seed);
    let vmx = write_vmx(dir, name, &[&format!("{name}.img")], &[]);
    small_enough_to_boot(&vmx);
    (vmx, disk)
}

/// Writes `data` at `offset` of `file`.
pub(crate) fn write_at(file: &Path, offset: u64, data: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .write_all_at(data, offset)
        .unwrap();
}

/// Sets the modification time of `files` to `at`, as a VM that stopped then left them
/// (`touch -d @SECONDS.NANOS`).
pub(crate) fn last_written_at(files: &[&Path], at: std::time::SystemTime) {
    let t = at.duration_since(std::time::UNIX_EPOCH).unwrap();
    let status = std::process::Command::new("touch")
        .arg("-m")
        .arg("-d")
        .arg(format!("@{}.{:09}", t.as_secs(), t.subsec_nanos()))
        .args(files)
        .status()
        .unwrap();
    assert!(status.success(), "touch {files:?}");
}

pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The migration as `GET /api/gateway/migrations/{id}` shows it.
pub(crate) fn shown(cloud: &Cloud, id: &str) -> Value {
    serde_json::to_value(cloud_endpoint::api::gateway::get_migration(&cloud.domain, id).unwrap()).unwrap()
}

/// Kills the QEMU a failing test would leave running (it outlives an endpoint on purpose).
pub(crate) struct KillVm(pub(crate) Arc<cloud_endpoint::Domain>, pub(crate) String);

impl Drop for KillVm {
    fn drop(&mut self) {
        let (domain, vm) = (self.0.clone(), self.1.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Some(pid) = domain.hosts.pid(&vm).await {
                    let _ = std::process::Command::new("kill")
                        .args(["-9", &pid.to_string()])
                        .status();
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_powers_the_vm_on_reports_its_downtime_and_is_rolled_back_then_confirmed() {
    require_qemu();
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (vmx, disk) = source_vm(
        &tmp.path().join("src"),
        "db02",
        &[Fill::Random, Fill::Random, Fill::Zero, Fill::Random],
        94,
    );
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| edge_json(&bin, &pki, &cloud, &vmx, &state, CHUNK_KIB, args);

    let first = summary(run(edge(&["replicate"])).await);
    let id = first["migration_id"].as_str().unwrap().to_owned();
    // The task API shows the replication: in sync, its last pass, a forecast.
    let task = serde_json::to_value(cloud_endpoint::api::tasks::get(&cloud.domain, &id).unwrap()).unwrap();
    let r = &task["replication"];
    assert_eq!(r["state"], "in sync", "{task}");
    assert_eq!(r["last_delta_bytes"].as_u64(), Some(3 * MIB as u64), "{task}");
    assert!(r["lag_seconds"].as_i64().unwrap() < 60, "{task}");
    assert!(r["last_pass_ms"].is_u64() && r["last_read_back_ms"].is_u64(), "{task}");
    assert!(r["forecast_switchover_seconds"].as_u64().unwrap() >= 1, "{task}");
    assert!(
        r["forecast_done_at"].is_string() && r["switchover_at"].is_null(),
        "{task}"
    );
    let message = task["progress"]["message"]["default_message"].as_str().unwrap();
    assert!(
        message.contains("replicating db02") && message.contains("in sync"),
        "{message}"
    );

    // The operator powered the source off: its files were last written then (VMware
    // rewrites the .vmx at power-off), 1.5 s before the switchover, which powers the VM
    // on in the cloud. The downtime counts from the files' last write.
    let stopped = Instant::now();
    last_written_at(&[&vmx, &disk], std::time::SystemTime::now());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let began = Instant::now();
    let done = summary(run(edge(&["switchover", "--power-on"])).await);
    let wall_ms = began.elapsed().as_millis() as u64;
    let since_stop_ms = stopped.elapsed().as_millis() as u64;
    let off_before_ms = began.duration_since(stopped).as_millis() as u64;
    let vm_id = done["vm_id"].as_str().unwrap().to_owned();
    let _kill = KillVm(cloud.domain.clone(), vm_id.clone());
    let s = &done["switchover"];
    assert_eq!(
        (&s["powered_on"], &s["awaiting_confirm"], &s["downtime_from"]),
        (
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::from("source files last written")
        ),
        "{done}"
    );
    let downtime = s["downtime_ms"].as_u64().expect("a downtime");
    // From the source's stop to the VM running: the time it was off before the
    // switchover, plus at most the command's own run time.
    assert!(
        downtime > off_before_ms && downtime <= since_stop_ms,
        "downtime {downtime} ms; the source stopped {off_before_ms} ms before the switchover, which ran {wall_ms} ms"
    );
    println!(
        "switchover with power-on: downtime {downtime} ms from the source's stop ({off_before_ms} ms before \
         edge-agent switchover, which ran {wall_ms} ms)"
    );
    let pid = cloud.domain.hosts.pid(&vm_id).await.expect("the VM runs in the cloud");
    let vm = cloud.domain.inventory.vm(&vm_id).unwrap().unwrap();
    assert_eq!(vm.power_state, "POWERED_ON");
    let json = shown(&cloud, &id);
    assert_eq!(json["state"], "SUCCEEDED", "{json}");
    assert_eq!(json["replica"]["state"], "switched over (awaiting confirm)", "{json}");
    assert_eq!(json["replica"]["downtime_ms"].as_u64(), Some(downtime), "{json}");
    assert_eq!(json["replica"]["downtime_from"], "source files last written", "{json}");
    // Nothing syncs onto a VM that runs in the cloud: the edge says what to do instead.
    let again = run(edge(&["replicate"])).await;
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.contains("awaits confirmation") && said.contains("rollback"),
        "{said}"
    );

    // The cloud VM writes its disks (a data chunk, and data where the replica holds zeros).
    let flat = cloud.root.join("db02/db02-flat.vmdk");
    write_at(&flat, MIB as u64 + 100, b"written by the cloud VM");
    write_at(&flat, 2 * MIB as u64 + 5, b"also by the cloud VM");
    let rolled = run(edge(&["rollback"])).await;
    let said = summary(rolled);
    let message = said["message"].as_str().unwrap();
    assert!(
        message.contains("rolled back") && message.contains("source can be started again"),
        "{said}"
    );
    assert!(message.contains("changed 1 chunk"), "{said}");
    // The VM never runs in both places: its QEMU is gone before the edge hears back.
    assert!(!alive(pid), "QEMU {pid} still runs");
    assert!(!cloud.domain.hosts.is_running(&vm_id).await);
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty(), "unregistered");
    assert!(
        !cloud.root.join("db02").exists(),
        "the VM folder went back into staging"
    );
    let json = shown(&cloud, &id);
    assert_eq!(
        (&json["state"], &json["replica"]["state"]),
        (&Value::from("RUNNING"), &Value::from("rolled back")),
        "{json}"
    );
    assert_eq!(json["has_receipt"], false, "{json}");
    assert_eq!(json["replica"]["superseded_receipts"], 1, "{json}");
    assert_eq!(cloud.domain.inventory.receipt(&id).unwrap(), None);
    assert_eq!(cloud.domain.inventory.superseded_receipts(&id).unwrap().len(), 1);
    assert!(
        state.join("receipt.json.superseded").is_file(),
        "the edge's copy is marked"
    );
    assert!(!state.join("receipt.json").exists());
    // The rolled-back VM's id is no VM the host can power on.
    assert!(cloud_endpoint::hosts::Hosts::power_on(&cloud.domain, &vm_id)
        .await
        .is_err());

    // The source runs again and changes one chunk; the next pass sends it and the chunk
    // the cloud VM changed (the zero chunk was put back by the rollback itself).
    write_at(&disk, 3 * MIB as u64 + 9, b"the source ran again");
    let pass = summary(run(edge(&["replicate"])).await);
    assert_eq!(pass["sent_bytes"].as_u64(), Some(2 * CHUNK), "{pass}");
    assert_eq!(shown(&cloud, &id)["replica"]["state"], "in sync");

    // Switched over again, confirmed at once: final, nothing left to send.
    let last = summary(run(edge(&["switchover", "--confirm"])).await);
    assert_eq!(last["sent_bytes"].as_u64(), Some(0), "{last}");
    let s = &last["switchover"];
    assert_eq!(
        (&s["powered_on"], &s["awaiting_confirm"]),
        (&Value::Bool(false), &Value::Bool(false)),
        "{last}"
    );
    assert!(images_identical(&disk, &flat));
    let json = shown(&cloud, &id);
    assert_eq!(
        (&json["state"], &json["replica"]["state"]),
        (&Value::from("SUCCEEDED"), &Value::from("done")),
        "{json}"
    );
    assert_eq!(json["has_receipt"], true, "a new receipt: {json}");
    std::fs::remove_file(state.join("receipt.json.superseded")).unwrap();
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    // Confirmed: no rollback any more.
    let late = run(edge(&["rollback"])).await;
    assert!(!late.status.success());
    let said = String::from_utf8_lossy(&late.stderr);
    assert!(
        said.contains("awaiting confirmation") && said.contains("nothing to roll back"),
        "{said}"
    );
    assert!(cloud.domain.inventory.vm_by_name("db02").unwrap().is_some());
    cloud.stop().await;
}

/// A spawned edge, killed if the test ends before it does.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The REST API as the tests call it.
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

    /// `PATCH /api/gateway/migrations/{id}` with `body`: (status, JSON body).
    async fn patch(&self, id: &str, token: &str, body: &str) -> (StatusCode, Value) {
        let r = self
            .request(Method::PATCH, &format!("/api/gateway/migrations/{id}"))
            .header(SESSION, token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_switchover_follows_the_api_and_waits_for_the_source_to_stop() {
    require_qemu();
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    let (vmx, disk) = source_vm(&src, "app02", &[Fill::Random, Fill::Zero, Fill::Random], 95);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // The source runs: VMware's lock is beside its .vmx.
    let lock = src.join("app02.vmx.lck");
    std::fs::create_dir(&lock).unwrap();
    let log = tmp.path().join("edge.log");
    let mut child = Reap(
        edge_command(
            &bin,
            &pki,
            &cloud,
            &vmx,
            &state,
            &[
                "replicate",
                "--every",
                "1s",
                "--switchover-at",
                "2030-01-01T02:00:00Z",
                "--power-on",
                "--chunk-kib",
                CHUNK_KIB,
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let replica = |cloud: &Cloud| {
        cloud
            .domain
            .inventory
            .list_migrations()
            .unwrap()
            .first()
            .and_then(|m| m.replica.clone().map(|r| (m.id.clone(), m.state.clone(), r)))
    };
    // The edge set the time with its first pass; the cloud holds it.
    let (id, _, r) = eventually(60, || replica(&cloud)).await.expect("a first pass");
    assert_eq!(r.switchover_at.as_deref(), Some("2030-01-01T02:00:00Z"), "{r:?}");

    let api = Api::new(&cloud, &pki);
    let operator = api.token(MIGRATOR).await;
    // Only an operator moves it, and only to a time.
    let auditor = api.token(AUDITOR).await;
    let (status, body) = api.patch(&id, &auditor, r#"{"switchover_at": null}"#).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = api.patch(&id, &operator, r#"{"switchover_at": "tomorrow"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = api.patch(&id, &operator, r#"{}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Cleared, then set to a time already past: the edge's next pass learns it and tries
    // the switchover, which is refused while the source runs; passes go on.
    let (status, body) = api.patch(&id, &operator, r#"{"switchover_at": null}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["replica"]["switchover_at"].is_null(), "{body}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let past = edge_agent::migrate::rfc3339(now as i64 - 1).unwrap();
    let (status, body) = api
        .patch(&id, &operator, &format!(r#"{{"switchover_at": "{past}"}}"#))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["replica"]["forecast_done_at"].is_string(), "{body}");
    let refused = eventually(60, || {
        let text = std::fs::read_to_string(&log).unwrap();
        (text.contains("did not run") && text.contains("still runs")).then_some(text)
    })
    .await;
    assert!(refused.is_some(), "{}", std::fs::read_to_string(&log).unwrap());
    let syncs = replica(&cloud).unwrap().2.syncs;
    assert!(
        eventually(60, || (replica(&cloud).unwrap().2.syncs >= syncs + 2).then_some(()))
            .await
            .is_some(),
        "passes go on while the source runs"
    );
    let (_, state_now, _) = replica(&cloud).unwrap();
    assert_eq!(state_now, "RUNNING", "never switched over a running source");
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());

    // The source stops (its last write first): the switchover runs, powers the VM on, and
    // the edge process ends.
    write_at(&disk, 2 * MIB as u64 + 77, b"last write before the stop");
    std::fs::remove_dir(&lock).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap());
    let vm = cloud.domain.inventory.vm_by_name("app02").unwrap().expect("registered");
    let _kill = KillVm(cloud.domain.clone(), vm.id.clone());
    assert_eq!(vm.power_state, "POWERED_ON");
    let json = shown(&cloud, &id);
    assert_eq!(json["replica"]["state"], "switched over (awaiting confirm)", "{json}");
    assert!(json["replica"]["downtime_ms"].as_u64().is_some(), "{json}");
    assert!(json["replica"]["switchover_at"].is_null(), "done with: {json}");
    // Confirmed by the edge: final. The VM keeps running; it is powered off to end.
    let confirmed = run(edge_command(&bin, &pki, &cloud, &vmx, &state, &["confirm"])).await;
    assert!(
        confirmed.status.success(),
        "{}",
        String::from_utf8_lossy(&confirmed.stderr)
    );
    assert_eq!(shown(&cloud, &id)["replica"]["state"], "done");
    cloud_endpoint::hosts::Hosts::power_off(&cloud.domain, &vm.id)
        .await
        .unwrap();
    assert!(images_identical(&disk, &cloud.root.join("app02/app02-flat.vmdk")));
    cloud.stop().await;
}
