//! The QUIC transport: quinn endpoints with the gateway's TLS and tuning, and
//! framed reads and writes of [`crate::wire`] on quinn streams.
//!
//! One connection carries one migration: a bidirectional control stream
//! opened by the edge, plus several unidirectional data streams so a lost
//! packet stalls only the chunk it belongs to.

mod congestion;
mod io;
mod rate;
mod tls;

pub use congestion::{BdpConfig, BdpController};
pub use io::{ControlReader, ControlWriter, DataReader, DataWriter};
pub use rate::{Rate, RateLimit, CAP_WINDOW, MIN_CAP_WINDOW};
pub use tls::{client_crypto, pinned_https_client, server_crypto, Identity, ServerTrust};

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
    #[error("no answer from {addr} within {} s: check that the cloud endpoint runs and that its UDP port is open on every firewall between", .waited.as_secs())]
    NoAnswer { addr: SocketAddr, waited: Duration },
    #[error("{}", describe_connection_error(.0))]
    Connection(#[from] quinn::ConnectionError),
    #[error("the peer closed the stream before the migration ended")]
    StreamClosed,
    #[error(transparent)]
    Wire(#[from] WireError),
    /// An edge that names several endpoints of one domain reached none of them: each
    /// address with its own failure, in the order tried.
    #[error("{}", describe_unreachable(.0))]
    Unreachable(Vec<(SocketAddr, TransportError)>),
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

fn describe_unreachable(failures: &[(SocketAddr, TransportError)]) -> String {
    if failures.is_empty() {
        return "no endpoint address to connect to: name at least one endpoint (--url)".into();
    }
    let each: Vec<String> = failures.iter().map(|(addr, e)| format!("{addr}: {e}")).collect();
    format!(
        "none of the {} endpoint addresses could be reached; {}",
        failures.len(),
        each.join("; ")
    )
}

fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError::*;
    match e {
        TimedOut => "the connection timed out: the peer stopped answering (is the UDP port reachable through every firewall?)".into(),
        ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => {
            "the peer refused the connection: it is shutting down, or has all the connections it accepts open (a cloud endpoint's transport.max_connections); retry later".into()
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

/// The congestion controller. Migrations cross long WAN links where packets
/// are lost for reasons other than congestion (radio, policers, shared
/// uplinks); a controller that halves its window on every loss (Cubic,
/// NewReno) moves a few Mbit/s on a 150 ms link at 1 % loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// The gateway's own ([`BdpController`], the default): BBR's model of
    /// the path, a window sized for quinn's pacer, loss ignored unless a
    /// round loses more than 5 %.
    #[default]
    Bdp,
    /// quinn's BBR. Ignores random loss too, but with quinn's pacer it
    /// overruns shallow bottleneck queues (a third of the bytes resent).
    Bbr,
    /// Loss-based, RFC 9438; quinn's default. Fair to TCP on shared links.
    Cubic,
    /// Loss-based, RFC 9002's reference controller.
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bdp" => Ok(Congestion::Bdp),
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            other => Err(format!(
                "unknown congestion controller {other:?}: use bdp, bbr, cubic or newreno"
            )),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Bdp => "bdp",
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        })
    }
}

impl serde::Serialize for Congestion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Congestion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Congestion, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The path a connection is sized for: its bottleneck rate and round-trip
/// time. Windows and buffers follow the bandwidth-delay product, so a long
/// fat link is filled and a short one does not reserve memory it cannot use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathEstimate {
    /// Bottleneck rate in bits per second.
    pub rate_bps: u64,
    pub rtt: Duration,
}

impl PathEstimate {
    /// vMotion's long-distance limit (150 ms RTT) at 1 Gbit/s: sized for the
    /// longest link users run migrations over, at a rate two cores can fill.
    pub const DEFAULT: PathEstimate = PathEstimate {
        rate_bps: 1_000_000_000,
        rtt: Duration::from_millis(150),
    };

    /// Bytes in flight that fill this path.
    pub fn bdp(&self) -> u64 {
        (self.rate_bps as u128 * self.rtt.as_micros() / 8 / 1_000_000) as u64
    }
}

impl Default for PathEstimate {
    fn default() -> Self {
        PathEstimate::DEFAULT
    }
}

