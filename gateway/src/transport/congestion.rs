//! The `bdp` congestion controller: keep one and a half bandwidth-delay
//! products in flight, measured from the path, and ignore loss that is not
//! congestion.
//!
//! Why not quinn's controllers as they are:
//! - Cubic and NewReno halve (or cut by 30 %) on every loss, so random loss of
//!   1 % on a 150 ms path holds them to a few Mbit/s, as it does TCP.
//! - quinn's BBR ignores random loss, but quinn's pacer paces every controller
//!   at 1.25 x window / RTT, and BBR's window is twice the BDP: the sender
//!   runs at ~2.5 x the bottleneck rate until the bottleneck queue overflows,
//!   and a third of what it sends is retransmissions (measured here: 292 MB on
//!   the wire for 220 MB of data over a 100 Mbit/s, 150 ms link).
//!
//! This controller uses BBR's model (the bottleneck rate as the windowed
//! maximum of delivery-rate samples, the minimum RTT) but sizes the window so
//! that quinn's window-driven pacer lands at the right rate: a window of
//! 1.5 BDP keeps the pipe full, paces at ~1.25-1.9 x the rate, and never
//! queues more than half a BDP, which any bottleneck buffer sized at one BDP
//! (the usual rule) absorbs. Loss only counts when a round loses more than
//! [`HEAVY_LOSS`] of its packets: that is a queue overflowing or the path
//! shrinking, not a noisy link.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Share of a round's packets that must be lost before the controller backs
/// off. Random loss on bad WAN links stays around 1-2 %; a bottleneck queue
/// that overflows drops far more.
pub const HEAVY_LOSS: f64 = 0.05;
/// Fewest packets a round must lose for its loss rate to count.
const HEAVY_LOSS_MIN_PACKETS: u64 = 5;
/// In-flight target as a multiple of the BDP.
const WINDOW_GAIN: f64 = 1.5;
/// Worst spacing of ack bursts the window absorbs on short paths.
const ACK_AGGREGATION: Duration = Duration::from_millis(2);
/// Rounds the bandwidth filter remembers.
const BW_ROUNDS: usize = 10;
/// Startup ends when the bandwidth grew less than this over
/// [`PLATEAU_ROUNDS`] rounds: the pipe is full.
const PLATEAU_GROWTH: f64 = 1.25;
const PLATEAU_ROUNDS: u32 = 3;

/// Builds [`BdpController`]s.
#[derive(Debug, Clone, Default)]
pub struct BdpConfig {
    /// Window of the first round trip; `None` = RFC 9002's ~14.7 kB.
    pub initial_window: Option<u64>,
}

impl ControllerFactory for BdpConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let mut c = BdpController::new(now, current_mtu);
        if let Some(w) = self.initial_window {
            c.window = w.max(c.window);
            c.initial = c.window;
        }
        Box::new(c)
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct BdpController {
    mtu: u64,
    window: u64,
    initial: u64,
    startup: bool,
    /// Start of the current measurement round (one smoothed RTT long).
    round_start: Instant,
    round_acked: u64,
    round_lost: u64,
    round_app_limited: bool,
    /// Delivery-rate samples in bytes per second, newest last.
    bw_samples: VecDeque<f64>,
    /// Startup's plateau detection.
    plateau_bw: f64,
    plateau_rounds: u32,
    min_rtt: Duration,
    srtt: Duration,
    /// Upper bound on the window learned from heavy loss: a bottleneck
    /// buffer shallower than half a BDP overflows below the target.
    cap: u64,
}

impl BdpController {
    pub fn new(now: Instant, mtu: u16) -> Self {
        let mtu = u64::from(mtu);
        BdpController {
            mtu,
            window: initial_window(mtu),
            initial: initial_window(mtu),
            startup: true,
            round_start: now,
            round_acked: 0,
            round_lost: 0,
            round_app_limited: false,
            bw_samples: VecDeque::with_capacity(BW_ROUNDS),
            plateau_bw: 0.0,
            plateau_rounds: 0,
            min_rtt: Duration::ZERO,
            srtt: Duration::ZERO,
            cap: u64::MAX,
        }
    }

