//! Link-test arithmetic with no I/O: RTT statistics, rates, loss, MTU and the
//! verdict against what users of vMotion and HCX know.

use std::time::{Duration, Instant};

use serde::Serialize;

/// vMotion's long-distance limit (vSphere 6.0+): at most 150 ms round trip...
pub const LIVE_MAX_RTT_MS: f64 = 150.0;
/// ...and 250 Mbit/s per concurrent migration.
pub const LIVE_MIN_MBIT_S: f64 = 250.0;

/// Round-trip times of the application pings, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RttStats {
    pub pings: usize,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    /// RFC 3550's interarrival jitter applied to round trips: a running mean
    /// of |difference between consecutive RTTs| with gain 1/16.
    pub jitter_ms: f64,
}

/// Statistics of `samples` in the order they were taken; `None` if empty.
pub fn rtt_stats(samples: &[Duration]) -> Option<RttStats> {
    let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let first = *ms.first()?;
    let mut jitter = 0.0;
    for pair in ms.windows(2) {
        // RFC 3550 6.4.1: J += (|D| - J) / 16, D the change in transit time;
        // for a round trip, the change in RTT.
        jitter += ((pair[1] - pair[0]).abs() - jitter) / 16.0;
    }
    Some(RttStats {
        pings: ms.len(),
        min_ms: ms.iter().copied().fold(first, f64::min),
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        max_ms: ms.iter().copied().fold(first, f64::max),
        jitter_ms: jitter,
    })
}

/// Megabits per second of `bytes` moved in `micros`; 0 if no time passed.
pub fn mbit_per_s(bytes: u64, micros: u64) -> f64 {
    if micros == 0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / micros as f64
}

/// Megabits per second over the second half of a phase that started at
/// `start`, from `(time, cumulative bytes)` samples: the first round trips
/// climb from a cold congestion window, which a migration told the link's
/// rate skips. `None` with fewer than two samples in that half.
pub fn steady_mbit_s(samples: &[(Instant, u64)], start: Instant) -> Option<f64> {
    let end = samples.last()?.0;
    let half = start + end.saturating_duration_since(start) / 2;
    let from = samples.iter().find(|(t, _)| *t >= half)?;
    let (t1, b1) = *samples.last()?;
    let micros = t1.saturating_duration_since(from.0).as_micros() as u64;
    if micros == 0 {
        return None;
    }
    Some(mbit_per_s(b1.saturating_sub(from.1), micros))
}

/// Lost packets as a percentage of sent ones.
pub fn loss_percent(lost: u64, sent: u64) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    lost as f64 * 100.0 / sent as f64
}

/// The IP MTU that carries a UDP payload of `udp_payload` bytes (quinn's
/// `current_mtu`): plus 8 bytes of UDP header and 20 (IPv4) or 40 (IPv6) of IP.
pub fn ip_mtu(udp_payload: u16, ipv6: bool) -> u32 {
    u32::from(udp_payload) + 8 + if ipv6 { 40 } else { 20 }
}

/// PASS or FAIL, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    pub reasons: Vec<String>,
}

/// Slack on [`LIVE_MAX_RTT_MS`] for what the hosts add to a round trip: an
/// application ping crosses two QUIC stacks, TLS and two schedulers, which on
/// a path of exactly 150 ms measure 150.2-150.9 ms. vMotion's limit is the
/// network's, so a path at the limit passes instead of failing by a fraction
/// of a millisecond no user could remove.
pub const LIVE_RTT_TOLERANCE_MS: f64 = 1.0;

/// The "live migration class": what vMotion asks of a long-distance link,
/// judged on the minimum ping RTT (the path's propagation delay: the mean
/// also carries queueing and the hosts' scheduling, which a live migration's
/// own traffic changes anyway) within [`LIVE_RTT_TOLERANCE_MS`], and the
/// upload rate (a migration moves edge to cloud).
pub fn live_migration(rtt: &RttStats, upload_mbit_s: f64) -> Verdict {
    let rtt_ok = rtt.min_ms <= LIVE_MAX_RTT_MS + LIVE_RTT_TOLERANCE_MS;
    let rate_ok = upload_mbit_s >= LIVE_MIN_MBIT_S;
    let rtt_line = format!(
        "RTT min {} (mean {}) {} {LIVE_MAX_RTT_MS:.0} ms (+{LIVE_RTT_TOLERANCE_MS:.0} ms for the hosts)",
        fmt_ms_fine(rtt.min_ms),
        fmt_ms_fine(rtt.mean_ms).trim_end_matches(" ms"),
        if rtt_ok { "<=" } else { "exceeds" }
    );
    let rate = format!(
        "upload {} {} {LIVE_MIN_MBIT_S:.0} Mbit/s per migration",
        fmt_rate(upload_mbit_s),
        if rate_ok { ">=" } else { "is below" }
    );
    Verdict {
        pass: rtt_ok && rate_ok,
        reasons: vec![rtt_line, rate],
    }
}

