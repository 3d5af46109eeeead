//! Migrations that break and go on: an endpoint restarted mid-transfer (the edge
//! reconnects by itself), an edge killed with SIGKILL and run again, a source changed
//! while paused (refused), and `edge-agent abort`. Each ends with a disk identical to
//! the source and a receipt that verifies, or with nothing left behind; the bytes sent
//! again after each break are printed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::*;
use edge_agent::migrate::{self, MigrateOptions};
use edge_agent::source;
use gateway::transport::Rate;

const MIB: usize = 1 << 20;

fn vm(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    // Mostly incompressible, a few holes: the transfer takes a while under a cap.
    let regions: Vec<Fill> = (0..mib)
        .map(|i| if i % 8 == 7 { Fill::Zero } else { Fill::Random })
        .collect();
    write_raw_disk(&dir.join(format!("{name}.img")), MIB, &regions, seed);
    write_vmx(dir, name, &[&format!("{name}.img")], &[])
}

/// Remembers the last progress report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_restarted_mid_transfer_is_resumed_by_the_edge() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let root = tmp.path().join("cloud");
    let cloud = Cloud::start(&root, &pki, &[]).await;
    let addr = cloud.addr;
    let vmx = vm(&tmp.path().join("src"), "db01", 24, 71);
    let source = source::open_vm(&vmx).unwrap();
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let opts = MigrateOptions {
        // About 3 s for the whole disk: room to cut it in the middle.
        max_rate: Some("64mbit".parse::<Rate>().unwrap()),
        retry_for: Duration::from_secs(60),
        ..MigrateOptions::default()
    };
    let sink = Arc::new(Watch::default());
    let lift = {
        let sink = sink.clone();
        tokio::spawn(async move { migrate::run(&source, &target, &opts, sink).await })
    };
    let total = 24 * MIB as u64;
    sink.until_done(total / 4, Duration::from_secs(30)).await;
    let t0 = Instant::now();
    // The task shows what the cloud holds durably, while it moves.
    let id = cloud.domain.inventory.list_migrations().unwrap()[0].id.clone();
    let task = loop {
        let task = cloud_endpoint::api::tasks::get(&cloud.domain, &id).unwrap();
        if task.progress.completed > 0 {
            break task;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the task never showed progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(task.status, "RUNNING");
    assert_eq!(task.progress.total, total);
    assert!(task.progress.completed < total, "{:?}", task.progress);
    assert!(
        task.progress.message.default_message.contains('%'),
        "{:?}",
        task.progress
    );
    let done_at_cut = sink.done();
    cloud.stop().await;
    // The migration waits in staging for its edge, not failed, not registered.
    let listen = addr.to_string();
    let cloud = Cloud::start(&root, &pki, &[("CLOUD_ENDPOINT_LISTEN", &listen)]).await;
    let waiting = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(waiting.len(), 1);
    assert_eq!(waiting[0].state, "RUNNING", "{waiting:?}");
    assert!(cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/")));
    let summary = lift.await.unwrap().expect("the edge resumes by itself");
    assert!(summary.reconnects >= 1, "{summary:?}");
    assert!(
        summary.resumed_bytes >= done_at_cut / 2,
        "the cloud kept what it had acknowledged: {summary:?}"
    );
    let nonzero = total - summary.zero_bytes;
    let resent = summary.sent_bytes.saturating_sub(nonzero);
    println!(
        "endpoint restart: {} of {} bytes done at the cut, {} resumed, {} re-sent, {} reconnect(s)",
        done_at_cut, total, summary.resumed_bytes, resent, summary.reconnects
    );
    // Re-sent is what was in flight: far less than what had been sent.
    assert!(resent < done_at_cut / 2 + 4 * MIB as u64, "re-sent {resent} bytes");
    let landed = cloud.root.join("db01/db01-flat.vmdk");
    assert!(images_identical(&tmp.path().join("src/db01.img"), &landed));
    let ms = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(ms[0].state, "SUCCEEDED");
    assert!(ms[0].has_receipt);
    assert!(!cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/")));
    cloud.stop().await;
}

fn edge(bin: &Path, pki: &Pki, cloud: &Cloud, vmx: &Path, state: &Path, extra: &[&str]) -> Command {
    edge_command(bin, pki, cloud, vmx, state, extra)
}

/// Runs a JSON-lines migrate and kills it with SIGKILL once `fraction` is done.
fn run_and_kill(mut cmd: Command, fraction: f64) -> u64 {
    let mut child: Child = cmd
        .args(["--json", "--max-rate", "64mbit"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut sent = 0;
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if v["event"] == "progress" {
            sent = v["sent_bytes"].as_u64().unwrap();
            let (done, total) = (v["done_bytes"].as_f64().unwrap(), v["total_bytes"].as_f64().unwrap());
            if done >= total * fraction {
                break;
            }
        }
        assert_ne!(v["event"], "summary", "finished before it could be killed");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    sent
}

fn summary_of(output: std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout.lines().last().unwrap();
    serde_json::from_str(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_transfer_resumes_from_its_checkpoint() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = vm(&tmp.path().join("src"), "app01", 24, 72);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let first = edge(&bin, &pki, &cloud, &vmx, &state, &[]);
    let sent_before = tokio::task::spawn_blocking(move || run_and_kill(first, 0.4))
        .await
        .unwrap();
    assert!(std::fs::read_dir(&state).unwrap().count() >= 2, "a checkpoint is kept");
    // The endpoint keeps the migration for its edge.
    let again = edge(&bin, &pki, &cloud, &vmx, &state, &["migrate", "--json"]);
    let out = tokio::task::spawn_blocking(move || {
        let mut c = again;
        c.output().unwrap()
    })
    .await
    .unwrap();
    let s = summary_of(out);
    let total = 24 * MIB as u64;
    let zero = s["zero_bytes"].as_u64().unwrap();
    let resumed = s["resumed_bytes"].as_u64().unwrap();
    let sent_after = s["sent_bytes"].as_u64().unwrap();
    let resent = (sent_before + sent_after).saturating_sub(total - zero);
    println!(
        "edge SIGKILL: {resumed} of {total} bytes resumed, {sent_after} sent after the restart, about {resent} re-sent"
    );
    assert!(resumed >= total / 5, "{s}");
    assert!(sent_after < total - zero, "only what the cloud lacked was sent: {s}");
    assert!(images_identical(
        &tmp.path().join("src/app01.img"),
        &cloud.root.join("app01/app01-flat.vmdk")
    ));
    // The receipt verifies against the source; the checkpoint is gone.
    assert_receipt_verifies_and_no_checkpoint_left(&bin, &pki, &vmx, &state);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_changed_while_paused_is_refused_and_abort_cleans_up() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = vm(&tmp.path().join("src"), "web01", 24, 73);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let first = edge(&bin, &pki, &cloud, &vmx, &state, &[]);
    tokio::task::spawn_blocking(move || run_and_kill(first, 0.3))
        .await
        .unwrap();
    // Someone boots the source VM: its disk changes.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path().join("src/web01.img"))
            .unwrap();
        f.write_all_at(b"booted", 4096).unwrap();
    }
    let again = edge(&bin, &pki, &cloud, &vmx, &state, &[]).output().unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("source changed") && err.contains("edge-agent abort"),
        "{err}"
    );
    // Nothing was registered; the partial copy waits in staging.
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
    assert!(cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/")));
    let abort = edge(&bin, &pki, &cloud, &vmx, &state, &["abort"]).output().unwrap();
    assert!(abort.status.success(), "{}", String::from_utf8_lossy(&abort.stderr));
    assert!(String::from_utf8_lossy(&abort.stdout).contains("aborted"));
    let t0 = Instant::now();
    while cloud.datastore_entries().iter().any(|e| e.starts_with(".staging/")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "partial files removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ms = cloud.domain.inventory.list_migrations().unwrap();
    assert_eq!(ms[0].state, "FAILED");
    assert!(ms[0].error.as_deref().unwrap_or("").contains("aborted"), "{ms:?}");
    // The name is free again: a fresh migration of the changed VM lands whole.
    let out = edge(&bin, &pki, &cloud, &vmx, &state, &["migrate", "--json"])
        .output()
        .unwrap();
    summary_of(out);
    assert!(images_identical(
        &tmp.path().join("src/web01.img"),
        &cloud.root.join("web01/web01-flat.vmdk")
    ));
    cloud.stop().await;
}

/// The real endpoint binary, killed with SIGKILL mid-transfer (no shutdown, no last
/// journal flush) and started again on the same port: the edge reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_with_sigkill_is_resumed_after_its_restart() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = tmp.path().join("cloud");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = || {
        Command::new(bin.join("cloud-endpoint"))
            .env("CLOUD_ENDPOINT_LISTEN", format!("127.0.0.1:{port}"))
            .env("CLOUD_ENDPOINT_API_LISTEN", "off")
            .env("CLOUD_ENDPOINT_CERT", pki.path("endpoint.pem"))
            .env("CLOUD_ENDPOINT_KEY", pki.path("endpoint.key"))
            .env("CLOUD_ENDPOINT_EDGE_CA", pki.path("ca.pem"))
            .env("CLOUD_ENDPOINT_DATASTORE_DIR", cloud.join("datastore"))
            .env("CLOUD_ENDPOINT_DATABASE", cloud.join("inventory.sqlite3"))
            .env("CLOUD_ENDPOINT_LOG", "warn")
            // The edge notices a dead endpoint after the idle timeout: short here.
            .env("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", "3")
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut endpoint = start();
    let vmx = vm(&tmp.path().join("src"), "kv01", 24, 74);
    let source = source::open_vm(&vmx).unwrap();
    let target = edge_agent::target::Target::single(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "localhost",
        MIGRATOR,
        DEMO_PASSWORD,
        pki.trust_ca(),
        pki.edge_identity(),
    );
    let opts = MigrateOptions {
        max_rate: Some("64mbit".parse::<Rate>().unwrap()),
        retry_for: Duration::from_secs(60),
        tuning: gateway::transport::TransportTuning {
            idle_timeout: Duration::from_secs(3),
            ..Default::default()
        },
        ..MigrateOptions::default()
    };
    let sink = Arc::new(Watch::default());
    let lift = {
        let sink = sink.clone();
        tokio::spawn(async move { migrate::run(&source, &target, &opts, sink).await })
    };
    let total = 24 * MIB as u64;
    let done_at_kill = sink.until_done(total / 3, Duration::from_secs(60)).await;
    kill_now(&mut endpoint);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut endpoint = start();
    let summary = lift.await.unwrap().expect("the edge resumes by itself");
    endpoint.kill().unwrap();
    endpoint.wait().unwrap();
    println!(
        "endpoint SIGKILL: {done_at_kill} of {total} bytes done at the kill, {} resumed, {} re-sent, {} reconnect(s)",
        summary.resumed_bytes, summary.resent_bytes, summary.reconnects
    );
    assert!(summary.reconnects >= 1, "{summary:?}");
    assert!(summary.resumed_bytes > 0, "{summary:?}");
    assert!(images_identical(
        &tmp.path().join("src/kv01.img"),
        &cloud.join("datastore/kv01/kv01-flat.vmdk")
    ));
    assert!(summary.receipt.contains("kv01"));
}
