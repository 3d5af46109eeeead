//! Observability of a real lift: the endpoint's and the edge's Prometheus metrics scraped
//! during and after it (and checked by `promtool check metrics`), JSON log lines that
//! carry the migration id on both sides, and the API's access log without secrets.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::process::EndpointProcess;
use e2e::*;
use reqwest::{Client, StatusCode};

const MIB: usize = 1 << 20;
const TOKEN: &str = "scrape-token-5f1c";
const SESSION: &str = "vmware-api-session-id";
/// 4 MiB of random data: nothing compresses or is skipped as zero, so the logical
/// bytes received are the disk's size.
const DISK_BYTES: u64 = 4 * MIB as u64;

/// An HTTPS (and plain HTTP) client that trusts the test CA.
fn client(pki: &Pki) -> Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Client::builder().tls_backend_preconfigured(tls).build().unwrap()
}

/// Runs `promtool check metrics` over `text`; fails the test if promtool is missing (it
/// never passes unchecked) or finds a problem.
fn promtool_check(what: &str, text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "promtool is missing ({e}): the exposition cannot be checked; install Debian's `prometheus` package \
             (tests/setup.sh does)"
        ),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused the {what} metrics ({}): {}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the series written exactly as `series` (name and labels), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// A login of the migrator with `wrong_password` (refused) at `/api/session<query>`, then
/// with the right one: the session it got.
async fn bad_then_good_login(http: &Client, api: &str, query: &str, wrong_password: &str) -> String {
    let bad = http
        .post(format!("{api}/api/session{query}"))
        .basic_auth(MIGRATOR, Some(wrong_password))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let good = http
        .post(format!("{api}/api/session"))
        .basic_auth(MIGRATOR, Some(DEMO_PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), StatusCode::CREATED);
    good.json::<String>().await.unwrap()
}

async fn get(http: &Client, url: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

/// A port nothing listens on now (for the edge's --metrics-listen).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `edge-agent migrate` of `vmx` to `quic`, capped so that the lift lasts a few seconds,
/// with `extra` arguments; stdout and stderr go to files in `dir`.
fn edge_migrate(
    bin: &Path,
    dir: &Path,
    pki: &Pki,
    vmx: &Path,
    quic: SocketAddr,
    extra: &[&str],
) -> std::process::Child {
    edge_at(bin, pki, quic.port(), MIGRATOR, "migrate")
        .arg("--vmx")
        .arg(vmx)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--receipt")
        .arg(dir.join("receipt.json"))
        .args(["--max-rate", "12mbit", "--json"])
        .args(extra)
        .env_remove("EDGE_AGENT_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("edge.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("edge.err")).unwrap())
        .spawn()
        .expect("edge-agent starts")
}

