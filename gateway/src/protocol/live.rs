//! The cloud's side of a live migration as a state machine with no I/O.
//!
//! ```text
//! edge                                   cloud
//! Hello{user,password}          ->
//!                               <-       Welcome | Refused(BadCredentials)
//! Plan(LivePlan), BootFile...   ->       (plan checked, boot files hashed)
//!                               <-       Ready{exports} | Refused(PlanRejected, [problems])
//! (NBD mirror and memory in tunnel streams)
//! Switchover                    ->
//!                               <-       Committed{vm id, report} | Refused(...)
//! ```
//! The driver starts the destination hypervisor between `Plan` and `Ready`, accepts
//! tunnel streams only while [`LiveReceiver::tunnels_open`], and runs the destination
//! and registers the VM on [`LiveEvent::Switchover`]. Anything else ends in
//! [`LiveEvent::TearDown`]: the destination is stopped and its files removed; the source,
//! which the edge resumes, never stopped.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::ProtocolError;
use crate::plan::MigrationReport;
use crate::wire::live::{LiveCloudMessage, LiveEdgeMessage, LivePlan};
use crate::wire::RefusalCode;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// Check the credential; answer with [`LiveReceiver::authenticated`].
    Authenticate {
        agent: String,
        user: String,
        password: String,
    },
    /// Check the plan against the domain (placement, capacity, a hypervisor to run
    /// it); answer with [`LiveReceiver::plan_checked`]. Boot file bytes follow.
    CheckPlan(Box<LivePlan>),
    /// Bytes of boot file `file` at `offset`, already checked for order and length:
    /// store them.
    BootBytes { file: u8, offset: u64, bytes: Vec<u8> },
    /// The plan passed and its boot files arrived intact: create the disks, start the
    /// destination waiting for the memory stream and export its disks; answer with
    /// [`LiveReceiver::destination_ready`] or [`LiveReceiver::refuse`].
    StartDestination,
    /// The source has paused with its disks in sync: once the destination has all of
    /// the memory, stop exporting its disks, run it, register the VM; answer with
    /// [`LiveReceiver::committed`] or [`LiveReceiver::refuse`].
    Switchover,
    /// The migration ended without a VM: stop the destination, remove its files.
    TearDown { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Authenticating,
    AwaitPlan,
    Checking,
    Boot,
    Starting,
    Ready,
    Switching,
    Done,
    Failed,
}

/// The boot file being received: its index, bytes so far and running hash.
struct BootRx(u8, u64, ring::digest::Context);

impl std::fmt::Debug for BootRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootRx(file {}, {} bytes)", self.0, self.1)
    }
}

/// How long each phase of a live migration may take on the cloud's side. Every phase
/// has one, so an edge that stops half-way (a plan and all but the last boot file piece,
/// or a destination it never feeds) holds its migration slot, staged disks and waiting
/// hypervisor only that long.
#[derive(Debug, Clone)]
pub struct LiveTimeouts {
    /// From the connection to the edge's Hello (10 s by default).
    pub hello: Duration,
    /// From the connection to a destination ready for the tunnels: the plan, its check,
    /// the boot files (up to 2 x 256 MiB: 10 minutes by default is 7 Mbit/s for the
    /// largest) and the start of the destination.
    pub setup: Duration,
    /// With the destination waiting: the longest time without tunnel traffic (the
    /// mirror and the memory stream move all the time while a migration converges;
    /// 2 minutes by default). The switchover itself is bounded by the driver.
    pub ready_idle: Duration,
}

impl Default for LiveTimeouts {
    fn default() -> Self {
        LiveTimeouts {
            hello: Duration::from_secs(10),
            setup: Duration::from_secs(600),
            ready_idle: Duration::from_secs(120),
        }
    }
}

/// One live migration as the cloud endpoint sees it.
#[derive(Debug)]
pub struct LiveReceiver {
    timeouts: LiveTimeouts,
    connected: Instant,
    /// Last tunnel traffic (or the destination becoming ready) while in [`Phase::Ready`].
    last_progress: Instant,
    phase: Phase,
    plan: Option<LivePlan>,
    /// Boot file being received: (index, bytes so far, running hash).
    boot: Option<BootRx>,
    checked: bool,
    outbox: VecDeque<LiveCloudMessage>,
    events: VecDeque<LiveEvent>,
}

