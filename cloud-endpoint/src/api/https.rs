//! HTTPS for the API: the TLS configuration and the accept loop.
//!
//! Each connection runs in its own task: the TLS handshake (bounded in time), then HTTP/1.1
//! or HTTP/2 as the client chose by ALPN. A semaphore caps connections; at shutdown the
//! loop stops accepting and open connections are closed gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

/// Connections served at once; one more waits in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers (HTTP/1.1: against slow-header attacks).
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

pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ApiServeError> {
    let local = listener.local_addr().map_err(ApiServeError::Listener)?;
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS);
    let http = Arc::new(http);
    let mut handshakes = tokio::task::JoinSet::new();
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
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let http = http.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        handshakes.spawn(
            async move {
                let _slot = slot;
                serve_connection(tcp, peer, acceptor, http, app, watcher).await;
            }
            .instrument(tracing::debug_span!("api_connection", %peer)),
        );
        while handshakes.try_join_next().is_some() {}
    }
    drop(listener);
    tracing::info!(%local, "API: shutting down");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("API: requests still running after the grace period; closing their connections");
    }
    handshakes.abort_all();
    while handshakes.join_next().await.is_some() {}
    Ok(())
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    http: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
    // Handlers see the client's address (the login throttle counts per address).
    // (A layer on a clone of the router: a few allocations, beside a TLS handshake.)
    let app = app.layer(axum::Extension(ConnectInfo(peer)));
    let service = TowerToHyperService::new(app);
    let conn = http.serve_connection_with_upgrades(TokioIo::new(tls), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "API: connection ended with an error");
    }
}
