//! Safe defaults of the real `cloud-endpoint` binary:
//!
//! - after a lift, every file it created (database, disks, .vmx, journal, receipt) is its
//!   own (no permission for group or others), and so is every folder;
//! - a user name with a newline cannot forge a line of its log;
//! - a VM's QEMU runs sandboxed, as its own user, and cannot read the database or keys;
//! - a revoked edge certificate is refused at its next connection;
//! - it refuses to serve beyond loopback while a user has the published demo password,
//!   unless told so loudly; `cloud-endpoint hash-password` gives the way out.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use cloud_endpoint::config::Config;
use cloud_endpoint::{Endpoint, EndpointError};
use e2e::process::EndpointProcess;
use e2e::*;
use edge_agent::migrate::MigrateOptions;

const MIB: usize = 1 << 20;

fn endpoint_env(pki: &Pki, dir: &Path) -> Vec<(&'static str, String)> {
    let path = |p: PathBuf| p.display().to_string();
    vec![
        ("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLOUD_ENDPOINT_API_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLOUD_ENDPOINT_CERT", path(pki.path("endpoint.pem"))),
        ("CLOUD_ENDPOINT_KEY", path(pki.path("endpoint.key"))),
        ("CLOUD_ENDPOINT_EDGE_CA", path(pki.path("ca.pem"))),
        ("CLOUD_ENDPOINT_DATASTORE_DIR", path(dir.join("datastore"))),
        ("CLOUD_ENDPOINT_DATABASE", path(dir.join("db/inventory.sqlite3"))),
    ]
}

/// Every path under `root` with its mode, `root` included.
fn modes(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        out.push((path.clone(), meta.permissions().mode() & 0o777, meta.is_dir()));
        if meta.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_a_lift_are_private_and_peers_cannot_forge_log_lines() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud_dir = tmp.path().join("cloud");
    std::fs::create_dir_all(&cloud_dir).unwrap();
    let endpoint = EndpointProcess::serve(&bin, &cloud_dir, None, &endpoint_env(&pki, &cloud_dir));

    // A lift of a small VM with two regions of data and one of zeros.
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("web01.img"), MIB, &[Fill::Random, Fill::Zero, Fill::Text], 7);
    let vmx = write_vmx(&src, "web01", &["web01.img"], &[]);
    let target = edge_agent::target::Target::single(
        endpoint.quic,
        "localhost",
        MIGRATOR,
        DEMO_PASSWORD,
        pki.trust_ca(),
        pki.edge_identity(),
    );
    let summary = migrate(&vmx, &target, &MigrateOptions::default()).await.unwrap();
    assert!(!summary.vm_id.is_empty(), "{summary:?}");

    // Every file the endpoint made: database (with -wal, -shm), VM folder, disks, .vmx.
    let mut seen_files = 0;
    for root in [cloud_dir.join("datastore"), cloud_dir.join("db")] {
        for (path, mode, is_dir) in modes(&root) {
            assert_eq!(
                mode & 0o066,
                0,
                "{} is {mode:o}: readable or writable by others than the endpoint's user",
                path.display()
            );
            if path == cloud_dir.join("datastore") {
                // Others may pass through to a VM folder they own (a confined QEMU's
                // user), not list it.
                assert_eq!(mode, 0o711, "{}", path.display());
            } else if is_dir {
                assert_eq!(mode, 0o700, "{}", path.display());
            } else {
                seen_files += 1;
            }
        }
    }
    assert!(seen_files >= 3, "the lift left too few files to judge: {seen_files}");

    // A Basic-auth user name with a newline and a forged line after it.
    let forged = "2026-12-06T00:00:00.000000Z  INFO cloud_endpoint: API session started user=administrator@cloud.local";
    let ca = certs::load_certs(&pki.path("ca.pem")).unwrap();
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
    let r = http
        .post(format!("https://{}/api/session", endpoint.api))
        .basic_auth(format!("nobody\n{forged}"), Some("guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let log = eventually(10, || {
        let log = endpoint.log();
        log.iter().any(|l| l.contains("login failed")).then_some(log)
    })
    .await
    .expect("the failed login is logged");
    let failed: Vec<&String> = log.iter().filter(|l| l.contains("login failed")).collect();
    assert!(
        failed.iter().any(|l| l.contains("nobody\\n2026-12-06")),
        "the user name is logged escaped: {failed:#?}"
    );
    assert!(
        !log.iter().any(|l| l.starts_with("2026-12-06T00:00:00.000000Z")),
        "a peer forged a log line: {log:#?}"
    );
}

