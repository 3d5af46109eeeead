//! The QUIC server: accepts edge connections and serves each migration.

mod connection;
pub mod live;
mod live_migration;
pub mod placement;
mod probe;
pub mod revoked;

use std::future::Future;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use gateway::protocol::ReceiverConfig;
use gateway::transport::{self, RateLimit};
use gateway::wire::RefusalCode;
use tokio::sync::Semaphore;

use crate::config::{LinkTestConfig, TransportSettings};
use crate::{Domain, EndpointError};

/// Caps on how fast the endpoint takes in migration data. They act on the
/// read side: a capped reader releases QUIC flow-control credit at the cap, so
/// the edge's sender slows down instead of the endpoint buffering. The receive
/// window of a capped endpoint's connections is sized from the cap (see
/// [`gateway::transport::Rate::burst_window`]), so the cap holds from the first byte.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caps {
    /// Shared by every connection.
    pub total: Option<Arc<RateLimit>>,
    /// A fresh limit per migration at this rate.
    pub per_migration: Option<transport::Rate>,
}

/// How much a read-side cap lets through at once. The reader takes payloads in pieces
/// ([`gateway::transport::DataReader::read_payload_paced`]), so a short burst keeps the
/// link's traffic smooth without pausing between pieces.
pub(crate) const READ_BURST: Duration = Duration::from_millis(10);

/// Serves migrations on `socket` (at most `max_concurrent` at once, each session with
/// `receiver`'s settings) until `shutdown` completes, then closes every
/// connection (their uncommitted migrations wait for their edges to resume them) and returns.
pub async fn run(
    socket: UdpSocket,
    domain: Arc<Domain>,
    tls: rustls::ServerConfig,
    (max_concurrent, receiver): (u32, ReceiverConfig),
    settings: &TransportSettings,
    link_test: &LinkTestConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EndpointError> {
    let tuning = settings.tuning();
    // What one migration may take: the tighter of the two caps (all migrations together
    // cannot go faster than the total either).
    let cap = [settings.max_rate_per_migration, settings.max_rate]
        .into_iter()
        .flatten()
        .min();
    let initial = match cap {
        Some(cap) => tuning.clone().capped(cap),
        None => tuning.clone(),
    };
    let endpoint = transport::server_endpoint(socket, tls, &initial)?;
    // Under a total cap the window all migrations share is that cap's too.
    let budget = match settings.max_rate {
        Some(total) => tuning.connection_window.min(total.burst_window(Duration::ZERO)),
        None => tuning.connection_window,
    };
    domain.live.share_window(budget, cap);
    let caps = Caps {
        total: settings
            .max_rate
            .map(|r| Arc::new(RateLimit::with_burst(r, READ_BURST))),
        per_migration: settings.max_rate_per_migration,
    };
    // Uncapped traffic (link tests, live migrations) gets the window of the path back.
    let full_window = quinn::VarInt::from_u64(tuning.connection_window).unwrap_or(quinn::VarInt::MAX);
    let slots = Arc::new(Semaphore::new(max_concurrent as usize));
    let link_tests = Arc::new(probe::LinkTests::new(link_test.clone()));
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
        let link_tests = link_tests.clone();
        let caps = caps.clone();
        let receiver = receiver.clone();
        conns.spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "handshake failed");
                    return;
                }
            };
            if !revoked::admit(&conn, &domain.revoked_edges) {
                return;
            }
            // The first stream says what the connection is for: a link test
            // has its own limits and never takes a migration slot.
            let control = match probe::first_stream(&conn).await {
                Some(probe::FirstStream::Migration(send, recv)) => (send, recv),
                Some(probe::FirstStream::LinkTest(send, recv)) => {
                    conn.set_receive_window(full_window);
                    return link_tests.serve(conn, send, recv, &domain.endpoint_name).await;
                }
                Some(probe::FirstStream::LiveMigration(send, recv)) => {
                    conn.set_receive_window(full_window);
                    return live_migration::serve(conn, domain, (send, recv), slots).await;
                }
                None => return,
            };
            // The migration slot is taken when the plan arrives (connection.rs): a
            // connection that never gets that far must not hold one.
            connection::serve(conn, domain, receiver, caps, control, slots).await;
        });
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    tracing::info!("shutting down: closing connections");
    // Busy, not Aborted: running migrations are kept, and their edges retry
    // until the endpoint is back, then resume.
    endpoint.close(
        RefusalCode::Busy.close_code().into(),
        b"cloud endpoint shutting down; running migrations are kept and resume when it is back",
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    endpoint.wait_idle().await;
    Ok(())
}
