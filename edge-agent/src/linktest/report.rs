//! What a link test found, as a short table with verdict lines, or as one
//! JSON object.

use serde::Serialize;

use super::estimate::{DiskSample, LiftEstimate};
use super::stats::{fmt_duration, fmt_ms, fmt_rate, transfer_secs, RttStats, Verdict};
use crate::report::human;

/// One direction's measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Direction {
    /// Stream bytes received, from the first to the last byte.
    pub bytes: u64,
    pub secs: f64,
    /// From the first to the last byte.
    pub mbit_s: f64,
    /// Over the phase's second half, once the congestion window is open: the
    /// rate verdicts and forecasts use.
    pub steady_mbit_s: f64,
    /// The sender's packets over the phase (quinn path statistics).
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub loss_percent: f64,
    /// True if the endpoint stopped streams that ran past the granted time.
    pub cut: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Mtu {
    /// quinn's `current_mtu` after MTU discovery: the largest UDP payload.
    pub udp_payload: u16,
    pub ip_mtu: u32,
    pub ip_version: u8,
}

#[derive(Debug, Clone, Serialize)]
pub struct BulkLift {
    /// Any link works for a cold lift; only the time changes.
    pub pass: bool,
    /// Time to move 100 GiB of payload (compressed, zeros skipped) at the upload rate.
    pub secs_per_100_gib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub name: String,
    pub disks: Vec<DiskSample>,
    pub estimate: LiftEstimate,
}

/// Everything a link test measured and concluded.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    /// How the endpoint names itself (host and certificate thumbprint).
    pub endpoint: String,
    pub address: String,
    pub upload_secs: u32,
    pub download_secs: u32,
    pub streams: u8,
    /// Requests the endpoint cut to its limits (empty if none).
    pub clamped: Vec<String>,
    pub rtt: RttStats,
    pub quinn_smoothed_rtt_ms: f64,
    pub upload: Direction,
    pub download: Direction,
    pub mtu: Mtu,
    /// UDP bytes per stream byte in the upload (QUIC + TLS framing, ACKs).
    pub wire_overhead: f64,
    pub live_migration: Verdict,
    pub bulk_lift: BulkLift,
    pub vm: Option<VmReport>,
}