/// Seconds to move `bytes` at `mbit_s`; infinite at 0.
pub fn transfer_secs(bytes: f64, mbit_s: f64) -> f64 {
    if mbit_s <= 0.0 {
        return f64::INFINITY;
    }
    bytes * 8.0 / (mbit_s * 1e6)
}

/// "42 s", "12 min 05 s", "3 h 07 min", "4 d 03 h".
pub fn fmt_duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "forever (nothing got through)".into();
    }
    let s = secs.round() as u64;
    match s {
        _ if secs < 1.0 => format!("{secs:.2} s"),
        _ if secs < 10.0 => format!("{secs:.1} s"),
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {:02} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {:02} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// "0.084 ms", "12.3 ms", "151 ms".
pub fn fmt_ms(ms: f64) -> String {
    match ms {
        _ if ms < 1.0 => format!("{ms:.3} ms"),
        _ if ms < 100.0 => format!("{ms:.1} ms"),
        _ => format!("{ms:.0} ms"),
    }
}

/// "0.084 ms", "150.2 ms": a tenth of a millisecond shown on long paths too,
/// where a verdict against a limit turns on it.
pub fn fmt_ms_fine(ms: f64) -> String {
    match ms {
        _ if ms < 1.0 => format!("{ms:.3} ms"),
        _ => format!("{ms:.1} ms"),
    }
}

/// "2.41 Gbit/s", "312 Mbit/s", "8.5 Mbit/s".
pub fn fmt_rate(mbit_s: f64) -> String {
    match mbit_s {
        _ if mbit_s >= 1000.0 => format!("{:.2} Gbit/s", mbit_s / 1000.0),
        _ if mbit_s >= 100.0 => format!("{mbit_s:.0} Mbit/s"),
        _ => format!("{mbit_s:.1} Mbit/s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn rtt_statistics() {
        assert_eq!(rtt_stats(&[]), None);
        let s = rtt_stats(&ms(&[10, 10, 10])).unwrap();
        assert_eq!(
            (s.pings, s.min_ms, s.mean_ms, s.max_ms, s.jitter_ms),
            (3, 10.0, 10.0, 10.0, 0.0)
        );

        let s = rtt_stats(&ms(&[10, 20, 10, 30])).unwrap();
        assert_eq!((s.min_ms, s.max_ms, s.mean_ms), (10.0, 30.0, 17.5));
        // J1 = 10/16 = 0.625; J2 = 0.625 + (10 - 0.625)/16; J3 = J2 + (20 - J2)/16.
        let j2 = 0.625 + (10.0 - 0.625) / 16.0;
        let j3 = j2 + (20.0 - j2) / 16.0;
        assert!((s.jitter_ms - j3).abs() < 1e-9, "{}", s.jitter_ms);
    }

    #[test]
    fn jitter_converges_to_the_mean_deviation() {
        // RTTs alternating 100/104 ms: |D| = 4 every time, so J tends to 4.
        let samples: Vec<_> = (0..400).map(|i| Duration::from_millis(100 + 4 * (i % 2))).collect();
        let s = rtt_stats(&samples).unwrap();
        assert!((s.jitter_ms - 4.0).abs() < 0.01, "{}", s.jitter_ms);
        assert_eq!(s.mean_ms, 102.0);
    }

    #[test]
    fn the_steady_rate_leaves_out_the_cold_start() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 1 s at 10 Mbit/s, then 1 s at 100: the second half is 100.
        let samples: Vec<_> = (0..=20u64)
            .map(|i| {
                let bytes = if i <= 10 {
                    i * 125_000
                } else {
                    1_250_000 + (i - 10) * 1_250_000
                };
                (at(i * 100), bytes)
            })
            .collect();
        let r = steady_mbit_s(&samples, t0).unwrap();
        assert!((r - 100.0).abs() < 1e-9, "{r}");
        assert_eq!(steady_mbit_s(&[], t0), None);
        assert_eq!(steady_mbit_s(&[(at(0), 5)], t0), None);
    }

    #[test]
    fn rates_loss_and_mtu() {
        assert_eq!(mbit_per_s(125_000_000, 1_000_000), 1000.0);
        assert_eq!(mbit_per_s(5, 0), 0.0);
        assert_eq!(loss_percent(1, 200), 0.5);
        assert_eq!(loss_percent(0, 0), 0.0);
        assert_eq!(ip_mtu(1472, false), 1500);
        assert_eq!(ip_mtu(1452, true), 1500);
        assert_eq!(ip_mtu(1200, false), 1228);
    }

    fn rtt(min_ms: f64, mean_ms: f64) -> RttStats {
        RttStats {
            pings: 20,
            min_ms,
            mean_ms,
            max_ms: mean_ms * 2.0 - min_ms,
            jitter_ms: 0.0,
        }
    }

    #[test]
    fn live_migration_class_follows_vmotion_limits() {
        let v = live_migration(&rtt(0.1, 0.2), 2000.0);
        assert!(v.pass, "{v:?}");
        assert_eq!(
            v.reasons,
            [
                "RTT min 0.100 ms (mean 0.200) <= 150 ms (+1 ms for the hosts)",
                "upload 2.00 Gbit/s >= 250 Mbit/s per migration"
            ]
        );

        assert!(
            live_migration(&rtt(150.0, 150.0), 250.0).pass,
            "the limits themselves pass"
        );
        let v = live_migration(&rtt(180.0, 181.0), 900.0);
        assert!(!v.pass);
        assert_eq!(
            v.reasons[0],
            "RTT min 180.0 ms (mean 181.0) exceeds 150 ms (+1 ms for the hosts)"
        );
        let v = live_migration(&rtt(20.0, 20.0), 95.0);
        assert!(!v.pass);
        assert_eq!(v.reasons[1], "upload 95.0 Mbit/s is below 250 Mbit/s per migration");
    }

    #[test]
    fn a_path_of_exactly_150_ms_passes() {
        // What the emulated 150 ms link measures: the hosts add a fraction of
        // a millisecond, and queueing behind other pings raises the mean.
        let v = live_migration(&rtt(150.2, 150.7), 300.0);
        assert!(v.pass, "{v:?}");
        assert_eq!(
            v.reasons[0],
            "RTT min 150.2 ms (mean 150.7) <= 150 ms (+1 ms for the hosts)"
        );
        let v = live_migration(&rtt(150.9, 150.9), 300.0);
        assert!(v.pass, "{v:?}");
        // The mean does not decide: a loaded path at 150 ms still passes...
        assert!(live_migration(&rtt(150.3, 158.0), 300.0).pass);
        // ...but a path whose fastest ping is past the tolerance does not.
        let v = live_migration(&rtt(151.2, 151.4), 300.0);
        assert!(!v.pass);
        assert_eq!(
            v.reasons[0],
            "RTT min 151.2 ms (mean 151.4) exceeds 150 ms (+1 ms for the hosts)"
        );
    }

    #[test]
    fn the_verdict_uses_the_samples_minimum() {
        let samples: Vec<_> = [150.9, 150.2, 150.6, 150.8]
            .iter()
            .map(|&m| Duration::from_secs_f64(m / 1e3))
            .collect();
        let s = rtt_stats(&samples).unwrap();
        assert!((s.min_ms - 150.2).abs() < 1e-9 && s.mean_ms > 150.5, "{s:?}");
        assert!(live_migration(&s, 300.0).pass);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(transfer_secs(125e6, 1000.0), 1.0);
        assert!(transfer_secs(1.0, 0.0).is_infinite());
        assert_eq!(fmt_duration(3.21), "3.2 s");
        assert_eq!(fmt_duration(0.034), "0.03 s");
        assert_eq!(fmt_duration(42.0), "42 s");
        assert_eq!(fmt_duration(725.0), "12 min 05 s");
        assert_eq!(fmt_duration(3.0 * 3600.0 + 7.0 * 60.0), "3 h 07 min");
        assert_eq!(fmt_duration(4.0 * 86_400.0 + 3.0 * 3600.0), "4 d 03 h");
        assert_eq!(fmt_rate(312.4), "312 Mbit/s");
        assert_eq!(fmt_ms(12.34), "12.3 ms");
        assert_eq!(fmt_ms_fine(150.24), "150.2 ms");
        assert_eq!(fmt_ms_fine(0.0844), "0.084 ms");
    }
}
