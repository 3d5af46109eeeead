//! Live migration of a running QEMU guest into the cloud domain, over real QUIC on
//! loopback. The guest (tests/live/guest.sh: a Debian cloud kernel and a busybox
//! initramfs) prints `counter N` on its serial console and records N on its disk.
//!
//! - The guest moves while it runs: the cloud's console continues the counter without a
//!   reset, the disk written during the migration checks out, the VM is POWERED_ON in the
//!   inventory, the source has stopped, and the destination's QEMU runs confined (its own
//!   user, the sandbox, the database out of reach) as the hosts' VMs do.
//! - A plan the host or the datastore cannot hold (memory; boot files beside the disk) is
//!   refused before memory moves, naming both.
//! - The link breaks during pre-copy: the migration fails, the source runs on, the
//!   destination is torn down and nothing is registered.
//!
//! Needs qemu-system-x86_64 (tests/setup.sh installs it); without it each test fails and
//! says so.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::guest::*;
use e2e::relay::Relay;
use e2e::*;
use edge_agent::live::{self, LiveOptions, LiveProgress};
use edge_agent::migrate::MigrateOptions;
use gateway::transport::{PathEstimate, TransportTuning};
use serde_json::{json, Value};

const IDLE_SECS: u64 = 3;

fn opts(source: &Source, link: Option<PathEstimate>) -> LiveOptions {
    LiveOptions {
        qmp: source.qmp.clone(),
        kernel: Some(source.kernel.clone()),
        link,
        lift: MigrateOptions {
            tuning: TransportTuning {
                idle_timeout: Duration::from_secs(IDLE_SECS),
                ..TransportTuning::default()
            },
            ..MigrateOptions::default()
        },
        ..LiveOptions::default()
    }
}

