//! HTTPS for the API: the TLS configuration and the accept loop.
//!
//! Each connection runs in its own task: the TLS handshake (bounded in time), then HTTP/1.1
//! or HTTP/2 as the client chose by ALPN. Connections are capped in all (a semaphore) and
//! per client address, so one client cannot hold every slot; a connection with no request
//! running is closed after the idle timeout (HTTP/1.1 by hyper's header read timeout,
//! HTTP/2 by our own timer, since hyper has none), and HTTP/2 pings find dead clients.
//! At shutdown the loop stops accepting and open connections are closed gracefully.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::config::ApiSettings;
use crate::logins::throttle::SourceKey;

/// Time a client has to send a request's headers (HTTP/1.1: against slow-header attacks,
/// and the idle limit of a keep-alive connection between requests).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 64;
/// At shutdown, how long requests in flight may take before their connections are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the API server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiServeError {
    #[error("the API listener's address cannot be read: {0}")]
    Listener(#[source] std::io::Error),
}

/// The API's TLS configuration: the endpoint's own certificate chain and key, server
/// authentication only (API clients log in with a user and password, unlike edge agents,
/// which need a certificate), TLS 1.2 and 1.3 (curl, PowerShell and older SDKs still
/// speak 1.2), ALPN h2 and http/1.1, ring as the crypto provider.
pub fn server_tls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Connections held per client address; an entry goes when its last connection does.
#[derive(Debug, Default)]
struct PerClient(Mutex<HashMap<SourceKey, usize>>);

/// One connection of a client, counted until dropped.
struct ClientSlot {
    table: Arc<PerClient>,
    key: SourceKey,
}

impl PerClient {
    /// A slot for `key` unless it holds `limit` already.
    fn take(self: &Arc<Self>, key: SourceKey, limit: usize) -> Option<ClientSlot> {
        let mut table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let held = table.entry(key).or_insert(0);
        if *held >= limit {
            return None;
        }
        *held += 1;
        Some(ClientSlot {
            table: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = table.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                table.remove(&self.key);
            }
        }
    }
}

/// Requests running on one connection, and since when none has run.
#[derive(Debug)]
struct Activity {
    running: AtomicUsize,
    quiet_since: Mutex<Instant>,
}

/// One request running, counted until its response is produced.
struct Running(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            running: AtomicUsize::new(0),
            quiet_since: Mutex::new(Instant::now()),
        })
    }

    fn start(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(self.clone())
    }

    /// Completes once no request has run for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let since = *self.quiet_since.lock().unwrap_or_else(PoisonError::into_inner);
            let deadline = since + limit;
            if self.running.load(Ordering::SeqCst) == 0 && Instant::now() >= deadline {
                return;
            }
            // A request may be running: look again one limit later at the latest.
            tokio::time::sleep_until(deadline.max(Instant::now() + limit / 4)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The time first: a check between the two sees a recent quiet time, never an
        // old one with nothing running.
        *self.0.quiet_since.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    settings: &ApiSettings,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiServeError> {
    let local = listener.local_addr().map_err(ApiServeError::Listener)?;
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(settings.max_connections as usize));
    let per_client = Arc::new(PerClient::default());
    let per_client_limit = settings.max_connections_per_client as usize;
    let (stop, stopping) = watch::channel(false);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT.min(settings.idle_timeout()));
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Some(settings.keep_alive_interval()))
        .keep_alive_timeout(settings.keep_alive_timeout());
    let http = Arc::new(http);
    let limits = ConnectionLimits {
        handshake: settings.handshake_timeout(),
        idle: settings.idle_timeout(),
    };
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pass, instead of spinning.
                    tracing::warn!(error = %e, "API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let key = SourceKey::of(peer.ip());
        let Some(client_slot) = per_client.take(key, per_client_limit) else {
            // Closed at once, before any TLS work: the client's other connections are
            // its share. Debug, not warn: a flood would write a line per connection.
            tracing::debug!(%peer, limit = per_client_limit, "API: connection refused, the client holds its limit");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let http = http.clone();
        let app = app.clone();
        let stopping = stopping.clone();
        connections.spawn(
            async move {
                let _slots = (slot, client_slot);
                serve_connection(tcp, peer, acceptor, http, app, limits, stopping).await;
            }
            .instrument(tracing::debug_span!("api_connection", %peer)),
        );
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    tracing::info!(%local, "API: shutting down");
    stop.send_replace(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!("API: requests still running after the grace period; closing their connections");
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// How long a connection may take over its handshake, and sit idle.
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    handshake: Duration,
    idle: Duration,
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    http: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "API: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "API: TLS handshake timed out");
            return;
        }
    };
    let activity = Activity::new();
    // Handlers see the client's address (the login throttle counts per address).
    // (Layers on a clone of the router: a few allocations, beside a TLS handshake.)
    let counted = activity.clone();
    let app = app
        .layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            let running = counted.start();
            async move {
                let response = next.run(request).await;
                drop(running);
                response
            }
        }))
        .layer(axum::Extension(ConnectInfo(peer)));
    let service = TowerToHyperService::new(app);
    let conn = http.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let why = tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "API: connection ended with an error");
            }
            return;
        }
        _ = stopping.wait_for(|stop| *stop) => "the API is shutting down",
        _ = activity.idle_for(limits.idle) => "idle",
    };
    tracing::debug!(%peer, why, "API: closing the connection");
    // HTTP/2: GOAWAY, the streams running finish; HTTP/1.1: after the current response.
    conn.as_mut().graceful_shutdown();
    // A client that ignores the GOAWAY does not keep its slot either.
    match tokio::time::timeout(SHUTDOWN_GRACE, conn).await {
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API: connection ended with an error"),
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(%peer, "API: connection cut, the client did not close it"),
    }
}
