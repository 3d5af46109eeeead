//! Faults of issue 5 beyond resume.rs: a link cut mid-transfer (through an in-process
//! UDP relay, short enough that the endpoint still holds the old connection when the
//! edge is back, and long enough that both sides gave up), a datastore that fills up
//! (root only: a tmpfs), and a second edge trying to resume another edge's migration.
//! Each ends with a disk identical to the source and a receipt that verifies, or with a
//! clean, resumable stop; the bytes sent again are printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use certs::{Thumbprint, Validity};
use e2e::relay::Relay;
use e2e::*;
use edge_agent::migrate::{self, MigrateOptions};
use edge_agent::report::{Progress, ProgressSink, Summary};
use edge_agent::{source, MigrateError};
use gateway::transport::{Identity, Rate, TransportTuning};
use gateway::wire::RefusalCode;

const MIB: u64 = 1 << 20;

/// Both sides' QUIC idle timeout in these tests: a cut longer than this is a lost
/// connection, and the test need not wait the default 30 s for it.
const IDLE_SECS: u64 = 3;

fn vm(dir: &Path, name: &str, mib: u64, seed: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    // Mostly incompressible, a few holes: under a cap the transfer lasts long enough
    // to break it in the middle.
    let regions: Vec<Fill> = (0..mib)
        .map(|i| if i % 8 == 7 { Fill::Zero } else { Fill::Random })
        .collect();
    write_raw_disk(&dir.join(format!("{name}.img")), MIB as usize, &regions, seed);
    write_vmx(dir, name, &[&format!("{name}.img")], &[])
}

/// The migration id and the last progress figures.
#[derive(Default)]
struct Watch {
    id: Mutex<String>,
    done: AtomicU64,
    sent: AtomicU64,
}

impl ProgressSink for Watch {
    fn started(&self, _: &str, migration_id: &str, _: u64) {
        *self.id.lock().unwrap() = migration_id.to_owned();
    }
    fn progress(&self, p: &Progress) {
        self.done.store(p.done_bytes, Ordering::SeqCst);
        self.sent.store(p.sent_bytes, Ordering::SeqCst);
    }
}

impl Watch {
    fn id(&self) -> String {
        self.id.lock().unwrap().clone()
    }

