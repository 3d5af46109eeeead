//! The endpoint's Prometheus metrics (docs/operations.md lists them).
//!
//! Counters and histograms move where things happen (a chunk written, a request
//! answered, a login refused). What the inventory, the datastores and the hosts already
//! know (migrations by state, capacity, memory, sessions) is read at each scrape instead
//! of being mirrored. Per-migration gauges carry a `migration_id` label and are removed
//! when the migration's connection ends, so the series set stays as small as the
//! migrations under way.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Encoder as _, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::Domain;

const NAMESPACE: &str = "cloud_endpoint";

/// The content type of [`EndpointMetrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric of the endpoint, registered in its own registry (nothing global: tests
/// run several endpoints in one process).
#[derive(Debug)]
pub struct EndpointMetrics {
    registry: Registry,
    migrations: IntGaugeVec,
    replications: IntGaugeVec,
    pub received_logical_bytes: IntCounter,
    pub received_payload_bytes: IntCounter,
    pub received_wire_bytes: IntCounter,
    pub chunks_resent: IntCounter,
    pub chunks_rejected: IntCounter,
    pub resumes: IntCounter,
    pub read_back_chunks: IntCounterVec,
    refusals: IntCounterVec,
    migration_bytes: IntGaugeVec,
    migration_total_bytes: IntGaugeVec,
    migration_rate: GaugeVec,
    migration_eta: GaugeVec,
    link_rtt: GaugeVec,
    link_lost_packets: IntGaugeVec,
    link_sent_packets: IntGaugeVec,
    link_cwnd: IntGaugeVec,
    api_requests: IntCounterVec,
    api_duration: HistogramVec,
    api_sessions: IntGauge,
    failed_logins: IntCounter,
    login_refusals: IntCounterVec,
    host_memory_capacity: IntGaugeVec,
    host_memory_used: IntGaugeVec,
    datastore_capacity: IntGaugeVec,
    datastore_used: IntGaugeVec,
    datastore_free: IntGaugeVec,
    /// Serialises scrapes: each resets and refills the gauges read at scrape time.
    scrape: Mutex<()>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

/// Registers `metric` and gives it back (names are fixed, so registering cannot fail
/// but for a programming error caught by the unit test).
fn reg<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid");
    metric
}

