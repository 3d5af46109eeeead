//! The cloud side of `edge-agent link-test`: tells a link test from a
//! migration by the first stream's preamble, then answers pings, counts the
//! upload and writes the download, within the `[link_test]` limits.
//!
//! A link test never touches the inventory or the datastore; it is
//! authenticated by the edge certificate alone (the TLS handshake), and limited
//! per endpoint (`max_concurrent`), per edge certificate (`tests_per_minute`)
//! and per request (`max_seconds`, clamped and said so).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gateway::transport::{self, ControlReader, ControlWriter, TransportError};
use gateway::wire::probe::{CloudProbe, EdgeProbe, PathReport, MAX_PINGS, MAX_PROBE_STREAMS};
use gateway::wire::{Preamble, RefusalCode, StreamKind, PREAMBLE_LEN};
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tracing::Instrument;

use crate::config::LinkTestConfig;

/// An upload stream still sending this long after the granted time is stopped.
const UPLOAD_GRACE: Duration = Duration::from_secs(2);
/// Beyond the granted seconds, time a whole link test may take (handshake
/// done): pings, waiting for acknowledgements, slow links.
const SLACK: Duration = Duration::from_secs(60);
/// Bytes per write of download data.
const BLOCK: usize = 256 * 1024;

/// The first bidirectional stream of a connection, its preamble read.
#[derive(Debug)]
pub(super) enum FirstStream {
    Migration(quinn::SendStream, quinn::RecvStream),
    LinkTest(quinn::SendStream, quinn::RecvStream),
    LiveMigration(quinn::SendStream, quinn::RecvStream),
}

/// Accepts the first bidirectional stream and reads its preamble within `timeout` (the
/// Hello timeout: the first stream comes before the Hello). `None` when the connection
/// ended or was closed here for a protocol violation.
pub(super) async fn first_stream(conn: &quinn::Connection, timeout: Duration) -> Option<FirstStream> {
    let first = async {
        let (send, mut recv) = conn.accept_bi().await.map_err(TransportError::from)?;
        let mut b = [0u8; PREAMBLE_LEN];
        recv.read_exact(&mut b).await.map_err(|e| match e {
            quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => TransportError::Connection(c),
            _ => TransportError::StreamClosed,
        })?;
        Ok::<_, TransportError>((Preamble::decode(&b)?.kind, send, recv))
    };
    let why = match tokio::time::timeout(timeout, first).await {
        Ok(Ok((StreamKind::Control, send, recv))) => return Some(FirstStream::Migration(send, recv)),
        Ok(Ok((StreamKind::Probe, send, recv))) => return Some(FirstStream::LinkTest(send, recv)),
        Ok(Ok((StreamKind::Live, send, recv))) => return Some(FirstStream::LiveMigration(send, recv)),
        Ok(Ok((kind, _, _))) => format!("the first stream is a {kind:?} stream, not a control, live or probe stream"),
        Ok(Err(TransportError::Connection(_))) => return None,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!(
            "no control stream within {} s (transport.hello_timeout_secs)",
            timeout.as_secs()
        ),
    };
    transport::close(conn, RefusalCode::ProtocolViolation, &why);
    None
}

/// The SHA-256 thumbprint of the edge's certificate: who a budget belongs to.
pub(super) fn edge_thumbprint(conn: &quinn::Connection) -> Option<String> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| certs::Thumbprint::of_der(c).to_string()))
}

/// What a link test is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub upload_secs: u32,
    pub download_secs: u32,
    pub streams: u8,
    /// One sentence per request that was cut, naming the setting.
    pub clamped: Vec<String>,
}

/// Clamps a request to the endpoint's limits.
pub(crate) fn grant(upload_secs: u32, download_secs: u32, streams: u8, max_seconds: u32) -> Grant {
    let mut clamped = Vec::new();
    let mut secs = |what: &str, asked: u32| {
        let granted = asked.clamp(1, max_seconds.max(1));
        if granted != asked {
            clamped.push(format!(
                "{what} of {asked} s clamped to {granted} s (this endpoint's link_test.max_seconds is {max_seconds})"
            ));
        }
        granted
    };
    let upload_secs = secs("upload", upload_secs);
    let download_secs = secs("download", download_secs);
    let granted_streams = streams.clamp(1, MAX_PROBE_STREAMS);
    if granted_streams != streams {
        clamped.push(format!(
            "{streams} streams clamped to {granted_streams} (1 to {MAX_PROBE_STREAMS}, as a migration uses)"
        ));
    }
    Grant {
        upload_secs,
        download_secs,
        streams: granted_streams,
        clamped,
    }
}

