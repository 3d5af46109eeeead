//! The HTTPS API's bounds against hostile clients on other addresses of the loopback range
//! (127.0.0.2, .3, ...), each beside a real client on 127.0.0.1 that must still be served:
//!
//! - connections: one address cannot hold more than its share, silent HTTP/2 clients and
//!   clients that never finish a TLS handshake are closed;
//! - sessions: a user logging in again and again ends only its own sessions;
//! - logins: a flood of logins is refused quickly once the queue is full, and a real
//!   login does not wait behind it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{Cloud, Pki, AUDITOR, DEMO_PASSWORD};
use reqwest::{Client, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const ADMIN: &str = "administrator@cloud.local";
const SESSION: &str = "vmware-api-session-id";

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// An HTTPS client trusting the test CA, connecting from `source`.
fn client(pki: &Pki, source: IpAddr) -> Client {
    e2e::rest::client_builder(pki)
        .local_address(source)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The same, speaking HTTP/2 only: its requests share one connection.
fn h2_client(pki: &Pki, source: IpAddr) -> Client {
    let mut tls = e2e::rest::tls_config(pki);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Client::builder()
        .tls_backend_preconfigured(tls)
        .http2_prior_knowledge()
        .local_address(source)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn tcp_from(source: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// Until the server closes `stream` (EOF or reset), reading and dropping what it sends
/// (an HTTP/2 server's SETTINGS, pings, GOAWAY); when it was closed.
async fn until_closed<S: tokio::io::AsyncRead + Unpin>(mut stream: S, within: Duration) -> Option<Instant> {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| Instant::now())
}

/// A login and a read by a real client from 127.0.0.1: both must answer, quickly.
async fn real_client_is_served(pki: &Pki, api: SocketAddr) -> Duration {
    let http = client(pki, loopback(1));
    let t0 = Instant::now();
    let r = http
        .post(format!("https://{api}/api/session"))
        .basic_auth(AUDITOR, Some(DEMO_PASSWORD))
        .send()
        .await
        .expect("the real client's login is answered");
    assert_eq!(r.status(), StatusCode::CREATED);
    let token: String = r.json().await.unwrap();
    let r = http
        .get(format!("https://{api}/api/vcenter/datacenter"))
        .header(SESSION, &token)
        .send()
        .await
        .expect("the real client's request is answered");
    assert_eq!(r.status(), StatusCode::OK);
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_the_api_and_silent_clients_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[
            ("CLOUD_ENDPOINT_API__MAX_CONNECTIONS", "16"),
            ("CLOUD_ENDPOINT_API__MAX_CONNECTIONS_PER_CLIENT", "4"),
            ("CLOUD_ENDPOINT_API__HANDSHAKE_TIMEOUT_SECS", "2"),
            ("CLOUD_ENDPOINT_API__IDLE_TIMEOUT_SECS", "3"),
        ],
    )
    .await;
    let api = cloud.api_addr.unwrap();

    // 127.0.0.2: 40 HTTP/2 clients that finish TLS, send the connection preface and
    // SETTINGS, then say nothing more.
    let tls = {
        let mut c = e2e::rest::tls_config(&pki);
        c.alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(c))
    };
    let mut silent_h2 = Vec::new();
    let mut refused_h2 = 0;
    for _ in 0..40 {
        let tcp = tcp_from(loopback(2), api).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        match tokio::time::timeout(Duration::from_secs(5), tls.connect(name, tcp)).await {
            Ok(Ok(mut stream)) => {
                let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
                if stream.write_all(&preface).await.is_ok() && stream.flush().await.is_ok() {
                    silent_h2.push(stream);
                } else {
                    refused_h2 += 1;
                }
            }
            Ok(Err(_)) => refused_h2 += 1,
            Err(_) => panic!("a TLS handshake beyond the per-client limit hung instead of being refused"),
        }
    }
    // 127.0.0.3: 40 clients that connect and never start TLS.
    let mut mute = Vec::new();
    for _ in 0..40 {
        mute.push(tcp_from(loopback(3), api).await.unwrap());
    }
    let opened = Instant::now();

    // The real client is served at once, beside both.
    let took = real_client_is_served(&pki, api).await;
    eprintln!("real client: login + GET in {took:?} beside 80 hostile connections");
    assert!(took < Duration::from_secs(5), "the real client took {took:?}");

    // Each hostile address got at most its share.
    assert!(
        silent_h2.len() <= 4,
        "127.0.0.2 holds {} HTTP/2 connections, over its limit of 4",
        silent_h2.len()
    );
    assert!(
        refused_h2 >= 36,
        "only {refused_h2} of 40 connections over the limit were refused"
    );
    let mute_closed = futures_join(
        mute.into_iter()
            .map(|s| until_closed(s, Duration::from_secs(10)))
            .collect(),
    )
    .await;
    // Beyond the limit: closed at once; within it: closed at the handshake deadline.
    assert!(
        mute_closed.iter().all(Option::is_some),
        "a client that never starts TLS kept its connection for 10 s"
    );
    let held_longest = mute_closed.iter().flatten().max().unwrap().duration_since(opened);
    assert!(held_longest < Duration::from_secs(5), "{held_longest:?}");

    // Silent HTTP/2 clients are closed once idle for 3 s (GOAWAY, then the connection).
    let h2_closed = futures_join(
        silent_h2
            .into_iter()
            .map(|s| until_closed(s, Duration::from_secs(15)))
            .collect(),
    )
    .await;
    for closed in &h2_closed {
        let after = closed
            .expect("a silent HTTP/2 connection was still open after 15 s")
            .duration_since(opened);
        assert!(
            after >= Duration::from_secs(2),
            "closed after {after:?}, before the idle timeout"
        );
        eprintln!("a silent HTTP/2 connection was closed {after:?} after it opened");
    }

    // And the API still serves.
    real_client_is_served(&pki, api).await;
    cloud.stop().await;
}

/// Awaits all of `futures` concurrently.
async fn futures_join<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn login(http: &Client, api: SocketAddr, user: &str, password: &str) -> reqwest::Response {
    http.post(format!("https://{api}/api/session"))
        .basic_auth(user, Some(password))
        .send()
        .await
        .unwrap()
}

async fn session_user(http: &Client, api: SocketAddr, token: &str) -> (StatusCode, Value) {
    let r = http
        .get(format!("https://{api}/api/session"))
        .header(SESSION, token)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_user_logging_in_again_and_again_logs_no_one_else_out() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[
            ("CLOUD_ENDPOINT_API__MAX_SESSIONS", "20"),
            ("CLOUD_ENDPOINT_API__MAX_SESSIONS_PER_USER", "5"),
        ],
    )
    .await;
    let api = cloud.api_addr.unwrap();
    let http = client(&pki, loopback(1));
    let r = login(&http, api, ADMIN, DEMO_PASSWORD).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let admin: String = r.json().await.unwrap();

    // The auditor (ReadOnly) logs in 60 times: three times the whole session table.
    let mut auditor = Vec::new();
    for _ in 0..60 {
        let r = login(&http, api, AUDITOR, DEMO_PASSWORD).await;
        assert_eq!(r.status(), StatusCode::CREATED, "a user at its own limit still logs in");
        auditor.push(r.json::<String>().await.unwrap());
    }
    let (status, body) = session_user(&http, api, &admin).await;
    assert_eq!(status, StatusCode::OK, "the administrator was logged out: {body}");
    assert_eq!(body["user"], ADMIN);
    // The auditor keeps its 5 most recent sessions; its older ones ended.
    for token in &auditor[55..] {
        assert_eq!(session_user(&http, api, token).await.0, StatusCode::OK);
    }
    for token in &auditor[..55] {
        assert_eq!(session_user(&http, api, token).await.0, StatusCode::UNAUTHORIZED);
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_flood_is_refused_quickly_and_a_real_login_does_not_wait_behind_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    // The throttle is out of the way (no delays, no blocks), as for a flood spread over
    // many addresses: only the login queue's bound stands between it and a real user.
    let cloud = Cloud::start(
        &tmp.path().join("cloud"),
        &pki,
        &[
            ("CLOUD_ENDPOINT_LOGINS__SOURCE_DELAY_MS", "0"),
            ("CLOUD_ENDPOINT_LOGINS__SOURCE_MAX_FAILED_ATTEMPTS", "100000"),
            ("CLOUD_ENDPOINT_LOGINS__MAX_FAILED_ATTEMPTS", "100000"),
        ],
    )
    .await;
    let api = cloud.api_addr.unwrap();

    // Four flooding addresses, 64 logins in flight from each, for 6 seconds.
    let stop_at = Instant::now() + Duration::from_secs(6);
    let mut flood = tokio::task::JoinSet::new();
    for source in 2..6u8 {
        // HTTP/2 on one connection per address: the logins, not the connections, are
        // what this flood is made of (the connection limit is the test above).
        let http = h2_client(&pki, loopback(source));
        for n in 0..64 {
            let http = http.clone();
            flood.spawn(async move {
                let (mut unauthorized, mut busy, mut slowest_busy) = (0u32, 0u32, Duration::ZERO);
                while Instant::now() < stop_at {
                    let t0 = Instant::now();
                    let sent = http
                        .post(format!("https://{api}/api/session"))
                        .basic_auth(format!("nobody-{source}-{n}@cloud.local"), Some("guess"))
                        .send()
                        .await;
                    let r = sent.unwrap_or_else(|e| panic!("a flooding login got no answer: {e}"));
                    match r.status() {
                        StatusCode::UNAUTHORIZED => unauthorized += 1,
                        StatusCode::SERVICE_UNAVAILABLE => {
                            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok());
                            assert_eq!(retry, Some("1"), "a busy answer says when to try again");
                            let body: Value = r.json().await.unwrap();
                            let message = body["messages"][0]["default_message"].as_str().unwrap();
                            assert!(message.contains("logins waiting"), "{message}");
                            busy += 1;
                            slowest_busy = slowest_busy.max(t0.elapsed());
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        other => panic!("unexpected answer to a flooding login: {other}"),
                    }
                }
                (unauthorized, busy, slowest_busy)
            });
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Meanwhile, real logins from 127.0.0.1, one after the other.
    let http = client(&pki, loopback(1));
    let mut real = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let r = login(&http, api, AUDITOR, DEMO_PASSWORD).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        real.push(t0.elapsed());
    }
    let (mut unauthorized, mut busy, mut slowest_busy) = (0, 0, Duration::ZERO);
    while let Some(done) = flood.join_next().await {
        let (u, b, s) = done.unwrap();
        unauthorized += u;
        busy += b;
        slowest_busy = slowest_busy.max(s);
    }
    eprintln!(
        "real logins took {real:?} during a flood of {} logins ({unauthorized} checked and refused, {busy} busy; \
         slowest busy answer {slowest_busy:?})",
        unauthorized + busy
    );
    let slowest = real.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(3),
        "a real login took {slowest:?} during the flood"
    );
    assert!(busy > 0, "256 logins in flight never met the queue's bound");
    cloud.stop().await;
}