/// Flow-control window of one stream: 1.25 MiB, under 1024 full-size packets.
///
/// quinn keeps at most 1024 separate out-of-order spans per stream and closes
/// the connection past that ("too many gaps in stream buffer"), a guard
/// against peers that send confetti. A sender overshooting a shallow
/// bottleneck queue (BBR's startup, Cubic's slow start) loses every other
/// packet for a round trip, and a stream with a window of more than 1024
/// packets then trips the guard. A window below it cannot, whatever the loss
/// pattern; long paths are filled with more streams instead.
pub const STREAM_WINDOW: u64 = 1_250_000;

/// Transport tuning. [`TransportTuning::for_path`] derives it from the link;
/// the default is sized for [`PathEstimate::DEFAULT`].
#[derive(Debug, Clone)]
pub struct TransportTuning {
    /// Bytes one stream may have in flight. Kept at [`STREAM_WINDOW`]: a
    /// long path is filled with more streams ([`Self::data_streams`]), not
    /// bigger windows (see there why).
    pub stream_window: u64,
    /// Data streams a migration opens so that together they cover the
    /// bandwidth-delay product (each carries at most a stream window per
    /// round trip, less while it waits for a retransmission).
    pub data_streams: usize,
    /// Bytes all streams together may have in flight (receive side).
    pub connection_window: u64,
    /// Bytes the sender buffers before `write` waits: the send-side bound on
    /// memory. Must cover the bandwidth-delay product plus what is being
    /// retransmitted.
    pub send_window: u64,
    /// Silence after which the connection is given up (30 s by default). QUIC uses
    /// the smaller of the two sides' values, so either side can shorten it. Shorter
    /// notices a dead link sooner (the edge reconnects and resumes sooner, the
    /// endpoint frees the migration sooner); too short gives up on a link that only
    /// stalled for a moment. Tests use 2-3 s to cut links quickly.
    pub idle_timeout: Duration,
    /// Keep-alive so NAT and firewall state survives slow phases. Sent at least
    /// every third of [`Self::idle_timeout`], so a quiet but healthy connection
    /// never reaches it.
    pub keep_alive: Duration,
    /// UDP socket buffer size asked for. The kernel caps it at
    /// net.core.rmem_max/wmem_max unless the process may force it (root).
    pub socket_buffer: usize,
    pub congestion: Congestion,
    /// Largest UDP payload MTU discovery probes for. 1472 is a 1500-byte
    /// Ethernet frame over IPv4; discovery backs off on paths with less,
    /// and each step up saves per-packet header and encryption costs.
    pub mtu_upper_bound: u16,
    /// Round-trip time assumed before the first sample: a long link's
    /// handshake then does not retransmit spuriously.
    pub initial_rtt: Duration,
    /// Congestion window of the first round trip when the path is known
    /// (measured by `edge-agent link-test` or given by the operator): half its
    /// BDP, paced over the first RTT, saves the six or so round trips a standard start
    /// needs to get there (a second on a 150 ms path). Half, as a careful
    /// resume jumps to half the window a path held before (draft-ietf-tsvwg-
    /// careful-resume): the rate is the operator's word, not a measurement of
    /// this connection, and the startup triples it from there within a round
    /// trip or two. A delta pass of a few MB is then two rounds of data, not three.
    /// `None` starts from RFC 9002's window.
    pub initial_window: Option<u64>,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning::for_path(PathEstimate::DEFAULT)
    }
}

impl TransportTuning {
    /// How long a handshake may take before the edge gives up and tries again: room for
    /// the handshake's retransmissions after several losses (its probe timeout starts at
    /// three initial RTTs and doubles), never longer than the idle timeout.
    pub fn handshake_timeout(&self) -> Duration {
        let floor = Duration::from_secs(10).max(self.initial_rtt * 30);
        match self.idle_timeout.is_zero() {
            true => floor,
            false => floor.min(self.idle_timeout),
        }
    }

    /// Tuning for a path the operator knows (or `link-test` measured): as
    /// [`Self::for_path`], and starting at half its BDP.
    pub fn for_known_path(path: PathEstimate) -> Self {
        TransportTuning {
            initial_window: Some((path.bdp() / 2).clamp(14_720, 16 << 20)),
            ..TransportTuning::for_path(path)
        }
    }