    /// Waits until `bytes` are done (written in the cloud or zero).
    async fn reaches(&self, bytes: u64) -> u64 {
        let t0 = Instant::now();
        loop {
            let done = self.done.load(Ordering::SeqCst);
            if done >= bytes {
                return done;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no progress: {done} bytes done");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Options that make a 24-32 MiB lift last a few seconds and notice a cut in 3 s.
fn capped(state_dir: Option<PathBuf>, receipt: &Path) -> MigrateOptions {
    MigrateOptions {
        max_rate: Some("64mbit".parse::<Rate>().unwrap()),
        retry_for: Duration::from_secs(60),
        tuning: TransportTuning {
            idle_timeout: Duration::from_secs(IDLE_SECS),
            ..TransportTuning::default()
        },
        state_dir,
        receipt_path: Some(receipt.to_owned()),
        ..MigrateOptions::default()
    }
}

fn endpoint_env() -> Vec<(&'static str, String)> {
    vec![("CLOUD_ENDPOINT_TRANSPORT__IDLE_TIMEOUT_SECS", IDLE_SECS.to_string())]
}

async fn start_cloud(root: &Path, pki: &Pki) -> Cloud {
    let env = endpoint_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Cloud::start(root, pki, &env).await
}

fn staging(cloud: &Cloud) -> Vec<String> {
    cloud
        .datastore_entries()
        .into_iter()
        .filter(|e| e.starts_with(".staging/"))
        .collect()
}

fn migration(cloud: &Cloud, id: &str) -> cloud_endpoint::inventory::MigrationRecord {
    cloud
        .domain
        .inventory
        .list_migrations()
        .unwrap()
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("no migration {id}"))
}

/// What a user checks after a lift: the disk is the source's, the VM is registered with
/// a receipt, the receipt verifies against the source, nothing is left in staging.
fn landed_whole(cloud: &Cloud, pki: &Pki, vmx: &Path, name: &str, summary: &Summary, receipt: &Path) {
    let src = vmx.with_file_name(format!("{name}.img"));
    assert!(images_identical(
        &src,
        &cloud.root.join(format!("{name}/{name}-flat.vmdk"))
    ));
    let m = migration(cloud, &summary.migration_id);
    assert_eq!(m.state, "SUCCEEDED", "{m:?}");
    assert!(m.has_receipt, "{m:?}");
    let verdict = edge_agent::receipt::verify(receipt, vmx, &pki.trust_ca()).expect("the receipt verifies");
    assert!(verdict.ok(), "{verdict}");
    assert!(staging(cloud).is_empty(), "{:?}", cloud.datastore_entries());
}

/// How the relay breaks the link.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// The edge hears nothing: it gives up and dials again while the endpoint, which
    /// still hears the edge's retransmissions, holds the old connection.
    Short,
    /// Nothing passes either way until both sides declared the connection lost.
    Long,
}

/// Lifts a 24 MiB VM through a relay, cuts the link a quarter of the way, restores it
/// once the fault is established, and checks the lift ends whole by itself.
async fn lift_through_a_cut(cut: Cut, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = start_cloud(&tmp.path().join("cloud"), &pki).await;
    let relay = Relay::start(cloud.addr).await;
    let name = format!("cut{seed}");
    let vmx = vm(&tmp.path().join("src"), &name, 24, seed);
    let source = source::open_vm(&vmx).unwrap();
    let mut target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    target.endpoints[0].addr = relay.addr;
    let receipt = tmp.path().join("receipt.json");
    let opts = capped(None, &receipt);
    let watch = Arc::new(Watch::default());
    let lift = {
        let sink = watch.clone();
        tokio::spawn(async move { migrate::run(&source, &target, &opts, sink).await })
    };
    let total = 24 * MIB;
    let done_at_cut = watch.reaches(total / 4).await;
    let id = watch.id();
    assert!(cloud.domain.live.is_live(&id));
    let t_cut = Instant::now();
    let held_old_connection = match cut {
        Cut::Short => {
            relay.cut_from_endpoint();
            // A second edge socket: the edge gave up its connection and dials again.
            let back = eventually(20, || (relay.edge_sockets() >= 2).then_some(())).await;
            assert!(back.is_some(), "the edge never noticed the cut");
            cloud.domain.live.is_live(&id)
        }
        Cut::Long => {
            relay.cut();
            let both = eventually(20, || {
                (!cloud.domain.live.is_live(&id) && relay.edge_sockets() >= 2).then_some(())
            })
            .await;
            assert!(both.is_some(), "both sides should have given up the connection");
            // The endpoint kept the migration for its edge: running, staged, unregistered.
            assert_eq!(migration(&cloud, &id).state, "RUNNING");
            assert_eq!(staging(&cloud).len(), 1, "{:?}", cloud.datastore_entries());
            assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
            false
        }
    };
    let cut_for = t_cut.elapsed();
    // Everything the edge pushed into the connection before it gave up, including what
    // it kept sending into the dead link until the idle timeout.
    let sent_at_notice = watch.sent.load(Ordering::SeqCst);
    relay.restore();
    if cut == Cut::Short {
        assert!(
            held_old_connection,
            "the endpoint should still hold the old connection when the edge is back (take-over path)"
        );
    }
    assert!(relay.dropped() > 0);
    let summary = lift.await.unwrap().expect("the edge reconnects and finishes by itself");
    assert!(summary.reconnects >= 1, "{summary:?}");
    // Done at the cut counts zero chunks as soon as they are declared; at most an
    // eighth of it, plus a chunk, was zero and maybe not yet journaled.
    let acked_data = (done_at_cut * 7 / 8).saturating_sub(MIB);
    assert!(
        summary.resumed_bytes >= acked_data,
        "the cloud kept what it acknowledged before the cut: {summary:?}"
    );
    // Nothing the cloud kept is sent again.
    assert!(
        summary.resent_bytes + summary.resumed_bytes <= total,
        "re-sent {} bytes and kept {} of {total}: some kept chunk was sent again",
        summary.resent_bytes,
        summary.resumed_bytes
    );
    // Sent again is at most what was in flight: sent, but not acknowledged at the cut,
    // plus a chunk because progress is sampled (the last one sent may not be in it yet),
    // and a chunk the edge had begun to write when the link died (re-sent, but not counted
    // as sent: a run on an idle machine re-sent 16 MiB against 15.9 MiB so counted).
    let in_flight = (sent_at_notice + 2 * MIB).saturating_sub(acked_data);
    assert!(
        summary.resent_bytes <= in_flight,
        "re-sent {} bytes, more than the {in_flight} in flight ({sent_at_notice} sent when the edge gave up, \
         {done_at_cut} done at the cut, {acked_data} taken as acknowledged): {summary:?}",
        summary.resent_bytes
    );
    println!(
        "link cut ({cut:?}, {:.1} s, {} datagrams dropped): {done_at_cut} of {total} bytes done at the cut, \
         {sent_at_notice} sent when the edge gave up, {} resumed, {} re-sent, {} reconnect(s), {:.1} s in all",
        cut_for.as_secs_f64(),
        relay.dropped(),
        summary.resumed_bytes,
        summary.resent_bytes,
        summary.reconnects,
        summary.duration_secs
    );
    landed_whole(&cloud, &pki, &vmx, &name, &summary, &receipt);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_cut_is_resumed_while_the_endpoint_still_holds_the_old_connection() {
    lift_through_a_cut(Cut::Short, 81).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_longer_than_the_idle_timeout_is_resumed_after_both_sides_gave_up() {
    lift_through_a_cut(Cut::Long, 82).await;
}

/// A tmpfs mounted for the test; unmounted (lazily, the endpoint may still hold files
/// open) when dropped, also when the test panics.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// The reason, where tmpfs cannot be mounted (not root, no CAP_SYS_ADMIN).
    fn mount(dir: &Path, bytes: u64) -> Result<Tmpfs, String> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:").map(|v| v.trim().to_owned()))
            })
            .unwrap_or_default();
        if !uid.starts_with('0') {
            return Err("mounting a small tmpfs as a full datastore needs root".into());
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("--lazy").arg(&self.0).status();
    }
}

/// Writes `path` until the filesystem is full; returns its size.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5Au8; 256 << 10];
    let mut size = 0;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => size += n as u64,
            Err(_) => break,
        }
    }
    size
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_datastore_pauses_the_migration_and_it_resumes_once_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cloud");
    // Declared after `tmp`, so unmounted before the temp dir is removed.
    let _tmpfs = Tmpfs::mount(&root.join("datastore"), 64 * MIB).unwrap_or_else(|why| {
        panic!("this test fills a small tmpfs datastore and cannot: {why}; run the tests as root (as tests/run.sh and CI do)")
    });
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&root, &pki, &[]).await;
    // 32 MiB fit the 64 MiB datastore, so the plan is accepted.
    let vmx = vm(&tmp.path().join("src"), "full01", 32, 83);
    let source = source::open_vm(&vmx).unwrap();
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let state = tmp.path().join("state");
    let receipt = tmp.path().join("receipt.json");
    let opts = capped(Some(state.clone()), &receipt);
    let watch = Arc::new(Watch::default());
    let lift = {
        let (sink, target, opts) = (watch.clone(), target.clone(), opts.clone());
        tokio::spawn(async move { migrate::run(&source, &target, &opts, sink).await })
    };
    let total = 32 * MIB;
    let done_at_fill = watch.reaches(total / 4).await;
    let id = watch.id();
    // Someone else's files take the rest of the datastore.
    let filler = cloud.root.join("filler.bin");
    let filled = fill(&filler);
    let err = lift.await.unwrap().expect_err("a full datastore stops the migration");
    let sent_before = watch.sent.load(Ordering::SeqCst);
    let MigrateError::Refused { code, problems } = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(*code, RefusalCode::Paused, "{err}");
    let text = problems.join("; ");
    assert!(text.contains("is full"), "says the datastore is full: {text}");
    assert!(
        text.contains("free space") && text.contains("run the same migration again"),
        "says what to do: {text}"
    );
    // A clean stop: nothing registered, the partial copy and the migration kept.
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());
    let kept = eventually(10, || (!cloud.domain.live.is_live(&id)).then_some(())).await;
    assert!(kept.is_some(), "the paused connection ends");
    assert_eq!(migration(&cloud, &id).state, "RUNNING");
    assert_eq!(staging(&cloud).len(), 1, "{:?}", cloud.datastore_entries());
    assert!(
        std::fs::read_dir(&state).unwrap().count() >= 1,
        "the agent keeps its checkpoint"
    );
    println!("datastore full: {done_at_fill} of {total} bytes done when {filled} bytes of filler took the rest: {err}");

    // Space freed, the same command again: it resumes and lands whole.
    std::fs::remove_file(&filler).unwrap();
    let summary = migrate(&vmx, &target, &opts).await.expect("resumes once space is free");
    assert!(summary.resumed_bytes > 0, "{summary:?}");
    let nonzero = total - summary.zero_bytes;
    let resent = (sent_before + summary.sent_bytes).saturating_sub(nonzero);
    println!(
        "datastore full: {} bytes resumed, {} sent after the pause, about {resent} re-sent in all",
        summary.resumed_bytes, summary.sent_bytes
    );
    assert!(
        summary.sent_bytes < nonzero,
        "only what the cloud lacked was sent: {summary:?}"
    );
    landed_whole(&cloud, &pki, &vmx, "full01", &summary, &receipt);
    cloud.stop().await;
}

