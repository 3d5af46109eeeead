//! The dashboard in a real headless browser (Debian's `chromium`, over the DevTools
//! protocol): an operator logs in and watches a capped lift's progress move and its
//! edge's link drawn, a ReadOnly user sees the same lift with no abort button (and the
//! API refuses it the abort anyway), and once the lift is done its signed receipt shows.
//! A switchover awaiting confirmation shows Rollback and Confirm to its operator only, and
//! the page's Rollback rolls it back through the API.
//! Screenshots of each view are saved under target/dashboard-screenshots/.

use std::path::PathBuf;
use std::time::Duration;

use e2e::browser::{spki_sha256_base64, Chromium};
use e2e::rest::Rest;
use e2e::*;
use edge_agent::migrate::MigrateOptions;
use reqwest::{Method, StatusCode};

const MIB: usize = 1 << 20;

/// 40 MiB of random data at 20 Mbit/s: about 17 s, long enough to watch it move and to
/// log in as a second user while it runs.
const DISK_MIB: usize = 40;
const RATE: &str = "20mbit";

/// Where the screenshots go: the workspace's target folder, kept after the test.
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("dashboard-screenshots")
}

/// The browser's calls block; the endpoint under test runs on this runtime's workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A headless browser that trusts the endpoint's key, on the dashboard's login form.
fn open_dashboard(pki: &Pki, base: &str) -> Chromium {
    let endpoint_cert = certs::load_certs(&pki.path("endpoint.pem")).unwrap();
    let spki = spki_sha256_base64(endpoint_cert[0].as_ref());
    let mut browser = Chromium::launch(&spki, 1400, 1100);
    browser.navigate(&format!("{base}/ui/"));
    browser.wait_for(
        "the login form",
        "document.body.dataset.ready === 'true'",
        Duration::from_secs(10),
    );
    browser
}

/// Logs in through the page's form as `user`, and waits for the board.
fn log_in(browser: &mut Chromium, user: &str) {
    browser.eval(&format!(
        "document.getElementById('user').value = {user:?};
         document.getElementById('password').value = {DEMO_PASSWORD:?};
         document.getElementById('login-form').requestSubmit(); true"
    ));
    browser.wait_for(
        &format!("the board of {user}"),
        &format!(
            "!document.getElementById('board').hidden
             && document.getElementById('who-user').textContent === {user:?}
             && Number(document.body.dataset.polls || 0) >= 1"
        ),
        Duration::from_secs(20),
    );
}

