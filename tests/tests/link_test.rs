//! `edge-agent link-test` against a real endpoint over QUIC on 127.0.0.1:
//! measurements, verdict and VM estimate; the endpoint's limits; trust.

use certs::{Ca, Thumbprint, Validity};
use e2e::*;
use edge_agent::linktest::{self, LinkTestError, LinkTestOptions};
use edge_agent::target::Target;
use gateway::transport::{Identity, ServerTrust};
use gateway::wire::RefusalCode;

fn target(cloud: &Cloud, pki: &Pki) -> Target {
    // A link test needs no credential of the cloud domain.
    cloud.target(pki, "", "")
}

fn quick() -> LinkTestOptions {
    LinkTestOptions {
        seconds: 1,
        ..LinkTestOptions::default()
    }
}

fn refusal(r: Result<linktest::report::LinkReport, LinkTestError>) -> (RefusalCode, String) {
    match r {
        Err(e @ LinkTestError::Refused { code, .. }) => (code, e.to_string()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_link_is_measured_passes_the_live_class_and_estimates_a_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    // 16 chunks of 1 MiB: 8 zero (holes), 4 text, 4 random.
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut regions = vec![Fill::Zero; 8];
    regions.extend([Fill::Text; 4]);
    regions.extend([Fill::Random; 4]);
    write_raw_disk(&src.join("lt.img"), 1 << 20, &regions, 3);
    let vmx = write_vmx(&src, "lt01", &["lt.img"], &[]);

    let opts = LinkTestOptions {
        vm: Some(vmx),
        ..quick()
    };
    let r = linktest::run(&target(&cloud, &pki), &opts)
        .await
        .expect("link test runs");
    let text = r.to_text();
    println!("{text}");

    assert_eq!((r.upload_secs, r.download_secs), (1, 1));
    // As many streams as a migration opens on this path: 4 on loopback, unless
    // a loaded machine stretched the handshake's round trip past 10 ms.
    assert!((4..=16).contains(&r.streams), "{}", r.streams);
    assert!(r.upload.steady_mbit_s > 0.0 && r.download.steady_mbit_s > 0.0);
    assert!(r.clamped.is_empty(), "{:?}", r.clamped);
    assert!(r.endpoint.contains("esx-cloud-01.local"), "{}", r.endpoint);
    assert_eq!(r.rtt.pings, 20);
    assert!(r.rtt.min_ms > 0.0 && r.rtt.mean_ms < 50.0, "{:?}", r.rtt);
    assert!(r.rtt.min_ms <= r.rtt.mean_ms && r.rtt.mean_ms <= r.rtt.max_ms);
    assert!(r.quinn_smoothed_rtt_ms > 0.0 && r.quinn_smoothed_rtt_ms < 50.0);
    for (what, d) in [("upload", &r.upload), ("download", &r.download)] {
        assert!(d.bytes > 0 && d.mbit_s > 0.0, "{what}: {d:?}");
        assert!(
            d.secs > 0.5 && d.secs < 3.0,
            "{what} ran about the granted second: {d:?}"
        );
        assert!(d.sent_packets > 0 && d.loss_percent < 5.0, "{what}: {d:?}");
        assert!(!d.cut, "{what}");
    }
    assert!(r.mtu.udp_payload >= 1200, "{:?}", r.mtu);
    assert_eq!(r.mtu.ip_mtu, u32::from(r.mtu.udp_payload) + 28);
    assert!(r.wire_overhead > 1.0 && r.wire_overhead < 1.2, "{}", r.wire_overhead);
    assert!(r.live_migration.pass, "{:?}", r.live_migration);
    assert!(text.contains("live migration class: PASS"), "{text}");
    assert!(r.bulk_lift.pass && r.bulk_lift.secs_per_100_gib > 0.0);

    let vm = r.vm.as_ref().expect("VM estimate");
    assert_eq!(vm.name, "lt01");
    assert_eq!(vm.disks.len(), 1);
    assert_eq!((vm.disks[0].chunks, vm.disks[0].sampled, vm.disks[0].zero), (16, 16, 8));
    let e = &vm.estimate;
    assert_eq!(e.logical_bytes, 16 << 20);
    assert_eq!((e.zero_fraction, e.data_bytes), (0.5, 8 << 20));
    // Text compresses, random does not: the ratio lies between 1 and 2.
    assert!(e.compression_ratio > 1.3 && e.compression_ratio < 2.0, "{e:?}");
    assert!(e.payload_bytes > 4 << 20 && e.payload_bytes < 7 << 20, "{e:?}");
    assert!(e.wire_bytes > e.payload_bytes);
    assert!(e.lift_secs > 0.0 && e.lift_secs < 5.0, "{e:?}");
    assert!(e.seal_mb_s_per_core > 0.0);
    assert!(
        text.contains("VM lt01") && text.contains("method: sampled 16 of 16 chunks"),
        "{text}"
    );

    let json = r.to_json();
    assert_eq!(json["live_migration"]["pass"], true);
    assert!(json["rtt"]["jitter_ms"].as_f64().is_some());
    assert!(json["download"]["loss_percent"].as_f64().is_some());
    assert_eq!(json["vm"]["estimate"]["logical_bytes"], 16 << 20);

    // Nothing reached the cloud domain, and migrations still work beside it.
    assert!(cloud.domain.inventory.list_migrations().unwrap().is_empty());
    let migrated = migrate(
        &write_vmx(&src, "lt02", &["lt.img"], &[]),
        &cloud.target(&pki, MIGRATOR, DEMO_PASSWORD),
        &Default::default(),
    )
    .await
    .expect("a migration after a link test");
    assert_eq!(migrated.vm, "lt02");
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_limits_are_clamped_or_refused_with_the_setting_named() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[
            ("CLOUD_ENDPOINT_LINK_TEST__MAX_SECONDS", "1"),
            ("CLOUD_ENDPOINT_LINK_TEST__TESTS_PER_MINUTE", "2"),
        ],
    )
    .await;
    let t = target(&cloud, &pki);

    // Too long: clamped, and the result says so.
    let opts = LinkTestOptions {
        seconds: 30,
        ..LinkTestOptions::default()
    };
    let r = linktest::run(&t, &opts).await.expect("clamped, not refused");
    assert_eq!((r.upload_secs, r.download_secs), (1, 1));
    assert_eq!(r.clamped.len(), 2, "{:?}", r.clamped);
    assert!(
        r.clamped[0].contains("30 s clamped to 1 s") && r.clamped[0].contains("link_test.max_seconds"),
        "{:?}",
        r.clamped
    );
    assert!(r.upload.secs < 3.0, "the upload was cut to the grant: {:?}", r.upload);
    assert!(r.to_text().contains("clamped"), "{}", r.to_text());

    // The second test of this certificate in a minute is allowed, the third is not.
    linktest::run(&t, &quick()).await.expect("within the budget");
    let (code, msg) = refusal(linktest::run(&t, &quick()).await);
    assert_eq!(code, RefusalCode::Busy);
    assert!(
        msg.contains("link_test.tests_per_minute") && msg.contains("retry in"),
        "{msg}"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_or_disabled_endpoint_refuses_with_a_clear_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_LINK_TEST__MAX_CONCURRENT", "1")],
    )
    .await;
    let t = target(&cloud, &pki);
    let opts = quick();
    let (a, b) = tokio::join!(linktest::run(&t, &opts), linktest::run(&t, &opts));
    let (ok, refused) = if a.is_ok() { (a, b) } else { (b, a) };
    ok.expect("one of two runs");
    let (code, msg) = refusal(refused);
    assert_eq!(code, RefusalCode::Busy);
    assert!(
        msg.contains("link_test.max_concurrent") && msg.contains("retry"),
        "{msg}"
    );
    cloud.stop().await;

    let off = Cloud::start(
        &tmp.path().join("off"),
        &pki,
        &[("CLOUD_ENDPOINT_LINK_TEST__ENABLED", "false")],
    )
    .await;
    let (code, msg) = refusal(linktest::run(&target(&off, &pki), &quick()).await);
    assert_eq!(code, RefusalCode::NotPermitted);
    assert!(msg.contains("link_test.enabled = false"), "{msg}");
    off.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_is_checked_both_ways_as_for_migrate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;

    // An edge certificate from another CA never gets a test.
    let rogue = Ca::generate("Rogue CA")
        .unwrap()
        .issue_edge("edge-01", Validity::days(30))
        .unwrap();
    let mut t = target(&cloud, &pki);
    t.identity = Identity {
        chain: vec![rogue.cert_der()],
        key: rogue.key_der(),
    };
    let msg = linktest::run(&t, &quick()).await.unwrap_err().to_string();
    assert!(msg.contains("TLS") || msg.contains("certificate"), "{msg}");

    // An endpoint that does not match the pin is not measured.
    let mut t = target(&cloud, &pki);
    t.trust = ServerTrust::Pinned(Thumbprint::from([0xAB; 32]));
    let msg = linktest::run(&t, &quick()).await.unwrap_err().to_string();
    assert!(msg.contains("not the pinned AB:AB"), "{msg}");

    // The right pin alone works, as for migrate.
    t.trust = ServerTrust::Pinned(certs::thumbprint_of_pem_file(&pki.path("endpoint.pem")).unwrap());
    linktest::run(&t, &quick()).await.expect("pinned endpoint measured");
    cloud.stop().await;
}