    fn min_window(&self) -> u64 {
        4 * self.mtu
    }

    /// The bottleneck rate estimate, bytes per second.
    pub fn bandwidth(&self) -> f64 {
        self.bw_samples.iter().copied().fold(0.0, f64::max)
    }

    /// Bytes in flight that fill the path at the estimated rate.
    pub fn bdp(&self) -> u64 {
        (self.bandwidth() * self.min_rtt.as_secs_f64()) as u64
    }

    pub fn in_startup(&self) -> bool {
        self.startup
    }

    fn target(&self) -> u64 {
        let bw = self.bandwidth();
        // On short paths the RTT is mostly the hosts' own processing, and
        // acks come in bursts up to a few milliseconds apart (interrupt
        // coalescing, scheduling): the minimum RTT then understates what must
        // be in flight. The smoothed RTT and two milliseconds of the rate
        // cover that; on a long path they add next to nothing.
        let model = (self.bdp() as f64 * WINDOW_GAIN).max(bw * self.srtt.as_secs_f64());
        let aggregation = bw * ACK_AGGREGATION.as_secs_f64();
        ((model + aggregation) as u64 + 4 * self.mtu)
            .min(self.cap)
            .max(self.min_window())
    }

    /// `bytes` were acknowledged; `srtt`, `latest` and `min_rtt` are the
    /// connection's smoothed, most recent and minimum RTT.
    pub fn acked(
        &mut self,
        now: Instant,
        bytes: u64,
        app_limited: bool,
        srtt: Duration,
        latest: Duration,
        min_rtt: Duration,
    ) {
        self.min_rtt = min_rtt;
        self.srtt = srtt;
        self.round_acked += bytes;
        self.round_app_limited |= app_limited;
        if self.startup && !app_limited {
            // Startup: the window triples every round trip (BBR's startup
            // gain is 2.89; a 150 ms path reaches 100 Mbit/s in ~5 rounds
            // instead of slow start's 8), but stays within three BDPs of what
            // the path has delivered so far, so a full pipe cannot be overrun
            // for long.
            let ceiling = 3 * self.bdp() + initial_window(self.mtu);
            self.window = (self.window + 2 * bytes).min(ceiling.max(self.window));
            // A queue is building at the bottleneck: the pipe is full.
            if latest > min_rtt + min_rtt / 4 + Duration::from_millis(2) && self.bdp() > 0 {
                self.startup = false;
                self.window = self.target();
            }
        }
        if now.saturating_duration_since(self.round_start) >= srtt.max(Duration::from_millis(1)) {
            self.end_round(now);
        }
    }

    fn end_round(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.round_start).as_secs_f64();
        let sent = self.round_acked + self.round_lost;
        if elapsed <= 0.0 || sent == 0 {
            self.round_start = now;
            return;
        }
        let sample = self.round_acked as f64 / elapsed;
        let loss = self.round_lost as f64 / sent as f64;
        // An app-limited round measures the application, not the path: it
        // only counts if it still beats what the path has shown.
        if !self.round_app_limited || sample > self.bandwidth() {
            if self.bw_samples.len() == BW_ROUNDS {
                self.bw_samples.pop_front();
            }
            self.bw_samples.push_back(sample);
        }
        // A handful of packets lost in a small round is chance, not a
        // queue overflowing: 1 of 20 is 5 %.
        if loss > HEAVY_LOSS && self.round_lost >= HEAVY_LOSS_MIN_PACKETS * self.mtu {
            // The bottleneck queue overflowed or the path shrank: stay below
            // the window that overflowed it.
            self.cap = (self.window - self.window / 8).max(self.min_window());
            self.startup = false;
            self.window = self.target();
        } else if self.startup {
            let bw = self.bandwidth();
            if bw >= self.plateau_bw * PLATEAU_GROWTH {
                self.plateau_bw = bw;
                self.plateau_rounds = 0;
            } else if !self.round_app_limited {
                self.plateau_rounds += 1;
                if self.plateau_rounds >= PLATEAU_ROUNDS {
                    self.startup = false;
                    self.window = self.target();
                }
            }
        } else {
            // Probe back up towards the model's target, ~6 % a round.
            self.cap = self.cap.saturating_add(self.cap / 16);
            self.window = self.target();
        }
        tracing::trace!(
            window = self.window,
            bw_mbit = self.bandwidth() * 8e-6,
            sample_mbit = sample * 8e-6,
            loss,
            min_rtt_ms = self.min_rtt.as_secs_f64() * 1e3,
            startup = self.startup,
            cap = self.cap,
            "congestion round"
        );
        self.round_start = now;
        self.round_acked = 0;
        self.round_lost = 0;
        self.round_app_limited = false;
    }
}

