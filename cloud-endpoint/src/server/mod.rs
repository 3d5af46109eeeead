//! The QUIC server: accepts edge connections and serves each migration.

mod connection;
pub mod placement;

use std::future::Future;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use gateway::protocol::ReceiverConfig;
use gateway::transport::{self, TransportTuning};
use gateway::wire::RefusalCode;
use tokio::sync::Semaphore;

use crate::{Domain, EndpointError};

/// Serves migrations on `socket` until `shutdown` completes, then closes every
/// connection (their uncommitted migrations are discarded) and returns.
pub async fn run(
    socket: UdpSocket,
    domain: Arc<Domain>,
    tls: rustls::ServerConfig,
    max_concurrent: u32,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EndpointError> {
    let endpoint = transport::server_endpoint(socket, tls, &TransportTuning::default())?;
    let slots = Arc::new(Semaphore::new(max_concurrent as usize));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        let domain = domain.clone();
        let slots = slots.clone();
        conns.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "handshake failed");
                    return;
                }
            };
            // A slot per migration bounds memory and disk bandwidth; an edge
            // over the limit is told to retry rather than queued invisibly.
            let Ok(_slot) = slots.try_acquire_owned() else {
                tracing::warn!(%remote, "refused: too many concurrent migrations");
                transport::close(
                    &conn,
                    RefusalCode::Busy,
                    "the cloud endpoint is at its limit of concurrent migrations; retry later",
                );
                return;
            };
            connection::serve(conn, domain, ReceiverConfig::default()).await;
        });
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    tracing::info!("shutting down: closing connections");
    endpoint.close(
        RefusalCode::Aborted.close_code().into(),
        b"cloud endpoint shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    endpoint.wait_idle().await;
    Ok(())
}
