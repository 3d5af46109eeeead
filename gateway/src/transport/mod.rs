//! The QUIC transport: quinn endpoints with the gateway's TLS and tuning, and
//! framed reads and writes of [`crate::wire`] on quinn streams.
//!
//! One connection carries one migration: a bidirectional control stream
//! opened by the edge, plus several unidirectional data streams so a lost
//! packet stalls only the chunk it belongs to.

mod io;
mod tls;

pub use io::{ControlReader, ControlWriter, DataReader, DataWriter};
pub use tls::{client_crypto, server_crypto, Identity, ServerTrust};

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};

use crate::wire::{RefusalCode, WireError};

/// Failures of the transport layer, each with a message that says what to
/// check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot use UDP socket {addr}: {source}")]
    Socket { addr: SocketAddr, source: std::io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("{}", describe_connection_error(.0))]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer closed the stream before the migration ended")]
    StreamClosed,
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl TransportError {
    /// The refusal code the peer closed the connection with, if it was one of ours.
    pub fn refusal(&self) -> Option<RefusalCode> {
        match self {
            TransportError::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                RefusalCode::from_close_code(c.error_code.into_inner())
            }
            _ => None,
        }
    }
}

fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError::*;
    match e {
        TimedOut => "the connection timed out: the peer stopped answering (is the UDP port reachable through every firewall?)".into(),
        ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
            "the peer refused the connection: it is shutting down or not accepting connections; retry later".into()
        }
        // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100-0x1ff.
        ConnectionClosed(c) if (0x100..0x200).contains(&u64::from(c.error_code)) => {
            format!("the peer refused the TLS handshake ({}): check that this side's certificate is issued by the CA the peer trusts and is not expired", c.error_code)
        }
        ConnectionClosed(c) => format!(
            "the peer closed the connection: {} ({})",
            String::from_utf8_lossy(&c.reason),
            c.error_code
        ),
        ApplicationClosed(c) => format!(
            "the peer closed the connection: {}",
            String::from_utf8_lossy(&c.reason)
        ),
        TransportError(t) if t.reason.contains("invalid peer certificate") => format!(
            "the peer's certificate was not accepted ({}): check the CA bundle (--ca-bundle) or the pinned SHA-256 thumbprint (--thumbprint; `certs thumbprint FILE` prints it)",
            t.reason.trim_start_matches("invalid peer certificate: ")
        ),
        TransportError(t) => format!("TLS/QUIC failure: {t}"),
        Reset => "the peer reset the connection (it restarted or forgot it)".into(),
        LocallyClosed => "the connection was closed locally".into(),
        other => other.to_string(),
    }
}

/// Transport tuning. Defaults suit a LAN or a short WAN hop; see each field
/// for when to change it.
#[derive(Debug, Clone)]
pub struct TransportTuning {
    /// Bytes one stream may have in flight. Must cover the bandwidth-delay
    /// product divided by the number of data streams; quinn's 1.25 MB default
    /// caps one stream at ~67 Mbit/s at 150 ms RTT.
    pub stream_window: u64,
    /// Bytes all streams together may have in flight (receive side).
    pub connection_window: u64,
    /// Bytes the sender buffers before `write` waits: the send-side bound on
    /// memory.
    pub send_window: u64,
    /// Silence after which the connection is given up.
    pub idle_timeout: Duration,
    /// Keep-alive so NAT and firewall state survives slow phases.
    pub keep_alive: Duration,
    /// UDP socket buffer size asked for (the kernel caps it at rmem_max/wmem_max).
    pub socket_buffer: usize,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            stream_window: 16 << 20,
            connection_window: 64 << 20,
            send_window: 64 << 20,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            socket_buffer: 8 << 20,
        }
    }
}

impl TransportTuning {
    fn transport_config(&self, max_uni_streams: u32) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        t.stream_receive_window(varint(self.stream_window))
            .receive_window(varint(self.connection_window))
            .send_window(self.send_window)
            .max_concurrent_uni_streams(max_uni_streams.into())
            .max_concurrent_bidi_streams(1u32.into())
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        Arc::new(t)
    }
}

/// Most data streams one migration may open.
pub const MAX_DATA_STREAMS: u32 = 16;

/// Binds a UDP socket with the tuned buffer sizes.
pub fn bind_udp(addr: SocketAddr, tuning: &TransportTuning) -> Result<UdpSocket, TransportError> {
    let err = |source| TransportError::Socket { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(err)?;
    // Best effort: the kernel clamps to its maximum; a smaller buffer costs
    // throughput on long links, not correctness.
    let _ = socket.set_recv_buffer_size(tuning.socket_buffer);
    let _ = socket.set_send_buffer_size(tuning.socket_buffer);
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

fn runtime() -> Arc<dyn quinn::Runtime> {
    Arc::new(quinn::TokioRuntime)
}

/// A cloud endpoint's QUIC endpoint on an already bound socket.
pub fn server_endpoint(
    socket: UdpSocket,
    crypto: rustls::ServerConfig,
    tuning: &TransportTuning,
) -> Result<quinn::Endpoint, TransportError> {
    let addr = socket.local_addr().map_err(|source| TransportError::Socket {
        addr: ([0, 0, 0, 0], 0).into(),
        source,
    })?;
    let crypto = QuicServerConfig::try_from(crypto).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(tuning.transport_config(MAX_DATA_STREAMS));
    quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, runtime())
        .map_err(|source| TransportError::Socket { addr, source })
}

/// An edge agent's QUIC endpoint (client only) and the config to connect with.
pub fn client_endpoint(
    bind: SocketAddr,
    crypto: rustls::ClientConfig,
    tuning: &TransportTuning,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = bind_udp(bind, tuning)?;
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // The edge accepts no streams from the cloud.
    config.transport_config(tuning.transport_config(0));
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime())
        .map_err(|source| TransportError::Socket { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects and completes the handshake.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TransportError> {
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|source| TransportError::Connect { addr, source })?;
    Ok(connecting.await?)
}

/// Closes a connection with a refusal code and a human-readable reason.
pub fn close(conn: &quinn::Connection, code: RefusalCode, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    conn.close(code.close_code().into(), reason);
}