    /// Windows and buffers for a path: twice its bandwidth-delay product
    /// (one BDP in flight while the next is queued, and room for
    /// retransmissions), within bounds that keep a LAN migration light and a
    /// 10 Gbit/s intercontinental one under a few hundred MiB.
    pub fn for_path(path: PathEstimate) -> Self {
        let window = (2 * path.bdp()).clamp(8 << 20, 256 << 20);
        // A stream whose head packet is lost buffers everything after it
        // until the retransmission lands; three windows' worth of streams
        // keeps the path full while some of them wait.
        let streams = (3 * path.bdp()).div_ceil(STREAM_WINDOW) + 1;
        TransportTuning {
            stream_window: STREAM_WINDOW,
            data_streams: (streams as usize).clamp(4, MAX_DATA_STREAMS as usize),
            connection_window: window + (window / 2),
            send_window: window,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            // Bursts arrive faster than the reader is scheduled: half a BDP
            // of socket buffer absorbs them without drops.
            socket_buffer: (path.bdp() / 2).clamp(4 << 20, 64 << 20) as usize,
            congestion: Congestion::default(),
            mtu_upper_bound: 1472,
            initial_rtt: path.rtt.clamp(Duration::from_millis(10), Duration::from_millis(500)),
            initial_window: None,
        }
    }

    /// The same tuning for a receiver that takes data at `rate` at most (a capped
    /// endpoint): the connection's receive window is the cap's burst window on a short
    /// path ([`Rate::burst_window`]), so from the first byte a sender cannot get further
    /// ahead of the cap than that. The receiver widens the window of a connection once
    /// it knows its round-trip time, or that it carries something else than a capped
    /// migration (`quinn::Connection::set_receive_window`).
    pub fn capped(mut self, rate: Rate) -> Self {
        self.connection_window = self.connection_window.min(rate.burst_window(Duration::ZERO));
        self
    }

    /// `uni` and `bidi`: streams the peer may open at once. Each stream the peer may open
    /// is a receive window's worth of memory it can fill without being read, so a server
    /// allows only the first (control) stream and raises the limits per connection when
    /// a phase needs more ([`phase_streams`]); a client accepts none.
    fn transport_config(&self, uni: u32, bidi: u32) -> Arc<quinn::TransportConfig> {
        let mut t = quinn::TransportConfig::default();
        let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.mtu_upper_bound);
        // A zero idle timeout means none (QUIC's convention): nothing to stay under.
        let keep_alive = match self.idle_timeout.is_zero() {
            true => self.keep_alive,
            false => self.keep_alive.min(self.idle_timeout / 3),
        };
        t.stream_receive_window(varint(self.stream_window))
            .receive_window(varint(self.connection_window))
            .send_window(self.send_window)
            .max_concurrent_uni_streams(uni.into())
            .max_concurrent_bidi_streams(bidi.into())
            .keep_alive_interval(Some(keep_alive))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .initial_rtt(self.initial_rtt)
            .mtu_discovery_config(Some(mtu));
        match self.congestion {
            Congestion::Bdp => t.congestion_controller_factory(Arc::new(BdpConfig {
                initial_window: self.initial_window,
            })),
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
            }
        };
        Arc::new(t)
    }
}

/// Most data streams one migration may open.
pub const MAX_DATA_STREAMS: u32 = 16;

/// What a connection is doing, for the streams its peer may open ([`phase_streams`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPhase {
    /// From the handshake until the first stream says what the connection is for: that
    /// stream only.
    Opening,
    /// A migration before its plan is accepted, or a live migration before its
    /// destination waits: the control stream already open, nothing more.
    Control,
    /// A migration streaming its disks: its data streams.
    Data,
    /// A live migration whose destination waits: its control stream and `tunnels`
    /// tunnels open at once (the memory stream and one mirror connection per disk) of
    /// `lanes` streams each (the plan's [`crate::wire::live::LivePlan::tunnel_lanes`]).
    /// What they may buffer unread is bounded by the connection's window, not by their
    /// number.
    Tunnels { tunnels: u16, lanes: u16 },
    /// A link test: its probe stream, and its upload and download streams (up to
    /// [`crate::wire::probe::MAX_PROBE_STREAMS`] each).
    LinkTest,
}

/// (unidirectional, bidirectional) streams the peer may have open at once in `phase`:
/// the server raises them with `quinn::Connection::set_max_concurrent_uni_streams` (and
/// `_bi_`) when a connection enters a phase. Lowering does not take back credit already
/// given, so each connection only ever goes up from [`StreamPhase::Opening`].
pub fn phase_streams(phase: StreamPhase) -> (u32, u32) {
    let probe = u32::from(crate::wire::probe::MAX_PROBE_STREAMS);
    match phase {
        StreamPhase::Opening => (0, 1),
        // The control stream stays open and counts against the limit: no second one.
        StreamPhase::Control => (0, 1),
        StreamPhase::Data => (MAX_DATA_STREAMS, 1),
        StreamPhase::Tunnels { tunnels, lanes } => (0, 1 + u32::from(tunnels.max(1)) * u32::from(lanes.max(1))),
        StreamPhase::LinkTest => (probe, 1 + probe),
    }
}

