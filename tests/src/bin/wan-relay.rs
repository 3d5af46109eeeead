//! wan-relay: the delay/loss element of the WAN emulator (`tests/wan/wan.sh`).
//!
//! The router namespace sends every forwarded packet of one direction to an NFQUEUE.
//! This process binds that queue in metadata-only copy mode (the packet itself stays
//! in the kernel), drops each packet with the loss probability (a DROP verdict at once)
//! and holds the others for the one-way delay, then gives them the ACCEPT verdict, in
//! arrival order: the delay is fixed, so a FIFO is already ordered by deadline.
//!
//! Timing: while packets are held the lane polls the socket without blocking and sleeps
//! until the earlier of the head's deadline and the next poll (`--poll-us`); with nothing
//! held it blocks in recv. So a packet is stamped at most one poll interval after it was
//! queued, and released as soon as the scheduler wakes the lane at its deadline; the
//! stats line reports how late releases were (`late_max_us`), which is the emulator's
//! own error, and how many packets the kernel could not queue for us (see
//! `/proc/net/netfilter/nfnetlink_queue`, columns queue_dropped and user_dropped).
//!
//! One process serves one or more queues with the same delay and loss, one thread per
//! queue. The stats line goes to stderr every `--stats-secs` and once more on SIGTERM
//! or SIGINT, after which the process exits (the kernel drops what is still held).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};

/// Packets admitted in one go before the lane looks at its deadlines again.
const DRAIN_BATCH: usize = 256;

#[derive(Parser, Debug)]
#[command(about = "NFQUEUE delay/loss element of the WAN emulator (tests/wan/wan.sh)")]
struct Args {
    /// NFQUEUE number to serve; repeat for several queues with the same delay and loss.
    #[arg(long, required = true)]
    queue: Vec<u16>,
    /// One-way delay added to every packet, in milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Probability that a packet is dropped (0.01 = 1 %), independently per packet.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed of the loss generator (queue N uses seed + N), for repeatable runs.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print a stats line to stderr every this many seconds (0: only at exit).
    #[arg(long, default_value_t = 10.0)]
    stats_secs: f64,
    /// How often the socket is polled while packets are held, in microseconds.
    #[arg(long, default_value_t = 100)]
    poll_us: u64,
    /// Kernel queue length (packets awaiting a verdict); must exceed rate x delay.
    #[arg(long, default_value_t = 1_000_000)]
    max_len: u32,
}

/// Counters of one queue, shared with the stats printer.
#[derive(Debug, Default)]
struct Stats {
    packets: AtomicU64,
    dropped: AtomicU64,
    released: AtomicU64,
    held: AtomicU64,
    /// Worst lateness of a release (deadline -> verdict sent) since the last stats line, µs.
    late_max_us: AtomicU64,
    /// The same since the start, µs.
    late_max_total_us: AtomicU64,
    late_sum_us: AtomicU64,
    /// Releases more than 1 ms late.
    late_over_1ms: AtomicU64,
    errors: AtomicU64,
}

struct Lane {
    num: u16,
    delay: Duration,
    loss: f64,
    poll: Duration,
    queue: nfq::Queue,
    held: VecDeque<(Instant, nfq::Message)>,
    rng: rand::rngs::StdRng,
    stats: Arc<Stats>,
}