fn initial_window(mtu: u64) -> u64 {
    // RFC 9002's initial window.
    (10 * mtu).min(14_720.max(2 * mtu))
}

impl Controller for BdpController {
    fn on_ack(&mut self, now: Instant, _sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.acked(now, bytes, app_limited, rtt.get(), rtt.conservative(), rtt.min());
    }

    fn on_congestion_event(&mut self, now: Instant, _sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.round_lost += lost_bytes;
        if is_persistent_congestion {
            // Nothing got through for several RTOs: start over, from the
            // standard initial window whatever the configured one.
            *self = BdpController::new(now, self.mtu as u16);
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(self.min_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.window;
        m.pacing_rate = Some((self.bandwidth() * 8.0) as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fluid model of one bottleneck: each millisecond the sender puts
    /// `min(window - in_flight, pacing budget)` on the link; the bottleneck
    /// serves `rate` bytes per second from a drop-tail queue of `queue`
    /// bytes; served bytes are acked one `min_rtt` later, a share `loss` of
    /// them lost instead (random loss). Returns goodput (acked bytes per
    /// second over the last half) and the bytes dropped by the queue.
    fn simulate(rate: f64, min_rtt: Duration, queue: f64, loss: f64, secs: u64) -> (f64, f64, BdpController) {
        let t0 = Instant::now();
        let mut cc = BdpController::new(t0, 1452);
        let mut srtt = min_rtt;
        let step = Duration::from_millis(1);
        let mut queued = 0.0f64;
        let mut dropped = 0.0f64;
        let mut in_flight = 0.0f64;
        // (deliver_at, bytes, lost)
        let mut pipe: VecDeque<(Instant, f64, bool)> = VecDeque::new();
        let mut acked_late = 0.0;
        let mut rng = 0x2545F4914F6CDD1Du64;
        let steps = secs * 1000;
        for i in 0..steps {
            let now = t0 + step * i as u32;
            // Deliveries.
            while pipe.front().is_some_and(|p| p.0 <= now) {
                let (_, bytes, lost) = pipe.pop_front().unwrap();
                in_flight -= bytes;
                if lost {
                    cc.on_congestion_event(now, now, false, bytes as u64);
                } else {
                    let sample = min_rtt + Duration::from_secs_f64(queued / rate);
                    srtt = (srtt * 7 + sample) / 8;
                    cc.acked(now, bytes as u64, false, srtt, sample, min_rtt);
                    if i > steps / 2 {
                        acked_late += bytes;
                    }
                }
            }
            // The sender: window-limited, paced like quinn (1.25 x window / srtt).
            let pace = 1.25 * cc.window() as f64 / srtt.as_secs_f64() / 1000.0;
            let send = (cc.window() as f64 - in_flight).max(0.0).min(pace);
            in_flight += send;
            // The bottleneck: queue what fits, drop the rest.
            let room = (queue - queued).max(0.0);
            let accepted = send.min(room);
            dropped += send - accepted;
            queued += accepted;
            if send > accepted {
                // Reported lost when the packets behind it are acked: one RTT on.
                pipe.push_back((now + min_rtt, send - accepted, true));
            }
            let served = queued.min(rate / 1000.0);
            queued -= served;
            if served > 0.0 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let lost = (rng % 10_000) as f64 / 10_000.0 < loss;
                pipe.push_back((now + min_rtt, served, lost));
            }
        }
        (acked_late / (secs as f64 / 2.0), dropped, cc)
    }

    const MBIT_100: f64 = 12_500_000.0;

    #[test]
    fn fills_a_long_fat_link_without_overflowing_its_queue() {
        let rtt = Duration::from_millis(150);
        let bdp = MBIT_100 * 0.15;
        let (goodput, dropped, cc) = simulate(MBIT_100, rtt, bdp, 0.0, 20);
        assert!(!cc.in_startup());
        assert!(goodput > 0.97 * MBIT_100, "goodput {goodput}");
        assert!(
            cc.bandwidth() > 0.9 * MBIT_100 && cc.bandwidth() < 1.3 * MBIT_100,
            "bw {}",
            cc.bandwidth()
        );
        // Startup may overshoot once; steady state never drops.
        assert!(dropped < 2.0 * bdp, "dropped {dropped}");
    }

    #[test]
    fn one_percent_random_loss_costs_only_the_lost_packets() {
        let (goodput, _, cc) = simulate(MBIT_100, Duration::from_millis(150), MBIT_100 * 0.15, 0.01, 20);
        assert!(goodput > 0.95 * MBIT_100, "goodput {goodput} at 1% loss");
        assert!(
            cc.window() as f64 > MBIT_100 * 0.15,
            "window {} below one BDP",
            cc.window()
        );
    }

    #[test]
    fn a_shallow_queue_is_respected() {
        // A bottleneck with a tenth of a BDP of buffer: the window settles
        // where the queue holds, and goodput stays over half the link.
        let bdp = MBIT_100 * 0.15;
        let (goodput, dropped, _) = simulate(MBIT_100, Duration::from_millis(150), bdp / 10.0, 0.0, 20);
        // The cap costs goodput on such a path (~60 % here), far better
        // than overrunning it every round.
        assert!(goodput > 0.55 * MBIT_100, "goodput {goodput}");
        assert!(dropped < 0.10 * MBIT_100 * 20.0, "dropped {dropped}");
    }

    #[test]
    fn heavy_loss_backs_off_and_persistent_congestion_restarts() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(100);
        // A small round losing 3 packets of 40 (7.5 %) is chance: startup goes on.
        let mut cc = BdpController::new(t0, 1452);
        let mut now = t0;
        for _ in 0..37 {
            now += Duration::from_millis(2);
            cc.acked(now, 1452, false, rtt, rtt, rtt);
        }
        cc.on_congestion_event(now, now, false, 3 * 1452);
        now += Duration::from_millis(30);
        cc.acked(now, 1452, false, rtt, rtt, rtt);
        assert!(cc.in_startup(), "3 lost packets in a small round are noise");
        // Two rounds at 10 MB/s, the second losing a fifth of its bytes: the
        // bottleneck queue overflowed.
        let mut cc = BdpController::new(t0, 1452);
        let mut now = t0;
        for _ in 0..2 {
            for _ in 0..100 {
                now += Duration::from_millis(1);
                cc.acked(now, 10_000, false, rtt, rtt, rtt);
            }
        }
        let before = cc.window();
        cc.on_congestion_event(now, now, false, 500_000);
        now += Duration::from_millis(101);
        cc.acked(now, 1, false, rtt, rtt, rtt);
        assert!(!cc.in_startup(), "heavy loss ends startup");
        assert!(cc.window() < before, "and shrinks the window");
        cc.on_congestion_event(now, now, true, 1);
        assert!(cc.in_startup());
        assert_eq!(cc.window(), cc.initial_window());
    }
}
