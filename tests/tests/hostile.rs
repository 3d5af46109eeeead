//! Hostile peers over real QUIC: expired certificates, and an edge holding a valid
//! certificate and credential that lies in its plan or its chunk frames, or floods the
//! port. Each case is refused with what an operator or a user would read (the refusal
//! code and message, the QUIC close reason, the migration record), and the endpoint
//! keeps serving: every test ends with a legitimate lift that must arrive identical.
//!
//! Cases covered elsewhere end to end are not repeated: another CA and a wrong pin
//! (trust.rs), a wrong credential, a read-only user, VM names that escape the
//! datastore, a datastore too small for the plan (lift.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use certs::{Ca, Thumbprint, Validity};
use e2e::raw::{plan, sealed, RawEdge};
use e2e::*;
use gateway::plan::{MigrationPlan, NicSpec, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use gateway::transport::{self, ControlReader, ControlWriter, ServerTrust, TransportTuning};
use gateway::wire::{ChunkHeader, CloudMessage, EdgeMessage, Encoding, RefusalCode};

const MIB: usize = 1 << 20;

/// 2 MiB of disk content: text, then random bytes.
fn disk_content(dir: &Path, seed: u64) -> (PathBuf, Vec<u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("raw-{seed}.img"));
    write_raw_disk(&path, MIB, &[Fill::Text, Fill::Random], seed);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// The endpoint still serves: a lift by the real edge agent completes and its disk is
/// identical to the source.
async fn still_serves(cloud: &Cloud, pki: &Pki, dir: &Path, name: &str) {
    let src = dir.join(name);
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("d.img"), MIB, &[Fill::Text, Fill::Zero, Fill::Random], 77);
    let vmx = write_vmx(&src, name, &["d.img"], &[]);
    let summary = migrate(&vmx, &cloud.target(pki, MIGRATOR, DEMO_PASSWORD), &Default::default())
        .await
        .unwrap_or_else(|e| panic!("the legitimate lift of {name} failed: {e}"));
    assert!(summary.vm_id.starts_with("vm-"));
    assert!(images_identical(
        &src.join("d.img"),
        &cloud.root.join(name).join(format!("{name}.vmdk"))
    ));
}

/// The migration record once the endpoint has written its outcome.
async fn record(cloud: &Cloud, migration_id: &str, state: &str) -> cloud_endpoint::inventory::MigrationRecord {
    eventually(5, || {
        cloud
            .domain
            .inventory
            .migration(migration_id)
            .unwrap()
            .filter(|r| r.state == state)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "migration {migration_id} never reached {state}: {:?}",
            cloud.domain.inventory.migration(migration_id)
        )
    })
}

