//! Two endpoints of one domain on a throwaway PostgreSQL, each the host of its own VMs,
//! served in this process on loopback: a power-on, a console and a power-off asked of
//! esx-b for a VM on esx-a are served by esx-a, as a client sees through esx-b's REST
//! API; a VM whose host has no endpoint is refused with that host's name; a restart of
//! esx-b leaves esx-a's running VM alone.
//!
//! Each endpoint has a datastore folder of its own here (a real deployment shares one):
//! so a VM file only esx-a has shows who served the request. Needs QEMU and PostgreSQL
//! (tests/setup.sh installs both).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{header, Method, Request, StatusCode};
use bytes::Bytes;
use certs::{Ca, Thumbprint, Validity};
use http_body_util::BodyExt as _;

use crate::config::{Config, Role, DEMO_PASSWORD};
use crate::inventory::store::test_pg::TestPg;
use crate::inventory::{NewDisk, NewVm, Principal, VmPlacement};
use crate::Endpoint;

/// An endpoint served in this process until stopped.
struct Running {
    api: SocketAddr,
    /// Its certificate's thumbprint, which a client pins.
    pin: Thumbprint,
    domain: Arc<crate::Domain>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(dir: &Path, pg: &TestPg, host: &str) -> Running {
        let pki = dir.join("pki");
        let vars: Vec<(String, String)> = [
            ("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUD_ENDPOINT_API_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUD_ENDPOINT_CERT", pki.join("endpoint.pem").display().to_string()),
            ("CLOUD_ENDPOINT_KEY", pki.join("endpoint.key").display().to_string()),
            ("CLOUD_ENDPOINT_EDGE_CA", pki.join("ca.pem").display().to_string()),
            ("CLOUD_ENDPOINT_DATASTORE_DIR", dir.join(host).display().to_string()),
            ("CLOUD_ENDPOINT_DATABASE_URL", pg.url.clone()),
            ("CLOUD_ENDPOINT_DOMAIN__HOST__NAME", host.to_owned()),
            // A host no endpoint runs.
            (
                "CLOUD_ENDPOINT_DOMAIN__EXTRA_HOSTS",
                r#"[{name = "esx-c", cpu_cores = 16, memory_mib = 131072}]"#.to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = Config::load_with_env(None, &vars).expect("config");
        let endpoint = Endpoint::open(config).expect("endpoint opens");
        let socket = endpoint.bind().unwrap();
        let api = endpoint.bind_api().await.unwrap().unwrap();
        let addr = api.local_addr().unwrap();
        let domain = endpoint.domain.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            endpoint
                .run_all(socket, Some(api), None, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        let running = Running {
            api: addr,
            pin: certs::thumbprint_of_pem_file(&pki.join("endpoint.pem")).unwrap(),
            domain,
            stop: Some(stop),
            task,
        };
        // The others find it once it has recorded its address (before it serves).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if recorded_url(&running, host).is_some_and(|url| url == format!("https://{addr}")) {
                break;
            }
            assert!(Instant::now() < deadline, "{host} never recorded its API address");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap();
    }

    fn host_id(&self, name: &str) -> String {
        let hosts = self.domain.inventory.domain().unwrap().hosts;
        hosts.into_iter().find(|h| h.name == name).unwrap().id
    }
}

/// The API URL host `name`'s endpoint recorded, read straight from the database.
fn recorded_url(endpoint: &Running, name: &str) -> Option<String> {
    let store = &endpoint.domain.inventory;
    store.host_api_url(name).unwrap()
}

/// One HTTPS request to an endpoint's API, as a client sends it.
async fn call(
    to: &Running,
    method: Method,
    path: &str,
    (name, value): (header::HeaderName, String),
) -> (StatusCode, Bytes) {
    let tcp = tokio::net::TcpStream::connect(to.api).await.unwrap();
    let tls = gateway::transport::pinned_https_client(to.pin).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, to.api.to_string())
        .header(name, value)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.unwrap().to_bytes())
}

/// Logs in to `to` as the administrator; the session header to send.
async fn login(to: &Running) -> (header::HeaderName, String) {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("administrator@cloud.local:{DEMO_PASSWORD}"));
    let (status, body) = call(
        to,
        Method::POST,
        "/api/session",
        (header::AUTHORIZATION, format!("Basic {basic}")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body:?}");
    let token: String = serde_json::from_slice(&body).unwrap();
    (header::HeaderName::from_static("vmware-api-session-id"), token)
}

fn error_message(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["messages"][0]["default_message"].as_str().unwrap_or("").to_owned()
}