/// A cloud endpoint (`host_memory_mib` for its host and `datastore_bytes` for its
/// datastore's capacity, if given) and a running source VM `name` whose kernel command
/// line adds `append`.
async fn setup(
    name: &str,
    append: &str,
    host_memory_mib: Option<&str>,
    datastore_bytes: Option<&str>,
) -> (tempfile::TempDir, Pki, Cloud, Source) {
    let binary = require_qemu();
    // Short: unix socket paths (QMP) must stay under 108 bytes.
    let tmp = tempfile::Builder::new().prefix("lv").tempdir_in("/tmp").unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let idle = IDLE_SECS.to_string();
    let mut env = vec![("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", idle.as_str())];
    if let Some(mib) = host_memory_mib {
        env.push(("CLOUD_ENDPOINT_DOMAIN__HOST__MEMORY_MIB", mib));
    }
    if let Some(bytes) = datastore_bytes {
        env.push(("CLOUD_ENDPOINT_DOMAIN__DATASTORE__CAPACITY_BYTES", bytes));
    }
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &env).await;
    let source = start_source(&binary, &tmp.path().join("src"), name, append).await;
    (tmp, pki, cloud, source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_guest_moves_into_the_cloud_and_keeps_counting() {
    let (_tmp, pki, cloud, source) = setup("live01", "", None, None).await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let seen: Arc<Mutex<Vec<LiveProgress>>> = Arc::default();
    let progress = {
        let seen = seen.clone();
        move |p: LiveProgress| {
            println!("{}", live::describe(&p));
            seen.lock().unwrap().push(p);
        }
    };
    // The link is measured by a short link test: the forecast is the real one.
    let summary = live::run(&source.vm, &target, &opts(&source, None), &progress)
        .await
        .expect("the live migration succeeds");
    println!("{}", live::summary_text(&summary));
    let last_source = *counters(&source.serial).last().unwrap();

    // The forecast came first, from the measured link and dirty rate.
    let seen = seen.lock().unwrap().clone();
    match &seen[0] {
        LiveProgress::Forecast(f) => {
            assert!(f.converges, "{f:?}");
            assert!(f.link_bytes_per_s > 1e6 && f.rtt_ms < 50.0, "{f:?}");
            assert_eq!(f.memory_bytes, 256 << 20);
        }
        other => panic!("the first event is {other:?}, not the forecast"),
    }
    assert!(seen
        .iter()
        .any(|p| matches!(p, LiveProgress::Storage { ready: true, .. })));
    assert!(summary.downtime_ms > 0 && summary.downtime_ms < 5_000, "{summary:?}");
    assert!(summary.ram_transferred > 1 << 20, "{summary:?}");
    assert!(
        summary.tunnel_wire_bytes < summary.tunnel_plain_bytes,
        "the tunnels compress: {summary:?}"
    );

    // The source has stopped; the cloud's VM is POWERED_ON and keeps counting where the
    // source left off, with no reboot in between.
    let mut process = source.process;
    let quit = eventually(10, || process.0.try_wait().unwrap()).await;
    assert!(quit.is_some(), "the source QEMU quit");
    let vm = cloud
        .domain
        .inventory
        .vm_by_name("live01")
        .unwrap()
        .expect("registered");
    assert_eq!(vm.id, summary.vm_id);
    assert_eq!(vm.power_state, "POWERED_ON");
    assert_eq!(vm.nics[0].mac.as_deref(), Some("00:50:56:12:34:56"));
    destination_is_confined(&cloud, &vm.id).await;
    let console = cloud.root.join("live01/live01.console.log");
    let after = wait_counter(&console, last_source + 5, 30).await;
    let cloud_counters = counters(&console);
    assert_eq!(
        cloud_counters.first().copied(),
        Some(last_source + 1),
        "the cloud continues at the source's last counter + 1 ({last_source}): {cloud_counters:?}"
    );
    assert!(
        cloud_counters.windows(2).all(|w| w[1] == w[0] + 1),
        "{cloud_counters:?}"
    );
    assert!(
        !std::fs::read_to_string(&console).unwrap().contains("Linux version"),
        "the guest did not boot again in the cloud"
    );
    // The API shows it running too.
    let task = cloud_endpoint::api::tasks::get(&cloud.domain, &summary.migration_id).unwrap();
    assert_eq!(task.status, "SUCCEEDED");

    // Power it off, then the disk it wrote before, during and after the migration
    // checks out, up to the last counter the cloud printed.
    cloud_endpoint::hosts::Hosts::power_off(&cloud.domain, &vm.id)
        .await
        .unwrap();
    let disk = std::fs::read_dir(cloud.root.join("live01"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with("-flat.vmdk") || n.ends_with(".qcow2") || n.ends_with(".img")
        })
        .expect("the disk in the VM's folder");
    let check = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("live/check-disk.py"))
        .arg(&disk)
        .args(["--min-counter", &after.saturating_sub(10).to_string(), "--json"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "check-disk: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    cloud.stop().await;
}

/// The destination's QEMU, now the VM's, runs as the hosts' VMs do (hardening.rs): as
/// QEMU's own user, in its seccomp sandbox, and cannot open the inventory's database or
/// the endpoint's key although it loaded a memory stream the edge sent.
async fn destination_is_confined(cloud: &Cloud, vm: &str) {
    assert!(
        process_is_root(),
        "the destination's own user is used when the endpoint runs as root: run this test as root (CI does)"
    );
    let user = Command::new("id")
        .args(["-u", cloud_endpoint::config::DEFAULT_QEMU_USER])
        .output()
        .unwrap();
    assert!(
        user.status.success(),
        "the user {} is missing: run tests/setup.sh (it creates it)",
        cloud_endpoint::config::DEFAULT_QEMU_USER
    );
    let pid = cloud.domain.hosts.pid(vm).await.expect("the destination runs on");
    assert_eq!(
        proc_status(pid, "Uid"),
        String::from_utf8(user.stdout).unwrap().trim(),
        "the destination's QEMU does not run as its own user"
    );
    assert_eq!(
        proc_status(pid, "Seccomp"),
        "2",
        "the destination's QEMU runs without its sandbox"
    );
    let qemu = cloud.domain.hosts.process(vm).await.unwrap();
    let database = cloud.domain.inventory.path().to_owned();
    let err = qemu
        .qmp()
        .execute(
            "blockdev-add",
            json!({"driver": "file", "node-name": "stolen-db", "filename": database.to_str().unwrap(), "read-only": true}),
        )
        .await
        .expect_err("the destination's QEMU opened the inventory's database");
    assert!(err.to_string().contains("Permission denied"), "{err}");
}

fn process_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_that_breaks_during_pre_copy_leaves_the_source_running() {
    // A guest that rewrites 48 MiB of memory all the time: pre-copy takes passes.
    let (_tmp, pki, cloud, source) = setup("live02", "dirty=48", None, None).await;
    let relay = Arc::new(Relay::start(cloud.addr).await);
    let mut target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    target.endpoints[0].addr = relay.addr;
    let cut_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let cut = {
        let (relay, cut_at) = (relay.clone(), cut_at.clone());
        move || {
            let mut at = cut_at.lock().unwrap();
            if at.is_none() {
                relay.cut();
                *at = Some(Instant::now());
            }
        }
    };
    // The cut comes at the first memory progress report, or once 4,000 more datagrams
    // crossed after the mirror was ready (the memory migration starts then), whichever is
    // first: progress is polled once a second, and an idle machine can finish pre-copy
    // within that second.
    let memory_started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let progress = {
        let (cut, memory_started) = (cut.clone(), memory_started.clone());
        move |p: LiveProgress| {
            println!("{}", live::describe(&p));
            match p {
                LiveProgress::Memory { .. } => cut(),
                LiveProgress::Storage { ready: true, .. } => {
                    memory_started.store(true, std::sync::atomic::Ordering::SeqCst)
                }
                _ => {}
            }
        }
    };
    let watcher = tokio::spawn({
        let relay = relay.clone();
        async move {
            let mut from = None;
            loop {
                tokio::time::sleep(Duration::from_millis(2)).await;
                if !memory_started.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let now = relay.forwarded();
                if now >= *from.get_or_insert(now) + 4_000 {
                    cut();
                    return;
                }
            }
        }
    });
    let link = PathEstimate {
        rate_bps: 1_000_000_000,
        rtt: Duration::from_millis(1),
    };
    let mut o = opts(&source, Some(link));
    o.auto_converge = true;
    let err = live::run(&source.vm, &target, &o, &progress)
        .await
        .expect_err("a cut link fails the migration");
    watcher.abort();
    println!("error: {err}");
    assert!(cut_at.lock().unwrap().is_some(), "the link was cut during pre-copy");

    // The source runs on and keeps counting.
    let qmp = gateway::qemu::Qmp::connect(&source.qmp)
        .await
        .expect("QMP of the source");
    let status: Value = qmp.execute("query-status", json!(null)).await.unwrap();
    assert_eq!(status["status"], "running", "{status}");
    let before = *counters(&source.serial).last().unwrap();
    wait_counter(&source.serial, before + 3, 30).await;
    let jobs = qmp.execute("query-block-jobs", json!(null)).await.unwrap();
    assert_eq!(jobs, json!([]), "no mirror left behind");

    // The cloud tore its destination down once the link was gone: no VM, no files,
    // no QEMU.
    let gone = eventually(20, || {
        let ms = cloud.domain.inventory.list_migrations().unwrap();
        (ms.len() == 1 && ms[0].state == "FAILED" && cloud.datastore_entries().is_empty()).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "{:?} {:?}",
        cloud.domain.inventory.list_migrations().unwrap(),
        cloud.datastore_entries()
    );
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
    let cloud_root = cloud.root.display().to_string();
    let left = eventually(10, || (!qemu_running_under(&cloud_root)).then_some(())).await;
    assert!(left.is_some(), "a destination QEMU still runs under {cloud_root}");
    quit(qmp, source.process).await;
    cloud.stop().await;
}

/// Quits the source QEMU (killed if it does not go).
async fn quit(qmp: gateway::qemu::Qmp, mut process: Killed) {
    let _ = qmp.execute("quit", json!(null)).await;
    let _ = eventually(10, || process.0.try_wait().unwrap()).await;
}

/// Whether a QEMU process runs with files under `root` on its command line.
fn qemu_running_under(root: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("qemu-system") && c.contains(root)
            })
            .unwrap_or(false)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_that_cannot_converge_or_fit_is_refused_before_memory_moves() {
    // A host with less memory than the guest has: the destination cannot start there. A
    // datastore of 65 MiB: the 64 MiB disk fits, the kernel and initrd (several MiB)
    // beside it do not.
    let (_tmp, pki, cloud, source) = setup("live03", "dirty=32", Some("128"), Some("68157440")).await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let quiet = |p: LiveProgress| println!("{}", live::describe(&p));

    // On a 10 Mbit/s link this guest dirties memory faster than it crosses: the forecast
    // refuses before the cloud is asked for anything.
    let slow = PathEstimate {
        rate_bps: 10_000_000,
        rtt: Duration::from_millis(150),
    };
    let err = live::run(&source.vm, &target, &opts(&source, Some(slow)), &quiet)
        .await
        .expect_err("a guest that cannot converge is refused")
        .to_string();
    assert!(
        err.contains("does not converge") && err.contains("--auto-converge"),
        "{err}"
    );
    assert!(
        cloud.domain.inventory.list_migrations().unwrap().is_empty(),
        "nothing asked of the cloud"
    );

    // With --auto-converge the cloud is asked, and refuses: the host cannot hold the VM,
    // and the datastore cannot hold its boot files beside its disk.
    let mut o = opts(&source, Some(slow));
    o.auto_converge = true;
    let err = live::run(&source.vm, &target, &o, &quiet)
        .await
        .expect_err("a VM the host cannot hold is refused");
    match &err {
        edge_agent::MigrateError::Refused { code, problems } => {
            assert_eq!(*code, gateway::wire::RefusalCode::PlanRejected, "{err}");
            assert!(problems.iter().any(|p| p.contains("MiB")), "{problems:?}");
            assert!(
                problems.iter().any(|p| p.starts_with("datastore cloud-ds1 has")
                    && p.contains("the kernel and initrd of the live migration, beside its disks, need")),
                "{problems:?}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(cloud.domain.inventory.list_migrations().unwrap().is_empty());
    let left = cloud.datastore_entries();
    assert!(left.is_empty(), "left in the datastore: {left:?}");
    assert!(!qemu_running_under(&cloud.root.display().to_string()));

    // The source never noticed.
    let qmp = gateway::qemu::Qmp::connect(&source.qmp).await.unwrap();
    let status: Value = qmp.execute("query-status", json!(null)).await.unwrap();
    assert_eq!(status["status"], "running");
    quit(qmp, source.process).await;
    cloud.stop().await;
}