/// Raises the streams `conn`'s peer may open to what `phase` needs.
pub fn allow_streams(conn: &quinn::Connection, phase: StreamPhase) {
    let (uni, bidi) = phase_streams(phase);
    conn.set_max_concurrent_uni_streams(uni.into());
    conn.set_max_concurrent_bi_streams(bidi.into());
}

/// Binds a UDP socket with the tuned buffer sizes.
pub fn bind_udp(addr: SocketAddr, tuning: &TransportTuning) -> Result<UdpSocket, TransportError> {
    let err = |source| TransportError::Socket { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(err)?;
    size_socket_buffers(&socket, tuning.socket_buffer);
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

/// Asks for `wanted` bytes of UDP buffer each way. The kernel clamps the
/// plain request at net.core.rmem_max/wmem_max (often 208 KiB to 4 MiB); a
/// privileged process (root, CAP_NET_ADMIN, as the gateway usually runs in
/// its container) may go past it. A smaller buffer costs throughput on long
/// links, not correctness, so shortfalls are reported, not fatal.
fn size_socket_buffers(socket: &socket2::Socket, wanted: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = socket.set_recv_buffer_size(wanted);
    let _ = socket.set_send_buffer_size(wanted);
    // Linux reports twice the usable size (the other half is bookkeeping).
    let got = |v: std::io::Result<usize>| v.map(|n| n / 2).unwrap_or(0);
    if got(socket.recv_buffer_size()) < wanted {
        let _ = setsockopt(socket, sockopt::RcvBufForce, &wanted);
    }
    if got(socket.send_buffer_size()) < wanted {
        let _ = setsockopt(socket, sockopt::SndBufForce, &wanted);
    }
    let (rcv, snd) = (got(socket.recv_buffer_size()), got(socket.send_buffer_size()));
    if rcv < wanted || snd < wanted {
        tracing::warn!(
            wanted,
            receive = rcv,
            send = snd,
            "UDP socket buffers are smaller than this path needs; long links may drop bursts. \
             Run as root, or raise net.core.rmem_max and net.core.wmem_max to {wanted}"
        );
    } else {
        tracing::debug!(receive = rcv, send = snd, "UDP socket buffers");
    }
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
    let (uni, bidi) = phase_streams(StreamPhase::Opening);
    config.transport_config(tuning.transport_config(uni, bidi));
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
    config.transport_config(tuning.transport_config(0, 0));
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

/// [`connect`], giving up after `within`. quinn waits a whole idle timeout (30 s) for an
/// endpoint that does not answer; an edge reconnecting to an endpoint that is restarting
/// should try again sooner, and the handshake's own retransmissions fit in far less.
pub async fn connect_within(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    within: Duration,
) -> Result<quinn::Connection, TransportError> {
    tokio::time::timeout(within, connect(endpoint, addr, server_name))
        .await
        .map_err(|_| TransportError::NoAnswer { addr, waited: within })?
}

/// Closes a connection with a refusal code and a human-readable reason.
pub fn close(conn: &quinn::Connection, code: RefusalCode, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    conn.close(code.close_code().into(), reason);
}

/// Closes a connection that did its work and waits, at most `limit`, until the
/// CONNECTION_CLOSE packet has left; not until the connection is drained, which is what
/// `Endpoint::wait_idle` waits for: three probe timeouts (about 0.6 s at 150 ms RTT) in
/// which nothing more can happen, and which a user would wait out after every command.
/// The packet must still leave: without it the peer holds the connection (and what it
/// keeps for it) until its idle timeout.
pub async fn close_and_flush(conn: &quinn::Connection, code: quinn::VarInt, reason: &[u8], limit: Duration) {
    let sent = conn.stats().udp_tx.datagrams;
    conn.close(code, reason);
    // Once closed, the only datagram a connection sends is its close. Counted when the
    // driver built it, under the lock it sends it under, so once seen it has left.
    let _ = tokio::time::timeout(limit, async {
        while conn.stats().udp_tx.datagrams == sent {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}
