//! Signed migration receipts end to end, over real QUIC on 127.0.0.1: a lifted VM's
//! receipt verifies against its source, is the same document through the REST API and
//! after an endpoint restart; altered receipts, altered sources, another VM with the same
//! disks (another name, or the same name and another .vmx), another endpoint's pin and
//! another CA all fail.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use certs::Thumbprint;
use e2e::*;
use edge_agent::migrate::MigrateOptions;
use edge_agent::receipt::{self, VerifyError};
use gateway::receipt::{ReceiptError, SignedReceipt};
use gateway::transport::ServerTrust;
use reqwest::StatusCode;
use serde_json::Value;

const KIB: usize = 1 << 10;
const SESSION: &str = "vmware-api-session-id";

/// A VM of two disks: one of random, text and zero regions, one of an odd size whose
/// last chunk is short, so the trees have odd leaf counts and a short leaf.
fn source_vm(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    use Fill::*;
    write_raw_disk(
        &dir.join("app01.img"),
        256 * KIB,
        &[Random, Text, Zero, Zero, Text, Random, Zero, Text, Random],
        7,
    );
    let data = dir.join("app01_1.img");
    write_raw_disk(&data, 128 * KIB, &[Text, Zero, Random], 8);
    // 384 KiB + 5000 bytes: the last chunk holds 5000 zero bytes, a hole.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(3 * 128 * KIB as u64 + 5000)
        .unwrap();
    write_vmx(dir, "app01", &["app01.img", "app01_1.img"], &[])
}

fn options(receipt: &Path) -> MigrateOptions {
    MigrateOptions {
        // 64 KiB chunks: dozens of leaves per disk.
        chunk_size: 64 * KIB as u32,
        receipt_path: Some(receipt.to_owned()),
        ..MigrateOptions::default()
    }
}

fn endpoint_pin(pki: &Pki) -> Thumbprint {
    certs::thumbprint_of_pem_file(&pki.path("endpoint.pem")).unwrap()
}

