//! The agent's own Prometheus metrics while a migration runs (`--metrics-listen ADDR`):
//! bytes read and sent, progress, rate, ETA, the link (RTT, loss, congestion window)
//! and reconnects. docs/operations.md lists them.
//!
//! They follow the progress samples the migration already takes for its progress bar
//! ([`MetricsSink`] wraps the bar's sink), so nothing in the transfer path changes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{Encoder as _, Gauge, IntCounter, IntGauge, Opts, Registry, TextEncoder};

use crate::report::{Progress, ProgressSink};

const NAMESPACE: &str = "edge_agent";

/// The content type of the exposition text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric of the agent, in a registry of its own.
#[derive(Debug)]
pub struct EdgeMetrics {
    registry: Registry,
    read_bytes: IntCounter,
    sent_bytes: IntCounter,
    wire_bytes: IntCounter,
    done_bytes: IntGauge,
    total_bytes: IntGauge,
    rate: Gauge,
    eta: Gauge,
    rtt: Gauge,
    lost_packets: IntGauge,
    sent_packets: IntGauge,
    cwnd: IntGauge,
    reconnects: IntCounter,
    memory_transferred: IntGauge,
    memory_remaining: IntGauge,
    /// The last sample, for the rate.
    last: Mutex<Option<(Instant, u64, f64)>>,
    /// The running totals (read, sent, wire) as last seen, for the counters.
    totals: Mutex<[u64; 3]>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How much of the rate each second of samples makes (an exponential moving average
/// over about five seconds).
const RATE_WEIGHT_PER_SECOND: f64 = 0.2;

impl EdgeMetrics {
    pub fn new() -> EdgeMetrics {
        let registry = Registry::new();
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone()))
                .expect("metric names are unique and valid");
            m
        }
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::with_opts(opts(name, help)).expect("valid"));
        let int_gauge = |name: &str, help: &str| reg(&registry, IntGauge::with_opts(opts(name, help)).expect("valid"));
        let gauge = |name: &str, help: &str| reg(&registry, Gauge::with_opts(opts(name, help)).expect("valid"));
        EdgeMetrics {
            read_bytes: counter("read_bytes_total", "Bytes read from the source disks."),
            sent_bytes: counter(
                "sent_bytes_total",
                "Plaintext bytes of the data chunks sent, repeats included.",
            ),
            wire_bytes: counter(
                "wire_sent_bytes_total",
                "UDP bytes sent to the endpoint (after compression and encryption, QUIC framing included).",
            ),
            done_bytes: int_gauge(
                "done_bytes",
                "Logical bytes of the migration done: written in the cloud or known to be zero.",
            ),
            total_bytes: int_gauge("total_bytes", "Logical bytes of the migration's disks."),
            rate: gauge(
                "rate_bytes_per_second",
                "Logical bytes per second the migration gets done (over the last seconds).",
            ),
            eta: gauge(
                "eta_seconds",
                "Seconds until the migration's bytes are all done at the current rate.",
            ),
            rtt: gauge("link_rtt_seconds", "Smoothed round-trip time to the endpoint."),
            lost_packets: int_gauge(
                "link_lost_packets",
                "Packets sent on the current connection and declared lost.",
            ),
            sent_packets: int_gauge("link_sent_packets", "Packets sent on the current connection."),
            cwnd: int_gauge(
                "link_congestion_window_bytes",
                "Congestion window of the current connection.",
            ),
            reconnects: counter(
                "reconnects_total",
                "Times the agent reconnected to resume after the link was lost.",
            ),
            memory_transferred: int_gauge(
                "live_memory_transferred_bytes",
                "Live migration: memory bytes QEMU has sent so far.",
            ),
            memory_remaining: int_gauge(
                "live_memory_remaining_bytes",
                "Live migration: memory bytes QEMU still has to send in this pass.",
            ),
            registry,
            last: Mutex::new(None),
            totals: Mutex::new([0; 3]),
        }
    }

    /// Moves the counters by what the running totals grew. A total that went down
    /// started again (a new connection's wire bytes, a new replication pass): all of it
    /// is new.
    fn totals(&self, now: [u64; 3]) {
        let mut seen = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        for ((counter, before), now) in [&self.read_bytes, &self.sent_bytes, &self.wire_bytes]
            .into_iter()
            .zip(seen.iter_mut())
            .zip(now)
        {
            counter.inc_by(if now >= *before { now - *before } else { now });
            *before = now;
        }
    }

    /// Logical progress: `done` of `total` bytes; updates the rate and ETA.
    pub fn progress(&self, done: u64, total: u64) {
        self.done_bytes.set(i64::try_from(done).unwrap_or(i64::MAX));
        self.total_bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let rate = match *last {
            Some((then, before, rate)) => {
                let secs = now.duration_since(then).as_secs_f64();
                if secs > 0.0 {
                    let current = done.saturating_sub(before) as f64 / secs;
                    rate + (current - rate) * (RATE_WEIGHT_PER_SECOND * secs).min(1.0)
                } else {
                    rate
                }
            }
            None => 0.0,
        };
        *last = Some((now, done, rate));
        self.rate.set(rate);
        let left = total.saturating_sub(done) as f64;
        self.eta.set(if left == 0.0 {
            0.0
        } else if rate > 0.0 {
            left / rate
        } else {
            f64::INFINITY
        });
    }

    /// A live migration's memory pass, as QEMU reports it.
    pub fn memory(&self, transferred: u64, remaining: u64) {
        self.memory_transferred
            .set(i64::try_from(transferred).unwrap_or(i64::MAX));
        self.memory_remaining.set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics: cannot encode");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A progress sink that updates the metrics, then passes each call on to `inner`.
pub struct MetricsSink {
    pub metrics: Arc<EdgeMetrics>,
    pub inner: Arc<dyn ProgressSink>,
}

impl std::fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSink").finish_non_exhaustive()
    }
}

