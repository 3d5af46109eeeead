//! Bandwidth caps, as a network team would check them: a capped lift never
//! moves its data faster than the cap, whether the edge sets it for one
//! migration or the endpoint for all of them, and the disk still arrives
//! identical. (Lower bounds on time only: a slow machine cannot fail them.)

use std::time::Instant;

use e2e::*;
use edge_agent::migrate::MigrateOptions;

const MIB: usize = 1 << 20;

/// A disk of `random` 4 MiB regions of random data (incompressible: every
/// byte travels), each followed by a 4 MiB hole.
fn random_vm(dir: &std::path::Path, random: usize) -> std::path::PathBuf {
    use Fill::*;
    std::fs::create_dir_all(dir).unwrap();
    let layout: Vec<Fill> = (0..random).flat_map(|_| [Random, Zero]).collect();
    write_raw_disk(&dir.join("capped.img"), 4 * MIB, &layout, 7);
    write_vmx(dir, "capped", &["capped.img"], &[])
}

/// Seconds the cap allows for `bytes`, less its 100 ms burst.
fn floor_secs(bytes: u64, bits_per_sec: f64) -> f64 {
    bytes as f64 * 8.0 / bits_per_sec - 0.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_cap_holds_one_migration_to_its_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = random_vm(&tmp.path().join("src"), 3);
    let opts = MigrateOptions {
        max_rate: Some("64mbit".parse().unwrap()),
        ..MigrateOptions::default()
    };
    let t0 = Instant::now();
    let summary = migrate(&vmx, &cloud.target(&pki, MIGRATOR, DEMO_PASSWORD), &opts)
        .await
        .expect("a capped migration completes");
    let secs = t0.elapsed().as_secs_f64();
    assert!(summary.payload_bytes >= 12 * MIB as u64, "random data is sent whole");
    let floor = floor_secs(summary.payload_bytes, 64e6);
    assert!(
        secs >= floor,
        "{} B in {secs:.2} s: faster than 64 Mbit/s (at least {floor:.2} s)",
        summary.payload_bytes
    );
    assert!(images_identical(
        &tmp.path().join("src/capped.img"),
        &cloud.root.join("capped/capped.vmdk")
    ));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_cap_holds_every_migration_to_its_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_TRANSPORT__MAX_RATE_PER_MIGRATION", "128mbit")],
    )
    .await;
    let vmx = random_vm(&tmp.path().join("src"), 10);
    let t0 = Instant::now();
    let summary = migrate(
        &vmx,
        &cloud.target(&pki, MIGRATOR, DEMO_PASSWORD),
        &MigrateOptions::default(),
    )
    .await
    .expect("a migration under the endpoint's cap completes");
    let secs = t0.elapsed().as_secs_f64();
    // The endpoint paces its reads; the edge may get one connection window
    // (12 MiB at the smallest) ahead before its sender feels it.
    assert!(summary.payload_bytes >= 40 * MIB as u64, "random data is sent whole");
    let floor = floor_secs(summary.payload_bytes - 13 * MIB as u64, 128e6);
    assert!(
        secs >= floor,
        "{} B in {secs:.2} s: faster than the endpoint's 128 Mbit/s cap",
        summary.payload_bytes
    );
    assert!(images_identical(
        &tmp.path().join("src/capped.img"),
        &cloud.root.join("capped/capped.vmdk")
    ));
    cloud.stop().await;
}
