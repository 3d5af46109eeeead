//! Password guessing against the real `cloud-endpoint` binary, over HTTPS (REST and vAPI)
//! and QUIC, from several client addresses of the loopback range (127.0.0.1, .2, ...):
//!
//! - 300 wrong passwords from one address are answered 401 / BadCredentials, more and
//!   more slowly, then refused without a password check; the endpoint's CPU time stays
//!   far below 300 argon2 hashes, and another user logs in quickly from another address
//!   meanwhile. One address never locks a user out.
//! - Wrong passwords for one user from five addresses lock that user out (also for its
//!   right password, on every door) until the unlock time, then it logs in again.
//! - Logins waiting for a password check are served one address after the other: an
//!   address keeping eight logins waiting delays another address's login by one check.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::process::EndpointProcess;
use e2e::{wan, Pki, AUDITOR, DEMO_PASSWORD, MIGRATOR};
use gateway::transport::{self, ControlReader, ControlWriter, TransportTuning};
use gateway::wire::{CloudMessage, EdgeMessage, RefusalCode};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

const ADMIN: &str = "administrator@cloud.local";
const SESSION: &str = "vmware-api-session-id";
const FLOOD: usize = 300;
/// An argon2id check (19 MiB, 2 passes) costs about 23 ms of CPU here: 300 of them, 7 s.
const HASH_CPU: Duration = Duration::from_millis(23);

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// `cloud-endpoint serve` with the test PKI, its files under `dir`, and `env`.
fn endpoint(bin: &Path, dir: &Path, pki: &Pki, env: &[(&str, &str)]) -> EndpointProcess {
    let path = |p: &Path| p.display().to_string();
    let mut vars = vec![
        ("CLOUD_ENDPOINT_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLOUD_ENDPOINT_API_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLOUD_ENDPOINT_CERT", path(&pki.path("endpoint.pem"))),
        ("CLOUD_ENDPOINT_KEY", path(&pki.path("endpoint.key"))),
        ("CLOUD_ENDPOINT_EDGE_CA", path(&pki.path("ca.pem"))),
        ("CLOUD_ENDPOINT_DATASTORE_DIR", path(&dir.join("datastore"))),
        ("CLOUD_ENDPOINT_DATABASE", path(&dir.join("inventory.sqlite3"))),
    ];
    vars.extend(env.iter().map(|(k, v)| (*k, (*v).to_owned())));
    EndpointProcess::serve(bin, dir, None, &vars)
}

/// An HTTPS client trusting the test CA, connecting from `source`.
fn client(pki: &Pki, source: IpAddr) -> Client {
    e2e::rest::client_builder(pki).local_address(source).build().unwrap()
}

