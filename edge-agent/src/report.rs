//! What the agent tells its user: progress while data moves, a summary at the
//! end. Both have a JSON form for automation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// A progress sample.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    /// Logical bytes done: written in the cloud or known to be zero.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes sent on the wire so far (UDP payload, after compression and encryption).
    pub wire_bytes: u64,
    /// Plaintext bytes of the data chunks this process sent, repeats included.
    pub sent_bytes: u64,
    pub elapsed_secs: f64,
    /// Bytes read from the source disks so far (for the metrics).
    #[serde(skip)]
    pub read_bytes: u64,
    /// The link as the current connection sees it (for the metrics).
    #[serde(skip)]
    pub link: Option<LinkSample>,
}

/// A QUIC connection's view of the link.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkSample {
    pub rtt: Duration,
    pub lost_packets: u64,
    pub sent_packets: u64,
    pub cwnd: u64,
}

impl LinkSample {
    pub fn of(conn: &quinn::Connection) -> LinkSample {
        let stats = conn.stats();
        LinkSample {
            rtt: conn.rtt(),
            lost_packets: stats.path.lost_packets,
            sent_packets: stats.path.sent_packets,
            cwnd: stats.path.cwnd,
        }
    }
}

/// Receives progress; the binary draws a bar or prints JSON lines.
pub trait ProgressSink: Send + Sync {
    /// The plan was accepted: data starts to flow.
    fn started(&self, vm: &str, migration_id: &str, total_bytes: u64);
    fn progress(&self, p: &Progress);
    /// The link was lost and the agent reconnects to resume.
    fn reconnecting(&self) {}
    /// The migration waits to resume, and why: which endpoint was lost, which one must
    /// release it first, where it goes next.
    fn waiting(&self, why: &str) {
        let _ = why;
    }
}

/// A sink that shows nothing (tests, library use).
#[derive(Debug, Default)]
pub struct Silent;

impl ProgressSink for Silent {
    fn started(&self, _: &str, _: &str, _: u64) {}
    fn progress(&self, _: &Progress) {}
}

/// The result of a completed migration.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub vm: String,
    pub vm_id: String,
    pub vm_path: String,
    pub migration_id: String,
    pub disks: usize,
    /// Sum of the disks' capacities.
    pub logical_bytes: u64,
    /// Of those, bytes in all-zero chunks: never sent.
    pub zero_bytes: u64,
    /// Chunk payload bytes sent (after compression), resends included.
    pub payload_bytes: u64,
    /// UDP payload bytes sent: everything, including QUIC and TLS overhead.
    pub wire_bytes: u64,
    /// Chunks resent after the cloud rejected them, repaired ones included.
    pub resent_chunks: u64,
    /// Chunks the cloud found damaged in its staged copy when it read it back before
    /// the commit, and that were sent again to repair it.
    pub repaired_chunks: u64,
    /// Plaintext bytes of the data chunks this process sent, repeats included.
    pub sent_bytes: u64,
    /// Plaintext bytes the cloud copied from disks it already held (this user's or this
    /// edge's earlier lifts and replicas) instead of receiving them.
    pub dedup_bytes: u64,
    /// Of `dedup_bytes`, those copied from the seed the replication named
    /// (`replicate --seed`).
    pub seeded_bytes: u64,
    /// Plaintext bytes this process sent more than once: after a reconnect, what was
    /// in flight at the break; after a rejection, the rejected chunk.
    pub resent_bytes: u64,
    /// Plaintext bytes read from the source disks (holes and chunks the source's
    /// tracking knows unchanged are not read).
    pub read_bytes: u64,
    /// How a QEMU source's changes were found (`replicate --qmp`), if they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::tracking::TrackingReport>,
    /// Bytes the cloud already held when this process resumed the migration
    /// (not sent again).
    pub resumed_bytes: u64,
    /// Times the link was lost and the migration resumed on a new connection.
    pub reconnects: u32,
    /// The endpoint (address) that finished the migration: with several, the one whose
    /// certificate signed the receipt.
    pub endpoint: String,
    /// Times the migration went on through another endpoint of the target than the one
    /// that served it before.
    pub failovers: u32,
    pub duration_secs: f64,
    /// Where the endpoint's signed receipt was written, if it was.
    pub receipt_path: Option<PathBuf>,
    /// The signed receipt (JSON), as the endpoint issued it. Not in the JSON
    /// summary line: the file holds it.
    #[serde(skip)]
    pub receipt: String,
    /// The endpoint's report: NIC mapping, firewall rules carried and not carried
    /// (also at `GET /api/gateway/migrations/{id}/report`).
    pub report: Option<gateway::plan::MigrationReport>,
    /// A replication pass (`edge-agent replicate`): the cloud keeps a replica, no VM
    /// was registered (`vm_id` and `vm_path` are empty).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replica: bool,
    /// A replication of VMware files: what each disk's snapshot chain said changed since
    /// the last pass, or why every chunk was compared.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    /// A replication pass: the scheduled switchover the cloud holds (RFC 3339 UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_at: Option<String>,
    /// A replication pass: the daily window (`HH:MM-HH:MM`, UTC) the cloud holds, which
    /// the scheduled switchover must start in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_window: Option<String>,
    /// The switchover this edge had recorded as awaiting confirmation was rolled back in
    /// the cloud since (through the API): what the edge made of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub earlier_switchover: Option<String>,
    /// A switchover: whether the cloud powered the VM on, the downtime, and whether it
    /// awaits `edge-agent confirm` (or `rollback`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover: Option<SwitchoverReport>,
}

