//! `edge-agent link-test`: measures the path to a cloud endpoint over the
//! same QUIC port, TLS identity and trust as a migration, before one runs.
//!
//! ```text
//! probe stream  Request -> Accepted; Ping -> Pong (x N): RTT, jitter
//! upload        N uni streams of random bytes for --seconds; the cloud
//!               counts first..last byte; loss from this side's quinn stats
//! download      N bidi streams the edge opens, the cloud writes; counted
//!               here; loss from the cloud's stats in its result
//!               (N covers the path as a migration's data streams do:
//!               4 on a LAN, 16 at 150 ms)
//! at the end    quinn's smoothed RTT and path MTU (after discovery)
//! ```
//! The arithmetic (statistics, verdict, lift estimate) is in [`stats`] and
//! [`estimate`], without I/O.

pub mod estimate;
pub mod report;
pub mod stats;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gateway::chunk::{Sealer, DEFAULT_ZSTD_LEVEL};
use gateway::plan::DEFAULT_CHUNK_SIZE;
use gateway::transport::{self, ControlReader, ControlWriter, PathEstimate, TransportError, TransportTuning};
use gateway::wire::probe::{CloudProbe, EdgeProbe, PathReport, MAX_PROBE_STREAMS};
use gateway::wire::{Preamble, RefusalCode, StreamKind};
use ring::rand::{SecureRandom, SystemRandom};

use crate::source::{self, open_source_disk};
use crate::target::Target;
use report::{BulkLift, Direction, LinkReport, Mtu, VmReport};

/// Fewest pings: enough for a mean and a jitter worth printing.
pub const MIN_PINGS: u32 = 20;
/// Bytes per write of upload data.
const BLOCK: usize = 256 * 1024;
/// Pause between pings, so they sample the path over a moment rather than
/// one burst.
const PING_GAP: Duration = Duration::from_millis(10);
/// How often a phase's progress is sampled for its steady rate.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Longest wait for any single answer of the endpoint beyond the measured time.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What to measure.
#[derive(Debug, Clone)]
pub struct LinkTestOptions {
    /// Seconds of throughput measurement per direction.
    pub seconds: u32,
    /// Application pings (at least [`MIN_PINGS`]).
    pub pings: u32,
    /// Traffic streams per direction (1 to 16); `None` covers the path as a
    /// migration's data streams do ([`probe_streams`]).
    pub streams: Option<u8>,
    /// A VM (.vmx, .ovf, .ova) whose lift time to estimate on this link.
    pub vm: Option<PathBuf>,
    /// This agent's name in the endpoint's logs.
    pub agent: String,
    pub tuning: TransportTuning,
}

impl Default for LinkTestOptions {
    fn default() -> Self {
        LinkTestOptions {
            seconds: 5,
            pings: MIN_PINGS,
            streams: None,
            vm: None,
            agent: "edge-agent".into(),
            tuning: TransportTuning::default(),
        }
    }
}