/// Link tests started per client over the last minute. Time is passed in.
#[derive(Debug)]
pub(crate) struct ClientBudget {
    per_minute: u32,
    starts: HashMap<String, VecDeque<Instant>>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl ClientBudget {
    pub(crate) fn new(per_minute: u32) -> Self {
        ClientBudget {
            per_minute,
            starts: HashMap::new(),
        }
    }

    /// Records a start for `client`, or says how long until one is allowed.
    pub(crate) fn try_start(&mut self, client: &str, now: Instant) -> Result<(), Duration> {
        // Forget every client whose minute has passed, so the map holds only
        // the clients of the last minute.
        self.starts.retain(|_, starts| {
            while starts
                .front()
                .is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW)
            {
                starts.pop_front();
            }
            !starts.is_empty()
        });
        let starts = self.starts.entry(client.to_owned()).or_default();
        if starts.len() >= self.per_minute as usize {
            let oldest = *starts.front().expect("at least per_minute >= 1 entries");
            return Err(WINDOW.saturating_sub(now.saturating_duration_since(oldest)));
        }
        starts.push_back(now);
        Ok(())
    }
}

/// The endpoint's link-test limits and what is running against them.
#[derive(Debug)]
pub(super) struct LinkTests {
    config: LinkTestConfig,
    running: Arc<Semaphore>,
    budget: Mutex<ClientBudget>,
}

/// Why a link test ended early, and the code the connection is closed with.
struct Failure(RefusalCode, String);

impl From<TransportError> for Failure {
    fn from(e: TransportError) -> Self {
        Failure(RefusalCode::ProtocolViolation, e.to_string())
    }
}

fn violation(what: impl Into<String>) -> Failure {
    Failure(RefusalCode::ProtocolViolation, what.into())
}

impl LinkTests {
    pub(super) fn new(config: LinkTestConfig) -> Self {
        LinkTests {
            running: Arc::new(Semaphore::new(config.max_concurrent as usize)),
            budget: Mutex::new(ClientBudget::new(config.tests_per_minute)),
            config,
        }
    }

    /// Serves one link test on a connection whose first stream was a probe stream.
    pub(super) async fn serve(
        &self,
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        endpoint: &str,
    ) {
        let peer = conn.remote_address();
        let client = edge_thumbprint(&conn).unwrap_or_else(|| peer.ip().to_string());
        let span = tracing::info_span!("link_test", %peer);
        async move {
            let refuse = |code, why: String| {
                tracing::warn!(reason = ?why, "link test refused");
                transport::close(&conn, code, &why);
            };
            if !self.config.enabled {
                return refuse(
                    RefusalCode::NotPermitted,
                    "link tests are disabled on this cloud endpoint (link_test.enabled = false); \
                     ask its operator to enable them"
                        .into(),
                );
            }
            let Ok(_running) = self.running.clone().try_acquire_owned() else {
                return refuse(
                    RefusalCode::Busy,
                    format!(
                        "the cloud endpoint is already running its limit of {} link tests (link_test.max_concurrent); \
                         retry in a minute",
                        self.config.max_concurrent
                    ),
                );
            };
            let budget = self
                .budget
                .lock()
                .expect("budget lock")
                .try_start(&client, Instant::now());
            if let Err(wait) = budget {
                return refuse(
                    RefusalCode::Busy,
                    format!(
                        "this edge certificate started {} link tests in the last minute, this endpoint's limit \
                         (link_test.tests_per_minute); retry in {} s",
                        self.config.tests_per_minute,
                        wait.as_secs().max(1)
                    ),
                );
            }
            tracing::info!(edge_cert = %client, "link test started");
            let limit = Duration::from_secs(2 * u64::from(self.config.max_seconds)) + SLACK;
            let outcome = tokio::time::timeout(limit, respond(&conn, send, recv, &self.config, endpoint)).await;
            match outcome {
                Ok(Ok(())) => {
                    tracing::info!("link test done");
                    // The edge closes once it has its results; close anyway
                    // if it lingers.
                    if tokio::time::timeout(Duration::from_secs(5), conn.closed())
                        .await
                        .is_err()
                    {
                        conn.close(0u32.into(), b"link test done");
                    }
                }
                Ok(Err(Failure(code, why))) => {
                    tracing::warn!(reason = ?why, "link test failed");
                    transport::close(&conn, code, &why);
                }
                Err(_) => refuse(
                    RefusalCode::ProtocolViolation,
                    format!("the link test took longer than {} s", limit.as_secs()),
                ),
            }
        }
        .instrument(span)
        .await
    }
}