/// What a switchover did beyond the commit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwitchoverReport {
    pub powered_on: bool,
    /// Why the power-on asked for failed (the VM is registered, powered off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_error: Option<String>,
    /// From `downtime_from` to the VM running in the cloud, as the endpoint measured it
    /// (the edge's part stated in its request); absent when the VM was not powered on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// `source stopped by the edge`, `source files last written` (the operator had
    /// stopped a VMware source before: its files' newest modification, an estimate), or
    /// `switchover started` (the operator had stopped it, and its files do not say when).
    pub downtime_from: &'static str,
    pub awaiting_confirm: bool,
}

impl Summary {
    /// Logical bytes per wire byte.
    pub fn ratio(&self) -> f64 {
        self.logical_bytes as f64 / self.wire_bytes.max(1) as f64
    }

    /// Logical bytes per second.
    pub fn rate(&self) -> f64 {
        self.logical_bytes as f64 / self.duration_secs.max(1e-9)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain struct");
        v["ratio"] = self.ratio().into();
        v["logical_rate_bytes_per_sec"] = self.rate().into();
        v
    }

    /// Human summary, several lines.
    pub fn to_text(&self) -> String {
        let head = if self.replica {
            format!(
                "replica of {} in sync (migration {}): {} of changed data sent, nothing registered",
                self.vm,
                self.migration_id,
                human(self.sent_bytes)
            )
        } else {
            format!(
                "migrated {} -> {} at {} (migration {})",
                self.vm, self.vm_id, self.vm_path, self.migration_id
            )
        };
        let mut text = format!(
            "{head}\n\
             disks:          {disks}\n\
             logical bytes:  {logical} ({zero} all-zero, never sent)\n\
             payload bytes:  {payload} (zstd, {resent} chunks resent)\n\
             bytes on wire:  {wire} (QUIC + TLS 1.3)\n\
             ratio:          {ratio:.2} logical bytes per wire byte\n\
             duration:       {dur:.2} s\n\
             rate:           {rate}/s logical",
            disks = self.disks,
            logical = human(self.logical_bytes),
            zero = human(self.zero_bytes),
            payload = human(self.payload_bytes),
            resent = self.resent_chunks,
            wire = human(self.wire_bytes),
            ratio = self.ratio(),
            dur = self.duration_secs,
            rate = human(self.rate() as u64),
        );
        if let Some(said) = &self.earlier_switchover {
            text.push_str(&format!("\nswitchover:     {said}"));
        }
        if self.dedup_bytes > 0 {
            text.push_str(&format!(
                "\ndeduplicated:   {} copied inside the cloud from disks it held, not sent; {} sent as data",
                human(self.dedup_bytes),
                human(self.sent_bytes)
            ));
        }
        if self.seeded_bytes > 0 {
            text.push_str(&format!(
                "\nseeded:         {} of them from the seed's disks",
                human(self.seeded_bytes)
            ));
        }
        if !self.snapshots.is_empty() {
            text.push_str(&format!("\nread:           {} of the source", human(self.read_bytes)));
            for note in &self.snapshots {
                text.push_str(&format!("\nsnapshots:      {note}"));
            }
        }
        if self.resumed_bytes > 0 || self.reconnects > 0 {
            text.push_str(&format!(
                "\nresumed:        {} already in the cloud, {} re-sent after {} reconnect(s)",
                human(self.resumed_bytes),
                human(self.resent_bytes),
                self.reconnects
            ));
        }
        if self.failovers > 0 {
            text.push_str(&format!(
                "\nfailover:       finished through endpoint {} after {} move(s) to another endpoint",
                self.endpoint, self.failovers
            ));
        }
        if let Some(t) = &self.tracking {
            text.push_str(&format!("\ntracking:       {}", t.describe()));
        }
        if self.repaired_chunks > 0 {
            text.push_str(&format!(
                "\nrepaired:       {} chunks the cloud's staged copy no longer held as sent were sent again",
                self.repaired_chunks
            ));
        }
        if let Some(path) = &self.receipt_path {
            text.push_str(&format!(
                "\nreceipt:        {} (signed by the endpoint; check it with `edge-agent verify-receipt`)",
                path.display()
            ));
        }
        match (&self.switchover_at, &self.switchover_window) {
            (Some(at), None) => text.push_str(&format!(
                "\nswitchover:     scheduled at {at} (held by the endpoint; the first pass at or after it switches over)"
            )),
            (Some(at), Some(w)) => text.push_str(&format!(
                "\nswitchover:     scheduled at {at}, inside the daily window {w} UTC (held by the endpoint; it starts at the first \
                 pass at or after that time while the window is open, else at the window's next opening)"
            )),
            (None, Some(w)) => text.push_str(&format!(
                "\nswitchover:     at the next opening of the daily window {w} UTC (held by the endpoint)"
            )),
            (None, None) => {}
        }
        if let Some(s) = &self.switchover {
            match (s.powered_on, s.downtime_ms, &s.power_error) {
                (true, Some(ms), _) => text.push_str(&format!(
                    "\npowered on:     {} runs in the cloud\ndowntime:       {:.2} s, from the {} to the VM running in the cloud",
                    self.vm_id,
                    ms as f64 / 1000.0,
                    match s.downtime_from {
                        "switchover started" => "switchover's start (the source was stopped before it)",
                        "source files last written" => {
                            "source files' last write (the source was stopped before the switchover; an estimate, \
                             on the datastore's clock)"
                        }
                        _ => "source's stop by the edge",
                    }
                )),
                (_, _, Some(why)) => text.push_str(&format!(
                    "\npowered on:     no: {why}; the VM is registered, powered off: power it on through the API"
                )),
                _ => text.push_str(&format!(
                    "\npowered on:     no (not asked: --power-on); power {} on through the API",
                    self.vm_id
                )),
            }
            text.push_str(if s.awaiting_confirm {
                "\nconfirm:        awaiting: `edge-agent confirm` makes it final; `edge-agent rollback` powers the \
                 cloud VM off and keeps its disks as the replica (keep the source until you confirm)"
            } else {
                "\nconfirm:        confirmed: final, no rollback"
            });
        }
        if let Some(report) = &self.report {
            text.push('\n');
            text.push_str(report.to_text().trim_end());
        }
        text
    }
}

/// Bytes in binary units with the exact count, e.g. `1.00 GiB (1073741824 B)`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {} ({bytes} B)", UNITS[unit])
    }
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