/// GET over HTTPS, with a fresh session of the auditor (read-only) unless `anonymous`:
/// status and body text.
async fn api_request(cloud: &Cloud, pki: &Pki, path: &str, anonymous: bool) -> (StatusCode, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let base = format!("https://{}", cloud.api_addr.expect("API on"));
    if anonymous {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        return (r.status(), r.text().await.unwrap());
    }
    let login = http
        .post(format!("{base}/api/session"))
        .basic_auth(AUDITOR, Some(DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::CREATED);
    let token: String = login.json().await.unwrap();
    let r = http
        .get(format!("{base}{path}"))
        .header(SESSION, token)
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn api_get(cloud: &Cloud, pki: &Pki, path: &str) -> (StatusCode, String) {
    api_request(cloud, pki, path, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifted_vms_receipt_verifies_is_served_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud_dir = tmp.path().join("cloud");
    let cloud = Cloud::start(&cloud_dir, &pki, &[]).await;
    let vmx = source_vm(&tmp.path().join("src"));
    let receipt_file = tmp.path().join("app01.receipt.json");

    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let summary = migrate(&vmx, &target, &options(&receipt_file))
        .await
        .expect("migration succeeds");
    assert_eq!(summary.receipt_path.as_deref(), Some(receipt_file.as_path()));
    assert!(summary.to_text().contains("receipt:"), "{}", summary.to_text());
    assert_eq!(
        summary.to_json()["receipt_path"],
        receipt_file.display().to_string(),
        "the --json summary line says where"
    );
    let written = std::fs::read_to_string(&receipt_file).unwrap();
    assert_eq!(written, summary.receipt);

    // What it states.
    let signed = SignedReceipt::from_json(&written).unwrap();
    let r = &signed.receipt;
    assert_eq!(
        (r.migration_id.as_str(), r.vm_id.as_str(), r.vm_name.as_str()),
        (summary.migration_id.as_str(), summary.vm_id.as_str(), "app01")
    );
    assert_eq!(r.vm_path, summary.vm_path);
    let disks: Vec<(&str, u64, u64, u32)> = r
        .disks
        .iter()
        .map(|d| (d.key.as_str(), d.logical_bytes, d.capacity, d.chunk_size))
        .collect();
    let odd = 3 * 128 * KIB as u64 + 5000;
    assert_eq!(
        disks,
        [
            ("scsi0:0", 9 * 256 * KIB as u64, 9 * 256 * KIB as u64, 64 * KIB as u32),
            ("scsi0:1", odd, odd.next_multiple_of(512), 64 * KIB as u32),
        ]
    );
    assert_eq!(r.endpoint_thumbprint, endpoint_pin(&pki).to_string());
    let record = cloud
        .domain
        .inventory
        .migration(&summary.migration_id)
        .unwrap()
        .unwrap();
    assert_eq!(r.planned_at, record.started);
    assert_eq!(Some(&r.committed_at), record.finished.as_ref());
    assert!(record.has_receipt);

    // It verifies against the source, by CA, by pin and by both.
    for trust in [
        pki.trust_ca(),
        ServerTrust::Pinned(endpoint_pin(&pki)),
        ServerTrust::CaAndPinned(vec![pki.ca.cert_der()], endpoint_pin(&pki)),
    ] {
        let verdict = receipt::verify(&receipt_file, &vmx, &trust).unwrap();
        assert!(verdict.ok(), "{verdict}");
        assert_eq!(verdict.disks.len(), 2);
        assert!(verdict.to_string().contains("scsi0:1   OK"), "{verdict}");
    }

    // The API serves the same bytes, and the migration record says a receipt exists.
    let path = format!("/api/gateway/migrations/{}/receipt", summary.migration_id);
    let (status, body) = api_get(&cloud, &pki, &path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, written);
    let (_, record) = api_get(
        &cloud,
        &pki,
        &format!("/api/gateway/migrations/{}", summary.migration_id),
    )
    .await;
    let record: Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["has_receipt"], true, "{record}");
    let (status, body) = api_get(&cloud, &pki, "/api/gateway/migrations/migration-999/receipt").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error_type"], "NOT_FOUND", "{body}");
    // The same session rules as the rest of /api.
    let (status, body) = api_request(&cloud, &pki, &path, true).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // After a restart the endpoint still has it, byte for byte.
    cloud.stop().await;
    let cloud = Cloud::start(&cloud_dir, &pki, &[]).await;
    let (status, body) = api_get(&cloud, &pki, &path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, written);
    assert_eq!(
        cloud.domain.inventory.receipt(&summary.migration_id).unwrap(),
        Some(written)
    );
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_receipts_altered_sources_and_other_endpoints_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    let vmx = source_vm(&src);
    let receipt_file = tmp.path().join("app01.receipt.json");
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    migrate(&vmx, &target, &options(&receipt_file))
        .await
        .expect("migration succeeds");
    let written = std::fs::read_to_string(&receipt_file).unwrap();

    // A changed root or VM id breaks the signature; no disk is read then.
    type Alter = fn(&mut Value);
    let alterations: [(&str, Alter); 3] = [
        ("root", |v| {
            let root = v["receipt"]["disks"][1]["merkle_root"].as_str().unwrap();
            let flipped = if root.starts_with('0') { "1" } else { "0" };
            v["receipt"]["disks"][1]["merkle_root"] = format!("{flipped}{}", &root[1..]).into();
        }),
        ("vm id", |v| v["receipt"]["vm_id"] = "vm-9999".into()),
        ("disk size", |v| {
            v["receipt"]["disks"][0]["logical_bytes"] = 1.into();
        }),
    ];
    for (what, alter) in alterations {
        let mut v: Value = serde_json::from_str(&written).unwrap();
        alter(&mut v);
        let tampered = tmp.path().join(format!("tampered-{}.json", what.replace(' ', "-")));
        std::fs::write(&tampered, serde_json::to_string_pretty(&v).unwrap()).unwrap();
        let err = receipt::verify(&tampered, &vmx, &pki.trust_ca()).unwrap_err();
        assert!(
            matches!(
                &err,
                VerifyError::Receipt {
                    source: ReceiptError::BadSignature,
                    ..
                }
            ),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("altered"), "{err}");
    }

    // The wrong pin, or another CA, refuses the endpoint.
    let other = Pki::new(&tmp.path().join("other-pki"));
    let err = receipt::verify(&receipt_file, &vmx, &ServerTrust::Pinned(endpoint_pin(&other))).unwrap_err();
    assert!(
        matches!(
            &err,
            VerifyError::Receipt {
                source: ReceiptError::PinMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    let err = receipt::verify(&receipt_file, &vmx, &other.trust_ca()).unwrap_err();
    assert!(
        matches!(
            &err,
            VerifyError::Receipt {
                source: ReceiptError::UntrustedEndpoint(_),
                ..
            }
        ),
        "{err}"
    );
    let err = receipt::verify(
        &receipt_file,
        &vmx,
        &ServerTrust::CaAndPinned(vec![pki.ca.cert_der()], endpoint_pin(&other)),
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            VerifyError::Receipt {
                source: ReceiptError::PinMismatch { .. },
                ..
            }
        ),
        "{err}"
    );

    // Another VM with the same bytes (a copy of the disks under another name): every
    // root matches, and the receipt still fails, naming both VMs.
    let copy = write_vmx(&src, "web02", &["app01.img", "app01_1.img"], &[]);
    let verdict = receipt::verify(&receipt_file, &copy, &pki.trust_ca()).unwrap();
    assert!(verdict.disks.iter().all(|d| d.ok()), "{verdict}");
    assert!(!verdict.ok(), "{verdict}");
    assert_eq!(verdict.failures(), 1, "{verdict}");
    assert!(
        verdict
            .to_string()
            .contains("VM        MISMATCH  the source VM is named \"web02\", the receipt is of \"app01\""),
        "{verdict}"
    );

    // Another VM of the same name and the same disk bytes whose .vmx differs (here its
    // memory): the receipt binds the .vmx the migration read, so it is refused, saying
    // what differs and what to do, by the library and by `edge-agent verify-receipt`.
    let twin = src.join("app01-twin.vmx");
    std::fs::write(
        &twin,
        std::fs::read_to_string(&vmx)
            .unwrap()
            .replace("memsize = \"2048\"", "memsize = \"4096\""),
    )
    .unwrap();
    let verdict = receipt::verify(&receipt_file, &twin, &pki.trust_ca()).unwrap();
    assert!(verdict.disks.iter().all(|d| d.ok()), "{verdict}");
    assert!(!verdict.ok(), "{verdict}");
    let why = verdict.vm_mismatch.as_deref().unwrap();
    assert!(
        why.contains("app01-twin.vmx has SHA-256")
            && why.contains("the receipt binds")
            && why.contains("not the .vmx (or OVF) the migration read")
            && why.contains("check the receipt against the descriptor as it was migrated"),
        "{why}"
    );
    assert!(!why.contains("is named"), "the names are the same: {why}");
    let bin = wan::ensure_binaries();
    let out = std::process::Command::new(bin.join("edge-agent"))
        .arg("verify-receipt")
        .arg("--receipt")
        .arg(&receipt_file)
        .arg("--ca-bundle")
        .arg(pki.path("ca.pem"))
        .arg(&twin)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("VM        MISMATCH") && said.contains("the receipt binds"),
        "{said}"
    );
    // The migrated .vmx itself still verifies, naming the digest it binds.
    let verdict = receipt::verify(&receipt_file, &vmx, &pki.trust_ca()).unwrap();
    assert!(verdict.ok(), "{verdict}");
    assert!(
        verdict.to_string().contains("VM        OK        app01 SHA-256 "),
        "{verdict}"
    );

    // One byte changed in the source's second disk: that disk, and only it, mismatches.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(src.join("app01_1.img"))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 1000).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], 1000).unwrap();
    }
    let verdict = receipt::verify(&receipt_file, &vmx, &pki.trust_ca()).unwrap();
    assert!(!verdict.ok());
    assert_eq!(verdict.failures(), 1, "{verdict}");
    assert!(verdict.disks[0].ok(), "{verdict}");
    let why = verdict.disks[1].mismatch.as_deref().unwrap();
    assert!(why.contains("Merkle root") && why.contains("app01_1.img"), "{why}");
    assert!(verdict.to_string().contains("scsi0:1   MISMATCH"), "{verdict}");

    // A source that grew a disk the receipt does not name fails too.
    std::fs::write(src.join("extra.img"), vec![1u8; 64 * KIB]).unwrap();
    let vmx2 = write_vmx(&src, "app01-more", &["app01.img", "app01_1.img", "extra.img"], &[]);
    let verdict = receipt::verify(&receipt_file, &vmx2, &pki.trust_ca()).unwrap();
    assert!(verdict.disks.iter().any(|d| d.key == "scsi0:2" && !d.ok()), "{verdict}");
    cloud.stop().await;
}
