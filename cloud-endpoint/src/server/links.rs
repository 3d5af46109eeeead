//! A short history of each served migration's link and progress, for the dashboard's
//! charts (`GET /api/gateway/links`). The metrics hold only the latest figures, and a
//! chart of RTT, loss and throughput needs the last minutes of them: a bounded ring per
//! migration, kept while a connection serves it and dropped when it ends, so memory stays
//! at a few kilobytes per migration under way.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Samples kept per migration: two minutes at one a second.
pub const KEPT_SAMPLES: usize = 120;

/// The connection samples every 250 ms (its sync tick); a chart needs one a second.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// One point of a migration's link and progress, as its connection saw them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkSample {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub durable_bytes: u64,
    pub total_bytes: u64,
    /// Logical bytes made durable per second (moving average over about 5 s).
    pub rate_bytes_per_second: f64,
    /// Seconds left at that rate; absent while nothing moves.
    pub eta_seconds: Option<f64>,
    /// Smoothed RTT of the migration's QUIC connection.
    pub rtt_ms: f64,
    /// Packets the endpoint sent on the connection so far, and those declared lost.
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub cwnd_bytes: u64,
}

/// A migration's trace: which edge serves it and its recent samples, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct LinkTrace {
    pub migration: String,
    /// The edge as the migration record names it (address and certificate thumbprint).
    pub edge: String,
    pub samples: VecDeque<LinkSample>,
}

/// The traces of every migration a connection serves now, one per endpoint.
#[derive(Debug, Default)]
pub struct LinkHistory {
    traces: Mutex<BTreeMap<String, LinkTrace>>,
}

impl LinkHistory {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LinkTrace>> {
        self.traces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `sample` to migration `id`'s trace, unless its last sample is younger than
    /// [`SAMPLE_EVERY`]; the oldest goes beyond [`KEPT_SAMPLES`].
    pub fn record(&self, id: &str, edge: &str, sample: LinkSample) {
        let mut traces = self.lock();
        let trace = traces.entry(id.to_owned()).or_insert_with(|| LinkTrace {
            migration: id.to_owned(),
            edge: edge.to_owned(),
            samples: VecDeque::with_capacity(KEPT_SAMPLES),
        });
        let every = SAMPLE_EVERY.as_millis() as u64;
        if trace
            .samples
            .back()
            .is_some_and(|last| sample.at_ms < last.at_ms.saturating_add(every))
        {
            return;
        }
        if trace.samples.len() == KEPT_SAMPLES {
            trace.samples.pop_front();
        }
        trace.edge = edge.to_owned();
        trace.samples.push_back(sample);
    }

    /// The migration's connection ended: its trace goes (its record tells the rest).
    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Every trace, by migration id.
    pub fn traces(&self) -> Vec<LinkTrace> {
        self.lock().values().cloned().collect()
    }
}

/// `time` as milliseconds since the Unix epoch (0 before it).
pub fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> LinkSample {
        LinkSample {
            at_ms: ms,
            durable_bytes: ms,
            total_bytes: 1 << 30,
            rate_bytes_per_second: 1.0,
            eta_seconds: None,
            rtt_ms: 1.0,
            sent_packets: 10,
            lost_packets: 0,
            cwnd_bytes: 12_000,
        }
    }

    #[test]
    fn one_sample_a_second_and_a_bounded_ring_per_migration() {
        let h = LinkHistory::default();
        for ms in (0..200_000).step_by(250) {
            h.record("migration-1", "edge-a", at(ms));
        }
        h.record("migration-2", "edge-b", at(5));
        let traces = h.traces();
        assert_eq!(traces.len(), 2);
        let one = &traces[0];
        assert_eq!(one.migration, "migration-1");
        assert_eq!(one.samples.len(), KEPT_SAMPLES);
        // The newest kept, one a second.
        assert_eq!(one.samples.back().unwrap().at_ms, 199_000);
        assert_eq!(one.samples[1].at_ms - one.samples[0].at_ms, 1000);
        h.end("migration-1");
        assert_eq!(h.traces().len(), 1);
        assert_eq!(h.traces()[0].edge, "edge-b");
    }
}