/// Registers a VM of one blank 1 MiB raw disk (BIOS finds nothing to boot and waits:
/// QEMU runs on) on host `host_id`, its file in `datastore`.
fn register(endpoint: &Running, datastore: &Path, name: &str, host_id: &str) -> String {
    let folder = datastore.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let disk = folder.join(format!("{name}.img"));
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let inventory = &endpoint.domain.inventory;
    let operator = Principal {
        user: "migrator@cloud.local".into(),
        role: Role::MigrationOperator,
    };
    let mid = inventory.begin_migration(&operator, "edge", name, 1 << 20).unwrap();
    let vm = NewVm {
        name: name.into(),
        guest_os: "otherGuest64".into(),
        num_cpus: 1,
        cores_per_socket: None,
        memory_mib: 64,
        firmware: None,
        bios_uuid: None,
        vmx_path: format!("[cloud-ds1] {name}/{name}.vmx"),
        disks: vec![NewDisk {
            key: "ide0:0".into(),
            path: format!("[cloud-ds1] {name}/{name}.img"),
            capacity_bytes: 1 << 20,
            datastore: None,
        }],
        controllers: Vec::new(),
        nics: Vec::new(),
        firewall: Default::default(),
        placement: VmPlacement {
            host: Some(host_id.to_owned()),
            ..Default::default()
        },
    };
    inventory
        .register_vm(&mid, &vm, |r| Ok(format!("receipt of {}", r.vm_id)))
        .unwrap()
        .vm_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_powered_by_its_hosts_endpoint_when_another_endpoint_is_asked() {
    assert!(
        gateway::qemu::QemuBinary::from_env().is_ok(),
        "qemu-system-x86_64 is not installed: run tests/setup.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    {
        // QEMU runs as its own user when the test runs as root: it passes through.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let ca = Ca::generate("Scale-out test CA").unwrap();
    let pki = dir.path().join("pki");
    ca.write(&pki).unwrap();
    ca.issue_endpoint(&["localhost".to_owned(), "127.0.0.1".to_owned()], Validity::days(1))
        .unwrap()
        .write(&pki, "endpoint")
        .unwrap();
    let pg = TestPg::start();
    let a = Running::start(dir.path(), &pg, "esx-a").await;
    let b = Running::start(dir.path(), &pg, "esx-b").await;

    // web01 on esx-a: its disk is in esx-a's datastore folder only.
    let vm = register(&a, &dir.path().join("esx-a"), "web01", &a.host_id("esx-a"));
    let session = login(&b).await;
    let power = |action: &str| format!("/api/vcenter/vm/{vm}/power?action={action}");
    let (status, body) = call(&b, Method::POST, &power("start"), session.clone()).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{}", String::from_utf8_lossy(&body));
    // esx-a runs it; esx-b does not; either API says so.
    assert!(a.domain.hosts.is_running(&vm).await, "esx-a runs the VM");
    assert!(!b.domain.hosts.is_running(&vm).await, "esx-b does not");
    let (_, state) = call(&b, Method::GET, &format!("/api/vcenter/vm/{vm}/power"), session.clone()).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&state).unwrap()["state"],
        "POWERED_ON"
    );

    // A second start: esx-a's answer comes back through esx-b, kind and words.
    let (status, body) = call(&b, Method::POST, &power("start"), session.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body).contains("already POWERED_ON"), "{body:?}");

    // The console esx-a's QEMU writes (in esx-a's folder only), read through esx-b.
    let log = crate::hosts::VmFiles::of_vm(&a.domain, &a.domain.inventory.vm(&vm).unwrap().unwrap()).console_log;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\nseen on esx-a\n"))
        .unwrap();
    let (status, console) = call(
        &b,
        Method::GET,
        &format!("/api/gateway/vms/{vm}/console?bytes=64"),
        session.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&console).ends_with("seen on esx-a\n"),
        "{console:?}"
    );

    // esx-b restarts: the VM runs on esx-a, and stays POWERED_ON.
    b.stop().await;
    let b = Running::start(dir.path(), &pg, "esx-b").await;
    assert_eq!(b.domain.inventory.vm(&vm).unwrap().unwrap().power_state, "POWERED_ON");
    assert!(a.domain.hosts.is_running(&vm).await);

    // Powered off through the restarted esx-b (a new session: sessions are per endpoint).
    let session = login(&b).await;
    let (status, body) = call(&b, Method::POST, &power("stop"), session.clone()).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{}", String::from_utf8_lossy(&body));
    assert!(!a.domain.hosts.is_running(&vm).await);
    assert_eq!(a.domain.inventory.vm(&vm).unwrap().unwrap().power_state, "POWERED_OFF");

    // A VM on esx-c, which no endpoint runs: refused, naming the host and what to do.
    let orphan = register(&a, &dir.path().join("esx-a"), "db01", &a.host_id("esx-c"));
    let (status, body) = call(
        &b,
        Method::POST,
        &format!("/api/vcenter/vm/{orphan}/power?action=start"),
        session.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let message = error_message(&body);
    assert!(
        message.contains("esx-c") && message.contains("domain.host.name"),
        "{message}"
    );

    // A peer call without esx-a's token is refused.
    let (status, _) = call(
        &a,
        Method::POST,
        &format!("/api/gateway/peer/vms/{vm}/power?action=start"),
        (header::AUTHORIZATION, "Bearer guess".to_owned()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!a.domain.hosts.is_running(&vm).await);

    b.stop().await;
    a.stop().await;
}