impl LiveReceiver {
    /// A session for a connection made at `now` (its deadlines count from then).
    pub fn new(timeouts: LiveTimeouts, now: Instant) -> Self {
        LiveReceiver {
            timeouts,
            connected: now,
            last_progress: now,
            phase: Phase::AwaitHello,
            plan: None,
            boot: None,
            checked: false,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    pub fn plan(&self) -> Option<&LivePlan> {
        self.plan.as_ref()
    }

    /// Tunnel streams may be accepted: the destination waits for them.
    pub fn tunnels_open(&self) -> bool {
        matches!(self.phase, Phase::Ready | Phase::Switching)
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed)
    }

    fn unexpected(&self, message: &'static str) -> ProtocolError {
        ProtocolError::Unexpected {
            message,
            phase: match self.phase {
                Phase::AwaitHello => "waiting for hello",
                Phase::Authenticating => "authenticating",
                Phase::AwaitPlan => "waiting for the live plan",
                Phase::Checking => "checking the live plan",
                Phase::Boot => "receiving boot files",
                Phase::Starting => "starting the destination",
                Phase::Ready => "migrating",
                Phase::Switching => "switching over",
                Phase::Done => "done",
                Phase::Failed => "failed",
            },
        }
    }

    /// A control message from the edge. An error is a protocol violation: the
    /// driver refuses with [`RefusalCode::ProtocolViolation`] and closes.
    pub fn handle(&mut self, msg: LiveEdgeMessage) -> Result<(), ProtocolError> {
        match msg {
            LiveEdgeMessage::Hello { agent, user, password } => {
                if self.phase != Phase::AwaitHello {
                    return Err(self.unexpected("Hello"));
                }
                self.phase = Phase::Authenticating;
                self.events.push_back(LiveEvent::Authenticate { agent, user, password });
            }
            LiveEdgeMessage::Plan(plan) => {
                if self.phase != Phase::AwaitPlan {
                    return Err(self.unexpected("Plan"));
                }
                plan.check_limits()?;
                self.phase = Phase::Checking;
                self.boot = plan
                    .boot
                    .as_ref()
                    .map(|_| BootRx(0, 0, ring::digest::Context::new(&ring::digest::SHA256)));
                self.plan = Some((*plan).clone());
                self.events.push_back(LiveEvent::CheckPlan(plan));
            }
            LiveEdgeMessage::BootFile { file, offset, bytes } => {
                // Pieces may arrive while the plan is being checked.
                if !matches!(self.phase, Phase::Checking | Phase::Boot) {
                    return Err(self.unexpected("BootFile"));
                }
                let expected = self.expected_boot_len();
                let Some(BootRx(index, done, hash)) = self.boot.as_mut() else {
                    return Err(ProtocolError::OutsidePlan(
                        "boot file bytes, but the plan has no boot files".into(),
                    ));
                };
                let Some(len) = expected else {
                    return Err(ProtocolError::OutsidePlan(format!(
                        "boot file {file} is not in the plan"
                    )));
                };
                if file != *index || offset != *done || bytes.is_empty() || *done + bytes.len() as u64 > len {
                    return Err(ProtocolError::OutsidePlan(format!(
                        "boot file {file} piece at {offset} ({} bytes) does not follow file {index} at {done} of {len} bytes",
                        bytes.len()
                    )));
                }
                hash.update(&bytes);
                *done += bytes.len() as u64;
                let complete = *done == len;
                self.events.push_back(LiveEvent::BootBytes { file, offset, bytes });
                if complete {
                    self.boot_file_complete()?;
                }
            }
            LiveEdgeMessage::Switchover => {
                if self.phase != Phase::Ready {
                    return Err(self.unexpected("Switchover"));
                }
                self.phase = Phase::Switching;
                self.events.push_back(LiveEvent::Switchover);
            }
            LiveEdgeMessage::Abort { reason } => {
                if self.is_finished() {
                    return Ok(());
                }
                self.fail(RefusalCode::Aborted, vec![format!("the edge aborted: {reason}")]);
            }
        }
        Ok(())
    }

    /// Length of the boot file being received, if any is left.
    fn expected_boot_len(&self) -> Option<u64> {
        let boot = self.plan.as_ref()?.boot.as_ref()?;
        match self.boot.as_ref()?.0 {
            0 => Some(boot.kernel.len),
            1 => boot.initrd.as_ref().map(|f| f.len),
            _ => None,
        }
    }

    fn boot_file_complete(&mut self) -> Result<(), ProtocolError> {
        let boot = self
            .plan
            .as_ref()
            .and_then(|p| p.boot.clone())
            .expect("boot files are planned");
        let BootRx(index, _, hash) = self.boot.take().expect("a boot file is being received");
        let want = if index == 0 {
            &boot.kernel
        } else {
            boot.initrd.as_ref().expect("initrd planned")
        };
        if hash.finish().as_ref() != want.sha256 {
            return Err(ProtocolError::Integrity(format!(
                "boot file {} does not match its SHA-256 in the plan",
                if index == 0 { "kernel" } else { "initrd" }
            )));
        }
        if index == 0 && boot.initrd.is_some() {
            self.boot = Some(BootRx(1, 0, ring::digest::Context::new(&ring::digest::SHA256)));
        }
        self.maybe_start();
        Ok(())
    }

    /// Start the destination once the plan passed and every boot byte arrived.
    fn maybe_start(&mut self) {
        if self.checked && self.boot.is_none() && matches!(self.phase, Phase::Checking | Phase::Boot) {
            self.phase = Phase::Starting;
            self.events.push_back(LiveEvent::StartDestination);
        }
    }

    /// The driver checked the credential: `Ok((endpoint, role))` or the refusal.
    pub fn authenticated(&mut self, result: Result<(String, String), (RefusalCode, String)>) {
        if self.phase != Phase::Authenticating {
            return;
        }
        match result {
            Ok((endpoint, role)) => {
                self.phase = Phase::AwaitPlan;
                self.outbox.push_back(LiveCloudMessage::Welcome { endpoint, role });
            }
            Err((code, problem)) => self.fail(code, vec![problem]),
        }
    }

    /// The driver checked the plan against the domain.
    pub fn plan_checked(&mut self, result: Result<(), (RefusalCode, Vec<String>)>) {
        if self.phase != Phase::Checking && self.phase != Phase::Boot {
            return;
        }
        match result {
            Ok(()) => {
                self.checked = true;
                self.phase = Phase::Boot;
                self.maybe_start();
            }
            Err((code, problems)) => self.fail(code, problems),
        }
    }

    /// The destination waits for the memory stream with its disks exported.
    pub fn destination_ready(&mut self, migration_id: String, exports: Vec<String>, now: Instant) {
        if self.phase == Phase::Starting {
            self.phase = Phase::Ready;
            self.last_progress = now;
            self.outbox.push_back(LiveCloudMessage::Ready { migration_id, exports });
        }
    }

    /// The destination runs and the VM is registered.
    pub fn committed(&mut self, vm_id: String, report: MigrationReport) {
        if self.phase == Phase::Switching {
            self.phase = Phase::Done;
            self.outbox.push_back(LiveCloudMessage::Committed {
                vm_id,
                report: Box::new(report),
            });
        }
    }

    /// The migration cannot go on (the driver failed, the link broke, a peer violated
    /// the protocol): tell the edge if it can still hear, and tear the destination down.
    pub fn refuse(&mut self, code: RefusalCode, problems: Vec<String>) {
        self.fail(code, problems);
    }

    fn fail(&mut self, code: RefusalCode, problems: Vec<String>) {
        if self.is_finished() {
            return;
        }
        let started = matches!(self.phase, Phase::Starting | Phase::Ready | Phase::Switching);
        self.phase = Phase::Failed;
        if started {
            self.events.push_back(LiveEvent::TearDown {
                reason: problems.join("; "),
            });
        }
        self.outbox.push_back(LiveCloudMessage::Refused { code, problems });
    }

    pub fn poll_transmit(&mut self) -> Option<LiveCloudMessage> {
        self.outbox.pop_front()
    }

    /// Tunnel bytes moved at `now`: the migration is converging.
    pub fn progress(&mut self, now: Instant) {
        if self.phase == Phase::Ready {
            self.last_progress = self.last_progress.max(now);
        }
    }

    /// When [`Self::handle_timeout`] must next be called: the deadline of the phase.
    /// None while switching over (the driver bounds the wait for the memory) or ended.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.timeouts;
        match self.phase {
            Phase::AwaitHello | Phase::Authenticating => Some(self.connected + t.hello.min(t.setup)),
            Phase::AwaitPlan | Phase::Checking | Phase::Boot | Phase::Starting => Some(self.connected + t.setup),
            Phase::Ready => Some(self.last_progress + t.ready_idle),
            Phase::Switching | Phase::Done | Phase::Failed => None,
        }
    }