impl Default for EndpointMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointMetrics {
    pub fn new() -> EndpointMetrics {
        let r = Registry::new();
        let int_gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntGaugeVec::new(opts(name, help), labels).expect("valid metric"))
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, GaugeVec::new(opts(name, help), labels).expect("valid metric"))
        };
        let counter = |name: &str, help: &str| reg(&r, IntCounter::with_opts(opts(name, help)).expect("valid metric"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(opts(name, help), labels).expect("valid metric"))
        };
        let id = &["migration_id"];
        EndpointMetrics {
            migrations: int_gauge(
                "migrations",
                "Migration records (cold lifts and live migrations) by state, as the inventory holds them.",
                &["state"],
            ),
            replications: int_gauge(
                "replications",
                "Replications (migrations that keep a replica) by state: RUNNING while replicating, SUCCEEDED once switched over.",
                &["state"],
            ),
            received_logical_bytes: counter(
                "received_logical_bytes_total",
                "Disk bytes of the chunks written into staged disks (uncompressed; repeats not counted).",
            ),
            received_payload_bytes: counter(
                "received_payload_bytes_total",
                "Chunk payload bytes read from data streams (compressed and sealed), repeats included.",
            ),
            received_wire_bytes: counter(
                "received_wire_bytes_total",
                "UDP bytes received on migration connections (QUIC framing and retransmissions included).",
            ),
            chunks_resent: counter(
                "chunks_resent_total",
                "Chunks that arrived again although already written (resends after a lost acknowledgement or a resume).",
            ),
            chunks_rejected: counter(
                "chunks_rejected_total",
                "Chunks that failed verification; the edge resends each.",
            ),
            resumes: counter("resumes_total", "Migrations resumed on a new connection."),
            read_back_chunks: counter_vec(
                "read_back_chunks_total",
                "Staged chunks read back and checked against their hash: at_end of a pass or before a commit, or during_pass (a replica read while the switchover's last pass streams, so that the switchover reads only what the pass wrote).",
                &["when"],
            ),
            refusals: counter_vec(
                "refusals_total",
                "Refusals sent to edges, by refusal code.",
                &["reason"],
            ),
            migration_bytes: int_gauge(
                "migration_durable_bytes",
                "Logical bytes a running migration holds durably.",
                id,
            ),
            migration_total_bytes: int_gauge(
                "migration_logical_bytes",
                "Logical bytes of a running migration's disks.",
                id,
            ),
            migration_rate: gauge(
                "migration_rate_bytes_per_second",
                "Logical bytes per second a running migration makes durable (over the last seconds).",
                id,
            ),
            migration_eta: gauge(
                "migration_eta_seconds",
                "Seconds until a running migration holds all its bytes at its current rate.",
                id,
            ),
            link_rtt: gauge(
                "link_rtt_seconds",
                "Smoothed round-trip time of a running migration's QUIC connection.",
                id,
            ),
            link_lost_packets: int_gauge(
                "link_lost_packets",
                "Packets the endpoint sent on a running migration's connection and declared lost.",
                id,
            ),
            link_sent_packets: int_gauge(
                "link_sent_packets",
                "Packets the endpoint sent on a running migration's connection (the loss ratio's denominator).",
                id,
            ),
            link_cwnd: int_gauge(
                "link_congestion_window_bytes",
                "Congestion window of the endpoint's side of a running migration's connection.",
                id,
            ),
            api_requests: counter_vec(
                "api_requests_total",
                "API requests answered, by method, route template and status.",
                &["method", "route", "status"],
            ),
            api_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "api_request_duration_seconds",
                        "Time to answer an API request, by method and route template.",
                    )
                    .namespace(NAMESPACE)
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                    &["method", "route"],
                )
                .expect("valid metric"),
            ),
            api_sessions: reg(
                &r,
                IntGauge::with_opts(opts("api_sessions", "API sessions alive.")).expect("valid metric"),
            ),
            failed_logins: counter(
                "failed_logins_total",
                "Logins with a wrong password or an unknown user (API and edges alike).",
            ),
            login_refusals: counter_vec(
                "login_refusals_total",
                "Logins refused before any password check: throttled (a locked user, a blocked or delayed address) or busy (the login queue was full).",
                &["reason"],
            ),
            host_memory_capacity: int_gauge(
                "host_memory_capacity_bytes",
                "Memory of the host VMs run on.",
                &["host"],
            ),
            host_memory_used: int_gauge(
                "host_memory_used_bytes",
                "Host memory held by powered-on VMs and live migrations under way.",
                &["host"],
            ),
            datastore_capacity: int_gauge(
                "datastore_capacity_bytes",
                "Capacity of a datastore (configured, or its filesystem's size).",
                &["datastore"],
            ),
            datastore_used: int_gauge(
                "datastore_used_bytes",
                "Bytes a datastore's registered disks hold and running migrations reserved.",
                &["datastore"],
            ),
            datastore_free: int_gauge(
                "datastore_free_bytes",
                "Bytes free for new disks on a datastore, as placement counts them.",
                &["datastore"],
            ),
            registry: r,
            scrape: Mutex::new(()),
        }
    }

    /// A refusal with this code was sent to an edge.
    pub fn refused(&self, code: gateway::wire::RefusalCode) {
        self.refusals.with_label_values(&[&format!("{code:?}")]).inc();
    }

    /// An API request was answered. `route` is the route template (`/api/vcenter/vm/{vm}`),
    /// never the raw path, so that the label's values stay few.
    pub fn api_request(&self, method: &str, route: &str, status: u16, started: Instant) {
        let status = status.to_string();
        self.api_requests.with_label_values(&[method, route, &status]).inc();
        self.api_duration
            .with_label_values(&[method, route])
            .observe(started.elapsed().as_secs_f64());
    }

    /// A running migration's progress and link, sampled by its connection.
    pub fn migration_sample(&self, id: &str, sample: &MigrationSample) {
        let l = &[id];
        self.migration_bytes
            .with_label_values(l)
            .set(i64::try_from(sample.durable_bytes).unwrap_or(i64::MAX));
        self.migration_total_bytes
            .with_label_values(l)
            .set(i64::try_from(sample.total_bytes).unwrap_or(i64::MAX));
        self.migration_rate.with_label_values(l).set(sample.rate);
        self.migration_eta
            .with_label_values(l)
            .set(sample.eta_seconds().unwrap_or(f64::INFINITY));
        self.link_rtt.with_label_values(l).set(sample.rtt.as_secs_f64());
        self.link_lost_packets
            .with_label_values(l)
            .set(i64::try_from(sample.lost_packets).unwrap_or(i64::MAX));
        self.link_sent_packets
            .with_label_values(l)
            .set(i64::try_from(sample.sent_packets).unwrap_or(i64::MAX));
        self.link_cwnd
            .with_label_values(l)
            .set(i64::try_from(sample.cwnd).unwrap_or(i64::MAX));
    }

    /// The migration's connection ended: its series go.
    pub fn migration_ended(&self, id: &str) {
        for g in [
            &self.migration_bytes,
            &self.migration_total_bytes,
            &self.link_lost_packets,
            &self.link_sent_packets,
            &self.link_cwnd,
        ] {
            let _ = g.remove_label_values(&[id]);
        }
        for g in [&self.migration_rate, &self.migration_eta, &self.link_rtt] {
            let _ = g.remove_label_values(&[id]);
        }
    }

    /// The exposition text: the gauges read at scrape time are refreshed from `domain`
    /// (and `sessions`, the API's live session count, when the API runs) first. Blocks
    /// on the inventory: call it from a blocking thread.
    pub fn render(&self, domain: &Domain, sessions: Option<usize>) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(domain, sessions);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics: cannot encode");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn refresh(&self, domain: &Domain, sessions: Option<usize>) {
        self.api_sessions
            .set(sessions.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
        // The login gate counts; the counters follow its figures.
        let logins = domain.logins.stats();
        let follow = |c: &IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        follow(&self.failed_logins, logins.failed_logins);
        follow(
            &self.login_refusals.with_label_values(&["throttled"]),
            logins.refused_logins,
        );
        follow(&self.login_refusals.with_label_values(&["busy"]), logins.busy_logins);
        match domain.inventory.list_migrations() {
            Ok(list) => {
                let (mut migrations, mut replications) = (BTreeMap::new(), BTreeMap::new());
                for m in &list {
                    let by_state = if m.replica.is_some() {
                        &mut replications
                    } else {
                        &mut migrations
                    };
                    *by_state.entry(m.state.as_str()).or_insert(0i64) += 1;
                }
                self.migrations.reset();
                self.replications.reset();
                for (state, n) in migrations {
                    self.migrations.with_label_values(&[state]).set(n);
                }
                for (state, n) in replications {
                    self.replications.with_label_values(&[state]).set(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot list migrations"),
        }
        let Ok(d) = domain.inventory.domain() else {
            return;
        };
        let (capacity_mib, used_mib) = domain.hosts.memory_mib();
        let host = &[d.host.name.as_str()];
        self.host_memory_capacity
            .with_label_values(host)
            .set(i64::try_from(capacity_mib << 20).unwrap_or(i64::MAX));
        self.host_memory_used
            .with_label_values(host)
            .set(i64::try_from(used_mib << 20).unwrap_or(i64::MAX));
        for ds in &d.datastores {
            let Some(store) = domain.datastore_named(&ds.name) else {
                continue;
            };
            let Ok(space) = domain.inventory.space_on(&ds.id) else {
                continue;
            };
            let l = &[ds.name.as_str()];
            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            if let Ok(capacity) = store.capacity_bytes() {
                self.datastore_capacity.with_label_values(l).set(clamp(capacity));
            }
            self.datastore_used.with_label_values(l).set(clamp(space.used));
            if let Ok(free) = store.free_bytes(space.used, space.reserved) {
                self.datastore_free.with_label_values(l).set(clamp(free));
            }
        }
    }
}

/// What a migration's connection samples for [`EndpointMetrics::migration_sample`].
#[derive(Debug, Clone, Default)]
pub struct MigrationSample {
    pub durable_bytes: u64,
    pub total_bytes: u64,
    pub rate: f64,
    pub rtt: std::time::Duration,
    pub lost_packets: u64,
    pub sent_packets: u64,
    pub cwnd: u64,
}

impl MigrationSample {
    /// Seconds left at the current rate: 0 when done, `None` while nothing moves.
    pub fn eta_seconds(&self) -> Option<f64> {
        let left = self.total_bytes.saturating_sub(self.durable_bytes) as f64;
        if left == 0.0 {
            Some(0.0)
        } else if self.rate > 0.0 {
            Some(left / self.rate)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_a_request_is_counted_by_route() {
        let m = EndpointMetrics::new();
        m.api_request("GET", "/api/vcenter/vm/{vm}", 200, Instant::now());
        m.refused(gateway::wire::RefusalCode::Busy);
        m.migration_sample(
            "m-1",
            &MigrationSample {
                durable_bytes: 5,
                total_bytes: 10,
                rate: 5.0,
                ..Default::default()
            },
        );
        let mut out = Vec::new();
        TextEncoder::new().encode(&m.registry.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                r#"cloud_endpoint_api_requests_total{method="GET",route="/api/vcenter/vm/{vm}",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"cloud_endpoint_refusals_total{reason="Busy"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cloud_endpoint_migration_eta_seconds{migration_id="m-1"} 1"#),
            "{text}"
        );
        m.migration_ended("m-1");
        let mut out = Vec::new();
        TextEncoder::new().encode(&m.registry.gather(), &mut out).unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("m-1"));
    }
}
