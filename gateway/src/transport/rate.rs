//! Bandwidth caps. A lift shares the core link with production traffic, and
//! users of unthrottled vMotion and DRS know what that does to it; a cap keeps
//! a migration (or a whole endpoint) to what the network team allows.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A link rate in bits per second, written as network engineers do:
/// `100mbit`, `1gbit`, `500kbit`, `2.5Gbit/s`, or in bytes: `12.5MB/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rate(u64);

impl Rate {
    pub const fn from_bps(bps: u64) -> Rate {
        Rate(bps)
    }

    pub fn bps(self) -> u64 {
        self.0
    }

    /// Bytes per second.
    pub fn bytes_per_sec(self) -> f64 {
        self.0 as f64 / 8.0
    }

    /// The flow-control window of a receiver that takes data at this rate, on a path of
    /// round-trip time `rtt`: what the sender may have sent beyond what the receiver
    /// took in. [`CAP_WINDOW`] of the rate, or two round trips of it on a longer path
    /// (one round trip of window cannot keep the cap's rate flowing), at least
    /// [`MIN_CAP_WINDOW`]. A receive window sized from the link instead lets a sender
    /// push that whole window at line rate before a read-side cap is felt.
    pub fn burst_window(self, rtt: Duration) -> u64 {
        let span = CAP_WINDOW.max(rtt * 2);
        ((self.bytes_per_sec() * span.as_secs_f64()) as u64).max(MIN_CAP_WINDOW)
    }
}

/// How far ahead of a read-side cap a sender may get: see [`Rate::burst_window`].
pub const CAP_WINDOW: Duration = Duration::from_millis(50);
/// The smallest capped window: a few full datagrams, so a slow cap still sends whole ones.
pub const MIN_CAP_WINDOW: u64 = 16 * 1024;

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!("`{s}` is not a rate: write it like 100mbit, 1gbit, 2.5Gbit/s or 12.5MB/s (M = 10^6; bit or B says which)")
        };
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit = unit.trim().trim_end_matches("/s").trim_end_matches("ps");
        let (scale, bits) = match unit.to_ascii_lowercase().as_str() {
            // "mbps" is megabits to most people but megabytes to tc: only the
            // unambiguous spellings are accepted.
            "bit" => (1.0, 1.0),
            "kbit" => (1e3, 1.0),
            "mbit" => (1e6, 1.0),
            "gbit" => (1e9, 1.0),
            _ => match unit {
                "B" => (1.0, 8.0),
                "kB" | "KB" => (1e3, 8.0),
                "MB" => (1e6, 8.0),
                "GB" => (1e9, 8.0),
                _ => return Err(bad()),
            },
        };
        let bps = n * scale * bits;
        if !(1000.0..=1e12).contains(&bps) {
            return Err(format!("`{s}` is outside 1kbit to 1000gbit"));
        }
        Ok(Rate(bps as u64))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0 as f64;
        if b >= 1e9 {
            write!(f, "{}gbit", trim(b / 1e9))
        } else if b >= 1e6 {
            write!(f, "{}mbit", trim(b / 1e6))
        } else {
            write!(f, "{}kbit", trim(b / 1e3))
        }
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A pacing limit shared by whoever sends (or reads) under one cap.
///
/// Generic cell rate algorithm: each `acquire` books its bytes on a virtual
/// clock and waits until the clock is within `burst` of now, so the long-run
/// rate never exceeds the cap, bursts are bounded, and there is no refill
/// task.
#[derive(Debug)]
pub struct RateLimit {
    rate: Rate,
    burst: Duration,
    /// When the link, at the cap, would be free again.
    free_at: Mutex<Instant>,
}

impl RateLimit {
    pub fn new(rate: Rate) -> RateLimit {
        // A tenth of a second of traffic may go at once: enough for a
        // chunk at LAN rates, little enough to keep the average honest.
        RateLimit::with_burst(rate, Duration::from_millis(100))
    }

    /// A limit that lets `burst` of traffic go at once. Short bursts suit callers that
    /// take small pieces (a reader pacing its reads); one that sends whole chunks needs
    /// a burst of at least a chunk's time or it pauses between every chunk.
    pub fn with_burst(rate: Rate, burst: Duration) -> RateLimit {
        RateLimit {
            rate,
            burst,
            free_at: Mutex::new(Instant::now()),
        }
    }

    /// How much traffic may go at once.
    pub fn burst(&self) -> Duration {
        self.burst
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// How long the caller must wait before `bytes` may go, booking them.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate.bytes_per_sec());
        let mut free_at = self.free_at.lock().expect("rate limit lock poisoned");
        let start = (*free_at).max(now);
        *free_at = start + cost;
        start.saturating_duration_since(now + self.burst)
    }

    /// Waits until `bytes` may go.
    pub async fn acquire(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_network_engineers_write_them() {
        assert_eq!("100mbit".parse::<Rate>().unwrap().bps(), 100_000_000);
        assert_eq!("1gbit".parse::<Rate>().unwrap().bps(), 1_000_000_000);
        assert_eq!("2.5Gbit/s".parse::<Rate>().unwrap().bps(), 2_500_000_000);
        assert_eq!("12.5MB/s".parse::<Rate>().unwrap().bps(), 100_000_000);
        assert_eq!("500kbit".parse::<Rate>().unwrap().bps(), 500_000);
        for bad in ["100", "100M", "fast", "100mbps", "", "0mbit", "5000gbit"] {
            let e = bad.parse::<Rate>().unwrap_err();
            assert!(e.contains(bad) || e.contains("outside"), "{bad}: {e}");
        }
        assert_eq!(Rate::from_bps(100_000_000).to_string(), "100mbit");
        assert_eq!(Rate::from_bps(2_500_000_000).to_string(), "2.5gbit");
    }

    #[test]
    fn the_long_run_rate_never_exceeds_the_cap() {
        // 8 Mbit/s = 1 MB/s: 10 MB booked at once must span ~10 s of virtual time.
        let limit = RateLimit::new("8mbit".parse().unwrap());
        let t0 = Instant::now();
        let mut waited = Duration::ZERO;
        for _ in 0..10 {
            waited = limit.reserve(1_000_000, t0);
        }
        // The last megabyte may start once the first nine have gone, less the burst.
        assert!(
            waited >= Duration::from_millis(8_850) && waited <= Duration::from_millis(8_950),
            "{waited:?}"
        );
        // A small first send does not wait.
        let fresh = RateLimit::new("8mbit".parse().unwrap());
        assert_eq!(fresh.reserve(50_000, t0), Duration::ZERO);
    }
}