/// A validity window that ended a month ago. `Validity` takes any window; this is
/// `Validity::days(30)` moved back by two of its lengths (no date crate needed here).
fn expired() -> Validity {
    let month = Validity::days(30);
    let span = month.not_after - month.not_before;
    Validity {
        not_before: month.not_before - span * 2,
        not_after: month.not_after - span * 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_and_a_wrong_pin_are_refused_at_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (disk, _) = disk_content(&tmp.path().join("src"), 1);
    let vmx = write_vmx(
        disk.parent().unwrap(),
        "exp01",
        &[disk.file_name().unwrap().to_str().unwrap()],
        &[],
    );

    // An edge certificate of the right CA that expired a month ago: the endpoint's
    // TLS refuses it, and the edge's message names expiry as a cause to check.
    let stale = pki.ca.issue_edge("edge-stale", expired()).unwrap();
    let mut target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    target.identity = transport::Identity {
        chain: vec![stale.cert_der()],
        key: stale.key_der(),
    };
    let msg = migrate(&vmx, &target, &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("refused the TLS handshake") && msg.contains("expired"),
        "{msg}"
    );
    assert!(cloud.domain.inventory.list_migrations().unwrap().is_empty());

    // An endpoint whose own certificate (same CA) expired: the edge refuses it.
    let old_dir = tmp.path().join("pki-expired");
    pki.ca.write(&old_dir).unwrap();
    pki.ca
        .issue_endpoint(&["localhost".into(), "127.0.0.1".into()], expired())
        .unwrap()
        .write(&old_dir, "endpoint")
        .unwrap();
    for f in ["edge.pem", "edge.key"] {
        std::fs::copy(pki.path(f), old_dir.join(f)).unwrap();
    }
    let old_pki = Pki {
        ca: Ca::load(&old_dir).unwrap(),
        dir: old_dir,
    };
    let stale_cloud = Cloud::start(&tmp.path().join("stale-cloud"), &old_pki, &[]).await;
    let msg = migrate(
        &vmx,
        &stale_cloud.target(&old_pki, MIGRATOR, DEMO_PASSWORD),
        &Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("certificate was not accepted") && msg.to_lowercase().contains("expired"),
        "{msg}"
    );
    assert!(stale_cloud.domain.inventory.list_migrations().unwrap().is_empty());
    stale_cloud.stop().await;

    // A wrong pin: the message names both thumbprints and how to print the right one
    // (trust.rs checks the pinned one is named; an operator needs the other too).
    let real = certs::thumbprint_of_pem_file(&pki.path("endpoint.pem")).unwrap();
    let mut target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let wrong = Thumbprint::from([0x5A; 32]);
    target.trust = ServerTrust::Pinned(wrong);
    let msg = migrate(&vmx, &target, &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&real.to_string()) && msg.contains(&wrong.to_string()),
        "{msg}"
    );
    assert!(msg.contains("certs thumbprint"), "{msg}");

    still_serves(&cloud, &pki, tmp.path(), "after-certs").await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_beyond_the_limits_are_refused_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let tib: u64 = 1 << 40;
    let cases: [(&str, MigrationPlan, RefusalCode, &str); 3] = [
        (
            "a disk over 64 TiB",
            plan("huge", &[("scsi0:0", 64 * tib + 1)], MAX_CHUNK_SIZE),
            RefusalCode::ProtocolViolation,
            "a disk must hold 1 byte to 64 TiB",
        ),
        (
            // 1 TiB in 64 KiB chunks: 16 Mi chunk hashes for the endpoint to keep.
            "more chunks than one migration may have",
            plan("many", &[("scsi0:0", tib)], MIN_CHUNK_SIZE),
            RefusalCode::ProtocolViolation,
            "use a larger chunk size",
        ),
        (
            // Within the protocol's limits, beyond the datastore's free space.
            "60 TiB on this datastore",
            plan("big", &[("scsi0:0", 60 * tib)], MAX_CHUNK_SIZE),
            RefusalCode::PlanRejected,
            "free space or choose a smaller VM",
        ),
    ];
    let hwm_before = proc_status_kib("VmHWM");
    for (what, plan, code, says) in cases {
        let mut edge = RawEdge::welcomed(&cloud, &pki).await;
        let (got, problems) = edge.plan(&plan).await.expect_err(what);
        assert_eq!(got, code, "{what}: {problems:?}");
        assert!(problems.join(" ").contains(says), "{what}: {problems:?}");
        edge.close();
    }
    // Neither a record nor a file for any of them, and nothing sized by the claims
    // (a chunk-hash table for 16 Mi chunks alone would be over 500 MiB).
    assert!(cloud.domain.inventory.list_migrations().unwrap().is_empty());
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new());
    let grown_mib = (proc_status_kib("VmHWM") - hwm_before) / 1024;
    assert!(grown_mib < 64, "peak memory grew {grown_mib} MiB");

    still_serves(&cloud, &pki, tmp.path(), "after-limits").await;
    cloud.stop().await;
}

