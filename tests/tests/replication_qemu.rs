//! Replication of a VM that QEMU runs (`replicate --qmp`, `switchover --qmp`): the guest
//! (tests/live/guest.sh with `scribble=`) keeps writing 64 KiB blocks to its disk while
//! it is replicated. Each pass reads QEMU's point-in-time backup; after the first, only
//! the chunks QEMU's dirty bitmap marked. A switchover that fails before the commit
//! resumes the guest; the real one stops it, sends the last changes, and quits QEMU, and
//! the cloud's disk is identical to the source's final state. A bitmap removed between
//! passes leads to a full compare that says why, and still to an identical copy.
//!
//! Needs qemu-system-x86_64 (tests/setup.sh installs it); without it each test fails and
//! says so.

use std::collections::BTreeSet;
use std::path::Path;

use e2e::guest::*;
use e2e::*;
use serde_json::{json, Value};

const CHUNK: u64 = 64 * 1024;
const DISK: u64 = 64 << 20;
/// The guest's scribble area: 512 blocks of 64 KiB from 4 MiB (tests/live/guest.sh).
const SCRIBBLE: u64 = 512;

/// The chunks (64 KiB) the guest's step `n` writes: the header and record sectors, and
/// its scribble block.
fn chunks_of(n: u64) -> [u64; 3] {
    [0, (8 + n % 4096) * 512 / CHUNK, 64 + (n * 37) % SCRIBBLE]
}

fn chunks_in(steps: std::ops::RangeInclusive<u64>) -> BTreeSet<u64> {
    steps.flat_map(chunks_of).collect()
}

fn last_counter(source: &Source) -> u64 {
    counters(&source.serial).last().copied().unwrap_or(0)
}

struct Setup {
    _tmp: tempfile::TempDir,
    bin: std::path::PathBuf,
    pki: Pki,
    cloud: Cloud,
    source: Source,
    state: std::path::PathBuf,
}

async fn setup(prefix: &str, name: &str) -> Setup {
    let binary = require_qemu();
    let bin = wan::ensure_binaries();
    // Short: unix socket paths (QMP) must stay under 108 bytes.
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let source = start_source(
        &binary,
        &tmp.path().join("src"),
        name,
        &format!("scribble={SCRIBBLE} period=0.1"),
    )
    .await;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    Setup {
        _tmp: tmp,
        bin,
        pki,
        cloud,
        source,
        state,
    }
}

impl Setup {
    fn edge(&self, args: &[&str]) -> std::process::Command {
        let mut all = args.to_vec();
        all.extend([
            "--json",
            "--chunk-kib",
            "64",
            "--qmp",
            self.source.qmp.to_str().unwrap(),
        ]);
        edge_command(
            &self.bin,
            &self.pki,
            &self.cloud,
            &self.source.vm.vmx_path,
            &self.state,
            &all,
        )
    }

    fn disk(&self) -> std::path::PathBuf {
        self.source.vm.disks[0].path.clone()
    }