/// `POST /api/session`: the status, the token or the error message, and how long it took.
async fn login(http: &Client, api: SocketAddr, user: &str, password: &str) -> (StatusCode, String, Duration) {
    let t0 = Instant::now();
    let r = http
        .post(format!("https://{api}/api/session"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap();
    let text = match body.as_str() {
        Some(token) => token.to_owned(),
        None => body["messages"][0]["default_message"]
            .as_str()
            .unwrap_or_else(|| panic!("an error message: {body}"))
            .to_owned(),
    };
    (status, text, t0.elapsed())
}

async fn get(http: &Client, api: SocketAddr, path: &str, token: &str) -> (StatusCode, Value) {
    let r = http
        .get(format!("https://{api}{path}"))
        .header(SESSION, token)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// The login counters, read by an administrator from `source`.
async fn security(pki: &Pki, api: SocketAddr, source: IpAddr) -> Value {
    let http = client(pki, source);
    let (status, token, _) = login(&http, api, ADMIN, DEMO_PASSWORD).await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let (status, body) = get(&http, api, "/api/gateway/security", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// An edge's QUIC endpoint on `source` (an address of the loopback range).
fn edge(pki: &Pki, source: IpAddr) -> quinn::Endpoint {
    let crypto = transport::client_crypto(pki.edge_identity(), pki.trust_ca()).unwrap();
    transport::client_endpoint(SocketAddr::new(source, 0), crypto, &TransportTuning::default()).unwrap()
}

/// An edge's Hello over a new QUIC connection: the role, or the refusal and its message.
async fn hello(
    edge: &quinn::Endpoint,
    addr: SocketAddr,
    user: &str,
    password: &str,
) -> Result<String, (RefusalCode, String)> {
    let conn = transport::connect(edge, addr, "localhost")
        .await
        .expect("QUIC handshake");
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut tx = ControlWriter::open(send, true).await.unwrap();
    let mut rx = ControlReader::open(recv, false).await.unwrap();
    tx.send(&EdgeMessage::Hello {
        agent: "guesser".into(),
        user: user.into(),
        password: password.into(),
    })
    .await
    .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(20), rx.recv::<CloudMessage>())
        .await
        .expect("the endpoint answers a Hello within 20 s");
    let result = match answer {
        Ok(Some(CloudMessage::Welcome { role, .. })) => Ok(role),
        Ok(Some(CloudMessage::Refused { code, problems })) => Err((code, problems.join("; "))),
        other => panic!("expected Welcome or Refused, got {other:?}"),
    };
    conn.close(0u32.into(), b"done");
    result
}

/// What the answers to one address's wrong passwords said.
#[derive(Debug, Default)]
struct Answers {
    /// "not accepted": a password check ran and failed.
    not_accepted: usize,
    /// Refused before any check: the address must wait, or is blocked.
    delayed: usize,
    blocked: usize,
}

impl Answers {
    fn count(&mut self, message: &str) {
        if message.contains("not accepted") {
            self.not_accepted += 1;
        } else if message.contains("the next try from this address is accepted from") {
            self.delayed += 1;
        } else if message.contains("logins from this address are blocked until") {
            self.blocked += 1;
        } else {
            panic!("unexpected answer to a wrong password: {message}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_wrong_passwords_over_rest_are_slowed_then_blocked_at_little_cost() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    // Delays of 50, 100, 200 ms: the address is blocked about 0.4 s into the flood, which
    // lasts more than a second (each guesser pauses 30 ms between tries).
    let cloud = endpoint(
        &bin,
        tmp.path(),
        &pki,
        &[("CLOUD_ENDPOINT_LOGINS__SOURCE_DELAY_MS", "50")],
    );
    let api = cloud.api;
    let cpu_before = cloud.cpu_time();

    // Eight guessers in parallel from 127.0.0.1, 300 wrong passwords for the administrator.
    // The first goes alone: its failure starts the address's first delay, which the
    // parallel guessers then run into. Sent all at once, the first tries would fail together
    // (up to four checks run at a time) and could reach the block without any try ever
    // arriving during a delay.
    let guesser = client(&pki, loopback(1));
    let flood_started = Instant::now();
    let first = login(&guesser, api, ADMIN, "guess-0").await;
    let flood = tokio::spawn({
        let guesser = guesser.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            for g in 0..8 {
                let http = guesser.clone();
                tasks.spawn(async move {
                    let mut answers = Vec::new();
                    for n in (g..FLOOD).step_by(8).filter(|&n| n != 0) {
                        let (status, message, took) = login(&http, api, ADMIN, &format!("guess-{n}")).await;
                        answers.push((status, message, took));
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                    answers
                });
            }
            let mut all = vec![first];
            while let Some(answers) = tasks.join_next().await {
                all.extend(answers.unwrap());
            }
            all
        }
    });
    // Meanwhile another user logs in from 127.0.0.2 with its password, quickly.
    let worker = client(&pki, loopback(2));
    let mut worker_logins = Vec::new();
    while !flood.is_finished() {
        let (status, token, took) = login(&worker, api, MIGRATOR, DEMO_PASSWORD).await;
        assert_eq!(status, StatusCode::CREATED, "{token}");
        worker_logins.push(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answers = flood.await.unwrap();
    let flood_took = flood_started.elapsed();
    let cpu = cloud.cpu_time() - cpu_before;

    assert_eq!(answers.len(), FLOOD);
    let mut seen = Answers::default();
    for (status, message, _) in &answers {
        assert_eq!(*status, StatusCode::UNAUTHORIZED, "{message}");
        seen.count(message);
    }
    println!(
        "{FLOOD} wrong passwords from 8 parallel guessers in {:.2} s: {} checked, {} told to wait, {} blocked; \
         endpoint CPU {:.2} s (300 argon2 checks: about {:.1} s); {} logins of another user meanwhile, slowest {} ms",
        flood_took.as_secs_f64(),
        seen.not_accepted,
        seen.delayed,
        seen.blocked,
        cpu.as_secs_f64(),
        (HASH_CPU * FLOOD as u32).as_secs_f64(),
        worker_logins.len(),
        worker_logins.iter().max().unwrap_or(&Duration::ZERO).as_millis(),
    );
    // The address reached its limit of 5 failures (a few more may have been checked at
    // once when it did: at most four checks run together), then nothing was checked.
    assert!((5..=12).contains(&seen.not_accepted), "{seen:?}");
    assert!(seen.blocked > 0, "the address ended blocked: {seen:?}");
    assert!(seen.delayed > 0, "parallel tries during a delay are refused: {seen:?}");
    // The endpoint did far less work than 300 checks.
    assert!(cpu < HASH_CPU * FLOOD as u32 / 3, "endpoint CPU {cpu:?} for the flood");
    assert!(!worker_logins.is_empty());
    assert!(
        worker_logins.iter().all(|t| *t < Duration::from_secs(2)),
        "another user's logins during the flood: {worker_logins:?}"
    );

    // The right password from the blocked address is refused the same way: nothing says
    // it was right.
    let (status, message, took) = login(&guesser, api, ADMIN, DEMO_PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        message.starts_with("too many failed logins from 127.0.0.1: logins from this address are blocked until 20"),
        "{message}"
    );
    assert!(took < Duration::from_secs(1), "refused at once: {took:?}");

    // One address never locks the user out: the administrator logs in from elsewhere and
    // reads the counters.
    let s = security(&pki, api, loopback(3)).await;
    assert_eq!(s["failed_logins"], seen.not_accepted, "{s}");
    assert_eq!(s["refused_logins"], seen.delayed + seen.blocked + 1, "{s}");
    assert_eq!(s["lockouts"], 0, "{s}");
    assert!(s["source_blocks"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["locked_users"], json!([]), "{s}");
    assert_eq!(s["blocked_sources"][0]["name"], "127.0.0.1", "{s}");
    assert_eq!(
        s["password_checks"],
        s["failed_logins"].as_u64().unwrap() + s["successful_logins"].as_u64().unwrap(),
        "every check is a failure or a login: {s}"
    );
    assert_eq!(s["policy"]["max_failed_attempts"], 5, "{s}");
    // Administrators only.
    let auditor = client(&pki, loopback(4));
    let (_, token, _) = login(&auditor, api, AUDITOR, DEMO_PASSWORD).await;
    let (status, body) = get(&auditor, api, "/api/gateway/security", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // Each failure was logged once, with the user (escaped) and the address.
    let log = cloud.log();
    let failures: Vec<&String> = log.iter().filter(|l| l.contains("login failed")).collect();
    assert_eq!(failures.len(), seen.not_accepted, "{failures:#?}");
    assert!(
        failures.iter().all(|l| l.contains(" WARN ")
            && l.contains("user=\"administrator@cloud.local\"")
            && l.contains("source=127.0.0.1")
            && l.contains("via=\"API\"")),
        "{failures:#?}"
    );
    assert!(log
        .iter()
        .any(|l| l.contains("login source blocked") && l.contains("source=127.0.0.1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_wrong_passwords_over_quic_are_refused_before_any_hash() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = endpoint(
        &bin,
        tmp.path(),
        &pki,
        &[("CLOUD_ENDPOINT_LOGINS__SOURCE_DELAY_MS", "100")],
    );
    let quic = cloud.quic;
    let (guesser, worker) = (edge(&pki, loopback(1)), edge(&pki, loopback(2)));
    let cpu_before = cloud.cpu_time();
    let t0 = Instant::now();
    let mut seen = Answers::default();
    let mut slow = Vec::new();
    for n in 0..FLOOD {
        let asked = Instant::now();
        let (code, message) = hello(&guesser, quic, ADMIN, &format!("guess-{n}"))
            .await
            .expect_err("a wrong password is refused");
        assert_eq!(code, RefusalCode::BadCredentials, "{message}");
        seen.count(&message);
        if message.contains("not accepted") {
            slow.push(asked.elapsed());
        }
        // Every 50 tries, another user logs in from another address, quickly.
        if n % 50 == 0 {
            let asked = Instant::now();
            let role = hello(&worker, quic, MIGRATOR, DEMO_PASSWORD).await;
            assert_eq!(role, Ok("MigrationOperator".to_owned()));
            assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());
        }
    }
    let cpu = cloud.cpu_time() - cpu_before;
    println!(
        "{FLOOD} wrong passwords over QUIC, one after another, in {:.2} s: {} checked (answered after {:?}), {} blocked; \
         endpoint CPU {:.2} s with the QUIC handshakes (300 argon2 checks: about {:.1} s)",
        t0.elapsed().as_secs_f64(),
        seen.not_accepted,
        slow,
        seen.blocked,
        cpu.as_secs_f64(),
        (HASH_CPU * FLOOD as u32).as_secs_f64(),
    );
    // One after another, a guesser waits for its answers: each is held longer than the one
    // before (the 2nd by 100 ms, then 200, 400), so it is never refused for haste; the
    // 5th failure blocks it and the 295 tries left cost no check.
    assert_eq!(
        (seen.not_accepted, seen.delayed, seen.blocked),
        (5, 0, FLOOD - 5),
        "{seen:?}"
    );
    assert!(slow[1] >= Duration::from_millis(100), "{slow:?}");
    assert!(slow[2] >= Duration::from_millis(200), "{slow:?}");
    assert!(slow[3] >= Duration::from_millis(400), "{slow:?}");
    assert!(cpu < HASH_CPU * FLOOD as u32 / 3, "endpoint CPU {cpu:?} for the flood");

    // The real edge agent, from the blocked address, with the right password: told it is
    // blocked and until when, nothing about the password.
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    e2e::write_raw_disk(&src.join("app01.img"), 1 << 20, &[e2e::Fill::Text], 1);
    let vmx = e2e::write_vmx(&src, "app01", &["app01.img"], &[]);
    let out = e2e::edge_at(&bin, &pki, quic.port(), ADMIN, "plan")
        .arg("--vmx")
        .arg(&vmx)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("did not accept the credential")
            && stderr.contains("too many failed logins from 127.0.0.1: logins from this address are blocked until"),
        "{stderr}"
    );
    let s = security(&pki, cloud.api, loopback(3)).await;
    assert_eq!(
        (s["failed_logins"].as_u64(), s["lockouts"].as_u64()),
        (Some(5), Some(0)),
        "{s}"
    );
    assert_eq!(s["refused_logins"], FLOOD - 5 + 1, "{s}");
    assert!(cloud
        .log()
        .iter()
        .any(|l| l.contains("login failed") && l.contains("source=127.0.0.1") && l.contains("via=\"QUIC\"")));
}

/// A vAPI `com.vmware.cis.session.create` from `source`: the raw JSON-RPC answer.
async fn vapi_login(pki: &Pki, api: SocketAddr, source: IpAddr, user: &str, password: &str) -> Value {
    let body = json!({
        "jsonrpc": "2.0", "id": "1", "method": "invoke",
        "params": {
            "serviceId": "com.vmware.cis.session", "operationId": "create",
            "input": {"STRUCTURE": {"operation-input": {}}},
            "ctx": {"appCtx": {}, "securityCtx": {
                "schemeId": "com.vmware.vapi.std.security.user_pass",
                "userName": user, "password": password,
            }},
        },
    });
    let r = client(pki, source)
        .post(format!("https://{api}/api"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guessing_from_five_addresses_locks_the_user_out_until_the_unlock_time() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = endpoint(
        &bin,
        tmp.path(),
        &pki,
        &[("CLOUD_ENDPOINT_LOGINS__UNLOCK_TIME_SECS", "6")],
    );
    let api = cloud.api;
    // One wrong password each from four addresses: not yet.
    for last in 11..=14 {
        let (status, message, _) = login(&client(&pki, loopback(last)), api, MIGRATOR, "guess").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(message.contains("not accepted"), "{message}");
    }
    // The fifth address's failure locks the user out.
    let (_, message, _) = login(&client(&pki, loopback(15)), api, MIGRATOR, "guess").await;
    assert!(message.contains("not accepted"), "{message}");
    let locked_at = Instant::now();

    // Now the right password is refused too, on every door, from anywhere, saying until
    // when; the message names the user as given, domain part and all.
    let (status, message, _) = login(&client(&pki, loopback(16)), api, MIGRATOR, DEMO_PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        message.starts_with("the account \"migrator@cloud.local\" is locked after too many failed logins until 20"),
        "{message}"
    );
    let until = message
        .split(" until ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned();
    let vapi = vapi_login(&pki, api, loopback(17), MIGRATOR, DEMO_PASSWORD).await;
    let text = vapi.to_string();
    assert!(
        text.contains("com.vmware.vapi.std.errors.unauthenticated")
            && text.contains("is locked after too many failed logins"),
        "{text}"
    );
    let quic_edge = edge(&pki, loopback(18));
    let refused = hello(&quic_edge, cloud.quic, MIGRATOR, DEMO_PASSWORD).await;
    let (code, message) = refused.expect_err("a locked user is refused over QUIC");
    assert_eq!(code, RefusalCode::BadCredentials);
    assert!(
        message.contains("is locked after too many failed logins until"),
        "{message}"
    );
    // Other users are not locked out; the lockout is counted and shown.
    let s = security(&pki, api, loopback(19)).await;
    assert_eq!(s["lockouts"], 1, "{s}");
    // (The time is written when asked: it may round to the next second.)
    assert_eq!(s["locked_users"].as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!(s["locked_users"][0]["name"], MIGRATOR, "{s}");
    let shown = s["locked_users"][0]["until"].as_str().unwrap();
    assert!(shown.len() == until.len() && shown.ends_with('Z'), "{shown} vs {until}");
    assert_eq!(s["failed_logins"], 5, "{s}");
    assert!(cloud.log().iter().any(|l| l.contains(" WARN ")
        && l.contains("user locked out")
        && l.contains("user=\"migrator@cloud.local\"")
        && l.contains("source=127.0.0.15")));
    // A user name can hold anything: the log escapes it, so it cannot forge a line.
    let evil = "x\" source=10.9.9.9\nWARN forged";
    let (status, _, _) = login(&client(&pki, loopback(20)), api, evil, "guess").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let log = cloud
        .log_with(|l| l.contains(r#"user="x\" source=10.9.9.9\nWARN forged""#))
        .await;
    assert!(!log.iter().any(|l| l.starts_with("WARN forged")));

    assert!(
        locked_at.elapsed() < Duration::from_secs(5),
        "the checks above ran while the user was locked out"
    );
    // After the unlock time (6 s) the user logs in again, as itself.
    let wait = Duration::from_secs(6).saturating_sub(locked_at.elapsed()) + Duration::from_millis(1100);
    tokio::time::sleep(wait).await;
    let http = client(&pki, loopback(16));
    let (status, token, took) = login(&http, api, MIGRATOR, DEMO_PASSWORD).await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let (status, session) = get(&http, api, "/api/session", &token).await;
    assert_eq!((status, &session["user"]), (StatusCode::OK, &json!(MIGRATOR)));
    assert_eq!(
        hello(&quic_edge, cloud.quic, MIGRATOR, DEMO_PASSWORD).await,
        Ok("MigrationOperator".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_address_with_eight_logins_waiting_delays_another_address_by_one_check() {
    let bin = wan::ensure_binaries();
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    // One check at a time: the order in which waiting logins are served is then the order
    // in which their answers come back.
    let cloud = endpoint(
        &bin,
        tmp.path(),
        &pki,
        &[("CLOUD_ENDPOINT_LOGINS__MAX_CONCURRENT_CHECKS", "1")],
    );
    let api = cloud.api;

    // Eight clients of 127.0.0.1 log in with the right password again and again, so that
    // the address always has its eight logins (max_waiting_per_source) in the queue.
    let busy = client(&pki, loopback(1));
    let answered: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, answered, stop) = (busy.clone(), answered.clone(), stop.clone());
        flood.spawn(async move {
            let mut refused = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, text, _) = login(&http, api, MIGRATOR, DEMO_PASSWORD).await;
                match status {
                    StatusCode::CREATED => answered.lock().unwrap().push(Instant::now()),
                    StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                    other => panic!("{other}: {text}"),
                }
            }
            refused
        });
    }
    // Let the flood fill the queue.
    let filled = Instant::now();
    while answered.lock().unwrap().len() < 40 {
        assert!(
            filled.elapsed() < Duration::from_secs(30),
            "the flood's logins are not answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Another address logs in five times: each waits for the check that runs and at most
    // one more of 127.0.0.1's (its turn in the rotation), however many of them wait.
    // Served first come first served it would wait for the seven or eight queued before it.
    let other = client(&pki, loopback(2));
    let mut overtaken = Vec::new();
    let mut took = Vec::new();
    for _ in 0..5 {
        let sent = Instant::now();
        let (status, token, elapsed) = login(&other, api, AUDITOR, DEMO_PASSWORD).await;
        let back = Instant::now();
        assert_eq!(status, StatusCode::CREATED, "{token}");
        let during = answered
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t > sent && **t < back)
            .count();
        overtaken.push(during);
        took.push(elapsed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    while let Some(r) = flood.join_next().await {
        refused += r.unwrap();
    }
    let flood_logins = answered.lock().unwrap().len();
    println!(
        "beside 8 clients of 127.0.0.1 logging in without pause ({flood_logins} logins, {refused} refused as busy), \
         127.0.0.2's logins took {:?} ms, with {overtaken:?} of 127.0.0.1's answered meanwhile",
        took.iter().map(Duration::as_millis).collect::<Vec<_>>()
    );
    // At most those two, plus one answered just as it was sent.
    assert!(
        overtaken.iter().all(|&n| n <= 3),
        "127.0.0.2's logins waited behind {overtaken:?} logins of 127.0.0.1"
    );
}