/// A zstd frame that decompresses to `bytes` zeros: RLE blocks of 128 KiB (the largest
/// block), 4 bytes each, so 2 GiB take 64 KiB. No content size is declared, so the
/// decoder only finds out by decoding; it is written by hand (RFC 8878) because a
/// compressor would need the whole plaintext in memory.
fn zstd_bomb(bytes: u64) -> Vec<u8> {
    const BLOCK: u64 = 128 << 10;
    let blocks = bytes / BLOCK;
    let mut frame = vec![0x28, 0xB5, 0x2F, 0xFD]; // magic 0xFD2FB528, little-endian
    frame.push(0x00); // descriptor: no content size, not single-segment, no checksum, no dictionary
    frame.push(10 << 3); // window descriptor: 2^(10+10) = 1 MiB window
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        let header = ((BLOCK as u32) << 3) | (1 << 1) | last; // size, type RLE, last flag
        frame.extend_from_slice(&header.to_le_bytes()[..3]);
        frame.push(0); // the byte to repeat
    }
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zstd_bomb_is_nacked_without_allocating_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (src, disk) = disk_content(&tmp.path().join("src"), 2);
    let bomb_bytes: u64 = 2 << 30;
    let bomb = zstd_bomb(bomb_bytes);
    assert!(bomb.len() < 100 << 10, "{} bytes", bomb.len());

    let mut edge = RawEdge::welcomed(&cloud, &pki).await;
    edge.plan(&plan("bombed", &[("scsi0:0", disk.len() as u64)], DEFAULT_CHUNK_SIZE))
        .await
        .expect("plan accepted");
    // The header is honest about everything but the payload: a 1 MiB chunk, its true
    // hash, and 64 KiB of zstd that would expand to 2 GiB.
    let (good, good_payload) = sealed(0, &disk[..MIB]);
    let bomb_header = ChunkHeader {
        encoding: Encoding::Zstd,
        payload_len: bomb.len() as u32,
        ..good
    };
    let hwm_before = proc_status_kib("VmHWM");
    edge.chunk(&bomb_header, &bomb).await.unwrap();
    match edge.next_not_ack().await {
        CloudMessage::Nack {
            disk: 0,
            offset: 0,
            reason,
        } => {
            // zstd's own words: decoding stopped at the chunk's declared 1 MiB.
            assert!(
                reason.contains("does not decompress") && reason.contains("too small"),
                "{reason}"
            );
        }
        other => panic!("expected the bomb to be nacked, got {other:?}"),
    }
    let grown_mib = (proc_status_kib("VmHWM") - hwm_before) / 1024;
    assert!(
        grown_mib < 256,
        "peak memory grew {grown_mib} MiB for a bomb of {} MiB",
        bomb_bytes >> 20
    );

    // The nack asks for the chunk again; the honest one completes the migration.
    edge.chunk(&good, &good_payload).await.unwrap();
    let (second, payload) = sealed(MIB as u64, &disk[MIB..]);
    edge.chunk(&second, &payload).await.unwrap();
    edge.acked(&[0, MIB as u64]).await;
    edge.seal_and_commit(&disk).await;
    assert!(images_identical(&src, &cloud.root.join("bombed/bombed.vmdk")));

    // An edge that keeps sending the bomb is cut off after the retries allowed.
    let mut edge = RawEdge::welcomed(&cloud, &pki).await;
    let id = edge
        .plan(&plan(
            "bombed-again",
            &[("scsi0:0", disk.len() as u64)],
            DEFAULT_CHUNK_SIZE,
        ))
        .await
        .unwrap();
    for _ in 0..4 {
        if edge.chunk(&bomb_header, &bomb).await.is_err() {
            break;
        }
    }
    let (code, problems) = loop {
        match edge.next_not_ack().await {
            CloudMessage::Nack { .. } => continue,
            CloudMessage::Refused { code, problems } => break (code, problems),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, RefusalCode::IntegrityFailure, "{problems:?}");
    assert!(problems[0].contains("failed verification 4 times"), "{problems:?}");
    let rec = record(&cloud, &id, "FAILED").await;
    assert!(rec.error.unwrap().contains("failed verification"));
    edge.close();

    still_serves(&cloud, &pki, tmp.path(), "after-bomb").await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_at_impossible_places_fail_the_migration_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let capacity = 2 * MIB as u64;
    let (good, _) = sealed(0, &vec![7u8; MIB]);
    // Header-only lies: the endpoint checks the header against the plan before it reads
    // (or allocates for) the payload, so a short zstd payload is enough.
    let payload = [0u8; 16];
    let lie = |disk: u16, offset: u64, plain_len: u32| ChunkHeader {
        disk,
        offset,
        plain_len,
        encoding: Encoding::Zstd,
        payload_len: payload.len() as u32,
        ..good
    };
    let cases = [
        (
            "not chunk-aligned",
            lie(0, 4096, MIB as u32),
            "has no chunk at offset 4096",
        ),
        (
            "past the end of the disk",
            lie(0, capacity, MIB as u32),
            "has no chunk at offset 2097152 (capacity 2097152",
        ),
        (
            "the wrong plain length",
            lie(0, MIB as u64, 4096),
            "claims 4096 bytes, the plan says 1048576",
        ),
        (
            "a disk the plan does not have",
            lie(7, 0, MIB as u32),
            "disk 7 does not exist",
        ),
    ];
    for (i, (what, header, says)) in cases.into_iter().enumerate() {
        let name = format!("odd{i}");
        let mut edge = RawEdge::welcomed(&cloud, &pki).await;
        let id = edge
            .plan(&plan(&name, &[("scsi0:0", capacity)], DEFAULT_CHUNK_SIZE))
            .await
            .unwrap();
        let _ = edge.chunk(&header, &payload).await;
        let (code, problems) = edge.refusal().await;
        assert_eq!(code, RefusalCode::ProtocolViolation, "{what}: {problems:?}");
        assert!(problems[0].contains(says), "{what}: {problems:?}");
        // The operator's record says why; the staged files are gone.
        let rec = record(&cloud, &id, "FAILED").await;
        assert!(rec.error.as_deref().unwrap_or("").contains(says), "{what}: {rec:?}");
        edge.close();
    }
    assert_eq!(cloud.datastore_entries(), Vec::<String>::new(), "staging cleaned");
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty());

    still_serves(&cloud, &pki, tmp.path(), "after-offsets").await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_chunk_is_acked_not_rewritten_and_a_changed_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let (src, disk) = disk_content(&tmp.path().join("src"), 3);
    let (first, first_payload) = sealed(0, &disk[..MIB]);
    let (second, second_payload) = sealed(MIB as u64, &disk[MIB..]);

    // Replay: the same frame again after it was written.
    let mut edge = RawEdge::welcomed(&cloud, &pki).await;
    let id = edge
        .plan(&plan("replayed", &[("scsi0:0", disk.len() as u64)], DEFAULT_CHUNK_SIZE))
        .await
        .unwrap();
    edge.chunk(&first, &first_payload).await.unwrap();
    edge.acked(&[0]).await;
    let flat = cloud.root.join(format!(".staging/{id}/replayed-flat.vmdk"));
    let written = std::fs::metadata(&flat).unwrap().modified().unwrap();
    // Past the file system's timestamp granularity, so a second write would show.
    tokio::time::sleep(Duration::from_millis(50)).await;
    edge.chunk(&first, &first_payload).await.unwrap();
    edge.acked(&[0]).await;
    assert_eq!(
        std::fs::metadata(&flat).unwrap().modified().unwrap(),
        written,
        "a replayed chunk is not written again"
    );
    edge.chunk(&second, &second_payload).await.unwrap();
    edge.acked(&[MIB as u64]).await;
    edge.seal_and_commit(&disk).await;
    assert!(images_identical(&src, &cloud.root.join("replayed/replayed.vmdk")));

    // The same place with other content: refused, and the migration fails.
    let mut edge = RawEdge::welcomed(&cloud, &pki).await;
    let id = edge
        .plan(&plan(
            "rewritten",
            &[("scsi0:0", disk.len() as u64)],
            DEFAULT_CHUNK_SIZE,
        ))
        .await
        .unwrap();
    edge.chunk(&first, &first_payload).await.unwrap();
    edge.acked(&[0]).await;
    let (other, other_payload) = sealed(0, &disk[MIB..]);
    let _ = edge.chunk(&other, &other_payload).await;
    let (code, problems) = edge.refusal().await;
    assert_eq!(code, RefusalCode::ProtocolViolation, "{problems:?}");
    assert!(
        problems[0].contains("already written with other content"),
        "{problems:?}"
    );
    record(&cloud, &id, "FAILED").await;
    edge.close();
    assert_eq!(cloud.datastore_entries(), vec!["replayed".to_owned()]);

    still_serves(&cloud, &pki, tmp.path(), "after-replay").await;
    cloud.stop().await;
}