impl Lane {
    fn open(args: &Args, num: u16, stats: Arc<Stats>) -> std::io::Result<Lane> {
        let mut queue = nfq::Queue::open()?;
        queue.bind(num).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("binding NFQUEUE {num}: {e} (root in the router namespace? another relay on it?)"),
            )
        })?;
        // Metadata only: the packet stays in the kernel, we only need its id.
        queue.set_copy_range(num, 0)?;
        queue.set_queue_max_len(num, args.max_len)?;
        // Without the GSO flag the kernel segments GSO/TSO super-packets before queueing,
        // so delay and loss act on wire-sized packets.
        queue.set_recv_gso(num, false)?;
        // Fail closed: a full queue drops (and counts) rather than bypassing the delay.
        queue.set_fail_open(num, false)?;
        Ok(Lane {
            num,
            delay: Duration::from_secs_f64(args.delay_ms / 1000.0),
            loss: args.loss.clamp(0.0, 1.0),
            poll: Duration::from_micros(args.poll_us.max(1)),
            queue,
            held: VecDeque::new(),
            rng: rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_add(u64::from(num))),
            stats,
        })
    }

    fn run(mut self) -> std::io::Result<()> {
        loop {
            // Block while nothing is held; poll while something is due later.
            self.queue.set_nonblocking(!self.held.is_empty());
            match self.queue.recv() {
                Ok(msg) => {
                    self.admit(msg)?;
                    // Drain what else is queued without blocking, a bounded batch, so a
                    // flood of arrivals cannot hold back the releases that are due.
                    self.queue.set_nonblocking(true);
                    for _ in 0..DRAIN_BATCH {
                        match self.queue.recv() {
                            Ok(msg) => self.admit(msg)?,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats.errors.fetch_add(1, Relaxed);
                    // ENOBUFS and friends: report and go on; anything persistent ends the lane.
                    if self.stats.errors.load(Relaxed) > 1000 {
                        return Err(e);
                    }
                    eprintln!("wan-relay q{}: recv: {e}", self.num);
                }
            }
            self.release()?;
            if let Some(&(due, _)) = self.held.front() {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep((due - now).min(self.poll));
                }
            }
        }
    }

    fn admit(&mut self, mut msg: nfq::Message) -> std::io::Result<()> {
        let now = Instant::now();
        self.stats.packets.fetch_add(1, Relaxed);
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            self.stats.dropped.fetch_add(1, Relaxed);
            msg.set_verdict(nfq::Verdict::Drop);
            return self.queue.verdict(msg);
        }
        msg.set_verdict(nfq::Verdict::Accept);
        self.held.push_back((now + self.delay, msg));
        self.stats.held.store(self.held.len() as u64, Relaxed);
        Ok(())
    }

    /// ACCEPTs every held packet whose deadline has passed, oldest first.
    fn release(&mut self) -> std::io::Result<()> {
        let now = Instant::now();
        let mut n = 0u64;
        while self.held.front().is_some_and(|(due, _)| *due <= now) {
            let (due, msg) = self.held.pop_front().expect("front checked");
            let late = now.duration_since(due).as_micros() as u64;
            self.stats.late_max_us.fetch_max(late, Relaxed);
            self.stats.late_max_total_us.fetch_max(late, Relaxed);
            self.stats.late_sum_us.fetch_add(late, Relaxed);
            if late > 1000 {
                self.stats.late_over_1ms.fetch_add(1, Relaxed);
            }
            self.queue.verdict(msg)?;
            n += 1;
        }
        if n > 0 {
            self.stats.released.fetch_add(n, Relaxed);
            self.stats.held.store(self.held.len() as u64, Relaxed);
        }
        Ok(())
    }
}

fn print_stats(lanes: &[(u16, Arc<Stats>)], what: &str) {
    for (num, s) in lanes {
        let released = s.released.load(Relaxed);
        eprintln!(
            "wan-relay q{num} {what}: packets {} dropped {} released {} held {} late_max_us {} late_max_total_us {} \
             late_mean_us {} late_over_1ms {} errors {}",
            s.packets.load(Relaxed),
            s.dropped.load(Relaxed),
            released,
            s.held.load(Relaxed),
            s.late_max_us.swap(0, Relaxed),
            s.late_max_total_us.load(Relaxed),
            s.late_sum_us.load(Relaxed) / released.max(1),
            s.late_over_1ms.load(Relaxed),
            s.errors.load(Relaxed),
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!((0.0..=1.0).contains(&args.loss), "--loss is a probability (0.01 = 1 %)");
    anyhow::ensure!(
        args.delay_ms >= 0.0 && args.delay_ms.is_finite(),
        "--delay-ms must be >= 0"
    );
    let mut lanes = Vec::new();
    let mut shown = Vec::new();
    for &num in &args.queue {
        let stats = Arc::new(Stats::default());
        lanes.push(Lane::open(&args, num, stats.clone())?);
        shown.push((num, stats));
    }
    for lane in lanes {
        let num = lane.num;
        std::thread::Builder::new().name(format!("q{num}")).spawn(move || {
            if let Err(e) = lane.run() {
                eprintln!("wan-relay q{num}: {e}");
                std::process::exit(1);
            }
        })?;
    }
    eprintln!(
        "wan-relay: queues {:?} delay {} ms loss {} seed {} poll {} us",
        args.queue, args.delay_ms, args.loss, args.seed, args.poll_us
    );

    // The main thread prints the stats and waits for SIGTERM/SIGINT.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let every = (args.stats_secs > 0.0).then(|| Duration::from_secs_f64(args.stats_secs));
        let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => if every.is_some() { print_stats(&shown, "stats") },
            }
        }
        print_stats(&shown, "exit");
        anyhow::Ok(())
    })?;
    std::process::exit(0);
}