async fn respond(
    conn: &quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    config: &LinkTestConfig,
    endpoint: &str,
) -> Result<(), Failure> {
    let mut reader = ControlReader::open(recv, false).await?;
    let mut writer = ControlWriter::open(send, false).await?;
    let request = tokio::time::timeout(Duration::from_secs(10), reader.recv::<EdgeProbe>())
        .await
        .map_err(|_| violation("no link-test request within 10 s"))??;
    let Some(EdgeProbe::Request {
        agent,
        upload_secs,
        download_secs,
        streams,
    }) = request
    else {
        return Err(violation("the probe stream must start with a link-test request"));
    };
    let g = grant(upload_secs, download_secs, streams, config.max_seconds);
    tracing::info!(
        %agent,
        upload_secs = g.upload_secs,
        download_secs = g.download_secs,
        streams = g.streams,
        clamped = ?g.clamped,
        "link test granted"
    );
    writer
        .send(&CloudProbe::Accepted {
            endpoint: endpoint.to_owned(),
            upload_secs: g.upload_secs,
            download_secs: g.download_secs,
            streams: g.streams,
            clamped: g.clamped.clone(),
        })
        .await?;

    // Reads are not cancel-safe, so one task reads and the loop below selects
    // over its messages and the traffic tasks.
    let (tx, mut messages) = mpsc::channel(16);
    let read_task = tokio::spawn(async move {
        loop {
            let msg = reader.recv::<EdgeProbe>().await;
            let end = !matches!(msg, Ok(Some(_)));
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    let _abort_reader = AbortOnDrop(read_task);
    let mut upload = Some(tokio::spawn(upload(conn.clone(), g.streams, g.upload_secs)));
    let mut download = None;
    let mut download_started = false;
    let mut results_sent = false;
    let mut pings = 0u32;
    loop {
        tokio::select! {
            msg = messages.recv() => match msg {
                None | Some(Ok(None)) | Some(Ok(Some(EdgeProbe::Done))) => return Ok(()),
                // The edge may close as soon as it has every result, before
                // its Done arrives: that is the normal end.
                Some(Err(TransportError::Connection(quinn::ConnectionError::ApplicationClosed(c))))
                    if results_sent && c.error_code == 0u32.into() => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Some(EdgeProbe::Ping { seq, sent_micros }))) => {
                    pings += 1;
                    if pings > MAX_PINGS {
                        return Err(violation(format!("more than {MAX_PINGS} pings in one link test")));
                    }
                    writer.send(&CloudProbe::Pong { seq, sent_micros }).await?;
                }
                Some(Ok(Some(EdgeProbe::DownloadStart))) => {
                    if upload.is_some() || download_started {
                        return Err(violation("download asked for before the upload ended, or twice"));
                    }
                    download_started = true;
                    download = Some(tokio::spawn(download_phase(conn.clone(), g.streams, g.download_secs)));
                }
                Some(Ok(Some(EdgeProbe::Request { .. }))) => return Err(violation("a second link-test request")),
            },
            result = async { upload.as_mut().expect("guarded").await }, if upload.is_some() => {
                upload = None;
                let (bytes, micros, cut) = result.map_err(|e| violation(e.to_string()))??;
                tracing::info!(bytes, micros, cut, "upload measured");
                writer.send(&CloudProbe::UploadResult { bytes, micros, cut }).await?;
            }
            result = async { download.as_mut().expect("guarded").await }, if download.is_some() => {
                download = None;
                let (bytes, micros, path) = result.map_err(|e| violation(e.to_string()))??;
                tracing::info!(bytes, micros, lost = path.lost_packets, sent = path.sent_packets, "download sent");
                writer.send(&CloudProbe::DownloadResult { bytes, micros, path }).await?;
                results_sent = true;
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_probe_preamble(recv: &mut quinn::RecvStream) -> Result<(), Failure> {
    let mut b = [0u8; PREAMBLE_LEN];
    recv.read_exact(&mut b)
        .await
        .map_err(|e| violation(format!("link-test stream ended before its preamble: {e}")))?;
    match Preamble::decode(&b).map_err(TransportError::from)?.kind {
        StreamKind::ProbeData => Ok(()),
        other => Err(violation(format!(
            "a {other:?} stream where link-test traffic was expected"
        ))),
    }
}

/// Byte counts of several streams: first and last byte over all of them.
#[derive(Default)]
struct Span {
    first: OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
}

/// Counts what the edge sends on `streams` unidirectional streams. Returns
/// bytes, microseconds from the first to the last byte, and whether streams
/// were stopped for running past the granted time.
async fn upload(conn: quinn::Connection, streams: u8, secs: u32) -> Result<(u64, u64, bool), Failure> {
    let span = Arc::new(Span::default());
    let limit = Duration::from_secs(secs.into()) + UPLOAD_GRACE;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut recv = conn.accept_uni().await.map_err(TransportError::from)?;
        let span = span.clone();
        tasks.spawn(async move {
            read_probe_preamble(&mut recv).await?;
            let mut bytes = 0u64;
            loop {
                match recv.read_chunk(usize::MAX, true).await {
                    Ok(Some(chunk)) => {
                        let now = Instant::now();
                        let first = *span.first.get_or_init(|| now);
                        bytes += chunk.bytes.len() as u64;
                        *span.last.lock().expect("span lock") = Some(now);
                        if now.duration_since(first) > limit {
                            let _ = recv.stop(RefusalCode::Busy.close_code().into());
                            return Ok((bytes, true));
                        }
                    }
                    Ok(None) => return Ok((bytes, false)),
                    Err(e) => return Err(violation(format!("upload stream failed: {e}"))),
                }
            }
        });
    }
    let (mut bytes, mut cut) = (0, false);
    while let Some(r) = tasks.join_next().await {
        let (b, c) = r.map_err(|e| violation(e.to_string()))??;
        bytes += b;
        cut |= c;
    }
    let micros = match (span.first.get(), *span.last.lock().expect("span lock")) {
        (Some(first), Some(last)) => last.duration_since(*first).as_micros() as u64,
        _ => 0,
    };
    Ok((bytes, micros, cut))
}

/// Writes incompressible bytes for `secs` on the send halves of `streams`
/// bidirectional streams the edge opens, and reports this side's path
/// statistics over the phase: the sender is the side that sees the losses.
async fn download_phase(conn: quinn::Connection, streams: u8, secs: u32) -> Result<(u64, u64, PathReport), Failure> {
    let before = conn.stats();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs.into());
    let mut block = vec![0u8; BLOCK];
    rand::rng().fill(&mut block[..]);
    let block: Arc<[u8]> = block.into();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(TransportError::from)?;
        let block = block.clone();
        tasks.spawn(async move {
            read_probe_preamble(&mut recv).await?;
            let mut bytes = 0u64;
            while Instant::now() < deadline {
                send.write_all(&block)
                    .await
                    .map_err(|e| violation(format!("download stream failed: {e}")))?;
                bytes += block.len() as u64;
            }
            let _ = send.finish();
            // Wait until the edge acknowledged everything, so the losses of
            // the phase are known when the statistics are read.
            let _ = send.stopped().await;
            Ok::<_, Failure>(bytes)
        });
    }
    let mut bytes = 0;
    while let Some(r) = tasks.join_next().await {
        bytes += r.map_err(|e| violation(e.to_string()))??;
    }
    let after = conn.stats();
    let path = PathReport {
        sent_packets: after.path.sent_packets.saturating_sub(before.path.sent_packets),
        lost_packets: after.path.lost_packets.saturating_sub(before.path.lost_packets),
        lost_bytes: after.path.lost_bytes.saturating_sub(before.path.lost_bytes),
        congestion_events: after
            .path
            .congestion_events
            .saturating_sub(before.path.congestion_events),
        rtt_micros: conn.rtt().as_micros() as u64,
        current_mtu: after.path.current_mtu,
    };
    Ok((bytes, start.elapsed().as_micros() as u64, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_within_limits_are_granted_as_asked() {
        let g = grant(5, 7, 4, 10);
        assert_eq!(
            g,
            Grant {
                upload_secs: 5,
                download_secs: 7,
                streams: 4,
                clamped: vec![]
            }
        );
    }

    #[test]
    fn requests_beyond_limits_are_clamped_and_say_so() {
        let g = grant(60, 0, 40, 10);
        assert_eq!((g.upload_secs, g.download_secs, g.streams), (10, 1, 16));
        assert_eq!(g.clamped.len(), 3, "{:?}", g.clamped);
        assert!(
            g.clamped[0].contains("upload of 60 s clamped to 10 s"),
            "{:?}",
            g.clamped
        );
        assert!(g.clamped[0].contains("link_test.max_seconds"), "{:?}", g.clamped);
        assert!(g.clamped[2].contains("40 streams clamped to 16"), "{:?}", g.clamped);
    }

    #[test]
    fn each_client_gets_its_own_budget_per_minute() {
        let t0 = Instant::now();
        let mut b = ClientBudget::new(2);
        assert!(b.try_start("A", t0).is_ok());
        assert!(b.try_start("A", t0 + Duration::from_secs(10)).is_ok());
        let wait = b.try_start("A", t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        // Refused attempts do not count; another client is not affected.
        assert!(b.try_start("B", t0 + Duration::from_secs(20)).is_ok());
        // A minute after the first start, one more is allowed.
        assert!(b.try_start("A", t0 + Duration::from_secs(60)).is_ok());
        assert!(b.try_start("A", t0 + Duration::from_secs(61)).is_err());
        // Clients of past minutes are forgotten.
        assert!(b.try_start("C", t0 + Duration::from_secs(200)).is_ok());
        assert_eq!(b.starts.len(), 1);
    }
}