/// Every file and folder under `root`, but the inventory database (which a refusal
/// may touch).
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path.clone());
            }
            if !path.to_string_lossy().contains("inventory.sqlite3") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_keys_that_are_paths_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let before = tree(tmp.path());
    let mut with_nic = plan("nic-escape", &[("scsi0:0", MIB as u64)], DEFAULT_CHUNK_SIZE);
    with_nic.vm.nics.push(NicSpec {
        key: "../ethernet0".into(),
        network: "VM Network".into(),
        virtual_dev: None,
        mac: None,
        address_type: None,
    });
    let cases = [
        (
            plan("key-escape", &[("../../etc/passwd", MIB as u64)], DEFAULT_CHUNK_SIZE),
            "disk key \"../../etc/passwd\" is not a controller slot",
        ),
        (
            plan("key-slash", &[("scsi0:0/../../x", MIB as u64)], DEFAULT_CHUNK_SIZE),
            "disk key \"scsi0:0/../../x\" is not a controller slot",
        ),
        (with_nic, "NIC key \"../ethernet0\" is not a unique ethernetN"),
    ];
    for (plan, says) in cases {
        let mut edge = RawEdge::welcomed(&cloud, &pki).await;
        let (code, problems) = edge.plan(&plan).await.expect_err(says);
        assert_eq!(code, RefusalCode::PlanRejected, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains(says)), "{problems:?}");
        edge.close();
    }
    assert_eq!(tree(tmp.path()), before, "no file created or removed anywhere");
    assert!(cloud.domain.inventory.list_migrations().unwrap().is_empty());

    still_serves(&cloud, &pki, tmp.path(), "after-keys").await;
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_open_connections_times_out_while_real_lifts_go_through() {
    // As many as one edge certificate may hold (transport.max_connections_per_edge's
    // default), plus some that are closed as busy at once.
    const FLOOD: usize = 48;
    const EXTRA: usize = 8;
    const QUITTERS: usize = 5;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    // Long enough for the two lifts below to run while the flood holds its connections.
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_TRANSPORT__HELLO_TIMEOUT_SECS", "20")],
    )
    .await;

    // One UDP socket and one edge certificate for the whole flood, as one misbehaving
    // edge would have (the real lifts come from another edge). Its keep-alives hold the
    // connections open: only the endpoint's timeouts end them.
    let crypto = transport::client_crypto(pki.other_edge("edge-flood"), pki.trust_ca()).unwrap();
    let flood =
        transport::client_endpoint("127.0.0.1:0".parse().unwrap(), crypto, &TransportTuning::default()).unwrap();
    let opened = Instant::now();
    let mut silent = Vec::new(); // handshake, then nothing
    let mut mute = Vec::new(); // a control stream, then no Hello
    let mut quitters = Vec::new(); // a control stream, ended at once
    for _ in 0..QUITTERS {
        let conn = transport::connect(&flood, cloud.addr, "localhost").await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let mut tx = ControlWriter::open(send, true).await.unwrap(); // the preamble only
        tx.finish();
        quitters.push((conn, tx, ControlReader::open(recv, false).await.unwrap()));
    }
    // An edge that ends its control stream is refused at once, not left open for as
    // long as it sends keep-alives.
    for (conn, _tx, mut rx) in quitters {
        // The endpoint closes the connection with ProtocolViolation and says why.
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.recv::<CloudMessage>()).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("the endpoint closes the connection");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    RefusalCode::from_close_code(c.error_code.into_inner()),
                    Some(RefusalCode::ProtocolViolation)
                );
                assert!(
                    String::from_utf8_lossy(&c.reason).contains("ended its control stream"),
                    "{c:?}"
                );
            }
            other => panic!("expected a close with a reason, got {other:?}"),
        }
    }

    // The quitters' connections are closed, so they no longer count once the endpoint's
    // tasks for them have ended (just after the close): the flood holds as many as the
    // edge may.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..FLOOD {
        let conn = transport::connect(&flood, cloud.addr, "localhost").await.unwrap();
        if i % 2 == 0 {
            silent.push(conn);
        } else {
            let (send, recv) = conn.open_bi().await.unwrap();
            let tx = ControlWriter::open(send, true).await.unwrap(); // the preamble only
            mute.push((conn, tx, ControlReader::open(recv, false).await.unwrap()));
        }
    }
    // The endpoint counts a connection once its side of the handshake is done, which on
    // a loaded machine may come after the client's: let it catch up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Past the per-edge limit: closed as busy right after the handshake, saying why.
    for _ in 0..EXTRA {
        let conn = transport::connect(&flood, cloud.addr, "localhost").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(30), conn.closed())
            .await
            .expect("the endpoint closes a connection past the limit");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    RefusalCode::from_close_code(c.error_code.into_inner()),
                    Some(RefusalCode::Busy)
                );
                let reason = String::from_utf8_lossy(&c.reason);
                assert!(
                    reason.contains("already has 48 connections open") && reason.contains("max_connections_per_edge"),
                    "{reason}"
                );
            }
            other => panic!("expected a busy close, got {other:?}"),
        }
    }
    // During the flood: two real lifts, one after the other, complete and are identical.
    still_serves(&cloud, &pki, tmp.path(), "during-flood-1").await;
    still_serves(&cloud, &pki, tmp.path(), "during-flood-2").await;
    assert!(
        silent.iter().all(|c| c.close_reason().is_none()),
        "the lifts ran while the flood held its connections ({:?} after it opened)",
        opened.elapsed()
    );

    // Then the endpoint's Hello deadline ends every half-open one.
    let mut waits = tokio::task::JoinSet::new();
    for conn in silent {
        waits.spawn(async move {
            match conn.closed().await {
                quinn::ConnectionError::ApplicationClosed(c) => {
                    assert_eq!(
                        RefusalCode::from_close_code(c.error_code.into_inner()),
                        Some(RefusalCode::ProtocolViolation)
                    );
                    String::from_utf8_lossy(&c.reason).into_owned()
                }
                other => panic!("closed otherwise: {other}"),
            }
        });
    }
    let mute_count = mute.len();
    for (conn, tx, mut rx) in mute {
        waits.spawn(async move {
            // Held open until the answer: dropping the writer would end the stream.
            let msg = rx.recv::<CloudMessage>().await;
            drop(tx);
            conn.close(0u32.into(), b"bye");
            match msg {
                Ok(Some(CloudMessage::Refused { code, problems })) => {
                    assert_eq!(code, RefusalCode::ProtocolViolation);
                    problems.join("; ")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        });
    }
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = waits.join_next().await {
            *reasons.entry(r.unwrap()).or_default() += 1;
        }
    })
    .await;
    let took = opened.elapsed();
    assert!(
        ended.is_ok(),
        "half-open connections still open after {took:?}: {reasons:?}"
    );
    assert_eq!(
        reasons,
        [
            (
                "no control stream within 20 s (transport.hello_timeout_secs)".to_owned(),
                FLOOD / 2
            ),
            ("timed out before the edge said Hello".to_owned(), mute_count)
        ]
        .into(),
    );
    assert!(took < Duration::from_secs(35), "closed after {took:?}");
    assert_eq!(cloud.domain.inventory.list_vms().unwrap().len(), 2);
    cloud.stop().await;
}

