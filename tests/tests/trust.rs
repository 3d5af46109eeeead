//! Mutual TLS: each side refuses a peer it does not trust, before any data.

use certs::{Ca, Thumbprint, Validity};
use e2e::*;
use edge_agent::migrate::MigrateOptions;
use gateway::transport::{Identity, ServerTrust};

fn vm(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write_raw_disk(&dir.join("t.img"), 1 << 20, &[Fill::Text], 9);
    write_vmx(dir, "trust01", &["t.img"], &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_certificate_from_another_ca_cannot_connect() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let rogue = Ca::generate("Rogue CA")
        .unwrap()
        .issue_edge("edge-01", Validity::days(30))
        .unwrap();
    let mut target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    target.identity = Identity {
        chain: vec![rogue.cert_der()],
        key: rogue.key_der(),
    };
    let err = migrate(&vm(&tmp.path().join("src")), &target, &MigrateOptions::default())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("TLS") || msg.contains("certificate"), "{msg}");
    assert!(
        cloud.domain.inventory.list_migrations().unwrap().is_empty(),
        "never reached the domain"
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_an_endpoint_it_does_not_trust() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let vmx = vm(&tmp.path().join("src"));

    // A CA bundle of another CA.
    let mut target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    target.trust = ServerTrust::Ca(vec![Ca::generate("Other CA").unwrap().cert_der()]);
    let msg = migrate(&vmx, &target, &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("UnknownIssuer") || msg.contains("certificate"), "{msg}");

    // A wrong pinned thumbprint.
    target.trust = ServerTrust::Pinned(Thumbprint::from([0xAB; 32]));
    let msg = migrate(&vmx, &target, &Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("not the pinned AB:AB"), "{msg}");

    // The right thumbprint works without any CA, as vSphere's sslThumbprint does.
    let pin = certs::thumbprint_of_pem_file(&pki.path("endpoint.pem")).unwrap();
    target.trust = ServerTrust::Pinned(pin);
    migrate(&vmx, &target, &Default::default())
        .await
        .expect("pinned endpoint accepted");
    // Both given: both must match.
    target.trust = ServerTrust::CaAndPinned(vec![pki.ca.cert_der()], pin);
    let opts = MigrateOptions {
        name: Some("trust02".into()),
        ..Default::default()
    };
    migrate(&vmx, &target, &opts).await.expect("CA and pin accepted");
    assert_eq!(cloud.domain.inventory.list_vms().unwrap().len(), 2);
    cloud.stop().await;
}
