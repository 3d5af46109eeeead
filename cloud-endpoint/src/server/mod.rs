//! The QUIC server: accepts edge connections and serves each migration.

mod connection;
pub mod dedup;
pub mod links;
pub mod live;
mod live_migration;
pub mod placement;
mod probe;
pub mod revoked;
pub mod seed;
mod tunnels;

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
/// `receiver`'s settings) until `shutdown` completes, then drains (see [`drain`]) for at
/// most `grace` and returns.
pub async fn run(
    socket: UdpSocket,
    domain: Arc<Domain>,
    tls: rustls::ServerConfig,
    (max_concurrent, receiver): (u32, ReceiverConfig),
    settings: &TransportSettings,
    link_test: &LinkTestConfig,
    (shutdown, grace): (impl Future<Output = ()>, Duration),
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
    domain.health.set_quic(crate::health::QuicState::Listening);
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
    let connections = Arc::new(Semaphore::new(settings.max_connections as usize));
    let per_edge = Arc::new(EdgeConnections::new(settings.max_connections_per_edge));
    let hello = Duration::from_secs(u64::from(settings.hello_timeout_secs));
    let link_tests = Arc::new(probe::LinkTests::new(link_test.clone()));
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        // Refused before the handshake, which is most of a new connection's cost; the
        // edge reads "the peer refused the connection ... retry later".
        let Ok(open) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                remote = %incoming.remote_address(),
                limit = settings.max_connections,
                "connection refused: transport.max_connections are open"
            );
            incoming.refuse();
            continue;
        };
        let per_edge = per_edge.clone();
        let domain = domain.clone();
        let slots = slots.clone();
        let link_tests = link_tests.clone();
        let caps = caps.clone();
        let receiver = receiver.clone();
        conns.spawn(async move {
            let _open = open;
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
            let connected = std::time::Instant::now();
            let edge = probe::edge_thumbprint(&conn).unwrap_or_default();
            let Some(_edge_slot) = per_edge.enter(&edge) else {
                tracing::warn!(%remote, edge_cert = %edge, limit = per_edge.limit, "connection closed: the edge certificate has transport.max_connections_per_edge open");
                return transport::close(
                    &conn,
                    RefusalCode::Busy,
                    &format!(
                        "this edge certificate already has {} connections open to the cloud endpoint (its transport.max_connections_per_edge); retry when one has ended",
                        per_edge.limit
                    ),
                );
            };
            // The first stream says what the connection is for: a link test
            // has its own limits and never takes a migration slot.
            let control = match probe::first_stream(&conn, hello).await {
                Some(probe::FirstStream::Migration(send, recv)) => (send, recv),
                Some(probe::FirstStream::LinkTest(send, recv)) => {
                    conn.set_receive_window(full_window);
                    transport::allow_streams(&conn, transport::StreamPhase::LinkTest);
                    return link_tests.serve(conn, send, recv, &domain.endpoint_name).await;
                }
                Some(probe::FirstStream::LiveMigration(send, recv)) => {
                    conn.set_receive_window(full_window);
                    return live_migration::serve(connected, conn, domain, (send, recv), slots, hello).await;
                }
                None => return,
            };
            // The migration slot is taken when the plan arrives (connection.rs): a
            // connection that never gets that far must not hold one.
            connection::serve(connected, conn, domain, receiver, caps, control, slots).await;
        });
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
    }
    drain(&endpoint, &domain, conns, grace).await;
    Ok(())
}

/// A stop: `/readyz` says draining, new connections are refused (the edge reads "the
/// peer refused the connection: it is shutting down ... retry later"), and every
/// connection is closed as Busy, which edges retry within their `--retry-for`. Each
/// connection's cleanup then brings its migration to a resumable state: the blocking
/// work under way (a batch being synced, a commit) finishes, the chunks written but not
/// yet journaled are synced and journaled, and the migration is recorded as interrupted.
/// A restarted endpoint resumes it from the journal. What is still running after `grace`
/// is left: the journal only ever names synced data, so a cut costs re-sent chunks, never
/// a wrong copy.
async fn drain(endpoint: &quinn::Endpoint, domain: &Domain, mut conns: tokio::task::JoinSet<()>, grace: Duration) {
    let started = tokio::time::Instant::now();
    domain.health.set_quic(crate::health::QuicState::Draining);
    tracing::info!(
        connections = conns.len(),
        grace_secs = grace.as_secs(),
        "shutting down: refusing new connections, closing running ones as busy (their migrations resume)"
    );
    // Busy, not Aborted: running migrations are kept, and their edges retry
    // until the endpoint is back, then resume. A closed quinn endpoint refuses new
    // connections with the same code.
    endpoint.close(
        RefusalCode::Busy.close_code().into(),
        b"cloud endpoint shutting down; running migrations are kept and resume when it is back",
    );
    let drained = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    match drained {
        Ok(()) => tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drained: every migration is journaled and waits for its edge"
        ),
        Err(_) => {
            tracing::warn!(
                still_running = conns.len(),
                grace_secs = grace.as_secs(),
                "grace period over with connections still closing; they resume from their journals"
            );
            conns.abort_all();
        }
    }
    // The close frames go out; a peer that does not answer is not waited for beyond the
    // grace period.
    let rest = grace.saturating_sub(started.elapsed()).max(Duration::from_millis(200));
    let _ = tokio::time::timeout(rest, endpoint.wait_idle()).await;
    domain.health.set_quic(crate::health::QuicState::NotListening);
}

/// Connections open per edge certificate ([`TransportSettings::max_connections_per_edge`]).
#[derive(Debug)]
struct EdgeConnections {
    limit: u32,
    open: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// One connection of an edge, counted until dropped.
struct EdgeSlot {
    edges: Arc<EdgeConnections>,
    edge: String,
}

impl EdgeConnections {
    fn new(limit: u32) -> Self {
        EdgeConnections {
            limit,
            open: Default::default(),
        }
    }

    /// Counts a connection of `edge` (its certificate's thumbprint), or `None` when it
    /// has `limit` open already.
    fn enter(self: &Arc<Self>, edge: &str) -> Option<EdgeSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(edge.to_owned()).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(EdgeSlot {
            edges: self.clone(),
            edge: edge.to_owned(),
        })
    }
}

impl Drop for EdgeSlot {
    fn drop(&mut self) {
        let mut open = self.edges.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.edge) {
            *count -= 1;
            // The map holds only edges with a connection open.
            if *count == 0 {
                open.remove(&self.edge);
            }
        }
    }
}