    /// The switchover, then: QEMU has quit, the cloud's disk is identical to the
    /// source's, no bitmap of ours is left in the source image, and the receipt verifies
    /// with nothing left in the state folder.
    async fn switch_over(mut self, name: &str) -> Value {
        let done = summary(&run(self.edge(&["switchover", "--confirm"])).await);
        assert!(done["vm_id"].as_str().unwrap().starts_with("vm-"), "{done}");
        let quit = eventually(30, || self.source.process.0.try_wait().unwrap()).await;
        assert!(quit.is_some(), "the source QEMU quit after the commit");
        let cloud_disk = self.cloud.root.join(format!("{name}/{name}.vmdk"));
        assert!(
            images_identical(&self.disk(), &cloud_disk),
            "the cloud's disk is the source's final state"
        );
        let info: Value = serde_json::from_str(&qemu_img(&[
            "info",
            "--output=json",
            "-U",
            self.disk().to_str().unwrap(),
        ]))
        .unwrap();
        assert!(
            info["format-specific"]["data"]["bitmaps"]
                .as_array()
                .is_none_or(|b| b.is_empty()),
            "no dirty bitmap left in the source image: {info}"
        );
        assert_receipt_verifies_and_no_checkpoint_left(&self.bin, &self.pki, &self.source.vm.vmx_path, &self.state);
        self.cloud.stop().await;
        done
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_qemu_guest_is_replicated_through_its_dirty_bitmap_and_switched_over() {
    let s = setup("rq", "rq01").await;

    // The first pass lifts QEMU's full point-in-time backup.
    let c0 = last_counter(&s.source);
    let first = summary(&run(s.edge(&["replicate"])).await);
    let c1 = last_counter(&s.source);
    assert_eq!(first["replica"], true, "{first}");
    assert_eq!(first["tracking"]["mode"], "full", "{first}");
    assert!(first["tracking"].get("fallback").is_none(), "{first}");

    // The guest goes on writing; the next pass copies only what its bitmap marked.
    wait_counter(&s.source.serial, c1 + 15, 60).await;
    let before = last_counter(&s.source);
    let started = std::time::Instant::now();
    let second = summary(&run(s.edge(&["replicate"])).await);
    let pass_secs = started.elapsed().as_secs_f64();
    let after = last_counter(&s.source);
    let t = &second["tracking"];
    assert_eq!(t["mode"], "bitmap", "{second}");
    assert_eq!(t["chunks"].as_u64(), Some(DISK / CHUNK), "{second}");
    // Written for certain between the two backups' starts, and at most what was written
    // from just before the first pass to just after this one.
    let surely = chunks_in(c1 + 1..=before.saturating_sub(1));
    let at_most = chunks_in(c0..=after + 1);
    let changed = t["changed_chunks"].as_u64().unwrap();
    assert!(
        surely.len() as u64 <= changed && changed <= at_most.len() as u64,
        "changed chunks {changed}: between {} and {} (steps {c1}..{before} and {c0}..{after}): {second}",
        surely.len(),
        at_most.len()
    );
    // Only the changed chunks were read; of them, what changed was sent.
    let read = second["read_bytes"].as_u64().unwrap();
    let sent = second["sent_bytes"].as_u64().unwrap();
    assert!(
        read <= changed * CHUNK,
        "read {read} B for {changed} changed chunks: {second}"
    );
    // Each surely-written random scribble block (one chunk each, none hit twice in
    // fewer than 512 steps) differs from the replica, and so does the header's chunk.
    let random = (c1 + 1..before).filter(|n| n % 5 != 0).count() as u64;
    assert!(
        (random + 1) * CHUNK <= sent && sent <= read,
        "sent {sent} B: at least {} B of new random blocks, at most the {read} B read: {second}",
        (random + 1) * CHUNK
    );
    assert!(sent < DISK / 8, "{second}");
    println!(
        "QEMU source, second pass: {changed} of {} chunks changed, {read} B read, {sent} B sent, \
         guest steps {c1}..{after} ({} MiB disk), pass {pass_secs:.2} s",
        DISK / CHUNK,
        DISK >> 20
    );

    // A switchover that fails before the commit (a wrong password) resumes the guest.
    let mut wrong = s.edge(&["switchover"]);
    wrong.env("EDGE_AGENT_PASSWORD", "not-the-password");
    let failed = run(wrong).await;
    assert!(!failed.status.success());
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(said.contains("resumed"), "{said}");
    let now = last_counter(&s.source);
    wait_counter(&s.source.serial, now + 3, 30).await;

    // A switchover interrupted (Ctrl-C) while the guest is stopped resumes it: slowed
    // down to be caught mid-way, interrupted once it said what it reads (after the stop).
    // Beside the state folder, which must hold nothing but the receipt at the end.
    let log = s.state.with_file_name("interrupted.log");
    let mut slow = s.edge(&["switchover", "--max-rate", "1mbit"]);
    slow.stderr(std::fs::File::create(&log).unwrap());
    let mut edge = slow.spawn().unwrap();
    let said = |log: &Path| std::fs::read_to_string(log).unwrap_or_default();
    let stopped = eventually(60, || said(&log).contains("QEMU dirty bitmap").then_some(())).await;
    assert!(stopped.is_some(), "the switchover stopped the guest: {}", said(&log));
    let sigint = std::process::Command::new("kill")
        .args(["-INT", &edge.id().to_string()])
        .status()
        .unwrap();
    assert!(sigint.success());
    let status = tokio::task::spawn_blocking(move || edge.wait().unwrap()).await.unwrap();
    let text = said(&log);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("interrupted (Ctrl-C)") && text.contains("resumed (QMP cont)"),
        "{text}"
    );
    let now = last_counter(&s.source);
    wait_counter(&s.source.serial, now + 3, 30).await;

    // The switchover: stop, the last changes, the commit, QEMU quits.
    let done = s.switch_over("rq01").await;
    assert_eq!(done["tracking"]["mode"], "bitmap", "{done}");
    assert!(
        done["read_bytes"].as_u64().unwrap() < DISK / 8,
        "the switchover read only what changed: {done}"
    );
}

/// Removes this replication's dirty bitmap from the guest's disk through QMP, as a QEMU
/// restarted without it would have lost it.
async fn remove_bitmap(qmp: &Path) {
    let qmp = gateway::qemu::Qmp::connect(qmp).await.unwrap();
    let nodes = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let mut removed = 0;
    for node in nodes.as_array().unwrap() {
        for b in node["dirty-bitmaps"].as_array().into_iter().flatten() {
            let name = b["name"].as_str().unwrap();
            assert!(name.starts_with("gateway-replica"), "{name}");
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": node["node-name"], "name": name}),
            )
            .await
            .unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "one bitmap on the one disk: {nodes}");
    qmp.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_dirty_bitmap_leads_to_a_full_compare_that_says_why() {
    let s = setup("rf", "rf01").await;
    summary(&run(s.edge(&["replicate"])).await);
    let c1 = last_counter(&s.source);
    wait_counter(&s.source.serial, c1 + 8, 60).await;
    remove_bitmap(&s.source.qmp).await;

    let out = run(s.edge(&["replicate"])).await;
    let pass = summary(&out);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(pass["tracking"]["mode"], "full", "{pass}");
    let why = pass["tracking"]["fallback"].as_str().unwrap_or_default();
    assert!(why.contains("bitmap") && why.contains("missing"), "{pass}");
    assert!(said.contains(why), "the pass says why: {said}");
    // Everything the guest ever wrote was read again and compared; only what changed
    // went over the wire.
    let read = pass["read_bytes"].as_u64().unwrap();
    let sent = pass["sent_bytes"].as_u64().unwrap();
    assert!(read > sent && sent < DISK / 8, "{pass}");

    // The fallback pass made a new bitmap: the next pass is incremental again.
    let c2 = last_counter(&s.source);
    wait_counter(&s.source.serial, c2 + 5, 60).await;
    let next = summary(&run(s.edge(&["replicate"])).await);
    assert_eq!(next["tracking"]["mode"], "bitmap", "{next}");
    s.switch_over("rf01").await;
}