fn identity_of(cert: &certs::Issued) -> Identity {
    Identity {
        chain: vec![cert.cert_der()],
        key: cert.key_der(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_edge_cannot_resume_another_edges_migration() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = start_cloud(&tmp.path().join("cloud"), &pki).await;
    let vmx = vm(&tmp.path().join("src"), "shared01", 24, 84);
    let source = source::open_vm(&vmx).unwrap();
    let target_a = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let state_a = tmp.path().join("state-a");
    let receipt = tmp.path().join("receipt.json");
    let opts_a = capped(Some(state_a.clone()), &receipt);
    // A goes through a relay, so its going away can be made silent.
    let relay = Relay::start(cloud.addr).await;
    let mut via_relay = target_a.clone();
    via_relay.endpoints[0].addr = relay.addr;
    let watch = Arc::new(Watch::default());
    let lift = {
        let (sink, target, opts) = (watch.clone(), via_relay.clone(), opts_a.clone());
        tokio::spawn(async move { migrate::run(&source, &target, &opts, sink).await })
    };
    watch.reaches(24 * MIB / 3).await;
    let id = watch.id();
    // Edge A goes away mid-transfer as a killed process does: without a word (an
    // aborted task would finish its streams, which reads as the edge ending the
    // migration). The endpoint keeps its migration for it.
    relay.cut();
    lift.abort();
    assert!(lift.await.unwrap_err().is_cancelled());
    let gone = eventually(10, || (!cloud.domain.live.is_live(&id)).then_some(())).await;
    assert!(gone.is_some(), "the endpoint notices edge A left");
    let before = migration(&cloud, &id);
    assert_eq!(before.state, "RUNNING");
    let journal = |c: &Cloud| {
        let dir = c.root.join(&staging(c)[0]);
        std::fs::metadata(dir.join(".chunks.journal")).unwrap().len()
    };
    let journal_before = journal(&cloud);
    // The checkpoint names the address A dialled: everyone goes through the relay.
    relay.restore();

    // Edge B, same CA and user, with a copy of A's checkpoint: it asks to resume A's id.
    let state_b = tmp.path().join("state-b");
    copy_dir(&state_a, &state_b);
    let mut target_b = via_relay.clone();
    target_b.identity = identity_of(&pki.ca.issue_edge("edge-02", Validity::days(1)).unwrap());
    let opts_b = MigrateOptions {
        state_dir: Some(state_b),
        ..opts_a.clone()
    };
    let err = migrate(&vmx, &target_b, &opts_b)
        .await
        .expect_err("another edge may not resume it");
    let MigrateError::Refused { code, problems } = &err else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(*code, RefusalCode::NotPermitted, "{err}");
    let a_cert = Thumbprint::of_der(&pki.edge_identity().chain[0]).to_string();
    let text = problems.join("; ");
    assert!(
        text.contains(&id) && text.contains("another edge agent") && text.contains(&a_cert),
        "names the migration and the agent that owns it ({a_cert}): {text}"
    );
    println!("second edge: {err}");
    // A's migration is untouched: same record, same journal, nothing registered.
    let after = migration(&cloud, &id);
    assert_eq!(
        (after.state.as_str(), &after.error),
        (before.state.as_str(), &before.error)
    );
    assert_eq!(journal(&cloud), journal_before);
    assert!(!cloud.domain.live.is_live(&id));
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());

    // A runs the same migration again and it completes.
    let summary = migrate(&vmx, &via_relay, &opts_a)
        .await
        .expect("A resumes its migration");
    assert_eq!(summary.migration_id, id);
    // What the cloud held was not sent again (resumed_bytes is not checked here: it
    // reads 0 when the checkpoint already recorded every chunk the cloud held).
    let nonzero = 24 * MIB - summary.zero_bytes;
    assert!(
        summary.sent_bytes < nonzero,
        "only what the cloud lacked was sent: {summary:?}"
    );
    println!(
        "second edge: A resumed, {} of {nonzero} data bytes sent, {} re-sent",
        summary.sent_bytes, summary.resent_bytes
    );
    landed_whole(&cloud, &pki, &vmx, "shared01", &summary, &receipt);
    cloud.stop().await;
}

/// An endpoint that does not answer (stopped, restarting, or a firewall dropping its UDP
/// port) is named as such once the handshake's deadline passes, well before the 30 s
/// idle timeout: an edge that reconnects to a restarting endpoint tries again sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_does_not_answer_is_named_before_the_idle_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = start_cloud(&tmp.path().join("cloud"), &pki).await;
    let mut target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    cloud.stop().await;
    // A socket that takes the datagrams and never answers, as a firewall that drops them.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    target.endpoints[0].addr = silent.local_addr().unwrap();
    let vmx = vm(&tmp.path().join("src"), "quiet01", 1, 85);
    let opts = MigrateOptions {
        state_dir: Some(tmp.path().join("state")),
        ..MigrateOptions::default()
    };
    assert_eq!(opts.tuning.idle_timeout, Duration::from_secs(30));
    let t0 = Instant::now();
    let err = migrate(&vmx, &target, &opts).await.expect_err("nobody answers");
    let waited = t0.elapsed();
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("no answer from {}", target.endpoints[0].addr)) && text.contains("UDP port"),
        "{text}"
    );
    assert!(waited < Duration::from_secs(20), "gave up after {waited:?}");
    drop(silent);
}