    /// Fails the migration (tearing a destination down) if its phase's deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else {
            return;
        };
        if now < deadline {
            return;
        }
        let t = &self.timeouts;
        let why = match self.phase {
            Phase::AwaitHello | Phase::Authenticating => {
                format!("the edge did not say Hello within {} s", t.hello.min(t.setup).as_secs())
            }
            Phase::Ready => format!(
                "no tunnel traffic for {} s while the destination waited: the live migration was given up; the source runs on",
                t.ready_idle.as_secs()
            ),
            phase => format!(
                "the live migration was not ready within {} s of connecting (still {}): the plan, the boot files and the destination's start must fit in that time; retry on a faster link",
                t.setup.as_secs(),
                match phase {
                    Phase::AwaitPlan => "waiting for the plan",
                    Phase::Checking => "checking the plan",
                    Phase::Boot => "receiving the boot files",
                    _ => "starting the destination",
                }
            ),
        };
        self.fail(RefusalCode::ProtocolViolation, vec![why]);
    }

    pub fn poll_event(&mut self) -> Option<LiveEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::live::{BootFile, DirectBoot};

    fn plan(kernel: &[u8], initrd: &[u8]) -> LivePlan {
        let sha = crate::chunk::sha256;
        LivePlan {
            plan: crate::wire::live::tests::sample_plan(),
            boot: Some(DirectBoot {
                kernel: BootFile {
                    len: kernel.len() as u64,
                    sha256: sha(kernel),
                },
                initrd: Some(BootFile {
                    len: initrd.len() as u64,
                    sha256: sha(initrd),
                }),
                append: "console=ttyS0".into(),
            }),
            downtime_limit_ms: 300,
            tunnel_lanes: 1,
        }
    }

    fn welcomed() -> LiveReceiver {
        let mut r = LiveReceiver::new(LiveTimeouts::default(), Instant::now());
        r.handle(LiveEdgeMessage::Hello {
            agent: "edge".into(),
            user: "u".into(),
            password: "p".into(),
        })
        .unwrap();
        assert!(matches!(r.poll_event(), Some(LiveEvent::Authenticate { .. })));
        r.authenticated(Ok(("cloud".into(), "MigrationOperator".into())));
        assert!(matches!(r.poll_transmit(), Some(LiveCloudMessage::Welcome { .. })));
        r
    }

    fn piece(file: u8, offset: u64, bytes: &[u8]) -> LiveEdgeMessage {
        LiveEdgeMessage::BootFile {
            file,
            offset,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn the_destination_starts_after_the_plan_and_every_boot_byte_then_switches_over() {
        let mut r = welcomed();
        r.handle(LiveEdgeMessage::Plan(Box::new(plan(b"kernel!", b"initrd"))))
            .unwrap();
        assert!(matches!(r.poll_event(), Some(LiveEvent::CheckPlan(_))));
        r.handle(piece(0, 0, b"kern")).unwrap();
        r.handle(piece(0, 4, b"el!")).unwrap();
        r.plan_checked(Ok(()));
        assert!(!r.tunnels_open());
        r.handle(piece(1, 0, b"initrd")).unwrap();
        let events: Vec<_> = std::iter::from_fn(|| r.poll_event()).collect();
        assert_eq!(events.len(), 4, "{events:?}");
        assert_eq!(events[3], LiveEvent::StartDestination);
        r.destination_ready("migration-1".into(), vec!["disk0".into()], Instant::now());
        assert!(r.tunnels_open());
        assert!(matches!(r.poll_transmit(), Some(LiveCloudMessage::Ready { .. })));
        r.handle(LiveEdgeMessage::Switchover).unwrap();
        assert_eq!(r.poll_event(), Some(LiveEvent::Switchover));
        r.committed("vm-9".into(), MigrationReport::default());
        assert!(matches!(r.poll_transmit(), Some(LiveCloudMessage::Committed { .. })));
        assert!(r.is_done());
    }

    #[test]
    fn boot_files_out_of_order_or_altered_are_violations() {
        let mut r = welcomed();
        r.handle(LiveEdgeMessage::Plan(Box::new(plan(b"kernel!", b"initrd"))))
            .unwrap();
        assert!(r.handle(piece(1, 0, b"initrd")).is_err(), "initrd before the kernel");
        assert!(r.handle(piece(0, 3, b"nel!")).is_err(), "a gap");
        assert!(r.handle(piece(0, 0, b"kernel!!")).is_err(), "past the declared length");
        let err = r.handle(piece(0, 0, b"KERNEL!")).unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
    }

    #[test]
    fn a_switchover_before_ready_is_a_violation_and_an_abort_tears_down() {
        let mut r = welcomed();
        assert!(r.handle(LiveEdgeMessage::Switchover).is_err());
        r.handle(LiveEdgeMessage::Plan(Box::new(plan(b"k", b"i")))).unwrap();
        r.plan_checked(Ok(()));
        r.handle(piece(0, 0, b"k")).unwrap();
        r.handle(piece(1, 0, b"i")).unwrap();
        r.destination_ready("migration-1".into(), vec![], Instant::now());
        let _ = std::iter::from_fn(|| r.poll_event()).count();
        r.handle(LiveEdgeMessage::Abort {
            reason: "link too slow".into(),
        })
        .unwrap();
        assert!(matches!(r.poll_event(), Some(LiveEvent::TearDown { .. })));
        assert!(r.is_finished() && !r.is_done());
    }

    #[test]
    fn a_refused_plan_starts_nothing() {
        let mut r = welcomed();
        r.handle(LiveEdgeMessage::Plan(Box::new(plan(b"k", b"i")))).unwrap();
        let _ = r.poll_event();
        r.plan_checked(Err((RefusalCode::PlanRejected, vec!["host has 128 MiB".into()])));
        assert_eq!(r.poll_event(), None, "nothing to tear down");
        assert!(matches!(
            r.poll_transmit(),
            Some(LiveCloudMessage::Refused {
                code: RefusalCode::PlanRejected,
                ..
            })
        ));
    }

    #[test]
    fn every_phase_has_a_deadline() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let timeouts = LiveTimeouts {
            hello: secs(10),
            setup: secs(600),
            ready_idle: secs(120),
        };
        let refusal = |r: &mut LiveReceiver| match r.poll_transmit() {
            Some(LiveCloudMessage::Refused { problems, .. }) => problems.join("; "),
            other => panic!("expected a refusal, got {other:?}"),
        };
        // No Hello.
        let mut r = LiveReceiver::new(timeouts.clone(), t0);
        assert_eq!(r.poll_timeout(), Some(t0 + secs(10)));
        r.handle_timeout(t0 + secs(9));
        assert!(!r.is_finished());
        r.handle_timeout(t0 + secs(10));
        assert!(refusal(&mut r).contains("did not say Hello within 10 s"));

        // A plan and all but the last boot file piece: the slot is let go at the setup
        // deadline, counted from the connection.
        let mut r = LiveReceiver::new(timeouts.clone(), t0);
        r.handle(LiveEdgeMessage::Hello {
            agent: "edge".into(),
            user: "u".into(),
            password: "p".into(),
        })
        .unwrap();
        r.authenticated(Ok(("cloud".into(), "MigrationOperator".into())));
        let _ = r.poll_transmit();
        r.handle(LiveEdgeMessage::Plan(Box::new(plan(b"kernel!", b"initrd"))))
            .unwrap();
        r.plan_checked(Ok(()));
        r.handle(piece(0, 0, b"kernel!")).unwrap();
        r.handle(piece(1, 0, b"initr")).unwrap();
        assert_eq!(r.poll_timeout(), Some(t0 + secs(600)));
        r.handle_timeout(t0 + secs(600));
        let why = refusal(&mut r);
        assert!(
            why.contains("not ready within 600 s") && why.contains("boot files"),
            "{why}"
        );

        // Ready: the deadline moves with tunnel traffic, and a silent peer is cut.
        let mut r = welcomed();
        r.handle(LiveEdgeMessage::Plan(Box::new(plan(b"k", b"i")))).unwrap();
        r.plan_checked(Ok(()));
        r.handle(piece(0, 0, b"k")).unwrap();
        r.handle(piece(1, 0, b"i")).unwrap();
        let ready = Instant::now();
        r.destination_ready("migration-1".into(), vec![], ready);
        let _ = std::iter::from_fn(|| r.poll_event()).count();
        let _ = r.poll_transmit();
        assert_eq!(r.poll_timeout(), Some(ready + Duration::from_secs(120)));
        r.progress(ready + secs(100));
        r.handle_timeout(ready + secs(150));
        assert!(!r.is_finished(), "traffic at 100 s moved the deadline to 220 s");
        r.handle_timeout(ready + secs(220));
        assert!(matches!(r.poll_event(), Some(LiveEvent::TearDown { .. })));
        assert!(refusal(&mut r).contains("no tunnel traffic for 120 s"));
        // Switching over: the driver bounds it; nothing here.
        assert_eq!(r.poll_timeout(), None);
    }
}