/// Why a link test did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkTestError {
    /// Bad URL, trust options, certificate files or VM (as for `migrate`).
    #[error(transparent)]
    Setup(#[from] crate::MigrateError),
    #[error("{}", describe_refusal(*code, reason))]
    Refused { code: RefusalCode, reason: String },
    #[error("{0}")]
    Transport(TransportError),
    #[error("the cloud endpoint broke the link-test protocol: {0}; is it running the same version as this agent?")]
    Protocol(String),
    #[error("no answer from the cloud endpoint within {0} s while {1}; the path may have stalled")]
    Timeout(u64, &'static str),
    #[error("reading the VM's disks for the estimate failed: {0}; the source was not modified")]
    Read(String),
}

fn describe_refusal(code: RefusalCode, reason: &str) -> String {
    let head = match code {
        RefusalCode::Busy => "the cloud endpoint refused the link test as busy",
        RefusalCode::NotPermitted => "the cloud endpoint does not allow link tests",
        RefusalCode::ProtocolViolation => "the cloud endpoint reported a protocol violation",
        _ => "the cloud endpoint ended the link test",
    };
    format!("{head}: {reason}")
}

impl From<TransportError> for LinkTestError {
    fn from(e: TransportError) -> Self {
        // A close with one of our refusal codes is the endpoint's answer.
        if let TransportError::Connection(quinn::ConnectionError::ApplicationClosed(c)) = &e {
            if let Some(code) = RefusalCode::from_close_code(c.error_code.into_inner()) {
                return LinkTestError::Refused {
                    code,
                    reason: String::from_utf8_lossy(&c.reason).into_owned(),
                };
            }
        }
        LinkTestError::Transport(e)
    }
}

impl From<crate::source::SourceError> for LinkTestError {
    fn from(e: crate::source::SourceError) -> Self {
        LinkTestError::Setup(e.into())
    }
}

/// Runs a link test against `target` (its user and password are not used: the
/// edge certificate authenticates a link test, which touches nothing in the
/// cloud domain).
pub async fn run(target: &Target, opts: &LinkTestOptions) -> Result<LinkReport, LinkTestError> {
    // The VM first: a typo in its path should not cost a measurement.
    let vm = match &opts.vm {
        Some(path) => {
            let vm = source::open_vm(path)?;
            let (disks, share) = tokio::task::spawn_blocking({
                let vm = vm.clone();
                move || sample_vm(&vm)
            })
            .await
            .map_err(|e| LinkTestError::Read(e.to_string()))??;
            Some((vm.name, disks, share))
        }
        None => None,
    };

    // Of several endpoints, the first that answers is the one measured.
    let (endpoint, conn) = target.connect(&opts.tuning).await?;
    let addr = conn.remote_address();
    tracing::info!(endpoint = %addr, "connected for a link test");
    let result = measure(&conn, opts).await;
    match &result {
        Ok(_) => conn.close(0u32.into(), b"link test done"),
        Err(LinkTestError::Refused { .. }) => {}
        Err(e) => transport::close(&conn, RefusalCode::Aborted, &e.to_string()),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    let m = result?;

    // The rate a migration's transfer sees once its window is open: the
    // phase's first round trips climb from a cold start, which `migrate
    // --link-rate` skips (and the forecast counts apart, as its ramp).
    let upload_mbit_s = m.upload.steady_mbit_s;
    let vm = vm.map(|(name, disks, cpu_share)| {
        let link = estimate::LinkModel {
            upload_mbit_s,
            wire_overhead: m.wire_overhead,
            rtt: Duration::from_secs_f64(m.rtt.min_ms / 1e3),
            compression: crate::compression::Compression::default(),
        };
        let estimate = estimate::estimate_with_share(&disks, &link, estimate::CORES, cpu_share);
        VmReport { name, disks, estimate }
    });
    Ok(LinkReport {
        endpoint: m.endpoint,
        address: addr.to_string(),
        upload_secs: m.upload_secs,
        download_secs: m.download_secs,
        streams: m.streams,
        clamped: m.clamped,
        live_migration: stats::live_migration(&m.rtt, upload_mbit_s),
        bulk_lift: BulkLift {
            pass: true,
            secs_per_100_gib: report::secs_per_100_gib(upload_mbit_s),
        },
        rtt: m.rtt,
        quinn_smoothed_rtt_ms: m.smoothed_rtt.as_secs_f64() * 1e3,
        upload: m.upload,
        download: m.download,
        mtu: Mtu {
            udp_payload: m.mtu,
            ip_mtu: stats::ip_mtu(m.mtu, addr.is_ipv6()),
            ip_version: if addr.is_ipv6() { 6 } else { 4 },
        },
        wire_overhead: m.wire_overhead,
        vm,
    })
}

/// Traffic streams that cover a path of `rtt` as `migrate`'s data streams
/// do when the rate is not known yet ([`TransportTuning::for_path`] at
/// [`PathEstimate::DEFAULT`]'s 1 Gbit/s): each stream has at most a 1.25 MB
/// window in flight, so four streams cap a 150 ms path at ~266 Mbit/s, less
/// than a migration reaches there.
pub fn probe_streams(rtt: Duration) -> u8 {
    let tuning = TransportTuning::for_path(PathEstimate {
        rtt,
        ..PathEstimate::DEFAULT
    });
    tuning.data_streams.clamp(1, usize::from(MAX_PROBE_STREAMS)) as u8
}

/// Samples every disk of `vm` as [`estimate::sample_disk`] does; and the
/// share of the cores sealing gets on this machine now
/// ([`estimate::parallel_share`], on a few of the first disk's data chunks).
fn sample_vm(vm: &source::SourceVm) -> Result<(Vec<estimate::DiskSample>, f64), LinkTestError> {
    let mut sealer = Sealer::new(DEFAULT_ZSTD_LEVEL).map_err(|e| LinkTestError::Read(e.to_string()))?;
    let mut out = Vec::with_capacity(vm.disks.len());
    let mut calibration = Vec::new();
    // Every level `migrate --zstd-level auto` may choose.
    let levels: Vec<i32> = match crate::compression::Compression::default() {
        crate::compression::Compression::Adaptive { min, max } => (min..=max).collect(),
        crate::compression::Compression::Fixed(l) => vec![l],
    };
    for d in &vm.disks {
        let reader = open_source_disk(d)?;
        let sample = estimate::sample_disk(
            &d.key,
            reader.as_ref(),
            u64::from(DEFAULT_CHUNK_SIZE),
            estimate::MAX_SAMPLES,
            &mut sealer,
            &levels,
            estimate::LEVEL_SAMPLES,
        )
        .map_err(|e| LinkTestError::Read(format!("{}: {e}", d.path.display())))?;
        if calibration.is_empty() {
            calibration = calibration_chunks(reader.as_ref(), &sample);
        }
        out.push(sample);
    }
    let share = estimate::parallel_share(&calibration, DEFAULT_ZSTD_LEVEL, estimate::CORES);
    Ok((out, share))
}

/// Up to 8 non-zero chunks of a sampled disk, spread over it, to seal on all
/// cores at once.
fn calibration_chunks(disk: &dyn source::DiskReader, s: &estimate::DiskSample) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    for index in estimate::sample_indexes(s.chunks, estimate::MAX_SAMPLES) {
        if chunks.len() == 8 {
            break;
        }
        let offset = index * s.chunk_size;
        let len = s.chunk_size.min(s.capacity - offset);
        if disk.is_hole(offset, len) {
            continue;
        }
        let mut buf = vec![0; len as usize];
        if disk.read_at(offset, &mut buf).is_err() || gateway::chunk::is_zero(&buf) {
            continue;
        }
        chunks.push(buf);
    }
    chunks
}

/// What the connection measured, before the verdicts.
struct Measured {
    endpoint: String,
    upload_secs: u32,
    download_secs: u32,
    streams: u8,
    clamped: Vec<String>,
    rtt: stats::RttStats,
    smoothed_rtt: Duration,
    upload: Direction,
    download: Direction,
    mtu: u16,
    wire_overhead: f64,
}

/// The probe stream: framed like the control stream.
struct Probe {
    writer: ControlWriter,
    reader: ControlReader,
}

impl Probe {
    async fn open(conn: &quinn::Connection) -> Result<Probe, LinkTestError> {
        let (mut send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
        send.write_all(&Preamble::new(StreamKind::Probe).encode())
            .await
            .map_err(write_error)?;
        Ok(Probe {
            writer: ControlWriter::open(send, false).await?,
            reader: ControlReader::open(recv, false).await?,
        })
    }

    async fn send(&mut self, msg: &EdgeProbe) -> Result<(), LinkTestError> {
        Ok(self.writer.send(msg).await?)
    }

    async fn recv(&mut self, timeout: Duration, doing: &'static str) -> Result<CloudProbe, LinkTestError> {
        match tokio::time::timeout(timeout, self.reader.recv::<CloudProbe>()).await {
            Err(_) => Err(LinkTestError::Timeout(timeout.as_secs(), doing)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Some(msg))) => Ok(msg),
            Ok(Ok(None)) => Err(LinkTestError::Protocol(format!("the probe stream ended while {doing}"))),
        }
    }
}

fn write_error(e: quinn::WriteError) -> LinkTestError {
    match e {
        quinn::WriteError::ConnectionLost(c) => TransportError::Connection(c).into(),
        other => LinkTestError::Protocol(format!("a stream was refused: {other}")),
    }
}

fn unexpected(msg: &CloudProbe, doing: &str) -> LinkTestError {
    LinkTestError::Protocol(format!("unexpected {msg:?} while {doing}"))
}

async fn measure(conn: &quinn::Connection, opts: &LinkTestOptions) -> Result<Measured, LinkTestError> {
    let mut probe = Probe::open(conn).await?;
    // The handshake's round trip sizes the streams: the pings come after the
    // request that names them.
    let streams = opts.streams.unwrap_or_else(|| probe_streams(conn.rtt()));
    probe
        .send(&EdgeProbe::Request {
            agent: opts.agent.clone(),
            upload_secs: opts.seconds,
            download_secs: opts.seconds,
            streams,
        })
        .await?;
    let (endpoint, upload_secs, download_secs, streams, clamped) = match probe
        .recv(ANSWER_TIMEOUT, "waiting for the link test to be accepted")
        .await?
    {
        CloudProbe::Accepted {
            endpoint,
            upload_secs,
            download_secs,
            streams,
            clamped,
        } => (endpoint, upload_secs, download_secs, streams, clamped),
        other => return Err(unexpected(&other, "waiting for the link test to be accepted")),
    };
    if streams == 0 || streams > MAX_PROBE_STREAMS {
        return Err(LinkTestError::Protocol(format!(
            "the endpoint granted {streams} streams"
        )));
    }

    // RTT: sequential pings, each echoed at once by the endpoint.
    let base = Instant::now();
    let mut rtts = Vec::with_capacity(opts.pings.max(MIN_PINGS) as usize);
    for seq in 0..opts.pings.max(MIN_PINGS) {
        let sent_micros = base.elapsed().as_micros() as u64;
        probe.send(&EdgeProbe::Ping { seq, sent_micros }).await?;
        match probe.recv(ANSWER_TIMEOUT, "waiting for a ping's echo").await? {
            CloudProbe::Pong { seq: s, sent_micros: t } if s == seq && t == sent_micros => {
                rtts.push(base.elapsed().saturating_sub(Duration::from_micros(t)));
            }
            other => return Err(unexpected(&other, "waiting for a ping's echo")),
        }
        tokio::time::sleep(PING_GAP).await;
    }
    let rtt = stats::rtt_stats(&rtts).expect("at least MIN_PINGS pings");

    // Upload: the endpoint counts; this side's stats give the losses.
    let before = conn.stats();
    // Random bytes: nothing on the path (a WAN optimizer, a compressing VPN)
    // can make them smaller, so the rate is the link's.
    let mut block = vec![0u8; BLOCK];
    SystemRandom::new()
        .fill(&mut block)
        .map_err(|_| LinkTestError::Protocol("the system random source failed".into()))?;
    let block: Arc<[u8]> = block.into();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(upload_secs.into());
    // What this side sent (less what was lost) while the streams were full:
    // the rate over the phase's second half, past the cold start.
    let sampler = tokio::spawn({
        let conn = conn.clone();
        async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            while Instant::now() < deadline {
                tick.tick().await;
                let s = conn.stats();
                samples.push((Instant::now(), s.udp_tx.bytes.saturating_sub(s.path.lost_bytes)));
            }
            samples
        }
    });
    let mut writers = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let mut send = conn.open_uni().await.map_err(TransportError::from)?;
        let block = block.clone();
        writers.spawn(async move {
            send.write_all(&Preamble::new(StreamKind::ProbeData).encode()).await?;
            while Instant::now() < deadline {
                send.write_all(&block).await?;
            }
            let _ = send.finish();
            // Until the endpoint acknowledged everything: then the phase's
            // losses are counted.
            let _ = send.stopped().await;
            Ok::<_, quinn::WriteError>(())
        });
    }
    let answer = probe
        .recv(
            Duration::from_secs(upload_secs.into()) + ANSWER_TIMEOUT,
            "waiting for the upload's result",
        )
        .await;
    // A stream the endpoint stopped for running late is not an error.
    while let Some(r) = writers.join_next().await {
        match r {
            Ok(Ok(())) | Ok(Err(quinn::WriteError::Stopped(_))) => {}
            Ok(Err(e)) => return Err(write_error(e)),
            Err(e) => return Err(LinkTestError::Protocol(e.to_string())),
        }
    }
    let (up_bytes, up_micros, cut) = match answer? {
        CloudProbe::UploadResult { bytes, micros, cut } => (bytes, micros, cut),
        other => return Err(unexpected(&other, "waiting for the upload's result")),
    };
    let after = conn.stats();
    let up_sent = after.path.sent_packets.saturating_sub(before.path.sent_packets);
    let up_lost = after.path.lost_packets.saturating_sub(before.path.lost_packets);
    let udp_bytes = after.udp_tx.bytes.saturating_sub(before.udp_tx.bytes);
    let wire_overhead = if up_bytes > 0 {
        udp_bytes as f64 / up_bytes as f64
    } else {
        1.0
    };
    let up_samples = sampler.await.map_err(|e| LinkTestError::Protocol(e.to_string()))?;
    // Stream bytes per delivered UDP byte over the whole phase converts the
    // second half's UDP rate to stream goodput.
    let delivered = udp_bytes.saturating_sub(after.path.lost_bytes.saturating_sub(before.path.lost_bytes));
    let stream_share = if delivered > 0 {
        up_bytes as f64 / delivered as f64
    } else {
        1.0
    };
    let up_steady = stats::steady_mbit_s(&up_samples, started).map(|r| r * stream_share.min(1.0));
    let upload = direction(up_bytes, up_micros, up_sent, up_lost, cut, up_steady);

    // Download: the endpoint writes on bidi streams this side opens (the edge
    // accepts no streams); counted here, losses from the endpoint's stats.
    probe.send(&EdgeProbe::DownloadStart).await?;
    let counted = Arc::new(Counted::default());
    let down_started = Instant::now();
    let down_deadline = down_started + Duration::from_secs(download_secs.into());
    let down_sampler = tokio::spawn({
        let counted = counted.clone();
        async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            while Instant::now() < down_deadline {
                tick.tick().await;
                samples.push((Instant::now(), counted.total().0));
            }
            samples
        }
    });
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (mut send, mut recv) = conn.open_bi().await.map_err(TransportError::from)?;
        send.write_all(&Preamble::new(StreamKind::ProbeData).encode())
            .await
            .map_err(write_error)?;
        let _ = send.finish();
        let counted = counted.clone();
        readers.spawn(async move {
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                counted.add(chunk.bytes.len() as u64);
            }
            Ok::<_, quinn::ReadError>(())
        });
    }
    let answer = probe
        .recv(
            Duration::from_secs(download_secs.into()) + ANSWER_TIMEOUT,
            "waiting for the download's result",
        )
        .await?;
    while let Some(r) = readers.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(quinn::ReadError::ConnectionLost(c))) => return Err(TransportError::Connection(c).into()),
            Ok(Err(e)) => return Err(LinkTestError::Protocol(format!("a download stream failed: {e}"))),
            Err(e) => return Err(LinkTestError::Protocol(e.to_string())),
        }
    }
    let path: PathReport = match answer {
        CloudProbe::DownloadResult { path, .. } => path,
        other => return Err(unexpected(&other, "waiting for the download's result")),
    };
    let (down_bytes, down_micros) = counted.total();
    let down_samples = down_sampler.await.map_err(|e| LinkTestError::Protocol(e.to_string()))?;
    let down_steady = stats::steady_mbit_s(&down_samples, down_started);
    let download = direction(
        down_bytes,
        down_micros,
        path.sent_packets,
        path.lost_packets,
        false,
        down_steady,
    );

    probe.send(&EdgeProbe::Done).await?;
    probe.writer.finish();
    let end = conn.stats();
    Ok(Measured {
        endpoint,
        upload_secs,
        download_secs,
        streams,
        clamped,
        rtt,
        smoothed_rtt: conn.rtt(),
        upload,
        download,
        mtu: end.path.current_mtu,
        wire_overhead,
    })
}