/// Connections of `edge` to `cloud`, each with a control stream opened and nothing said.
/// Past `held`, the endpoint closes them as busy.
async fn hold_connections(
    cloud: &Cloud,
    pki: &Pki,
    edge: &str,
    held: usize,
) -> (quinn::Endpoint, Vec<(quinn::Connection, ControlWriter)>) {
    let crypto = transport::client_crypto(pki.other_edge(edge), pki.trust_ca()).unwrap();
    let endpoint =
        transport::client_endpoint("127.0.0.1:0".parse().unwrap(), crypto, &TransportTuning::default()).unwrap();
    let mut conns = Vec::new();
    for _ in 0..held {
        let conn = transport::connect(&endpoint, cloud.addr, "localhost").await.unwrap();
        let (send, _recv) = conn.open_bi().await.unwrap();
        let tx = ControlWriter::open(send, true).await.unwrap();
        conns.push((conn, tx));
    }
    (endpoint, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_bounded_per_edge_and_in_all_and_unaccepted_streams_cannot_be_filled() {
    const EDGES: usize = 5;
    const PER_EDGE: usize = 4;
    const ALL: usize = 24;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[
            ("CLOUD_ENDPOINT_TRANSPORT__MAX_CONNECTIONS", "24"),
            ("CLOUD_ENDPOINT_TRANSPORT__MAX_CONNECTIONS_PER_EDGE", "4"),
            ("CLOUD_ENDPOINT_TRANSPORT__HELLO_TIMEOUT_SECS", "20"),
        ],
    )
    .await;
    let hwm_before = proc_status_kib("VmHWM");
    let opened = Instant::now();

    // Five edges hold four connections each, each with a control stream and no Hello.
    let mut flood = Vec::new();
    for e in 0..EDGES {
        let (endpoint, conns) = hold_connections(&cloud, &pki, &format!("edge-flood-{e}"), PER_EDGE).await;
        // The endpoint counts a connection once its side of the handshake is done, which
        // on a loaded machine may come after the client's: let it catch up.
        tokio::time::sleep(Duration::from_secs(2)).await;
        // A fifth connection of the same edge is closed as busy.
        let fifth = transport::connect(&endpoint, cloud.addr, "localhost").await.unwrap();
        match tokio::time::timeout(Duration::from_secs(30), fifth.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                assert_eq!(
                    RefusalCode::from_close_code(c.error_code.into_inner()),
                    Some(RefusalCode::Busy),
                    "{c:?}"
                );
            }
            other => panic!("expected a busy close of the fifth connection, got {other:?}"),
        }
        flood.push((endpoint, conns));
    }
    // Before its Hello, a connection may not open another stream: what the endpoint
    // allowed and never accepted (16 data and 4 more bidirectional streams of 1.25 MB
    // each) was memory any edge could fill. Each stuffer tries to fill them all.
    let mut stuffers = tokio::task::JoinSet::new();
    for (_, conns) in &flood {
        for (conn, _) in conns {
            let conn = conn.clone();
            stuffers.spawn(async move {
                let junk = vec![0xA5u8; 1_250_000];
                let mut opened = 0;
                for _ in 0..16 {
                    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), conn.open_uni()).await else {
                        break;
                    };
                    opened += 1;
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(&junk)).await;
                }
                for _ in 0..4 {
                    let Ok(Ok((mut s, _))) = tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await else {
                        break;
                    };
                    opened += 1;
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(&junk)).await;
                }
                opened
            });
        }
    }

    // Beside the flood, a real lift from another edge completes, identical.
    still_serves(&cloud, &pki, tmp.path(), "beside-the-flood").await;
    let mut streams_opened = 0;
    while let Some(n) = stuffers.join_next().await {
        streams_opened += n.unwrap();
    }
    assert_eq!(streams_opened, 0, "streams opened before a Hello");
    let grown_mib = (proc_status_kib("VmHWM") - hwm_before) / 1024;
    println!(
        "{} connections held without a Hello: peak memory grew {grown_mib} MiB",
        EDGES * PER_EDGE
    );
    assert!(
        grown_mib < 96,
        "peak memory grew {grown_mib} MiB with {} half-open connections",
        EDGES * PER_EDGE
    );

    // Up to the total: one more edge's four, then any further connection is refused
    // before its handshake.
    assert!(
        flood
            .iter()
            .all(|(_, c)| c.iter().all(|(c, _)| c.close_reason().is_none())),
        "the flood still holds its connections ({:?})",
        opened.elapsed()
    );
    // The lift's connection lets go of its count once its task ends, just after the lift.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_last_endpoint, last) = hold_connections(&cloud, &pki, "edge-flood-last", ALL - EDGES * PER_EDGE).await;
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let refused = target
        .connect(&TransportTuning::default())
        .await
        .expect_err("a connection past transport.max_connections is refused");
    let msg = refused.to_string();
    assert!(
        msg.contains("refused the connection") && msg.contains("retry later"),
        "{msg}"
    );

    // The Hello deadline ends them all; then lifts go through again.
    for (conn, _) in flood.iter().flat_map(|(_, c)| c.iter()).chain(last.iter()) {
        match tokio::time::timeout(Duration::from_secs(30), conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
                assert_eq!(
                    RefusalCode::from_close_code(c.error_code.into_inner()),
                    Some(RefusalCode::ProtocolViolation)
                );
            }
            other => panic!("expected the Hello deadline to close it, got {other:?}"),
        }
    }
    still_serves(&cloud, &pki, tmp.path(), "after-the-flood").await;
    cloud.stop().await;
}

