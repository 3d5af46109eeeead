//! A newcomer's first run, with the real binaries as the README gives them: `certs
//! quickstart --out pki`, `cloud-endpoint example-config > cloud.toml`, then
//! `cloud-endpoint --config cloud.toml serve` must come up, and a vSphere client that
//! trusts the quickstart CA logs in with a demo user.

use std::process::Command;
use std::sync::Arc;

use e2e::process::EndpointProcess;
use e2e::{wan, AUDITOR, DEMO_PASSWORD};
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_serves_with_the_quickstart_certificates() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let quickstart = Command::new(bin.join("certs"))
        .args(["quickstart", "--out", "pki"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        quickstart.status.success(),
        "{}",
        String::from_utf8_lossy(&quickstart.stderr)
    );
    let example = Command::new(bin.join("cloud-endpoint"))
        .arg("example-config")
        .output()
        .unwrap();
    assert!(example.status.success(), "{}", String::from_utf8_lossy(&example.stderr));
    let config = dir.join("cloud.toml");
    std::fs::write(&config, &example.stdout).unwrap();
    // Every file the example names is one quickstart wrote.
    let text = String::from_utf8_lossy(&example.stdout);
    for key in ["cert", "key", "edge_ca"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("example-config sets {key}"));
        let path = line.split('"').nth(1).unwrap();
        assert!(
            dir.join(path).is_file(),
            "example-config's {line} is not a file certs quickstart wrote"
        );
    }

    // As the README runs it, from the folder of the file; only the ports are moved off
    // the defaults (other tests may hold them), through the variables that beat the file.
    let env = [
        ("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLOUD_ENDPOINT_API_LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let endpoint = EndpointProcess::serve(&bin, dir, Some(&config), &env);
    assert!(dir.join("inventory.sqlite3").is_file());
    assert!(dir.join("datastore").is_dir());

    // A client trusting the quickstart CA logs in over the API.
    let ca = certs::load_certs(&dir.join("pki/ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca[0].clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();
    let base = format!("https://localhost:{}/api", endpoint.api.port());
    let r = http
        .post(format!("{base}/session"))
        .basic_auth(AUDITOR, Some(DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let token: String = r.json().await.unwrap();
    let r = http
        .get(format!("{base}/vcenter/datacenter"))
        .header("vmware-api-session-id", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body[0]["name"], "Cloud-DC", "{body}");
    assert!(
        !endpoint.log().iter().any(|l| l.contains("ERROR")),
        "{:#?}",
        endpoint.log()
    );
}