impl LinkReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("plain structs")
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!(
            "link test to {} at {}: {} s up, {} s down, {} streams",
            self.endpoint, self.address, self.upload_secs, self.download_secs, self.streams
        ));
        for c in &self.clamped {
            line(format!("note: the endpoint clamped the request: {c}"));
        }
        line(format!(
            "{:<16} {:<28} {}",
            "", "upload (edge -> cloud)", "download (cloud -> edge)"
        ));
        let (u, d) = (&self.upload, &self.download);
        let cut = |d: &Direction| if d.cut { " (cut by the endpoint)" } else { "" };
        line(format!(
            "{:<16} {:<28} {}",
            "throughput",
            format!("{}{}", fmt_rate(u.steady_mbit_s), cut(u)),
            fmt_rate(d.steady_mbit_s)
        ));
        // The whole phase includes the cold start of its first round trips.
        line(format!(
            "{:<16} {:<28} {}",
            "  whole phase",
            fmt_rate(u.mbit_s),
            fmt_rate(d.mbit_s)
        ));
        let moved = |d: &Direction| format!("{} in {:.2} s", human_short(d.bytes), d.secs);
        line(format!("{:<16} {:<28} {}", "moved", moved(u), moved(d)));
        let loss = |d: &Direction| format!("{:.3} % ({} of {})", d.loss_percent, d.lost_packets, d.sent_packets);
        line(format!("{:<16} {:<28} {}", "packet loss", loss(u), loss(d)));
        line(format!(
            "{:<16} min {}, mean {}, jitter {} over {} pings; quinn smoothed {}",
            "RTT",
            fmt_ms(self.rtt.min_ms),
            fmt_ms(self.rtt.mean_ms),
            fmt_ms(self.rtt.jitter_ms),
            self.rtt.pings,
            fmt_ms(self.quinn_smoothed_rtt_ms)
        ));
        line(format!(
            "{:<16} {} B max UDP payload = IP MTU {} (IPv{})",
            "path MTU", self.mtu.udp_payload, self.mtu.ip_mtu, self.mtu.ip_version
        ));
        line(format!(
            "live migration class: {}: {}",
            if self.live_migration.pass { "PASS" } else { "FAIL" },
            self.live_migration.reasons.join(", ")
        ));
        line(format!(
            "bulk lift: PASS (any link works): 100 GiB of payload (compressed, zeros skipped) takes {} at {}",
            fmt_duration(self.bulk_lift.secs_per_100_gib),
            fmt_rate(u.steady_mbit_s)
        ));
        // What `migrate` should size its windows and first round trip for.
        line(format!(
            "for migrate on this link: --link-rate {}mbit --link-rtt {}ms",
            u.steady_mbit_s.round().max(1.0),
            self.rtt.min_ms.ceil().max(1.0)
        ));
        if let Some(vm) = &self.vm {
            let e = &vm.estimate;
            line(format!(
                "VM {} ({} disk{}, {}): lift takes about {} (transfer {}, limited by the {}; fixed costs {})",
                vm.name,
                vm.disks.len(),
                if vm.disks.len() == 1 { "" } else { "s" },
                human_short(e.logical_bytes),
                fmt_duration(e.lift_secs),
                fmt_duration(e.transfer_secs),
                e.limit,
                fmt_duration(e.fixed.total_secs)
            ));
            line(format!(
                "  {:.1} % zero (never sent); zstd level {} at first, {} once settled (migrate's auto level on this \
                 link): ratio {:.2} over the lift ({:.2} at level 1); {} payload, about {} on the wire",
                e.zero_fraction * 100.0,
                e.zstd_levels.0,
                e.zstd_final_level,
                e.compression_ratio,
                e.level1_ratio,
                human_short(e.payload_bytes),
                human_short(e.wire_bytes)
            ));
            line(format!(
                "  link {} at {}; CPU {} at {:.0} MB/s per core at level 1 (SHA-256 + zstd) x {} cores \
                 ({:.0} % of them free now)",
                fmt_duration(e.network_secs),
                fmt_rate(u.steady_mbit_s),
                fmt_duration(e.cpu_secs),
                e.seal_mb_s_per_core,
                e.cores,
                e.cpu_share * 100.0
            ));
            let f = &e.fixed;
            line(format!(
                "  fixed: setup {} ({} RTT: handshake, login, plan), ramp {} ({} of a climb from {} Mbit/s, x{} a round trip), \
                 read-back {}, commit {} ({} RTT, {} s local, the datastore's sync of the last 250 ms)",
                fmt_duration(f.setup_secs),
                super::estimate::SETUP_RTTS,
                fmt_duration(f.ramp_secs),
                super::estimate::RAMP_SLOW_SHARE,
                super::estimate::RAMP_START_MBIT_S,
                super::estimate::RAMP_GROWTH_PER_RTT,
                fmt_duration(f.readback_secs),
                fmt_duration(f.commit_secs),
                super::estimate::COMMIT_RTTS,
                super::estimate::LOCAL_SECS
            ));
            let sampled: Vec<String> = vm
                .disks
                .iter()
                .map(|d| format!("{} of {} chunks of {}", d.sampled, d.chunks, d.key))
                .collect();
            line(format!(
                "  method: sampled {} evenly; holes and all-zero chunks are never sent; the rest sealed as \
                 migrate does, and up to {} chunks per disk at each zstd level 1-{}; the transfer replays \
                 migrate's adaptive level second by second (each second moves the smaller of upload rate x \
                 the level's ratio and the level's seal speed x {} cores); time = transfer + fixed costs \
                 (RTT {} from the pings' minimum); wire = payload x the upload's measured overhead {:.3}",
                sampled.join(", "),
                super::estimate::LEVEL_SAMPLES,
                crate::compression::MAX_AUTO_LEVEL,
                e.cores,
                fmt_ms(self.rtt.min_ms),
                self.wire_overhead
            ));
        }
        out
    }
}

/// Bytes briefly: "1.40 GiB".
fn human_short(bytes: u64) -> String {
    human(bytes).split(" (").next().unwrap_or_default().to_owned()
}

/// Seconds to move 100 GiB at `mbit_s`.
pub fn secs_per_100_gib(mbit_s: f64) -> f64 {
    transfer_secs(100.0 * (1u64 << 30) as f64, mbit_s)
}