/// The bytes the row of `id` shows as held, if the row is there.
fn completed(browser: &mut Chromium, id: &str) -> Option<u64> {
    browser
        .eval(&format!(
            "(() => {{ const r = document.querySelector('#migrations tr[data-id={id:?}]');
                       return r ? Number(r.dataset.completed) : null; }})()"
        ))
        .as_f64()
        .map(|v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_lift_moving_its_receipt_and_hides_abort_from_read_only() {
    let shots = screenshot_dir();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let api = cloud.api_addr.expect("the API runs");
    let base = format!("https://127.0.0.1:{}", api.port());
    let rest = Rest::new(&cloud, &pki);

    // The page's headers: its own script only, nothing inline, data never cached.
    let http = reqwest_client(&pki);
    let page = http.get(format!("{base}/ui/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers()["cache-control"], "no-cache");
    let script = http.get(format!("{base}/ui/dashboard.js")).send().await.unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    assert!(script.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert_eq!(script.headers()["x-content-type-options"], "nosniff");
    let token = rest.token(MIGRATOR).await;
    let list = http
        .get(format!("{base}/api/gateway/migrations"))
        .header(e2e::rest::SESSION, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(list.headers()["cache-control"], "no-store");
    // The files need no session; the data does.
    let anonymous = http.get(format!("{base}/api/gateway/links")).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("web01.img"), MIB, &[Fill::Random; DISK_MIB], 41);
    let vmx = write_vmx(&src, "web01", &["web01.img"], &[]);

    let mut browser = blocking(|| open_dashboard(&pki, &base));

    // The operator logs in before anything moves.
    blocking(|| log_in(&mut browser, MIGRATOR));

    // A capped lift.
    let target = cloud.target(&pki, MIGRATOR, DEMO_PASSWORD);
    let opts = MigrateOptions {
        max_rate: Some(RATE.parse().unwrap()),
        ..MigrateOptions::default()
    };
    let lift = tokio::spawn(async move { migrate(&vmx, &target, &opts).await });

    // Its row appears RUNNING, and its progress moves from one poll to a later one.
    let id = blocking(|| {
        browser
            .wait_for(
                "a running migration",
                "(() => { const r = document.querySelector('#migrations tr[data-state=RUNNING][data-completed]');
                          return r ? r.dataset.id : null; })()",
                Duration::from_secs(30),
            )
            .as_str()
            .unwrap()
            .to_owned()
    });
    let first = blocking(|| {
        browser.wait_for(
            "some bytes held",
            &format!(
                "(() => {{ const r = document.querySelector('#migrations tr[data-id={id:?}]');
                          return r && Number(r.dataset.completed) > 0; }})()"
            ),
            Duration::from_secs(20),
        );
        completed(&mut browser, &id).unwrap()
    });
    blocking(|| {
        browser.wait_for(
            "the progress to move",
            &format!(
                "(() => {{ const r = document.querySelector('#migrations tr[data-id={id:?}]');
                          return r && r.dataset.state === 'RUNNING' && Number(r.dataset.completed) > {first}; }})()"
            ),
            Duration::from_secs(20),
        );
    });
    let later = blocking(|| completed(&mut browser, &id).unwrap());
    assert!(later > first && later < (DISK_MIB * MIB) as u64, "{first} -> {later}");
    let (pct, rate, eta) = blocking(|| {
        // The link of its edge, drawn from at least two samples; a rate and an ETA.
        browser.wait_for(
            "the link charts",
            "document.querySelectorAll('#links svg.rtt polyline, #links svg.throughput polyline').length >= 2",
            Duration::from_secs(20),
        );
        let row = browser.eval(&format!(
            "(() => {{ const c = document.querySelector('#migrations tr[data-id={id:?}]').cells;
                      return [c[4].querySelector('.pct').textContent, c[5].textContent, c[6].textContent]; }})()"
        ));
        let abort = browser.eval(&format!(
            "document.querySelectorAll('#migrations tr[data-id={id:?}] button.abort').length"
        ));
        assert_eq!(abort, 1, "the operator who started it may abort it");
        browser.screenshot(&shots.join("1-operator-running.png"));
        (
            row[0].as_str().unwrap().to_owned(),
            row[1].as_str().unwrap().to_owned(),
            row[2].as_str().unwrap().to_owned(),
        )
    });
    assert!(pct.ends_with(" %"), "{pct}");
    assert!(rate.contains("Mbit/s"), "a rate: {rate}");
    assert!(eta.contains(':'), "an ETA: {eta}");
    println!("operator view of {id}: {first} B, then {later} B held ({pct}), rate {rate}, ETA {eta}");

    // A ReadOnly user sees the running lift, and no abort (or switchover) button.
    blocking(|| {
        browser.eval("document.getElementById('logout').click(); true");
        browser.wait_for(
            "the login form again",
            "!document.getElementById('login').hidden",
            Duration::from_secs(10),
        );
        log_in(&mut browser, AUDITOR);
        browser.wait_for(
            "the running lift in the auditor's view",
            &format!("document.querySelector('#migrations tr[data-id={id:?}][data-state=RUNNING]') !== null"),
            Duration::from_secs(10),
        );
        let role = browser.eval("document.getElementById('who-role').textContent");
        assert_eq!(role, "ReadOnly");
        let buttons =
            browser.eval("document.querySelectorAll('#migrations button.abort, #migrations button.switchover').length");
        assert_eq!(buttons, 0, "a ReadOnly user is offered no abort");
        browser.screenshot(&shots.join("2-readonly-running.png"));
    });
    // Hidden is not forbidden: the API refuses the auditor's abort all the same.
    let auditor = rest.token(AUDITOR).await;
    let (status, body) = rest
        .call(
            Method::POST,
            &format!("/api/gateway/migrations/{id}?action=abort"),
            &auditor,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // The lift ends; its row says SUCCEEDED, and its receipt is the one the API holds.
    let summary = lift.await.unwrap().expect("the capped lift completes");
    assert_eq!(summary.migration_id, id);
    let receipt = rest
        .json(&format!("/api/gateway/migrations/{id}/receipt"), &auditor)
        .await;
    blocking(|| {
        browser.wait_for(
            "the finished lift",
            &format!("document.querySelector('#migrations tr[data-id={id:?}][data-state=SUCCEEDED] button.receipt') !== null"),
            Duration::from_secs(10),
        );
        browser.eval(&format!(
            "document.querySelector('#migrations tr[data-id={id:?}] button.receipt').click(); true"
        ));
        let shown = browser.wait_for(
            "the receipt",
            "(() => { const t = document.getElementById('receipt').textContent;
                      return t.startsWith('{') ? t : null; })()",
            Duration::from_secs(10),
        );
        let shown: serde_json::Value = serde_json::from_str(shown.as_str().unwrap()).expect("the receipt as JSON");
        assert_eq!(shown, receipt, "the page shows the signed receipt as the API holds it");
        browser.wait_for(
            "the report",
            "document.getElementById('report').textContent.startsWith('{')",
            Duration::from_secs(10),
        );
        let pct = browser.eval(&format!(
            "document.querySelector('#migrations tr[data-id={id:?}] .pct').textContent"
        ));
        assert_eq!(pct, "100.0 %");
        // The inventory table refreshes on its own timer, after the migration's row.
        browser.wait_for(
            "the lifted VM listed in the inventory",
            "document.querySelectorAll('#vms tbody tr').length >= 1",
            Duration::from_secs(10),
        );
        browser.screenshot(&shots.join("3-receipt.png"));
    });
    // Said even when the page coped (it sends a dropped read or login once more): a
    // failure here is a lead when a later run does not cope.
    if !browser.failed_requests().is_empty() {
        println!("requests the browser dropped: {:#?}", browser.failed_requests());
    }
    drop(browser);
    println!("screenshots in {}", shots.display());
    cloud.stop().await;
}