/// `Endpoint::open` with the test PKI and `env`, serving (it never binds here) on
/// `listen`; the refusal comes before any socket is bound.
fn open(pki: &Pki, dir: &Path, listen: &str, env: &[(&str, &str)]) -> Result<Endpoint, EndpointError> {
    let mut vars: Vec<(String, String)> = endpoint_env(pki, dir)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    vars.push(("CLOUD_ENDPOINT_LISTEN".into(), listen.into()));
    vars.push(("CLOUD_ENDPOINT_API_LISTEN".into(), "off".into()));
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Endpoint::open(Config::load_with_env(None, &vars).unwrap())
}

#[test]
fn beyond_loopback_the_demo_password_is_refused_until_replaced() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let dir = tmp.path().join("cloud");

    // Loopback: the demo users are fine (tests, demos, a first run).
    open(&pki, &dir, "127.0.0.1:0", &[]).expect("loopback serves with the demo users");
    // Every address: refused, and the message says what to do.
    let err = open(&pki, &dir, "0.0.0.0:4433", &[]).unwrap_err().to_string();
    for needed in [
        "0.0.0.0:4433",
        "administrator@cloud.local",
        "auditor@cloud.local",
        "migrator@cloud.local",
        "cloud-endpoint hash-password",
        "allow_default_passwords",
    ] {
        assert!(err.contains(needed), "the refusal does not say {needed:?}: {err}");
    }
    // Said loudly, it is allowed (a lab).
    open(
        &pki,
        &dir,
        "0.0.0.0:4433",
        &[("CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS", "true")],
    )
    .expect("allow_default_passwords = true serves");

    // `hash-password` gives each user its own password; then no flag is needed.
    let mut users = String::from("[");
    for (name, role) in [
        ("administrator@cloud.local", "Administrator"),
        ("migrator@cloud.local", "MigrationOperator"),
        ("auditor@cloud.local", "ReadOnly"),
    ] {
        let mut child = Command::new(bin.join("cloud-endpoint"))
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "a long own password of {name}").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line = String::from_utf8(out.stdout).unwrap();
        let hash = line
            .trim()
            .strip_prefix("password_hash = \"")
            .and_then(|h| h.strip_suffix('"'))
            .unwrap_or_else(|| panic!("not a password_hash line: {line}"));
        users.push_str(&format!(
            "{{name=\"{name}\",password_hash=\"{hash}\",role=\"{role}\"}},"
        ));
    }
    users.push(']');
    open(&pki, &dir, "0.0.0.0:4433", &[("CLOUD_ENDPOINT_DOMAIN__USERS", &users)])
        .expect("with its own passwords, the endpoint serves beyond loopback");

    // The demo password itself is not taken as a new one.
    let mut child = Command::new(bin.join("cloud-endpoint"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{DEMO_PASSWORD}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("demo password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_edge_is_refused_at_its_next_connection_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let revoked = tmp.path().join("revoked-edges.txt");
    std::fs::write(&revoked, "# revoked edge certificates\n").unwrap();
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[("CLOUD_ENDPOINT_REVOKED_EDGE_SERIALS", revoked.to_str().unwrap())],
    )
    .await;

    // Not revoked: the edge is welcomed.
    let edge = e2e::raw::RawEdge::welcomed(&cloud, &pki).await;
    edge.close();

    // The operator revokes it as openssl names it; the next connection is refused.
    let out = Command::new("openssl")
        .args(["x509", "-serial", "-noout", "-in"])
        .arg(pki.path("edge.pem"))
        .output()
        .expect("openssl is installed (tests/setup.sh)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let serial = line.trim().strip_prefix("serial=").unwrap().to_owned();
    std::fs::write(&revoked, format!("# edge-01: lost\n{}\n", line.trim())).unwrap();

    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let (_endpoint, conn) = target
        .connect(&gateway::transport::TransportTuning::default())
        .await
        .expect("the handshake itself completes");
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed())
        .await
        .expect("the endpoint closes a revoked edge's connection at once");
    let quinn::ConnectionError::ApplicationClosed(close) = closed else {
        panic!("expected the endpoint to close the connection, got {closed:?}");
    };
    let reason = String::from_utf8_lossy(&close.reason);
    assert!(
        reason.contains(serial.trim_start_matches('0')) && reason.contains("revoked"),
        "the refusal does not name the serial {serial}: {reason}"
    );

    // What the edge agent's user sees names it too.
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("web01.img"), MIB, &[Fill::Random], 3);
    let vmx = write_vmx(&src, "web01", &["web01.img"], &[]);
    let err = migrate(&vmx, &target, &MigrateOptions::default()).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");

    // Taken off the list, the edge is welcomed again.
    std::fs::write(&revoked, "# nothing revoked any more, a comment of another length\n").unwrap();
    e2e::raw::RawEdge::welcomed(&cloud, &pki).await.close();
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_qemu_is_sandboxed_as_its_own_user_and_cannot_read_the_database() {
    require_qemu();
    assert!(
        nix_is_root(),
        "this test checks QEMU's own user, which the endpoint uses when it runs as root: run it as root (CI does)"
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
    let qemu_uid = String::from_utf8(user.stdout).unwrap().trim().to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("jail01.img"), MIB, &[Fill::Random], 11);
    let vmx = write_vmx(&src, "jail01", &["jail01.img"], &[]);
    small_enough_to_boot(&vmx);
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let vm = migrate(&vmx, &target, &MigrateOptions::default()).await.unwrap().vm_id;

    cloud_endpoint::hosts::Hosts::power_on(&cloud.domain, &vm)
        .await
        .unwrap();
    let pid = cloud.domain.hosts.pid(&vm).await.expect("QEMU runs");
    assert_eq!(proc_status(pid, "Uid"), qemu_uid, "QEMU does not run as its own user");
    assert_eq!(
        proc_status(pid, "Seccomp"),
        "2",
        "QEMU runs without its seccomp sandbox"
    );
    let qemu = cloud.domain.hosts.process(&vm).await.unwrap();
    let open = |path: &Path, node: &str| {
        serde_json::json!({
            "driver": "file", "node-name": node, "filename": path.to_str().unwrap(), "read-only": true
        })
    };

    // A file QEMU's user may read, in its own VM folder: QMP opens it (so a refusal
    // below is the permission, not the command).
    let folder = cloud.root.join("jail01");
    let own = folder.join("readable.img");
    std::fs::write(&own, vec![0u8; 4096]).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o644)).unwrap();
    qemu.qmp()
        .execute("blockdev-add", open(&own, "own"))
        .await
        .expect("QEMU opens a file its user may read");

    // The database and the endpoint's private key: refused.
    let database = cloud.domain.inventory.path().to_owned();
    for (secret, node) in [
        (database.as_path(), "stolen-db"),
        (&pki.path("endpoint.key"), "stolen-key"),
    ] {
        let err = qemu
            .qmp()
            .execute("blockdev-add", open(secret, node))
            .await
            .expect_err("a confined QEMU opened the endpoint's secret");
        assert!(
            err.to_string().contains("Permission denied"),
            "{}: {err}",
            secret.display()
        );
    }
    cloud_endpoint::hosts::Hosts::power_off(&cloud.domain, &vm)
        .await
        .unwrap();
    cloud.stop().await;
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