/// Waits for the edge to exit (at most 2 minutes) and checks it succeeded.
fn wait_success(mut edge: std::process::Child, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = edge.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = edge.kill();
            panic!("edge-agent did not finish within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = std::fs::read_to_string(dir.join("edge.err")).unwrap_or_default();
    assert!(status.success(), "edge-agent failed ({status}):\n{err}");
}

fn source_vm(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("web01.img"), MIB, &[Fill::Random; 4], 17);
    write_vmx(&src, "web01", &["web01.img"], &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_moves_the_endpoint_and_edge_metrics() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[
            ("CLOUD_ENDPOINT_METRICS__LISTEN", "127.0.0.1:0"),
            ("CLOUD_ENDPOINT_METRICS__BEARER_TOKEN", TOKEN),
        ],
    )
    .await;
    let http = client(&pki);
    let api = format!("https://{}", cloud.api_addr.unwrap());
    let plain = format!("http://{}/metrics", cloud.metrics_addr.expect("metrics listener on"));
    let bearer = format!("Bearer {TOKEN}");

    // On the API port the metrics need a session or the token.
    let (status, _) = get(&http, &format!("{api}/metrics"), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get(&http, &format!("{api}/metrics"), &[("authorization", "Bearer wrong")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A bad login, a good one, and a list.
    let session = bad_then_good_login(&http, &api, "", "not-the-password").await;
    let (status, _) = get(&http, &format!("{api}/api/vcenter/vm"), &[(SESSION, &session)]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get(
        &http,
        &format!("{api}/api/vcenter/vm/vm-424242"),
        &[(SESSION, &session)],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The lift, scraped while it runs.
    let vmx = source_vm(tmp.path());
    let edge_port = free_port();
    let edge_url = format!("http://127.0.0.1:{edge_port}/metrics");
    let edge = edge_migrate(
        &bin,
        tmp.path(),
        &pki,
        &vmx,
        cloud.addr,
        &["--metrics-listen", &format!("127.0.0.1:{edge_port}")],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut edge_during, mut cloud_during) = (None::<String>, None::<String>);
    while edge_during.is_none() || cloud_during.is_none() {
        assert!(
            Instant::now() < deadline,
            "the running migration never showed in the metrics; edge: {edge_during:?}, endpoint: {cloud_during:?}"
        );
        if edge_during.is_none() {
            if let Ok(r) = http.get(&edge_url).send().await {
                let text = r.text().await.unwrap();
                let moving = value(&text, "edge_agent_done_bytes").unwrap_or(0.0) > 0.0
                    && value(&text, "edge_agent_link_rtt_seconds").unwrap_or(0.0) > 0.0
                    && value(&text, "edge_agent_rate_bytes_per_second").unwrap_or(0.0) > 0.0;
                if moving {
                    edge_during = Some(text);
                }
            }
        }
        if cloud_during.is_none() {
            let (_, text) = get(&http, &plain, &[]).await;
            let moving = text.lines().any(|l| {
                l.starts_with("cloud_endpoint_migration_durable_bytes{")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) > 0.0
            }) && text.contains("cloud_endpoint_migration_eta_seconds{")
                && text.contains("cloud_endpoint_link_rtt_seconds{");
            if moving {
                cloud_during = Some(text);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (edge_during, cloud_during) = (edge_during.unwrap(), cloud_during.unwrap());
    assert_eq!(must(&edge_during, "edge_agent_total_bytes"), DISK_BYTES as f64);
    assert!(must(&edge_during, "edge_agent_read_bytes_total") > 0.0, "{edge_during}");
    assert!(
        must(&edge_during, "edge_agent_wire_sent_bytes_total") > 0.0,
        "{edge_during}"
    );
    assert!(
        must(&edge_during, "edge_agent_link_congestion_window_bytes") > 0.0,
        "{edge_during}"
    );
    assert!(must(&edge_during, "edge_agent_eta_seconds") >= 0.0, "{edge_during}");
    assert_eq!(must(&edge_during, "edge_agent_reconnects_total"), 0.0);
    assert_eq!(
        must(&cloud_during, r#"cloud_endpoint_migrations{state="RUNNING"}"#),
        1.0
    );
    let id_label = cloud_during
        .lines()
        .find_map(|l| l.strip_prefix("cloud_endpoint_migration_logical_bytes{"))
        .and_then(|l| l.split('}').next())
        .expect("a per-migration series")
        .to_owned();
    assert_eq!(
        must(
            &cloud_during,
            &format!("cloud_endpoint_migration_logical_bytes{{{id_label}}}")
        ),
        DISK_BYTES as f64
    );
    promtool_check("edge (during the lift)", &edge_during);
    promtool_check("endpoint (during the lift)", &cloud_during);
    wait_success(edge, tmp.path());

    // After: once the connection's cleanup ran, its series are gone. The plain listener
    // and the API port (token, then session) answer the same.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let (status, text) = get(&http, &plain, &[]).await;
        assert_eq!(status, StatusCode::OK);
        if !text.contains("migration_id=") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (what, auth) in [
        ("token", ("authorization", bearer.as_str())),
        ("session", (SESSION, session.as_str())),
    ] {
        let (status, text) = get(&http, &format!("{api}/metrics"), &[auth]).await;
        assert_eq!(status, StatusCode::OK, "with a {what}: {text}");
        assert!(text.contains("cloud_endpoint_received_logical_bytes_total"), "{text}");
    }
    promtool_check("endpoint (after the lift)", &after);
    assert_eq!(
        must(&after, "cloud_endpoint_received_logical_bytes_total"),
        DISK_BYTES as f64
    );
    assert!(
        must(&after, "cloud_endpoint_received_payload_bytes_total") >= DISK_BYTES as f64,
        "random data does not shrink: {after}"
    );
    assert!(
        must(&after, "cloud_endpoint_received_wire_bytes_total")
            > must(&after, "cloud_endpoint_received_payload_bytes_total"),
        "{after}"
    );
    assert_eq!(must(&after, r#"cloud_endpoint_migrations{state="SUCCEEDED"}"#), 1.0);
    assert_eq!(value(&after, r#"cloud_endpoint_migrations{state="RUNNING"}"#), None);
    assert!(
        !after.contains("migration_id="),
        "the per-migration series end with the migration:\n{after}"
    );
    assert_eq!(must(&after, "cloud_endpoint_failed_logins_total"), 1.0);
    assert_eq!(must(&after, "cloud_endpoint_resumes_total"), 0.0);
    assert_eq!(must(&after, "cloud_endpoint_api_sessions"), 1.0);
    let requests = |method: &str, route: &str, status: u16| {
        value(
            &after,
            &format!(r#"cloud_endpoint_api_requests_total{{method="{method}",route="{route}",status="{status}"}}"#),
        )
    };
    assert_eq!(requests("POST", "/api/session", 401), Some(1.0), "{after}");
    assert_eq!(requests("POST", "/api/session", 201), Some(1.0), "{after}");
    assert_eq!(requests("GET", "/api/vcenter/vm", 200), Some(1.0), "{after}");
    // The route template, not the path: no VM id in any label.
    assert_eq!(requests("GET", "/api/vcenter/vm/{vm}", 404), Some(1.0), "{after}");
    assert!(!after.contains("vm-424242"), "{after}");
    assert_eq!(requests("GET", "/metrics", 401), Some(2.0), "{after}");
    assert!(
        must(
            &after,
            r#"cloud_endpoint_api_request_duration_seconds_count{method="POST",route="/api/session"}"#
        ) >= 2.0
    );
    let ds = cloud.domain.datastore.name().to_owned();
    let capacity = must(
        &after,
        &format!(r#"cloud_endpoint_datastore_capacity_bytes{{datastore="{ds}"}}"#),
    );
    let used = must(
        &after,
        &format!(r#"cloud_endpoint_datastore_used_bytes{{datastore="{ds}"}}"#),
    );
    let free = must(
        &after,
        &format!(r#"cloud_endpoint_datastore_free_bytes{{datastore="{ds}"}}"#),
    );
    assert!(capacity > 0.0 && free > 0.0, "{after}");
    assert!(used >= DISK_BYTES as f64, "the lifted disk counts as used: {after}");
    assert!(after.contains("cloud_endpoint_host_memory_capacity_bytes{"), "{after}");
    cloud.stop().await;
}

/// The JSON lines of a log in `text`, each parsed.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_migration_id_and_the_access_log_keeps_no_secrets() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let path = |p: &Path| p.display().to_string();
    let dir = tmp.path().join("cloud");
    std::fs::create_dir_all(&dir).unwrap();
    let cloud = EndpointProcess::serve(
        &bin,
        &dir,
        None,
        &[
            ("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUD_ENDPOINT_API_LISTEN", "127.0.0.1:0".to_owned()),
            ("CLOUD_ENDPOINT_CERT", path(&pki.path("endpoint.pem"))),
            ("CLOUD_ENDPOINT_KEY", path(&pki.path("endpoint.key"))),
            ("CLOUD_ENDPOINT_EDGE_CA", path(&pki.path("ca.pem"))),
            ("CLOUD_ENDPOINT_DATASTORE_DIR", path(&dir.join("datastore"))),
            ("CLOUD_ENDPOINT_DATABASE", path(&dir.join("inventory.sqlite3"))),
            ("CLOUD_ENDPOINT_LOG_FORMAT", "json".to_owned()),
        ],
    );
    let http = client(&pki);
    let api = format!("https://{}", cloud.api);
    let wrong = "Wrong-Pa55word-7";
    let session = bad_then_good_login(&http, &api, "?note=hello", wrong).await;
    let (status, _) = get(
        &http,
        &format!("{api}/api/vcenter/vm?names=web01"),
        &[(SESSION, &session)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let vmx = source_vm(tmp.path());
    let edge = edge_migrate(
        &bin,
        tmp.path(),
        &pki,
        &vmx,
        cloud.quic,
        &["--log-format", "json", "--log", "info"],
    );
    wait_success(edge, tmp.path());
    let summary = std::fs::read_to_string(tmp.path().join("edge.out")).unwrap();
    let migration_id = json_lines(&summary)
        .into_iter()
        .find(|v| v["event"] == "summary")
        .and_then(|v| v["migration_id"].as_str().map(str::to_owned))
        .expect("a summary with the migration id");

    // The edge: every line is JSON, and those of the migration (once the cloud named it)
    // carry its id in their span.
    let edge_log = std::fs::read_to_string(tmp.path().join("edge.err")).unwrap();
    let edge_lines = json_lines(&edge_log);
    let carrying: Vec<_> = edge_lines
        .iter()
        .filter(|v| v["span"]["migration_id"] == migration_id.as_str())
        .collect();
    assert!(
        carrying.iter().any(|v| v["fields"]["message"] == "plan accepted"),
        "the edge's line of the accepted plan does not carry {migration_id}:\n{edge_log}"
    );
    assert!(
        carrying
            .iter()
            .all(|v| v["span"]["name"] == "migration" && v["level"].is_string()),
        "{edge_log}"
    );

    // The endpoint: JSON lines, the migration's with its id, and an access line per
    // request with method, route, status, user, duration and no secret.
    let lines = cloud.log();
    drop(cloud);
    let text = lines.join("\n");
    let parsed = json_lines(&text);
    assert!(
        parsed.iter().any(|v| v["span"]["migration_id"] == migration_id.as_str()
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("plan accepted"))),
        "no endpoint line of {migration_id} carries its id:\n{text}"
    );
    let access: Vec<_> = parsed.iter().filter(|v| v["target"] == "access").collect();
    let line = |method: &str, route: &str, status: u64| {
        access
            .iter()
            .find(|v| {
                v["fields"]["method"] == method && v["fields"]["route"] == route && v["fields"]["status"] == status
            })
            .unwrap_or_else(|| panic!("no access line for {method} {route} {status}:\n{text}"))
    };
    let failed = line("POST", "/api/session", 401);
    assert_eq!(failed["level"], "INFO");
    assert_eq!(
        failed["fields"]["path"], "\"/api/session\"",
        "no query string: {failed}"
    );
    assert_eq!(failed["fields"]["user"], "\"-\"", "{failed}");
    assert!(failed["fields"]["duration_ms"].as_f64().is_some(), "{failed}");
    let login = line("POST", "/api/session", 201);
    assert_eq!(login["fields"]["user"], format!("{MIGRATOR:?}"), "{login}");
    let list = line("GET", "/api/vcenter/vm", 200);
    assert_eq!(list["fields"]["user"], format!("{MIGRATOR:?}"), "{list}");
    assert_eq!(list["fields"]["path"], "\"/api/vcenter/vm\"", "{list}");
    for secret in [
        wrong,
        DEMO_PASSWORD,
        session.as_str(),
        "Basic ",
        "note=hello",
        "names=web01",
    ] {
        assert!(!text.contains(secret), "the endpoint's log holds {secret:?}:\n{text}");
    }
}