/// An HTTPS client trusting the test CA, for the page's headers.
fn reqwest_client(pki: &Pki) -> reqwest::Client {
    e2e::rest::https_client(pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_offers_rollback_and_confirm_of_a_switchover_to_its_operator_only() {
    let shots = screenshot_dir();
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(&tmp.path().join("cloud"), &pki, &[]).await;
    let base = format!("https://127.0.0.1:{}", cloud.api_addr.expect("the API runs").port());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_raw_disk(&src.join("db05.img"), MIB, &[Fill::Random, Fill::Zero], 42);
    let vmx = write_vmx(&src, "db05", &["db05.img"], &[]);
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let edge = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--json", "--chunk-kib", "256"]);
        edge_command(&bin, &pki, &cloud, &vmx, &state, &all)
    };
    let id = summary(run(edge(&["replicate"])).await)["migration_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = summary(run(edge(&["switchover"])).await);
    assert_eq!(done["switchover"]["awaiting_confirm"], true, "{done}");
    let row = format!("#migrations tr[data-id={id:?}]");
    let buttons = format!("document.querySelectorAll('{row} button.confirm, {row} button.rollback').length");

    let mut browser = blocking(|| open_dashboard(&pki, &base));
    blocking(|| {
        // A ReadOnly user sees the switchover awaiting confirmation, and no button for it.
        log_in(&mut browser, AUDITOR);
        browser.wait_for(
            "the switched-over replication",
            &format!("document.querySelector('{row}')?.cells[3].textContent.includes('awaiting confirm') === true"),
            Duration::from_secs(10),
        );
        assert_eq!(
            browser.eval(&buttons),
            0,
            "a ReadOnly user is offered no rollback or confirm"
        );
        browser.eval("document.getElementById('logout').click(); true");
        browser.wait_for(
            "the login form again",
            "!document.getElementById('login').hidden",
            Duration::from_secs(10),
        );
        // Its operator is offered both, and rolls it back from the page.
        log_in(&mut browser, MIGRATOR);
        browser.wait_for(
            "the rollback and confirm buttons",
            &format!("{buttons} === 2"),
            Duration::from_secs(10),
        );
        browser.screenshot(&shots.join("4-operator-awaiting-confirm.png"));
        browser.eval(&format!(
            "window.confirm = () => true; document.querySelector('{row} button.rollback').click(); true"
        ));
        browser.wait_for(
            "the rolled-back replication",
            &format!("document.querySelector('{row}')?.cells[3].textContent === 'RUNNING · rolled back'"),
            Duration::from_secs(20),
        );
        assert_eq!(browser.eval(&buttons), 0, "nothing awaits confirmation any more");
        browser.screenshot(&shots.join("5-operator-rolled-back.png"));
    });
    // Said even when the page coped (it sends a dropped read or login once more): a
    // failure here is a lead when a later run does not cope.
    if !browser.failed_requests().is_empty() {
        println!("requests the browser dropped: {:#?}", browser.failed_requests());
    }
    drop(browser);
    assert!(cloud.domain.inventory.list_vms().unwrap().is_empty(), "unregistered");
    let m = cloud_endpoint::api::gateway::get_migration(&cloud.domain, &id).unwrap();
    assert_eq!(
        m.replica.and_then(|r| r.switchover_ended_by),
        Some(format!("{MIGRATOR} through the API"))
    );
    cloud.stop().await;
}