/// `steady_mbit_s`: the rate over the phase's second half, if it could be
/// sampled; else the whole phase's.
fn direction(bytes: u64, micros: u64, sent: u64, lost: u64, cut: bool, steady_mbit_s: Option<f64>) -> Direction {
    let mbit_s = stats::mbit_per_s(bytes, micros);
    Direction {
        bytes,
        secs: micros as f64 / 1e6,
        mbit_s,
        steady_mbit_s: steady_mbit_s.filter(|r| r.is_finite() && *r > 0.0).unwrap_or(mbit_s),
        sent_packets: sent,
        lost_packets: lost,
        loss_percent: stats::loss_percent(lost, sent),
        cut,
    }
}

/// Bytes received on several streams, from the first to the last byte.
#[derive(Debug, Default)]
struct Counted {
    first: OnceLock<Instant>,
    last_and_bytes: Mutex<(Option<Instant>, u64)>,
}

impl Counted {
    fn add(&self, n: u64) {
        let now = Instant::now();
        self.first.get_or_init(|| now);
        let mut g = self.last_and_bytes.lock().expect("counter lock");
        g.0 = Some(now);
        g.1 += n;
    }

    fn total(&self) -> (u64, u64) {
        let g = self.last_and_bytes.lock().expect("counter lock");
        let micros = match (self.first.get(), g.0) {
            (Some(first), Some(last)) => last.duration_since(*first).as_micros() as u64,
            _ => 0,
        };
        (g.1, micros)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_streams_cover_the_path_as_a_migration_does() {
        // A LAN: the fewest a migration opens.
        assert_eq!(probe_streams(Duration::from_micros(300)), 4);
        // 150 ms: 16 x 1.25 MB a round trip is ~1 Gbit/s; 4 held it to ~266 Mbit/s.
        assert_eq!(probe_streams(Duration::from_millis(150)), MAX_PROBE_STREAMS);
        // 40 ms at 1 Gbit/s: 5 MB in flight, 3 x that over 1.25 MB windows, plus one.
        assert_eq!(probe_streams(Duration::from_millis(40)), 13);
    }
}