impl ProgressSink for MetricsSink {
    fn started(&self, vm: &str, migration_id: &str, total_bytes: u64) {
        self.metrics
            .total_bytes
            .set(i64::try_from(total_bytes).unwrap_or(i64::MAX));
        self.inner.started(vm, migration_id, total_bytes);
    }

    fn progress(&self, p: &Progress) {
        let m = &self.metrics;
        m.progress(p.done_bytes, p.total_bytes);
        m.totals([p.read_bytes, p.sent_bytes, p.wire_bytes]);
        if let Some(link) = &p.link {
            m.rtt.set(link.rtt.as_secs_f64());
            m.lost_packets.set(i64::try_from(link.lost_packets).unwrap_or(i64::MAX));
            m.sent_packets.set(i64::try_from(link.sent_packets).unwrap_or(i64::MAX));
            m.cwnd.set(i64::try_from(link.cwnd).unwrap_or(i64::MAX));
        }
        self.inner.progress(p);
    }

    fn reconnecting(&self) {
        self.metrics.reconnects.inc();
        self.inner.reconnecting();
    }

    fn waiting(&self, why: &str) {
        self.inner.waiting(why);
    }
}

/// Binds `addr` for [`serve`]; the error names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on TCP {addr}: {e}; choose another --metrics-listen"),
        )
    })
}

/// Serves `GET /metrics` over plain HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<EdgeMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render()) }
            }),
        )
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "only GET /metrics is served here\n") });
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::warn!(error = %e, "metrics listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_moves_the_gauges_and_counters() {
        let m = Arc::new(EdgeMetrics::new());
        let sink = MetricsSink {
            metrics: m.clone(),
            inner: Arc::new(crate::report::Silent),
        };
        sink.started("vm", "m-1", 100);
        sink.progress(&Progress {
            done_bytes: 40,
            total_bytes: 100,
            wire_bytes: 50,
            sent_bytes: 40,
            elapsed_secs: 1.0,
            read_bytes: 40,
            link: None,
        });
        sink.reconnecting();
        let text = m.render();
        for line in [
            "edge_agent_done_bytes 40",
            "edge_agent_total_bytes 100",
            "edge_agent_read_bytes_total 40",
            "edge_agent_wire_sent_bytes_total 50",
            "edge_agent_reconnects_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
