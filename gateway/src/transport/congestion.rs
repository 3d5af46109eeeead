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
            c.floor = c.window;
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
    /// Smallest and largest RTT of the packets acked this round (ack time
    /// minus send time), for the logs.
    round_rtt_min: Duration,
    round_rtt_max: Duration,
    /// Since when every acknowledged packet came back later than startup's
    /// queue threshold.
    late_since: Option<Instant>,
    /// The bandwidth filter holds a round the window, not the application,
    /// limited: only then does it say anything about the path.
    measured: bool,
    /// Delivery-rate samples in bytes per second, newest last.
    bw_samples: VecDeque<f64>,
    /// Startup's plateau detection.
    plateau_bw: f64,
    plateau_rounds: u32,
    min_rtt: Duration,
    srtt: Duration,
    /// Least window outside heavy loss: the configured first window (half
    /// the BDP of the path the operator or `link-test` gave). A startup that
    /// ends on a noisy signal then keeps that much in flight instead of
    /// dropping to what the first round trips happened to deliver; the first
    /// heavy loss clears it, as the path is then not what was given.
    floor: u64,
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
            round_rtt_min: Duration::MAX,
            round_rtt_max: Duration::ZERO,
            late_since: None,
            measured: false,
            bw_samples: VecDeque::with_capacity(BW_ROUNDS),
            plateau_bw: 0.0,
            plateau_rounds: 0,
            min_rtt: Duration::ZERO,
            srtt: Duration::ZERO,
            floor: 0,
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
            .max(self.floor)
            .min(self.cap)
            .max(self.min_window())
    }

    /// `bytes` sent at `sent` were acknowledged at `now`; `srtt` and
    /// `min_rtt` are the connection's smoothed and minimum RTT.
    pub fn acked(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        srtt: Duration,
        min_rtt: Duration,
    ) {
        self.min_rtt = min_rtt;
        self.srtt = srtt;
        self.round_acked += bytes;
        self.round_app_limited |= app_limited;
        // This packet's own RTT, not quinn's latest sample: that one is
        // taken after the controller hears of the ack, so the first data
        // acks of a migration still carry the plan's round trip, which
        // includes the endpoint's time to answer it (tens of milliseconds
        // or more on a busy host).
        let packet_rtt = now.saturating_duration_since(sent);
        self.round_rtt_min = self.round_rtt_min.min(packet_rtt);
        self.round_rtt_max = self.round_rtt_max.max(packet_rtt);
        let queue_threshold = min_rtt + min_rtt / 4 + Duration::from_millis(2);
        if packet_rtt > queue_threshold {
            self.late_since.get_or_insert(now);
        } else {
            self.late_since = None;
        }
        if self.startup && !app_limited {
            // Startup: the window triples every round trip (BBR's startup
            // gain is 2.89; a 150 ms path reaches 100 Mbit/s in ~5 rounds
            // instead of slow start's 8), but stays within three BDPs of what
            // the path has delivered so far, so a full pipe cannot be overrun
            // for long. On a path given by its figures, what it was said to
            // hold counts as delivered until heavy loss says otherwise: the
            // first round's few samples would hold the window at the first
            // flight for a round trip more.
            let ceiling = 3 * self.bdp().max(self.floor) + initial_window(self.mtu);
            self.window = (self.window + 2 * bytes).min(ceiling.max(self.window));
            // A queue is building at the bottleneck: the pipe is full. Not
            // before a round has measured the path: the target would come
            // from the control phase's trickle and shrink the window to a
            // few kB, from which the lift then climbs for seconds.
            let late_for = self.late_since.map(|t| now.saturating_duration_since(t));
            // Late for an eighth of the minimum RTT: a busy host that
            // handles a batch of acknowledgements late makes them all look
            // late at one instant, a queue keeps them late. On a short path
            // that is microseconds, as before: startup there lasts
            // milliseconds, so an early end costs next to nothing.
            if self.measured && late_for.is_some_and(|d| d >= min_rtt / 8) {
                let before = self.window;
                self.startup = false;
                self.window = self.target();
                tracing::debug!(
                    reason = "rtt",
                    late_ms = late_for.unwrap_or_default().as_secs_f64() * 1e3,
                    packet_rtt_ms = packet_rtt.as_secs_f64() * 1e3,
                    min_rtt_ms = min_rtt.as_secs_f64() * 1e3,
                    srtt_ms = srtt.as_secs_f64() * 1e3,
                    bw_mbit = self.bandwidth() * 8e-6,
                    window_before = before,
                    window = self.window,
                    "congestion: startup ends"
                );
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
            self.measured |= !self.round_app_limited;
        }
        // A handful of packets lost in a small round is chance, not a
        // queue overflowing: 1 of 20 is 5 %.
        if loss > HEAVY_LOSS && self.round_lost >= HEAVY_LOSS_MIN_PACKETS * self.mtu {
            // The bottleneck queue overflowed or the path shrank: stay below
            // the window that overflowed it.
            self.cap = (self.window - self.window / 8).max(self.min_window());
            self.floor = 0;
            let (before, was_startup) = (self.window, self.startup);
            self.startup = false;
            self.window = self.target();
            tracing::debug!(
                reason = "heavy loss",
                in_startup = was_startup,
                loss,
                bw_mbit = self.bandwidth() * 8e-6,
                window_before = before,
                window = self.window,
                cap = self.cap,
                "congestion: backing off"
            );
        } else if self.startup {
            let bw = self.bandwidth();
            if bw >= self.plateau_bw * PLATEAU_GROWTH {
                self.plateau_bw = bw;
                self.plateau_rounds = 0;
            } else if !self.round_app_limited {
                self.plateau_rounds += 1;
                if self.plateau_rounds >= PLATEAU_ROUNDS {
                    let before = self.window;
                    self.startup = false;
                    self.window = self.target();
                    tracing::debug!(
                        reason = "plateau",
                        bw_mbit = bw * 8e-6,
                        plateau_mbit = self.plateau_bw * 8e-6,
                        window_before = before,
                        window = self.window,
                        "congestion: startup ends"
                    );
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
            acked = self.round_acked,
            app_limited = self.round_app_limited,
            loss,
            min_rtt_ms = self.min_rtt.as_secs_f64() * 1e3,
            rtt_round_min_ms = self.round_rtt_min.as_secs_f64() * 1e3,
            rtt_round_max_ms = self.round_rtt_max.as_secs_f64() * 1e3,
            startup = self.startup,
            cap = self.cap,
            "congestion round"
        );
        self.round_start = now;
        self.round_acked = 0;
        self.round_lost = 0;
        self.round_app_limited = false;
        self.round_rtt_min = Duration::MAX;
        self.round_rtt_max = Duration::ZERO;
    }
}

fn initial_window(mtu: u64) -> u64 {
    // RFC 9002's initial window.
    (10 * mtu).min(14_720.max(2 * mtu))
}

impl Controller for BdpController {
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.acked(now, sent, bytes, app_limited, rtt.get(), rtt.min());
    }

    fn on_congestion_event(&mut self, now: Instant, _sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.round_lost += lost_bytes;
        if is_persistent_congestion {
            tracing::debug!(window = self.window, "congestion: persistent congestion, starting over");
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

    /// What happens around the link in a simulated run.
    #[derive(Clone, Copy, Default)]
    struct Scenario {
        /// The window of the first round trip (`--link-rate`'s half BDP).
        initial_window: Option<u64>,
        /// A migration's control phase before its data (handshake, login,
        /// plan): a few kB a round trip, acked as app-limited.
        control: Duration,
        /// (start, length) after the data starts: the sending host is busy
        /// and processes no acknowledgements, then all of them at once.
        stall: Option<(Duration, Duration)>,
    }

    struct Run {
        /// Acked bytes per second over the last half of the run.
        goodput: f64,
        /// Bytes the bottleneck queue dropped.
        dropped: f64,
        /// Bytes the bottleneck served in each 100 ms after the data started.
        served: Vec<f64>,
        cc: BdpController,
    }

    impl Run {
        /// The bottleneck's mean rate over `from..to` after the data started.
        fn rate(&self, from: Duration, to: Duration) -> f64 {
            let (a, b) = ((from.as_millis() / 100) as usize, (to.as_millis() / 100) as usize);
            self.served[a..b].iter().sum::<f64>() / (to - from).as_secs_f64()
        }
    }

    /// A fluid model of one bottleneck: each millisecond the sender puts
    /// `min(window - in_flight, pacing budget)` on the link; the bottleneck
    /// serves `rate` bytes per second from a drop-tail queue of `queue`
    /// bytes; served bytes are acked one `min_rtt` later, a share `loss` of
    /// them lost instead (random loss).
    fn simulate_with(rate: f64, min_rtt: Duration, queue: f64, loss: f64, secs: u64, sc: Scenario) -> Run {
        // Ahead of now, so that send times a few hundred ms back exist.
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut cc = match sc.initial_window {
            Some(w) => *Arc::new(BdpConfig {
                initial_window: Some(w),
            })
            .build(t0, 1452)
            .into_any()
            .downcast::<BdpController>()
            .unwrap(),
            None => BdpController::new(t0, 1452),
        };
        let mut srtt = min_rtt;
        let step = Duration::from_millis(1);
        let mut queued = 0.0f64;
        let mut dropped = 0.0f64;
        let mut in_flight = 0.0f64;
        // (ack due, bytes, lost, sent)
        let mut pipe: VecDeque<(Instant, f64, bool, Instant)> = VecDeque::new();
        let mut acked_late = 0.0;
        let mut served_log = Vec::new();
        let mut rng = 0x2545F4914F6CDD1Du64;
        let steps = secs * 1000;
        let data_start = t0 + sc.control;
        for i in 0..steps {
            let now = t0 + step * i as u32;
            let in_data = now >= data_start;
            let stalled = sc
                .stall
                .is_some_and(|(at, len)| now >= data_start + at && now < data_start + at + len);
            // Deliveries.
            while !stalled && pipe.front().is_some_and(|p| p.0 <= now) {
                let (_, bytes, lost, sent) = pipe.pop_front().unwrap();
                in_flight -= bytes;
                if lost {
                    cc.on_congestion_event(now, sent, false, bytes as u64);
                } else {
                    let sample = now - sent;
                    srtt = (srtt * 7 + sample) / 8;
                    cc.acked(now, sent, bytes as u64, now <= data_start, srtt, min_rtt);
                    if i > steps / 2 {
                        acked_late += bytes;
                    }
                }
            }
            // The sender: window-limited, paced like quinn (1.25 x window /
            // srtt); in the control phase a couple of packets a round trip.
            let send = if in_data {
                let pace = 1.25 * cc.window() as f64 / srtt.as_secs_f64() / 1000.0;
                (cc.window() as f64 - in_flight).max(0.0).min(pace)
            } else if i % min_rtt.as_millis() as u64 == 0 {
                3000.0
            } else {
                0.0
            };
            in_flight += send;
            // The bottleneck: queue what fits, drop the rest.
            let room = (queue - queued).max(0.0);
            let accepted = send.min(room);
            dropped += send - accepted;
            queued += accepted;
            if send > accepted {
                // Reported lost when the packets behind it are acked: one RTT on.
                pipe.push_back((now + min_rtt, send - accepted, true, now));
            }
            let served = queued.min(rate / 1000.0);
            // What is served now waited behind the rest of the queue.
            let waited = Duration::from_secs_f64((queued - served) / rate);
            queued -= served;
            if in_data {
                let slot = (now - data_start).as_millis() as usize / 100;
                if served_log.len() <= slot {
                    served_log.resize(slot + 1, 0.0);
                }
                served_log[slot] += served;
            }
            if served > 0.0 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let lost = (rng % 10_000) as f64 / 10_000.0 < loss;
                pipe.push_back((now + min_rtt, served, lost, now.checked_sub(waited).unwrap_or(now)));
            }
        }
        Run {
            goodput: acked_late / (secs as f64 / 2.0),
            dropped,
            served: served_log,
            cc,
        }
    }

    /// [`simulate_with`] from RFC 9002's start, data from the first millisecond:
    /// goodput over the last half, bytes dropped, the controller.
    fn simulate(rate: f64, min_rtt: Duration, queue: f64, loss: f64, secs: u64) -> (f64, f64, BdpController) {
        let run = simulate_with(rate, min_rtt, queue, loss, secs, Scenario::default());
        (run.goodput, run.dropped, run.cc)
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

    /// The lift of a migration with `--link-rate` on the 150 ms, 100 Mbit/s
    /// link: a control phase of three round trips, then the data from half
    /// the BDP.
    fn known_path(stall: Option<(Duration, Duration)>, loss: f64) -> Run {
        let rtt = Duration::from_millis(150);
        let bdp = MBIT_100 * 0.15;
        let sc = Scenario {
            initial_window: Some((bdp / 2.0) as u64),
            control: 3 * rtt,
            stall,
        };
        simulate_with(MBIT_100, rtt, bdp, loss, 10, sc)
    }

    fn per_100ms(run: &Run) -> Vec<u64> {
        run.served.iter().take(30).map(|b| (b * 80e-6) as u64).collect()
    }

    #[test]
    fn a_known_path_runs_at_the_link_rate_from_its_first_round_trips() {
        let run = known_path(None, 0.0);
        let first = run.rate(Duration::ZERO, Duration::from_secs(1));
        assert!(first > 0.85 * MBIT_100, "first second {first}: {:?}", per_100ms(&run));
        assert!(run.dropped < 0.15 * MBIT_100, "dropped {}", run.dropped);
    }

    #[test]
    fn acks_held_up_by_a_busy_host_do_not_end_startup_early() {
        // The host stalls for 60 ms as the first data acks come back (a
        // round trip after the data starts), then handles them all at once:
        // their RTT reads 60 ms long though no queue built up.
        for at in [150, 200, 300, 450] {
            let stall = Some((Duration::from_millis(at), Duration::from_millis(60)));
            let run = known_path(stall, 0.0);
            let first = run.rate(Duration::ZERO, Duration::from_secs(1));
            let second = run.rate(Duration::from_secs(1), Duration::from_secs(2));
            assert!(
                first > 0.8 * MBIT_100 && second > 0.95 * MBIT_100,
                "stall at {at} ms: {first} then {second}: {:?}",
                per_100ms(&run)
            );
        }
    }

    #[test]
    fn a_known_path_at_one_percent_loss_neither_collapses_nor_overruns() {
        let run = known_path(None, 0.01);
        let first = run.rate(Duration::ZERO, Duration::from_secs(1));
        assert!(first > 0.8 * MBIT_100, "first second {first}: {:?}", per_100ms(&run));
        assert!(run.goodput > 0.95 * MBIT_100, "goodput {}", run.goodput);
        assert!(run.dropped < 0.15 * MBIT_100, "dropped {}", run.dropped);
    }

    #[test]
    fn a_burst_of_late_acks_does_not_end_startup_but_a_queue_does() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let rtt = Duration::from_millis(150);
        let mut cc = *Arc::new(BdpConfig {
            initial_window: Some(937_500),
        })
        .build(t0, 1452)
        .into_any()
        .downcast::<BdpController>()
        .unwrap();
        let mut now = t0;
        // The control phase: a trickle, app-limited; the plan's answer took
        // the endpoint 80 ms.
        for _ in 0..3 {
            now += rtt;
            cc.acked(now, now - rtt, 1200, true, rtt, rtt);
        }
        now += Duration::from_millis(80);
        cc.acked(now, now - rtt - Duration::from_millis(80), 1200, true, rtt, rtt);
        // The first data acks, on time: the plan's late answer is no queue.
        for _ in 0..20 {
            now += Duration::from_millis(1);
            cc.acked(now, now - rtt, 10_000, false, rtt, rtt);
        }
        assert!(cc.in_startup(), "a late answer to the plan ended startup");
        assert!(cc.window() >= 937_500, "window {}", cc.window());
        // Two rounds at 10 MB/s measure the path.
        for _ in 0..300 {
            now += Duration::from_millis(1);
            cc.acked(now, now - rtt, 10_000, false, rtt, rtt);
        }
        assert!(cc.in_startup());
        let before = cc.window();
        // The host was busy for 60 ms and handles forty acks at once, the
        // oldest held up the longest.
        now += Duration::from_millis(60);
        for k in (0..40u32).rev() {
            cc.acked(
                now,
                now - rtt - Duration::from_micros(1500) * k,
                10_000,
                false,
                rtt,
                rtt,
            );
        }
        for _ in 0..20 {
            now += Duration::from_millis(1);
            cc.acked(now, now - rtt, 10_000, false, rtt, rtt);
        }
        assert!(cc.in_startup(), "a burst of late acks ended startup");
        assert!(cc.window() >= before, "window {} < {before}", cc.window());
        // A queue: every packet comes back 50 ms late, for longer than a
        // burst lasts.
        for _ in 0..30 {
            now += Duration::from_millis(1);
            cc.acked(now, now - rtt - Duration::from_millis(50), 10_000, false, rtt, rtt);
        }
        assert!(!cc.in_startup(), "a standing queue did not end startup");
        assert!(
            cc.bandwidth() > 0.9 * MBIT_100 * 0.8,
            "bw {} after the exit",
            cc.bandwidth()
        );
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
            cc.acked(now, now - rtt, 1452, false, rtt, rtt);
        }
        cc.on_congestion_event(now, now, false, 3 * 1452);
        now += Duration::from_millis(30);
        cc.acked(now, now - rtt, 1452, false, rtt, rtt);
        assert!(cc.in_startup(), "3 lost packets in a small round are noise");
        // Two rounds at 10 MB/s, the second losing a fifth of its bytes: the
        // bottleneck queue overflowed.
        let mut cc = BdpController::new(t0, 1452);
        let mut now = t0;
        for _ in 0..2 {
            for _ in 0..100 {
                now += Duration::from_millis(1);
                cc.acked(now, now - rtt, 10_000, false, rtt, rtt);
            }
        }
        let before = cc.window();
        cc.on_congestion_event(now, now, false, 500_000);
        now += Duration::from_millis(101);
        cc.acked(now, now - rtt, 1, false, rtt, rtt);
        assert!(!cc.in_startup(), "heavy loss ends startup");
        assert!(cc.window() < before, "and shrinks the window");
        cc.on_congestion_event(now, now, true, 1);
        assert!(cc.in_startup());
        assert_eq!(cc.window(), cc.initial_window());
    }
}