/// Appends `records` zero-run records for chunks `first..first + count` of disk 0 to a
/// migration's journal, as an endpoint before this bound journaled every repeat an edge
/// sent (the format is datastore/journal.rs's: 56 bytes, big-endian).
fn append_old_zero_runs(journal: &Path, first_offset: u64, count: u64, records: usize) {
    use std::io::Write;
    let mut record = Vec::with_capacity(56);
    record.extend_from_slice(&0u16.to_be_bytes());
    record.push(1); // a zero run
    record.extend_from_slice(&[0; 5]);
    record.extend_from_slice(&first_offset.to_be_bytes());
    record.extend_from_slice(&count.to_be_bytes());
    record.extend_from_slice(&[0; 32]);
    let mut f = std::fs::OpenOptions::new().append(true).open(journal).unwrap();
    for _ in 0..records {
        f.write_all(&record).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_run_declared_again_is_refused_and_a_resume_replays_within_the_plan() {
    // A 4 GiB disk in 64 KiB chunks: 65,536 chunks. Declared zero 600 times (6 KB on the
    // wire), an endpoint that journaled each repeat replayed 39 M entries (1.9 GB) on a
    // resume.
    const REPEATS: usize = 600;
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let cs = u64::from(MIN_CHUNK_SIZE);
    let capacity: u64 = 4 << 30;
    let chunks = capacity / cs;
    let the_plan = plan("zeros", &[("scsi0:0", capacity)], MIN_CHUNK_SIZE);
    let rest_zero = EdgeMessage::ZeroChunks {
        disk: 0,
        offset: cs,
        count: chunks - 1,
    };
    let hwm_before = proc_status_kib("VmHWM");

    let hostile = async {
        let mut edge = RawEdge::welcomed(&cloud, &pki).await;
        let id = edge.plan(&the_plan).await.expect("plan accepted");
        // Everything but chunk 0 declared zero, once; chunk 0 as data, so its ack says the
        // batch (the zero run included) is journaled.
        edge.send(&rest_zero).await;
        let (first, payload) = sealed(0, &vec![5u8; MIN_CHUNK_SIZE as usize]);
        edge.chunk(&first, &payload).await.unwrap();
        edge.acked(&[0]).await;
        edge.close();
        eventually(10, || (!cloud.domain.live.is_live(&id)).then_some(()))
            .await
            .expect("the connection's end was noticed");

        // The journal as an older endpoint left it after 600 repeats of the declaration.
        let journal = cloud.root.join(format!(".staging/{id}/.chunks.journal"));
        append_old_zero_runs(&journal, cs, chunks - 1, REPEATS);
        assert!(std::fs::metadata(&journal).unwrap().len() > (REPEATS * 56) as u64);

        // The resume replays it into one state per chunk: every chunk is held.
        let mut edge = RawEdge::welcomed(&cloud, &pki).await;
        edge.send(&EdgeMessage::Resume {
            migration_id: id.clone(),
            plan: the_plan.clone(),
        })
        .await;
        match edge.recv().await {
            CloudMessage::Resumed { done, .. } => {
                assert_eq!(done.len(), 1);
                let held = (0..chunks).filter(|&i| gateway::wire::bit(&done[0], i)).count() as u64;
                assert_eq!(held, chunks, "every chunk is held after the replay");
            }
            other => panic!("expected Resumed, got {other:?}"),
        }

        // The same declaration again: refused at the first repeat, whatever follows.
        let mut sent = 0;
        while sent < REPEATS && edge.try_send(&rest_zero).await.is_ok() {
            sent += 1;
        }
        let (code, problems) = edge.refusal().await;
        assert_eq!(code, RefusalCode::ProtocolViolation, "{problems:?}");
        assert!(
            problems[0].contains(&format!("chunk at offset {cs} declared zero again")),
            "{problems:?}"
        );
        let rec = record(&cloud, &id, "FAILED").await;
        assert!(rec.error.unwrap_or_default().contains("declared zero again"));
        edge.close();
    };
    // A real lift beside it completes, identical.
    tokio::join!(hostile, still_serves(&cloud, &pki, tmp.path(), "beside-zeros"));

    let grown_mib = (proc_status_kib("VmHWM") - hwm_before) / 1024;
    println!(
        "peak memory grew {grown_mib} MiB (VmRSS now {} MiB)",
        proc_status_kib("VmRSS") / 1024
    );
    assert!(
        grown_mib < 96,
        "peak memory grew {grown_mib} MiB (the plan's chunk table is 2 MiB)"
    );
    assert_eq!(cloud.datastore_entries(), vec!["beside-zeros".to_owned()]);
    cloud.stop().await;
}
